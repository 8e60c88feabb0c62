"""Barlow Twins: make the cross-correlation of two views' embeddings the identity."""

from __future__ import annotations

from typing import Any

import torch

from ssl_modules.augment.views import simclr_views
from ssl_modules.heads import projection_head
from ssl_modules.losses.contrastive import BarlowTwinsLoss
from ssl_modules.self_supervised.joint_embedding import JointEmbeddingLoss, JointEmbeddingModule


class BarlowTwinsModule(JointEmbeddingModule):
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
        lr: the learning rate of the weights (paper: 0.2 x batch_size / 256 with LARS).
        bias_lr_ratio: the learning rate of the biases and BatchNorm parameters of backbone and
            projector as a fraction of ``lr`` (paper: 0.0048 / 0.2 = 0.024). LARS leaves them
            out of its trust ratio, so they step by the raw gradient of a loss that sums over
            ``projection_dim`` terms; at the weights' lr their norms grow ~25x in 150 steps
            (digits, projector 1024). Default: the paper's 0.024 (also chosen on validation,
            ``configs/barlow_twins.yaml``); 1.0 (the weights' lr) reproduces results made before
            this argument existed. Applies to the default optimizer; the online probe keeps ``lr``.
        weight_decay: paper: 1.5e-6.
        data facts, optimizer, scheduler: as in ``SSLModuleBase``.
    """

    def __init__(
        self,
        *,
        projection_hidden_dim: int = 8192,
        projection_dim: int = 8192,
        redundancy_weight: float = 0.0051,
        crop_min_scale: float = 0.08,
        jitter_strength: float = 0.5,
        lars: bool = True,
        lr: float = 0.2,
        bias_lr_ratio: float = 0.024,
        weight_decay: float = 1.5e-6,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, **kwargs)
        if not bias_lr_ratio > 0:
            raise ValueError(
                f"bias_lr_ratio must be > 0 (the paper's is 0.0048 / 0.2 = 0.024); got {bias_lr_ratio}"
            )
        self.projector = projection_head(
            self.backbone.num_features, projection_hidden_dim, projection_dim, num_hidden_layers=2
        )
        self.criterion = BarlowTwinsLoss(redundancy_weight)
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
        loss = self.criterion(z_a, z_b)  # cross-correlation over the global batch
        return JointEmbeddingLoss(loss, z_a, z_b)

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The template's optimizer (LARS with biases/norms excluded), with the biases and
        BatchNorm parameters of backbone and projector at ``lr x bias_lr_ratio``."""
        optimizer = super().default_optimizer(params)
        probe = {id(parameter) for parameter in self.online_probe.parameters()}
        for group in optimizer.param_groups:
            # the biases and BatchNorm parameters of backbone and projector: no LARS, their own lr
            if group["lars_exclude"] and not any(id(parameter) in probe for parameter in group["params"]):
                group["lr"] = self.hparams.lr * self.hparams.bias_lr_ratio
        return optimizer
