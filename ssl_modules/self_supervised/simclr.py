"""SimCLR: contrast two augmented views of each image against the other views of the batch."""

from __future__ import annotations

import itertools
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
from ssl_modules.losses.contrastive import NTXentLoss
from ssl_modules.optim import joint_embedding_optimizer


class SimCLRModule(SelfSupervisedModule):
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
        num_classes: int = 10,
        channels: int = 3,
        image_size: int = 32,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        horizontal_flip: bool = True,
        backbone: str = "small_cnn",
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        temperature: float = 0.5,
        num_views: int = 2,
        crop_min_scale: float = 0.08,
        jitter_strength: float = 0.5,
        lars: bool = True,
        lr: float = 0.3,
        weight_decay: float = 1e-6,
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
        if num_views < 2:
            raise ValueError(f"num_views must be >= 2; got {num_views}")
        self.projector = MLPHead(
            self.backbone.num_features, [projection_hidden_dim], projection_dim, norm_layer=nn.BatchNorm1d
        )
        self.criterion = NTXentLoss(temperature)
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
        num_views = self.hparams.num_views
        views = make_views(images, self.augment, num_views)  # independent parameters per image and view
        h = self.backbone(self.normalize(torch.cat(views)))  # (num_views * n, num_features)
        z = self.projector(h).chunk(num_views)  # num_views x (n, projection_dim)
        pairs = list(itertools.combinations(range(num_views), 2))
        loss = sum(self.criterion(z[i], z[j]) for i, j in pairs) / len(pairs)

        probe_loss = self.online_probe_loss(labeled)  # detached features: no gradient into the backbone
        self.log("train/loss", loss, prog_bar=True)
        log_alignment_uniformity(self, z[0].detach(), z[1].detach())
        if self.global_step == 0 and batch_idx == 0:
            log_views(self, views)
        return loss + probe_loss

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        return joint_embedding_optimizer(self, self.hparams.lr, self.hparams.weight_decay, self.hparams.lars)
