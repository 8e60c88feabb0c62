"""The labeled/unlabeled data protocol shared by every method.

A datamodule holds a labeled source dataset and splits its train part into a small
**labeled** part and a large **unlabeled** part. ``train_dataloader()`` returns
``{"labeled": DataLoader, "unlabeled": DataLoader}``; Lightning combines them in
``max_size_cycle`` mode, so a training batch is
``{"labeled": LabeledBatch(images, labels, index), "unlabeled": UnlabeledBatch(images,
hidden_labels, index)}`` (``ssl_modules.batch``, which documents the fields). ``hidden_labels``
is the true label where the dataset knows it and ``-1`` where it does not; it exists for
diagnostics only. ``index`` is each image's position in its loader's dataset: the key of
per-sample state.

Images leave the datamodule as uint8 tensors of one fixed size, ``(C, H, W)``; all random
augmentation happens batched on the device inside the methods.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, Sampler

from ssl_modules.batch import LabeledBatch, UnlabeledBatch

UNKNOWN_LABEL = -1
# The validation and test sets must not move with ``split_seed``; they are carved with this one.
_FIXED_SPLIT_SEED = 12345


class InMemoryDataset(Dataset):
    """Images already decoded into one uint8 tensor.

    Args:
        images: Shape: (num_images, channels, height, width), uint8.
        targets: Shape: (num_images,), int64; ``-1`` where the label is unknown.

    ``__getitems__`` serves a whole batch with one indexing operation, so the DataLoader does
    no per-sample Python work (see ``batch_collate``).
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W); got {tuple(images.shape)}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = targets.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.targets[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.images[index], self.targets[index]


class IndexedSubset(Dataset):
    """A view of ``dataset`` at ``indices`` (repeated indices allowed), keeping batched access."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], hide_labels: bool = False) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.hide_labels = hide_labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[int(self.indices[index])]

    def __getitems__(self, indices: list[int]) -> Any:
        inner = self.indices[np.asarray(indices, dtype=np.int64)].tolist()
        if hasattr(self.dataset, "__getitems__"):
            return self.dataset.__getitems__(inner)
        return [self.dataset[i] for i in inner]


class NamedBatches(Dataset):
    """``dataset`` served as ``kind(images, targets, index)`` (``ssl_modules.batch``), with
    ``index = position % period``: the image's position in the dataset its loader draws from.

    Args:
        dataset: yields ``(image, target)`` items, or ``(images, targets)`` from ``__getitems__``.
        kind: ``LabeledBatch`` or ``UnlabeledBatch``.
        period: the number of distinct images when ``dataset`` repeats them in order (the
            labeled set tiled to fill an epoch), so that a repeat keeps its image's index;
            default ``len(dataset)``.
    """

    def __init__(self, dataset: Dataset, kind: type = LabeledBatch, period: int | None = None) -> None:
        if kind not in (LabeledBatch, UnlabeledBatch):
            raise ValueError(f"kind must be LabeledBatch or UnlabeledBatch; got {kind!r}")
        self.dataset = dataset
        self.kind = kind
        self.period = int(period) if period is not None else len(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        image, target = self.dataset[index]
        return self.kind(
            torch.as_tensor(image), torch.as_tensor(target).long(), torch.tensor(index % self.period)
        )

    def __getitems__(self, indices: list[int]) -> Any:
        if not hasattr(self.dataset, "__getitems__"):
            return [self[i] for i in indices]  # collated by default_collate, field by field
        served = self.dataset.__getitems__(indices)
        if not isinstance(served, tuple):
            # a list of (image, target) items (``IndexedSubset`` or ``Subset`` over a dataset read
            # item by item): name each one; default_collate stacks them field by field
            return [
                self.kind(
                    torch.as_tensor(image), torch.as_tensor(target).long(), torch.tensor(i % self.period)
                )
                for i, (image, target) in zip(indices, served)
            ]
        images, targets = served  # the whole batch from one indexing operation
        index = torch.as_tensor(indices, dtype=torch.long) % self.period
        return self.kind(torch.as_tensor(images), torch.as_tensor(targets).long(), index)


def batch_collate(batch: Any) -> Any:
    """Collate that passes through batches a dataset already built with ``__getitems__``."""
    if isinstance(batch, (LabeledBatch, UnlabeledBatch)):
        return batch
    if isinstance(batch, tuple) and all(isinstance(t, torch.Tensor) for t in batch):
        return list(batch)
    return torch.utils.data.default_collate(batch)


class SeededRandomSampler(Sampler[int]):
    """Shuffles with ``seed + epoch`` so an epoch's order does not depend on the global RNG.

    Lightning calls ``set_epoch`` every epoch; a run resumed from a checkpoint therefore
    sees exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


def split_labeled(
    targets: np.ndarray,
    labels_per_class: int | None,
    label_fraction: float | None,
    seed: int,
) -> np.ndarray:
    """Choose the labeled indices of a train split, balanced or stratified.

    Args:
        targets: Shape: (num_train,), the true class of every train image.
        labels_per_class: exactly this many labeled images of every class (balanced).
        label_fraction: this fraction of every class, at least one image each (stratified).
        seed: makes the choice deterministic.

    Returns:
        Sorted indices into ``targets``. Neither count given means every image is labeled.
    """
    if labels_per_class is not None and label_fraction is not None:
        raise ValueError(
            f"labels_per_class={labels_per_class} and label_fraction={label_fraction} were both given; "
            "pass only one (labels_per_class for a balanced budget, label_fraction for a stratified one)."
        )
    targets = np.asarray(targets)
    if labels_per_class is None and label_fraction is None:
        return np.arange(len(targets))
    if labels_per_class is not None and labels_per_class < 1:
        raise ValueError(f"labels_per_class must be >= 1; got {labels_per_class}.")
    if label_fraction is not None and not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1]; got {label_fraction}.")
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(targets):
        members = np.flatnonzero(targets == cls)
        if labels_per_class is not None:
            count = labels_per_class
            if count > len(members):
                smallest = min(int((targets == c).sum()) for c in np.unique(targets))
                raise ValueError(
                    f"labels_per_class={labels_per_class} but class {int(cls)} has only {len(members)} "
                    f"training images; use labels_per_class <= {smallest} or label_fraction instead."
                )
        else:
            count = max(1, round(label_fraction * len(members)))
        chosen.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(chosen))


def stratified_holdout(targets: np.ndarray, size: int | float, seed: int = _FIXED_SPLIT_SEED) -> np.ndarray:
    """Indices of a stratified hold-out set of ``size`` images (an int) or fraction (a float)."""
    targets = np.asarray(targets)
    total = len(targets)
    count = int(round(size * total)) if isinstance(size, float) else int(size)
    if count <= 0:
        return np.array([], dtype=np.int64)
    if count >= total:
        raise ValueError(f"val_size={size} leaves no training images out of {total}; make it smaller.")
    rng = np.random.default_rng(seed)
    held = []
    classes, counts = np.unique(targets, return_counts=True)
    for cls, n in zip(classes, counts):
        take = min(n - 1, max(1, round(count * n / total))) if n > 1 else 0
        held.append(rng.choice(np.flatnonzero(targets == cls), size=take, replace=False))
    return np.sort(np.concatenate(held)).astype(np.int64)


class SemiSupervisedDataModule(L.LightningDataModule):
    """Base datamodule: labeled/unlabeled split, loaders and data facts.

    Subclasses set the data facts in ``__init__`` and implement ``load_split(name)`` for
    ``"train"``, ``"test"`` and optionally ``"val"`` and ``"unlabeled"`` (return ``None`` when the
    dataset has no such split). A ``"train"`` dataset must expose ``targets`` (array-like).

    Args:
        labels_per_class: labeled images per class (balanced). Exclusive with ``label_fraction``.
        label_fraction: fraction of each class that is labeled (stratified).
        split_seed: seed of the labeled/unlabeled split.
        labeled_in_unlabeled: keep labeled images in the unlabeled pool (FixMatch convention).
        batch_size: labeled images per training batch (and the evaluation batch size).
        unlabeled_batch_ratio: unlabeled images per labeled image in a batch (FixMatch's mu).
        val_size: images (int) or fraction (float) of train held out for validation, when the
            dataset has no validation split of its own. Fixed across ``split_seed``.
        num_workers: DataLoader workers.
        shuffle_seed: seed of the per-epoch shuffling.
    """

    # data facts (contract); subclasses set them in __init__
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # whether a horizontal mirror of an image is still an image of the same class
    horizontal_flip: bool = True

    def __init__(
        self,
        labels_per_class: int | None = None,
        label_fraction: float | None = None,
        split_seed: int = 0,
        labeled_in_unlabeled: bool = True,
        batch_size: int = 64,
        unlabeled_batch_ratio: int = 1,
        val_size: int | float = 0.1,
        num_workers: int = 0,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        if labels_per_class is not None and label_fraction is not None:
            raise ValueError(
                f"labels_per_class={labels_per_class} and label_fraction={label_fraction} were both given; "
                "pass only one (labels_per_class for a balanced budget, label_fraction for a stratified one)."
            )
        if batch_size < 1 or unlabeled_batch_ratio < 1:
            raise ValueError(
                f"batch_size ({batch_size}) and unlabeled_batch_ratio ({unlabeled_batch_ratio}) must be >= 1."
            )
        self.labels_per_class = labels_per_class
        self.label_fraction = label_fraction
        self.split_seed = split_seed
        self.labeled_in_unlabeled = labeled_in_unlabeled
        self.batch_size = batch_size
        self.unlabeled_batch_ratio = unlabeled_batch_ratio
        self.val_size = val_size
        self.num_workers = num_workers
        self.shuffle_seed = shuffle_seed
        self._prepared = False

    # -- subclasses -------------------------------------------------------------------
    def load_split(self, name: str) -> Dataset | None:
        raise NotImplementedError

    # -- split ------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._prepared:
            return
        train = self.load_split("train")
        if train is None:
            raise RuntimeError(f"{type(self).__name__} has no train split")
        targets = np.asarray(train.targets)
        present = set(np.unique(targets).tolist())
        missing = sorted(set(range(self.num_classes)) - present)
        if missing:
            raise ValueError(
                f"classes {missing} have no training images in {type(self).__name__}; every one of the "
                f"{self.num_classes} classes needs at least one (check the dataset files or num_classes)."
            )
        val = self.load_split("val")
        if val is None:
            held = stratified_holdout(targets, self.val_size)
            keep = np.setdiff1d(np.arange(len(targets)), held)
            val = IndexedSubset(train, held) if len(held) else None
        else:
            keep = np.arange(len(targets))
        labeled_local = split_labeled(
            targets[keep], self.labels_per_class, self.label_fraction, self.split_seed
        )
        self.labeled_indices = keep[labeled_local]
        if self.labeled_in_unlabeled:
            self.unlabeled_indices = keep
        else:
            self.unlabeled_indices = np.setdiff1d(keep, self.labeled_indices)
        self.train_dataset = train
        self.val_dataset = val
        self.test_dataset = self.load_split("test")
        extra = self.load_split("unlabeled")
        self.extra_unlabeled_dataset = extra
        self._prepared = True
        self._save_split()

    def split_summary(self) -> dict[str, Any]:
        """The chosen indices and settings, as saved next to the run (``split.json``)."""
        return {
            "datamodule": type(self).__name__,
            "labels_per_class": self.labels_per_class,
            "label_fraction": self.label_fraction,
            "split_seed": self.split_seed,
            "labeled_in_unlabeled": self.labeled_in_unlabeled,
            "num_labeled": int(len(self.labeled_indices)),
            "num_unlabeled": int(len(self.unlabeled_indices))
            + (len(self.extra_unlabeled_dataset) if self.extra_unlabeled_dataset is not None else 0),
            "labeled_indices": self.labeled_indices.tolist(),
        }

    def _save_split(self) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.loggers:
            return  # without a logger there is no run folder to save into
        # trainer.log_dir is a collective (broadcast) under DDP: every rank must ask for it
        log_dir = trainer.log_dir or trainer.default_root_dir
        if log_dir is None or trainer.global_rank != 0:
            return
        summary = self.split_summary()
        os.makedirs(log_dir, exist_ok=True)
        Path(log_dir, "split.json").write_text(json.dumps(summary))
        for logger in trainer.loggers:  # W&B: the split lands in the run's config panel
            logger.log_hyperparams({"data_split": summary})

    def state_dict(self) -> dict[str, Any]:
        if not self._prepared:
            return {}
        return {"labeled_indices": self.labeled_indices.tolist(), "split_seed": self.split_seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict or not self._prepared:
            return
        if state_dict["labeled_indices"] != self.labeled_indices.tolist():
            raise ValueError(
                "the checkpoint was trained on a different labeled split than this datamodule chose; "
                "resume with the same labels_per_class/label_fraction and split_seed as the original run."
            )

    # -- loaders ----------------------------------------------------------------------
    def _loader(
        self, dataset: Dataset, batch_size: int, shuffle_seed: int | None, drop_last: bool
    ) -> DataLoader:
        sampler = SeededRandomSampler(len(dataset), shuffle_seed) if shuffle_seed is not None else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            collate_fn=batch_collate,
            persistent_workers=self.num_workers > 0,
        )

    def _unlabeled_dataset(self) -> Dataset:
        pool = IndexedSubset(self.train_dataset, self.unlabeled_indices)
        if self.extra_unlabeled_dataset is None:
            return pool
        return torch.utils.data.ConcatDataset([pool, self.extra_unlabeled_dataset])

    def train_dataloader(self) -> dict[str, DataLoader]:
        self.setup("fit")
        unlabeled = self._unlabeled_dataset()
        unlabeled_batch = self.batch_size * self.unlabeled_batch_ratio
        if len(unlabeled) < unlabeled_batch:
            raise ValueError(
                f"the unlabeled pool has {len(unlabeled)} images, fewer than one unlabeled batch "
                f"({unlabeled_batch}); lower batch_size or unlabeled_batch_ratio."
            )
        steps = len(unlabeled) // unlabeled_batch
        # The few labeled images are repeated so that one epoch (a pass over the unlabeled
        # pool) draws a labeled batch at every step, each labeled image about equally often.
        repeats = max(1, math.ceil(steps * self.batch_size / len(self.labeled_indices)))
        labeled = NamedBatches(
            IndexedSubset(self.train_dataset, np.tile(self.labeled_indices, repeats)),
            LabeledBatch,
            period=len(self.labeled_indices),
        )
        loaders = {"labeled": self._loader(labeled, self.batch_size, self.shuffle_seed, drop_last=True)}
        # A method that never reads the unlabeled batch says so with ``uses_unlabeled = False``
        # (SupervisedModule) and gets the labeled loader alone: no unlabeled images are read.
        # Its batches and epoch length stay the same (``repeats`` makes the labeled loader at
        # least as long as the unlabeled one, and an epoch is the longer of the two).
        trainer = getattr(self, "trainer", None)
        if getattr(trainer.lightning_module if trainer is not None else None, "uses_unlabeled", True):
            loaders["unlabeled"] = self._loader(
                NamedBatches(unlabeled, UnlabeledBatch),
                unlabeled_batch,
                self.shuffle_seed + 1,
                drop_last=True,
            )
        return loaders

    def labeled_dataloader(self) -> DataLoader:
        """Each labeled image once, in order: for fitting linear probes and kNN banks."""
        self.setup("fit")
        return self._loader(
            NamedBatches(IndexedSubset(self.train_dataset, self.labeled_indices)),
            self.batch_size,
            None,
            False,
        )

    @property
    def has_validation_split(self) -> bool:
        """Whether there is a validation split (the dataset's own, or ``val_size`` held out of train)."""
        self.setup("validate")
        return self.val_dataset is not None and len(self.val_dataset) > 0

    def val_dataloader(self) -> DataLoader | list:
        """The validation split; never the test split. Without one (``val_size=0`` on a dataset
        with no validation split of its own) validation is off: an empty list, which Lightning
        reads as "no validation"."""
        if not self.has_validation_split:
            rank_zero_info(
                f"{type(self).__name__}: no validation split (val_size={self.val_size}), so validation is off; "
                "set data.val_size (e.g. 0.1) to hold out part of train for validation."
            )
            return []
        return self._loader(NamedBatches(self.val_dataset), self.batch_size * 2, None, False)

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._loader(NamedBatches(self.test_dataset), self.batch_size * 2, None, False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
