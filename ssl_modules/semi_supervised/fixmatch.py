"""FixMatch: pseudo-labels from a weak view, kept where confident, taught on a strong view."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ssl_modules.augment import weak_augmentation
from ssl_modules.augment.strong import strong_augmentation
from ssl_modules.base import ClassifierModule, FixMatchCosine, split_batch
from ssl_modules.callbacks import log_image_grid
from ssl_modules.ema import warn_if_ema_outlasts_run
from ssl_modules.losses.semi_supervised import (
    check_confidence_threshold,
    entropy_loss,
    weighted_pseudo_label_loss,
)
from ssl_modules.semi_supervised._common import (
    EvaluatesWithEMA,
    FrozenClassifier,
    log_pseudo_label_stats,
    num_unlabeled_images,
)
from ssl_modules.semi_supervised.rules import FixedThreshold, PseudoLabelRule, build_rule, rule_record
from ssl_modules.semi_supervised.rules.uda import annealed_cross_entropy, check_tsa_schedule, tsa_threshold


class FixMatchModule(EvaluatesWithEMA, ClassifierModule):
    """FixMatch with an EMA of the weights for evaluation, and a pluggable pseudo-label rule.

    For every unlabeled image, a weak view (flip + shift) gives the class probabilities ``q``;
    the ``rule`` turns them into targets and per-image weights, taught on a strong view
    (RandAugment + Cutout) of the same image:
    ``L_u = 1/(mu B) sum_b w_b H(target_b, p(strong_b))`` (+ the rule's own ``extra_loss``), and
    the loss is ``CE(labeled) + unlabeled_loss_weight * L_u``. FixMatch's rule (the default,
    ``rules.FixedThreshold(confidence_threshold)``) keeps the hard ``argmax q`` where
    ``max q >= confidence_threshold``. FlexMatch, FreeMatch, SoftMatch and UDA are this module
    with their rule (``ssl_modules.semi_supervised.rules``; ``configs/flexmatch.yaml`` ...); UDA
    adds training-signal annealing of the labeled loss (``tsa``).
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
    - [3] UDA (training signal annealing), Xie et al., 2020, https://arxiv.org/abs/1904.12848

    Args:
        backbone: backbone name (``ssl_modules.backbones``).
        confidence_threshold: ``tau`` in [0, 1] (0.95) of the default rule (unused with ``rule``).
        rule: the pseudo-label rule (``rules.PseudoLabelRule``; default ``FixedThreshold``); in a
            checkpoint it is recorded as ``{"class_path", "init_args"}`` and rebuilt on load (so
            that dict is accepted here too).
        tsa: UDA's training-signal annealing of the labeled loss, ``"linear"``, ``"log"`` or
            ``"exp"`` (None: off, FixMatch). At progress ``t = step / total steps`` a labeled image
            whose probability of its class exceeds ``eta_t = alpha_t (1 - 1/K) + 1/K`` is dropped
            from the labeled loss, averaged over the kept ones (``rules.uda.tsa_threshold``).
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

    part_arguments = ("rule",)

    def __init__(
        self,
        *,
        confidence_threshold: float = 0.95,
        rule: PseudoLabelRule | None = None,
        tsa: str | None = None,
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
        **kwargs: Any,
    ) -> None:
        super().__init__(
            lr=lr, weight_decay=weight_decay, drop_rate=drop_rate, pretrained=pretrained, **kwargs
        )
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1]; got {ema_decay}")
        if unlabeled_loss_weight < 0 or entropy_weight < 0:
            raise ValueError("unlabeled_loss_weight and entropy_weight must be >= 0")
        check_confidence_threshold(confidence_threshold)
        check_tsa_schedule(tsa)
        self.rule = build_rule(rule) if rule is not None else FixedThreshold(confidence_threshold)
        # the hyper-parameters hold the rule as plain values (a checkpoint loads with weights_only)
        if "rule" not in self._forgotten_arguments:  # (a subclass that fixes the rule sets it again)
            self.hparams["rule"] = self._hparams_initial["rule"] = rule_record(self.rule)
        self.weak = weak_augmentation(self.image_size, self.horizontal_flip)
        self.strong = strong_augmentation(
            self.image_size, self.channels, self.horizontal_flip, randaugment_num_ops, cutout
        )
        self.ema_model = FrozenClassifier(self.backbone, self.classifier)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        labeled, unlabeled = split_batch(batch)
        images, labels = labeled.images, labeled.labels
        unlabeled_images, hidden_labels = (
            unlabeled.images,
            unlabeled.hidden_labels,
        )  # hidden: diagnostics only
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
        supervised_loss = self.labeled_loss(labeled_logits, labels)
        pseudo = self.rule(weak_probs, unlabeled.index)  # targets and weights, no gradient
        unlabeled_loss = weighted_pseudo_label_loss(strong_logits, pseudo.targets, pseudo.weights)
        extra = self.rule.extra_loss(strong_logits, pseudo)
        if extra is not None:
            self.log("train/rule_loss", extra)
            unlabeled_loss = unlabeled_loss + extra
        loss = supervised_loss + self.hparams.unlabeled_loss_weight * unlabeled_loss
        if self.hparams.entropy_weight > 0:
            loss = loss + self.hparams.entropy_weight * entropy_loss(strong_logits)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/sup_loss", supervised_loss)
        self.log("train/unsup_loss", unlabeled_loss)
        log_pseudo_label_stats(self, weak_probs.argmax(dim=1), pseudo.weights, hidden_labels)
        for name, value in self.rule.log_values().items():
            self.log(f"train/rule/{name}", value)
        if self.global_step == 0 and batch_idx == 0:
            log_image_grid(
                self, "train/strong_views", strong_unlabeled, caption="strong views (RandAugment + Cutout)"
            )
        return loss

    def labeled_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the labeled batch; with ``tsa``, annealed (UDA): the images already
        predicted above ``eta_t`` are dropped. Shape: logits (B, num_classes), labels (B,)."""
        if self.hparams.tsa is None:
            return F.cross_entropy(logits, labels)
        total_steps = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        threshold = tsa_threshold(self.hparams.tsa, self.global_step / total_steps, self.num_classes)
        loss, kept = annealed_cross_entropy(logits, labels, threshold)
        self.log("train/tsa_threshold", threshold)
        self.log("train/tsa_kept_rate", kept.mean())
        return loss

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":  # size the rule's per-class / per-image state from the data
            self.rule.allocate(self.num_classes, num_unlabeled_images(self))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams.tsa is not None and not math.isfinite(self.trainer.estimated_stepping_batches):
            raise ValueError(
                "tsa anneals over the run's length, which is unknown (max_steps=-1 and max_epochs=-1); "
                "set trainer.max_steps or trainer.max_epochs, or tsa: null."
            )
        if self.hparams.evaluate_with_ema:
            warn_if_ema_outlasts_run(
                self.hparams.ema_decay, self.trainer.estimated_stepping_batches, "FixMatch's evaluation EMA"
            )

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            params, lr=self.hparams.lr, momentum=0.9, nesterov=True, weight_decay=self.hparams.weight_decay
        )

    def default_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        return torch.optim.lr_scheduler.LambdaLR(optimizer, FixMatchCosine(total))
