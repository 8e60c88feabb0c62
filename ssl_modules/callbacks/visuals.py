"""Log image grids to whichever logger the Trainer has: W&B, TensorBoard, or PNG files."""

from __future__ import annotations

import os

import torch
import torchvision


def log_image_grid(
    module: object,
    key: str,
    images: torch.Tensor,
    caption: str | None = None,
    max_images: int = 32,
    nrow: int = 8,
) -> None:
    """Log ``images`` (float in [0, 1], shape (N, C, H, W)) as one grid.

    With a ``WandbLogger`` this is ``logger.log_image``; with TensorBoard ``add_image``; with any
    other logger (CSV) the grid is saved as a PNG under ``<log_dir>/images/``. Only rank 0 logs.
    """
    trainer = getattr(module, "_trainer", None)
    if trainer is None or trainer.sanity_checking:
        return
    grid = torchvision.utils.make_grid(
        images[:max_images].detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=1, pad_value=1.0
    )
    step = trainer.global_step
    for logger in trainer.loggers:
        name = type(logger).__name__
        if name == "WandbLogger":
            if trainer.global_rank == 0:
                logger.log_image(key=key, images=[grid], caption=[caption] if caption else None, step=step)
            return
        if name == "TensorBoardLogger":
            if trainer.global_rank == 0:
                logger.experiment.add_image(key, grid, global_step=step)
            return
    if not trainer.loggers:
        return  # logging is off: write no files
    # trainer.log_dir is a collective (broadcast) under DDP: every rank asks, rank 0 writes
    log_dir = trainer.log_dir or trainer.default_root_dir
    if log_dir and trainer.global_rank == 0:
        path = os.path.join(log_dir, "images", f"{key.replace('/', '_')}_step{step}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torchvision.utils.save_image(grid, path)
