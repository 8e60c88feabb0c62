"""Batched, on-device input transforms of the pretext tasks. No Lightning, no dataset knowledge.

- ``rotation_batch``: every image at 0/90/180/270 degrees with its rotation label.
  - [0] RotNet, Gidaris et al., 2018, https://arxiv.org/abs/1803.07728
- ``hamming_permutation_set`` and ``jigsaw_tiles``: a 3x3 puzzle with a random gap/jitter
  per tile, per-tile normalisation, and a permutation set of maximal minimum Hamming distance.
  - [1] Jigsaw, Noroozi & Favaro, 2016, https://arxiv.org/abs/1603.09246
- ``rgb_to_lab`` / ``lab_to_rgb``: CIE L*a*b* (D65, 2 degree observer) on the device.
  - [2] Colorization, Zhang et al., 2016, https://arxiv.org/abs/1603.08511
- ``corrupt``: masking noise and additive Gaussian noise.
  - [3] Denoising autoencoders, Vincent et al., 2008, https://doi.org/10.1145/1390156.1390294
"""

from __future__ import annotations

import functools
import itertools

import kornia.color
import numpy as np
import torch

# Noroozi & Favaro cut 64-px tiles from 75-px cells (a 225-px crop): the gap and jitter are
# the remaining 11/75 of a cell, kept as a fraction so they scale with the tile size.
JIGSAW_TILE_FRACTION = 64 / 75
# The smallest tile a small convnet (two 2x poolings) can still see anything in.
MIN_TILE_SIZE = 4


def rotation_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All four rotations of every image, with the rotation index as the label.

    Args:
        images: Shape: (batch_size, C, H, H), square.

    Returns:
        rotated: Shape: (4 * batch_size, C, H, H), ordered rotation-major (all images at 0
            degrees, then all at 90, ...).
        labels: Shape: (4 * batch_size,), int64 in {0, 1, 2, 3} = k * 90 degrees counter-clockwise.
    """
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotation needs square images of shape (B, C, H, H); got {tuple(images.shape)}")
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
    labels = torch.arange(4, device=images.device).repeat_interleave(len(images))
    return rotated, labels


@functools.lru_cache(maxsize=8)
def _hamming_permutation_set(num_tiles: int, num_permutations: int, seed: int) -> np.ndarray:
    candidates = np.array(list(itertools.permutations(range(num_tiles))), dtype=np.int8)  # (num_tiles!, T)
    if num_permutations > len(candidates):
        raise ValueError(
            f"num_permutations={num_permutations} but only {len(candidates)} permutations of "
            f"{num_tiles} tiles exist; choose num_permutations <= {len(candidates)}."
        )
    columns = np.ascontiguousarray(candidates.T)  # (T, num_tiles!): one comparison per position

    def hamming(permutation: np.ndarray) -> np.ndarray:
        same = np.zeros(columns.shape[1], dtype=np.int64)
        for position, tile in enumerate(permutation):
            same += columns[position] == tile
        return num_tiles - same  # (num_tiles!,)

    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(candidates)))]
    min_distance = hamming(candidates[chosen[0]])  # each candidate's distance to its nearest chosen one
    sum_distance = min_distance.copy()
    min_distance[chosen[0]] = -1
    for _ in range(num_permutations - 1):
        # maximise the minimum Hamming distance; ties go to the largest total distance (the
        # criterion of Noroozi's Algorithm 1), then to a seeded random candidate
        score = min_distance * (num_tiles * num_permutations + 1) + sum_distance
        best = np.flatnonzero(score == score.max())
        pick = int(best[rng.integers(len(best))])
        chosen.append(pick)
        distance = hamming(candidates[pick])
        np.minimum(min_distance, distance, out=min_distance)
        sum_distance += distance
        min_distance[chosen] = -1
    return candidates[chosen].astype(np.int64)


def hamming_permutation_set(num_permutations: int, num_tiles: int = 9, seed: int = 0) -> torch.Tensor:
    """``num_permutations`` permutations of ``num_tiles`` tiles, chosen greedily to maximise
    the minimum Hamming distance between any two (Noroozi & Favaro, Algorithm 1).

    Deterministic for a given ``seed``. The first permutation is drawn at random; each next
    one is the candidate (out of all ``num_tiles!``) farthest from its nearest chosen one.

    Returns:
        Shape: (num_permutations, num_tiles), int64; row ``p`` lists, for each puzzle position,
        which tile is put there.
    """
    if num_permutations < 2:
        raise ValueError(
            f"num_permutations must be >= 2 (it is a classification task); got {num_permutations}"
        )
    if not 2 <= num_tiles <= 10:
        raise ValueError(
            f"num_tiles must be in [2, 10] (all num_tiles! candidates are scanned); got {num_tiles}"
        )
    return torch.from_numpy(_hamming_permutation_set(num_tiles, num_permutations, seed).copy())


def jigsaw_geometry(image_size: int, grid_size: int = 3) -> tuple[int, int]:
    """``(cell_size, tile_size)`` of a ``grid_size`` x ``grid_size`` puzzle of ``image_size`` images.

    Raises ``ValueError`` naming the smallest image that works when the cells would be smaller
    than ``MIN_TILE_SIZE``.
    """
    cell_size = image_size // grid_size
    if cell_size < MIN_TILE_SIZE:
        raise ValueError(
            f"image_size={image_size} is too small for a {grid_size}x{grid_size} jigsaw: each cell would be "
            f"{cell_size} px but tiles need at least {MIN_TILE_SIZE} px. Use images of at least "
            f"{grid_size * MIN_TILE_SIZE} px (e.g. data.image_size=16 for digits) or a smaller grid_size."
        )
    tile_size = max(MIN_TILE_SIZE, int(cell_size * JIGSAW_TILE_FRACTION))
    return cell_size, tile_size


def jigsaw_tiles(
    images: torch.Tensor,
    permutations: torch.Tensor,
    permutation_index: torch.Tensor,
    grid_size: int = 3,
    jitter: bool = True,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Cut every image into a shuffled ``grid_size`` x ``grid_size`` puzzle.

    The grid is placed at a random offset inside the image; each tile is cut at a random
    position inside its cell (the gap/jitter that stops the network from matching edges),
    then standardised by its own mean and std (so low-level statistics do not give the
    position away). Tiles are then reordered: puzzle position ``i`` receives tile
    ``permutations[permutation_index][i]``.

    Args:
        images: Shape: (batch_size, C, H, H), float.
        permutations: Shape: (num_permutations, grid_size**2), int64.
        permutation_index: Shape: (batch_size,), int64, the permutation applied to each image.
        jitter: random grid offset and tile positions; without it, centred tiles.

    Returns:
        Shape: (batch_size, grid_size**2, C, tile_size, tile_size).
    """
    batch_size, channels, height, width = images.shape
    if height != width:
        raise ValueError(f"jigsaw needs square images; got {height}x{width}")
    num_tiles = grid_size * grid_size
    if permutations.shape[1] != num_tiles:
        raise ValueError(
            f"permutations have {permutations.shape[1]} entries but the grid has {num_tiles} tiles"
        )
    cell_size, tile_size = jigsaw_geometry(height, grid_size)
    device = images.device
    slack_grid = height - grid_size * cell_size
    slack_tile = cell_size - tile_size
    cell_start = torch.arange(grid_size, device=device) * cell_size  # (grid_size,)
    rows = cell_start.repeat_interleave(grid_size).expand(batch_size, num_tiles)  # (B, T)
    cols = cell_start.repeat(grid_size).expand(batch_size, num_tiles)  # (B, T)
    if jitter:
        origin = torch.randint(0, slack_grid + 1, (batch_size, 2, 1), device=device)  # (B, 2, 1)
        offset = torch.randint(0, slack_tile + 1, (batch_size, 2, num_tiles), device=device)  # (B, 2, T)
    else:
        origin = torch.full((batch_size, 2, 1), slack_grid // 2, device=device)
        offset = torch.full((batch_size, 2, num_tiles), slack_tile // 2, device=device)
    rows = rows + origin[:, 0] + offset[:, 0]  # top-left corner of each tile: (B, T)
    cols = cols + origin[:, 1] + offset[:, 1]
    span = torch.arange(tile_size, device=device)
    row_index = (rows[..., None] + span)[..., :, None]  # (B, T, tile, 1)
    col_index = (cols[..., None] + span)[..., None, :]  # (B, T, 1, tile)
    batch_index = torch.arange(batch_size, device=device)[:, None, None, None]
    tiles = images.permute(0, 2, 3, 1)[batch_index, row_index, col_index]  # (B, T, tile, tile, C)
    tiles = tiles.permute(0, 1, 4, 2, 3)  # (B, T, C, tile, tile)
    mean = tiles.mean(dim=(2, 3, 4), keepdim=True)
    std = tiles.std(dim=(2, 3, 4), keepdim=True, unbiased=False)
    tiles = (tiles - mean) / (std + eps)
    order = permutations[permutation_index]  # (B, T)
    return tiles[torch.arange(batch_size, device=device)[:, None], order]


def rgb_to_lab(images: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] -> CIE L*a*b* (D65, 2 degree observer), computed in float32.

    Shape: (batch_size, 3, H, W) -> (batch_size, 3, H, W) with L in [0, 100], a/b in about [-128, 127].
    """
    with torch.autocast(images.device.type, enabled=False):
        return kornia.color.rgb_to_lab(images.float().clamp(0, 1))


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* -> sRGB in [0, 1] (out-of-gamut colours clipped). Shape: (batch_size, 3, H, W)."""
    with torch.autocast(lab.device.type, enabled=False):
        return kornia.color.lab_to_rgb(lab.float(), clip=True)


def corrupt(
    images: torch.Tensor, mask_fraction: float = 0.25, noise_std: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masking noise (each pixel zeroed in all channels with probability ``mask_fraction``),
    then additive isotropic Gaussian noise of std ``noise_std``.

    Args:
        images: Shape: (batch_size, C, H, W), float in [0, 1].

    Returns:
        corrupted: same shape as ``images`` (not clipped: Gaussian noise may leave [0, 1]).
        keep: Shape: (batch_size, 1, H, W), 1 where the pixel was kept, 0 where masked.
    """
    if not 0.0 <= mask_fraction < 1.0:
        raise ValueError(f"mask_fraction must be in [0, 1); got {mask_fraction}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0; got {noise_std}")
    batch_size, _, height, width = images.shape
    keep = (torch.rand(batch_size, 1, height, width, device=images.device) >= mask_fraction).to(images.dtype)
    corrupted = images * keep
    if noise_std > 0:
        corrupted = corrupted + noise_std * torch.randn_like(images)
    return corrupted, keep


def tile_grid_image(tiles: torch.Tensor, grid_size: int = 3, pad: int = 1) -> torch.Tensor:
    """Puzzles back into images for display: (B, T, C, t, t) -> (B, C, g*(t+pad)-pad, same), in [0, 1]."""
    batch_size, num_tiles, channels, tile, _ = tiles.shape
    low = tiles.amin(dim=(2, 3, 4), keepdim=True)
    high = tiles.amax(dim=(2, 3, 4), keepdim=True)
    tiles = (tiles - low) / (high - low).clamp_min(1e-6)
    tiles = torch.nn.functional.pad(tiles, (0, pad, 0, pad), value=1.0)
    side = grid_size * (tile + pad)
    grid = tiles.view(batch_size, grid_size, grid_size, channels, tile + pad, tile + pad)
    grid = grid.permute(0, 3, 1, 4, 2, 5).reshape(batch_size, channels, side, side)
    return grid[..., : side - pad, : side - pad]
