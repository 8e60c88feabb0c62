"""Self-training with pseudo-labels: in rounds (the classic loop) or online (per batch)."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from ssl_modules.augment import to_float_images
from ssl_modules.base import ClassifierModule, split_batch
from ssl_modules.losses.semi_supervised import (
    check_confidence_threshold,
    entropy_loss,
    sigmoid_rampup,
    weighted_pseudo_label_loss,
)
from ssl_modules.semi_supervised._common import FrozenClassifier, build_augmentation, log_pseudo_label_stats

SCHEDULES = ("rounds", "online")
SELECTIONS = ("top_k", "all", "weighted")
_NOTHING = 2.0  # a confidence threshold no softmax reaches


class SelfTrainingModule(ClassifierModule):
    """Train on the labels, label the unlabeled images with the model, train on those too, repeat.

    Loss: ``CE(labeled) + w(step) * 1/U sum_u weight_u CE(student(view_u), pseudo_label_u)`` (plus
    ``entropy_weight`` times the unlabeled prediction entropy).

    **Selection** of pseudo-labels (``selection``), then ``confidence_threshold`` on top:

    - ``"top_k"``: per predicted class, only the ``k`` most confident predictions are kept, the
      same ``k`` for every class so classes stay balanced. In rounds ``k`` grows each round:
      round r keeps ``k = ceil(min(1, r * top_k_fraction) * U / num_classes)`` of the ``U``
      unlabeled images per class (fewer where a class has fewer predictions); online it is
      the most confident ``top_k_fraction`` of each predicted class within the batch.
    - ``"all"``: every prediction, weight 1.
    - ``"weighted"``: every prediction, weighted by its confidence.

    **Schedules** (``schedule``):

    - ``"rounds"``: round ``r`` covers epochs ``[r * epochs_per_round, (r + 1) * epochs_per_round)``.
      Round 0 is supervised. At the start of each later round the current model is frozen
      into the submodule ``labeler`` (optionally re-initialising the student), the labeler
      predicts the whole unlabeled set once (on the clean images) and the per-class
      confidence thresholds that implement the selection are stored in the buffer
      ``class_thresholds``. During the round, the labeler's prediction on each unlabeled image
      is its pseudo-label, kept where its confidence passes its class threshold: deterministic
      per image, so the round's pseudo-label set is exactly the pair (``labeler``,
      ``class_thresholds``), both in the checkpoint (as are ``round`` and
      ``round_class_counts``). A run resumed mid-round continues on the same set.
    - ``"online"``: the pseudo-label of each unlabeled view is the student's own prediction on
      it in the same forward pass (a target, without gradient; Lee's Pseudo-Label), with the
      unlabeled weight ramped up over ``unlabeled_warmup_steps`` (sigmoid ramp-up).

    At each round start it logs ``round/kept``, ``round/pseudo_label_acc`` (against ``hidden_labels``
    where known: a diagnostic, never a loss input) and ``round/count_class_<c>``; every step
    logs ``train/mask_rate`` and ``train/pseudo_label_acc``.

    - [0] Pseudo-Label, Lee, 2013, https://www.kaggle.com/blobs/download/forum-message-attachment-files/746/pseudo_label_final.pdf
    - [1] Self-training with Noisy Student (rounds, balanced selection), Xie et al., 2020, https://arxiv.org/abs/1911.04252
    - [2] Curriculum Labeling (growing per-round fraction, re-initialisation), Cascante-Bonilla et al., 2021, https://arxiv.org/abs/2001.06001
    - [3] Entropy minimization, Grandvalet & Bengio, 2005, https://papers.nips.cc/paper/2740-semi-supervised-learning-by-entropy-minimization

    Args:
        backbone: backbone name (``ssl_modules.backbones``).
        schedule: ``"rounds"`` or ``"online"``.
        selection: ``"top_k"``, ``"all"`` or ``"weighted"``.
        confidence_threshold: predictions below this confidence are discarded (0: keep all), in [0, 1].
        top_k_fraction: the per-class fraction of ``"top_k"`` (per round in rounds mode).
        epochs_per_round: epochs of one round (``"rounds"``).
        reinitialize_student: re-initialise the student at each round start (``"rounds"``); the
            learning-rate schedule is not restarted.
        unlabeled_loss_weight: weight of the pseudo-label loss (``w`` after the warm-up).
        unlabeled_warmup_steps: sigmoid ramp-up of the unlabeled weight (``"online"``).
        student_augmentation: view the student learns from: ``"weak"``, ``"strong"`` or ``"none"``.
        entropy_weight: weight of entropy minimisation on the unlabeled predictions.
        drop_rate: dropout before the classifier.
        lr: SGD learning rate (Nesterov momentum 0.9), cosine-decayed per step.
        weight_decay: SGD weight decay.
        data facts and optimizer/scheduler: as in ``SSLModuleBase``.
    """

    def __init__(
        self,
        *,
        schedule: str = "rounds",
        selection: str = "top_k",
        confidence_threshold: float = 0.0,
        top_k_fraction: float = 0.2,
        epochs_per_round: int = 5,
        reinitialize_student: bool = False,
        unlabeled_loss_weight: float = 1.0,
        unlabeled_warmup_steps: int = 0,
        student_augmentation: str = "weak",
        entropy_weight: float = 0.0,
        drop_rate: float = 0.0,
        lr: float = 0.03,
        weight_decay: float = 5e-4,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, drop_rate=drop_rate, **kwargs)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}; got {selection!r}")
        check_confidence_threshold(confidence_threshold)
        if not 0.0 < top_k_fraction <= 1.0:
            raise ValueError(f"top_k_fraction must be in (0, 1]; got {top_k_fraction}")
        if epochs_per_round < 1:
            raise ValueError(f"epochs_per_round must be >= 1; got {epochs_per_round}")
        if unlabeled_loss_weight < 0 or entropy_weight < 0 or unlabeled_warmup_steps < 0:
            raise ValueError("unlabeled_loss_weight, entropy_weight and unlabeled_warmup_steps must be >= 0")
        self.student_augment = build_augmentation(
            student_augmentation, self.image_size, self.channels, self.horizontal_flip
        )
        if schedule == "rounds":
            self.labeler = FrozenClassifier(self.backbone, self.classifier)
        self.register_buffer("round", torch.zeros((), dtype=torch.long))
        self.register_buffer("class_thresholds", torch.full((self.num_classes,), _NOTHING))
        self.register_buffer("round_class_counts", torch.zeros(self.num_classes, dtype=torch.long))

    # -- rounds -----------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.hparams.schedule != "rounds":
            return
        target_round = self.current_epoch // self.hparams.epochs_per_round
        if target_round > int(self.round):
            self.start_round(target_round)

    def kept_fraction(self, round_index: int) -> float:
        """The per-class fraction ``"top_k"`` keeps in round ``round_index`` (rounds schedule)."""
        return min(1.0, round_index * self.hparams.top_k_fraction)

    @torch.no_grad()
    def start_round(self, round_index: int) -> None:
        """Freeze the current model as the labeler and fix this round's selection thresholds."""
        self.labeler.copy_from(self.backbone, self.classifier)
        if self.hparams.reinitialize_student:
            self._reinitialize_student(round_index)
        confidence, predicted, hidden = self._label_unlabeled_set()
        thresholds = torch.zeros(self.num_classes, device=self.device)
        if self.hparams.selection == "top_k":
            # the same number per class (the fraction of a balanced share of the unlabeled set)
            per_class = math.ceil(self.kept_fraction(round_index) * len(confidence) / self.num_classes)
            for cls in range(self.num_classes):
                members = confidence[predicted == cls].sort(descending=True).values
                keep = min(per_class, len(members))
                thresholds[cls] = members[keep - 1] if keep > 0 else _NOTHING
        self.class_thresholds.copy_(thresholds)
        self.round.fill_(round_index)
        kept = self._select(confidence, predicted) > 0
        self.round_class_counts.copy_(torch.bincount(predicted[kept], minlength=self.num_classes))
        self.log("round/index", float(round_index), on_step=False, on_epoch=True)
        self.log("round/kept", kept.float().sum(), on_step=False, on_epoch=True)
        known = kept & (hidden >= 0)
        if known.any():
            accuracy = (predicted[known] == hidden[known]).float().mean()
            self.log("round/pseudo_label_acc", accuracy, on_step=False, on_epoch=True)
        for cls in range(self.num_classes):
            self.log(
                f"round/count_class_{cls}", self.round_class_counts[cls].float(), on_step=False, on_epoch=True
            )

    def _reinitialize_student(self, round_index: int) -> None:
        # seeded by (run seed, round): a resumed run re-initialises identically
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) * 1_000_003 + round_index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for layer in [*self.backbone.modules(), self.classifier]:
                if hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()

    def _label_unlabeled_set(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The labeler's (confidence, class, hidden label) on every unlabeled image, from all ranks."""
        loaders = self.trainer.train_dataloader if self._trainer is not None else None
        if not isinstance(loaders, dict) or "unlabeled" not in loaders:
            empty = torch.zeros(0, device=self.device)
            return empty, empty.long(), empty.long()
        source = loaders["unlabeled"]
        size, world, rank = len(source.dataset), self.trainer.world_size, self.global_rank
        # every rank labels an equal share (padded by wrapping around), then all ranks gather
        per_rank = math.ceil(size / world)
        indices = [(rank + world * i) % size for i in range(per_rank)]
        loader = DataLoader(Subset(source.dataset, indices), batch_size=256, collate_fn=source.collate_fn)
        was_training = self.labeler.training
        self.labeler.eval()
        outputs = []
        for images, hidden, _ in loader:
            images = to_float_images(images.to(self.device))
            probs = self.labeler(self.normalize(images)).float().softmax(dim=1)  # (n, classes)
            confidence, predicted = probs.max(dim=1)
            outputs.append(
                torch.stack([confidence, predicted.float(), hidden.to(self.device).float()], dim=1)
            )
        self.labeler.train(was_training)
        result = torch.cat(outputs)  # (per_rank, 3)
        if world > 1:  # (the at most world - 1 wrapped-around duplicates do not matter for thresholds)
            result = self.all_gather(result).reshape(-1, 3)
        return result[:, 0], result[:, 1].long(), result[:, 2].long()

    def _select(self, confidence: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        """Per-image weights of the pseudo-labels: 0 where discarded. Shape: (n,)."""
        keep = confidence >= self.hparams.confidence_threshold
        if self.hparams.schedule == "rounds" or self.hparams.selection == "top_k":
            keep = keep & (confidence >= self.class_thresholds[predicted])
        weights = keep.float()
        return weights * confidence if self.hparams.selection == "weighted" else weights

    @torch.no_grad()
    def _batch_thresholds(self, confidence: torch.Tensor, predicted: torch.Tensor) -> None:
        """Online ``"top_k"``: this batch's per-class thresholds (top ``top_k_fraction`` of each class)."""
        for cls in range(self.num_classes):
            members = confidence[predicted == cls].sort(descending=True).values
            keep = math.ceil(self.hparams.top_k_fraction * len(members))
            self.class_thresholds[cls] = members[keep - 1] if keep > 0 else _NOTHING

    # -- training ---------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        labeled, unlabeled = split_batch(batch)
        images, labels = labeled.images, labeled.labels
        unlabeled_images, hidden_labels = (
            unlabeled.images,
            unlabeled.hidden_labels,
        )  # hidden: diagnostics only
        num_labeled = len(images)
        views = self.student_augment(torch.cat([images, unlabeled_images]))
        logits = self(views)  # (B + U, classes)
        unlabeled_logits = logits[num_labeled:]
        with torch.no_grad():  # pseudo-labels are targets
            if self.hparams.schedule == "rounds":  # the frozen labeler on the clean image
                probs = self.labeler(self.normalize(unlabeled_images)).float().softmax(dim=1)
                weight = self.hparams.unlabeled_loss_weight
            else:  # the student's own prediction on the same view
                probs = unlabeled_logits.float().softmax(dim=1)
                weight = self.hparams.unlabeled_loss_weight * sigmoid_rampup(
                    self.global_step, self.hparams.unlabeled_warmup_steps
                )
            confidence, pseudo_labels = probs.max(dim=1)  # (U,)
            if self.hparams.schedule == "online" and self.hparams.selection == "top_k":
                self._batch_thresholds(confidence, pseudo_labels)
            weights = self._select(confidence, pseudo_labels)  # (U,)
        supervised_loss = F.cross_entropy(logits[:num_labeled], labels)
        pseudo_label_loss = weighted_pseudo_label_loss(unlabeled_logits, pseudo_labels, weights)
        loss = supervised_loss + weight * pseudo_label_loss
        if self.hparams.entropy_weight > 0:
            loss = loss + self.hparams.entropy_weight * entropy_loss(unlabeled_logits)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/sup_loss", supervised_loss)
        self.log("train/unsup_loss", pseudo_label_loss)
        self.log("train/unlabeled_weight", weight)
        log_pseudo_label_stats(self, pseudo_labels, weights, hidden_labels)
        return loss

    def train(self, mode: bool = True) -> SelfTrainingModule:
        super().train(mode)
        if self.hparams.schedule == "rounds":
            self.labeler.eval()  # a frozen labeler: running BatchNorm statistics, no dropout
        return self

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            params, lr=self.hparams.lr, momentum=0.9, nesterov=True, weight_decay=self.hparams.weight_decay
        )
