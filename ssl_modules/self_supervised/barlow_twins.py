"""Barlow Twins: make the cross-correlation of two views' embeddings the identity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from ssl_modules.augment.views import make_views, simclr_views
from ssl_modules.base import split_batch
from ssl_modules.callbacks.embeddings import log_alignment_uniformity, log_views
from ssl_modules.evaluation.self_supervised import SelfSupervisedModule
from ssl_modules.heads import MLPHead
from ssl_modules.losses.contrastive import BarlowTwinsLoss
from ssl_modules.optim import joint_embedding_optimizer


class BarlowTwinsModule(SelfSupervisedModule):
    """Barlow Twins: backbone -> projector; loss on the cross-correlation matrix of the two
    views' batch-standardised embeddings: invariance (diagonal to 1) + ``redundancy_weight``
    x redundancy reduction (off-diagonal to 0).

    Under DDP the embeddings of all ranks are gathered with gradients, so the standardisation
    and the correlation use the global batch, and the gradient equals the one-process one.

    - [0] Barlow Twins, Zbontar et al., 2021, https://arxiv.org/abs/2103.03230

    Args:
        backbone: backbone name (``ssl_modules.backbones``).
        projection_hidden_dim: width of the two hidden layers of the projector (paper: 8192).
        projection_dim: output width (paper: 8192).
        redundancy_weight: lambda (paper: 0.0051).
        crop_min_scale: smallest crop area fraction of the views (paper: BYOL's, 0.08).
        jitter_strength: colour-jitter strength s of the views (paper: BYOL's).
        lars: LARS (paper) instead of SGD; biases and norms excluded from weight decay and LARS.
        lr: paper: 0.2 (weights) with LARS at batch 2048.
        weight_decay: paper: 1.5e-6.
        data facts, optimizer, scheduler: as in ``SSLModuleBase``.
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
        projection_hidden_dim: int = 8192,
        projection_dim: int = 8192,
        redundancy_weight: float = 0.0051,
        crop_min_scale: float = 0.08,
        jitter_strength: float = 0.5,
        lars: bool = True,
        lr: float = 0.2,
        weight_decay: float = 1.5e-6,
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
            optimizer=optimizer,
            scheduler=scheduler,
        )
        self.projector = MLPHead(
            self.backbone.num_features,
            [projection_hidden_dim, projection_hidden_dim],
            projection_dim,
            norm_layer=nn.BatchNorm1d,
        )
        self.criterion = BarlowTwinsLoss(redundancy_weight)
        self.augment = simclr_views(
            channels,
            image_size,
            horizontal_flip,
            crop_scale=(crop_min_scale, 1.0),
            jitter_strength=jitter_strength,
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        labeled, unlabeled = split_batch(batch)
        images = (unlabeled or labeled)[0]  # y_hidden is never read
        self.check_images(images)
        view_a, view_b = make_views(images, self.augment)  # independent parameters per image and view
        z = self.projector(self.backbone(self.normalize(torch.cat([view_a, view_b]))))  # (2n, projection_dim)
        z_a, z_b = z.chunk(2)
        loss = self.criterion(z_a, z_b)  # cross-correlation over the global batch

        probe_loss = self.online_probe_loss(labeled)  # detached features: no gradient into the backbone
        self.log("train/loss", loss, prog_bar=True)
        log_alignment_uniformity(self, z_a.detach(), z_b.detach())
        if self.global_step == 0 and batch_idx == 0:
            log_views(self, [view_a, view_b])
        return loss + probe_loss

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        return joint_embedding_optimizer(self, self.hparams.lr, self.hparams.weight_decay, self.hparams.lars)
