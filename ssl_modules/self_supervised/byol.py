"""BYOL: predict the momentum target's projection of the other view."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssl_modules.augment.views import byol_views, make_asymmetric_views, simclr_views
from ssl_modules.ema import copy_frozen
from ssl_modules.heads import prediction_head, projection_head
from ssl_modules.losses.contrastive import BYOLLoss
from ssl_modules.self_supervised.joint_embedding import JointEmbeddingLoss, JointEmbeddingModule


class BYOLModule(JointEmbeddingModule):
    """BYOL: online network (backbone, projector, predictor) regresses the target network's
    projection of the other view; symmetric negative-cosine loss; no negatives.

    The target (``target_backbone`` + ``target_projector``) is a frozen copy updated after
    each optimizer step with momentum ``tau = 1 - (1 - base_momentum)(cos(pi k / K) + 1) / 2``
    of the global step k out of K.

    Views: the paper's two distributions (``byol_views``, ``asymmetric_views=True``): view 1
    always blurred, never solarized; view 2 blurred with p=0.1, solarized with p=0.2 (blur only
    on images of 64 px and more, as in ``simclr_views``); ``asymmetric_views=False``: two draws
    of one distribution (``simclr_views``). The loss is symmetrised either way.

    - [0] BYOL, Grill et al., 2020, https://arxiv.org/abs/2006.07733

    Args:
        backbone: backbone name (``ssl_modules.backbones``).
        projection_hidden_dim: hidden width of projector and predictor (paper: 4096).
        projection_dim: output width of projector and predictor (paper: 256).
        base_momentum: tau at step 0 (paper: 0.996).
        crop_min_scale: smallest crop area fraction of the views (paper: 0.08).
        jitter_strength: colour-jitter strength s of the views (paper: jitter 0.4/0.4/0.2/0.1,
            i.e. close to s=0.5).
        asymmetric_views: the paper's asymmetric blur/solarization per view (``byol_views``;
            paper, and chosen on validation: ``configs/byol.yaml``) instead of two draws of one
            augmentation (False: the behaviour before this option existed, so a checkpoint saved
            without it resumes with the paper's views unless given ``asymmetric_views=False``).
        lars: LARS (paper) instead of SGD; biases and norms excluded from weight decay and LARS.
        lr: paper: 0.2 x batch_size / 256 with LARS.
        weight_decay: paper: 1.5e-6.
        data facts, optimizer, scheduler: as in ``SSLModuleBase``.
    """

    def __init__(
        self,
        *,
        projection_hidden_dim: int = 4096,
        projection_dim: int = 256,
        base_momentum: float = 0.996,
        crop_min_scale: float = 0.08,
        jitter_strength: float = 0.5,
        asymmetric_views: bool = True,
        lars: bool = True,
        lr: float = 0.2,
        weight_decay: float = 1.5e-6,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, **kwargs)
        if not 0 <= base_momentum <= 1:
            raise ValueError(f"base_momentum must be in [0, 1]; got {base_momentum}")
        features = self.backbone.num_features
        self.projector = projection_head(features, projection_hidden_dim, projection_dim)
        self.predictor = prediction_head(projection_dim, projection_hidden_dim, projection_dim)
        self.target_backbone = copy_frozen(self.backbone)
        self.target_projector = copy_frozen(self.projector)
        self.criterion = BYOLLoss()
        self.augment = simclr_views(
            self.channels,
            self.image_size,
            self.horizontal_flip,
            crop_scale=(crop_min_scale, 1.0),
            jitter_strength=jitter_strength,
        )
        self.view_augments: nn.ModuleList | None = None
        if asymmetric_views:
            self.view_augments = nn.ModuleList(
                byol_views(
                    self.channels,
                    self.image_size,
                    self.horizontal_flip,
                    crop_scale=(crop_min_scale, 1.0),
                    jitter_strength=jitter_strength,
                )
            )

    def make_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Two draws of ``self.augment``, or with ``asymmetric_views`` view 1 and view 2 from the
        paper's two augmentations. Shape: (batch_size, C, H, W) -> 2 x (batch_size, C, H, W)."""
        if self.view_augments is None:
            return super().make_views(images)
        return make_asymmetric_views(images, self.view_augments)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    def joint_embedding_loss(
        self, views: list[torch.Tensor], features: list[torch.Tensor | None]
    ) -> JointEmbeddingLoss:
        online = self.predictor(self.projector(torch.cat(features)))  # (2n, projection_dim)
        with torch.no_grad():  # stop-gradient: the target only provides regression targets
            target_features = self.encode(views, self.target_backbone)  # 2 x (n, num_features)
            target = self.target_projector(torch.cat(target_features))  # (2n, projection_dim)
        online_a, online_b = online.chunk(2)
        target_a, target_b = target.chunk(2)
        loss = self.criterion(online_a, target_b) + self.criterion(online_b, target_a)
        return JointEmbeddingLoss(loss, online_a, target_b)
