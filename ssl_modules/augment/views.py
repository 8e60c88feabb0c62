"""SimCLR-style view pipeline, batched on the device with kornia.

Every call draws independent parameters for every image, so calling the pipeline twice on
a batch gives two independent views per image (``make_views``).

- [0] SimCLR (appendix A: crop, flip, colour distortion, blur), Chen et al., 2020, https://arxiv.org/abs/2002.05709
- [1] BYOL (the same family of views; asymmetric blur and solarization), Grill et al., 2020,
  https://arxiv.org/abs/2006.07733
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

# RGB <-> YIQ: a hue rotation is a rotation of the (I, Q) chroma plane.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def _gray(images: torch.Tensor) -> torch.Tensor:
    """Luma of RGB images, or the image itself for one channel. Shape: (n, C, H, W) -> (n, 1, H, W)."""
    if images.shape[1] == 3:
        weights = _RGB_TO_YIQ[0].to(images).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True)
    return images.mean(dim=1, keepdim=True)


class BatchedColorJitter(nn.Module):
    """Colour jitter with independent factors per image, as a handful of batched tensor ops.

    Brightness (scale by b), contrast (blend with the image's mean luma by c), saturation
    (blend with the per-pixel luma by s) and hue (rotate the YIQ chroma plane by h x 2 pi),
    factors drawn uniformly from [1 - x, 1 + x] (hue from [-h, h]), applied in a random order
    with probability ``p`` per image, clamping to [0, 1] after each op, as torchvision's
    ``ColorJitter``. Saturation and hue need 3 channels and are skipped for other counts.
    Hue is rotated in YIQ rather than HSV (a linear map, so one batched matmul). kornia's
    ``ColorJitter`` (HSV) took 3-6x longer than this on the 2-core CPU, more than the rest of
    the pipeline together; see ``benchmarks/simclr_throughput.py``.

    - [0] SimCLR (appendix A, colour distortion), Chen et al., 2020, https://arxiv.org/abs/2002.05709

    Shape: (batch_size, channels, H, W) float in [0, 1] -> same.
    """

    def __init__(
        self, brightness: float, contrast: float, saturation: float, hue: float, p: float = 1.0
    ) -> None:
        super().__init__()
        if min(brightness, contrast, saturation, hue) < 0 or hue > 0.5 or not 0 <= p <= 1:
            raise ValueError(
                f"need brightness, contrast, saturation >= 0, 0 <= hue <= 0.5 and 0 <= p <= 1; got "
                f"{brightness}, {contrast}, {saturation}, {hue}, p={p}"
            )
        self.brightness, self.contrast, self.saturation, self.hue, self.p = (
            brightness,
            contrast,
            saturation,
            hue,
            p,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, channels = images.shape[:2]
        device, dtype = images.device, images.dtype

        def factors(spread: float) -> torch.Tensor:  # (n, 1, 1, 1) in [1 - spread, 1 + spread]
            return 1 + (torch.rand(n, 1, 1, 1, device=device, dtype=dtype) * 2 - 1) * spread

        out = images
        for op in torch.randperm(4).tolist():
            if op == 0 and self.brightness > 0:
                out = out * factors(self.brightness)
            elif op == 1 and self.contrast > 0:
                mean = _gray(out).mean(dim=(1, 2, 3), keepdim=True)
                out = (out - mean) * factors(self.contrast) + mean
            elif op == 2 and self.saturation > 0 and channels == 3:
                gray = _gray(out)
                out = (out - gray) * factors(self.saturation) + gray
            elif op == 3 and self.hue > 0 and channels == 3:
                angle = (torch.rand(n, device=device) * 2 - 1) * self.hue * 2 * torch.pi  # (n,)
                cos, sin = angle.cos(), angle.sin()
                rotation = torch.zeros(n, 3, 3, device=device)
                rotation[:, 0, 0] = 1
                rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = (
                    cos,
                    -sin,
                    sin,
                    cos,
                )
                matrix = _YIQ_TO_RGB.to(device) @ rotation @ _RGB_TO_YIQ.to(device)  # (n, 3, 3)
                out = torch.einsum("nij,njhw->nihw", matrix.to(dtype), out)
            else:
                continue
            out = out.clamp(0, 1)
        apply = torch.rand(n, 1, 1, 1, device=device) < self.p
        return torch.where(apply, out, images)


class BatchedResizedCrop(nn.Module):
    """Random resized crop, and optionally a horizontal flip, as one ``affine_grid`` + ``grid_sample``.

    For each image: an area fraction from ``scale`` and an aspect ratio log-uniform in
    ``ratio`` give a box of relative width ``w = sqrt(area * ratio)`` and height
    ``h = sqrt(area / ratio)`` (each at most 1, where torchvision would retry), placed uniformly
    inside the image, resampled bilinearly to ``size`` x ``size``; mirrored with p=0.5 when
    ``horizontal_flip``. Bilinear without antialiasing, like kornia's and torchvision's tensor
    crops. kornia's ``RandomResizedCrop`` + ``RandomHorizontalFlip`` cost most of the SimCLR
    view time on the 2-core CPU (``benchmarks/simclr_throughput.py``); this is one kernel.

    - [0] Inception (random resized crop), Szegedy et al., 2015, https://arxiv.org/abs/1409.4842

    Shape: (batch_size, C, H, W) -> (batch_size, C, size, size).
    """

    def __init__(
        self,
        size: int,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        horizontal_flip: bool = False,
    ) -> None:
        super().__init__()
        if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(
                f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]; got {scale}, {ratio}"
            )
        self.size = size
        self.scale = (float(scale[0]), float(scale[1]))
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.horizontal_flip = horizontal_flip

    def sample_theta(self, n: int, device: torch.device) -> torch.Tensor:
        """Affine matrices mapping output to input coordinates in [-1, 1]. Shape: (n, 2, 3)."""
        uniform = torch.rand(n, 5, device=device)
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * uniform[:, 0]
        ratio = torch.exp(self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0]) * uniform[:, 1])
        width = torch.sqrt(area * ratio).clamp(max=1.0)
        height = torch.sqrt(area / ratio).clamp(max=1.0)
        center_x = (2 * uniform[:, 2] - 1) * (1 - width)  # the box stays inside the image
        center_y = (2 * uniform[:, 3] - 1) * (1 - height)
        mirror = (
            torch.where(uniform[:, 4] < 0.5, -1.0, 1.0)
            if self.horizontal_flip
            else torch.ones(n, device=device)
        )
        theta = torch.zeros(n, 2, 3, device=device)
        theta[:, 0, 0] = width * mirror
        theta[:, 0, 2] = center_x
        theta[:, 1, 1] = height
        theta[:, 1, 2] = center_y
        return theta

    def apply(self, images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        grid = F.affine_grid(
            theta.to(images.dtype), [len(images), images.shape[1], self.size, self.size], align_corners=False
        )
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.apply(images, self.sample_theta(len(images), images.device))


# SimCLR omits the blur on CIFAR-10 (32 px) and uses it on ImageNet (224 px); blurring
# images of a few dozen pixels erases them. Below this side, no blur.
BLUR_MIN_IMAGE_SIZE = 64


def simclr_views(
    channels: int,
    image_size: int,
    horizontal_flip: bool = True,
    crop_scale: Sequence[float] = (0.08, 1.0),
    jitter_strength: float = 0.5,
    jitter_probability: float = 0.8,
    grayscale_probability: float = 0.2,
    blur: bool | None = None,
    blur_probability: float = 0.5,
) -> nn.Module:
    """The SimCLR augmentation as one batched module (batched crop + flip and colour jitter, kornia grayscale and blur).

    - random resized crop (``crop_scale`` of the area, aspect 3/4-4/3) back to ``image_size``;
    - horizontal flip with p=0.5, only if ``horizontal_flip`` (a data fact: off for digits);
    - 3 channels: colour jitter (brightness, contrast, saturation 0.8 s, hue 0.2 s) with
      p=``jitter_probability``, then grayscale with p=``grayscale_probability``;
      1 channel: brightness and contrast jitter (0.8 s) with p=``jitter_probability`` —
      saturation, hue and grayscale do not exist for one channel;
      other channel counts: no colour operations;
    - Gaussian blur (kernel ~10 % of the side, sigma in [0.1, 2]) with p=``blur_probability``
      when ``blur`` (default: ``image_size >= 64``).

    Args:
        channels: image channels; chooses the colour operations.
        image_size: side of the square output.
        jitter_strength: s; 0.5 is SimCLR's CIFAR-10 choice, 1.0 its ImageNet one.

    Shape: (batch_size, channels, H, W) float in [0, 1] -> (batch_size, channels, image_size, image_size).
    """
    if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1; got {tuple(crop_scale)}")
    ops: list[nn.Module] = [BatchedResizedCrop(image_size, crop_scale, horizontal_flip=horizontal_flip)]
    strength = jitter_strength
    if channels == 3:
        ops.append(
            BatchedColorJitter(
                0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength, p=jitter_probability
            )
        )
        ops.append(K.RandomGrayscale(p=grayscale_probability))
    elif channels == 1:
        ops.append(BatchedColorJitter(0.8 * strength, 0.8 * strength, 0.0, 0.0, p=jitter_probability))
    if blur if blur is not None else image_size >= BLUR_MIN_IMAGE_SIZE:
        kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)  # odd, ~10 % of the side
        ops.append(K.RandomGaussianBlur((kernel, kernel), (0.1, 2.0), p=blur_probability))
    return nn.Sequential(*ops)


class RandomSolarize(nn.Module):
    """Solarization with probability ``p`` per image: ``x -> x 1{x < threshold} + (1 - x) 1{x >= threshold}``.

    BYOL's definition on images in [0, 1] (threshold 0.5), applied to every channel alike, so it
    is the same operation for 1, 3 or any number of channels; one uniform draw per image decides.

    - [0] BYOL (appendix B, solarization), Grill et al., 2020, https://arxiv.org/abs/2006.07733

    Shape: (batch_size, C, H, W) float in [0, 1] -> same.
    """

    def __init__(self, p: float = 0.2, threshold: float = 0.5) -> None:
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"solarization probability p must be in [0, 1]; got {p}")
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1] (images are in [0, 1]); got {threshold}")
        self.p, self.threshold = p, threshold

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        solarized = torch.where(images >= self.threshold, 1 - images, images)
        apply = torch.rand(len(images), 1, 1, 1, device=images.device) < self.p  # (n, 1, 1, 1)
        return torch.where(apply, solarized, images)


# BYOL's two view distributions (table 6): the first view always blurred and never solarized,
# the second rarely blurred and sometimes solarized.
BYOL_BLUR_PROBABILITIES = (1.0, 0.1)
BYOL_SOLARIZE_PROBABILITIES = (0.0, 0.2)


def byol_views(
    channels: int,
    image_size: int,
    horizontal_flip: bool = True,
    crop_scale: Sequence[float] = (0.08, 1.0),
    jitter_strength: float = 0.5,
    blur: bool | None = None,
) -> tuple[nn.Module, nn.Module]:
    """BYOL's asymmetric pair of augmentations: ``simclr_views`` followed by solarization, with
    blur probability 1.0 / 0.1 and solarization probability 0.0 / 0.2 for view 1 / view 2.

    Blur follows ``simclr_views``' rule (default: only when ``image_size >= 64``), so on small
    images the two views differ in solarization only, as in solo-learn's CIFAR recipe for BYOL.

    - [0] BYOL (table 6, image augmentations), Grill et al., 2020, https://arxiv.org/abs/2006.07733

    Returns:
        (augment of view 1, augment of view 2); each maps (batch_size, channels, H, W) float in
        [0, 1] -> (batch_size, channels, image_size, image_size).
    """
    augments = []
    for blur_probability, solarize_probability in zip(BYOL_BLUR_PROBABILITIES, BYOL_SOLARIZE_PROBABILITIES):
        augment = simclr_views(
            channels,
            image_size,
            horizontal_flip,
            crop_scale=crop_scale,
            jitter_strength=jitter_strength,
            blur=blur,
            blur_probability=blur_probability,
        )
        if solarize_probability > 0:
            augment.append(RandomSolarize(p=solarize_probability))
        augments.append(augment)
    return augments[0], augments[1]


def make_views(images: torch.Tensor, augment: nn.Module, num_views: int = 2) -> list[torch.Tensor]:
    """``num_views`` independently augmented copies of ``images``, each clamped to [0, 1].

    Shape: (batch_size, C, H, W) -> list of ``num_views`` tensors of the augmentation's output shape.
    """
    if num_views < 2:
        raise ValueError(f"num_views must be >= 2; got {num_views}")
    # one call on the repeated batch: every copy still draws its own parameters, and the
    # per-call overhead of the augmentation is paid once instead of num_views times
    views = augment(images.repeat(num_views, 1, 1, 1)).clamp(0, 1)
    return list(views.chunk(num_views))


def make_asymmetric_views(images: torch.Tensor, augments: Sequence[nn.Module]) -> list[torch.Tensor]:
    """One view per augmentation (view ``v`` from ``augments[v]``, e.g. ``byol_views``), each
    clamped to [0, 1]; parameters are drawn independently per image and view.

    Shape: (batch_size, C, H, W) -> list of ``len(augments)`` tensors of the augmentations' output shape.
    """
    if len(augments) < 2:
        raise ValueError(f"need at least 2 augmentations (one per view); got {len(augments)}")
    return [augment(images).clamp(0, 1) for augment in augments]
