"""Log image grids to whichever logger the Trainer has: W&B, TensorBoard, or PNG files."""

from __future__ import annotations

import os

import torch
import torchvision


def to_uint8_grid(images: torch.Tensor, max_images: int = 32, nrow: int = 8) -> torch.Tensor:
    """``images`` (float in [0, 1] or uint8, shape (N, C, H, W)) as one uint8 RGB grid, shape (3, H', W').

    Every logger gets these 0-255 values: wandb writes the array it is given as it is (a float
    grid in [0, 1] would become a PNG of pixel values 0 and 1, i.e. black), TensorBoard and PIL
    take uint8 without rescaling.
    """
    images = images[:max_images].detach().cpu()
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
    grid = torchvision.utils.make_grid(images, nrow=nrow, padding=1, pad_value=1.0)  # (3, H', W')
    return grid.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def log_image_grid(
    module: object,
    key: str,
    images: torch.Tensor,
    caption: str | None = None,
    max_images: int = 32,
    nrow: int = 8,
) -> None:
    """Log ``images`` (float in [0, 1] or uint8, shape (N, C, H, W)) as one grid.

    With a ``WandbLogger`` this is ``logger.log_image``; with TensorBoard ``add_image``; with any
    other logger (CSV) the grid is saved as a PNG under ``<log_dir>/images/``. The grid reaches
    every logger as uint8 0-255 (``to_uint8_grid``). Only rank 0 logs.
    """
    trainer = getattr(module, "_trainer", None)
    if trainer is None or trainer.sanity_checking:
        return
    grid = to_uint8_grid(images, max_images=max_images, nrow=nrow)
    step = trainer.global_step
    for logger in trainer.loggers:
        name = type(logger).__name__
        if name == "WandbLogger":
            if trainer.global_rank == 0:
                pixels = grid.permute(1, 2, 0).numpy()  # (H, W, 3) uint8, what wandb.Image expects
                logger.log_image(key=key, images=[pixels], caption=[caption] if caption else None, step=step)
            return
        if name == "TensorBoardLogger":
            if trainer.global_rank == 0:
                logger.experiment.add_image(key, grid, global_step=step)  # uint8: no rescaling
            return
    if not trainer.loggers:
        return  # logging is off: write no files
    # trainer.log_dir is a collective (broadcast) under DDP: every rank asks, rank 0 writes
    log_dir = trainer.log_dir or trainer.default_root_dir
    if log_dir and trainer.global_rank == 0:
        from PIL import Image

        path = os.path.join(log_dir, "images", f"{key.replace('/', '_')}_step{step}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
