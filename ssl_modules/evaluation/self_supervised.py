"""The shared evaluation of self-supervised methods: online probe, kNN monitor, ``test/acc``.

- ``val/acc``: an online linear probe on *detached* backbone features, trained on
  ``batch["labeled"]`` only, alongside the pretext/contrastive loss (it never sends gradient
  into the backbone).
- ``val/knn_acc``: weighted kNN (k=20) of validation features against the labeled split.
- ``test/acc`` (contract): a linear probe fitted offline on frozen features of the labeled
  split (BatchNorm in eval mode), applied to the test split. ``test/online_acc`` and
  ``test/knn_acc`` are logged beside it.

- [0] Linear evaluation protocol, Kolesnikov et al., 2019, https://arxiv.org/abs/1901.09005
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ssl_modules.augment import to_float_images
from ssl_modules.backbones import build_backbone
from ssl_modules.base import SSLModuleBase
from ssl_modules.batch import LabeledBatch, images_and_labels
from ssl_modules.evaluation.knn import knn_predict
from ssl_modules.evaluation.probe import LinearProbe, extract_features, fit_linear_probe


def labeled_split_features(
    module: SSLModuleBase, embed: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``embed`` features (eval mode) and labels of every labeled image of the trainer's
    datamodule, or None when there is no datamodule with ``labeled_dataloader()``."""
    trainer = module._trainer
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is None or not hasattr(datamodule, "labeled_dataloader"):
        return None
    was_training = module.training
    module.eval()
    try:
        return extract_features(embed, datamodule.labeled_dataloader(), module.device, to_float_images)
    finally:
        module.train(was_training)


class SelfSupervisedModule(SSLModuleBase):
    """Base of self-supervised methods: ``self.backbone`` is what is kept afterwards.

    Subclasses write ``training_step`` and add ``self.online_probe_loss(batch["labeled"])``
    to their loss. Override ``backbone_input`` when the backbone sees something other than
    the normalised image (colorization feeds the L channel).

    Args:
        backbone: backbone name (``ssl_modules.backbones``).
        backbone_channels: input channels of the backbone (default: the data's).
        knn_k: neighbours of the kNN monitor.
        probe_weight_decay: L2 penalty of the offline linear probe behind ``test/acc``.
        data facts, lr, weight_decay, optimizer, scheduler (keywords): as in ``SSLModuleBase``.
    """

    def __init__(
        self,
        *,
        backbone: str = "small_cnn",
        backbone_channels: int | None = None,
        knn_k: int = 20,
        probe_weight_decay: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.backbone = build_backbone(
            backbone, backbone_channels or self.channels, image_size=self.image_size
        )
        self.online_probe = nn.Linear(self.backbone.num_features, self.num_classes)
        self.knn_k = knn_k
        self.probe_weight_decay = probe_weight_decay
        self._knn_bank: tuple[torch.Tensor, torch.Tensor] | None = None
        self._offline_probe: LinearProbe | None = None

    # -- features ---------------------------------------------------------------------
    def backbone_input(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] -> what the backbone takes (default: normalised images)."""
        return self.normalize(images)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The representation used downstream: ``self.backbone`` (the online network, the one
        ``test/acc`` probes) on ``backbone_input``.

        Takes images as the datamodules yield them: uint8 in [0, 255] or float in [0, 1];
        anything else is refused (``as_unit_float``). Call ``model.eval()`` first for inference.
        Shape: (batch_size, C, H, W) -> (batch_size, num_features).
        """
        images = self.as_unit_float(images)
        return self.backbone(self.backbone_input(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(images)

    # -- online probe -----------------------------------------------------------------
    def online_probe_loss(self, labeled: LabeledBatch, features: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of the online probe on the labeled batch; the backbone gets no gradient.

        Args:
            labeled: the batch's ``LabeledBatch``, images float in [0, 1].
            features: the labeled images' backbone features if the step already computed them.
        """
        images, labels = labeled.images, labeled.labels
        if features is None:
            with torch.no_grad():
                features = self.embed(images)
        logits = self.online_probe(features.detach())  # (batch_size, num_classes)
        loss = F.cross_entropy(logits, labels)
        self.log("train/probe_loss", loss)
        self.log("train/probe_acc", (logits.argmax(1) == labels).float().mean())
        return loss

    # -- labeled-split features ---------------------------------------------------------
    def _labeled_features(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return labeled_split_features(self, self.embed)

    def on_validation_epoch_start(self) -> None:
        self._knn_bank = self._labeled_features()

    def on_test_epoch_start(self) -> None:
        self._knn_bank = self._labeled_features()
        if self._knn_bank is None:
            rank_zero_warn(
                "test/acc falls back to the online probe: the trainer has no datamodule with a "
                "labeled_dataloader() to fit the offline linear probe on."
            )
            self._offline_probe = None
        else:
            probe = fit_linear_probe(
                *self._knn_bank, num_classes=self.num_classes, weight_decay=self.probe_weight_decay
            )
            # a plain attribute, not a submodule: refitted at every test, it must not enter the
            # state_dict (a checkpoint saved after testing would not load into a fresh module)
            object.__setattr__(self, "_offline_probe", probe)

    def _evaluate(self, batch: Any, stage: str) -> None:
        images, labels = images_and_labels(batch)
        features = self.embed(images)  # (batch_size, num_features)
        size = len(labels)
        online = self.online_probe(features).argmax(1)
        online_acc = (online == labels).float().mean()
        if self._knn_bank is not None:
            votes = knn_predict(features, *self._knn_bank, num_classes=self.num_classes, k=self.knn_k)
            self.log(
                f"{stage}/knn_acc",
                (votes.argmax(1) == labels).float().mean(),
                sync_dist=True,
                batch_size=size,
            )
        if stage == "test":
            self.log("test/online_acc", online_acc, sync_dist=True, batch_size=size)
            probe = self._offline_probe
            accuracy = (
                (probe(features).argmax(1) == labels).float().mean() if probe is not None else online_acc
            )
            self.log("test/acc", accuracy, sync_dist=True, batch_size=size)
        else:
            self.log("val/acc", online_acc, prog_bar=True, sync_dist=True, batch_size=size)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.embed(images)
