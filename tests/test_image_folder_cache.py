"""Image folders: every file checked up front (a corrupt one fails in ``setup`` with its path and
the fix), decoded once into a memory or memory-mapped disk cache that later setups reuse, and
never read for a method that does not use the unlabeled loader."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from fake_datasets import write_image_folder
from helpers import tiny_trainer
from PIL import Image

import datamodules.image_folder as image_folder
from datamodules import ImageFolderDataModule
from ssl_modules import SupervisedModule
from ssl_modules.cli import configuration_error_message


@pytest.fixture(autouse=True)
def fresh_process_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a fresh process would: no folder decoded or checked in memory."""
    monkeypatch.setattr(image_folder, "_IN_PROCESS", type(image_folder._IN_PROCESS)())
    monkeypatch.setattr(image_folder, "_CHECKED", set())


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The path of every image decode, in any thread."""
    calls: list[str] = []
    real = image_folder.decode_image

    def counting(path: str, image_size: int, channels: int) -> torch.Tensor:
        calls.append(path)
        return real(path, image_size, channels)

    monkeypatch.setattr(image_folder, "decode_image", counting)
    return calls


def folder(root: Path) -> Path:
    return write_image_folder(root, train_per_class=6, test_per_class=2, val_per_class=1, num_unlabeled=5)


def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".png", ".jpg"))


def datamodule(root: Path, cache: str, cache_dir: Path, **kwargs) -> ImageFolderDataModule:
    settings = dict(image_size=10, channels=1, batch_size=4, labels_per_class=2, val_size=0)
    settings.update(kwargs)
    return ImageFolderDataModule(root=str(root), cache=cache, cache_dir=str(cache_dir), **settings)


def tiny_model(data: ImageFolderDataModule) -> SupervisedModule:
    torch.manual_seed(0)
    return SupervisedModule(
        num_classes=data.num_classes,
        channels=data.channels,
        image_size=data.image_size,
        mean=data.mean,
        std=data.std,
        backbone="small_cnn",
    )


class StepRecorder(L.Callback):
    """(epoch, batch_idx, labeled targets) of every training step, and the batch's parts."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, list[int]]] = []
        self.parts: set[str] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append((trainer.current_epoch, batch_idx, batch["labeled"].labels.tolist()))
        self.parts |= set(batch)


# -- corrupt files: reported in setup, with the path and the fix ---------------------------------
def test_corrupt_files_fail_the_fit_in_setup_before_step_one(tmp_path: Path) -> None:
    root = folder(tmp_path / "data")
    # a JPEG that is not one, and a PNG cut short: both in parts a short fit never reads
    # (unlabeled/ is not even loaded for SupervisedModule, test/ only after training)
    garbage = root / "unlabeled" / "part0" / "broken.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    truncated = root / "test" / "dog" / "dog_0.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    data = datamodule(root, "auto", tmp_path / "cache")
    recorder = StepRecorder()
    with pytest.raises(ValueError) as raised:
        tiny_trainer(max_steps=2, callbacks=[recorder]).fit(tiny_model(data), datamodule=data)
    assert recorder.steps == []  # not a single step ran
    message = configuration_error_message(raised.value)  # what the CLI prints: one line, no traceback
    assert message is not None and "\n" not in message
    assert str(garbage) in message and str(truncated) in message
    assert "2 of" in message and "Remove or replace" in message


@pytest.mark.parametrize("cache", ["none", "disk", "memory"])
def test_every_cache_mode_checks_every_file_in_setup(tmp_path: Path, cache: str) -> None:
    root = folder(tmp_path / "data")
    broken = root / "train" / "emu" / "emu_3.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    data = datamodule(root, cache, tmp_path / "cache")
    expected = f"1 of {len(image_files(root))} image files cannot be decoded: {broken} ("
    with pytest.raises(ValueError, match=re.escape(expected)):
        data.setup("fit")
    assert not list((tmp_path / "cache").glob("*.npy"))  # no half-built cache left behind
    broken.unlink()  # the fix the message names
    datamodule(root, cache, tmp_path / "cache").setup("fit")


# -- decoded once, reused ------------------------------------------------------------------------
def test_a_second_setup_reuses_the_decoded_images(tmp_path: Path, decode_calls: list[str]) -> None:
    root = folder(tmp_path / "data")
    files = image_files(root)
    cache_dir = tmp_path / "cache"
    datamodule(root, "memory", cache_dir).setup("fit")
    assert sorted(decode_calls) == sorted(map(str, files))  # each file decoded exactly once
    decode_calls.clear()
    again = datamodule(root, "memory", cache_dir)  # same process: kept in memory
    again.setup("fit")
    for _ in again.train_dataloader()["unlabeled"]:  # epochs read tensors, not files
        pass
    assert decode_calls == []

    datamodule(root, "disk", cache_dir).setup("fit")  # builds the disk cache once
    decode_calls.clear()
    image_folder._IN_PROCESS.clear()  # a new process: only the disk cache is left
    for cache in ("disk", "memory", "auto"):
        datamodule(root, cache, cache_dir).setup("fit")
    assert decode_calls == []

    # a file replaced (new size and time): the whole key changes, everything is decoded again
    changed = root / "train" / "cat" / "cat_1.png"
    Image.new("L", (30, 30), 200).save(changed)
    os.utime(changed, ns=(10**18, 10**18))
    fresh = datamodule(root, "disk", cache_dir)
    fresh.setup("fit")
    assert len(decode_calls) == len(files)
    (row,) = [i for i, p in enumerate(fresh.train_dataset.paths) if p == str(changed)]
    assert torch.all(fresh.train_dataset[row][0] == 200)
    assert len(list(cache_dir.glob("*.npy"))) == 1  # the stale cache file is removed

    # another image_size or channel count is another cache
    datamodule(root, "memory", cache_dir).setup("fit")
    for cache in ("memory", "disk"):
        other = datamodule(root, cache, cache_dir, image_size=7, channels=3)
        other.setup("fit")
        assert other.train_dataset[0][0].shape == (3, 7, 7)


def test_none_checks_once_per_process_and_decodes_every_epoch(
    tmp_path: Path, decode_calls: list[str]
) -> None:
    root = folder(tmp_path / "data")
    files = image_files(root)
    datamodule(root, "none", tmp_path / "cache").setup("fit")
    assert len(decode_calls) == len(files)
    data = datamodule(root, "none", tmp_path / "cache")
    data.setup("fit")
    assert len(decode_calls) == len(files)  # the check's result is reused
    loader = data.train_dataloader()["labeled"]
    next(iter(loader))
    assert len(decode_calls) == len(files) + 4  # the "before" path: a batch decodes its files
    assert not (tmp_path / "cache").exists()


# -- the cache holds what a fresh decode gives ---------------------------------------------------
def everything(data: ImageFolderDataModule) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every image and target of every split, read item by item."""
    data.setup("fit")
    datasets = {
        "train": data.train_dataset,
        "val": data.val_dataset,
        "test": data.test_dataset,
        "unlabeled": data._unlabeled_dataset(),
    }
    out = {}
    for name, dataset in datasets.items():
        items = [dataset[i] for i in range(len(dataset))]
        out[name] = (torch.stack([x for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items]))
    return out


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_images_equal_a_fresh_decode(tmp_path: Path, cache: str) -> None:
    root = folder(tmp_path / "data")
    classes = ["cat", "dog", "emu"]
    reference = datamodule(root, "none", tmp_path / "unused", channels=3)
    cached = datamodule(root, cache, tmp_path / "cache", channels=3)
    expected, actual = everything(reference), everything(cached)
    for name in expected:
        assert torch.equal(actual[name][0], expected[name][0]), name
        assert torch.equal(actual[name][1], expected[name][1]), name
    # and the labels are the class folders, each image the file's own pixels (PIL, written out)
    train = cached.train_dataset
    for index, path in enumerate(reference.train_dataset.paths):
        relative = Path(path).relative_to(root / "train")
        assert int(train.targets[index]) == classes.index(relative.parts[0])
    with Image.open(reference.train_dataset.paths[0]) as opened:
        rgb = opened.convert("RGB")
    side = min(rgb.size)
    scaled = rgb.resize(
        (max(10, round(rgb.size[0] * 10 / side)), max(10, round(rgb.size[1] * 10 / side))),
        Image.Resampling.BILINEAR,
    )
    left, top = (scaled.size[0] - 10) // 2, (scaled.size[1] - 10) // 2
    pixels = torch.from_numpy(np.asarray(scaled.crop((left, top, left + 10, top + 10))).copy()).permute(
        2, 0, 1
    )
    assert torch.equal(train[0][0], pixels)
    # batches of the training loaders too (the batched path)
    x = next(iter(cached.train_dataloader()["unlabeled"])).images
    x_ref = next(iter(reference.train_dataloader()["unlabeled"])).images
    assert x.dtype == torch.uint8 and torch.equal(x, x_ref)


def test_disk_cache_is_a_memory_map_under_cache_dir(tmp_path: Path) -> None:
    root = folder(tmp_path / "data")
    cache_dir = tmp_path / "my cache"
    data = datamodule(root, "disk", cache_dir)
    data.setup("fit")
    decoded = data.decoded_images()
    (file,) = cache_dir.glob("*.npy")
    assert not decoded.in_memory and decoded.file == file
    assert not list(cache_dir.glob("*.tmp*"))
    stored = np.load(file, mmap_mode="r")
    assert stored.shape == (len(image_files(root)), 1, 10, 10) and stored.dtype == np.uint8
    x, _ = data.train_dataset.__getitems__([0, 3])
    assert isinstance(decoded._memmap, np.memmap)
    rows = data.train_dataset.rows[[0, 3]]
    assert torch.equal(x, torch.from_numpy(np.asarray(stored[rows])))
    # DataLoader workers get the file name, not the mapped pages
    copy = pickle.loads(pickle.dumps(data.train_dataset))
    assert copy.images._memmap is None and torch.equal(copy.__getitems__([0, 3])[0], x)


def test_auto_keeps_images_in_memory_only_within_the_budget(tmp_path: Path) -> None:
    root = folder(tmp_path / "data")
    small = datamodule(root, "auto", tmp_path / "a", memory_budget_mb=1.0)
    small.setup("fit")
    assert small.decoded_images().in_memory and not (tmp_path / "a").exists()
    # 32 images x 1 x 10 x 10 bytes = 3.2 kB > 3 kB
    large = datamodule(root, "auto", tmp_path / "b", memory_budget_mb=3e3 / 2**20)
    large.setup("fit")
    assert not large.decoded_images().in_memory and len(list((tmp_path / "b").glob("*.npy"))) == 1


# -- a method that does not read unlabeled images does not pay for them --------------------------
def test_supervised_fit_reads_no_unlabeled_images_and_sees_the_same_labeled_batches(tmp_path: Path) -> None:
    root = folder(tmp_path / "data")
    runs = {}
    for uses_unlabeled in (False, True):
        data = datamodule(root, "memory", tmp_path / "cache")
        model = tiny_model(data)
        if uses_unlabeled:
            model.uses_unlabeled = True  # as a method that reads the unlabeled batch
        reads: list[int] = []
        real = image_folder.DecodedImages.take

        def counting(store, rows, reads=reads, real=real):
            reads.extend(np.asarray(rows).tolist())
            return real(store, rows)

        recorder = StepRecorder()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(image_folder.DecodedImages, "take", counting)
            trainer = tiny_trainer(max_steps=13, callbacks=[recorder])  # 6 steps per epoch: 3 epochs
            trainer.fit(model, datamodule=data)
        unlabeled_only = set(data._unlabeled_dataset().rows) - set(
            data.train_dataset.rows[data.labeled_indices]
        )
        runs[uses_unlabeled] = (recorder, set(reads) & unlabeled_only, set(trainer.train_dataloader))
    (supervised, supervised_reads, supervised_loaders), (full, full_reads, full_loaders) = (
        runs[False],
        runs[True],
    )
    assert supervised_loaders == {"labeled"} and supervised.parts == {"labeled"}
    assert supervised_reads == set()
    assert full_loaders == {"labeled", "unlabeled"} and full_reads  # the counter does see unlabeled reads
    assert supervised.steps == full.steps  # same epochs, steps and labeled batches
    assert len({epoch for epoch, _, _ in supervised.steps}) == 3
    assert SupervisedModule.uses_unlabeled is False
