"""Shared wiring for every method: data facts, input normalisation, optimizer and scheduler
injection, per-epoch seeding and ``test/acc``. Not the algorithm: each method writes out its
own ``training_step``.

- ``SSLModuleBase``: the wiring above.
- ``ClassifierModule``: backbone + linear classifier, evaluated with ``evaluation_logits``
  (the live network, or the EMA/teacher where the method evaluates with it). Supervised and
  semi-supervised methods derive from it.
- Self-supervised methods derive from ``ssl_modules.evaluation.SelfSupervisedModule``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from ssl_modules.augment import to_float_images
from ssl_modules.backbones import build_backbone, first_conv_in_channels


class WarmupCosine:
    """LR factor: linear warm-up for ``warmup_steps``, then a half cosine from 1 to ``final_factor``.

    ``factor(k) = (k + 1) / W`` for ``k < W``, then with ``p = min(1, (k - W) / (K - W))``::

        factor(k) = final + (1 - final) * (1 + cos(pi * p)) / 2

    so 1 at the end of the warm-up, ``(1 + final) / 2`` half-way, ``final`` at ``K``. A pure
    function of the step, so a resumed run continues exactly.

    - [0] SGDR (cosine annealing), Loshchilov & Hutter, 2017, https://arxiv.org/abs/1608.03983
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, final_factor: float = 0.0) -> None:
        if warmup_steps < 0 or not 0.0 <= final_factor <= 1.0:
            raise ValueError(
                f"warmup_steps must be >= 0 and final_factor in [0, 1]; got {warmup_steps}, {final_factor}"
            )
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = int(warmup_steps)
        self.final_factor = final_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.final_factor + (1 - self.final_factor) * 0.5 * (1 + math.cos(math.pi * progress))


class FixMatchCosine:
    """FixMatch's LR factor ``cos(7 pi k / (16 K))`` at step ``k`` of ``K``: 1 at the start,
    ``cos(7 pi / 32) = 0.773`` half-way, ``cos(7 pi / 16) = 0.195`` at the end, never 0.

    ``fraction`` is the ``7/16``: the factor is ``cos(fraction * pi * k / K)``, clamped at ``K``.
    A pure function of the step.

    - [0] FixMatch, Sohn et al., 2020, https://arxiv.org/abs/2001.07685 (section 4, "cosine
      learning rate decay ... eta cos(7 pi k / 16 K)")
    """

    def __init__(self, total_steps: int, fraction: float = 7 / 16) -> None:
        if not 0.0 < fraction < 0.5:
            raise ValueError(f"fraction must be in (0, 0.5) so the factor stays > 0; got {fraction}")
        self.total_steps = max(1, int(total_steps))
        self.fraction = fraction

    def __call__(self, step: int) -> float:
        progress = min(1.0, step / self.total_steps)
        return math.cos(self.fraction * math.pi * progress)


def _images_to_float(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return to_float_images(batch) if batch.ndim == 4 else batch
    if isinstance(batch, dict):
        return {key: _images_to_float(value) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_images_to_float(value) for value in batch)
    return batch


def split_batch(
    batch: Any,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """``(labeled, unlabeled)`` from a ``{"labeled", "unlabeled"}`` batch, or from a plain ``(x, y)``."""
    if isinstance(batch, dict):
        return batch["labeled"], batch.get("unlabeled")
    return tuple(batch), None


def load_pretrained_backbone_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The ``backbone.*`` weights and the hyperparameters of a checkpoint of any module here.

    Loads with ``weights_only=True``: a checkpoint cannot run code on load.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained checkpoint {str(path)!r} does not exist; pass the path of a .ckpt file."
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    backbone = {key[len("backbone.") :]: value for key, value in state.items() if key.startswith("backbone.")}
    if not backbone:
        raise ValueError(
            f"{str(path)!r} has no 'backbone.*' weights; pass a checkpoint saved by an ssl_modules module."
        )
    return backbone, dict(checkpoint.get("hyper_parameters", {}))


class SSLModuleBase(L.LightningModule):
    """Base of every module. Subclasses call ``super().__init__`` with the data facts.

    Args:
        num_classes: classes of the downstream task (linked from the datamodule).
        channels: image channels (linked).
        image_size: image side in pixels (linked).
        mean, std: per-channel normalisation (linked). Shape: (channels,)
        horizontal_flip: whether mirrored images keep their class (linked).
        lr: base learning rate of the method's default optimizer.
        weight_decay: weight decay of the method's default optimizer.
        optimizer: replaces the default optimizer (LightningCLI ``OptimizerCallable``).
        scheduler: replaces the default warm-up + cosine schedule (``LRSchedulerCallable``),
            stepped every optimizer step.
    """

    def __init__(
        self,
        num_classes: int,
        channels: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        horizontal_flip: bool,
        lr: float,
        weight_decay: float,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2; got {num_classes}")
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"mean {tuple(mean)} and std {tuple(std)} must have one value per channel ({channels}); "
                "they are linked from the datamodule, so pass matching values when building the model by hand."
            )
        if lr <= 0:
            raise ValueError(f"lr must be > 0; got {lr}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.num_classes = num_classes
        self.channels = channels
        self.image_size = image_size
        self.horizontal_flip = horizontal_flip
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.register_buffer(
            "input_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "input_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

    # -- inputs -----------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Images travel as uint8 (4x less host->device traffic) and become floats on the device.
        return _images_to_float(batch)

    def check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(
                f"expected images of shape (batch, {self.channels}, H, W); got {tuple(images.shape)}. "
                f"The model was built for {self.channels} channel(s): build it with channels={images.shape[1] if images.ndim == 4 else '?'} "
                "(the CLI links it from the datamodule) or convert the images."
            )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] -> standardised with the data's mean/std."""
        return (images - self.input_mean) / self.input_std

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.input_std + self.input_mean

    # -- optimisation -----------------------------------------------------------------
    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def default_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The method's paper optimizer at ``lr``/``weight_decay``; subclasses override."""
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def default_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total))

    def configure_optimizers(self) -> Any:
        params = self.trainable_parameters()
        optimizer = (
            self.optimizer_factory(params) if self.optimizer_factory else self.default_optimizer(params)
        )
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
        else:
            scheduler = self.default_scheduler(optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Augmentation and dropout draw from the global RNG; reseeding from (seed, step, rank)
        # makes a resumed run draw exactly what the uninterrupted run drew, whatever the RNG
        # state the resumed process started with or consumed while setting up its loaders.
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        torch.manual_seed((seed * 1_000_003 + self.global_step * 7_919 + self.global_rank) % (2**63))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._trainer is not None and self.trainer.optimizers:
            self.log(
                "train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False
            )


class ClassifierModule(SSLModuleBase):
    """Backbone + linear classifier; supervised and semi-supervised methods derive from it.

    ``val/acc`` and ``test/acc`` are top-1 accuracy of ``evaluation_logits`` (override it to
    evaluate with an EMA or teacher network).

    Args:
        backbone: a name accepted by ``ssl_modules.backbones.build_backbone``.
        drop_rate: dropout before the classifier.
        pretrained: path of a checkpoint of any module here whose ``backbone.*`` weights
            initialise the backbone when fitting starts (e.g. a SimCLR checkpoint).
        allow_class_mismatch: accept a ``pretrained`` checkpoint trained for another number of
            classes (only its backbone is used); without it such a checkpoint is refused.
        (the rest as in ``SSLModuleBase``)
    """

    def __init__(
        self,
        num_classes: int,
        channels: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        horizontal_flip: bool,
        lr: float,
        weight_decay: float,
        backbone: str,
        drop_rate: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        pretrained: str | None = None,
        allow_class_mismatch: bool = False,
    ) -> None:
        super().__init__(
            num_classes,
            channels,
            image_size,
            mean,
            std,
            horizontal_flip,
            lr,
            weight_decay,
            optimizer,
            scheduler,
        )
        self.backbone = build_backbone(backbone, channels, drop_rate=drop_rate)
        self.classifier = nn.Linear(self.backbone.num_features, num_classes)
        self.pretrained = pretrained
        self.allow_class_mismatch = allow_class_mismatch
        # 1 once the pretrained weights are in; saved, so a reloaded or resumed model never
        # overwrites its trained backbone with the pretrained one again
        self.register_buffer("pretrained_loaded", torch.zeros((), dtype=torch.uint8))

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.pretrained and not bool(self.pretrained_loaded):
            self.load_pretrained(self.pretrained)

    def load_pretrained(self, path: str | Path) -> None:
        """Copy the backbone of checkpoint ``path`` into this model, after checking it fits."""
        state, hparams = load_pretrained_backbone_state(path)
        source_backbone = hparams.get("backbone", self.hparams.backbone)
        if source_backbone != self.hparams.backbone:
            raise ValueError(
                f"checkpoint {str(path)!r} has backbone {source_backbone!r} but this model was built with "
                f"{self.hparams.backbone!r}; set model.backbone={source_backbone}."
            )
        source_classes = hparams.get("num_classes", self.num_classes)
        if source_classes != self.num_classes and not self.allow_class_mismatch:
            raise ValueError(
                f"checkpoint {str(path)!r} was trained for {source_classes} classes but the data has "
                f"{self.num_classes}; use a checkpoint from the same label set, or set "
                "model.allow_class_mismatch=true to keep only its backbone and train a new classifier."
            )
        expected = first_conv_in_channels(self.backbone)
        for value in state.values():
            if value.ndim == 4:  # the first convolution's weight: (out, in_channels, k, k)
                if value.shape[1] != expected:
                    raise ValueError(
                        f"checkpoint {str(path)!r} expects {value.shape[1]}-channel images but the data has "
                        f"{expected}; pretrain on data with {expected} channel(s) (or convert the images)."
                    )
                break
        self.backbone.load_state_dict(state)
        self.pretrained_loaded.fill_(1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features. Shape: (batch_size, C, H, W) -> (batch_size, num_features)."""
        self.check_images(images)
        return self.backbone(self.normalize(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1], shape (batch_size, C, H, W) -> logits (batch_size, num_classes)."""
        return self.classifier(self.embed(images))

    def evaluation_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)

    def _evaluate(self, batch: Any, stage: str) -> torch.Tensor:
        images, labels = batch
        logits = self.evaluation_logits(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=len(labels))
        self.log(f"{stage}/acc", accuracy, prog_bar=True, sync_dist=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.evaluation_logits(images).softmax(dim=1)
