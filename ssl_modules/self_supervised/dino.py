"""DINO: self-distillation without labels, a student matching an EMA teacher over multi-crop views."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_modules.base import WarmupCosine, split_batch
from ssl_modules.callbacks import log_image_grid
from ssl_modules.ema import copy_frozen
from ssl_modules.heads import MLPHead
from ssl_modules.losses.self_distillation import DINOLoss
from ssl_modules.optim import param_groups
from ssl_modules.self_supervised.joint_embedding import JointEmbeddingLoss, JointEmbeddingModule


class DINOHead(nn.Module):
    """DINO's projection head: an MLP to a bottleneck, L2-normalised, then a weight-normalised
    linear layer to ``out_dim`` logits.

    ``MLPHead(in, [hidden] * (num_layers - 1), bottleneck)`` with GELU and no BatchNorm (the
    paper's ViT default), ``z = normalize(mlp(x))``, ``logits = z @ (g * v / |v|)^T`` with one
    row ``v_k`` per output. With ``norm_last_layer`` the scale ``g`` is fixed to 1 (the rows are
    unit vectors; the paper's default, "improves stability"), otherwise ``g`` is learned.

    - [0] DINO, Caron et al., 2021, https://arxiv.org/abs/2104.14294 (appendix, projection head)

    Args:
        in_features: backbone features.
        hidden_features: MLP width (paper: 2048).
        bottleneck_features: bottleneck width (paper: 256).
        out_dim: K, the output width (paper: 65536).
        num_layers: MLP layers before the bottleneck output (paper: 3).
        batch_norm: BatchNorm in the MLP (the paper's ResNet-50 variant; off for ViTs).
        norm_last_layer: fix the last layer's weight-norm scale to 1.

    Shape: (batch_size, in_features) -> (batch_size, out_dim); ``embed``: -> (batch_size, bottleneck_features).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int = 2048,
        bottleneck_features: int = 256,
        out_dim: int = 65536,
        num_layers: int = 3,
        batch_norm: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1; got {num_layers}")
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1; got {out_dim}")
        self.mlp = MLPHead(
            in_features,
            [hidden_features] * (num_layers - 1),
            bottleneck_features,
            norm_layer=nn.BatchNorm1d if batch_norm else None,
            activation=nn.GELU,
        )
        for layer in self.mlp.modules():
            if isinstance(layer, nn.Linear):  # the authors' init: truncated normal, std 0.02
                nn.init.trunc_normal_(layer.weight, std=0.02)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        self.last_layer_direction = nn.Parameter(torch.empty(out_dim, bottleneck_features))  # v
        nn.init.trunc_normal_(self.last_layer_direction, std=0.02)
        self.last_layer_scale = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)  # g
        self.norm_last_layer = norm_last_layer

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck embedding. Shape: (batch_size, bottleneck_features)."""
        return F.normalize(self.mlp(features), dim=1)

    def last_layer(self, embedding: torch.Tensor) -> torch.Tensor:
        """The weight-normalised last layer. Shape: (batch_size, bottleneck) -> (batch_size, out_dim)."""
        weight = self.last_layer_scale * F.normalize(
            self.last_layer_direction, dim=1
        )  # (out_dim, bottleneck)
        return embedding @ weight.T

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.embed(features))


class DINOModule(JointEmbeddingModule):
    """DINO: a student (backbone + ``DINOHead``) predicts the centred, sharpened output of an EMA
    teacher, across multi-crop views.

    Each step: ``num_global_crops`` global and ``num_local_crops`` local views
    (``MultiCropViews``); the teacher (``teacher_backbone`` + ``teacher_head``, frozen copies)
    encodes the global views under ``torch.no_grad()``; the student encodes every view; the loss is
    ``DINOLoss`` (cross-entropy over the pairs of different views, centring of the teacher). After
    each optimizer step the teacher becomes the EMA of the student with momentum cosine from
    ``base_momentum`` to 1. ``test/acc`` probes the student backbone (``self.backbone``).

    With a ViT backbone (``vit_*``) the teacher's last-block attention maps of the batch's first
    images are logged (``train/attention``) at the first step of every epoch.

    Optimizer: AdamW at ``lr`` with linear warm-up (``warmup_fraction`` of the run) and cosine
    decay; biases and norm parameters without weight decay; the weight decay of the others
    follows a cosine from ``weight_decay`` to ``weight_decay_end``, a pure function of the step
    (applied only to the default optimizer's groups: an injected optimizer keeps its own).
    The authors' code also clips each parameter's gradient norm to 3 and freezes the last layer
    during the first epoch (``freeze_last_layer_steps``; default 0 here).

    - [0] DINO, Caron et al., 2021, https://arxiv.org/abs/2104.14294

    Args:
        backbone: backbone name (``ssl_modules.backbones``; the paper's are ViTs and ResNet-50).
        projection_hidden_dim: hidden width of the head's MLP (paper: 2048).
        bottleneck_dim: the head's bottleneck (paper: 256).
        out_dim: K, the head's output width (paper: 65536).
        head_batch_norm: BatchNorm in the head's MLP (paper: off for ViTs, on for ResNet-50). A convnet
            whose features are all positive (ReLU, then pooling) needs it: without, the bottleneck
            embeddings of all images start nearly equal and the output collapses to uniform (seen
            with ``small_cnn`` on the digits).
        norm_last_layer: fix the last layer's weight-norm scale (paper: True).
        student_temperature: tau_s (paper: 0.1).
        teacher_temperature: tau_t after its warm-up (paper code: 0.04; the paper warms 0.04 -> 0.07).
        warmup_teacher_temperature: tau_t at step 0 (paper: 0.04).
        warmup_teacher_temperature_steps: steps of tau_t's linear warm-up (paper: 30 epochs).
        center_momentum: EMA momentum of the center (paper: 0.9).
        base_momentum: teacher momentum at step 0, cosine to 1 (paper: 0.996).
        num_global_crops: global views (paper: 2).
        num_local_crops: local views (paper code: 8; 10 for the best ViT-S/16 results).
        local_size: side of the local views (default: 96/224 of the image, ``MultiCropViews``).
        global_crop_scale: area fraction of a global crop (paper: (0.4, 1)).
        local_crop_scale: area fraction of a local crop (paper: (0.05, 0.4)).
        freeze_last_layer_steps: steps during which the head's last layer gets no update.
        warmup_fraction: fraction of the run with linear lr warm-up (paper: 10 of 100 epochs).
        lr: AdamW learning rate (paper: 5e-4 x batch_size / 256).
        weight_decay: weight decay at step 0 (paper: 0.04).
        weight_decay_end: weight decay at the last step (paper: 0.4).
        data facts, optimizer, scheduler: as in ``SSLModuleBase``.
    """

    def __init__(
        self,
        *,
        projection_hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        out_dim: int = 65536,
        head_batch_norm: bool = False,
        norm_last_layer: bool = True,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
        warmup_teacher_temperature: float = 0.04,
        warmup_teacher_temperature_steps: int = 0,
        center_momentum: float = 0.9,
        base_momentum: float = 0.996,
        num_global_crops: int = 2,
        num_local_crops: int = 8,
        local_size: int | None = None,
        global_crop_scale: Sequence[float] = (0.4, 1.0),
        local_crop_scale: Sequence[float] = (0.05, 0.4),
        freeze_last_layer_steps: int = 0,
        warmup_fraction: float = 0.1,
        lr: float = 5e-4,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, **kwargs)
        if not 0 <= base_momentum <= 1:
            raise ValueError(f"base_momentum must be in [0, 1]; got {base_momentum}")
        if freeze_last_layer_steps < 0:
            raise ValueError(f"freeze_last_layer_steps must be >= 0; got {freeze_last_layer_steps}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1); got {warmup_fraction}")
        if weight_decay < 0 or weight_decay_end < 0:
            raise ValueError(f"weight decays must be >= 0; got {weight_decay} and {weight_decay_end}")
        self.use_multicrop(
            num_global_crops=num_global_crops,
            num_local_crops=num_local_crops,
            local_size=local_size,
            global_crop_scale=global_crop_scale,
            local_crop_scale=local_crop_scale,
        )
        self.head = DINOHead(
            self.backbone.num_features,
            projection_hidden_dim,
            bottleneck_dim,
            out_dim,
            batch_norm=head_batch_norm,
            norm_last_layer=norm_last_layer,
        )
        self.teacher_backbone = copy_frozen(self.backbone)
        self.teacher_head = copy_frozen(self.head)
        self.criterion = DINOLoss(
            out_dim,
            student_temperature=student_temperature,
            teacher_temperature=teacher_temperature,
            warmup_teacher_temperature=warmup_teacher_temperature,
            warmup_teacher_temperature_steps=warmup_teacher_temperature_steps,
            center_momentum=center_momentum,
        )

    # -- the method's parts ---------------------------------------------------------------
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)]

    def joint_embedding_loss(
        self, views: list[torch.Tensor], features: list[torch.Tensor | None]
    ) -> JointEmbeddingLoss:
        embedding = self.head.embed(torch.cat(features))  # (num_views * n, bottleneck_dim)
        student = self.head.last_layer(embedding).split(
            [len(f) for f in features]
        )  # num_views x (n, out_dim)
        global_views = views[: self.num_global_crops]
        with torch.no_grad():  # the teacher only provides targets; it learns by EMA
            teacher_features = self.encode(global_views, self.teacher_backbone)
            teacher = self.teacher_head(torch.cat(teacher_features)).chunk(self.num_global_crops)
        loss = self.criterion(list(teacher), list(student), step=self.global_step)
        self.log("train/teacher_temperature", self.criterion.teacher_temperature_at(self.global_step))
        n = len(features[0])
        # alignment/uniformity on the bottleneck embeddings of the first two views
        return JointEmbeddingLoss(loss, embedding[:n], embedding[n : 2 * n])

    # -- visuals ----------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0 and hasattr(self.teacher_backbone, "last_block_attention"):
            labeled, unlabeled = split_batch(batch)
            images = (unlabeled or labeled).images[:8]
            maps = self.attention_maps(images)
            heads = len(maps) // len(images) - 1
            log_image_grid(
                self,
                "train/attention",
                maps,
                caption=f"per row: the image, then the teacher's last-block [CLS] attention of each of {heads} heads",
                max_images=len(maps),
                nrow=heads + 1,
            )

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's last-block attention of the class token over the patches, per head,
        upsampled (nearest) to the image and scaled to its maximum, beside each image (DINO's
        figure 1). Needs a ViT backbone.

        Shape: images (n, C, H, W) float in [0, 1] -> uint8 (n * (1 + num_heads), C, H, W):
        per image, the image followed by one map per head.
        """
        backbone = self.teacher_backbone
        if not hasattr(backbone, "last_block_attention"):
            raise ValueError(
                f"attention maps need a ViT backbone (with last_block_attention); got {type(backbone).__name__}. "
                "Build the model with backbone=vit_mini (or another vit_*)."
            )
        images = images.float()
        n, channels, height, width = images.shape
        attention = backbone.last_block_attention(self.backbone_input(images)).float()  # (n, heads, patches)
        heads = attention.shape[1]
        patch = backbone.patch_size
        grid = attention.reshape(n, heads, height // patch, width // patch)
        grid = grid / grid.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)  # each map to [0, 1]
        maps = F.interpolate(grid, size=(height, width), mode="nearest")  # (n, heads, H, W)
        maps = maps.unsqueeze(2).expand(n, heads, channels, height, width)
        rows = torch.cat([images.clamp(0, 1).unsqueeze(1), maps], dim=1)  # (n, 1 + heads, C, H, W)
        return rows.reshape(n * (1 + heads), channels, height, width).mul(255).round().to(torch.uint8)

    # -- optimisation -----------------------------------------------------------------------
    def on_after_backward(self) -> None:
        if self.global_step < self.hparams.freeze_last_layer_steps:
            self.head.last_layer_direction.grad = None  # the authors' cancel_gradients_last_layer
            self.head.last_layer_scale.grad = None

    def scheduled_weight_decay(self, step: int) -> float:
        """Cosine from ``weight_decay`` at step 0 to ``weight_decay_end`` at the last step."""
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        progress = min(1.0, step / max(1, int(total)))
        start, end = self.hparams.weight_decay, self.hparams.weight_decay_end
        return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # Lightning calls optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer = args[2] if len(args) > 2 else kwargs.get("optimizer")
        if optimizer is not None:
            weight_decay = self.scheduled_weight_decay(self.global_step)
            for group in optimizer.param_groups:
                if group.get("weight_decay_schedule"):
                    group["weight_decay"] = weight_decay
        super().optimizer_step(*args, **kwargs)

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """AdamW; weights with the scheduled weight decay, biases, norms and the online probe without."""
        probe = [
            p for name, p in self.named_parameters() if name.startswith("online_probe.") and p.requires_grad
        ]
        others = [p for name, p in self.named_parameters() if not name.startswith("online_probe.")]
        groups = param_groups(others, self.hparams.weight_decay)
        groups[0]["weight_decay_schedule"] = True
        groups.append({"params": probe, "weight_decay": 0.0})
        return torch.optim.AdamW(groups, lr=self.hparams.lr)

    def default_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        warmup = math.floor(self.hparams.warmup_fraction * total)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total, warmup_steps=warmup))
