"""The supervised baseline, and linear probe / fine-tune of a pretrained backbone."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ssl_modules.augment import weak_augmentation
from ssl_modules.base import ClassifierModule, split_batch
from ssl_modules.batch import images_and_labels
from ssl_modules.callbacks import log_image_grid
from ssl_modules.evaluation.probe import fit_linear_probe
from ssl_modules.evaluation.self_supervised import labeled_split_features


class SupervisedModule(ClassifierModule):
    """Cross-entropy on the labeled batch only: the baseline every other method must beat.

    Also the downstream stage of self-supervised learning: with ``pretrained`` it starts from
    the backbone of any checkpoint in this library, and with ``freeze_backbone`` it is a
    linear probe (the backbone stays in eval mode, BatchNorm statistics frozen) whose
    ``test/acc`` is the same offline logistic regression on the labeled split that scores the
    self-supervised methods (the trained classifier is reported as ``test/online_acc``). With
    ``freeze_backbone`` and no checkpoint it is the random-init reference probe.

    Default recipe: SGD with Nesterov momentum 0.9 at lr 0.1, weight decay 5e-4, per-step
    cosine decay to 0, flip (where the data allows it) and shift by up to 12.5 % of the side:
    the standard small-image recipe (He et al., 2016, https://arxiv.org/abs/1512.03385, sec. 4.2;
    Zagoruyko & Komodakis, 2016, https://arxiv.org/abs/1605.07146). A semi-supervised gain
    counts only against a baseline tuned as well as the method (Oliver et al., 2018,
    https://arxiv.org/abs/1804.09170), so the recipe was chosen on the validation split only,
    side by side with a plain PyTorch loop (AdamW 1e-3, random shifts) on the same backbone and
    labeled images (``benchmarks/plain_loop.py``; numbers in ``configs/supervised.yaml``): lr 0.1
    was best or tied best among SGD 0.03/0.1 and AdamW 1e-3/3e-3 (with zero-padded shifts,
    warm-up or label smoothing). SGD also keeps ``lr`` meaningful for ``configs/linear_probe.yaml``
    and ``configs/fine_tune.yaml``, which set their own SGD rates. Pass ``optimizer`` /
    ``scheduler`` (or override ``default_optimizer``) for another recipe.

    Args:
        backbone: backbone name (``ssl_modules.backbones``).
        lr: SGD learning rate (momentum 0.9, Nesterov), cosine-decayed per step (default 0.1).
        weight_decay: SGD weight decay.
        pretrained: path of a checkpoint whose ``backbone.*`` weights initialise the backbone.
        freeze_backbone: train only the classifier (linear probe).
        allow_class_mismatch: accept a checkpoint trained for another number of classes
            (only its backbone is used); without it such a checkpoint is refused.
        augment: flip/shift the labeled images (off for a probe on fixed features).
        data facts and optimizer/scheduler: as in ``SSLModuleBase``.

    Batch: ``{"labeled": LabeledBatch}`` (``ssl_modules.batch``; it reads no unlabeled batch,
    ``uses_unlabeled = False``); images float in [0, 1], shape (batch_size, channels,
    image_size, image_size).
    """

    uses_unlabeled = False  # the datamodule then builds no unlabeled loader: no unlabeled images read

    def __init__(
        self,
        *,
        lr: float = 0.1,
        weight_decay: float = 5e-4,
        pretrained: str | None = None,
        freeze_backbone: bool = False,
        allow_class_mismatch: bool = False,
        augment: bool = True,
        drop_rate: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            lr=lr,
            weight_decay=weight_decay,
            drop_rate=drop_rate,
            pretrained=pretrained,
            allow_class_mismatch=allow_class_mismatch,
            **kwargs,
        )
        self.augment = (
            weak_augmentation(self.image_size, self.horizontal_flip) if augment else torch.nn.Identity()
        )
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self.freeze_backbone:  # Lightning restores per-module modes around validation
            self.backbone.eval()

    def train(self, mode: bool = True) -> SupervisedModule:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # a probe measures fixed features: BatchNorm statistics stay put
        return self

    def on_test_epoch_start(self) -> None:
        # A frozen backbone is probed exactly as the self-supervised methods are probed (the
        # offline L-BFGS logistic regression on the labeled split), so the random-init row of a
        # comparison is the same measurement, not a weaker SGD probe.
        self._offline_probe = None
        if self.freeze_backbone:
            labeled = labeled_split_features(self, self.embed)
            if labeled is not None:
                self._offline_probe = fit_linear_probe(*labeled, num_classes=self.num_classes)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        probe = getattr(self, "_offline_probe", None)
        if probe is None:
            return super().test_step(batch, batch_idx)
        images, labels = images_and_labels(batch)
        features = self.embed(images)
        size = len(labels)
        online = (self.classifier(features).argmax(1) == labels).float().mean()
        self.log("test/online_acc", online, sync_dist=True, batch_size=size)
        accuracy = (probe(features).argmax(1) == labels).float().mean()
        self.log("test/acc", accuracy, sync_dist=True, batch_size=size)
        return None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        labeled, _ = split_batch(batch)
        images, labels = labeled.images, labeled.labels
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
