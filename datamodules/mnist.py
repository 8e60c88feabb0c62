"""MNIST and Fashion-MNIST, read from torchvision's raw IDX files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.base import InMemoryDataset
from datamodules.readers import (
    DownloadableDataModule,
    check_labels,
    existing_variant,
    read_idx,
    resize_images,
)

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class _IDXDataModule(DownloadableDataModule):
    """28x28 grayscale images in IDX files under ``root/<dataset_name>/raw/`` (plain or ``.gz``)."""

    def _setup_facts(self, image_size: int, mean: float, std: float) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1; got {image_size}.")
        self.image_size = image_size
        self.num_classes = 10
        self.channels = 1
        self.mean = (mean,)
        self.std = (std,)

    @property
    def raw_folder(self) -> Path:
        return self.root / self.dataset_name / "raw"

    def missing_files(self) -> list[Path]:
        names = [name for pair in _IDX_FILES.values() for name in pair]
        return [self.raw_folder / name for name in names if existing_variant(self.raw_folder / name) is None]

    def fetch(self) -> None:
        import torchvision.datasets

        dataset_class = getattr(torchvision.datasets, self.dataset_name)
        dataset_class(str(self.root), train=True, download=True)  # fetches train and test files

    def load_split(self, name: str) -> Dataset | None:
        if name not in _IDX_FILES:
            return None
        self.ensure_files()
        image_file, label_file = (existing_variant(self.raw_folder / file) for file in _IDX_FILES[name])
        images, labels = read_idx(image_file), read_idx(label_file).astype(np.int64)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{image_file} (shape {images.shape}) and {label_file} (shape {labels.shape}) do not "
                "form one split of N images (N, H, W) and N labels; re-download them."
            )
        check_labels(labels, self.num_classes, label_file)
        pixels = torch.from_numpy(images.astype(np.uint8)).unsqueeze(1)  # (N, 1, 28, 28)
        return InMemoryDataset(resize_images(pixels, self.image_size), torch.from_numpy(labels))


class MNISTDataModule(_IDXDataModule):
    """MNIST handwritten digits: 60,000 train and 10,000 test images, 28x28 grayscale.

    Files: ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (or ``.gz``), where
    ``torchvision.datasets.MNIST(root, download=True)`` puts them. Validation is held out of
    train (``val_size``).

    Args:
        root: folder holding ``MNIST/raw/``.
        download: fetch missing files with torchvision (needs network).
        image_size: images are resized (bilinear, antialiased) to this size if not 28.
        the rest: as in ``SemiSupervisedDataModule``.

    Images leave as uint8 tensors of shape (1, image_size, image_size).
    """

    dataset_name = "MNIST"
    horizontal_flip = False  # a mirrored digit is not that digit

    def __init__(
        self,
        root: str = "data/mnist",
        download: bool = True,
        image_size: int = 28,
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
            root=root,
            download=download,
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
        self._setup_facts(image_size, mean=0.1307, std=0.3081)


class FashionMNISTDataModule(_IDXDataModule):
    """Fashion-MNIST clothing images: 60,000 train and 10,000 test, 28x28 grayscale, 10 classes.

    Files: ``root/FashionMNIST/raw/`` in the MNIST file names, where
    ``torchvision.datasets.FashionMNIST(root, download=True)`` puts them.

    Args:
        root: folder holding ``FashionMNIST/raw/``.
        download: fetch missing files with torchvision (needs network).
        image_size: images are resized (bilinear, antialiased) to this size if not 28.
        the rest: as in ``SemiSupervisedDataModule``.

    Images leave as uint8 tensors of shape (1, image_size, image_size).
    """

    dataset_name = "FashionMNIST"
    horizontal_flip = True  # a mirrored shirt or shoe is still one

    def __init__(
        self,
        root: str = "data/fashion_mnist",
        download: bool = True,
        image_size: int = 28,
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
            root=root,
            download=download,
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
        self._setup_facts(image_size, mean=0.2860, std=0.3530)
