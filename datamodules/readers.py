"""Readers of the datasets' real on-disk formats, and the download-or-explain step they share.

The files are read here rather than through torchvision's dataset classes: those verify md5
sums, so the tiny files the tests write in the same formats would be refused. torchvision is
used only to fetch the files, into the layout its dataset classes use, so a ``root`` already
filled by torchvision works unchanged.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from datamodules.base import UNKNOWN_LABEL, SemiSupervisedDataModule

# --------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST: IDX files (http://yann.lecun.com/exdb/mnist/, "FILE FORMATS")
# --------------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: "i2", 0x0C: "i4", 0x0D: "f4", 0x0E: "f8"}


def existing_variant(path: Path) -> Path | None:
    """``path`` if it exists, else ``path + ".gz"`` if that exists, else None."""
    if path.is_file():
        return path
    gz = path.with_name(path.name + ".gz")
    return gz if gz.is_file() else None


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a native-endian array of the shape it declares.

    Layout: two zero bytes, a type byte, the number of dimensions, one big-endian uint32 per
    dimension, then the data in C order (big-endian for multi-byte types).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number); re-download it.")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]]).newbyteorder(">")
    count = math.prod(dims)
    if len(data) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path} declares shape {dims} ({count * dtype.itemsize} bytes) but holds {len(data) - header} "
            "bytes of data; the file is truncated or corrupt, re-download it."
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


# --------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100: Python pickles (https://www.cs.toronto.edu/~kriz/cifar.html)
# --------------------------------------------------------------------------------------
_SAFE_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),  # written by numpy 1.x
    ("numpy._core.multiarray", "_reconstruct"),  # written by numpy 2.x
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
}
_SAFE_BUILTINS = {
    "list",
    "dict",
    "tuple",
    "set",
    "frozenset",
    "bytes",
    "bytearray",
    "str",
    "int",
    "float",
    "bool",
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only numpy array reconstruction and plain builtin types: a file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_PICKLE_GLOBALS or (module == "builtins" and name in _SAFE_BUILTINS):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: a CIFAR batch holds only arrays, lists and dicts"
        )


def load_pickle_safely(path: str | Path) -> Any:
    """Unpickle ``path`` allowing numpy arrays and builtins only.

    Uses ``encoding="latin1"`` as the original (Python 2) CIFAR files need; bytes keys written
    by Python 3 stay bytes, so callers should normalise keys (see ``read_cifar_batch``).
    """
    with open(path, "rb") as file:
        return _RestrictedUnpickler(file, encoding="latin1").load()


def read_cifar_batch(path: str | Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file as images (N, 3, 32, 32) uint8 and labels (N,) int64.

    Args:
        label_key: ``"labels"`` (CIFAR-10) or ``"fine_labels"`` (CIFAR-100).
    """
    entry = load_pickle_safely(path)
    if not isinstance(entry, dict):
        raise ValueError(f"{path} is not a CIFAR batch (expected a dict, got {type(entry).__name__}).")
    entry = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in entry.items()}
    if "data" not in entry or label_key not in entry:
        raise ValueError(f"{path} is not a CIFAR batch: keys {sorted(entry)} lack 'data' or {label_key!r}.")
    data = np.asarray(entry["data"], dtype=np.uint8)
    labels = np.asarray(entry[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(
            f"{path}: expected 'data' of shape (N, 3072) and N labels; got {data.shape} and {labels.shape}."
        )
    # each row: 1024 red, then 1024 green, then 1024 blue values, each channel row-major
    return data.reshape(-1, 3, 32, 32), labels


# --------------------------------------------------------------------------------------
# SVHN: MATLAB files (http://ufldl.stanford.edu/housenumbers/, format 2)
# --------------------------------------------------------------------------------------
def read_svhn_mat(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A ``*_32x32.mat`` file as images (N, 3, 32, 32) uint8 and labels (N,) in 0..9.

    The file holds ``X`` of shape (32, 32, 3, N) (height, width, channel, image) and ``y`` of
    shape (N, 1) in 1..10, where 10 is the digit 0.
    """
    import scipy.io

    mat = scipy.io.loadmat(str(path))
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{path} is not an SVHN file: it lacks 'X' or 'y'.")
    images, labels = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or images.shape[3] != len(labels):
        raise ValueError(f"{path}: expected X of shape (32, 32, 3, N) and N labels; got {images.shape}.")
    labels[labels == 10] = 0
    return np.ascontiguousarray(images.transpose(3, 2, 0, 1)).astype(np.uint8), labels


# --------------------------------------------------------------------------------------
# STL-10: raw binaries (https://cs.stanford.edu/~acoates/stl10/)
# --------------------------------------------------------------------------------------
STL10_SIZE = 96
_STL10_IMAGE_BYTES = 3 * STL10_SIZE * STL10_SIZE


def read_stl10_labels(path: str | Path) -> np.ndarray:
    """``*_y.bin``: one uint8 per image in 1..10, returned as 0..9 (int64)."""
    return np.fromfile(path, dtype=np.uint8).astype(np.int64) - 1


class STL10BinaryDataset(Dataset):
    """Images of an STL-10 ``*_X.bin`` file, read from a memory map (100k images stay on disk).

    Each image is 3 channels of 96x96 bytes, every channel stored column-major; a batch is
    read with one fancy-indexing operation and transposed to (C, H, W).

    Args:
        path: the ``*_X.bin`` file.
        targets: Shape: (num_images,), the labels; None for the unlabeled split (labels -1).
        image_size: images are resized (bilinear, antialiased) to this size if not 96.
    """

    def __init__(self, path: str | Path, targets: np.ndarray | None, image_size: int = STL10_SIZE) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        if size == 0 or size % _STL10_IMAGE_BYTES:
            raise ValueError(
                f"{self.path} has {size} bytes, not a positive multiple of one 3x96x96 image "
                f"({_STL10_IMAGE_BYTES}); the file is truncated or corrupt, re-download it."
            )
        self.num_images = size // _STL10_IMAGE_BYTES
        if targets is None:
            targets = np.full(self.num_images, UNKNOWN_LABEL, dtype=np.int64)
        if len(targets) != self.num_images:
            raise ValueError(
                f"{self.path} holds {self.num_images} images but its labels file {len(targets)}."
            )
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.int64))
        self.image_size = image_size
        self._memmap: np.memmap | None = None

    def _images(self) -> np.memmap:
        # opened lazily, per process: a memmap must not be pickled into DataLoader workers
        if self._memmap is None:
            self._memmap = np.memmap(
                self.path, dtype=np.uint8, mode="r", shape=(self.num_images, 3, STL10_SIZE, STL10_SIZE)
            )
        return self._memmap

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_memmap": None}

    def __len__(self) -> int:
        return self.num_images

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = np.asarray(indices, dtype=np.int64)
        stored = self._images()[index]  # (B, 3, W, H): column-major channels
        images = torch.from_numpy(np.ascontiguousarray(stored.transpose(0, 1, 3, 2)))  # (B, 3, H, W)
        return resize_images(images, self.image_size), self.targets[torch.from_numpy(index)]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = self.__getitems__([index])
        return images[0], targets[0]


# --------------------------------------------------------------------------------------
# shared
# --------------------------------------------------------------------------------------
def resize_images(images: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """Resize uint8 images to ``size`` x ``size`` (bilinear, antialiased): deterministic.

    Args:
        images: Shape: (N, C, H, W), uint8.

    Returns:
        Shape: (N, C, size, size), uint8; ``images`` itself if already that size.
    """
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8)
    for start in range(0, len(images), chunk):  # chunks bound the float copy's memory
        part = images[start : start + chunk].float()
        part = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = part.round().clamp(0, 255).to(torch.uint8)
    return out


def check_labels(labels: np.ndarray, num_classes: int, source: Path) -> None:
    """Refuse labels outside ``0 .. num_classes - 1`` (a wrong or corrupt labels file)."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{source} has labels in {int(labels.min())}..{int(labels.max())}, outside 0..{num_classes - 1}; "
            "the file is corrupt or belongs to another dataset."
        )


class DownloadableDataModule(SemiSupervisedDataModule):
    """A datamodule over files torchvision can download into ``root``.

    Subclasses implement ``missing_files()`` (the expected paths not on disk) and ``fetch()``
    (download them with torchvision). ``prepare_data`` (run once per node by Lightning)
    downloads when ``download`` is set; every ``load_split`` re-checks, so a datamodule used
    without a Trainer works too, and missing files always give a ``FileNotFoundError`` naming
    the expected path and the fix.

    Args:
        root: the folder torchvision's dataset class would be given as ``root``.
        download: fetch missing files (needs network).
        the rest: as in ``SemiSupervisedDataModule``.
    """

    dataset_name: str = "dataset"

    def __init__(
        self,
        root: str,
        download: bool,
        labels_per_class: int | None,
        label_fraction: float | None,
        split_seed: int,
        labeled_in_unlabeled: bool,
        batch_size: int,
        unlabeled_batch_ratio: int,
        val_size: int | float,
        num_workers: int,
        shuffle_seed: int,
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
        self.root = Path(root)
        self.download = download

    def missing_files(self) -> list[Path]:
        raise NotImplementedError

    def fetch(self) -> None:
        raise NotImplementedError

    def prepare_data(self) -> None:
        self.ensure_files()

    def ensure_files(self) -> None:
        """Download missing files if allowed; otherwise (or if that fails) explain what is missing."""
        missing = self.missing_files()
        if not missing:
            return
        listing = ", ".join(str(path) for path in missing)
        fix = (
            f"place the {self.dataset_name} files there in torchvision's layout, or set download=True "
            "where the network allows (or point root at a folder that has them)"
        )
        if not self.download:
            raise FileNotFoundError(f"{self.dataset_name} files not found: {listing}; {fix}.")
        try:
            self.fetch()
        except Exception as err:
            raise FileNotFoundError(
                f"{self.dataset_name} files not found ({listing}) and downloading them into {self.root} "
                f"failed: {err}; {fix}."
            ) from err
        still_missing = self.missing_files()
        if still_missing:
            raise FileNotFoundError(
                f"{self.dataset_name} was downloaded into {self.root} but "
                f"{', '.join(str(p) for p in still_missing)} is still missing; {fix}."
            )
