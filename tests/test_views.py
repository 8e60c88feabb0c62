"""The SimCLR view pipeline: shapes, ranges, channel-dependent ops, independence of parameters."""

from __future__ import annotations

import kornia.augmentation as K
import pytest
import torch
import torch.nn.functional as F

from ssl_modules.augment.views import BatchedColorJitter, BatchedResizedCrop, make_views, simclr_views


def op_types(pipeline) -> list[type]:
    return [type(op) for op in pipeline.children()]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("image_size", [16, 32])
def test_views_shape_range_dtype(channels, image_size):
    torch.manual_seed(0)
    images = torch.rand(6, channels, 20, 20)
    views = make_views(images, simclr_views(channels, image_size), num_views=3)
    assert len(views) == 3
    for view in views:
        assert view.shape == (6, channels, image_size, image_size)
        assert view.dtype == torch.float32
        assert view.min() >= 0 and view.max() <= 1


def test_ops_are_chosen_by_channel_count_and_flip_flag():
    rgb_pipeline = simclr_views(3, 32, horizontal_flip=True)
    rgb = op_types(rgb_pipeline)
    assert BatchedColorJitter in rgb and K.RandomGrayscale in rgb
    assert next(op for op in rgb_pipeline.children() if isinstance(op, BatchedResizedCrop)).horizontal_flip
    gray = simclr_views(1, 32, horizontal_flip=False)
    assert K.RandomGrayscale not in op_types(gray)
    assert not next(op for op in gray.children() if isinstance(op, BatchedResizedCrop)).horizontal_flip
    jitter = next(op for op in gray.children() if isinstance(op, BatchedColorJitter))
    assert jitter.p == pytest.approx(0.8)
    # one channel: only brightness and contrast are jittered
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (0.4, 0.4, 0.0, 0.0)
    grayscale = next(op for op in simclr_views(3, 32).children() if isinstance(op, K.RandomGrayscale))
    assert grayscale.p == pytest.approx(0.2)
    four_channels = op_types(simclr_views(4, 32))
    assert BatchedColorJitter not in four_channels and K.RandomGrayscale not in four_channels


def test_blur_only_where_the_image_size_warrants_it():
    assert K.RandomGaussianBlur not in op_types(simclr_views(3, 32))
    assert K.RandomGaussianBlur in op_types(simclr_views(3, 96))
    assert K.RandomGaussianBlur in op_types(simclr_views(3, 32, blur=True))


def test_no_flip_means_no_mirrored_view():
    # an image whose left half is 1 and right half 0: a crop of the full image keeps the bright
    # side on the left unless the view was mirrored
    images = torch.zeros(64, 1, 16, 16)
    images[..., :8] = 1.0
    torch.manual_seed(1)
    plain = simclr_views(1, 16, horizontal_flip=False, crop_scale=(1.0, 1.0), jitter_probability=0.0)(images)
    assert (plain[..., :8].mean((1, 2, 3)) > plain[..., 8:].mean((1, 2, 3))).all()
    flipping = simclr_views(1, 16, horizontal_flip=True, crop_scale=(1.0, 1.0), jitter_probability=0.0)(
        images
    )
    mirrored = flipping[..., :8].mean((1, 2, 3)) < flipping[..., 8:].mean((1, 2, 3))
    assert 0 < mirrored.sum() < 64  # about half


def test_parameters_are_independent_per_image_and_per_view():
    torch.manual_seed(2)
    image = torch.rand(1, 3, 32, 32)
    batch = image.expand(8, -1, -1, -1).contiguous()  # the same image eight times
    view_a, view_b = make_views(batch, simclr_views(3, 32))
    flat = view_a.flatten(1)
    distinct = {tuple(row.round(decimals=4).tolist()) for row in flat}
    assert len(distinct) == 8  # every copy got its own crop / jitter
    assert not torch.allclose(view_a, view_b)  # the second view draws new parameters


def test_seeded_views_are_reproducible_and_arguments_checked():
    images = torch.rand(4, 1, 16, 16)
    pipeline = simclr_views(1, 16)
    torch.manual_seed(3)
    first = make_views(images, pipeline)
    torch.manual_seed(3)
    second = make_views(images, pipeline)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(ValueError, match="num_views"):
        make_views(images, pipeline, num_views=1)
    with pytest.raises(ValueError, match="crop_scale"):
        simclr_views(1, 16, crop_scale=(0.0, 1.0))


def test_batched_color_jitter_against_plain_formulas():
    torch.manual_seed(4)
    images = torch.rand(5, 3, 8, 8) * 0.5 + 0.25
    # brightness only: each image is scaled by one factor in [1 - b, 1 + b]
    out = BatchedColorJitter(0.4, 0, 0, 0, p=1.0)(images)
    ratio = out / images
    assert torch.allclose(ratio, ratio[:, :1, :1, :1].expand_as(ratio), atol=1e-5)
    assert ((ratio[:, 0, 0, 0] >= 0.6 - 1e-6) & (ratio[:, 0, 0, 0] <= 1.4 + 1e-6)).all()
    # saturation 0 -> 1: the blend with luma keeps the luma of every pixel
    out = BatchedColorJitter(0, 0, 0.8, 0, p=1.0)(images)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    torch.testing.assert_close((out * luma).sum(1), (images * luma).sum(1), atol=1e-5, rtol=0)
    # hue: a rotation of the chroma plane keeps luma and chroma magnitude (unclipped range)
    out = BatchedColorJitter(0, 0, 0, 0.1, p=1.0)(images)
    torch.testing.assert_close((out * luma).sum(1), (images * luma).sum(1), atol=1e-4, rtol=0)
    assert not torch.allclose(out, images)
    # p = 0 leaves the images alone; one channel skips saturation and hue
    assert torch.equal(BatchedColorJitter(0.4, 0.4, 0.4, 0.1, p=0.0)(images), images)
    gray = torch.rand(4, 1, 8, 8)
    assert torch.equal(BatchedColorJitter(0, 0, 0.8, 0.1, p=1.0)(gray), gray)
    with pytest.raises(ValueError):
        BatchedColorJitter(0.4, 0.4, 0.4, 0.6)


def test_resized_crop_of_the_whole_image_is_the_identity_and_flip_mirrors():
    images = torch.rand(4, 3, 12, 12)
    whole = BatchedResizedCrop(12, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(whole(images), images, atol=1e-5, rtol=0)
    flip = BatchedResizedCrop(12, scale=(1.0, 1.0), ratio=(1.0, 1.0), horizontal_flip=True)
    theta = flip.sample_theta(len(images), images.device)
    mirrored = theta[:, 0, 0] < 0
    expected = torch.where(mirrored.view(-1, 1, 1, 1), images.flip(3), images)
    torch.testing.assert_close(flip.apply(images, theta), expected, atol=1e-5, rtol=0)


def test_resized_crop_samples_the_box_like_crop_then_resize():
    # the left half of the image stretched to full width, against cropping then bilinear resizing
    images = torch.rand(2, 1, 8, 8)
    crop = BatchedResizedCrop(8)
    theta = torch.tensor([[[0.5, 0.0, -0.5], [0.0, 1.0, 0.0]]]).repeat(2, 1, 1)
    expected = F.interpolate(images[..., :4], size=(8, 8), mode="bilinear", align_corners=False)
    # interior columns: the outermost ones differ only in how each treats the box's border
    torch.testing.assert_close(crop.apply(images, theta)[..., 1:-1], expected[..., 1:-1], atol=1e-5, rtol=0)


def test_resized_crop_boxes_follow_scale_and_ratio_and_stay_inside():
    torch.manual_seed(0)
    crop = BatchedResizedCrop(16, scale=(0.2, 0.6), ratio=(0.5, 2.0))
    theta = crop.sample_theta(20_000, torch.device("cpu"))
    width, height = theta[:, 0, 0].abs(), theta[:, 1, 1]
    area = width * height
    assert area.min() >= 0.2 - 1e-6 and area.max() <= 0.6 + 1e-6
    assert (width / height).min() >= 0.5 - 1e-4 and (width / height).max() <= 2.0 + 1e-4
    assert ((theta[:, 0, 2].abs() + width) <= 1 + 1e-6).all() and (
        (theta[:, 1, 2].abs() + height) <= 1 + 1e-6
    ).all()
    assert abs(area.mean().item() - 0.4) < 0.01  # area uniform on [0.2, 0.6]
    with pytest.raises(ValueError, match="scale"):
        BatchedResizedCrop(16, scale=(0.0, 1.0))
