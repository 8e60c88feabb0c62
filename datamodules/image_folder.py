"""Any folder of images: ``root/train/<class>/…``, optional ``unlabeled/``, ``val/`` and ``test/``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.base import _FIXED_SPLIT_SEED, UNKNOWN_LABEL, SemiSupervisedDataModule, stratified_holdout

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
_LAYOUT = (
    "expected layout: root/train/<class>/<images> (required), root/unlabeled/<any nesting>/<images>, "
    "root/val/<class>/<images> and root/test/<class>/<images> (optional)"
)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: Path) -> list[str]:
    """Every image file under ``folder`` at any depth, in a deterministic (sorted) order."""
    found = []
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found.extend(os.path.join(directory, name) for name in sorted(files) if _is_image(name))
    return found


def _has_image(folder: Path) -> bool:
    return any(any(_is_image(name) for name in files) for _, _, files in os.walk(folder, followlinks=True))


def _class_folders(split: Path) -> list[str]:
    return sorted(
        entry.name for entry in os.scandir(split) if entry.is_dir() and not entry.name.startswith(".")
    )


def decode_image(path: str, image_size: int, channels: int) -> torch.Tensor:
    """Decode, convert to ``channels``, resize the shorter side to ``image_size`` and centre-crop.

    Returns:
        Shape: (channels, image_size, image_size), uint8.

    Raises:
        RuntimeError: naming ``path``, when the file cannot be decoded.
    """
    from PIL import Image

    try:
        with Image.open(path) as opened:
            image = opened.convert("L" if channels == 1 else "RGB")
        width, height = image.size
        scale = image_size / min(width, height)
        resized = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
        image = image.resize(resized, Image.Resampling.BILINEAR)  # Pillow antialiases when shrinking
        left, top = (resized[0] - image_size) // 2, (resized[1] - image_size) // 2
        array = np.asarray(image.crop((left, top, left + image_size, top + image_size)), dtype=np.uint8)
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise RuntimeError(f"cannot decode image {path}: {err}") from err
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class ImageFileDataset(Dataset):
    """Image files decoded lazily (in the DataLoader workers), one fixed size and channel count.

    Args:
        paths: the image files.
        targets: Shape: (num_images,), class indices or ``-1``.
    """

    def __init__(self, paths: Sequence[str], targets: np.ndarray, image_size: int, channels: int) -> None:
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths = list(paths)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = decode_image(self.paths[index], self.image_size, self.channels)
        return image, torch.tensor(self.targets[index], dtype=torch.long)


class ImageFolderDataModule(SemiSupervisedDataModule):
    """Images in class folders, grayscale or RGB, resized to one size.

    Layout under ``root``:

    - ``train/<class>/…`` (required): the labeled source; class indices follow the sorted
      folder names. Files may be nested inside a class folder.
    - ``unlabeled/…`` (optional, any nesting): extra images for the unlabeled pool (``y_hidden = -1``).
    - ``val/<class>/…`` (optional): else ``val_size`` of train is held out.
    - ``test/<class>/…`` (optional): else a fixed stratified ``test_size`` of train is held out
      (independent of ``split_seed``). ``val``/``test`` may hold a subset of the train classes.

    Images are decoded lazily, converted to ``channels`` (1: grayscale, 3: RGB), their shorter
    side resized to ``image_size`` (bilinear) and centre-cropped square. A file that cannot be
    decoded fails with its path. The folder structure is checked in ``__init__`` (before any
    training): a missing ``train/``, a class folder without images, or a ``val``/``test`` class
    unknown to ``train`` is refused there.

    Args:
        root: the dataset folder.
        image_size: side of the square images that leave the datamodule.
        channels: 1 (grayscale) or 3 (RGB).
        mean, std: per-channel statistics for the model's normalisation; default ImageNet's
            (their channel average for grayscale).
        horizontal_flip: whether a mirrored image keeps its class (False for text, digits…).
        test_size: fraction of train held out as test when there is no ``test/``.
        (the rest as in ``SemiSupervisedDataModule``)

    Images leave as uint8 tensors of shape (channels, image_size, image_size).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 64,
        channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        horizontal_flip: bool = True,
        test_size: float = 0.2,
        labels_per_class: int | None = None,
        label_fraction: float | None = None,
        split_seed: int = 0,
        labeled_in_unlabeled: bool = True,
        batch_size: int = 64,
        unlabeled_batch_ratio: int = 1,
        val_size: int | float = 0.1,
        num_workers: int = 0,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__(
            labels_per_class=labels_per_class,
            label_fraction=label_fraction,
            split_seed=split_seed,
            labeled_in_unlabeled=labeled_in_unlabeled,
            batch_size=batch_size,
            unlabeled_batch_ratio=unlabeled_batch_ratio,
            val_size=val_size,
            num_workers=num_workers,
            shuffle_seed=shuffle_seed,
        )
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB); got {channels}.")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1; got {image_size}.")
        default_mean, default_std = (
            ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if channels == 3 else ((0.449,), (0.226,))
        )
        mean = tuple(float(m) for m in (mean if mean is not None else default_mean))
        std = tuple(float(s) for s in (std if std is not None else default_std))
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean {mean} and std {std} must have one value per channel ({channels}).")
        self.root = Path(root)
        self.image_size = image_size
        self.channels = channels
        self.mean = mean
        self.std = std
        self.horizontal_flip = horizontal_flip
        self.test_size = test_size
        self.classes = self._check_layout()
        self.num_classes = len(self.classes)
        self._train_test: tuple[ImageFileDataset, ImageFileDataset] | None = None

    def _check_layout(self) -> list[str]:
        train = self.root / "train"
        if not train.is_dir():
            raise FileNotFoundError(f"{train} does not exist or is not a folder; {_LAYOUT}.")
        classes = _class_folders(train)
        if not classes:
            raise ValueError(f"{train} has no class folders; {_LAYOUT}.")
        for split in ("train", "val", "test"):
            folder = self.root / split
            if not folder.is_dir():
                continue
            names = _class_folders(folder)
            if not names:
                raise ValueError(f"{folder} has no class folders; {_LAYOUT}.")
            unknown = sorted(set(names) - set(classes))
            if unknown:
                raise ValueError(
                    f"{folder} has classes {unknown} that {train} lacks; a model cannot be trained on them. "
                    f"Add them to {train} or remove them from {folder}."
                )
            empty = [str(folder / name) for name in names if not _has_image(folder / name)]
            if empty:
                raise ValueError(
                    f"class folders without image files ({', '.join(IMAGE_EXTENSIONS)}): {empty}; "
                    "add images to them or remove them."
                )
        unlabeled = self.root / "unlabeled"
        if unlabeled.is_dir() and not _has_image(unlabeled):
            raise ValueError(f"{unlabeled} holds no image files; add images or remove the folder.")
        return classes

    def _labeled_folder(self, split: str) -> ImageFileDataset:
        paths, targets = [], []
        for index, name in enumerate(self.classes):
            folder = self.root / split / name
            if folder.is_dir():
                found = list_images(folder)
                paths.extend(found)
                targets.extend([index] * len(found))
        return ImageFileDataset(paths, np.asarray(targets, dtype=np.int64), self.image_size, self.channels)

    def _train_and_test(self) -> tuple[ImageFileDataset, ImageFileDataset]:
        if self._train_test is None:
            train = self._labeled_folder("train")
            if (self.root / "test").is_dir():
                test = self._labeled_folder("test")
            else:
                held = stratified_holdout(train.targets, self.test_size, seed=_FIXED_SPLIT_SEED)
                keep = np.setdiff1d(np.arange(len(train)), held)
                make = ImageFileDataset
                test = make(
                    [train.paths[i] for i in held], train.targets[held], self.image_size, self.channels
                )
                train = make(
                    [train.paths[i] for i in keep], train.targets[keep], self.image_size, self.channels
                )
            self._train_test = (train, test)
        return self._train_test

    def load_split(self, name: str) -> Dataset | None:
        if name == "train":
            return self._train_and_test()[0]
        if name == "test":
            return self._train_and_test()[1]
        if name == "val":
            return self._labeled_folder("val") if (self.root / "val").is_dir() else None
        if name == "unlabeled":
            folder = self.root / "unlabeled"
            if not folder.is_dir():
                return None
            paths = list_images(folder)
            targets = np.full(len(paths), UNKNOWN_LABEL, dtype=np.int64)
            return ImageFileDataset(paths, targets, self.image_size, self.channels)
        return None
