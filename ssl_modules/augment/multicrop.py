"""Multi-crop views, batched on the device: a few large global crops and more small local ones.

SwAV introduced multi-crop: besides two global views at full resolution, several low-resolution
views of small regions, cheap because they are small, trained to agree with the global ones.
DINO keeps it (the student sees every view, the teacher only the global ones). Paper defaults
at 224 px, as area fractions of the image:

- SwAV: 2 global crops at 224 px, scale (0.14, 1); 6 local crops at 96 px, scale (0.05, 0.14).
- DINO: 2 global crops at 224 px, scale (0.4, 1); 8-10 local crops at 96 px, scale (0.05, 0.4).

The defaults here are DINO's scales with SwAV's 6 local crops. Each view goes through the SimCLR
colour pipeline of ``ssl_modules.augment.views`` (crop, flip, colour jitter, grayscale, blur).
A backbone sees views of two sizes; ``encode_views`` calls it once per size.

- [0] SwAV (multi-crop), Caron et al., 2020, https://arxiv.org/abs/2006.09882
- [1] DINO (multi-crop scales), Caron et al., 2021, https://arxiv.org/abs/2104.14294
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from ssl_modules.augment.views import BLUR_MIN_IMAGE_SIZE, simclr_views
from ssl_modules.backbones import vit_patch_size

# local / global side of the papers: 96 px local crops of 224 px images
LOCAL_TO_GLOBAL_RATIO = 96 / 224
MIN_LOCAL_SIZE = 8


def default_local_size(image_size: int) -> int:
    """The local crop side for ``image_size`` px images: the papers' 96/224 of the side, rounded
    to a multiple of the ViT patch size for that image size (``vit_patch_size``, so the ViT
    backbones accept the local views; convolutional ones take any size), at least 8 px and at
    most ``image_size``.

    E.g. 224 -> 96, 96 -> 48, 64 -> 24, 32 -> 12, 28 -> 12, 16 -> 8, 8 -> 8.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1; got {image_size}")
    multiple = vit_patch_size(image_size)
    rounded = multiple * max(1, round(image_size * LOCAL_TO_GLOBAL_RATIO / multiple))
    return min(image_size, max(MIN_LOCAL_SIZE, rounded))


class MultiCropViews(nn.Module):
    """``num_global_crops`` views at ``global_size`` and ``num_local_crops`` views at ``local_size``.

    Every view of every image draws its own crop, flip and colour parameters, on the images'
    device. The list holds the global views first, then the local ones.

    - [0] SwAV (multi-crop), Caron et al., 2020, https://arxiv.org/abs/2006.09882
    - [1] DINO (multi-crop scales), Caron et al., 2021, https://arxiv.org/abs/2104.14294

    Args:
        channels: image channels; chooses the colour operations (as ``simclr_views``).
        image_size: side of the input images.
        num_global_crops: global views (the papers: 2).
        num_local_crops: local views (SwAV: 6, DINO: 8-10); 0 for none.
        global_size: side of the global views (default ``image_size``).
        local_size: side of the local views (default ``default_local_size(image_size)``).
        global_crop_scale: area fraction of a global crop (DINO: (0.4, 1); SwAV: (0.14, 1)).
        local_crop_scale: area fraction of a local crop (DINO: (0.05, 0.4); SwAV: (0.05, 0.14)).
        horizontal_flip: mirror with p=0.5 (a data fact: off for digits).
        jitter_strength, jitter_probability, grayscale_probability: as ``simclr_views``.
        blur: Gaussian blur on every view; default: when ``image_size >= 64`` (decided on the
            image size, so the small local views of large images are blurred as the global ones).

    Shape: (batch_size, channels, H, W) float in [0, 1] -> list of ``num_global_crops`` tensors
    (batch_size, channels, global_size, global_size), then ``num_local_crops`` tensors
    (batch_size, channels, local_size, local_size).
    """

    def __init__(
        self,
        channels: int,
        image_size: int,
        num_global_crops: int = 2,
        num_local_crops: int = 6,
        global_size: int | None = None,
        local_size: int | None = None,
        global_crop_scale: Sequence[float] = (0.4, 1.0),
        local_crop_scale: Sequence[float] = (0.05, 0.4),
        horizontal_flip: bool = True,
        jitter_strength: float = 0.5,
        jitter_probability: float = 0.8,
        grayscale_probability: float = 0.2,
        blur: bool | None = None,
    ) -> None:
        super().__init__()
        if num_global_crops < 1 or num_local_crops < 0:
            raise ValueError(
                f"need num_global_crops >= 1 and num_local_crops >= 0; got {num_global_crops} and "
                f"{num_local_crops}"
            )
        self.global_size = image_size if global_size is None else global_size
        self.local_size = default_local_size(image_size) if local_size is None else local_size
        if self.global_size < 1 or self.local_size < 1:
            raise ValueError(
                f"view sides must be >= 1; got global_size={self.global_size}, local_size={self.local_size}"
            )
        self.channels = channels
        self.num_global_crops = num_global_crops
        self.num_local_crops = num_local_crops
        blur = image_size >= BLUR_MIN_IMAGE_SIZE if blur is None else blur
        common = dict(
            horizontal_flip=horizontal_flip,
            jitter_strength=jitter_strength,
            jitter_probability=jitter_probability,
            grayscale_probability=grayscale_probability,
            blur=blur,
        )
        self.global_augment = simclr_views(channels, self.global_size, crop_scale=global_crop_scale, **common)
        self.local_augment = simclr_views(channels, self.local_size, crop_scale=local_crop_scale, **common)

    @property
    def sizes(self) -> list[int]:
        """The side of each view, in the order ``forward`` returns them."""
        return [self.global_size] * self.num_global_crops + [self.local_size] * self.num_local_crops

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(
                f"expected images of shape (batch_size, {self.channels}, H, W); got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(
                f"expected float images in [0, 1]; got {images.dtype} (convert uint8 images with "
                "ssl_modules.augment.to_float_images)"
            )
        views = _repeat_views(images, self.global_augment, self.num_global_crops)
        if self.num_local_crops:
            views += _repeat_views(images, self.local_augment, self.num_local_crops)
        return views


def _repeat_views(images: torch.Tensor, augment: nn.Module, num_views: int) -> list[torch.Tensor]:
    # one call on the repeated batch: each copy draws its own parameters (as make_views)
    views = augment(images.repeat(num_views, 1, 1, 1)).clamp(0, 1)
    return list(views.chunk(num_views))


class ViewGroup(NamedTuple):
    """Views of one resolution, concatenated along the batch.

    ``slices[i] = (view_index, rows)``: view ``view_index`` of the input list is ``images[rows]``.
    """

    size: tuple[int, int]
    images: torch.Tensor
    slices: list[tuple[int, slice]]


def indices_by_size(views: Sequence[torch.Tensor]) -> dict[tuple[int, int], list[int]]:
    """The indices of the views of each resolution ``(H, W)``, in order of first appearance
    (e.g. global crops then local crops: ``{(32, 32): [0, 1], (12, 12): [2, 3, 4, 5]}``).

    Shape: views: list of (batch_size_i, C, H_i, W_i).
    """
    members: dict[tuple[int, int], list[int]] = {}
    for index, view in enumerate(views):
        if view.ndim != 4:
            raise ValueError(f"view {index} must have shape (batch_size, C, H, W); got {tuple(view.shape)}")
        members.setdefault((int(view.shape[-2]), int(view.shape[-1])), []).append(index)
    return members


def group_by_size(views: Sequence[torch.Tensor]) -> list[ViewGroup]:
    """Concatenate the views of each resolution (groups in order of first appearance).

    Shape: views: list of (batch_size_i, C, H_i, W_i) -> groups of (sum of their batch sizes, C, H, W).
    """
    if not views:
        raise ValueError("group_by_size needs at least one view")
    groups = []
    for size, indices in indices_by_size(views).items():
        slices, start = [], 0
        for index in indices:
            slices.append((index, slice(start, start + len(views[index]))))
            start += len(views[index])
        groups.append(ViewGroup(size, torch.cat([views[index] for index in indices]), slices))
    return groups


def ungroup(outputs: Sequence[torch.Tensor], groups: Sequence[ViewGroup]) -> list[torch.Tensor]:
    """Split per-group outputs (e.g. features) back into one tensor per view, in the views' order.

    Shape: outputs[g]: (rows of group g, ...) -> list of (batch_size_i, ...).
    """
    if len(outputs) != len(groups):
        raise ValueError(f"need one output per group: got {len(outputs)} outputs for {len(groups)} groups")
    per_view: dict[int, torch.Tensor] = {}
    for output, group in zip(outputs, groups):
        if len(output) != len(group.images):
            raise ValueError(
                f"the output for the {group.size} group has {len(output)} rows; its images have "
                f"{len(group.images)}"
            )
        for index, rows in group.slices:
            per_view[index] = output[rows]
    return [per_view[index] for index in range(len(per_view))]


def encode_views(
    encoder: Callable[[torch.Tensor], torch.Tensor], views: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``encoder`` on every view, called once per resolution; outputs in the views' order.

    Batching equal sizes matters for speed and for BatchNorm, whose statistics then span all
    views of a size (as DINO's and SwAV's multi-crop forward).

    Shape: views: list of (batch_size_i, C, H_i, W_i) -> list of (batch_size_i, ...).
    """
    groups = group_by_size(views)
    return ungroup([encoder(group.images) for group in groups], groups)
