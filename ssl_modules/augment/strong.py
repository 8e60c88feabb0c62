"""Strong augmentation: RandAugment + Cutout, batched on the device, for 1- or 3-channel images.

FixMatch's RandAugment variant: every image draws ``num_ops`` operations uniformly from the
pool and, per operation, a magnitude uniformly in [0, 1] (scaled to each operation's
range), then Cutout. Every operation works on a whole batch at once: the images that drew an
operation are transformed together with their own magnitudes.

The operation pool is chosen from ``channels`` explicitly: ``color`` (saturation) only exists
for 3-channel images; every other operation is defined per channel and runs on any count.

- [0] RandAugment, Cubuk et al., 2020, https://arxiv.org/abs/1909.13719
- [1] FixMatch (RandAugment with random magnitudes + Cutout), Sohn et al., 2020, https://arxiv.org/abs/2001.07685
- [2] Cutout, DeVries & Taylor, 2017, https://arxiv.org/abs/1708.04552
"""

from __future__ import annotations

from collections.abc import Callable

import kornia.enhance as KE
import kornia.geometry.transform as KG
import torch
from torch import nn

from ssl_modules.augment import weak_augmentation

# every operation: (images (n, C, H, W), magnitudes (n,) in [0, 1]) -> images (n, C, H, W)
Operation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _signed(magnitude: torch.Tensor) -> torch.Tensor:
    """Magnitude with a random sign, so geometric/colour ops go both ways."""
    sign = torch.where(torch.rand_like(magnitude) < 0.5, -1.0, 1.0)
    return magnitude * sign


def _view(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _blend(images: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: ``degenerate + factor * (images - degenerate)``, clipped to [0, 1]."""
    return (degenerate + _view(factor) * (images - degenerate)).clamp(0, 1)


def _gray(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 3:
        weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True)
    return images.mean(dim=1, keepdim=True)


def identity(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    return images


def auto_contrast(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    low = images.amin(dim=(2, 3), keepdim=True)
    high = images.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(high > low, 1.0 / (high - low).clamp_min(1e-6), torch.ones_like(high))
    return torch.where(high > low, (images - low) * scale, images).clamp(0, 1)


def equalize(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    return KE.equalize(images.contiguous())


def brightness(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    return _blend(images, torch.zeros_like(images), 1.0 + 0.9 * _signed(magnitude))


def contrast(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    mean = _gray(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean.expand_as(images), 1.0 + 0.9 * _signed(magnitude))


def color(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Saturation: blend with the grayscale image. 3-channel images only."""
    return _blend(images, _gray(images).expand_as(images), 1.0 + 0.9 * _signed(magnitude))


def sharpness(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    return KE.sharpness(images.contiguous(), (1.0 + 0.9 * _signed(magnitude)).clamp_min(0)).clamp(0, 1)


def posterize(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    bits = (8 - torch.round(magnitude * 4)).to(torch.int64)  # 8 .. 4 bits
    return KE.posterize(images.contiguous(), bits)


def solarize(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    threshold = _view(1.0 - magnitude)  # magnitude 0: nothing inverted
    return torch.where(images >= threshold, 1.0 - images, images)


def rotate(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    return KG.rotate(images, 30.0 * _signed(magnitude), padding_mode="zeros")


def _shear(images: torch.Tensor, magnitude: torch.Tensor, axis: int) -> torch.Tensor:
    shear = torch.zeros(len(images), 2, device=images.device, dtype=images.dtype)
    shear[:, axis] = 0.3 * _signed(magnitude)
    return KG.shear(images, shear, padding_mode="zeros")


def _translate(images: torch.Tensor, magnitude: torch.Tensor, axis: int) -> torch.Tensor:
    shift = torch.zeros(len(images), 2, device=images.device, dtype=images.dtype)
    shift[:, axis] = 0.3 * images.shape[-1] * _signed(magnitude)
    return KG.translate(images, shift, padding_mode="zeros")


def shear_x(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    return _shear(images, magnitude, 0)


def shear_y(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    return _shear(images, magnitude, 1)


def translate_x(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    return _translate(images, magnitude, 0)


def translate_y(images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    return _translate(images, magnitude, 1)


# defined per channel: valid for any channel count
_ANY_CHANNELS: dict[str, Operation] = {
    "identity": identity,
    "auto_contrast": auto_contrast,
    "equalize": equalize,
    "brightness": brightness,
    "contrast": contrast,
    "sharpness": sharpness,
    "posterize": posterize,
    "solarize": solarize,
    "rotate": rotate,
    "shear_x": shear_x,
    "shear_y": shear_y,
    "translate_x": translate_x,
    "translate_y": translate_y,
}
# need a colour image
_THREE_CHANNELS: dict[str, Operation] = {"color": color}


def randaugment_operations(channels: int) -> dict[str, Operation]:
    """The RandAugment pool valid for ``channels``-channel images (``color`` only for 3)."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1; got {channels}")
    return {**_ANY_CHANNELS, **(_THREE_CHANNELS if channels == 3 else {})}


class RandAugment(nn.Module):
    """Batched RandAugment with a random magnitude per image and operation (FixMatch's RA).

    - [0] RandAugment, Cubuk et al., 2020, https://arxiv.org/abs/1909.13719
    - [1] FixMatch, Sohn et al., 2020, https://arxiv.org/abs/2001.07685

    Args:
        channels: image channels; picks the operation pool (see ``randaugment_operations``).
        num_ops: operations applied to every image, in sequence.

    Shape: float images in [0, 1], (batch_size, channels, H, W) -> same.
    """

    def __init__(self, channels: int, num_ops: int = 2) -> None:
        super().__init__()
        if num_ops < 0:
            raise ValueError(f"num_ops must be >= 0; got {num_ops}")
        self.channels = channels
        self.num_ops = num_ops
        self.operations = randaugment_operations(channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] != self.channels:
            raise ValueError(
                f"RandAugment was built for {self.channels} channel(s); got {tuple(images.shape)}"
            )
        operations = list(self.operations.values())
        images = images.clone()
        for _ in range(self.num_ops):
            choice = torch.randint(len(operations), (len(images),), device=images.device)  # (batch_size,)
            magnitude = torch.rand(len(images), device=images.device, dtype=images.dtype)  # (batch_size,)
            for index, operation in enumerate(operations):
                selected = (choice == index).nonzero().flatten()
                if len(selected):
                    images[selected] = operation(images[selected], magnitude[selected]).to(images.dtype)
        return images


class Cutout(nn.Module):
    """Cut one square at a random centre of every image, filled with ``fill``.

    - [2] Cutout, DeVries & Taylor, 2017, https://arxiv.org/abs/1708.04552

    Args:
        max_size: largest square side as a fraction of the image side; each image draws a
            side uniformly in (0, max_size] (FixMatch's RandAugment: up to 0.5).
        fill: value written into the square (0.5: gray, as in FixMatch).

    Shape: (batch_size, channels, H, W) -> same.
    """

    def __init__(self, max_size: float = 0.5, fill: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= max_size <= 1.0:
            raise ValueError(f"max_size must be in [0, 1]; got {max_size}")
        self.max_size = max_size
        self.fill = fill

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        device = images.device
        side = torch.rand(batch, device=device) * self.max_size * min(height, width)  # (batch,)
        centre_y = torch.rand(batch, device=device) * height
        centre_x = torch.rand(batch, device=device) * width
        rows = torch.arange(height, device=device).view(1, height, 1) + 0.5
        cols = torch.arange(width, device=device).view(1, 1, width) + 0.5
        half = (side / 2).view(-1, 1, 1)
        inside = ((rows - centre_y.view(-1, 1, 1)).abs() <= half) & (
            (cols - centre_x.view(-1, 1, 1)).abs() <= half
        )  # (batch, H, W)
        return torch.where(inside.unsqueeze(1), torch.full_like(images, self.fill), images)


def strong_augmentation(
    image_size: int, channels: int, horizontal_flip: bool = True, num_ops: int = 2, cutout: float = 0.5
) -> nn.Module:
    """FixMatch's strong view: flip + shift, RandAugment (``num_ops``), then Cutout.

    - [1] FixMatch, Sohn et al., 2020, https://arxiv.org/abs/2001.07685

    Shape: (batch_size, channels, image_size, image_size) -> same.
    """
    return nn.Sequential(
        weak_augmentation(image_size, horizontal_flip),
        RandAugment(channels, num_ops),
        Cutout(cutout),
    )
