"""Pretext input transforms: rotations, jigsaw puzzles and permutation sets, Lab colour, noise."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ssl_modules.augment.pretext import (
    MIN_TILE_SIZE,
    corrupt,
    hamming_permutation_set,
    jigsaw_geometry,
    jigsaw_tiles,
    lab_to_rgb,
    rgb_to_lab,
    rotation_batch,
    tile_grid_image,
)

# -- rotation ---------------------------------------------------------------------------


def test_rotation_batch_matches_plain_index_rotation():
    images = torch.rand(3, 2, 5, 5)
    rotated, labels = rotation_batch(images)
    assert rotated.shape == (12, 2, 5, 5)
    assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    side = 5
    for k in range(4):
        for n in range(3):
            # counter-clockwise by k * 90 degrees, written out pixel by pixel
            expected = torch.empty(2, side, side)
            for i in range(side):
                for j in range(side):
                    si, sj = i, j
                    for _ in range(k):  # one ccw quarter turn: out[i, j] = in[j, side - 1 - i]
                        si, sj = sj, side - 1 - si
                    expected[:, i, j] = images[n, :, si, sj]
            torch.testing.assert_close(rotated[k * 3 + n], expected)


def test_rotation_batch_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        rotation_batch(torch.rand(2, 1, 4, 5))


# -- permutation set --------------------------------------------------------------------


def _min_pairwise_hamming(perms: torch.Tensor) -> int:
    distance = (perms[:, None] != perms[None]).sum(-1)
    distance.fill_diagonal_(perms.shape[1] + 1)
    return int(distance.min())


def test_permutation_set_is_deterministic_valid_and_distinct():
    first = hamming_permutation_set(30, seed=3)
    again = hamming_permutation_set(30, seed=3)
    other = hamming_permutation_set(30, seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.shape == (30, 9) and first.dtype == torch.int64
    assert all(sorted(row.tolist()) == list(range(9)) for row in first)
    assert len({tuple(row.tolist()) for row in first}) == 30


def test_permutation_set_reaches_the_optimal_minimum_distance_on_four_tiles():
    # 4 permutations of 4 tiles can be pairwise different in every position (a Latin square):
    # the greedy max-min choice must find distance 4; a brute-force search confirms 4 is the best.
    perms = hamming_permutation_set(4, num_tiles=4, seed=0)
    assert _min_pairwise_hamming(perms) == 4
    candidates = torch.tensor(list(itertools.permutations(range(4))))
    best = max(_min_pairwise_hamming(candidates[list(c)]) for c in itertools.combinations(range(24), 4))
    assert best == 4


def test_permutation_set_beats_random_permutations():
    perms = hamming_permutation_set(100, seed=0)
    generator = torch.Generator().manual_seed(0)
    random_set = torch.stack([torch.randperm(9, generator=generator) for _ in range(100)])
    assert _min_pairwise_hamming(perms) >= 6 > _min_pairwise_hamming(random_set)


def test_permutation_set_argument_errors():
    with pytest.raises(ValueError, match="num_permutations"):
        hamming_permutation_set(1)
    with pytest.raises(ValueError, match="only 6 permutations"):
        hamming_permutation_set(7, num_tiles=3)


# -- jigsaw tiles -----------------------------------------------------------------------


def test_jigsaw_geometry_scales_and_fails_clearly_on_small_images():
    assert jigsaw_geometry(16) == (5, 4)
    assert jigsaw_geometry(32) == (10, 8)
    assert jigsaw_geometry(225) == (75, 64)  # the paper's numbers
    with pytest.raises(ValueError, match=r"image_size=11 is too small.*at least 12 px"):
        jigsaw_geometry(11)
    assert jigsaw_geometry(3 * MIN_TILE_SIZE)[1] == MIN_TILE_SIZE


def _normalised(tile: torch.Tensor) -> torch.Tensor:
    return (tile - tile.mean()) / (tile.std(unbiased=False) + 1e-5)


def test_jigsaw_tiles_without_jitter_are_centred_crops_in_permuted_order():
    images = torch.rand(2, 3, 16, 16)
    perms = hamming_permutation_set(10, seed=0)
    index = torch.tensor([0, 7])
    tiles = jigsaw_tiles(images, perms, index, jitter=False)
    assert tiles.shape == (2, 9, 3, 4, 4)
    # 16 px: cells of 5 px starting at 0 (slack 1, centred -> 0), tiles of 4 px at offset 0
    for n in range(2):
        for position in range(9):
            source = int(perms[index[n], position])
            row, col = divmod(source, 3)
            crop = images[n, :, row * 5 : row * 5 + 4, col * 5 : col * 5 + 4]
            torch.testing.assert_close(tiles[n, position], _normalised(crop), atol=1e-4, rtol=1e-4)


def test_jigsaw_tiles_with_jitter_stay_inside_their_cell():
    torch.manual_seed(0)
    images = torch.rand(4, 1, 32, 32)  # cells of 10 px, tiles of 8 px, grid slack 2
    perms = hamming_permutation_set(5, seed=0)
    index = torch.arange(4) % 5
    tiles = jigsaw_tiles(images, perms, index)
    offsets_seen = set()
    for n in range(4):
        for position in range(9):
            row, col = divmod(int(perms[index[n], position]), 3)
            matches = [
                (dr, dc)
                for dr in range(0, 2 + 2 + 1)  # grid origin (0..2) + tile offset (0..2)
                for dc in range(0, 2 + 2 + 1)
                if torch.allclose(
                    tiles[n, position],
                    _normalised(
                        images[n, :, row * 10 + dr : row * 10 + dr + 8, col * 10 + dc : col * 10 + dc + 8]
                    ),
                    atol=1e-4,
                )
            ]
            assert len(matches) == 1
            offsets_seen.add(matches[0])
        # per-tile normalisation
        torch.testing.assert_close(tiles[n].mean(dim=(1, 2, 3)), torch.zeros(9), atol=1e-5, rtol=0)
    assert len(offsets_seen) > 1  # the jitter moves the tiles


def test_tile_grid_image_shape():
    tiles = torch.randn(2, 9, 3, 4, 4)
    grid = tile_grid_image(tiles)
    assert grid.shape == (2, 3, 14, 14)
    assert grid.min() >= 0 and grid.max() <= 1


# -- Lab --------------------------------------------------------------------------------


def _lab_reference(rgb: np.ndarray) -> np.ndarray:
    """sRGB (N, 3) in [0, 1] -> CIE L*a*b*, D65 / 2 degrees: the formulas written plainly."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array(
        [
            [0.4124564, 0.3575761, 0.1804375],
            [0.2126729, 0.7151522, 0.0721750],
            [0.0193339, 0.1191920, 0.9503041],
        ]
    )
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    epsilon, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > epsilon, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


def test_rgb_to_lab_matches_the_cie_formulas():
    rgb = torch.rand(200, 3, dtype=torch.float64).float()
    rgb[:4] = torch.tensor([[0.0, 0, 0], [1, 1, 1], [0.01, 0.02, 0.03], [0.5, 0.5, 0.5]])
    lab = rgb_to_lab(rgb.T.reshape(1, 3, 20, 10)).reshape(3, -1).T
    reference = _lab_reference(rgb.double().numpy())
    np.testing.assert_allclose(lab.numpy(), reference, atol=0.05)


def test_rgb_to_lab_known_values():
    colours = torch.tensor([[1.0, 1, 1], [0, 0, 0], [1, 0, 0]]).T.reshape(1, 3, 1, 3)
    lab = rgb_to_lab(colours)[0, :, 0].T
    torch.testing.assert_close(lab[0], torch.tensor([100.0, 0, 0]), atol=0.05, rtol=0)
    torch.testing.assert_close(lab[1], torch.tensor([0.0, 0, 0]), atol=0.05, rtol=0)
    torch.testing.assert_close(lab[2], torch.tensor([53.24, 80.09, 67.20]), atol=0.05, rtol=0)  # sRGB red


def test_lab_round_trip_and_bfloat16_autocast():
    rgb = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-3, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lab = rgb_to_lab(rgb)
    assert lab.dtype == torch.float32
    torch.testing.assert_close(lab, rgb_to_lab(rgb))


# -- corruption -------------------------------------------------------------------------


def test_corrupt_masks_the_requested_fraction_of_pixels_in_all_channels():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 32, 32) + 0.1
    corrupted, keep = corrupt(images, mask_fraction=0.3, noise_std=0.0)
    assert keep.shape == (8, 1, 32, 32)
    assert abs(1 - keep.mean().item() - 0.3) < 0.02
    masked = (corrupted == 0).all(dim=1, keepdim=True)
    assert torch.equal(masked, keep == 0)
    torch.testing.assert_close(corrupted, images * keep)


def test_corrupt_gaussian_noise_has_the_requested_std():
    torch.manual_seed(0)
    images = torch.rand(8, 1, 32, 32)
    corrupted, keep = corrupt(images, mask_fraction=0.0, noise_std=0.2)
    assert bool(keep.all())
    assert abs((corrupted - images).std().item() - 0.2) < 0.01


def test_corrupt_argument_errors():
    with pytest.raises(ValueError, match="mask_fraction"):
        corrupt(torch.rand(1, 1, 4, 4), mask_fraction=1.0)
    with pytest.raises(ValueError, match="noise_std"):
        corrupt(torch.rand(1, 1, 4, 4), noise_std=-0.1)


def test_annealed_mean_is_the_mean_of_the_temperature_sharpened_distribution() -> None:
    # Zhang et al., 2016, eq. 5: H(Z) = E[f_T(Z)], f_T(z) = exp(log z / T) / sum_q exp(log z_q / T)
    from ssl_modules.losses.pretext import annealed_mean

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3, 3)
    centres = torch.randn(5, 2) * 50
    z = logits.softmax(dim=1)
    for temperature in (1.0, 0.38):
        sharpened = (z.log() / temperature).exp()
        sharpened = sharpened / sharpened.sum(dim=1, keepdim=True)
        # ab at each pixel: sum over bins q of p_q * centre_q
        expected = (sharpened[:, None] * centres.T[None, :, :, None, None]).sum(dim=2)
        assert torch.allclose(annealed_mean(logits, centres, temperature), expected, atol=1e-4)
