"""Method-agnostic data: labeled/unlabeled splits, loaders and datasets."""

from datamodules.base import SemiSupervisedDataModule
from datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from datamodules.digits import DigitsDataModule
from datamodules.image_folder import ImageFolderDataModule
from datamodules.mnist import FashionMNISTDataModule, MNISTDataModule
from datamodules.stl10 import STL10DataModule
from datamodules.svhn import SVHNDataModule
from datamodules.synthetic import SyntheticDataModule

__all__ = [
    "SemiSupervisedDataModule",
    "DigitsDataModule",
    "MNISTDataModule",
    "FashionMNISTDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "SVHNDataModule",
    "STL10DataModule",
    "ImageFolderDataModule",
    "SyntheticDataModule",
]
