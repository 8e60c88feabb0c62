"""CIFAR-10 and CIFAR-100, read from the Python-version pickles (loaded without running code)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.base import InMemoryDataset
from datamodules.readers import DownloadableDataModule, check_labels, read_cifar_batch, resize_images


class _CIFARDataModule(DownloadableDataModule):
    """32x32 RGB images in CIFAR batch pickles under ``root/<base_folder>/``."""

    base_folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    horizontal_flip = True  # natural images: a mirrored car is a car

    def _setup_facts(
        self, image_size: int, num_classes: int, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1; got {image_size}.")
        self.image_size = image_size
        self.num_classes = num_classes
        self.channels = 3
        self.mean = mean
        self.std = std

    def missing_files(self) -> list[Path]:
        folder = self.root / self.base_folder
        return [folder / name for name in self.train_files + self.test_files if not (folder / name).is_file()]

    def fetch(self) -> None:
        import torchvision.datasets

        # one archive holds train and test
        getattr(torchvision.datasets, self.dataset_name)(str(self.root), train=True, download=True)

    def load_split(self, name: str) -> Dataset | None:
        files = {"train": self.train_files, "test": self.test_files}.get(name)
        if files is None:
            return None
        self.ensure_files()
        images, labels = [], []
        for file in files:
            path = self.root / self.base_folder / file
            batch_images, batch_labels = read_cifar_batch(path, self.label_key)
            check_labels(batch_labels, self.num_classes, path)
            images.append(batch_images)
            labels.append(batch_labels)
        pixels = torch.from_numpy(np.concatenate(images))  # (N, 3, 32, 32)
        return InMemoryDataset(
            resize_images(pixels, self.image_size), torch.from_numpy(np.concatenate(labels))
        )


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10: 50,000 train and 10,000 test images, 32x32 RGB, 10 classes.

    Files: ``root/cifar-10-batches-py/data_batch_1`` … ``data_batch_5`` and ``test_batch``, where
    ``torchvision.datasets.CIFAR10(root, download=True)`` puts them. Validation is held out of
    train (``val_size``).

    Args:
        root: folder holding ``cifar-10-batches-py/``.
        download: fetch missing files with torchvision (needs network).
        image_size: images are resized (bilinear, antialiased) to this size if not 32.
        the rest: as in ``SemiSupervisedDataModule``.

    Images leave as uint8 tensors of shape (3, image_size, image_size).
    """

    dataset_name = "CIFAR10"
    base_folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    label_key = "labels"

    def __init__(
        self,
        root: str = "data/cifar10",
        download: bool = True,
        image_size: int = 32,
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
        self._setup_facts(image_size, 10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100: 50,000 train and 10,000 test images, 32x32 RGB, 100 fine classes.

    Files: ``root/cifar-100-python/train`` and ``test`` (labels under ``fine_labels``), where
    ``torchvision.datasets.CIFAR100(root, download=True)`` puts them.

    Args:
        root: folder holding ``cifar-100-python/``.
        download: fetch missing files with torchvision (needs network).
        image_size: images are resized (bilinear, antialiased) to this size if not 32.
        the rest: as in ``SemiSupervisedDataModule``.

    Images leave as uint8 tensors of shape (3, image_size, image_size).
    """

    dataset_name = "CIFAR100"
    base_folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    label_key = "fine_labels"

    def __init__(
        self,
        root: str = "data/cifar100",
        download: bool = True,
        image_size: int = 32,
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
        self._setup_facts(image_size, 100, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762))
