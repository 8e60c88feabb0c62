"""scikit-learn's bundled handwritten digits: the embedded, offline default dataset."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from datamodules.base import _FIXED_SPLIT_SEED, InMemoryDataset, SemiSupervisedDataModule, stratified_holdout


class DigitsDataModule(SemiSupervisedDataModule):
    """1,797 8x8 grayscale digits (UCI optdigits test set), shipped inside scikit-learn.

    Needs no download, so it is the default for demos, tests and the benchmark. A fixed
    20 % (stratified, independent of ``split_seed``) is the test split; ``val_size`` of the
    rest is the validation split; the remainder is split into labeled/unlabeled.

    Args:
        image_size: images are upsampled (bilinear) from 8x8 to this size, so that methods
            which cut images into tiles (jigsaw) have pixels to work with.
        test_size: fraction of the 1,797 images kept for ``test/acc``.
        the rest: as in ``SemiSupervisedDataModule``.

    Images leave as uint8 tensors of shape (1, image_size, image_size).
    """

    horizontal_flip = False  # a mirrored 2 or 7 is not a 2 or 7

    def __init__(
        self,
        image_size: int = 16,
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
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 (the digits are 8x8); got {image_size}.")
        self.image_size = image_size
        self.test_size = test_size
        self.num_classes = 10
        self.channels = 1
        self.mean = (0.305,)
        self.std = (0.319,)
        self._splits: dict[str, InMemoryDataset] | None = None

    def _load(self) -> dict[str, InMemoryDataset]:
        if self._splits is None:
            from sklearn.datasets import load_digits

            digits = load_digits()
            pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
            if self.image_size != 8:
                pixels = F.interpolate(pixels, size=self.image_size, mode="bilinear", align_corners=False)
            images = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
            targets = torch.tensor(digits.target, dtype=torch.long)
            test = stratified_holdout(digits.target, self.test_size, seed=_FIXED_SPLIT_SEED)
            train = np.setdiff1d(np.arange(len(targets)), test)
            self._splits = {
                "train": InMemoryDataset(images[train], targets[train]),
                "test": InMemoryDataset(images[test], targets[test]),
            }
        return self._splits

    def load_split(self, name: str) -> Dataset | None:
        return self._load().get(name)
