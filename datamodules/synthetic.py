"""Generated images: for smoke tests, the conformance suite and examples. No files needed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from datamodules.base import InMemoryDataset, SemiSupervisedDataModule


class SyntheticDataModule(SemiSupervisedDataModule):
    """Each class is a random smooth colour pattern; samples are shifted, noisy copies of it.

    Learnable in a few steps, so a tiny fit shows whether a method trains at all.

    Args:
        num_classes: number of classes (patterns).
        channels: 1 (grayscale) or 3 (RGB).
        image_size: side of the square images.
        train_per_class: images generated per class for the train split.
        test_per_class: images generated per class for the test split.
        seed: seed of the patterns and samples (independent of ``split_seed``).
        the rest: as in ``SemiSupervisedDataModule``.

    Images leave as uint8 tensors of shape (channels, image_size, image_size).
    """

    def __init__(
        self,
        num_classes: int = 4,
        channels: int = 3,
        image_size: int = 16,
        train_per_class: int = 16,
        test_per_class: int = 8,
        seed: int = 0,
        labels_per_class: int | None = 4,
        label_fraction: float | None = None,
        split_seed: int = 0,
        labeled_in_unlabeled: bool = True,
        batch_size: int = 8,
        unlabeled_batch_ratio: int = 1,
        val_size: int | float = 0,
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
        self.num_classes = num_classes
        self.channels = channels
        self.image_size = image_size
        self.mean = (0.5,) * channels
        self.std = (0.25,) * channels
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class
        self.seed = seed
        self._splits: dict[str, InMemoryDataset] | None = None

    def _generate(self) -> dict[str, InMemoryDataset]:
        generator = torch.Generator().manual_seed(self.seed)
        size = self.image_size
        coarse = torch.rand(self.num_classes, self.channels, 4, 4, generator=generator)
        prototypes = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        splits = {}
        for name, per_class in (("train", self.train_per_class), ("test", self.test_per_class)):
            labels = torch.arange(self.num_classes).repeat_interleave(per_class)
            images = prototypes[labels]
            shifts = torch.randint(-2, 3, (len(labels), 2), generator=generator)
            images = torch.stack([img.roll(tuple(s.tolist()), dims=(1, 2)) for img, s in zip(images, shifts)])
            images = images + 0.1 * torch.randn(images.shape, generator=generator)
            splits[name] = InMemoryDataset((images.clamp(0, 1) * 255).round().to(torch.uint8), labels)
        return splits

    def load_split(self, name: str) -> Dataset | None:
        if self._splits is None:
            self._splits = self._generate()
        return self._splits.get(name)
