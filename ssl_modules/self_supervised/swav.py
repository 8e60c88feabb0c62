"""SwAV: swap the cluster assignments (codes) between the views of an image."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ssl_modules import dist
from ssl_modules.base import WarmupCosine
from ssl_modules.callbacks import log_image_grid
from ssl_modules.heads import projection_head, prototypes
from ssl_modules.losses.self_distillation import SwAVLoss
from ssl_modules.self_supervised.joint_embedding import JointEmbeddingLoss, JointEmbeddingModule


def usage_bars(counts: torch.Tensor, height: int = 64, max_width: int = 512) -> torch.Tensor:
    """A bar chart of prototype usage, prototypes sorted from most to least assigned, as an image.

    Each prototype is a column of ``max(1, max_width // K)`` pixels (with more than
    ``max_width`` prototypes, neighbours in the sorted order share a column, averaged); the
    tallest bar fills the height. Dark bars on white. A flat profile: every prototype in use;
    one spike: the assignments collapsed onto few prototypes.

    Shape: counts (num_prototypes,) -> uint8 (3, height, width).
    """
    if counts.ndim != 1 or len(counts) == 0:
        raise ValueError(f"counts must have shape (num_prototypes,); got {tuple(counts.shape)}")
    values = counts.detach().float().cpu().sort(descending=True).values
    if len(values) > max_width:
        per_column = math.ceil(len(values) / max_width)
        values = (
            F.pad(values, (0, per_column * max_width - len(values))).view(max_width, per_column).mean(dim=1)
        )
    bar_width = max(1, max_width // len(values))
    bar_heights = (values / values.max().clamp_min(1e-12) * height).round().long()  # (columns,)
    bar_heights = bar_heights.repeat_interleave(bar_width)  # (width,)
    rows = torch.arange(height).unsqueeze(1)  # (height, 1)
    filled = rows >= height - bar_heights.unsqueeze(0)  # (height, width): bars grow from the bottom
    image = torch.where(filled, 40, 255).to(torch.uint8)
    return image.unsqueeze(0).expand(3, -1, -1).contiguous()


class SwAVModule(JointEmbeddingModule):
    """SwAV: online clustering of multi-crop views against learned prototypes, predicting the
    code of one view from the others (swapped prediction).

    Each step: ``num_global_crops`` global and ``num_local_crops`` local views
    (``MultiCropViews``); backbone -> projector -> L2 normalisation -> ``prototypes`` (scores
    against unit-norm prototypes); the codes of the global views come from Sinkhorn-Knopp
    (equipartitioned over the global batch, no gradient), and ``SwAVLoss`` predicts each from the
    scores of every other view. No target network.

    - Prototypes are re-normalised after every optimizer step, and get no update during the
      first ``freeze_prototypes_steps`` steps (the authors' ``freeze_prototypes_niters``).
    - Queue: with small batches the Sinkhorn runs on the batch plus the ``queue_length`` past
      embeddings of each global view, scored against the current prototypes; the queue fills
      from step ``queue_start_step`` and is used once full (the authors start it at epoch 15 of
      their batch-256 runs). ``queue_length=0``: no queue. Under DDP the queue holds the global
      batches (gathered from every rank), the same on every rank, and rank r puts its
      ``queue_length // world_size`` rows ``r * queue_length // world_size ...`` into the
      Sinkhorn, whose all-reduce then spans the whole queue once: the codes equal one process's
      on the same global batches. (The authors' code keeps a queue per rank instead; a per-rank
      buffer would be overwritten by DDP's buffer broadcast from rank 0 at every step.)
    - ``train/prototype_usage`` (an image, ``usage_bars``), ``train/prototypes_used`` (fraction
      with at least one assignment) and ``train/usage_entropy`` (entropy of the assignment
      histogram over log K; 1 when uniform) at the first step of every epoch.

    - [0] SwAV, Caron et al., 2020, https://arxiv.org/abs/2006.09882

    Args:
        backbone: backbone name (``ssl_modules.backbones``).
        projection_hidden_dim: hidden width of the projector (paper: 2048).
        projection_dim: embedding width (paper: 128).
        num_prototypes: K (paper: 3000 on ImageNet).
        temperature: of the swapped prediction (paper: 0.1).
        sinkhorn_epsilon: (paper: 0.05).
        sinkhorn_iterations: (paper: 3).
        num_global_crops: global views (paper: 2).
        num_local_crops: local views (paper: 6).
        local_size: side of the local views (default: 96/224 of the image, ``MultiCropViews``).
        global_crop_scale: area fraction of a global crop (paper: (0.14, 1)).
        local_crop_scale: area fraction of a local crop (paper: (0.05, 0.14)).
        freeze_prototypes_steps: steps without prototype updates (paper code: 313; 5005 in the
            batch-256 recipes).
        queue_length: past embeddings per global view in the Sinkhorn (paper: 3840 for batch 256),
            at least the global batch and, under DDP, a multiple of the number of processes.
        queue_start_step: the step from which the queue fills.
        lars: LARS (paper) instead of SGD with momentum.
        lr: paper: 4.8 at batch 4096, i.e. 0.3 x batch_size / 256 (the authors' batch-256 recipe:
            0.6), cosine to lr / 1000.
        weight_decay: paper: 1e-6.
        data facts, optimizer, scheduler: as in ``SSLModuleBase``.
    """

    def __init__(
        self,
        *,
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        num_prototypes: int = 3000,
        temperature: float = 0.1,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        num_global_crops: int = 2,
        num_local_crops: int = 6,
        local_size: int | None = None,
        global_crop_scale: Sequence[float] = (0.14, 1.0),
        local_crop_scale: Sequence[float] = (0.05, 0.14),
        freeze_prototypes_steps: int = 313,
        queue_length: int = 3840,
        queue_start_step: int = 0,
        lars: bool = True,
        lr: float = 0.3,
        weight_decay: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, **kwargs)
        if freeze_prototypes_steps < 0:
            raise ValueError(f"freeze_prototypes_steps must be >= 0; got {freeze_prototypes_steps}")
        if queue_length < 0 or queue_start_step < 0:
            raise ValueError(
                f"queue_length and queue_start_step must be >= 0 (queue_length=0: no queue); got "
                f"{queue_length} and {queue_start_step}"
            )
        self.use_multicrop(
            num_global_crops=num_global_crops,
            num_local_crops=num_local_crops,
            local_size=local_size,
            global_crop_scale=global_crop_scale,
            local_crop_scale=local_crop_scale,
        )
        self.projector = projection_head(self.backbone.num_features, projection_hidden_dim, projection_dim)
        self.prototypes = prototypes(projection_dim, num_prototypes)
        self.criterion = SwAVLoss(temperature, sinkhorn_epsilon, sinkhorn_iterations)
        # past L2-normalised embeddings of each global view (the global batches, gathered from
        # every rank, newest first): the same on every rank. None: no queue.
        queue = torch.zeros(num_global_crops, queue_length, projection_dim) if queue_length else None
        self.register_buffer("queue", queue)
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self._log_usage = False

    # -- the method's parts ---------------------------------------------------------------
    def joint_embedding_loss(
        self, views: list[torch.Tensor], features: list[torch.Tensor | None]
    ) -> JointEmbeddingLoss:
        z = F.normalize(self.projector(torch.cat(features)), dim=1)  # (num_views * n, projection_dim)
        scores = self.prototypes(z).split([len(f) for f in features])  # num_views x (n, num_prototypes)
        global_scores = list(scores[: self.num_global_crops])
        queue_scores = self.queue_scores()
        loss = self.criterion(global_scores, list(scores[self.num_global_crops :]), queue_scores)
        if self._log_usage:
            self.log_prototype_usage(global_scores, queue_scores)
        n = len(features[0])
        global_z = z[: self.num_global_crops * n].detach().chunk(self.num_global_crops)
        self.enqueue(list(global_z))
        return JointEmbeddingLoss(loss, z[:n], z[n : 2 * n])

    # -- queue --------------------------------------------------------------------------------
    def queue_rows(self) -> slice:
        """The queue rows this rank puts into the Sinkhorn: its ``queue_length // world_size``
        share; the all-reduce of the Sinkhorn adds the other ranks' shares."""
        share = self.hparams.queue_length // dist.world_size()
        return slice(dist.rank() * share, (dist.rank() + 1) * share)

    def queue_active(self) -> bool:
        return self.hparams.queue_length > 0 and self.global_step >= self.hparams.queue_start_step

    @torch.no_grad()
    def queue_scores(self) -> list[torch.Tensor] | None:
        """Scores of the queued embeddings against the current prototypes, once the queue is full
        (else None): this rank's share, ``queue_rows()``. Shape: num_global_crops x
        (queue_length // world_size, num_prototypes)."""
        if not self.queue_active() or int(self.queue_filled) < self.hparams.queue_length:
            return None
        rows = self.queue_rows()
        return [self.prototypes(self.queue[i, rows]) for i in range(self.num_global_crops)]

    @torch.no_grad()
    def enqueue(self, embeddings: list[torch.Tensor]) -> None:
        """Push each global view's embeddings of the global batch (gathered from every rank, in
        rank order) to the front of its queue; the oldest fall off. Every rank pushes the same rows.
        Shape: embeddings num_global_crops x (batch_size, projection_dim)."""
        if not self.queue_active():
            return
        length, world_size = self.hparams.queue_length, dist.world_size()
        global_batch = len(embeddings[0]) * world_size
        if global_batch > length:
            raise ValueError(
                f"the SwAV queue holds {length} embeddings, fewer than the global batch of {global_batch}; "
                f"set model.queue_length >= {global_batch} (or 0 for no queue)"
            )
        if length % world_size:
            raise ValueError(
                f"SwAV's queue_length ({length}) must be a multiple of the number of processes ({world_size}): "
                "each rank puts an equal share of the queue into the Sinkhorn"
            )
        for i, embedding in enumerate(embeddings):
            gathered = dist.gather_no_grad(embedding.contiguous())  # (global_batch, projection_dim)
            self.queue[i, global_batch:] = self.queue[i, : length - global_batch].clone()
            self.queue[i, :global_batch] = gathered.to(self.queue.dtype)
        self.queue_filled.copy_(torch.clamp(self.queue_filled + global_batch, max=length))

    # -- visuals ----------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._log_usage = batch_idx == 0

    @torch.no_grad()
    def log_prototype_usage(
        self, global_scores: list[torch.Tensor], queue_scores: list[torch.Tensor] | None
    ) -> torch.Tensor:
        """Histogram of the batch's code assignments (argmax of the codes of every global view)
        over the prototypes; logged as ``usage_bars`` and two scalars. Returns the counts.

        Shape: -> (num_prototypes,).
        """
        codes = self.criterion.codes([s.detach() for s in global_scores], queue_scores)
        assignments = torch.cat(codes).argmax(dim=1)  # (num_global_crops * n,)
        counts = torch.bincount(assignments, minlength=self.prototypes.layer.out_features).float()
        frequencies = counts / counts.sum()
        entropy = -(frequencies * frequencies.clamp_min(1e-12).log()).sum() / math.log(len(counts))
        self.log("train/prototypes_used", (counts > 0).float().mean())
        self.log("train/usage_entropy", entropy)
        log_image_grid(
            self,
            "train/prototype_usage",
            usage_bars(counts).unsqueeze(0),
            caption=f"code assignments per prototype, sorted, {int(counts.sum())} crops, K={len(counts)}",
            max_images=1,
            nrow=1,
        )
        return counts

    # -- optimisation -----------------------------------------------------------------------
    def on_after_backward(self) -> None:
        if self.global_step < self.hparams.freeze_prototypes_steps:
            self.prototypes.layer.weight.grad = None  # the authors' freeze_prototypes_niters

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.prototypes.normalize_()  # back to the unit sphere after every step

    def default_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """Cosine from ``lr`` to ``lr / 1000`` (the paper's final lr 0.0048 for 4.8)."""
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total, final_factor=0.001))
