"""SimCLR: contrast two augmented views of each image against the other views of the batch."""

from __future__ import annotations

import itertools
from typing import Any

import torch

from ssl_modules.augment.views import simclr_views
from ssl_modules.heads import projection_head
from ssl_modules.losses.contrastive import NTXentLoss
from ssl_modules.self_supervised.joint_embedding import JointEmbeddingLoss, JointEmbeddingModule


class SimCLRModule(JointEmbeddingModule):
    """SimCLR: backbone f -> projection head g (MLP) -> NT-Xent over the views of the batch.

    The representation kept is h = f(x) (``self.backbone``), before the head. Under DDP the
    loss uses the views of every rank as negatives (gathered with gradients).

    - [0] SimCLR, Chen et al., 2020, https://arxiv.org/abs/2002.05709

    Args:
        backbone: backbone name (``ssl_modules.backbones``).
        projection_hidden_dim: hidden width of g (paper: 2048, the ResNet-50 feature width).
        projection_dim: output width of g (paper: 128).
        temperature: NT-Xent temperature (paper: 0.5 for CIFAR-10, appendix B.9; 0.1 for ImageNet).
        num_views: views per image (2 in the paper); with more, the loss averages NT-Xent over all view pairs.
        crop_min_scale: smallest crop area fraction (paper: 0.08).
        jitter_strength: colour-jitter strength s (paper: 0.5 for CIFAR-10, 1.0 for ImageNet).
        lars: LARS (paper) instead of SGD with momentum; biases and norms are excluded from
            weight decay and from the trust ratio either way.
        lr: learning rate (paper: 0.3 x batch_size / 256 with LARS).
        weight_decay: paper: 1e-6.
        data facts, optimizer, scheduler: as in ``SSLModuleBase``.
    """

    def __init__(
        self,
        *,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        temperature: float = 0.5,
        num_views: int = 2,
        crop_min_scale: float = 0.08,
        jitter_strength: float = 0.5,
        lars: bool = True,
        lr: float = 0.3,
        weight_decay: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, **kwargs)
        if num_views < 2:
            raise ValueError(f"num_views must be >= 2; got {num_views}")
        self.num_views = num_views
        self.projector = projection_head(self.backbone.num_features, projection_hidden_dim, projection_dim)
        self.criterion = NTXentLoss(temperature)
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
        z = self.projector(torch.cat(features)).chunk(len(views))  # num_views x (n, projection_dim)
        pairs = list(itertools.combinations(range(len(views)), 2))
        loss = sum(self.criterion(z[i], z[j]) for i, j in pairs) / len(pairs)
        return JointEmbeddingLoss(loss, z[0], z[1])
