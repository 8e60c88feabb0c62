"""The GPU path: training data resident on the device, and CUDA-only speed-ups. Invisible on CPU.

- ``DeviceBatches``: the training batches of a datamodule, drawn from uint8 tensors that live on
  the device. A step never waits for a loader: a batch is one index draw and one gather, both on
  the device, with no host round-trip. CIFAR-size data fits easily (CIFAR-10's 50,000 training
  images are 150 MB as uint8).
- ``DeviceResidentDataModule``: wraps any ``SemiSupervisedDataModule`` (its split, its
  validation and test loaders, its data facts) and serves its training batches as
  ``DeviceBatches`` on the trainer's device.
- ``CudaSpeedups``: a callback that, on CUDA only, puts the model in channels_last, allows TF32
  matmuls and (opt-in, off by default) compiles the backbone with ``torch.compile``. On any
  other device it does nothing.

    trainer = L.Trainer(accelerator="gpu", precision="bf16-mixed", callbacks=[CudaSpeedups()])
    trainer.fit(model, datamodule=DeviceResidentDataModule(CIFAR10DataModule(...)))

``benchmarks/throughput.py`` measures what this buys; ``benchmarks/gpu_check.sh`` runs it on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ssl_modules.batch import LabeledBatch, UnlabeledBatch


def materialize(dataset: Dataset, indices: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, targets)`` of ``dataset`` at ``indices`` (all by default) as two tensors.

    Uses the dataset's batched ``__getitems__`` where it has one (``InMemoryDataset``,
    ``IndexedSubset``), else stacks the items one by one.
    """
    if indices is None:
        indices = np.arange(len(dataset))
    index_list = [int(i) for i in np.asarray(indices)]
    if hasattr(dataset, "__getitems__"):
        images, targets = dataset.__getitems__(index_list)
    else:
        items = [dataset[i] for i in index_list]
        images = torch.stack([torch.as_tensor(image) for image, _ in items])
        targets = torch.as_tensor([int(target) for _, target in items])
    return torch.as_tensor(images), torch.as_tensor(targets).long()


class _IndexStream:
    """Positions ``[k * size, (k + 1) * size)`` of the endless concatenation of seeded
    permutations of ``range(n)``: every item once per pass, each pass in a fresh order.

    A pure function of ``k``, so a resumed run draws what the uninterrupted run drew. The
    permutations are drawn on ``device`` with a seeded generator: no host round-trip.
    """

    def __init__(self, n: int, size: int, seed: int, device: torch.device) -> None:
        if n < 1 or size < 1:
            raise ValueError(f"need at least one item and a batch size >= 1; got n={n}, size={size}")
        self.n, self.size, self.seed, self.device = n, size, seed, torch.device(device)
        self._cache: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            generator = torch.Generator(device=self.device).manual_seed(self.seed + 1_000_003 * epoch)
            if len(self._cache) > 4:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = torch.randperm(self.n, generator=generator, device=self.device)
        return self._cache[epoch]

    def __call__(self, k: int) -> torch.Tensor:
        start, stop = k * self.size, (k + 1) * self.size
        first, last = start // self.n, (stop - 1) // self.n
        parts = [self.permutation(epoch) for epoch in range(first, last + 1)]
        joined = parts[0] if len(parts) == 1 else torch.cat(parts)
        offset = start - first * self.n
        return joined[offset : offset + self.size]


class DeviceBatches:
    """Training batches ``{"labeled": LabeledBatch, "unlabeled": UnlabeledBatch}`` drawn on the device.

    ``index`` is the position in ``labeled``/``unlabeled``, as the datamodules' loaders give it.

    Images stay uint8 on ``device`` (the module converts them to floats, as for any batch).
    Batch ``k`` of the run is a pure function of ``(seed, k, rank)``: the labeled stream and the
    unlabeled stream are each an endless sequence of seeded permutations, and rank ``r`` of
    ``world_size`` takes the ``(k * world_size + r)``-th batch of each. An epoch is
    ``len(self)`` steps (one pass over the unlabeled pool, as ``SemiSupervisedDataModule``);
    iteration starts at ``start_step()`` (the trainer's ``global_step``: one batch per optimizer
    step), so a resumed run continues exactly where the interrupted one stopped.

    Args:
        labeled: ``(images, targets)``, images uint8 (N, C, H, W).
        unlabeled: ``(images, hidden_targets)``.
        batch_size: labeled images per batch; ``unlabeled_batch_size``: unlabeled ones.
        device: where the tensors live and the batches are drawn.
        seed: seed of both streams.
        rank, world_size: this process's share under DDP.
        start_step: returns the step the next iteration starts at (default 0).
    """

    def __init__(
        self,
        labeled: tuple[torch.Tensor, torch.Tensor],
        unlabeled: tuple[torch.Tensor, torch.Tensor],
        batch_size: int,
        unlabeled_batch_size: int,
        device: torch.device | str = "cpu",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: Callable[[], int] | None = None,
    ) -> None:
        device = torch.device(device)
        self.labeled = tuple(tensor.to(device) for tensor in labeled)
        self.unlabeled = tuple(tensor.to(device) for tensor in unlabeled)
        if len(self.unlabeled[0]) < unlabeled_batch_size:
            raise ValueError(
                f"the unlabeled pool has {len(self.unlabeled[0])} images, fewer than one unlabeled batch "
                f"({unlabeled_batch_size}); lower batch_size or unlabeled_batch_ratio."
            )
        self.rank, self.world_size = rank, world_size
        self.labeled_stream = _IndexStream(len(self.labeled[0]), batch_size, seed, device)
        self.unlabeled_stream = _IndexStream(len(self.unlabeled[0]), unlabeled_batch_size, seed + 1, device)
        self.steps_per_epoch = max(1, len(self.unlabeled[0]) // (unlabeled_batch_size * world_size))
        self.start_step = start_step or (lambda: 0)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def batch(self, step: int) -> dict[str, Any]:
        """The batch of training step ``step`` on this rank."""
        k = step * self.world_size + self.rank
        labeled = self.labeled_stream(k)
        unlabeled = self.unlabeled_stream(k)
        return {
            "labeled": LabeledBatch(self.labeled[0][labeled], self.labeled[1][labeled], labeled),
            "unlabeled": UnlabeledBatch(
                self.unlabeled[0][unlabeled], self.unlabeled[1][unlabeled], unlabeled
            ),
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        first = int(self.start_step())
        for step in range(first, first + self.steps_per_epoch):
            yield self.batch(step)


class DeviceResidentDataModule(L.LightningDataModule):
    """Any ``SemiSupervisedDataModule`` with its training split resident on the trainer's device.

    Everything but the training batches comes from the wrapped datamodule: the split (same
    ``labeled_indices``), the validation/test/labeled loaders, and the data facts
    (``num_classes``, ``channels``, ... are read through to it). The training batches are
    ``DeviceBatches`` with the wrapped datamodule's batch sizes and ``shuffle_seed``.

    Args:
        datamodule: the datamodule to serve.
        device: where the images live (default: the trainer's root device, else CPU).
    """

    def __init__(self, datamodule: L.LightningDataModule, device: str | None = None) -> None:
        super().__init__()
        self.datamodule = datamodule
        self.device = device

    def __getattr__(self, name: str) -> Any:  # only called for names this wrapper lacks
        if name == "datamodule":
            raise AttributeError(name)
        return getattr(self.datamodule, name)

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.datamodule.trainer = getattr(self, "trainer", None)
        self.datamodule.setup(stage)

    def state_dict(self) -> dict[str, Any]:
        return self.datamodule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.datamodule.load_state_dict(state_dict)

    def _trainer_device(self) -> tuple[torch.device, int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return torch.device(self.device or "cpu"), 0, 1
        device = torch.device(self.device) if self.device else trainer.strategy.root_device
        return device, trainer.global_rank, trainer.world_size

    def train_dataloader(self) -> DeviceBatches:
        data = self.datamodule
        data.setup("fit")
        device, rank, world_size = self._trainer_device()
        labeled = materialize(data.train_dataset, data.labeled_indices)
        unlabeled = materialize(data._unlabeled_dataset())
        trainer = getattr(self, "trainer", None)
        return DeviceBatches(
            labeled,
            unlabeled,
            data.batch_size,
            data.batch_size * data.unlabeled_batch_ratio,
            device=device,
            seed=data.shuffle_seed,
            rank=rank,
            world_size=world_size,
            start_step=(lambda: trainer.global_step) if trainer is not None else None,
        )

    def val_dataloader(self) -> DataLoader:
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.datamodule.test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.datamodule.predict_dataloader()

    def labeled_dataloader(self) -> DataLoader:
        return self.datamodule.labeled_dataloader()


class CudaSpeedups(L.Callback):
    """CUDA-only speed-ups for training; on any other device it changes nothing.

    - ``channels_last``: the model's 4-D weights in channels_last (NHWC) memory format, which
      cuDNN's convolutions prefer under bf16/fp16 (tensor cores);
    - ``tf32``: ``torch.set_float32_matmul_precision("high")`` (TF32 matmuls on Ampere+);
    - ``compile_backbone`` (off by default: compilation costs minutes, measured in
      ``benchmarks/gpu_check.sh``): ``backbone.compile()`` in place, so parameter names and
      checkpoints are unchanged.

    bf16 itself is the trainer's ``precision="bf16-mixed"``.
    """

    def __init__(self, channels_last: bool = True, tf32: bool = True, compile_backbone: bool = False) -> None:
        self.channels_last = channels_last
        self.tf32 = tf32
        self.compile_backbone = compile_backbone
        self.applied = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.strategy.root_device.type != "cuda" or self.applied:
            return
        if self.tf32:
            torch.set_float32_matmul_precision("high")
        if self.channels_last:
            pl_module.to(memory_format=torch.channels_last)
        backbone = getattr(pl_module, "backbone", None)
        if self.compile_backbone and isinstance(backbone, torch.nn.Module):
            backbone.compile()
        self.applied = True
