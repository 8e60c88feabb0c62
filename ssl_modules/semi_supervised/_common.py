"""Parts shared by the semi-supervised methods: a frozen classifier copy (EMA teacher, fixed
teacher, round labeler), loading a classifier from any checkpoint of the library, and the
pseudo-label diagnostics logged against ``y_hidden`` (never used by a loss)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from ssl_modules.augment import weak_augmentation
from ssl_modules.augment.strong import strong_augmentation
from ssl_modules.ema import copy_frozen, ema_update, warmup_ema_decay

AUGMENTATIONS = ("weak", "strong", "none")


class FrozenClassifier(nn.Module):
    """``classifier(backbone(x))`` with no gradients: a teacher, an EMA copy or a round's labeler.

    Always in eval mode (BatchNorm with running statistics, no dropout), whatever ``train()`` the
    parent module receives: Lightning does not call ``model.train()`` when fitting starts and
    restores each submodule's own mode after validation, so a parent's ``train()`` override alone
    would leave a target network in training mode during the fit.

    Shape: normalised images (batch_size, C, H, W) -> logits (batch_size, num_classes).
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.backbone = copy_frozen(backbone)
        self.classifier = copy_frozen(classifier)
        self.eval()

    def train(self, mode: bool = True) -> FrozenClassifier:
        return super().train(False)  # a target: always eval

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(images))

    @torch.no_grad()
    def copy_from(self, backbone: nn.Module, classifier: nn.Module) -> None:
        self.backbone.load_state_dict(backbone.state_dict())
        self.classifier.load_state_dict(classifier.state_dict())

    @torch.no_grad()
    def ema_from(self, backbone: nn.Module, classifier: nn.Module, decay: float) -> None:
        ema_update(self.backbone, backbone, decay)
        ema_update(self.classifier, classifier, decay)


class EvaluatesWithEMA:
    """Mixin of the classifier modules evaluated with an EMA of their weights (FixMatch, MixMatch).

    Expects ``self.ema_model`` (a ``FrozenClassifier``) and the hyper-parameters ``ema_decay`` and
    ``evaluate_with_ema``. After each optimizer step the EMA moves with Mean Teacher's warm-up
    ``min(1 - 1/(step + 1), ema_decay)``; ``val/acc``, ``test/acc``, ``embed`` and
    ``load_backbone`` use it when ``evaluate_with_ema``. List it before ``ClassifierModule``.
    """

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.ema_model.ema_from(
            self.backbone, self.classifier, warmup_ema_decay(self.global_step, self.hparams.ema_decay)
        )

    def train(self, mode: bool = True) -> Any:
        super().train(mode)
        self.ema_model.eval()
        return self

    def evaluation_logits(self, images: torch.Tensor) -> torch.Tensor:
        if not self.hparams.evaluate_with_ema:
            return self(images)
        self.check_images(images)
        return self.ema_model(self.normalize(images))

    def evaluation_backbone(self) -> nn.Module:
        """The EMA backbone when ``evaluate_with_ema`` (what ``embed`` and ``load_backbone`` use)."""
        return self.ema_model.backbone if self.hparams.evaluate_with_ema else self.backbone

    def evaluation_classifier(self) -> nn.Module:
        return self.ema_model.classifier if self.hparams.evaluate_with_ema else self.classifier


def build_augmentation(kind: str, image_size: int, channels: int, horizontal_flip: bool) -> nn.Module:
    """``"weak"`` (flip + shift), ``"strong"`` (+ RandAugment + Cutout) or ``"none"``."""
    if kind == "weak":
        return weak_augmentation(image_size, horizontal_flip)
    if kind == "strong":
        return strong_augmentation(image_size, channels, horizontal_flip)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"augmentation must be one of {AUGMENTATIONS}; got {kind!r}")


def load_classifier_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The evaluation classifier of a checkpoint of any ``ClassifierModule`` of the library.

    Returns ``(state, hyper_parameters)`` with ``state`` keyed ``backbone.*`` and ``classifier.*``.
    The weights taken are those the source module evaluates with: the EMA teacher of a Mean
    Teacher (``teacher.*``), the EMA model of FixMatch (``ema_model.*``), else the live network.
    Loaded with ``weights_only=True``: a checkpoint cannot run code on load.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"teacher checkpoint {str(path)!r} does not exist; pass the path of a .ckpt file."
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    from ssl_modules.export import evaluation_prefix  # the one rule for "what the module evaluates with"

    prefix = evaluation_prefix(state, hparams)
    selected = {
        key[len(prefix) :]: value
        for key, value in state.items()
        if key.startswith(prefix + "backbone.") or key.startswith(prefix + "classifier.")
    }
    if "classifier.weight" not in selected or not any(key.startswith("backbone.") for key in selected):
        raise ValueError(
            f"{str(path)!r} has no 'backbone.*' and 'classifier.*' weights; pass a checkpoint of a classifier "
            "module of this library (SupervisedModule, SelfTrainingModule, StudentTeacherModule, FixMatchModule)."
        )
    hparams.setdefault("num_classes", int(selected["classifier.weight"].shape[0]))
    return selected, hparams


def num_unlabeled_images(module: L.LightningModule) -> int | None:
    """Images in the unlabeled set the trainer's datamodule serves (the range of the unlabeled
    batches' ``index``), or None without such a datamodule."""
    trainer = module._trainer
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    unlabeled = getattr(datamodule, "_unlabeled_dataset", None)
    if unlabeled is None:
        return None
    datamodule.setup("fit")
    return len(unlabeled())


def log_pseudo_label_stats(
    module: L.LightningModule,
    pseudo_labels: torch.Tensor,
    weights: torch.Tensor,
    hidden_labels: torch.Tensor,
    prefix: str = "train",
) -> None:
    """Mask rate and pseudo-label accuracy against ``y_hidden`` (only where ``y_hidden >= 0``).

    Diagnostics only: nothing computed here reaches a loss. No host synchronisation: the
    accuracy is a masked mean computed on the device, NaN (undefined, a gap in the charts) at a
    step where no kept pseudo-label has a known hidden label.

    Args:
        pseudo_labels: Shape: (batch_size,).
        weights: Shape: (batch_size,); > 0 where the pseudo-label is kept.
        hidden_labels: Shape: (batch_size,); -1 where unknown.
    """
    with torch.no_grad():
        kept = weights > 0
        batch = len(pseudo_labels)
        module.log(f"{prefix}/mask_rate", kept.float().mean(), batch_size=batch)
        known = (kept & (hidden_labels >= 0)).float()
        correct = ((pseudo_labels == hidden_labels).float() * known).sum()
        module.log(f"{prefix}/pseudo_label_acc", correct / known.sum(), batch_size=batch)
