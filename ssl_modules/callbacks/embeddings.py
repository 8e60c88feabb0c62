"""Embedding diagnostics for joint-embedding methods (W&B first, any logger works).

- ``log_views``: the augmented views of a few images, side by side (one row per image).
- ``log_alignment_uniformity``: Wang & Isola's two numbers on a batch of positive pairs.
- ``EmbeddingPlotCallback``: every few epochs, a 2-D t-SNE of the validation-split features coloured
  by class. Add it to the trainer, e.g. in a trainer config::

      trainer:
        callbacks:
          - class_path: ssl_modules.callbacks.embeddings.EmbeddingPlotCallback
            init_args: {every_n_epochs: 5}

- [0] Alignment and uniformity, Wang & Isola, 2020, https://arxiv.org/abs/2005.10242
- [1] t-SNE, van der Maaten & Hinton, 2008, https://jmlr.org/papers/v9/vandermaaten08a.html
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch

from ssl_modules.augment import to_float_images
from ssl_modules.callbacks.visuals import log_image_grid
from ssl_modules.losses.contrastive import alignment, uniformity


def log_views(
    module: L.LightningModule, views: Sequence[torch.Tensor], key: str = "train/views", num_images: int = 8
) -> None:
    """Log the views of the first ``num_images`` images as a grid: row i holds image i's views."""
    count = min(num_images, len(views[0]))
    rows = torch.stack([view[:count].detach() for view in views], dim=1)  # (count, num_views, C, H, W)
    images = rows.flatten(0, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    log_image_grid(
        module,
        key,
        images,
        caption="each row: the views of one image",
        max_images=len(images),
        nrow=len(views),
    )


@torch.no_grad()
def log_alignment_uniformity(
    module: L.LightningModule, z_a: torch.Tensor, z_b: torch.Tensor, prefix: str = "train"
) -> None:
    """Log ``{prefix}/alignment`` (positive pairs) and ``{prefix}/uniformity`` (all embeddings)."""
    module.log(f"{prefix}/alignment", alignment(z_a, z_b))
    module.log(f"{prefix}/uniformity", uniformity(torch.cat([z_a, z_b])))


def _figure_to_tensor(figure: Any) -> torch.Tensor:
    figure.canvas.draw()
    rgba = np.asarray(figure.canvas.buffer_rgba())  # (H, W, 4)
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).float() / 255.0


def tsne_plot(
    features: torch.Tensor, labels: torch.Tensor, seed: int = 0, perplexity: float = 30.0
) -> torch.Tensor:
    """A t-SNE scatter plot of ``features`` coloured by ``labels``, as an image tensor (3, H, W).

    Shape: features (num_points, dim), labels (num_points,).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    points = features.detach().float().cpu().numpy()
    perplexity = min(perplexity, max(2.0, (len(points) - 1) / 3))
    coordinates = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        points
    )
    figure, axis = plt.subplots(figsize=(5, 5), dpi=100)
    scatter = axis.scatter(coordinates[:, 0], coordinates[:, 1], c=labels.cpu().numpy(), cmap="tab10", s=6)
    axis.legend(*scatter.legend_elements(), loc="best", fontsize=6, title="class")
    axis.set_xticks([])
    axis.set_yticks([])
    figure.tight_layout()
    image = _figure_to_tensor(figure)
    plt.close(figure)
    return image


class EmbeddingPlotCallback(L.Callback):
    """Every ``every_n_epochs`` validation epochs, log a t-SNE of the validation-split ``embed`` features.

    Only the validation split is embedded during training: the test split is looked at once, at
    the end. Without a validation split (``val_size=0``) the callback does nothing.

    Args:
        every_n_epochs: plot frequency, in epochs.
        max_points: at most this many validation images (the first ones) enter the plot.
        key: the logged image's key.
    """

    def __init__(
        self, every_n_epochs: int = 5, max_points: int = 1000, key: str = "val/embedding_tsne"
    ) -> None:
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1; got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.max_points = max_points
        self.key = key

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0 or trainer.current_epoch % self.every_n_epochs:
            return
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(pl_module, "embed"):
            return
        if not getattr(datamodule, "has_validation_split", False):
            return
        features, labels, count = [], [], 0
        for images, targets, *_ in datamodule.val_dataloader():
            features.append(pl_module.embed(to_float_images(images.to(pl_module.device))).float().cpu())
            labels.append(targets)
            count += len(targets)
            if count >= self.max_points:
                break
        plot = tsne_plot(torch.cat(features)[: self.max_points], torch.cat(labels)[: self.max_points])
        log_image_grid(
            pl_module,
            self.key,
            plot[None],
            caption=f"t-SNE of validation features, epoch {trainer.current_epoch}",
        )
