"""RotNet: predict which of four rotations was applied to an image."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ssl_modules.augment import weak_augmentation
from ssl_modules.augment.pretext import rotation_batch
from ssl_modules.base import split_batch
from ssl_modules.callbacks import log_image_grid
from ssl_modules.evaluation import SelfSupervisedModule
from ssl_modules.heads import MLPHead


class RotationPretext(SelfSupervisedModule):
    """Every image (labeled and unlabeled, labels unused) is rotated by 0/90/180/270 degrees
    inside the batch; backbone + head classify the rotation (4-way cross-entropy).

    - [0] RotNet, Gidaris et al., 2018, https://arxiv.org/abs/1803.07728

    The head is an MLP (one hidden layer) so that the backbone's last layer, which the probe
    reads, is not the rotation-specific classifier itself (Gidaris et al. find later layers
    specialise to the pretext).

    Args:
        backbone: backbone name (``ssl_modules.backbones``).
        head_hidden: hidden width of the rotation head (0: a linear head).
        lr: SGD learning rate (the paper: 0.1, momentum 0.9, Nesterov), cosine-decayed per step.
        weight_decay: SGD weight decay (the paper: 5e-4).
        knn_k, probe_weight_decay: evaluation (``SelfSupervisedModule``).
        data facts and optimizer/scheduler: as in ``SSLModuleBase``.

    Batch: ``{"labeled": LabeledBatch, "unlabeled": UnlabeledBatch}`` (``ssl_modules.batch``); images
    float in [0, 1], shape (batch_size, channels, image_size, image_size). Logs ``train/pretext_acc``.
    """

    def __init__(
        self,
        *,
        head_hidden: int = 256,
        lr: float = 0.1,
        weight_decay: float = 5e-4,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, **kwargs)
        self.augment = weak_augmentation(self.image_size, self.horizontal_flip)
        hidden = [head_hidden] if head_hidden > 0 else []
        self.rotation_head = MLPHead(self.backbone.num_features, hidden, 4)

    def rotation_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Shape: (batch_size, C, H, H) in [0, 1] -> (batch_size, 4)."""
        return self.rotation_head(self.backbone(self.backbone_input(images)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        labeled, unlabeled = split_batch(batch)
        # images alone: labels are never read by the pretext loss
        images = labeled.images if unlabeled is None else torch.cat([labeled.images, unlabeled.images])
        views = self.augment(images)  # flip/shift, batched on the device
        rotated, rotation = rotation_batch(views)  # (4B, C, H, H), (4B,)
        logits = self.rotation_logits(rotated)  # (4B, 4)
        pretext_loss = F.cross_entropy(logits, rotation)
        probe_loss = self.online_probe_loss(labeled)  # detached features, labeled split only
        self.log("train/pretext_loss", pretext_loss, prog_bar=True)
        self.log("train/pretext_acc", (logits.argmax(1) == rotation).float().mean(), prog_bar=True)
        return pretext_loss + probe_loss

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            params, lr=self.hparams.lr, momentum=0.9, nesterov=True, weight_decay=self.hparams.weight_decay
        )

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        images = batch[0]
        rotated, rotation = rotation_batch(images)
        predicted = self.rotation_logits(rotated).argmax(1)
        self.log(
            "val/pretext_acc", (predicted == rotation).float().mean(), batch_size=len(rotated), sync_dist=True
        )
        if batch_idx == 0:
            shown = min(8, len(images))
            index = torch.cat([torch.arange(shown) + k * len(images) for k in range(4)]).to(images.device)
            degrees = " ".join(str(90 * int(p)) for p in predicted[index])
            log_image_grid(
                self,
                "val/rotations",
                rotated[index],
                caption=f"rows: 0/90/180/270 deg; predicted (row-major): {degrees}",
                nrow=shown,
            )
