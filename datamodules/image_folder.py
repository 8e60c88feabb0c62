"""Any folder of images: ``root/train/<class>/…``, optional ``unlabeled/``, ``val/`` and ``test/``.

Every file is decoded once, up front and in parallel, when the datamodule is set up (before the
first training step): a file that cannot be decoded is reported there, with its path and the fix.
The decoded images (uint8 at ``image_size``) are kept in memory when they fit
``memory_budget_mb``, else in a ``.npy`` file under ``cache_dir`` read as a memory map, so every
epoch reads tensors instead of decoding files. The cache is keyed on every file's path, size and
modification time plus ``image_size`` and ``channels``: a changed, added or removed file rebuilds it.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.base import _FIXED_SPLIT_SEED, UNKNOWN_LABEL, SemiSupervisedDataModule, stratified_holdout

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
_LAYOUT = (
    "expected layout: root/train/<class>/<images> (required), root/unlabeled/<any nesting>/<images>, "
    "root/val/<class>/<images> and root/test/<class>/<images> (optional)"
)
_CACHE_VERSION = 1  # bump when decode_image changes what it returns
_DECODE_CHUNK = 64  # images per thread-pool task
# Decoded folders kept in this process (fingerprint -> DecodedImages), so that a second
# datamodule over the same files (fit, then test, in one process) decodes nothing; the two
# most recent within their memory budget only, to bound memory.
_IN_PROCESS: OrderedDict[str, DecodedImages] = OrderedDict()
_IN_PROCESS_SIZE = 2
_CHECKED: set[str] = set()  # fingerprints of folders checked with cache="none"


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: Path) -> list[str]:
    """Every image file under ``folder`` at any depth, in a deterministic (sorted) order."""
    found = []
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found.extend(os.path.join(directory, name) for name in sorted(files) if _is_image(name))
    return found


def _has_image(folder: Path) -> bool:
    return any(any(_is_image(name) for name in files) for _, _, files in os.walk(folder, followlinks=True))


def _class_folders(split: Path) -> list[str]:
    return sorted(
        entry.name for entry in os.scandir(split) if entry.is_dir() and not entry.name.startswith(".")
    )


def decode_image(path: str, image_size: int, channels: int) -> torch.Tensor:
    """Decode, convert to ``channels``, resize the shorter side to ``image_size`` and centre-crop.

    Returns:
        Shape: (channels, image_size, image_size), uint8.

    Raises:
        RuntimeError: naming ``path``, when the file cannot be decoded.
    """
    from PIL import Image

    try:
        with Image.open(path) as opened:
            image = opened.convert("L" if channels == 1 else "RGB")
        width, height = image.size
        scale = image_size / min(width, height)
        resized = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
        image = image.resize(resized, Image.Resampling.BILINEAR)  # Pillow antialiases when shrinking
        left, top = (resized[0] - image_size) // 2, (resized[1] - image_size) // 2
        array = np.asarray(image.crop((left, top, left + image_size, top + image_size)), dtype=np.uint8)
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise RuntimeError(f"cannot decode image {path}: {err}") from err
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def decode_images(
    paths: Sequence[str], image_size: int, channels: int, out: np.ndarray | None = None, threads: int = 0
) -> None:
    """Decode every file with a thread pool (Pillow releases the GIL while decoding and resizing).

    Args:
        paths: the image files.
        out: Shape: (len(paths), channels, image_size, image_size), uint8; receives the images
            (row ``i`` is ``paths[i]``). ``None``: only check that every file decodes.
        threads: pool size; ``0`` is one per CPU core (at most 16).

    Raises:
        ValueError: one line naming every file that cannot be decoded (the first five, and how
            many more) and the fix, after trying all of them.
    """
    paths = list(paths)
    failures: list[tuple[str, BaseException]] = []

    def work(start: int) -> list[tuple[str, BaseException]]:
        failed = []
        for row in range(start, min(start + _DECODE_CHUNK, len(paths))):
            try:
                image = decode_image(paths[row], image_size, channels)
            except RuntimeError as err:
                failed.append((paths[row], err.__cause__ or err))
                continue
            if out is not None:
                out[row] = image.numpy()
        return failed

    threads = threads or max(1, min(16, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for failed in pool.map(work, range(0, len(paths), _DECODE_CHUNK)):
            failures.extend(failed)
    if failures:
        shown = "; ".join(f"{path} ({_one_line(err)})" for path, err in failures[:5])
        more = f"; and {len(failures) - 5} more" if len(failures) > 5 else ""
        raise ValueError(
            f"{len(failures)} of {len(paths)} image files cannot be decoded: {shown}{more}. "
            "Remove or replace these files (re-export or re-download them), then run again."
        )


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def folder_fingerprint(paths: Sequence[str], image_size: int, channels: int) -> str:
    """A key of the decoded images: every file's path, size and modification time, the size and
    channels it is decoded to, and the decoder's version."""
    digest = hashlib.sha256(f"v{_CACHE_VERSION}|{image_size}|{channels}|{len(paths)}".encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"\0{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ssl_modules/image_folder`` (``~/.cache/…`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ssl_modules" / "image_folder"


class DecodedImages:
    """Every image of a folder decoded once: uint8 (N, C, S, S), in memory or memory-mapped.

    Args:
        paths: the files, row ``i`` is ``paths[i]``.
        tensor: the images in memory; or
        file: a ``.npy`` file holding them, opened as a memory map (lazily, per process: a
            memory map is not pickled into DataLoader workers).
    """

    def __init__(self, paths: Sequence[str], tensor: torch.Tensor | None = None, file: Path | None = None):
        if (tensor is None) == (file is None):
            raise ValueError("pass exactly one of tensor and file")
        self.paths = list(paths)
        self.rows = {path: row for row, path in enumerate(self.paths)}
        self.tensor = tensor
        self.file = file
        self._memmap: np.ndarray | None = None

    @property
    def in_memory(self) -> bool:
        return self.tensor is not None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_memmap": None}

    def take(self, rows: np.ndarray) -> torch.Tensor:
        """Shape: (len(rows), C, S, S), uint8: the images at ``rows``, one indexing operation."""
        if self.tensor is not None:
            return self.tensor[torch.from_numpy(np.asarray(rows, dtype=np.int64))]
        if self._memmap is None:
            self._memmap = np.load(self.file, mmap_mode="r")
        return torch.from_numpy(np.ascontiguousarray(self._memmap[np.asarray(rows, dtype=np.int64)]))


class ImageFileDataset(Dataset):
    """Image files decoded lazily (in the DataLoader workers), one fixed size and channel count.

    The ``cache="none"`` path of ``ImageFolderDataModule``: every epoch decodes every file again.

    Args:
        paths: the image files.
        targets: Shape: (num_images,), class indices or ``-1``.
    """

    def __init__(self, paths: Sequence[str], targets: np.ndarray, image_size: int, channels: int) -> None:
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths = list(paths)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = decode_image(self.paths[index], self.image_size, self.channels)
        return image, torch.tensor(self.targets[index], dtype=torch.long)


class DecodedImageDataset(Dataset):
    """Rows of a ``DecodedImages`` store; ``__getitems__`` serves a batch with one indexing operation.

    Args:
        images: the decoded folder.
        rows: Shape: (num_images,), the store rows of this dataset's images, in order.
        targets: Shape: (num_images,), class indices or ``-1``.
    """

    def __init__(self, images: DecodedImages, rows: np.ndarray, targets: np.ndarray) -> None:
        if len(rows) != len(targets):
            raise ValueError(f"{len(rows)} rows but {len(targets)} targets")
        self.images = images
        self.rows = np.asarray(rows, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)

    @property
    def paths(self) -> list[str]:
        return [self.images.paths[row] for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = np.asarray(indices, dtype=np.int64)
        return self.images.take(self.rows[index]), torch.from_numpy(self.targets[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = self.__getitems__([index])
        return images[0], targets[0]


class ImageFolderDataModule(SemiSupervisedDataModule):
    """Images in class folders, grayscale or RGB, resized to one size.

    Layout under ``root``:

    - ``train/<class>/…`` (required): the labeled source; class indices follow the sorted
      folder names. Files may be nested inside a class folder.
    - ``unlabeled/…`` (optional, any nesting): extra images for the unlabeled pool (``y_hidden = -1``).
    - ``val/<class>/…`` (optional): else ``val_size`` of train is held out.
    - ``test/<class>/…`` (optional): else a fixed stratified ``test_size`` of train is held out
      (independent of ``split_seed``). ``val``/``test`` may hold a subset of the train classes.

    Images are converted to ``channels`` (1: grayscale, 3: RGB), their shorter side resized to
    ``image_size`` (bilinear) and centre-cropped square. The folder structure is checked in
    ``__init__``: a missing ``train/``, a class folder without images, or a ``val``/``test``
    class unknown to ``train`` is refused there. ``setup`` (before the first training step)
    decodes every file once, in parallel, and refuses a file that cannot be decoded, naming it;
    the decoded images are what every epoch reads (see ``cache``).

    Args:
        root: the dataset folder.
        image_size: side of the square images that leave the datamodule.
        channels: 1 (grayscale) or 3 (RGB).
        mean: per-channel mean for the model's normalisation; default ImageNet's (their
            channel average for grayscale).
        std: per-channel standard deviation, as ``mean``.
        horizontal_flip: whether a mirrored image keeps its class (False for text, digits…).
        test_size: fraction of train held out as test when there is no ``test/``.
        the rest: as in ``SemiSupervisedDataModule``.
        cache: where the decoded images live. ``"auto"``: in memory when they fit
            ``memory_budget_mb``, else ``"disk"``. ``"memory"``: in memory. ``"disk"``: a
            ``.npy`` file under ``cache_dir``, memory-mapped, reused by later runs while no file
            changes. ``"none"``: decode every file again every epoch (files are still checked
            up front).
        memory_budget_mb: the most decoded bytes (N x channels x image_size², in MiB) that
            ``cache="auto"`` keeps in memory.
        cache_dir: folder of the ``"disk"`` cache; default ``$XDG_CACHE_HOME/ssl_modules/image_folder``
            (``~/.cache/…``). An existing cache file of the same files is also loaded by
            ``"memory"``/``"auto"`` instead of decoding.

    Images leave as uint8 tensors of shape (channels, image_size, image_size).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 64,
        channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        horizontal_flip: bool = True,
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
        cache: Literal["auto", "memory", "disk", "none"] = "auto",
        memory_budget_mb: float = 2048.0,
        cache_dir: str | None = None,
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
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB); got {channels}.")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1; got {image_size}.")
        if cache not in ("auto", "memory", "disk", "none"):
            raise ValueError(f"cache must be 'auto', 'memory', 'disk' or 'none'; got {cache!r}.")
        if memory_budget_mb < 0:
            raise ValueError(f"memory_budget_mb must be >= 0; got {memory_budget_mb}.")
        default_mean, default_std = (
            ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if channels == 3 else ((0.449,), (0.226,))
        )
        mean = tuple(float(m) for m in (mean if mean is not None else default_mean))
        std = tuple(float(s) for s in (std if std is not None else default_std))
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean {mean} and std {std} must have one value per channel ({channels}).")
        self.root = Path(root)
        self.image_size = image_size
        self.channels = channels
        self.mean = mean
        self.std = std
        self.horizontal_flip = horizontal_flip
        self.test_size = test_size
        self.cache = cache
        self.memory_budget_mb = memory_budget_mb
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.classes = self._check_layout()
        self.num_classes = len(self.classes)
        self._listings: dict[str, tuple[list[str], np.ndarray]] = {}
        self._decoded: DecodedImages | None = None
        self._train_test: tuple[Dataset, Dataset] | None = None

    def _check_layout(self) -> list[str]:
        train = self.root / "train"
        if not train.is_dir():
            raise FileNotFoundError(f"{train} does not exist or is not a folder; {_LAYOUT}.")
        classes = _class_folders(train)
        if not classes:
            raise ValueError(f"{train} has no class folders; {_LAYOUT}.")
        for split in ("train", "val", "test"):
            folder = self.root / split
            if not folder.is_dir():
                continue
            names = _class_folders(folder)
            if not names:
                raise ValueError(f"{folder} has no class folders; {_LAYOUT}.")
            unknown = sorted(set(names) - set(classes))
            if unknown:
                raise ValueError(
                    f"{folder} has classes {unknown} that {train} lacks; a model cannot be trained on them. "
                    f"Add them to {train} or remove them from {folder}."
                )
            empty = [str(folder / name) for name in names if not _has_image(folder / name)]
            if empty:
                raise ValueError(
                    f"class folders without image files ({', '.join(IMAGE_EXTENSIONS)}): {empty}; "
                    "add images to them or remove them."
                )
        unlabeled = self.root / "unlabeled"
        if unlabeled.is_dir() and not _has_image(unlabeled):
            raise ValueError(f"{unlabeled} holds no image files; add images or remove the folder.")
        return classes

    # -- files ------------------------------------------------------------------------------
    def _listing(self, split: str) -> tuple[list[str], np.ndarray]:
        """The files of ``split`` (``train``, ``val``, ``test`` or ``unlabeled``) and their labels."""
        if split not in self._listings:
            paths, targets = [], []
            if split == "unlabeled":
                if (self.root / "unlabeled").is_dir():
                    paths = list_images(self.root / "unlabeled")
                targets = [UNKNOWN_LABEL] * len(paths)
            else:
                for index, name in enumerate(self.classes):
                    folder = self.root / split / name
                    if folder.is_dir():
                        found = list_images(folder)
                        paths.extend(found)
                        targets.extend([index] * len(found))
            self._listings[split] = (paths, np.asarray(targets, dtype=np.int64))
        return self._listings[split]

    def _all_paths(self) -> list[str]:
        paths = []
        for split in ("train", "val", "test", "unlabeled"):
            paths.extend(self._listing(split)[0])
        return list(dict.fromkeys(paths))  # one row per path

    def cache_file(self, fingerprint: str) -> Path:
        """The ``.npy`` file of the decoded images with this fingerprint, under ``cache_dir``."""
        return self.cache_dir / f"{self._cache_prefix()}-{fingerprint[:24]}.npy"

    def _cache_prefix(self) -> str:
        root = os.path.abspath(self.root)
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(root).name)[:40] or "root"
        digest = hashlib.sha256(root.encode()).hexdigest()[:8]
        return f"{name}-{digest}-{self.channels}x{self.image_size}px"

    def decoded_images(self) -> DecodedImages | None:
        """Every file of the folder decoded once (``None`` with ``cache="none"``), built on first use.

        Raises:
            ValueError: naming the files that cannot be decoded, and the fix.
        """
        if self.cache == "none":
            return None
        if self._decoded is None:
            self._decoded = self._decode_all()
        return self._decoded

    def check_files(self) -> None:
        """Every file opens and decodes (in parallel), else a one-line ``ValueError`` naming the
        files and the fix. Reuses the decoded cache: files unchanged since they were decoded are
        not decoded again."""
        if self.cache != "none":
            self.decoded_images()
            return
        paths = self._all_paths()
        key = folder_fingerprint(paths, self.image_size, self.channels)
        if key not in _CHECKED:
            decode_images(paths, self.image_size, self.channels, out=None)
            _CHECKED.add(key)

    def _decode_all(self) -> DecodedImages:
        paths = self._all_paths()
        key = folder_fingerprint(paths, self.image_size, self.channels)
        shape = (len(paths), self.channels, self.image_size, self.image_size)
        file = self.cache_file(key)
        fits = math.prod(shape) <= self.memory_budget_mb * 2**20
        if self.cache == "memory" or (self.cache == "auto" and fits):
            if key in _IN_PROCESS:
                _IN_PROCESS.move_to_end(key)
                return _IN_PROCESS[key]
            if _valid_cache_file(file, shape):
                array = np.load(file)
            else:
                array = np.empty(shape, dtype=np.uint8)
                decode_images(paths, self.image_size, self.channels, out=array)
            decoded = DecodedImages(paths, tensor=torch.from_numpy(array))
            if fits:  # kept for a later datamodule in this process only within the budget
                _IN_PROCESS[key] = decoded
                while len(_IN_PROCESS) > _IN_PROCESS_SIZE:
                    _IN_PROCESS.popitem(last=False)
            return decoded
        if not _valid_cache_file(file, shape):
            self._write_cache(paths, shape, file)
        return DecodedImages(paths, file=file)

    def _write_cache(self, paths: list[str], shape: tuple[int, ...], file: Path) -> None:
        """Decode into a temporary ``.npy`` memory map, then rename it into place (atomic: ranks
        or runs building the same cache at once never read a half-written file)."""
        temporary = file.with_name(f"{file.stem}.{os.getpid()}.tmp.npy")
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            out = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=shape)
        except OSError as err:
            raise OSError(
                f"cannot write the decoded-image cache {temporary}: {err}; set cache_dir to a writable "
                "folder, or cache='memory' (or 'none')."
            ) from err
        try:
            decode_images(paths, self.image_size, self.channels, out=out)
            out.flush()
            del out
            os.replace(temporary, file)
        finally:
            if temporary.exists():
                temporary.unlink()
        for stale in file.parent.glob(f"{self._cache_prefix()}-*.npy"):  # earlier versions of the files
            if stale != file and ".tmp" not in stale.name:
                stale.unlink(missing_ok=True)

    # -- splits ----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if not self._prepared:
            self.check_files()  # before the split and before any step: a corrupt file fails here
        super().setup(stage)

    def _dataset(self, paths: list[str], targets: np.ndarray) -> Dataset:
        decoded = self.decoded_images()
        if decoded is None:
            return ImageFileDataset(paths, targets, self.image_size, self.channels)
        rows = np.asarray([decoded.rows[path] for path in paths], dtype=np.int64)
        return DecodedImageDataset(decoded, rows, targets)

    def _train_and_test(self) -> tuple[Dataset, Dataset]:
        if self._train_test is None:
            paths, targets = self._listing("train")
            if (self.root / "test").is_dir():
                test = self._dataset(*self._listing("test"))
            else:
                held = stratified_holdout(targets, self.test_size, seed=_FIXED_SPLIT_SEED)
                test = self._dataset([paths[i] for i in held], targets[held])
                keep = np.setdiff1d(np.arange(len(paths)), held)
                paths, targets = [paths[i] for i in keep], targets[keep]
            self._train_test = (self._dataset(paths, targets), test)
        return self._train_test

    def load_split(self, name: str) -> Dataset | None:
        if name == "train":
            return self._train_and_test()[0]
        if name == "test":
            return self._train_and_test()[1]
        if name == "val":
            return self._dataset(*self._listing("val")) if (self.root / "val").is_dir() else None
        if name == "unlabeled":
            if not (self.root / "unlabeled").is_dir():
                return None
            return self._dataset(*self._listing("unlabeled"))
        return None

    def _unlabeled_dataset(self) -> Dataset:
        # One dataset over the decoded rows of the pool and of unlabeled/, so an unlabeled batch
        # is one indexing operation (the base class's ConcatDataset would fetch image by image).
        train, extra = self.train_dataset, self.extra_unlabeled_dataset
        if not isinstance(train, DecodedImageDataset):
            return super()._unlabeled_dataset()
        rows, targets = train.rows[self.unlabeled_indices], train.targets[self.unlabeled_indices]
        if isinstance(extra, DecodedImageDataset):
            rows, targets = np.concatenate([rows, extra.rows]), np.concatenate([targets, extra.targets])
        return DecodedImageDataset(train.images, rows, targets)


def _valid_cache_file(file: Path, shape: tuple[int, ...]) -> bool:
    """Whether ``file`` is a complete ``.npy`` of uint8 images of ``shape``."""
    if not file.is_file():
        return False
    try:
        array = np.load(file, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return array.dtype == np.uint8 and array.shape == shape
