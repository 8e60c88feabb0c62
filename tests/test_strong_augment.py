"""Strong augmentation (RandAugment + Cutout): channel-safe, batched, per-image randomness."""

from __future__ import annotations

import pytest
import torch

from ssl_modules.augment.strong import Cutout, RandAugment, randaugment_operations, strong_augmentation


def test_operation_pool_is_chosen_by_channel_count() -> None:
    assert "color" in randaugment_operations(3)
    assert "color" not in randaugment_operations(1)
    assert set(randaugment_operations(3)) - set(randaugment_operations(1)) == {"color"}
    with pytest.raises(ValueError):
        randaugment_operations(0)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", sorted(randaugment_operations(3)))
def test_every_operation_keeps_shape_and_range(name: str, channels: int) -> None:
    operations = randaugment_operations(channels)
    if name not in operations:
        pytest.skip(f"{name} is not in the {channels}-channel pool")
    images = torch.rand(5, channels, 16, 16)
    magnitude = torch.linspace(0, 1, 5)
    out = operations[name](images, magnitude)
    assert out.shape == images.shape
    assert out.min() >= 0 and out.max() <= 1
    assert torch.isfinite(out).all()


def test_operations_with_zero_magnitude_are_near_identity() -> None:
    images = torch.rand(4, 3, 16, 16)
    zero = torch.zeros(4)
    for name in (
        "brightness",
        "contrast",
        "color",
        "solarize",
        "rotate",
        "shear_x",
        "translate_y",
        "posterize",
    ):
        out = randaugment_operations(3)[name](images, zero)
        assert torch.allclose(out, images, atol=1e-5), name


@pytest.mark.parametrize("channels", [1, 3])
def test_strong_augmentation_runs_batched_on_both_channel_counts(channels: int) -> None:
    torch.manual_seed(0)
    images = torch.rand(32, channels, 16, 16)
    out = strong_augmentation(16, channels, horizontal_flip=False)(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert 0 <= out.min() and out.max() <= 1
    # independent parameters per image: identical inputs give different outputs
    same = strong_augmentation(16, channels)(images[:1].repeat(16, 1, 1, 1))
    assert (same - same[:1]).abs().flatten(1).amax(dim=1).gt(1e-3).sum() >= 12


def test_randaugment_refuses_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match="channel"):
        RandAugment(channels=1)(torch.rand(2, 3, 8, 8))


def test_randaugment_does_not_modify_its_input() -> None:
    images = torch.rand(8, 1, 16, 16)
    copy = images.clone()
    RandAugment(1, num_ops=3)(images)
    assert torch.equal(images, copy)


def test_cutout_cuts_one_square_of_bounded_size() -> None:
    torch.manual_seed(0)
    images = torch.zeros(200, 1, 16, 16)
    out = Cutout(max_size=0.5, fill=1.0)(images)
    area = out.sum(dim=(1, 2, 3))  # filled pixels per image
    assert area.max() <= 9 * 9  # side <= 8 px, +1 for the centre rounding
    assert (area > 0).float().mean() > 0.8
    # the filled region is a rectangle: rows and columns with any fill span a block
    for image in out[:20, 0]:
        rows, cols = image.any(dim=1).nonzero().flatten(), image.any(dim=0).nonzero().flatten()
        if len(rows):
            assert image.sum() == len(rows) * len(cols)
    assert torch.equal(Cutout(max_size=0.0)(images), images)
    with pytest.raises(ValueError):
        Cutout(max_size=1.5)
