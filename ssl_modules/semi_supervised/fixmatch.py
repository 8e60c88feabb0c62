"""FixMatch: pseudo-labels from a weak view, kept where confident, taught on a strong view."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from ssl_modules.augment import weak_augmentation
from ssl_modules.augment.strong import strong_augmentation
from ssl_modules.base import ClassifierModule, FixMatchCosine, split_batch
from ssl_modules.callbacks import log_image_grid
from ssl_modules.ema import warmup_ema_decay, warn_if_ema_outlasts_run
from ssl_modules.losses.semi_supervised import FixMatchLoss, entropy_loss
from ssl_modules.semi_supervised._common import FrozenClassifier, log_pseudo_label_stats


class FixMatchModule(ClassifierModule):
    """FixMatch with an EMA of the weights for evaluation.

    For every unlabeled image, a weak view (flip + shift) gives the class probabilities ``q``;
    where ``max q >= confidence_threshold`` its argmax is the hard pseudo-label of a strong view
    (RandAugment + Cutout) of the same image. Loss ``CE(labeled) + unlabeled_loss_weight * L_u``.
    The unlabeled batch is ``mu`` times the labeled one through the datamodule's
    ``unlabeled_batch_ratio`` (7 in the paper); this module uses whatever size arrives.

    The EMA copy (``ema_model``) uses Mean Teacher's warm-up ``min(1 - 1/(step + 1), ema_decay)``:
    without it, a 0.999 average of a short run is still mostly the random initialisation. Even
    with it, an EMA whose horizon ``1 / (1 - ema_decay)`` is longer than the run averages in the
    early iterates (digits, 500 steps, median val/acc over 3 seeds: EMA 0.999 0.917, EMA 0.99
    0.966, live 0.959); fitting warns when the horizon exceeds half the run, and
    ``configs/fixmatch.yaml`` uses 0.99 for short runs (chosen on validation).

    - [0] FixMatch, Sohn et al., 2020, https://arxiv.org/abs/2001.07685
    - [1] Mean Teacher (EMA warm-up), Tarvainen & Valpola, 2017, https://arxiv.org/abs/1703.01780
    - [2] Entropy minimization, Grandvalet & Bengio, 2005, https://papers.nips.cc/paper/2740-semi-supervised-learning-by-entropy-minimization

    Args:
        backbone: backbone name (``ssl_modules.backbones``).
        confidence_threshold: ``tau`` in [0, 1] (0.95).
        unlabeled_loss_weight: ``lambda_u`` (1).
        ema_decay: decay of the evaluation EMA (0.999).
        evaluate_with_ema: report ``val/acc``/``test/acc`` with the EMA weights.
        randaugment_num_ops: RandAugment operations per strong view (2).
        cutout: largest Cutout side as a fraction of the image side (0.5).
        entropy_weight: weight of entropy minimisation on the strong views' predictions (0: off).
        drop_rate: dropout before the classifier.
        lr: SGD learning rate (0.03; Nesterov momentum 0.9), decayed as ``cos(7 pi k / 16 K)``.
        weight_decay: SGD weight decay (5e-4).
        pretrained: checkpoint whose backbone initialises this one (e.g. SimCLR pretraining,
            ``configs/recipes/simclr_fixmatch.yaml``); the EMA copy follows it from the first step.
        data facts and optimizer/scheduler: as in ``SSLModuleBase``.
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
        confidence_threshold: float = 0.95,
        unlabeled_loss_weight: float = 1.0,
        ema_decay: float = 0.999,
        evaluate_with_ema: bool = True,
        randaugment_num_ops: int = 2,
        cutout: float = 0.5,
        entropy_weight: float = 0.0,
        drop_rate: float = 0.0,
        lr: float = 0.03,
        weight_decay: float = 5e-4,
        pretrained: str | None = None,
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
            pretrained=pretrained,
        )
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1]; got {ema_decay}")
        if unlabeled_loss_weight < 0 or entropy_weight < 0:
            raise ValueError("unlabeled_loss_weight and entropy_weight must be >= 0")
        self.unlabeled_loss = FixMatchLoss(confidence_threshold)  # checks the threshold
        self.weak = weak_augmentation(image_size, horizontal_flip)
        self.strong = strong_augmentation(image_size, channels, horizontal_flip, randaugment_num_ops, cutout)
        self.ema_model = FrozenClassifier(self.backbone, self.classifier)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (images, labels), unlabeled = split_batch(batch)
        unlabeled_images, hidden_labels = unlabeled  # hidden_labels: diagnostics only
        num_labeled, num_unlabeled = len(images), len(unlabeled_images)
        weak_labeled = self.weak(images)
        weak_unlabeled = self.weak(unlabeled_images)
        strong_unlabeled = self.strong(unlabeled_images)
        # one forward over all views, so BatchNorm sees labeled and unlabeled together (as in the paper)
        logits = self(torch.cat([weak_labeled, weak_unlabeled, strong_unlabeled]))  # (B + 2 mu B, classes)
        labeled_logits = logits[:num_labeled]
        weak_logits, strong_logits = logits[num_labeled:].split(num_unlabeled)
        with torch.no_grad():  # the pseudo-label is a target: no gradient through the weak view
            weak_probs = weak_logits.float().softmax(dim=1)
        supervised_loss = F.cross_entropy(labeled_logits, labels)
        unlabeled_loss, mask = self.unlabeled_loss(strong_logits, weak_probs)
        loss = supervised_loss + self.hparams.unlabeled_loss_weight * unlabeled_loss
        if self.hparams.entropy_weight > 0:
            loss = loss + self.hparams.entropy_weight * entropy_loss(strong_logits)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/sup_loss", supervised_loss)
        self.log("train/unsup_loss", unlabeled_loss)
        log_pseudo_label_stats(self, weak_probs.argmax(dim=1), mask, hidden_labels)
        if self.global_step == 0 and batch_idx == 0:
            log_image_grid(
                self, "train/strong_views", strong_unlabeled, caption="strong views (RandAugment + Cutout)"
            )
        return loss

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams.evaluate_with_ema:
            warn_if_ema_outlasts_run(
                self.hparams.ema_decay, self.trainer.estimated_stepping_batches, "FixMatch's evaluation EMA"
            )

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.ema_model.ema_from(
            self.backbone, self.classifier, warmup_ema_decay(self.global_step, self.hparams.ema_decay)
        )

    def train(self, mode: bool = True) -> FixMatchModule:
        super().train(mode)
        self.ema_model.eval()
        return self

    def evaluation_logits(self, images: torch.Tensor) -> torch.Tensor:
        if not self.hparams.evaluate_with_ema:
            return self(images)
        self.check_images(images)
        return self.ema_model(self.normalize(images))

    def evaluation_backbone(self) -> torch.nn.Module:
        """The EMA backbone when ``evaluate_with_ema`` (what ``embed`` and ``load_backbone`` use)."""
        return self.ema_model.backbone if self.hparams.evaluate_with_ema else self.backbone

    def evaluation_classifier(self) -> torch.nn.Module:
        return self.ema_model.classifier if self.hparams.evaluate_with_ema else self.classifier

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            params, lr=self.hparams.lr, momentum=0.9, nesterov=True, weight_decay=self.hparams.weight_decay
        )

    def default_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        return torch.optim.lr_scheduler.LambdaLR(optimizer, FixMatchCosine(total))
