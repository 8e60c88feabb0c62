"""Method-agnostic data: labeled/unlabeled splits, loaders and datasets."""

from datamodules.base import SemiSupervisedDataModule
from datamodules.digits import DigitsDataModule

__all__ = ["SemiSupervisedDataModule", "DigitsDataModule"]
