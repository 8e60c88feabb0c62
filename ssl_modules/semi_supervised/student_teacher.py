"""Student-teacher learning: knowledge distillation, Mean Teacher and Noisy Student in one module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ssl_modules.augment import weak_augmentation
from ssl_modules.backbones import build_backbone, first_conv_in_channels
from ssl_modules.base import ClassifierModule, split_batch
from ssl_modules.callbacks import log_image_grid
from ssl_modules.ema import warmup_ema_decay, warn_if_ema_outlasts_run
from ssl_modules.losses.semi_supervised import ConsistencyLoss, entropy_loss, sigmoid_rampup
from ssl_modules.semi_supervised._common import (
    FrozenClassifier,
    build_augmentation,
    load_classifier_checkpoint,
    log_pseudo_label_stats,
)

TEACHERS = ("ema", "fixed")
TEACHER_INPUTS = ("weak", "same", "clean")


class StudentTeacherModule(ClassifierModule):
    """A student trained on labels and on a teacher's predictions.

    Loss on a batch of ``B`` labeled and ``U`` unlabeled images::

        alpha * CE(student(labeled), y) + (1 - alpha) * w(step) * D(teacher || student)

    ``D`` is ``"kl"``, ``T^2 KL(softmax(teacher/T) || softmax(student/T))`` (Hinton's distillation
    loss), or ``"mse"``, Mean Teacher's softmax-MSE; it runs on labeled and unlabeled images
    (``consistency_on_labeled``) or on unlabeled images only. ``w(step)`` is
    ``consistency_weight`` times Mean Teacher's sigmoid ramp-up over ``rampup_steps``. The
    teacher's prediction is a target, computed under ``torch.no_grad()``; the student's carries
    the gradient and comes from the student's own forward on the student's own view.

    Three methods, by arguments (see ``configs/``):

    - **distillation** (``teacher="fixed"``, ``consistency="kl"``, ``teacher_input="same"``): the teacher
      is loaded from ``teacher_checkpoint``, a checkpoint of any classifier module of this library
      (``SupervisedModule``, or any of these modules: the weights it evaluates with are taken). Its
      backbone is read from the checkpoint and may differ from the student's; a different
      ``num_classes`` is an error. The weights are loaded in ``setup("fit")`` (once: a saved flag
      prevents reloading) and saved in this module's checkpoints as ``teacher.*``, so
      ``load_from_checkpoint`` works without the teacher file.
    - **Mean Teacher** (``teacher="ema"``): the teacher is an EMA of the student, decay
      ``min(1 - 1/(step + 1), ema_decay)``, updated after every optimizer step; it sees its own
      weak view (``teacher_input="weak"``); ``val/acc``/``test/acc`` use the teacher's weights.
    - **Noisy Student** (``teacher="fixed"``, ``teacher_input="clean"``, ``student_augmentation="strong"``,
      ``drop_rate > 0``): the un-noised teacher labels clean images; the student is noised with
      RandAugment, dropout and, for backbones built with it (torchvision EfficientNet/ConvNeXt
      already carry stochastic depth), stochastic depth. Use a student backbone equal to or larger
      than the teacher's. Iterate by passing each student's checkpoint as the next
      ``teacher_checkpoint`` (see ``configs/noisy_student.yaml``).

    - [0] Knowledge distillation, Hinton et al., 2015, https://arxiv.org/abs/1503.02531
    - [1] Mean Teacher, Tarvainen & Valpola, 2017, https://arxiv.org/abs/1703.01780
    - [2] Noisy Student, Xie et al., 2020, https://arxiv.org/abs/1911.04252
    - [3] Entropy minimization, Grandvalet & Bengio, 2005, https://papers.nips.cc/paper/2740-semi-supervised-learning-by-entropy-minimization

    Args:
        backbone: the student's backbone name.
        teacher: ``"ema"`` (Mean Teacher) or ``"fixed"`` (loaded from ``teacher_checkpoint``).
        teacher_checkpoint: path of the fixed teacher's checkpoint.
        teacher_backbone: the fixed teacher's backbone; ``None`` reads it from the checkpoint
            (the value read is stored in the hyperparameters, so a reload needs no file).
        alpha: weight of the hard-label cross-entropy; ``1 - alpha`` weighs the teacher term.
        temperature: softmax temperature ``T > 0`` of the ``"kl"`` term.
        consistency: ``"kl"`` (distillation) or ``"mse"`` (Mean Teacher's softmax-MSE, T = 1).
        consistency_weight: multiplies the teacher term (Mean Teacher's ``w_max``).
        rampup_steps: steps of the sigmoid ramp-up of the teacher term (0: none).
        consistency_on_labeled: the teacher term also covers the labeled images.
        ema_decay: EMA decay of the ``"ema"`` teacher.
        teacher_input: what the teacher sees: ``"weak"`` (its own flip + shift view),
            ``"same"`` (the student's view), ``"clean"`` (the un-augmented image).
        student_augmentation: ``"weak"`` (flip + shift), ``"strong"`` (+ RandAugment + Cutout) or ``"none"``.
        entropy_weight: weight of entropy minimisation on the student's unlabeled predictions.
        drop_rate: dropout before the student's classifier (Noisy Student: 0.5).
        lr: SGD learning rate (Nesterov momentum 0.9), cosine-decayed per step.
        weight_decay: SGD weight decay.
        data facts and optimizer/scheduler: as in ``SSLModuleBase``.
    """

    def __init__(
        self,
        *,
        teacher: str = "ema",
        teacher_checkpoint: str | None = None,
        teacher_backbone: str | None = None,
        alpha: float = 0.5,
        temperature: float = 4.0,
        consistency: str = "mse",
        consistency_weight: float = 1.0,
        rampup_steps: int = 0,
        consistency_on_labeled: bool = True,
        ema_decay: float = 0.999,
        teacher_input: str = "weak",
        student_augmentation: str = "weak",
        entropy_weight: float = 0.0,
        drop_rate: float = 0.0,
        lr: float = 0.03,
        weight_decay: float = 5e-4,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, drop_rate=drop_rate, **kwargs)
        if teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}; got {teacher!r}")
        if teacher_input not in TEACHER_INPUTS:
            raise ValueError(f"teacher_input must be one of {TEACHER_INPUTS}; got {teacher_input!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1]; got {ema_decay}")
        if consistency_weight < 0 or entropy_weight < 0 or rampup_steps < 0:
            raise ValueError("consistency_weight, entropy_weight and rampup_steps must be >= 0")
        self.consistency_loss = ConsistencyLoss(consistency, temperature)  # checks kind and temperature
        self.student_augment = build_augmentation(
            student_augmentation, self.image_size, self.channels, self.horizontal_flip
        )
        self.teacher_augment = weak_augmentation(self.image_size, self.horizontal_flip)
        if teacher == "ema":
            self.teacher = FrozenClassifier(self.backbone, self.classifier)
        else:
            if not teacher_checkpoint:
                raise ValueError(
                    "teacher='fixed' needs teacher_checkpoint: the path of a checkpoint of a classifier module "
                    "(e.g. one trained with configs/supervised.yaml); set model.teacher_checkpoint=PATH."
                )
            if teacher_backbone is None:
                _, teacher_hparams = load_classifier_checkpoint(teacher_checkpoint)
                self._check_teacher_hparams(teacher_hparams, teacher_checkpoint)
                teacher_backbone = str(teacher_hparams.get("backbone", self.hparams.backbone))
                self.hparams["teacher_backbone"] = teacher_backbone  # saved: a reload reads no file
            teacher_network = build_backbone(teacher_backbone, self.channels, image_size=self.image_size)
            self.teacher = FrozenClassifier(
                teacher_network, torch.nn.Linear(teacher_network.num_features, self.num_classes)
            )
        # 1 once the fixed teacher's weights are in; saved, so they are never loaded twice
        self.register_buffer("teacher_loaded", torch.tensor(int(teacher == "ema"), dtype=torch.uint8))

    def _check_teacher_hparams(self, hparams: dict[str, Any], path: str | Path) -> None:
        classes = int(hparams["num_classes"])
        if classes != self.num_classes:
            raise ValueError(
                f"teacher checkpoint {str(path)!r} was trained for {classes} classes but the data has "
                f"{self.num_classes}; distil from a teacher trained on the same label set."
            )
        channels = hparams.get("channels", self.channels)
        if channels != self.channels:
            raise ValueError(
                f"teacher checkpoint {str(path)!r} expects {channels}-channel images but the data has "
                f"{self.channels}; use a teacher trained on this data."
            )

    def setup(self, stage: str) -> None:
        if stage == "fit" and not bool(self.teacher_loaded):
            self.load_teacher(self.hparams.teacher_checkpoint)

    def load_teacher(self, path: str | Path) -> None:
        """Load the fixed teacher's weights from ``path`` after checking they fit the data."""
        state, hparams = load_classifier_checkpoint(path)
        self._check_teacher_hparams(hparams, path)
        if hparams.get("backbone", self.hparams.teacher_backbone) != self.hparams.teacher_backbone:
            raise ValueError(
                f"teacher checkpoint {str(path)!r} has backbone {hparams.get('backbone')!r} but "
                f"teacher_backbone is {self.hparams.teacher_backbone!r}; leave teacher_backbone unset to read it."
            )
        if first_conv_in_channels(self.teacher.backbone) != self.channels:
            raise ValueError(f"the teacher's first convolution does not take {self.channels} channel(s)")
        self.teacher.load_state_dict(state)
        self.teacher_loaded.fill_(1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        labeled, unlabeled = split_batch(batch)
        images, labels = labeled.images, labeled.labels
        unlabeled_images, hidden_labels = (
            unlabeled.images,
            unlabeled.hidden_labels,
        )  # hidden: diagnostics only
        num_labeled = len(images)
        all_images = torch.cat([images, unlabeled_images])  # (B + U, C, H, W)
        student_views = self.student_augment(all_images)  # noised student input
        student_logits = self(student_views)  # (B + U, classes), carries the gradient
        with torch.no_grad():  # the teacher's prediction is a target
            teacher_views = {
                "weak": lambda: self.teacher_augment(all_images),
                "same": lambda: student_views,
                "clean": lambda: all_images,
            }[self.hparams.teacher_input]()
            teacher_logits = self.teacher(self.normalize(teacher_views))  # (B + U, classes)
        supervised_loss = F.cross_entropy(student_logits[:num_labeled], labels)
        first = 0 if self.hparams.consistency_on_labeled else num_labeled
        consistency = self.consistency_loss(student_logits[first:], teacher_logits[first:])
        weight = self.hparams.consistency_weight * sigmoid_rampup(self.global_step, self.hparams.rampup_steps)
        alpha = self.hparams.alpha
        loss = alpha * supervised_loss + (1 - alpha) * weight * consistency
        if self.hparams.entropy_weight > 0:
            loss = loss + self.hparams.entropy_weight * entropy_loss(student_logits[num_labeled:])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/sup_loss", supervised_loss)
        self.log("train/unsup_loss", consistency)
        self.log("train/consistency_weight", weight)
        student_labels = student_logits[num_labeled:].argmax(dim=1)
        teacher_labels = teacher_logits[num_labeled:].argmax(dim=1)
        self.log("train/teacher_student_agreement", (student_labels == teacher_labels).float().mean())
        log_pseudo_label_stats(self, teacher_labels, torch.ones_like(teacher_labels), hidden_labels)
        if self.global_step == 0 and batch_idx == 0:
            log_image_grid(self, "train/student_views", student_views, caption="student views")
        return loss

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams.teacher == "ema":
            warn_if_ema_outlasts_run(
                self.hparams.ema_decay, self.trainer.estimated_stepping_batches, "Mean Teacher's EMA teacher"
            )

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.hparams.teacher == "ema":
            decay = warmup_ema_decay(self.global_step, self.hparams.ema_decay)
            self.teacher.ema_from(self.backbone, self.classifier, decay)

    def train(self, mode: bool = True) -> StudentTeacherModule:
        super().train(mode)
        self.teacher.eval()  # a target: no dropout, BatchNorm with running statistics
        return self

    def evaluation_logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.teacher != "ema":
            return self(images)
        self.check_images(images)
        return self.teacher(self.normalize(images))

    def evaluation_backbone(self) -> torch.nn.Module:
        """Mean Teacher's EMA teacher backbone, else the student's (what ``embed`` and
        ``load_backbone`` use)."""
        return self.teacher.backbone if self.hparams.teacher == "ema" else self.backbone

    def evaluation_classifier(self) -> torch.nn.Module:
        return self.teacher.classifier if self.hparams.teacher == "ema" else self.classifier

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            params, lr=self.hparams.lr, momentum=0.9, nesterov=True, weight_decay=self.hparams.weight_decay
        )
