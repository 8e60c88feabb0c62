"""STL-10, read from the binary files, with its 100,000 real unlabeled images."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from datamodules.readers import (
    STL10_SIZE,
    DownloadableDataModule,
    STL10BinaryDataset,
    check_labels,
    read_stl10_labels,
)

_STL10_FILES = {
    "train": ("train_X.bin", "train_y.bin"),
    "test": ("test_X.bin", "test_y.bin"),
    "unlabeled": ("unlabeled_X.bin", None),
}


class STL10DataModule(DownloadableDataModule):
    """STL-10: 5,000 labeled train, 8,000 test and 100,000 unlabeled images, 96x96 RGB, 10 classes.

    The 100k unlabeled images (drawn from a broader distribution than the labeled classes) join
    the unlabeled pool with ``y_hidden = -1``; the labeled split is chosen from the 5,000 train
    images as usual (``labels_per_class`` / ``label_fraction``; neither means all 5,000).
    Images are read from memory maps, so the 100k (2.8 GB) are not loaded into RAM.

    Files: ``root/stl10_binary/{train,test}_{X,y}.bin`` and ``unlabeled_X.bin``, where
    ``torchvision.datasets.STL10(root, download=True)`` puts them. Each image is 3 channels of
    96x96 bytes stored column-major; labels are bytes in 1..10.

    Args:
        root: folder holding ``stl10_binary/``.
        download: fetch missing files with torchvision (needs network).
        image_size: images are resized (bilinear, antialiased) to this size, batch by batch
            as they are read, if not 96.
        use_unlabeled: add the 100k unlabeled images to the unlabeled pool.
        the rest: as in ``SemiSupervisedDataModule``.

    Images leave as uint8 tensors of shape (3, image_size, image_size).
    """

    dataset_name = "STL10"
    horizontal_flip = True  # natural images

    def __init__(
        self,
        root: str = "data/stl10",
        download: bool = True,
        image_size: int = STL10_SIZE,
        use_unlabeled: bool = True,
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
        self.use_unlabeled = use_unlabeled
        self.num_classes = 10
        self.channels = 3
        self.mean = (0.4467, 0.4398, 0.4066)
        self.std = (0.2603, 0.2566, 0.2713)

    @property
    def folder(self) -> Path:
        return self.root / "stl10_binary"

    def missing_files(self) -> list[Path]:
        splits = ["train", "test"] + (["unlabeled"] if self.use_unlabeled else [])
        names = [name for split in splits for name in _STL10_FILES[split] if name is not None]
        return [self.folder / name for name in names if not (self.folder / name).is_file()]

    def fetch(self) -> None:
        import torchvision.datasets

        torchvision.datasets.STL10(str(self.root), split="train", download=True)  # one archive, all splits

    def load_split(self, name: str) -> Dataset | None:
        if name not in _STL10_FILES or (name == "unlabeled" and not self.use_unlabeled):
            return None
        self.ensure_files()
        image_file, label_file = _STL10_FILES[name]
        labels = None
        if label_file is not None:
            labels = read_stl10_labels(self.folder / label_file)
            check_labels(labels, self.num_classes, self.folder / label_file)
        return STL10BinaryDataset(self.folder / image_file, labels, self.image_size)
