"""MoCo v2: queries against momentum-encoded keys and a queue of past keys."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ssl_modules import dist
from ssl_modules.augment.views import simclr_views
from ssl_modules.ema import copy_frozen
from ssl_modules.heads import projection_head
from ssl_modules.losses.contrastive import InfoNCELoss
from ssl_modules.self_supervised.joint_embedding import JointEmbeddingLoss, JointEmbeddingModule


class MoCoModule(JointEmbeddingModule):
    """MoCo v2: InfoNCE of a query against its momentum-encoded key and a queue of negatives.

    The key encoder (``momentum_backbone`` + ``momentum_projector``) is a frozen copy updated
    after each optimizer step with momentum ``m(global_step)``, cosine from ``base_momentum``
    to 1. The queue (``queue``, ``queue_pointer``) is a buffer, saved in checkpoints; under
    DDP the keys of every rank are enqueued, so all ranks hold the same queue.

    The queue must hold a small fraction of the data, or most of its negatives are earlier
    keys of the very images being contrasted: at the first step, a ``queue_size`` larger
    than half the training images seen per epoch is clamped to that, with a warning, and the
    clamped size is saved in the hyperparameters.

    - [0] MoCo, He et al., 2020, https://arxiv.org/abs/1911.05722
    - [1] MoCo v2, Chen et al., 2020, https://arxiv.org/abs/2003.04297

    Args:
        backbone: backbone name (``ssl_modules.backbones``).
        projection_hidden_dim: hidden width of the MLP head (v2: 2048).
        projection_dim: key/query width (128).
        temperature: InfoNCE temperature (v2: 0.2).
        queue_size: negatives in the queue (65536 on ImageNet).
        base_momentum: key-encoder momentum at step 0 (v2: 0.999, fixed; here cosine-increased to 1).
        symmetric: also use the second view as query (MoCo v3's symmetrised loss); v2 is asymmetric.
        crop_min_scale: smallest crop area fraction of the views (v2 uses SimCLR's augmentation, crop 0.2-1).
        jitter_strength: colour-jitter strength s of the views (SimCLR's).
        lr: SGD learning rate (v2: 0.03 at batch 256), momentum 0.9, cosine schedule.
        weight_decay: 1e-4.
        lars: LARS instead of SGD.
        data facts, optimizer, scheduler: as in ``SSLModuleBase``.
    """

    def __init__(
        self,
        *,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        temperature: float = 0.2,
        queue_size: int = 65536,
        base_momentum: float = 0.999,
        symmetric: bool = False,
        crop_min_scale: float = 0.2,
        jitter_strength: float = 0.5,
        lr: float = 0.03,
        weight_decay: float = 1e-4,
        lars: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, **kwargs)
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1; got {queue_size}")
        if not 0 <= base_momentum <= 1:
            raise ValueError(f"base_momentum must be in [0, 1]; got {base_momentum}")
        self.projector = projection_head(
            self.backbone.num_features, projection_hidden_dim, projection_dim, batch_norm=False
        )
        self.momentum_backbone = copy_frozen(self.backbone)
        self.momentum_projector = copy_frozen(self.projector)
        self.criterion = InfoNCELoss(temperature)
        self.augment = simclr_views(
            self.channels,
            self.image_size,
            self.horizontal_flip,
            crop_scale=(crop_min_scale, 1.0),
            jitter_strength=jitter_strength,
        )
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, projection_dim), dim=1))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
        self._queue_size_checked = False

    def view_groups(self, views: list[torch.Tensor]) -> list[list[int]]:
        # v2 encodes only the query view online; the symmetrised loss encodes each view in its
        # own call (BatchNorm statistics per view, as the key encoder sees them)
        return [[0], [1]] if self.hparams.symmetric else [[0]]

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.momentum_backbone), (self.projector, self.momentum_projector)]

    def joint_embedding_loss(
        self, views: list[torch.Tensor], features: list[torch.Tensor | None]
    ) -> JointEmbeddingLoss:
        self._check_queue_size(len(views[0]))
        query_q = self.projector(features[0])  # (n, projection_dim)
        with torch.no_grad():  # stop-gradient: keys come from the momentum encoder
            key_k = self.momentum_projector(self.momentum_backbone(self.backbone_input(views[1])))
        negatives = self.queue.clone()  # (queue_size, projection_dim); the enqueue below is in place
        loss = self.criterion(query_q, key_k, negatives)
        if self.hparams.symmetric:
            query_k = self.projector(features[1])
            with torch.no_grad():
                key_q = self.momentum_projector(self.momentum_backbone(self.backbone_input(views[0])))
            loss = (loss + self.criterion(query_k, key_q, negatives)) / 2
        self.enqueue(key_k)
        return JointEmbeddingLoss(loss, query_q, key_k)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest queue entries by the keys of every rank. Shape: keys (n, dim)."""
        keys = F.normalize(dist.gather_no_grad(keys.float()), dim=1)  # (world_size * n, dim)
        size = len(self.queue)
        keys = keys[-size:]
        slots = (self.queue_pointer + torch.arange(len(keys), device=keys.device)) % size
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_pointer.copy_((self.queue_pointer + len(keys)) % size)

    def _check_queue_size(self, batch_size: int) -> None:
        if self._queue_size_checked or self._trainer is None:
            return
        self._queue_size_checked = True
        batches = self.trainer.num_training_batches
        if not isinstance(batches, int) or batches <= 0:
            return
        keys_per_step = batch_size * dist.world_size()
        limit = max(keys_per_step, batches * batch_size * dist.world_size() // 2)
        if len(self.queue) > limit:
            rank_zero_warn(
                f"MoCo queue_size={len(self.queue)} is larger than half the {batches * batch_size * dist.world_size()} "
                f"training images per epoch, so most negatives would be earlier keys of the same images; "
                f"clamping it to {limit}. Set model.queue_size <= {limit} to silence this."
            )
            self.queue.data = self.queue.data[:limit].clone()
            self.queue_pointer.zero_()
            self.hparams["queue_size"] = limit

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "queue")
        if saved is not None and saved.shape != self.queue.shape:
            # a checkpoint whose queue was clamped to the data: adopt its size
            self.queue.data = torch.empty_like(saved, device=self.queue.device)
            self._queue_size_checked = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
