"""MoCo v2: queries against momentum-encoded keys and a queue of past keys."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn

from ssl_modules import dist
from ssl_modules.augment.views import make_views, simclr_views
from ssl_modules.base import split_batch
from ssl_modules.callbacks.embeddings import log_alignment_uniformity, log_views
from ssl_modules.ema import copy_frozen, cosine_momentum, ema_update
from ssl_modules.evaluation.self_supervised import SelfSupervisedModule
from ssl_modules.heads import MLPHead
from ssl_modules.losses.contrastive import InfoNCELoss
from ssl_modules.optim import joint_embedding_optimizer


class MoCoModule(SelfSupervisedModule):
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
        num_classes: int = 10,
        channels: int = 3,
        image_size: int = 32,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        horizontal_flip: bool = True,
        backbone: str = "small_cnn",
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
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1; got {queue_size}")
        if not 0 <= base_momentum <= 1:
            raise ValueError(f"base_momentum must be in [0, 1]; got {base_momentum}")
        self.projector = MLPHead(
            self.backbone.num_features, [projection_hidden_dim], projection_dim, norm_layer=None
        )
        self.momentum_backbone = copy_frozen(self.backbone)
        self.momentum_projector = copy_frozen(self.projector)
        self.criterion = InfoNCELoss(temperature)
        self.augment = simclr_views(
            channels,
            image_size,
            horizontal_flip,
            crop_scale=(crop_min_scale, 1.0),
            jitter_strength=jitter_strength,
        )
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, projection_dim), dim=1))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
        self._queue_size_checked = False

    def momentum(self) -> float:
        """Key-encoder momentum: a pure function of ``global_step``."""
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        return cosine_momentum(self.global_step, int(total), self.hparams.base_momentum)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        labeled, unlabeled = split_batch(batch)
        images = (unlabeled or labeled)[0]  # y_hidden is never read
        self.check_images(images)
        self._check_queue_size(len(images))
        view_q, view_k = make_views(images, self.augment)  # independent parameters per image and view
        query_q = self.projector(self.backbone(self.normalize(view_q)))  # (n, projection_dim)
        with torch.no_grad():  # stop-gradient: keys come from the momentum encoder
            key_k = self.momentum_projector(
                self.momentum_backbone(self.normalize(view_k))
            )  # (n, projection_dim)
        negatives = self.queue.clone()  # (queue_size, projection_dim); the enqueue below is in place
        loss = self.criterion(query_q, key_k, negatives)
        if self.hparams.symmetric:
            query_k = self.projector(self.backbone(self.normalize(view_k)))
            with torch.no_grad():
                key_q = self.momentum_projector(self.momentum_backbone(self.normalize(view_q)))
            loss = (loss + self.criterion(query_k, key_q, negatives)) / 2
        self.enqueue(key_k)

        probe_loss = self.online_probe_loss(labeled)  # detached features: no gradient into the backbone
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/momentum", self.momentum())
        log_alignment_uniformity(self, query_q.detach(), key_k)
        if self.global_step == 0 and batch_idx == 0:
            log_views(self, [view_q, view_k])
        return loss + probe_loss

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest queue entries by the keys of every rank. Shape: keys (n, dim)."""
        keys = F.normalize(dist.gather_no_grad(keys.float()), dim=1)  # (world_size * n, dim)
        size = len(self.queue)
        keys = keys[-size:]
        slots = (self.queue_pointer + torch.arange(len(keys), device=keys.device)) % size
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_pointer.copy_((self.queue_pointer + len(keys)) % size)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        momentum = self.momentum()
        ema_update(self.momentum_backbone, self.backbone, momentum)
        ema_update(self.momentum_projector, self.projector, momentum)

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

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        return joint_embedding_optimizer(self, self.hparams.lr, self.hparams.weight_decay, self.hparams.lars)
