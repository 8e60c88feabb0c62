"""Datamodules: the labeled/unlabeled split (on the bundled digits), the readers of every real
on-disk format (on tiny files written from the formats' published descriptions), the download
path, the ImageFolder layout checks, and per-rank shards under DDP."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from fake_datasets import write_cifar10, write_image_folder, write_mnist
from torch.utils.data import DataLoader

import datamodules
from datamodules import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    STL10DataModule,
    SVHNDataModule,
)
from datamodules.base import batch_collate
from datamodules.readers import load_pickle_safely, read_idx
from ssl_modules.batch import LabeledBatch, UnlabeledBatch


def read_all(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (image, label) of a dataset, through the same batched path the loaders use."""
    return next(iter(DataLoader(dataset, batch_size=len(dataset), collate_fn=batch_collate)))


def assert_split_equal(dataset, written) -> None:
    images, labels = read_all(dataset)
    assert images.dtype == torch.uint8
    assert torch.equal(images, torch.from_numpy(written[0]))
    assert torch.equal(labels, torch.from_numpy(written[1]))


def digits(**kwargs) -> DigitsDataModule:
    data = DigitsDataModule(**kwargs)
    data.setup("fit")
    return data


# -- the labeled/unlabeled split (base class, on digits) ------------------------------------
def test_labels_per_class_is_balanced_deterministic_and_moves_with_split_seed() -> None:
    first = digits(labels_per_class=5, split_seed=0)
    targets = np.asarray(first.train_dataset.targets)
    assert np.bincount(targets[first.labeled_indices], minlength=10).tolist() == [5] * 10
    assert np.array_equal(first.labeled_indices, digits(labels_per_class=5, split_seed=0).labeled_indices)
    assert not np.array_equal(first.labeled_indices, digits(labels_per_class=5, split_seed=1).labeled_indices)
    # labeled images come only from the train part, never from validation
    held_out = set(first.val_dataset.indices.tolist())
    assert held_out.isdisjoint(first.labeled_indices.tolist())


def test_label_fraction_is_stratified() -> None:
    data = digits(label_fraction=0.1)
    targets = np.asarray(data.train_dataset.targets)
    pool = np.bincount(targets[data.unlabeled_indices], minlength=10)
    labeled = np.bincount(targets[data.labeled_indices], minlength=10)
    assert np.array_equal(labeled, np.maximum(1, np.round(0.1 * pool)).astype(int))


def test_no_budget_labels_every_training_image() -> None:
    data = digits()
    assert np.array_equal(data.labeled_indices, data.unlabeled_indices)


def test_both_budgets_rejected_with_the_fix() -> None:
    with pytest.raises(ValueError, match="pass only one"):
        DigitsDataModule(labels_per_class=5, label_fraction=0.1)


def test_more_labels_than_a_class_has_rejected_before_training() -> None:
    with pytest.raises(
        ValueError, match=r"labels_per_class=1000 but class \d+ has only \d+.*use labels_per_class <="
    ):
        digits(labels_per_class=1000)


def test_labeled_in_unlabeled_switch() -> None:
    inside = digits(labels_per_class=3, labeled_in_unlabeled=True)
    outside = digits(labels_per_class=3, labeled_in_unlabeled=False)
    assert set(inside.labeled_indices) <= set(inside.unlabeled_indices)
    assert set(outside.labeled_indices).isdisjoint(outside.unlabeled_indices)
    assert len(outside.unlabeled_indices) == len(inside.unlabeled_indices) - 30


def test_val_and_test_do_not_move_with_split_seed() -> None:
    a, b = digits(labels_per_class=2, split_seed=0), digits(labels_per_class=2, split_seed=7)
    assert np.array_equal(a.val_dataset.indices, b.val_dataset.indices)
    assert torch.equal(a.test_dataset.images, b.test_dataset.images)


def test_training_batch_is_labeled_and_unlabeled_uint8_with_true_hidden_labels() -> None:
    data = digits(labels_per_class=2, batch_size=8, unlabeled_batch_ratio=3)
    loaders = data.train_dataloader()
    assert set(loaders) == {"labeled", "unlabeled"}
    labeled, unlabeled = next(iter(loaders["labeled"])), next(iter(loaders["unlabeled"]))
    assert isinstance(labeled, LabeledBatch) and isinstance(unlabeled, UnlabeledBatch)
    x, y, u, y_hidden = labeled.images, labeled.labels, unlabeled.images, unlabeled.hidden_labels
    assert x.shape == (8, 1, 16, 16) and u.shape == (24, 1, 16, 16)
    assert x.dtype == u.dtype == torch.uint8 and y.dtype == y_hidden.dtype == torch.int64
    # y_hidden is the true label: find each unlabeled image in the train set and compare
    train_images, train_targets = data.train_dataset.images, data.train_dataset.targets
    for image, hidden in zip(u, y_hidden):
        matches = (train_images == image).flatten(1).all(1).nonzero().flatten()
        assert hidden.item() in train_targets[matches].tolist()
    # the labeled loader only serves labeled images
    labeled_images = train_images[torch.from_numpy(data.labeled_indices)]
    for image in x:
        assert (labeled_images == image).flatten(1).all(1).any()


def test_resume_refuses_another_labeled_split() -> None:
    data = digits(labels_per_class=2, split_seed=0)
    other = digits(labels_per_class=2, split_seed=1)
    other.load_state_dict(other.state_dict())  # its own split: fine
    with pytest.raises(ValueError, match="different labeled split"):
        other.load_state_dict(data.state_dict())


def test_class_missing_from_train_split_is_refused(tmp_path) -> None:
    write_cifar10(tmp_path, skip_class=9)
    with pytest.raises(ValueError, match=r"classes \[9\] have no training images"):
        CIFAR10DataModule(root=str(tmp_path), download=False).setup("fit")


# -- readers of the real formats ------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx(tmp_path, gz) -> None:
    from fake_datasets import write_idx

    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / "a-idx3-ubyte", array, gz=gz)
    path = tmp_path / ("a-idx3-ubyte.gz" if gz else "a-idx3-ubyte")
    assert np.array_equal(read_idx(path), array)
    if not gz:
        path.write_bytes(path.read_bytes()[:-1])
        with pytest.raises(ValueError, match="truncated"):
            read_idx(path)


@pytest.mark.parametrize(
    ("module", "folder", "gz", "flip"),
    [(MNISTDataModule, "MNIST", False, False), (FashionMNISTDataModule, "FashionMNIST", True, True)],
)
def test_mnist_family_reads_idx_files(tmp_path, module, folder, gz, flip) -> None:
    written = write_mnist(tmp_path, folder=folder, gz=gz)
    data = module(root=str(tmp_path), download=False)
    assert (data.num_classes, data.channels, data.image_size, data.horizontal_flip) == (10, 1, 28, flip)
    assert len(data.mean) == len(data.std) == 1
    for split in ("train", "test"):
        images, labels = written[split]
        assert_split_equal(data.load_split(split), (images, labels))
    assert data.load_split("unlabeled") is None


def test_cifar10_reads_python_batches(fake_cifar10) -> None:
    root, written = fake_cifar10
    data = CIFAR10DataModule(root=str(root), download=False)
    assert (data.num_classes, data.channels, data.image_size, data.horizontal_flip) == (10, 3, 32, True)
    assert_split_equal(data.load_split("train"), written["train"])
    assert_split_equal(data.load_split("test"), written["test"])


def test_cifar100_reads_fine_labels(fake_cifar100) -> None:
    root, written = fake_cifar100
    data = CIFAR100DataModule(root=str(root), download=False, labels_per_class=1, val_size=0)
    assert data.num_classes == 100
    assert_split_equal(data.load_split("train"), written["train"])
    assert_split_equal(data.load_split("test"), written["test"])
    data.setup("fit")
    assert len(data.labeled_indices) == 100


def test_pickle_reader_runs_no_code(tmp_path) -> None:
    import os

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Exploit()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        load_pickle_safely(path)
    assert not marker.exists()


def test_svhn_reads_mat_files_label_10_is_zero(fake_svhn) -> None:
    root, written = fake_svhn
    data = SVHNDataModule(root=str(root), download=False)
    assert (data.num_classes, data.channels, data.horizontal_flip) == (10, 3, False)
    train = data.load_split("train")
    assert_split_equal(train, written["train"])
    assert 0 in train.targets.tolist() and 10 not in train.targets.tolist()
    assert_split_equal(data.load_split("test"), written["test"])
    assert data.load_split("unlabeled") is None
    extra = SVHNDataModule(root=str(root), download=False, extra_as_unlabeled=True, batch_size=4)
    assert_split_equal(extra.load_split("unlabeled"), written["extra"])
    extra.setup("fit")
    assert len(extra._unlabeled_dataset()) == len(extra.unlabeled_indices) + 10


def test_stl10_reads_binaries_and_real_unlabeled_split_from_a_memmap(fake_stl10) -> None:
    root, written = fake_stl10
    data = STL10DataModule(root=str(root), download=False, batch_size=4)
    assert (data.num_classes, data.channels, data.image_size) == (10, 3, 96)
    for split in ("train", "test", "unlabeled"):
        assert_split_equal(data.load_split(split), written[split])
    unlabeled = data.load_split("unlabeled")
    assert isinstance(unlabeled._images(), np.memmap)
    assert len(pickle.dumps(unlabeled)) < 10_000  # workers get the path, not the pixels
    single = unlabeled[3]
    assert torch.equal(single[0], torch.from_numpy(written["unlabeled"][0][3])) and single[1].item() == -1
    data.setup("fit")
    assert len(data._unlabeled_dataset()) == len(data.unlabeled_indices) + 25
    x, y_hidden, _ = next(iter(data.train_dataloader()["unlabeled"]))
    assert x.shape == (4, 3, 96, 96) and x.dtype == torch.uint8 and y_hidden.min() >= -1
    without = STL10DataModule(root=str(root), download=False, use_unlabeled=False)
    assert without.load_split("unlabeled") is None


def test_resize_to_image_size_is_deterministic(fake_cifar10, fake_stl10) -> None:
    cifar = CIFAR10DataModule(root=str(fake_cifar10[0]), download=False, image_size=16)
    first, second = read_all(cifar.load_split("test"))[0], read_all(cifar.load_split("test"))[0]
    assert first.shape[1:] == (3, 16, 16) and torch.equal(first, second)
    # the reference: Pillow's antialiased bilinear resize, channel by channel
    from PIL import Image

    original = fake_cifar10[1]["test"][0][0]  # (3, 32, 32)
    channels = [np.asarray(Image.fromarray(c).resize((16, 16), Image.Resampling.BILINEAR)) for c in original]
    assert (first[0].float() - torch.from_numpy(np.stack(channels)).float()).abs().max() <= 1
    stl = STL10DataModule(root=str(fake_stl10[0]), download=False, image_size=48)
    images = read_all(stl.load_split("unlabeled"))[0]
    assert images.shape == (25, 3, 48, 48) and stl.image_size == 48


# -- missing files and downloads ------------------------------------------------------------
def test_missing_files_without_download_name_the_path_and_fix(tmp_path) -> None:
    data = CIFAR10DataModule(root=str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.data_batch_1.*download=True"):
        data.setup("fit")


def test_download_fetches_with_torchvision_then_reads_with_our_readers(tmp_path, monkeypatch) -> None:
    import torchvision.datasets

    calls = []

    class FakeMNIST:  # stands in for the network: writes the files where torchvision would
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            write_mnist(Path(root), folder="MNIST", gz=True)

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    data = MNISTDataModule(root=str(tmp_path), download=True, labels_per_class=2)
    data.prepare_data()
    assert calls == [(str(tmp_path), True, True)]
    data.setup("fit")
    assert len(data.labeled_indices) == 20 and calls == [(str(tmp_path), True, True)]


def test_failed_download_explains(tmp_path, monkeypatch) -> None:
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "STL10", offline)
    data = STL10DataModule(root=str(tmp_path), download=True)
    with pytest.raises(
        FileNotFoundError, match=r"stl10_binary.train_X.bin.*download.*failed.*service not known"
    ):
        data.prepare_data()


# -- ImageFolder -------------------------------------------------------------------------------
def test_image_folder_reads_nested_files_resizes_and_converts(fake_image_folder) -> None:
    data = ImageFolderDataModule(root=str(fake_image_folder), image_size=16, channels=3, batch_size=2)
    assert (data.num_classes, data.classes, data.channels, data.image_size) == (
        3,
        ["cat", "dog", "emu"],
        3,
        16,
    )
    data.setup("fit")
    train, test, unlabeled = data.train_dataset, data.test_dataset, data.extra_unlabeled_dataset
    assert len(train) == 12 and len(test) == 6 and len(unlabeled) == 6
    assert sorted(set(np.asarray(train.targets).tolist())) == [0, 1, 2]
    assert any("/sub/" in path for path in train.paths) and not any(p.endswith(".txt") for p in train.paths)
    assert set(unlabeled.targets.tolist()) == {-1}
    x = next(iter(data.train_dataloader()["labeled"])).images
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.uint8
    gray = ImageFolderDataModule(root=str(fake_image_folder), image_size=12, channels=1)
    gray.setup("fit")
    assert gray.train_dataset[0][0].shape == (1, 12, 12) and gray.mean == (0.449,)


def test_image_folder_resize_keeps_aspect_and_centre(tmp_path) -> None:
    from PIL import Image

    from datamodules.image_folder import decode_image

    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 20:] = 255  # left half black, right half white
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image = decode_image(str(tmp_path / "a.png"), 16, 3)  # 20x40 -> 16x32 -> centre 16x16
    assert image.shape == (3, 16, 16)
    assert image[:, :, :6].max() == 0 and image[:, :, 10:].min() == 255


def test_image_folder_without_test_holds_out_a_fixed_test_split(tmp_path) -> None:
    root = write_image_folder(tmp_path, train_per_class=6, test_per_class=None, val_per_class=2)
    splits = []
    for seed in (0, 1):
        data = ImageFolderDataModule(root=str(root), image_size=8, labels_per_class=1, split_seed=seed)
        data.setup("fit")
        assert set(data.test_dataset.paths).isdisjoint(data.train_dataset.paths)
        assert len(data.val_dataset) == 6  # root/val is used, not a hold-out
        splits.append(data.test_dataset.paths)
    assert splits[0] == splits[1] and len(splits[0]) == 3


def test_image_folder_layout_errors_before_training(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train.*expected layout: root/train/<class>"):
        ImageFolderDataModule(root=str(tmp_path))
    root = write_image_folder(tmp_path / "a", test_per_class=1)
    (root / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"class folders without image files.*train/empty"):
        ImageFolderDataModule(root=str(root))
    root = write_image_folder(tmp_path / "b", test_per_class=1)
    (root / "test" / "yak").mkdir()
    (root / "test" / "cat" / "cat_0.png").rename(root / "test" / "yak" / "y.png")
    with pytest.raises(ValueError, match=r"classes \['yak'\].*lacks"):
        ImageFolderDataModule(root=str(root))
    with pytest.raises(ValueError, match="channels must be 1"):
        ImageFolderDataModule(root=str(tmp_path / "a"), channels=2)


def test_corrupt_image_fails_with_its_path(tmp_path) -> None:
    root = write_image_folder(tmp_path, test_per_class=1, num_unlabeled=0)
    broken = root / "train" / "dog" / "dog_1.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    data = ImageFolderDataModule(root=str(root), image_size=8, batch_size=12, val_size=0)
    with pytest.raises(ValueError, match=re.escape(str(broken))):  # up front, in setup
        data.setup("fit")


def test_every_datamodule_exported() -> None:
    for name in ("MNIST", "FashionMNIST", "CIFAR10", "CIFAR100", "SVHN", "STL10", "ImageFolder", "Digits"):
        assert f"{name}DataModule" in datamodules.__all__


# -- DDP: each rank trains on its own shard of both loaders -----------------------------------
class ShardRecorder(L.Callback):
    """Writes, per rank, a fingerprint of every training image it was given."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.seen: dict[str, list] = {"labeled": [], "unlabeled": []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for part in ("labeled", "unlabeled"):
            images = batch[part].images
            pixels = images if images.dtype == torch.uint8 else (images * 255).round().to(torch.uint8)
            self.seen[part].extend(pixels.flatten(1)[:, :16].tolist())

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


def test_ddp_each_rank_gets_its_own_shard_of_both_loaders(fake_cifar10, tmp_path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    from ssl_modules import SupervisedModule

    data = CIFAR10DataModule(root=str(fake_cifar10[0]), download=False, labels_per_class=2, batch_size=4)
    model = SupervisedModule(
        num_classes=data.num_classes,
        channels=data.channels,
        image_size=data.image_size,
        mean=data.mean,
        std=data.std,
    )
    model.uses_unlabeled = True  # the baseline reads no unlabeled batch; this test records both loaders
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        limit_val_batches=0,
        logger=CSVLogger(str(tmp_path / "logs")),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ShardRecorder(str(tmp_path))],
    )
    trainer.fit(model, datamodule=data)
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # 50 train images - 10 held out for validation = 40 unlabeled; 20 per rank, 5 batches of 4
    unlabeled = [{tuple(key) for key in rank["unlabeled"]} for rank in seen]
    assert len(unlabeled[0]) == len(unlabeled[1]) == 20
    assert unlabeled[0].isdisjoint(unlabeled[1])
    assert seen[0]["labeled"] != seen[1]["labeled"] and len(seen[0]["labeled"]) == 20
    # the chosen split is saved once, by rank 0, in the run's folder
    (saved,) = (tmp_path / "logs").rglob("split.json")
    split = json.loads(saved.read_text())
    assert split["num_labeled"] == 20 and split["datamodule"] == "CIFAR10DataModule"
