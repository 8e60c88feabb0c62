"""SimSiam: predict one view's projection from the other's, with a stop-gradient on the target."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ssl_modules.augment.views import simclr_views
from ssl_modules.base import WarmupCosine
from ssl_modules.heads import prediction_head, projection_head
from ssl_modules.losses.joint_embedding import NegativeCosineSimilarity
from ssl_modules.self_supervised.joint_embedding import JointEmbeddingLoss, JointEmbeddingModule


class SimSiamModule(JointEmbeddingModule):
    """SimSiam: encoder f (backbone + projector) and predictor h; the symmetric loss
    ``(D(h(z1), sg(z2)) + D(h(z2), sg(z1))) / 2`` with D the negative cosine similarity and
    sg the stop-gradient. No negatives and no momentum encoder: the stop-gradient alone keeps
    the two branches from collapsing (the paper's finding).

    ``train/output_std``: the mean per-dimension standard deviation of the L2-normalised
    projections, the paper's collapse monitor (0 when collapsed, ~1/sqrt(dim) when not).

    - [0] SimSiam, Chen & He, 2021, https://arxiv.org/abs/2011.10566

    Args:
        backbone: backbone name (``ssl_modules.backbones``).
        projection_hidden_dim: hidden width of the 3-layer projector (paper: 2048).
        projection_dim: output width of the projector and the predictor (paper: 2048).
        projection_layers: Linear layers of the projector, each followed by BatchNorm (paper: 3
            on ImageNet, 2 in its CIFAR-10 experiments).
        prediction_hidden_dim: the predictor's bottleneck width (paper: 512).
        fixed_predictor_lr: keep the predictor's learning rate at ``lr`` while the rest follows
            the cosine schedule (the paper's predictor ablation, Table 1: "lr not decayed" did
            slightly better; the authors' ``--fix-pred-lr``). With an injected ``scheduler``,
            that scheduler drives every group.
        crop_min_scale: smallest crop area fraction (paper: MoCo v2's augmentation, 0.2).
        jitter_strength: colour-jitter strength s (paper: 0.4/0.4/0.4/0.1, i.e. s=0.5).
        lr: SGD learning rate (paper: 0.05 x batch_size / 256), momentum 0.9, cosine schedule.
        weight_decay: paper: 1e-4, on every weight as in the paper.
        data facts, optimizer, scheduler: as in ``SSLModuleBase``.
    """

    def __init__(
        self,
        *,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 2048,
        projection_layers: int = 3,
        prediction_hidden_dim: int = 512,
        fixed_predictor_lr: bool = True,
        crop_min_scale: float = 0.2,
        jitter_strength: float = 0.5,
        lr: float = 0.05,
        weight_decay: float = 1e-4,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, **kwargs)
        if projection_layers < 2:
            raise ValueError(
                f"projection_layers must be >= 2 (paper: 3, or 2 on CIFAR-10); got {projection_layers}"
            )
        self.projector = projection_head(
            self.backbone.num_features,
            projection_hidden_dim,
            projection_dim,
            num_hidden_layers=projection_layers - 1,
            output_batch_norm=True,
        )
        self.predictor = prediction_head(projection_dim, prediction_hidden_dim, projection_dim)
        self.criterion = NegativeCosineSimilarity()
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
        z = self.projector(torch.cat(features))  # (2n, projection_dim)
        p = self.predictor(z)  # (2n, projection_dim)
        z_a, z_b = z.chunk(2)
        p_a, p_b = p.chunk(2)
        # stop-gradient: each view's projection is a constant target for the other's prediction
        loss = (self.criterion(p_a, z_b.detach()) + self.criterion(p_b, z_a.detach())) / 2
        self.log("train/output_std", F.normalize(z_a.detach().float(), dim=1).std(dim=0).mean())
        return JointEmbeddingLoss(loss, z_a, z_b)

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """SGD (momentum 0.9, weight decay on every weight, as in the paper) with the predictor
        in its own group, marked ``fixed_lr``; the online probe without weight decay."""
        groups: dict[str, list[torch.nn.Parameter]] = {"encoder": [], "predictor": [], "online_probe": []}
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                part = name.split(".", 1)[0]
                groups[part if part in groups else "encoder"].append(parameter)
        weight_decay, fixed = self.hparams.weight_decay, self.hparams.fixed_predictor_lr
        param_groups = [
            {"params": groups["encoder"], "weight_decay": weight_decay, "fixed_lr": False},
            {"params": groups["predictor"], "weight_decay": weight_decay, "fixed_lr": fixed},
            {"params": groups["online_probe"], "weight_decay": 0.0, "fixed_lr": False},
        ]
        return torch.optim.SGD(param_groups, lr=self.hparams.lr, momentum=0.9, weight_decay=weight_decay)

    def default_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """The cosine schedule for every group except those marked ``fixed_lr``, whose factor
        stays 1 (a cosine from 1 to ``final_factor=1``)."""
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        factors = [
            WarmupCosine(total, final_factor=1.0) if group.get("fixed_lr") else WarmupCosine(total)
            for group in optimizer.param_groups
        ]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
