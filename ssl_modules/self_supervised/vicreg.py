"""VICReg: invariance, variance and covariance regularisation of two views' embeddings."""

from __future__ import annotations

from typing import Any

import torch

from ssl_modules.augment.views import simclr_views
from ssl_modules.heads import projection_head
from ssl_modules.losses.joint_embedding import VICRegLoss
from ssl_modules.self_supervised.joint_embedding import JointEmbeddingLoss, JointEmbeddingModule


class VICRegModule(JointEmbeddingModule):
    """VICReg: backbone -> expander (``projector``); the two views' embeddings are pulled together
    (invariance), each dimension's standard deviation over the batch is held above 1
    (variance), and the dimensions are decorrelated (covariance). No negatives, no target
    network, no stop-gradient.

    Under DDP the variance and covariance terms use the global batch (``VICRegLoss``).

    - [0] VICReg, Bardes et al., 2022, https://arxiv.org/abs/2105.04906

    Args:
        backbone: backbone name (``ssl_modules.backbones``).
        projection_hidden_dim: width of the expander's two hidden layers (paper: 8192).
        projection_dim: the embedding width (paper: 8192).
        invariance_weight: lambda (paper: 25).
        variance_weight: mu (paper: 25).
        covariance_weight: nu (paper: 1).
        crop_min_scale: smallest crop area fraction of the views (paper: BYOL's views, 0.08).
        jitter_strength: colour-jitter strength s of the views (BYOL's jitter is close to s=0.5).
        lars: LARS (paper) instead of SGD; biases and norms excluded from weight decay and LARS.
        lr: paper: 0.2 x batch_size / 256 with LARS (base lr 0.2).
        weight_decay: paper: 1e-6.
        data facts, optimizer, scheduler: as in ``SSLModuleBase``.
    """

    def __init__(
        self,
        *,
        projection_hidden_dim: int = 8192,
        projection_dim: int = 8192,
        invariance_weight: float = 25.0,
        variance_weight: float = 25.0,
        covariance_weight: float = 1.0,
        crop_min_scale: float = 0.08,
        jitter_strength: float = 0.5,
        lars: bool = True,
        lr: float = 0.2,
        weight_decay: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, **kwargs)
        self.projector = projection_head(
            self.backbone.num_features, projection_hidden_dim, projection_dim, num_hidden_layers=2
        )
        self.criterion = VICRegLoss(invariance_weight, variance_weight, covariance_weight)
        self.augment = simclr_views(
            self.channels,
            self.image_size,
            self.horizontal_flip,
            crop_scale=(crop_min_scale, 1.0),
            jitter_strength=jitter_strength,
        )

    def joint_embedding_loss(
        self, views: list[torch.Tensor], features: list[torch.Tensor | None]
    ) -> JointEmbeddingLoss:
        z_a, z_b = self.projector(torch.cat(features)).chunk(2)  # (n, projection_dim) each
        terms = self.criterion.terms(z_a, z_b)  # variance and covariance over the global batch
        self.log_dict({f"train/{name}": value.detach() for name, value in terms._asdict().items()})
        return JointEmbeddingLoss(self.criterion.combine(terms), z_a, z_b)
