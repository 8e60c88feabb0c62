"""Multi-crop views: counts and sizes, independent parameters, crop scales, channels, devices,
and grouping views by resolution so an encoder runs once per size."""

from __future__ import annotations

import kornia.augmentation as K
import pytest
import torch

from ssl_modules.augment.multicrop import (
    MultiCropViews,
    default_local_size,
    encode_views,
    group_by_size,
    ungroup,
)
from ssl_modules.backbones import vit_patch_size


@pytest.mark.parametrize("channels", [1, 3])
def test_counts_sizes_order_and_range(channels):
    torch.manual_seed(0)
    views_of = MultiCropViews(channels, 16, num_global_crops=2, num_local_crops=3)
    views = views_of(torch.rand(5, channels, 16, 16))
    assert len(views) == 5
    assert [view.shape for view in views] == [(5, channels, 16, 16)] * 2 + [(5, channels, 8, 8)] * 3
    assert views_of.sizes == [16, 16, 8, 8, 8]
    for view in views:
        assert view.dtype == torch.float32 and view.min() >= 0 and view.max() <= 1
    sizes = MultiCropViews(channels, 32, num_global_crops=1, num_local_crops=0, global_size=24)(
        torch.rand(2, channels, 32, 32)
    )
    assert [view.shape[-1] for view in sizes] == [24]


def test_default_local_size_follows_the_papers_ratio_and_the_vit_patch():
    # the papers: 96 px local crops of 224 px images; smaller images scale that, rounded to the
    # ViT patch of the image size, at least 8 px, at most the image
    expected = {224: 96, 96: 48, 64: 24, 32: 12, 28: 12, 16: 8, 8: 8, 4: 4}
    assert {size: default_local_size(size) for size in expected} == expected
    for size in (16, 28, 32, 64, 96, 224):
        assert default_local_size(size) % vit_patch_size(size) == 0
    assert MultiCropViews(3, 32).local_size == 12


def test_blur_is_decided_on_the_image_size_for_every_view():
    def blurs(views_of: MultiCropViews) -> list[bool]:
        return [
            any(isinstance(op, K.RandomGaussianBlur) for op in augment.children())
            for augment in (views_of.global_augment, views_of.local_augment)
        ]

    assert blurs(MultiCropViews(3, 64)) == [True, True]  # 24 px local views of 64 px images too
    assert blurs(MultiCropViews(3, 32)) == [False, False]
    assert blurs(MultiCropViews(1, 32, blur=True)) == [True, True]


def test_views_draw_independent_parameters_per_image_and_per_view():
    torch.manual_seed(1)
    batch = torch.rand(1, 3, 16, 16).expand(6, -1, -1, -1).contiguous()  # one image six times
    views = MultiCropViews(3, 16, num_local_crops=2)(batch)
    for view in views:  # every copy of the image got its own crop and colours
        assert len({tuple(row.round(decimals=4).tolist()) for row in view.flatten(1)}) == 6
    for first, second in [(0, 1), (2, 3)]:  # and every view of a size its own
        assert (views[first] - views[second]).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def _coordinate_images(batch_size: int, side: int) -> torch.Tensor:
    """Channel 0 is the column, channel 1 the row (pixel centres, in (0, 1)), channel 2 constant."""
    ramp = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    images = torch.full((batch_size, 3, side, side), 0.5)
    images[:, 0] = ramp.view(1, side)
    images[:, 1] = ramp.view(side, 1)
    return images


def _crop_areas(view: torch.Tensor) -> torch.Tensor:
    """Area fraction of the crop behind each view of coordinate images, from the coordinate spans.

    Sampling ``size`` pixel centres of a crop of relative width w spans w (1 - 1 / size) of the ramp.
    """
    size = view.shape[-1]
    width = (view[:, 0].amax(dim=(1, 2)) - view[:, 0].amin(dim=(1, 2))) / (1 - 1 / size)
    height = (view[:, 1].amax(dim=(1, 2)) - view[:, 1].amin(dim=(1, 2))) / (1 - 1 / size)
    return width * height


def test_global_and_local_crops_cover_the_areas_of_their_scales():
    torch.manual_seed(2)
    views_of = MultiCropViews(
        3,
        64,
        num_global_crops=2,
        num_local_crops=4,
        global_size=16,
        local_size=8,
        horizontal_flip=False,
        jitter_probability=0.0,
        grayscale_probability=0.0,
        blur=False,
    )
    views = views_of(_coordinate_images(64, 64))
    global_areas = torch.cat([_crop_areas(view) for view in views[:2]])
    local_areas = torch.cat([_crop_areas(view) for view in views[2:]])
    tolerance = 0.04  # pixel discretisation of the 64 px ramp
    assert global_areas.min() >= 0.4 - tolerance and global_areas.max() <= 1 + tolerance
    assert local_areas.min() >= 0.05 - tolerance / 2 and local_areas.max() <= 0.4 + tolerance
    assert local_areas.mean() < 0.5 * global_areas.mean()
    # SwAV's scales: local crops at most 14 % of the image
    swav = MultiCropViews(
        3,
        64,
        global_size=16,
        local_size=8,
        global_crop_scale=(0.14, 1.0),
        local_crop_scale=(0.05, 0.14),
        horizontal_flip=False,
        jitter_probability=0.0,
        grayscale_probability=0.0,
        blur=False,
    )
    swav_local = torch.cat([_crop_areas(view) for view in swav(_coordinate_images(64, 64))[2:]])
    assert swav_local.max() <= 0.14 + tolerance


def test_one_channel_views_are_colour_jittered_without_crashing():
    images = torch.rand(8, 1, 16, 16) * 0.5 + 0.25

    def views(jitter_probability: float) -> list[torch.Tensor]:
        torch.manual_seed(3)  # the crops are drawn first: the same crops in both calls
        return MultiCropViews(1, 16, num_local_crops=1, jitter_probability=jitter_probability)(images)

    plain, jittered = views(0.0), views(1.0)
    assert [view.shape for view in jittered] == [(8, 1, 16, 16)] * 2 + [(8, 1, 8, 8)]
    for plain_view, jittered_view in zip(plain, jittered, strict=True):
        # every view of every image had its brightness/contrast moved
        assert (jittered_view - plain_view).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def _devices() -> list[str]:
    return ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("channels", [1, 3])
def test_views_stay_on_the_images_device(device, channels):
    # the meta device holds no data: any copy to the CPU, or a CPU tensor mixed in, raises
    views = MultiCropViews(channels, 64, num_local_crops=2, blur=True)(
        torch.rand(4, channels, 64, 64, device=device)
    )
    assert [view.device.type for view in views] == [device] * 4
    assert [tuple(view.shape[-2:]) for view in views] == [(64, 64)] * 2 + [(24, 24)] * 2


def test_arguments_and_inputs_are_checked():
    with pytest.raises(ValueError, match="num_global_crops"):
        MultiCropViews(3, 16, num_global_crops=0)
    with pytest.raises(ValueError, match="num_local_crops"):
        MultiCropViews(3, 16, num_local_crops=-1)
    with pytest.raises(ValueError, match="crop_scale"):
        MultiCropViews(3, 16, local_crop_scale=(0.5, 0.1))
    views_of = MultiCropViews(3, 16)
    with pytest.raises(ValueError, match="shape"):
        views_of(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="float"):
        views_of(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))


def _features(images: torch.Tensor) -> torch.Tensor:
    """A per-image 'encoder': the channel means and the first pixel. Shape: (n, 2C)."""
    return torch.cat([images.mean(dim=(2, 3)), images[:, :, 0, 0]], dim=1)


def test_grouping_round_trip_keeps_the_view_order():
    torch.manual_seed(4)
    # interleaved sizes and unequal batch sizes: the groups are not consecutive runs
    views = [
        torch.rand(3, 2, 16, 16),
        torch.rand(3, 2, 8, 8),
        torch.rand(4, 2, 16, 16),
        torch.rand(3, 2, 12, 12),
        torch.rand(2, 2, 8, 8),
    ]
    groups = group_by_size(views)
    assert [group.size for group in groups] == [(16, 16), (8, 8), (12, 12)]
    torch.testing.assert_close(groups[0].images, torch.cat([views[0], views[2]]), rtol=0, atol=0)
    torch.testing.assert_close(groups[1].images, torch.cat([views[1], views[4]]), rtol=0, atol=0)
    assert [index for group in groups for index, _ in group.slices] == [0, 2, 1, 4, 3]
    split = ungroup([group.images for group in groups], groups)
    for original, restored in zip(views, split, strict=True):
        torch.testing.assert_close(restored, original, rtol=0, atol=0)

    calls = []

    def encoder(images):
        calls.append(tuple(images.shape))
        return _features(images)

    features = encode_views(encoder, views)
    assert calls == [(7, 2, 16, 16), (5, 2, 8, 8), (3, 2, 12, 12)]  # once per resolution
    assert len(features) == len(views)
    for view, feature in zip(views, features, strict=True):
        torch.testing.assert_close(feature, _features(view))


def test_grouping_checks_its_inputs():
    with pytest.raises(ValueError, match="at least one"):
        group_by_size([])
    with pytest.raises(ValueError, match="shape"):
        group_by_size([torch.rand(2, 8, 8)])
    groups = group_by_size([torch.rand(2, 1, 8, 8), torch.rand(2, 1, 4, 4)])
    with pytest.raises(ValueError, match="one output per group"):
        ungroup([torch.rand(2, 3)], groups)
    with pytest.raises(ValueError, match="rows"):
        ungroup([torch.rand(3, 3), torch.rand(2, 3)], groups)
