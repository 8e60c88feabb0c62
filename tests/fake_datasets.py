"""Writers of tiny datasets in the real on-disk formats, for testing the readers offline.

Each writer follows the format's published description (quoted in its docstring) rather than
the reader's code, and returns what it wrote as (N, C, H, W) uint8 images and 0-based labels,
so a test can compare what the datamodule reads back.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

FakeSplit = tuple[np.ndarray, np.ndarray]  # images (N, C, H, W) uint8, labels (N,) int64


def make_split(num_classes: int, per_class: int, channels: int, size: int, seed: int) -> FakeSplit:
    """Random images, ``per_class`` of every class, classes interleaved (0, 1, 2, ..., 0, 1, ...)."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(num_classes), per_class).astype(np.int64)
    images = rng.integers(0, 256, size=(len(labels), channels, size, size), dtype=np.uint8)
    return images, labels


# -- MNIST / Fashion-MNIST ---------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """IDX: bytes 0, 0, a type code (0x08 unsigned byte), the number of dimensions, then each
    dimension as a big-endian 32-bit integer, then the data, last index fastest."""
    assert array.dtype == np.uint8
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.tobytes(order="C")
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as file:
            file.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist(
    root: Path, folder: str = "MNIST", train_per_class: int = 4, test_per_class: int = 2, gz: bool = False
) -> dict[str, FakeSplit]:
    """``root/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` like torchvision stores them."""
    raw = root / folder / "raw"
    splits = {
        "train": make_split(10, train_per_class, 1, 28, 1),
        "test": make_split(10, test_per_class, 1, 28, 2),
    }
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = splits[split]
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[:, 0], gz=gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8), gz=gz)
    return splits


# -- CIFAR-10 / CIFAR-100 ----------------------------------------------------------------
def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """ "Each row of the array stores a 32x32 colour image. The first 1024 entries contain the red
    channel values, the next 1024 the green, and the final 1024 the blue. The image is stored in
    row-major order, so that the first 32 entries of the array are the red channel values of the
    first row of the image." (cs.toronto.edu/~kriz/cifar.html)"""
    red, green, blue = images[:, 0], images[:, 1], images[:, 2]
    return np.concatenate([c.reshape(len(images), 1024) for c in (red, green, blue)], axis=1)


def _dump(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        pickle.dump(entry, file, protocol=2)


def write_cifar10(
    root: Path, train_per_class: int = 5, test_per_class: int = 2, skip_class: int | None = None
):
    """``root/cifar-10-batches-py/data_batch_1..5``, ``test_batch``, ``batches.meta`` (bytes keys,
    as Python 3 writes them)."""
    folder = root / "cifar-10-batches-py"
    train = make_split(10, train_per_class, 3, 32, 3)
    if skip_class is not None:
        keep = train[1] != skip_class
        train = (train[0][keep], train[1][keep])
    test = make_split(10, test_per_class, 3, 32, 4)
    for i, part in enumerate(np.array_split(np.arange(len(train[1])), 5), start=1):
        _dump(
            folder / f"data_batch_{i}",
            {
                b"batch_label": f"training batch {i} of 5".encode(),
                b"labels": train[1][part].tolist(),
                b"data": _cifar_rows(train[0][part]),
                b"filenames": [f"img_{j}.png".encode() for j in part],
            },
        )
    _dump(
        folder / "test_batch",
        {b"batch_label": b"testing batch 1 of 1", b"labels": test[1].tolist(), b"data": _cifar_rows(test[0])},
    )
    _dump(folder / "batches.meta", {b"label_names": [f"class{c}".encode() for c in range(10)]})
    return {"train": train, "test": test}


def write_cifar100(root: Path, train_per_class: int = 2, test_per_class: int = 1):
    """``root/cifar-100-python/train``, ``test``, ``meta`` with ``fine_labels`` and ``coarse_labels``
    (str keys, as the original Python 2 files have once loaded with ``encoding="latin1"``)."""
    folder = root / "cifar-100-python"
    splits = {
        "train": make_split(100, train_per_class, 3, 32, 5),
        "test": make_split(100, test_per_class, 3, 32, 6),
    }
    for name, (images, labels) in splits.items():
        _dump(
            folder / name,
            {
                "filenames": [f"{name}_{j}.png" for j in range(len(labels))],
                "fine_labels": labels.tolist(),
                "coarse_labels": (labels // 5).tolist(),
                "data": _cifar_rows(images),
            },
        )
    _dump(folder / "meta", {"fine_label_names": [f"c{c}" for c in range(100)]})
    return splits


# -- SVHN ----------------------------------------------------------------------------------
def write_svhn(root: Path, train_per_class: int = 4, test_per_class: int = 2, extra_per_class: int = 0):
    """``root/{train,test,extra}_32x32.mat``: "X which is a 4-D matrix containing the images, and
    y which is a vector of class labels ... X(:,:,:,i) gives the i-th 32x32 RGB image, with
    class label y(i)"; digit 0 has label 10."""
    import scipy.io

    root.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": make_split(10, train_per_class, 3, 32, 7),
        "test": make_split(10, test_per_class, 3, 32, 8),
    }
    if extra_per_class:
        splits["extra"] = make_split(10, extra_per_class, 3, 32, 9)
    for name, (images, labels) in splits.items():
        x = np.empty((32, 32, 3, len(labels)), dtype=np.uint8)
        for i, image in enumerate(images):
            for c in range(3):
                x[:, :, c, i] = image[c]  # (row, column) of channel c
        y = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(str(root / f"{name}_32x32.mat"), {"X": x, "y": y})
    return splits


# -- STL-10 --------------------------------------------------------------------------------
def _stl_bytes(images: np.ndarray) -> bytes:
    """ "The images are stored in column-major order, one channel at a time. That is, the first
    96*96 values are the red channel, the next 96*96 are green, and the last are blue."
    (cs.stanford.edu/~acoates/stl10/)"""
    return b"".join(image[c].tobytes(order="F") for image in images for c in range(3))


def write_stl10(root: Path, train_per_class: int = 3, test_per_class: int = 2, num_unlabeled: int = 25):
    """``root/stl10_binary/{train,test}_{X,y}.bin`` (labels 1..10) and ``unlabeled_X.bin``."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": make_split(10, train_per_class, 3, 96, 10),
        "test": make_split(10, test_per_class, 3, 96, 11),
    }
    for name, (images, labels) in splits.items():
        (folder / f"{name}_X.bin").write_bytes(_stl_bytes(images))
        (folder / f"{name}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
    unlabeled = np.random.default_rng(12).integers(0, 256, size=(num_unlabeled, 3, 96, 96), dtype=np.uint8)
    (folder / "unlabeled_X.bin").write_bytes(_stl_bytes(unlabeled))
    splits["unlabeled"] = (unlabeled, np.full(num_unlabeled, -1, dtype=np.int64))
    return splits


# -- ImageFolder ---------------------------------------------------------------------------
def write_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "emu"),
    train_per_class: int = 4,
    test_per_class: int | None = 2,
    val_per_class: int | None = None,
    num_unlabeled: int = 6,
) -> Path:
    """PNG/JPEG files of mixed sizes and modes: ``train/<class>/`` (one file nested a level
    deeper), ``test/<class>/``, optional ``val/<class>/``, ``unlabeled/`` nested two levels."""
    from PIL import Image

    rng = np.random.default_rng(13)

    def save(path: Path, index: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        height, width = 20 + index % 3 * 7, 24 + index % 2 * 11  # non-square, varying
        if index % 2:
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(path)
        else:
            Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L").save(path)

    splits = {"train": train_per_class, "test": test_per_class, "val": val_per_class}
    for split, count in splits.items():
        for name in classes if count else ():
            for i in range(count):
                nested = "sub/" if split == "train" and i == 0 else ""
                save(root / split / name / f"{nested}{name}_{i}.png", i)
    for i in range(num_unlabeled):
        save(root / "unlabeled" / f"part{i % 2}" / "deep" / f"u{i}.png", i)
    (root / "train" / classes[0] / "notes.txt").write_text("not an image; ignored")
    return root
