"""Masked image modelling: random patch masking, (un)patchify, and the MAE pixel loss.

- [0] Masked Autoencoders Are Scalable Vision Learners (MAE), He et al., 2022,
  https://arxiv.org/abs/2111.06377

Patches are numbered row-major over the ``(H / patch) x (W / patch)`` grid, the order of a ViT's
patch tokens (its patch-embedding convolution output flattened over ``(h, w)``); each patch is
flattened as ``(patch_row, patch_col, channel)``, as in the paper's code. Plain functions: no
Lightning.
"""

from __future__ import annotations

import math

import torch


def num_kept_patches(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per image: ``int(num_patches * (1 - mask_ratio))`` (MAE: 49 of 196 at 75 %)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1) (MAE: 0.75); got {mask_ratio}")
    kept = int(num_patches * (1.0 - mask_ratio))
    if kept < 1:
        raise ValueError(
            f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches}; "
            "lower mask_ratio or use a smaller patch (more patches per image)."
        )
    return kept


def random_patch_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float = 0.75,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-image random masking: shuffle the patches of each image independently (argsort
    of uniform noise) and keep the first ``int(num_patches * (1 - mask_ratio))``.

    Args:
        batch_size: images in the batch; each gets its own mask.
        num_patches: patches per image ``N``.
        mask_ratio: fraction of patches removed (0.75 in the paper).
        generator: the random generator (default: the global one, on ``device``).
        device: where the indices live.

    Returns:
        keep_index: the visible patches of each image, in shuffled order.
            Shape: (batch_size, num_kept), int64.
        mask: 1 where a patch is masked (removed), 0 where visible. Shape: (batch_size, N), float.
        restore_index: ``restore_index[b, j]`` is the position of patch ``j`` in image ``b``'s
            shuffled order (the inverse permutation), to put ``[visible, mask tokens]`` back in
            patch order. Shape: (batch_size, N), int64.
    """
    if batch_size < 1 or num_patches < 1:
        raise ValueError(f"batch_size and num_patches must be >= 1; got {batch_size}, {num_patches}")
    num_kept = num_kept_patches(num_patches, mask_ratio)
    if generator is not None and device is None:
        device = generator.device
    noise = torch.rand(batch_size, num_patches, generator=generator, device=device)  # (B, N)
    shuffle_index = noise.argsort(dim=1)  # (B, N): patch at each shuffled position
    restore_index = shuffle_index.argsort(dim=1)  # (B, N): shuffled position of each patch
    keep_index = shuffle_index[:, :num_kept]  # (B, num_kept)
    mask = torch.ones(batch_size, num_patches, device=noise.device)
    mask[:, :num_kept] = 0
    mask = mask.gather(1, restore_index)  # (B, N), back in patch order
    return keep_index, mask, restore_index


def _check_patch(images: torch.Tensor, patch: int) -> None:
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (batch, channels, H, W); got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if patch < 1 or height % patch or width % patch:
        raise ValueError(
            f"patch size {patch} must divide the image size {height}x{width}; "
            "pick a patch size that divides it (or resize the images)."
        )


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Cut images into non-overlapping ``patch x patch`` squares, row-major over the grid.

    Shape: (batch_size, C, H, W) -> (batch_size, (H / patch) * (W / patch), patch * patch * C).
    """
    _check_patch(images, patch)
    batch_size, channels, height, width = images.shape
    rows, cols = height // patch, width // patch
    grid = images.reshape(batch_size, channels, rows, patch, cols, patch)
    grid = grid.permute(0, 2, 4, 3, 5, 1)  # (B, rows, cols, patch, patch, C)
    return grid.reshape(batch_size, rows * cols, patch * patch * channels)


def unpatchify(
    patches: torch.Tensor, patch: int, channels: int, grid_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """The inverse of ``patchify``.

    Args:
        patches: Shape: (batch_size, N, patch * patch * channels).
        grid_size: ``(rows, cols)`` of patches; default a square grid ``sqrt(N) x sqrt(N)``.

    Returns:
        Shape: (batch_size, channels, rows * patch, cols * patch).
    """
    batch_size, num_patches, dim = patches.shape
    if dim != patch * patch * channels:
        raise ValueError(
            f"patches of width {dim} do not hold {patch}x{patch} patches of {channels} channel(s) "
            f"({patch * patch * channels} values); check patch and channels."
        )
    if grid_size is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"{num_patches} patches are not a square grid; pass grid_size=(rows, cols).")
        grid_size = (side, side)
    rows, cols = grid_size
    if rows * cols != num_patches:
        raise ValueError(f"grid_size {grid_size} does not hold {num_patches} patches")
    grid = patches.reshape(batch_size, rows, cols, patch, patch, channels)
    grid = grid.permute(0, 5, 1, 3, 2, 4)  # (B, C, rows, patch, cols, patch)
    return grid.reshape(batch_size, channels, rows * patch, cols * patch)


def patch_statistics(patches: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and standard deviation ``sqrt(var + eps)`` over a patch's pixels and
    channels (the unbiased variance, as the paper's code computes it).

    Shape: (batch_size, N, D) -> two (batch_size, N, 1).
    """
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + eps).sqrt()
    return mean, std


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's normalised-pixel target: each patch minus its mean, divided by ``sqrt(var + eps)``.

    Shape: (batch_size, N, D) -> (batch_size, N, D).
    """
    mean, std = patch_statistics(patches, eps)
    return (patches - mean) / std


def denormalize_patches(
    predictions: torch.Tensor, target_patches: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Predictions in the normalised-pixel space -> pixels, with each target patch's own mean and
    std (for showing reconstructions; the statistics come from the true patch, as in the paper's
    visualisations).

    Shape: (batch_size, N, D), (batch_size, N, D) -> (batch_size, N, D).
    """
    mean, std = patch_statistics(target_patches, eps)
    return predictions * std + mean


def mae_loss(
    predictions: torch.Tensor,
    target_images: torch.Tensor,
    mask: torch.Tensor,
    patch: int,
    norm_pix_loss: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """MAE's reconstruction loss: the mean squared error per patch, averaged over the masked
    patches only (visible patches carry no loss).

    ``L = sum_{b,i} m_bi * mean_d (pred_bid - t_bid)^2 / sum_{b,i} m_bi`` with ``t`` the
    target's patches, normalised per patch (``normalize_patches``) when ``norm_pix_loss``
    (the paper's default: better representations).

    - [0] MAE, He et al., 2022, https://arxiv.org/abs/2111.06377 (section 3, "Reconstruction target")

    Args:
        predictions: the decoder's pixel predictions for every patch.
            Shape: (batch_size, N, patch * patch * C).
        target_images: the images to reconstruct (normalised with the data's mean/std, or not:
            the loss takes them as they are). Shape: (batch_size, C, H, W).
        mask: 1 where a patch was masked. Shape: (batch_size, N).
        patch: the patch side in pixels.
        norm_pix_loss: normalise each target patch by its mean and variance.
        eps: added to the variance.
    """
    target = patchify(target_images, patch).float()  # (B, N, patch * patch * C)
    if predictions.shape != target.shape:
        raise ValueError(
            f"predictions of shape {tuple(predictions.shape)} do not match the target's patches "
            f"{tuple(target.shape)} (batch, patches, patch * patch * channels)."
        )
    if mask.shape != target.shape[:2]:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} must be (batch, patches) = {tuple(target.shape[:2])}"
        )
    if norm_pix_loss:
        target = normalize_patches(target, eps)
    per_patch = (predictions.float() - target).pow(2).mean(dim=-1)  # (B, N)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
