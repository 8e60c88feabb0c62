"""Generate an offline colour ImageFolder dataset for benchmarking colorization.

``root/train/<class>/*.png`` and ``root/test/<class>/*.png``: 32x32 RGB images of ten
classes. Each class is a shape (disk, ring, square, diamond, triangle, cross, X, horizontal
bars, vertical bars, checkerboard) drawn in the class's own hue (with jitter in hue,
saturation and value), at a random position and size, on a noisy gray background with a gray
distractor blob. So the class is visible in the lightness alone (shape), and colour carries
information: predicting an object's colour from its lightness requires recognising its shape.

Usage::

    .venv/bin/python benchmarks/make_color_folder.py /tmp/color_shapes --train-per-class 200 --test-per-class 50
"""

from __future__ import annotations

import argparse
import colorsys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = (
    "disk",
    "ring",
    "square",
    "diamond",
    "triangle",
    "cross",
    "x_shape",
    "horizontal_bars",
    "vertical_bars",
    "checkerboard",
)


def shape_mask(name: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of shape ``name`` centred at the origin of the offsets ``dx, dy``."""
    r = np.hypot(dx, dy)
    box = (np.abs(dx) < radius) & (np.abs(dy) < radius)
    stripe = max(1.0, radius / 2.5)
    if name == "disk":
        return r < radius
    if name == "ring":
        return (r < radius) & (r > 0.55 * radius)
    if name == "square":
        return (np.abs(dx) < 0.8 * radius) & (np.abs(dy) < 0.8 * radius)
    if name == "diamond":
        return np.abs(dx) + np.abs(dy) < radius
    if name == "triangle":
        return (dy < 0.8 * radius) & (dy > -radius) & (np.abs(dx) < (dy + radius) / 2)
    if name == "cross":
        return ((np.abs(dx) < radius / 3) & (np.abs(dy) < radius)) | (
            (np.abs(dy) < radius / 3) & (np.abs(dx) < radius)
        )
    if name == "x_shape":
        return (np.abs(np.abs(dx) - np.abs(dy)) < radius / 3) & box
    if name == "horizontal_bars":
        return box & (np.floor((dy + radius) / stripe) % 2 == 0)
    if name == "vertical_bars":
        return box & (np.floor((dx + radius) / stripe) % 2 == 0)
    if name == "checkerboard":
        return box & ((np.floor((dx + radius) / stripe) + np.floor((dy + radius) / stripe)) % 2 == 0)
    raise ValueError(f"unknown shape {name!r}")


def make_image(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One (size, size, 3) uint8 image of class ``label``."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    background = rng.uniform(0.1, 0.45)
    image = np.full((size, size, 3), background) + rng.normal(0, 0.03, (size, size, 1))
    # a gray distractor blob, so that "any bright pixel" is not the object
    cx, cy, radius = rng.uniform(0, size, 2).tolist() + [rng.uniform(2, 4)]
    image[np.hypot(x - cx, y - cy) < radius] = rng.uniform(0.2, 0.7)
    radius = rng.uniform(0.22, 0.34) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    mask = shape_mask(CLASSES[label], x - cx, y - cy, radius)
    hue = (label / len(CLASSES) + rng.normal(0, 0.02)) % 1.0
    colour = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.65, 1.0))
    image[mask] = colour
    image += rng.normal(0, 0.02, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def write_split(root: Path, split: str, per_class: int, rng: np.random.Generator, size: int) -> None:
    for label, name in enumerate(CLASSES):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            Image.fromarray(make_image(label, rng, size)).save(folder / f"{index:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    write_split(args.root, "train", args.train_per_class, rng, args.image_size)
    write_split(args.root, "test", args.test_per_class, rng, args.image_size)
    total = len(CLASSES) * (args.train_per_class + args.test_per_class)
    print(f"wrote {total} images of {len(CLASSES)} classes under {args.root}")


if __name__ == "__main__":
    main()
