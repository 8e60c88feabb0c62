"""MAE's masking, patchify and pixel loss against the paper's definitions written out plainly.

- [0] MAE, He et al., 2022, https://arxiv.org/abs/2111.06377
"""

from __future__ import annotations

import math

import pytest
import torch

from ssl_modules.losses.masked_modeling import (
    denormalize_patches,
    mae_loss,
    normalize_patches,
    patchify,
    random_patch_masking,
    unpatchify,
)


# -- masking --------------------------------------------------------------------------
@pytest.mark.parametrize("num_patches", [4, 16, 49, 64, 196])
def test_masking_ratio_is_exact(num_patches):
    batch_size = 5
    keep_index, mask, restore_index = random_patch_masking(batch_size, num_patches, 0.75)
    num_kept = int(num_patches * 0.25)  # the paper's len_keep
    assert keep_index.shape == (batch_size, num_kept)
    assert mask.shape == restore_index.shape == (batch_size, num_patches)
    assert torch.equal(mask.sum(1), torch.full((batch_size,), float(num_patches - num_kept)))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_kept_patches_are_the_visible_ones_and_distinct():
    keep_index, mask, _ = random_patch_masking(6, 64, 0.75, generator=torch.Generator().manual_seed(0))
    for b in range(6):
        kept = keep_index[b].tolist()
        assert len(set(kept)) == len(kept)
        visible = [j for j in range(64) if mask[b, j] == 0]
        assert sorted(kept) == visible


def test_masks_differ_per_image_and_follow_the_generator():
    keep_index, mask, _ = random_patch_masking(8, 64, 0.75, generator=torch.Generator().manual_seed(1))
    distinct_rows = {tuple(row.tolist()) for row in mask}
    assert len(distinct_rows) == 8  # each image its own mask (one shared mask would give 1)
    again = random_patch_masking(8, 64, 0.75, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], keep_index) and torch.equal(again[1], mask)
    other = random_patch_masking(8, 64, 0.75, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(other[1], mask)


def test_keep_and_restore_indices_are_inverse_permutations():
    batch_size, num_patches, dim = 4, 16, 3
    keep_index, mask, restore_index = random_patch_masking(
        batch_size, num_patches, 0.75, generator=torch.Generator().manual_seed(3)
    )
    num_kept = keep_index.shape[1]
    tokens = torch.randn(batch_size, num_patches, dim)
    for b in range(batch_size):
        assert sorted(restore_index[b].tolist()) == list(range(num_patches))  # a permutation
        for position, patch_id in enumerate(keep_index[b].tolist()):
            assert restore_index[b, patch_id] == position  # kept patch j sits at position j
        for patch_id in range(num_patches):
            assert (restore_index[b, patch_id] < num_kept) == (mask[b, patch_id] == 0)
    # MAE's decoder input: [visible tokens, mask tokens] put back in patch order with restore_index
    visible = tokens.gather(1, keep_index[..., None].expand(-1, -1, dim))  # (B, num_kept, dim)
    filler = torch.full((batch_size, num_patches - num_kept, dim), float("nan"))
    restored = torch.cat([visible, filler], 1).gather(1, restore_index[..., None].expand(-1, -1, dim))
    for b in range(batch_size):
        for patch_id in range(num_patches):
            if mask[b, patch_id] == 0:
                assert torch.equal(restored[b, patch_id], tokens[b, patch_id])
            else:
                assert torch.isnan(restored[b, patch_id]).all()


def test_masking_refuses_bad_arguments():
    with pytest.raises(ValueError, match="mask_ratio"):
        random_patch_masking(2, 16, 1.0)
    with pytest.raises(ValueError, match="no visible patch"):
        random_patch_masking(2, 2, 0.75)


# -- patchify -------------------------------------------------------------------------
def test_patchify_matches_the_pixel_layout_written_out():
    batch_size, channels, height, width, patch = 2, 3, 8, 12, 4
    images = torch.randn(batch_size, channels, height, width)
    patches = patchify(images, patch)
    cols = width // patch
    assert patches.shape == (batch_size, (height // patch) * cols, patch * patch * channels)
    for b in range(batch_size):
        for row in range(height // patch):
            for col in range(cols):
                for i in range(patch):
                    for j in range(patch):
                        for c in range(channels):
                            # row-major over the grid (a ViT's token order); (i, j, c) inside a patch
                            value = patches[b, row * cols + col, (i * patch + j) * channels + c]
                            assert value == images[b, c, row * patch + i, col * patch + j]


@pytest.mark.parametrize(
    ("channels", "height", "width", "patch"), [(1, 16, 16, 4), (3, 8, 12, 2), (3, 32, 32, 8)]
)
def test_patchify_unpatchify_round_trip(channels, height, width, patch):
    images = torch.randn(2, channels, height, width)
    grid = (height // patch, width // patch)
    assert torch.equal(unpatchify(patchify(images, patch), patch, channels, grid_size=grid), images)


def test_patchify_refuses_a_patch_that_does_not_divide_the_image():
    with pytest.raises(ValueError, match="must divide"):
        patchify(torch.zeros(1, 1, 10, 10), 4)


# -- loss -----------------------------------------------------------------------------
def normalise_patch_loop(values: list[float], eps: float) -> list[float]:
    """(x - mean) / sqrt(var + eps) with the unbiased variance (the paper's code: ``target.var``)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return [(v - mean) / math.sqrt(var + eps) for v in values]


def mae_loss_loop(predictions, images, mask, patch, norm_pix_loss, eps=1e-6) -> float:
    """The loss written out: per-patch MSE, averaged over masked patches only."""
    batch_size, channels, height, width = images.shape
    cols = width // patch
    total, count = 0.0, 0.0
    for b in range(batch_size):
        for row in range(height // patch):
            for col in range(cols):
                index = row * cols + col
                if mask[b, index] == 0:
                    continue
                target = [
                    float(images[b, c, row * patch + i, col * patch + j])
                    for i in range(patch)
                    for j in range(patch)
                    for c in range(channels)
                ]
                if norm_pix_loss:
                    target = normalise_patch_loop(target, eps)
                error = sum((float(p) - t) ** 2 for p, t in zip(predictions[b, index], target)) / len(target)
                total += error * float(mask[b, index])
                count += float(mask[b, index])
    return total / count


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_mae_loss_matches_the_formula_written_out(norm_pix_loss):
    torch.manual_seed(0)
    batch_size, channels, size, patch = 3, 2, 8, 4
    images = torch.rand(batch_size, channels, size, size, dtype=torch.float64) * 3 + 1  # mean far from 0
    num_patches = (size // patch) ** 2
    predictions = torch.randn(batch_size, num_patches, patch * patch * channels, dtype=torch.float64)
    _, mask, _ = random_patch_masking(
        batch_size, num_patches, 0.5, generator=torch.Generator().manual_seed(4)
    )
    loss = mae_loss(predictions, images, mask, patch, norm_pix_loss=norm_pix_loss)
    expected = mae_loss_loop(predictions, images, mask, patch, norm_pix_loss)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_per_patch_normalisation_matches_the_formula():
    torch.manual_seed(1)
    patches = torch.randn(2, 5, 12, dtype=torch.float64) * 4 + 7
    normalised = normalize_patches(patches)
    for b in range(2):
        for n in range(5):
            expected = normalise_patch_loop(patches[b, n].tolist(), 1e-6)
            assert normalised[b, n].tolist() == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # the inverse used for the visuals gives the pixels back
    assert torch.allclose(denormalize_patches(normalised, patches), patches, atol=1e-9)


def test_norm_pix_loss_closed_form_constant_patches():
    # a constant patch normalises to 0 everywhere (its variance is 0 and eps keeps it finite), so a
    # zero prediction has zero loss whatever the patch's value; without normalisation it is value^2
    images = torch.full((1, 1, 4, 4), 3.0)
    predictions = torch.zeros(1, 4, 4)
    mask = torch.ones(1, 4)
    assert mae_loss(predictions, images, mask, 2, norm_pix_loss=True).item() == 0.0
    assert mae_loss(predictions, images, mask, 2, norm_pix_loss=False).item() == pytest.approx(9.0)


def test_loss_counts_masked_patches_only():
    torch.manual_seed(2)
    images = torch.rand(4, 1, 16, 16)
    _, mask, _ = random_patch_masking(4, 16, 0.75, generator=torch.Generator().manual_seed(5))
    predictions = torch.randn(4, 16, 16)
    reference = mae_loss(predictions, images, mask, 4)
    visible = (mask == 0)[..., None]
    changed_visible = torch.where(visible, predictions + 100.0, predictions)
    assert mae_loss(changed_visible, images, mask, 4).item() == pytest.approx(reference.item(), rel=1e-6)
    changed_masked = torch.where(visible, predictions, predictions + 1.0)
    assert mae_loss(changed_masked, images, mask, 4).item() != pytest.approx(reference.item(), rel=1e-3)
    # the gradient reaches masked patches only
    predictions.requires_grad_(True)
    mae_loss(predictions, images, mask, 4).backward()
    assert (predictions.grad[visible.expand_as(predictions)] == 0).all()
    assert (predictions.grad[~visible.expand_as(predictions)] != 0).any()


def test_loss_is_a_mean_over_masked_patches_not_a_sum():
    # the same per-patch error on every patch gives that error, whatever the number of masked patches
    images = torch.zeros(2, 1, 8, 8)
    predictions = torch.full((2, 4, 16), 2.0)
    for ratio in (0.25, 0.5, 0.75):
        _, mask, _ = random_patch_masking(2, 4, ratio)
        assert mae_loss(predictions, images, mask, 4, norm_pix_loss=False).item() == pytest.approx(4.0)


def test_loss_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        mae_loss(torch.zeros(1, 4, 8), torch.zeros(1, 1, 8, 8), torch.ones(1, 4), 4)
    with pytest.raises(ValueError, match="mask"):
        mae_loss(torch.zeros(1, 4, 16), torch.zeros(1, 1, 8, 8), torch.ones(1, 3), 4)
