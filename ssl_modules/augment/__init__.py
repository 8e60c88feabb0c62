"""Batched, on-device augmentation with kornia. No Lightning, no dataset knowledge.

Every pipeline takes float images in [0, 1] of shape (batch_size, channels, H, W) and draws
independent random parameters per image. Channel-dependent operations (colour jitter,
grayscale, some RandAugment ops) are chosen from the ``channels`` argument explicitly,
because kornia's colour ops require 3 channels.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float32 in [0, 1]; float images pass through."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images


def weak_augmentation(image_size: int, horizontal_flip: bool = True, translate: float = 0.125) -> nn.Module:
    """Flip-and-shift: the standard augmentation of supervised baselines and FixMatch's weak view.

    - [0] FixMatch, Sohn et al., 2020, https://arxiv.org/abs/2001.07685 (weak: flip + translate 12.5 %)

    Args:
        image_size: side of the square input images.
        horizontal_flip: mirror with p=0.5 (a data fact: off for digits and SVHN).
        translate: maximum shift as a fraction of the side (reflect padding + random crop).

    Shape: (batch_size, channels, image_size, image_size) -> same.
    """
    padding = max(1, int(round(translate * image_size)))
    ops: list[nn.Module] = []
    if horizontal_flip:
        ops.append(K.RandomHorizontalFlip(p=0.5))
    ops.append(K.RandomCrop((image_size, image_size), padding=padding, padding_mode="reflect"))
    return K.AugmentationSequential(*ops)
