"""The supervised baseline, and linear probe / fine-tune of a pretrained backbone."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from ssl_modules.augment import weak_augmentation
from ssl_modules.backbones import first_conv_in_channels
from ssl_modules.base import ClassifierModule, split_batch
from ssl_modules.callbacks import log_image_grid


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


class SupervisedModule(ClassifierModule):
    """Cross-entropy on the labeled batch only: the baseline every other method must beat.

    Also the downstream stage of self-supervised learning: with ``pretrained`` it starts from
    the backbone of any checkpoint in this library, and with ``freeze_backbone`` it is a
    linear probe (the backbone stays in eval mode, BatchNorm statistics frozen). With
    ``freeze_backbone`` and no checkpoint it is the random-init reference probe.

    Args:
        backbone: backbone name (``ssl_modules.backbones``).
        lr: SGD learning rate (momentum 0.9, Nesterov), cosine-decayed per step.
        weight_decay: SGD weight decay.
        pretrained: path of a checkpoint whose ``backbone.*`` weights initialise the backbone.
        freeze_backbone: train only the classifier (linear probe).
        allow_class_mismatch: accept a checkpoint trained for another number of classes
            (only its backbone is used); without it such a checkpoint is refused.
        augment: flip/shift the labeled images (off for a probe on fixed features).
        (data facts and optimizer/scheduler as in ``SSLModuleBase``)

    Batch: ``{"labeled": (x, y), "unlabeled": ...}`` (unlabeled ignored) or ``(x, y)``;
    x float in [0, 1], shape (batch_size, channels, image_size, image_size).
    """

    def __init__(
        self,
        num_classes: int = 10,
        channels: int = 3,
        image_size: int = 32,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        horizontal_flip: bool = True,
        backbone: str = "small_cnn",
        lr: float = 0.03,
        weight_decay: float = 5e-4,
        pretrained: str | None = None,
        freeze_backbone: bool = False,
        allow_class_mismatch: bool = False,
        augment: bool = True,
        drop_rate: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
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
            backbone,
            drop_rate,
            optimizer,
            scheduler,
        )
        self.augment = weak_augmentation(image_size, horizontal_flip) if augment else torch.nn.Identity()
        self.freeze_backbone = freeze_backbone
        # 1 once the pretrained weights are in; saved, so a reloaded or resumed model never
        # overwrites its fine-tuned backbone with the pretrained one again
        self.register_buffer("pretrained_loaded", torch.zeros((), dtype=torch.uint8))
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.pretrained and not bool(self.pretrained_loaded):
            self.load_pretrained(self.hparams.pretrained)

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
        if source_classes != self.num_classes and not self.hparams.allow_class_mismatch:
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

    def train(self, mode: bool = True) -> SupervisedModule:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # a probe measures fixed features: BatchNorm statistics stay put
        return self

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (images, labels), _ = split_batch(batch)
        views = self.augment(images)  # flip + shift, batched on the device
        logits = self(views)  # (batch_size, num_classes)
        loss = F.cross_entropy(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(1) == labels).float().mean())
        if self.global_step == 0 and batch_idx == 0:
            log_image_grid(self, "train/augmented_views", views, caption="augmented labeled images")
        return loss

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            params, lr=self.hparams.lr, momentum=0.9, nesterov=True, weight_decay=self.hparams.weight_decay
        )
