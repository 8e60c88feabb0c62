"""Jigsaw puzzles: predict which permutation shuffled the tiles of an image."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ssl_modules.augment.pretext import (
    hamming_permutation_set,
    jigsaw_geometry,
    jigsaw_tiles,
    tile_grid_image,
)
from ssl_modules.base import split_batch
from ssl_modules.callbacks import log_image_grid
from ssl_modules.evaluation import SelfSupervisedModule
from ssl_modules.heads import MLPHead


class JigsawPretext(SelfSupervisedModule):
    """Each image is cut into a ``grid_size`` x ``grid_size`` puzzle (random gap/jitter per
    tile, per-tile normalisation), its tiles shuffled by one of ``num_permutations`` fixed
    permutations; a shared backbone embeds every tile, the tile features are concatenated in
    puzzle order, and a head classifies which permutation was applied.

    - [0] Jigsaw, Noroozi & Favaro, 2016, https://arxiv.org/abs/1603.09246

    The permutation set is chosen greedily for maximal minimum Hamming distance from
    ``permutation_seed`` (deterministic) and saved as the buffer ``permutations``. Tiles scale
    with the image: a 16-px image gives 5-px cells and 4-px tiles; images smaller than
    ``grid_size * 4`` px raise a ``ValueError``. The probe reads the backbone on whole images.

    Args:
        backbone: backbone name (``ssl_modules.backbones``), shared by all tiles.
        grid_size: tiles per side (3 in the paper).
        num_permutations: size of the permutation set (the paper: 1000, with 100 nearly as
            good; 100 here, since tiny images carry less evidence per tile).
        permutation_seed: seed of the permutation set.
        head_hidden: hidden width of the head over the concatenated tile features (fc7).
        lr: SGD learning rate (the paper: 0.01, momentum 0.9), cosine-decayed per step.
        weight_decay: SGD weight decay (the paper: 5e-4).
        knn_k, probe_weight_decay: evaluation (``SelfSupervisedModule``).
        data facts and optimizer/scheduler: as in ``SSLModuleBase``.

    Batch: ``{"labeled": LabeledBatch, "unlabeled": UnlabeledBatch}`` (``ssl_modules.batch``); images
    float in [0, 1], shape (batch_size, channels, image_size, image_size). Logs ``train/pretext_acc``.
    """

    def __init__(
        self,
        *,
        grid_size: int = 3,
        num_permutations: int = 100,
        permutation_seed: int = 0,
        head_hidden: int = 512,
        lr: float = 0.01,
        weight_decay: float = 5e-4,
        **kwargs: Any,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, **kwargs)
        jigsaw_geometry(self.image_size, grid_size)  # fails early, naming the smallest image that works
        self.grid_size = grid_size
        num_tiles = grid_size * grid_size
        self.register_buffer(
            "permutations", hamming_permutation_set(num_permutations, num_tiles, permutation_seed)
        )
        hidden = [head_hidden] if head_hidden > 0 else []
        self.jigsaw_head = MLPHead(num_tiles * self.backbone.num_features, hidden, num_permutations)

    def puzzle_logits(self, tiles: torch.Tensor) -> torch.Tensor:
        """Shape: (batch_size, num_tiles, C, t, t) -> (batch_size, num_permutations)."""
        batch_size = len(tiles)
        features = self.backbone(tiles.flatten(0, 1))  # (B * num_tiles, num_features)
        return self.jigsaw_head(features.view(batch_size, -1))  # tile features concatenated in order

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        labeled, unlabeled = split_batch(batch)
        # images alone: labels are never read by the pretext loss
        images = labeled.images if unlabeled is None else torch.cat([labeled.images, unlabeled.images])
        permutation = torch.randint(len(self.permutations), (len(images),), device=images.device)  # (B,)
        tiles = jigsaw_tiles(images, self.permutations, permutation, self.grid_size)  # (B, T, C, t, t)
        logits = self.puzzle_logits(tiles)  # (B, num_permutations)
        pretext_loss = F.cross_entropy(logits, permutation)
        probe_loss = self.online_probe_loss(labeled)  # detached features, labeled split only
        self.log("train/pretext_loss", pretext_loss, prog_bar=True)
        self.log("train/pretext_acc", (logits.argmax(1) == permutation).float().mean(), prog_bar=True)
        return pretext_loss + probe_loss

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            params, lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay
        )

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        images = batch[0]
        # a fixed draw per validation batch, so val/pretext_acc is comparable across epochs
        generator = torch.Generator().manual_seed(batch_idx)
        permutation = torch.randint(len(self.permutations), (len(images),), generator=generator).to(
            images.device
        )
        tiles = jigsaw_tiles(images, self.permutations, permutation, self.grid_size, jitter=False)
        predicted = self.puzzle_logits(tiles).argmax(1)
        self.log(
            "val/pretext_acc",
            (predicted == permutation).float().mean(),
            batch_size=len(images),
            sync_dist=True,
        )
        if batch_idx == 0:
            shown = min(16, len(images))
            pairs = " ".join(f"{int(t)}->{int(p)}" for t, p in zip(permutation[:shown], predicted[:shown]))
            log_image_grid(
                self,
                "val/puzzles",
                tile_grid_image(tiles[:shown], self.grid_size),
                caption=f"shuffled puzzles; permutation applied->predicted: {pairs}",
            )
