"""SVHN (Street View House Numbers), read from the cropped-digit ``.mat`` files."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from datamodules.base import InMemoryDataset
from datamodules.readers import DownloadableDataModule, check_labels, read_svhn_mat, resize_images

_SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}


class SVHNDataModule(DownloadableDataModule):
    """SVHN cropped digits: 73,257 train and 26,032 test images, 32x32 RGB, 10 classes.

    Files: ``root/train_32x32.mat`` and ``root/test_32x32.mat`` (and ``extra_32x32.mat`` with
    ``extra_as_unlabeled``), where ``torchvision.datasets.SVHN(root, split, download=True)``
    puts them. Label 10 in the files is the digit 0. Validation is held out of train.

    Args:
        root: folder holding the ``.mat`` files.
        download: fetch missing files with torchvision (needs network).
        image_size: images are resized (bilinear, antialiased) to this size if not 32.
        extra_as_unlabeled: add the 531,131 "extra" images to the unlabeled pool (held in
            memory: about 1.6 GB). Their ``y_hidden`` is their true label.
        the rest: as in ``SemiSupervisedDataModule``.

    Images leave as uint8 tensors of shape (3, image_size, image_size).
    """

    dataset_name = "SVHN"
    horizontal_flip = False  # a mirrored 2, 3, 5 or 7 is not that digit

    def __init__(
        self,
        root: str = "data/svhn",
        download: bool = True,
        image_size: int = 32,
        extra_as_unlabeled: bool = False,
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
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1; got {image_size}.")
        self.image_size = image_size
        self.extra_as_unlabeled = extra_as_unlabeled
        self.num_classes = 10
        self.channels = 3
        self.mean = (0.4377, 0.4438, 0.4728)
        self.std = (0.1980, 0.2010, 0.1970)

    def _splits_used(self) -> list[str]:
        return ["train", "test"] + (["extra"] if self.extra_as_unlabeled else [])

    def missing_files(self) -> list[Path]:
        paths = [self.root / _SVHN_FILES[split] for split in self._splits_used()]
        return [path for path in paths if not path.is_file()]

    def fetch(self) -> None:
        import torchvision.datasets

        for split in self._splits_used():
            if not (self.root / _SVHN_FILES[split]).is_file():
                torchvision.datasets.SVHN(str(self.root), split=split, download=True)

    def load_split(self, name: str) -> Dataset | None:
        split = {"train": "train", "test": "test", "unlabeled": "extra"}.get(name)
        if split is None or split not in self._splits_used():
            return None
        self.ensure_files()
        path = self.root / _SVHN_FILES[split]
        images, labels = read_svhn_mat(path)
        check_labels(labels, self.num_classes, path)
        pixels = resize_images(torch.from_numpy(images), self.image_size)  # (N, 3, size, size)
        return InMemoryDataset(pixels, torch.from_numpy(labels))
