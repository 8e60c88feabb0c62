"""BYOL: predict the momentum target's projection of the other view."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from ssl_modules.augment.views import make_views, simclr_views
from ssl_modules.base import split_batch
from ssl_modules.callbacks.embeddings import log_alignment_uniformity, log_views
from ssl_modules.ema import copy_frozen, cosine_momentum, ema_update
from ssl_modules.evaluation.self_supervised import SelfSupervisedModule
from ssl_modules.heads import MLPHead
from ssl_modules.losses.contrastive import BYOLLoss
from ssl_modules.optim import joint_embedding_optimizer


class BYOLModule(SelfSupervisedModule):
    """BYOL: online network (backbone, projector, predictor) regresses the target network's
    projection of the other view; symmetric negative-cosine loss; no negatives.

    The target (``target_backbone`` + ``target_projector``) is a frozen copy updated after
    each optimizer step with momentum ``tau = 1 - (1 - base_momentum)(cos(pi k / K) + 1) / 2``
    of the global step k out of K.

    - [0] BYOL, Grill et al., 2020, https://arxiv.org/abs/2006.07733

    Args:
        backbone: backbone name (``ssl_modules.backbones``).
        projection_hidden_dim: hidden width of projector and predictor (paper: 4096).
        projection_dim: output width of projector and predictor (paper: 256).
        base_momentum: tau at step 0 (paper: 0.996).
        crop_min_scale: smallest crop area fraction of the views (paper: 0.08).
        jitter_strength: colour-jitter strength s of the views (paper: jitter 0.4/0.4/0.2/0.1,
            i.e. close to s=0.5).
        lars: LARS (paper) instead of SGD; biases and norms excluded from weight decay and LARS.
        lr: paper: 0.2 x batch_size / 256 with LARS.
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
        projection_hidden_dim: int = 4096,
        projection_dim: int = 256,
        base_momentum: float = 0.996,
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
        if not 0 <= base_momentum <= 1:
            raise ValueError(f"base_momentum must be in [0, 1]; got {base_momentum}")
        features = self.backbone.num_features
        self.projector = MLPHead(features, [projection_hidden_dim], projection_dim, norm_layer=nn.BatchNorm1d)
        self.predictor = MLPHead(
            projection_dim, [projection_hidden_dim], projection_dim, norm_layer=nn.BatchNorm1d
        )
        self.target_backbone = copy_frozen(self.backbone)
        self.target_projector = copy_frozen(self.projector)
        self.criterion = BYOLLoss()
        self.augment = simclr_views(
            channels,
            image_size,
            horizontal_flip,
            crop_scale=(crop_min_scale, 1.0),
            jitter_strength=jitter_strength,
        )

    def momentum(self) -> float:
        """Target momentum tau: a pure function of ``global_step``."""
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        return cosine_momentum(self.global_step, int(total), self.hparams.base_momentum)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        labeled, unlabeled = split_batch(batch)
        images = (unlabeled or labeled)[0]  # y_hidden is never read
        self.check_images(images)
        view_a, view_b = make_views(images, self.augment)  # independent parameters per image and view
        both = self.normalize(torch.cat([view_a, view_b]))  # (2n, C, H, W)
        online = self.predictor(self.projector(self.backbone(both)))  # (2n, projection_dim)
        with torch.no_grad():  # stop-gradient: the target only provides regression targets
            target = self.target_projector(self.target_backbone(both))  # (2n, projection_dim)
        online_a, online_b = online.chunk(2)
        target_a, target_b = target.chunk(2)
        loss = self.criterion(online_a, target_b) + self.criterion(online_b, target_a)

        probe_loss = self.online_probe_loss(labeled)  # detached features: no gradient into the backbone
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/momentum", self.momentum())
        log_alignment_uniformity(self, online_a.detach(), target_b)
        if self.global_step == 0 and batch_idx == 0:
            log_views(self, [view_a, view_b])
        return loss + probe_loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        momentum = self.momentum()
        ema_update(self.target_backbone, self.backbone, momentum)
        ema_update(self.target_projector, self.projector, momentum)

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        return joint_embedding_optimizer(self, self.hparams.lr, self.hparams.weight_decay, self.hparams.lars)
