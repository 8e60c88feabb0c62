"""The batch contract (``ssl_modules.batch``, ``docs/architecture.md``) and the constructor contract.

Batches: every loader of the datamodules (and ``DeviceResidentDataModule``) yields named batches
whose ``index`` is the image's position in its loader's dataset; here each ``images[i]`` is
compared with the image the datamodule's split puts at ``index[i]``, read item by item through
the split's own definition (``labeled_indices``, ``unlabeled_indices`` + the extra unlabeled
split), not through the batched path under test. The indices must cover the data under a
2-process split and continue unchanged after a resume. ``split_batch`` refuses plain tuples.

Constructors: keyword-only, a method declares none of the data facts nor the optimizer and
scheduler (``SSLModuleBase`` does, once); a checkpoint in the previous flat hyper-parameter
format loads; a user's subclass that fixes an argument round-trips; a typo is a ``TypeError``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import DataLoader

import ssl_modules
from datamodules import ImageFolderDataModule, SyntheticDataModule
from ssl_modules import FixMatchModule, SimCLRModule, SupervisedModule
from ssl_modules.accel import DeviceBatches, DeviceResidentDataModule
from ssl_modules.base import SSLModuleBase
from ssl_modules.batch import LabeledBatch, UnlabeledBatch, split_batch, train_batch

MODULES = [name for name in ssl_modules.__all__ if isinstance(getattr(ssl_modules, name), type)]
DATA_FACTS = ("num_classes", "channels", "image_size", "mean", "std", "horizontal_flip")


# -- helpers ---------------------------------------------------------------------------------
def make_data(**overrides: Any) -> SyntheticDataModule:
    settings = dict(
        num_classes=3,
        channels=1,
        image_size=8,
        train_per_class=10,
        labels_per_class=2,
        batch_size=4,
        unlabeled_batch_ratio=2,
        val_size=6,
    )
    data = SyntheticDataModule(**{**settings, **overrides})
    data.setup("fit")
    return data


def labeled_item(data: Any, position: int) -> tuple[torch.Tensor, int]:
    """The labeled split's image ``position``: ``train[labeled_indices[position]]``."""
    image, label = data.train_dataset[int(data.labeled_indices[position])]
    return torch.as_tensor(image), int(label)


def unlabeled_item(data: Any, position: int) -> tuple[torch.Tensor, int]:
    """The unlabeled pool's image ``position``: ``train[unlabeled_indices[position]]``, then the
    extra unlabeled split (hidden label ``-1`` where the dataset does not know it)."""
    pool = data.unlabeled_indices
    if position < len(pool):
        image, label = data.train_dataset[int(pool[position])]
    else:
        image, label = data.extra_unlabeled_dataset[position - len(pool)]
    return torch.as_tensor(image), int(label)


def assert_indexed(batch: Any, kind: type, item: Any, count: int) -> list[int]:
    """``batch`` is a ``kind`` whose every image and label is ``item(index)``; returns its indices."""
    assert type(batch) is kind, f"expected a {kind.__name__}, got {type(batch).__name__}"
    images, labels, index = batch
    assert index.dtype == torch.int64 and index.shape == labels.shape == (len(images),)
    assert 0 <= int(index.min()) and int(index.max()) < count, (index, count)
    for image, label, position in zip(images, labels, index.tolist()):
        expected_image, expected_label = item(position)
        as_uint8 = image if image.dtype == torch.uint8 else (image * 255).round().to(torch.uint8)
        assert torch.equal(as_uint8.cpu(), expected_image), f"image at index {position} is another image"
        assert int(label) == expected_label, f"label at index {position}"
    return index.tolist()


def one_epoch(loader: Any) -> list[Any]:
    return list(loader)


# -- (a) the datamodules' loaders ------------------------------------------------------------
def test_labeled_training_loader_keeps_each_images_index_through_its_repeats() -> None:
    data = make_data()
    num_labeled = len(data.labeled_indices)  # 6: repeated to fill an epoch of the unlabeled pool
    seen: list[int] = []
    for batch in one_epoch(data.train_dataloader()["labeled"]):
        seen += assert_indexed(batch, LabeledBatch, lambda p: labeled_item(data, p), num_labeled)
    assert len(seen) > num_labeled  # the labeled set is repeated within the epoch ...
    assert set(seen) == set(range(num_labeled))  # ... and every repeat keeps its image's index
    assert max(seen.count(i) for i in range(num_labeled)) >= 2


@pytest.mark.parametrize("labeled_in_unlabeled", [True, False])
def test_unlabeled_training_loader_names_each_image_by_its_pool_position(labeled_in_unlabeled: bool) -> None:
    data = make_data(labeled_in_unlabeled=labeled_in_unlabeled)
    size = len(data.unlabeled_indices)
    seen: list[int] = []
    for batch in one_epoch(data.train_dataloader()["unlabeled"]):
        seen += assert_indexed(batch, UnlabeledBatch, lambda p: unlabeled_item(data, p), size)
    assert len(seen) == len(set(seen)) == size // 8 * 8  # each image once an epoch (drop_last)
    if not labeled_in_unlabeled:  # the pool is not the train split: positions, not train indices
        assert size < len(data.train_dataset) - len(data.val_dataset)


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_unlabeled_index_runs_on_into_the_extra_unlabeled_split(fake_image_folder: Path, cache: str) -> None:
    # ImageFolder's unlabeled/ folder follows the pool; "none" reads item by item, "memory" in batches
    data = ImageFolderDataModule(
        root=str(fake_image_folder),
        image_size=8,
        channels=3,
        labels_per_class=1,
        batch_size=3,
        val_size=0,
        cache=cache,
        cache_dir=None,
    )
    data.setup("fit")
    pool, extra = len(data.unlabeled_indices), len(data.extra_unlabeled_dataset)
    seen: list[int] = []
    for batch in one_epoch(data.train_dataloader()["unlabeled"]):
        seen += assert_indexed(batch, UnlabeledBatch, lambda p: unlabeled_item(data, p), pool + extra)
    assert sorted(seen) == list(range(pool + extra)) and max(seen) >= pool  # the extra images are named too
    for batch in one_epoch(data.train_dataloader()["labeled"]):
        assert_indexed(batch, LabeledBatch, lambda p: labeled_item(data, p), len(data.labeled_indices))


def test_evaluation_loaders_are_labeled_batches_indexed_in_order() -> None:
    data = make_data()
    loaders = {
        "val": (data.val_dataloader(), data.val_dataset),
        "test": (data.test_dataloader(), data.test_dataset),
    }
    for name, (loader, dataset) in loaders.items():
        seen: list[int] = []
        for batch in loader:
            seen += assert_indexed(batch, LabeledBatch, lambda p, d=dataset: _item(d, p), len(dataset))
        assert seen == list(range(len(dataset))), name
    seen = []
    for batch in data.labeled_dataloader():
        seen += assert_indexed(
            batch, LabeledBatch, lambda p: labeled_item(data, p), len(data.labeled_indices)
        )
    assert seen == list(range(len(data.labeled_indices)))


def _item(dataset: Any, position: int) -> tuple[torch.Tensor, int]:
    image, label = dataset[position]
    return torch.as_tensor(image), int(label)


def test_device_resident_batches_index_the_same_positions_as_the_loaders() -> None:
    data = make_data()
    batches = DeviceResidentDataModule(data).train_dataloader()
    assert isinstance(batches, DeviceBatches)
    labeled, unlabeled = [], []
    for batch in batches:  # one epoch
        labeled += assert_indexed(
            batch["labeled"], LabeledBatch, lambda p: labeled_item(data, p), len(data.labeled_indices)
        )
        unlabeled += assert_indexed(
            batch["unlabeled"], UnlabeledBatch, lambda p: unlabeled_item(data, p), len(data.unlabeled_indices)
        )
    assert len(unlabeled) == len(set(unlabeled))
    assert set(labeled) == set(range(len(data.labeled_indices)))


# -- (a) under a 2-process split, and after a resume -----------------------------------------
@pytest.mark.parametrize("part", ["labeled", "unlabeled"])
def test_two_ranks_together_cover_the_data_and_keep_indices_and_images_together(part: str) -> None:
    # What the Trainer does under DDP with the datamodule's own (seeded) sampler: wraps it in
    # Lightning's DistributedSamplerWrapper, one shard per rank.
    data = make_data()
    loader = data.train_dataloader()[part]
    kind, item, count = (
        (LabeledBatch, lambda p: labeled_item(data, p), len(data.labeled_indices))
        if part == "labeled"
        else (UnlabeledBatch, lambda p: unlabeled_item(data, p), len(data.unlabeled_indices))
    )
    per_rank = []
    for rank in (0, 1):
        sampler = DistributedSamplerWrapper(loader.sampler, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(1)
        shard = DataLoader(loader.dataset, batch_size=4, sampler=sampler, collate_fn=loader.collate_fn)
        per_rank.append([i for batch in shard for i in assert_indexed(batch, kind, item, count)])
    assert set(per_rank[0]) | set(per_rank[1]) == set(range(count))


def test_device_batches_of_two_ranks_cover_the_pool_once_with_their_images() -> None:
    data = make_data(train_per_class=16, val_size=0, batch_size=4, unlabeled_batch_ratio=2)  # 48 = 2 x 3 x 8
    wrapper = DeviceResidentDataModule(data)
    labeled_pool = (
        data.train_dataset.images[data.labeled_indices],
        data.train_dataset.targets[data.labeled_indices],
    )
    unlabeled_pool = (
        data.train_dataset.images[data.unlabeled_indices],
        data.train_dataset.targets[data.unlabeled_indices],
    )
    ranks = [DeviceBatches(labeled_pool, unlabeled_pool, 4, 8, seed=0, rank=r, world_size=2) for r in (0, 1)]
    assert wrapper.train_dataloader().steps_per_epoch == 2 * len(ranks[0])  # one rank alone: twice the steps
    seen = []
    for rank in ranks:
        indices = []
        for batch in rank:
            indices += assert_indexed(
                batch["unlabeled"],
                UnlabeledBatch,
                lambda p: unlabeled_item(data, p),
                len(data.unlabeled_indices),
            )
            assert_indexed(
                batch["labeled"], LabeledBatch, lambda p: labeled_item(data, p), len(data.labeled_indices)
            )
        seen.append(indices)
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(len(data.unlabeled_indices)))


class IndexRecorder(L.Callback):
    """(epoch, batch_idx) -> the labeled and unlabeled indices a training step received, each
    checked against the images."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.steps: dict[tuple[int, int], tuple[list[int], list[int]]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        data = self.data
        labeled = assert_indexed(
            batch["labeled"], LabeledBatch, lambda p: labeled_item(data, p), len(data.labeled_indices)
        )
        unlabeled = assert_indexed(
            batch["unlabeled"], UnlabeledBatch, lambda p: unlabeled_item(data, p), len(data.unlabeled_indices)
        )
        self.steps[(trainer.current_epoch, trainer.global_step)] = (labeled, unlabeled)


class StopAfterEpoch(L.Callback):
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        trainer.should_stop = True


def _recording_fit(tmp_path: Path, device_resident: bool, ckpt_path: Path | None = None, **limits: Any):
    L.seed_everything(0)
    data = make_data()
    model = SupervisedModule(**{name: getattr(data, name) for name in DATA_FACTS}, augment=False)
    model.uses_unlabeled = True  # the baseline reads no unlabeled batch; record both loaders
    recorder = IndexRecorder(data)
    callbacks = [recorder, *limits.pop("callbacks", [])]
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
        **limits,
    )
    trainer.fit(
        model, datamodule=DeviceResidentDataModule(data) if device_resident else data, ckpt_path=ckpt_path
    )
    return recorder.steps, trainer


@pytest.mark.parametrize("device_resident", [False, True])
def test_a_resumed_run_gets_the_indices_the_uninterrupted_run_got(
    device_resident: bool, tmp_path: Path
) -> None:
    uninterrupted, _ = _recording_fit(tmp_path, device_resident, max_epochs=2)
    first, trainer = _recording_fit(tmp_path, device_resident, max_epochs=2, callbacks=[StopAfterEpoch()])
    path = tmp_path / "epoch0.ckpt"
    trainer.save_checkpoint(path)
    torch.manual_seed(123)  # the global RNG state the resumed process starts with must not matter
    resumed, _ = _recording_fit(tmp_path, device_resident, ckpt_path=path, max_epochs=2)
    assert set(first) == {key for key in uninterrupted if key[0] == 0}
    assert resumed == {key: value for key, value in uninterrupted.items() if key[0] == 1}
    epochs = [[v for k, v in uninterrupted.items() if k[0] == e] for e in (0, 1)]
    assert epochs[0] != epochs[1]  # a fresh order every epoch, with the same index for each image


# -- (c) split_batch refuses what is not a named batch ---------------------------------------
def test_split_batch_refuses_plain_tuples_and_names_train_batch() -> None:
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    for plain in (
        (x, y),
        {"labeled": (x, y), "unlabeled": (x, torch.full((2,), -1))},
        {"labeled": [x, y, torch.arange(2)]},
        {**train_batch(x, y), "unlabeled": LabeledBatch(x, y, torch.arange(2))},  # roles swapped
    ):
        with pytest.raises(TypeError, match=r"train_batch"):
            split_batch(plain)
    model = FixMatchModule(num_classes=2, channels=1, image_size=8, mean=(0.5,), std=(0.25,))
    with pytest.raises(TypeError, match=r"LabeledBatch\(images, labels, index\).*train_batch"):
        model.training_step({"labeled": (x, y), "unlabeled": (x, torch.full((2,), -1))}, 0)


def test_train_batch_builds_named_parts_with_arange_index_and_unknown_hidden_labels() -> None:
    x, y, u = torch.rand(3, 1, 8, 8), torch.tensor([2, 0, 1]), torch.rand(5, 1, 8, 8)
    labeled, unlabeled = split_batch(train_batch(x, y, u))
    assert labeled.images is x and labeled.labels is y and torch.equal(labeled.index, torch.arange(3))
    assert torch.equal(unlabeled.index, torch.arange(5)) and torch.equal(
        unlabeled.hidden_labels, torch.full((5,), -1)
    )
    assert "unlabeled" not in train_batch(x, y) and split_batch(train_batch(x, y))[1] is None


# -- (d) the constructor contract ------------------------------------------------------------
@pytest.mark.parametrize("name", MODULES)
def test_a_method_declares_only_its_own_hyper_parameters_keyword_only(name: str) -> None:
    cls = getattr(ssl_modules, name)
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    declared = {p.name for p in parameters}
    assert not declared & {*DATA_FACTS, "optimizer", "scheduler"}, (
        f"{name} re-declares {declared & {*DATA_FACTS, 'optimizer', 'scheduler'}}"
    )
    positional = [
        p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    assert not positional, f"{name} takes {positional} by position"
    assert parameters[-1].kind is inspect.Parameter.VAR_KEYWORD, f"{name} forwards no **kwargs to its base"
    # the six data facts, the optimizer and the scheduler are declared once in the whole chain
    for fact in (*DATA_FACTS, "optimizer", "scheduler"):
        owners = [
            base
            for base in cls.__mro__
            if fact in inspect.signature(base.__dict__.get("__init__", object.__init__)).parameters
        ]
        assert owners == [SSLModuleBase], (fact, owners)


# What ``save_hyperparameters`` recorded before the keyword-only constructors (ssl-modules at
# 5e51de7), written out: the data facts and every argument of the chain, flat.
OLD_FACTS = {
    "num_classes": 3,
    "channels": 3,
    "image_size": 16,
    "mean": (0.5,) * 3,
    "std": (0.25,) * 3,
    "horizontal_flip": False,
}
OLD_CLASSIFIER = {
    "backbone": "small_cnn",
    "drop_rate": 0.0,
    "pretrained": None,
    "allow_class_mismatch": False,
}
OLD_SELF_SUPERVISED = {
    "backbone": "small_cnn",
    "backbone_channels": None,
    "knn_k": 20,
    "probe_weight_decay": 0.001,
}
OLD_PROJECTION = {
    "projection_hidden_dim": 16,
    "projection_dim": 8,
    "crop_min_scale": 0.08,
    "jitter_strength": 0.5,
}
OLD_FLAT_HPARAMS: dict[str, dict[str, Any]] = {
    "SupervisedModule": {
        **OLD_CLASSIFIER,
        "lr": 0.1,
        "weight_decay": 0.0005,
        "freeze_backbone": False,
        "augment": True,
    },
    "SelfTrainingModule": {
        **OLD_CLASSIFIER,
        "lr": 0.03,
        "weight_decay": 0.0005,
        "schedule": "online",
        "selection": "top_k",
        "confidence_threshold": 0.0,
        "top_k_fraction": 0.2,
        "epochs_per_round": 5,
        "reinitialize_student": False,
        "unlabeled_loss_weight": 1.0,
        "unlabeled_warmup_steps": 0,
        "student_augmentation": "weak",
        "entropy_weight": 0.0,
    },
    "StudentTeacherModule": {
        **OLD_CLASSIFIER,
        "lr": 0.03,
        "weight_decay": 0.0005,
        "teacher": "ema",
        "teacher_checkpoint": None,
        "teacher_backbone": None,
        "alpha": 0.5,
        "temperature": 4.0,
        "consistency": "mse",
        "consistency_weight": 1.0,
        "rampup_steps": 0,
        "consistency_on_labeled": True,
        "ema_decay": 0.999,
        "teacher_input": "weak",
        "student_augmentation": "weak",
        "entropy_weight": 0.0,
    },
    "FixMatchModule": {
        **OLD_CLASSIFIER,
        "lr": 0.03,
        "weight_decay": 0.0005,
        "confidence_threshold": 0.7,
        "unlabeled_loss_weight": 1.0,
        "ema_decay": 0.999,
        "evaluate_with_ema": True,
        "randaugment_num_ops": 2,
        "cutout": 0.5,
        "entropy_weight": 0.0,
    },
    "RotationPretext": {**OLD_SELF_SUPERVISED, "lr": 0.1, "weight_decay": 0.0005, "head_hidden": 32},
    "JigsawPretext": {
        **OLD_SELF_SUPERVISED,
        "lr": 0.01,
        "weight_decay": 0.0005,
        "grid_size": 3,
        "num_permutations": 10,
        "permutation_seed": 0,
        "head_hidden": 32,
    },
    "ColorizationPretext": {
        **OLD_SELF_SUPERVISED,
        "backbone_channels": 1,
        "lr": 0.001,
        "weight_decay": 0.001,
        "loss": "classification",
        "ab_grid_size": 10.0,
        "soft_neighbours": 5,
        "soft_sigma": 5.0,
        "rebalance_lambda": 0.5,
        "annealing_temperature": 0.38,
        "output_stride": 4,
        "decoder_width": 8,
    },
    "DenoisingAutoencoder": {
        **OLD_SELF_SUPERVISED,
        "lr": 0.001,
        "weight_decay": 0.0001,
        "mask_fraction": 0.25,
        "noise_std": 0.1,
        "decoder_width": 8,
    },
    "SimCLRModule": {
        **OLD_SELF_SUPERVISED,
        **OLD_PROJECTION,
        "lr": 0.3,
        "weight_decay": 1e-06,
        "temperature": 0.5,
        "num_views": 2,
        "lars": True,
    },
    "MoCoModule": {
        **OLD_SELF_SUPERVISED,
        **OLD_PROJECTION,
        "crop_min_scale": 0.2,
        "lr": 0.03,
        "weight_decay": 0.0001,
        "temperature": 0.2,
        "queue_size": 8,
        "base_momentum": 0.999,
        "symmetric": False,
        "lars": False,
    },
    "BYOLModule": {
        **OLD_SELF_SUPERVISED,
        **OLD_PROJECTION,
        "lr": 0.2,
        "weight_decay": 1.5e-06,
        "base_momentum": 0.996,
        "lars": True,
    },
    "BarlowTwinsModule": {
        **OLD_SELF_SUPERVISED,
        **OLD_PROJECTION,
        "lr": 0.2,
        "weight_decay": 1.5e-06,
        "redundancy_weight": 0.0051,
        "lars": True,
    },
}


def _save_by_hand(state_dict: dict[str, torch.Tensor], hparams: dict[str, Any], path: Path) -> Path:
    torch.save(
        {"state_dict": state_dict, "hyper_parameters": hparams, "pytorch-lightning_version": L.__version__},
        path,
    )
    return path


@pytest.mark.parametrize("name", sorted(OLD_FLAT_HPARAMS))
def test_a_checkpoint_in_the_previous_flat_format_loads(name: str, tmp_path: Path) -> None:
    cls = getattr(ssl_modules, name)
    old = {**OLD_FACTS, **OLD_FLAT_HPARAMS[name]}
    torch.manual_seed(0)
    model = cls(**{key: value for key, value in old.items() if key != "backbone_channels"})
    loaded = cls.load_from_checkpoint(_save_by_hand(model.state_dict(), old, tmp_path / "old.ckpt"))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    for key, value in old.items():  # every setting of the old record is the loaded model's
        if key != "backbone_channels" or name != "ColorizationPretext":
            assert loaded.hparams[key] == value, key
    assert loaded.num_classes == 3 and loaded.channels == 3 and loaded.image_size == 16
    if name == "FixMatchModule":  # the old threshold is the rule's
        assert loaded.rule.threshold == pytest.approx(0.7)


def test_the_previous_format_covers_every_module_that_existed_then() -> None:
    earlier = set(OLD_FLAT_HPARAMS)
    assert earlier <= set(MODULES)  # none of them was removed or renamed


def test_an_argument_no_method_takes_any_more_is_refused_by_name(tmp_path: Path) -> None:
    model = SupervisedModule(**OLD_FACTS)
    hparams = {**OLD_FACTS, **OLD_FLAT_HPARAMS["SupervisedModule"], "mixup_alpha": 0.2}
    with pytest.raises(TypeError, match="mixup_alpha"):
        SupervisedModule.load_from_checkpoint(_save_by_hand(model.state_dict(), hparams, tmp_path / "x.ckpt"))


class LowTemperatureSimCLR(SimCLRModule):
    """A user's subclass that fixes an argument of its method."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(temperature=0.2, **kwargs)


class GrayFixMatch(FixMatchModule):
    """A user's subclass that fixes data facts and a method argument and adds one of its own."""

    def __init__(self, warmup: int = 3, **kwargs: Any) -> None:
        super().__init__(channels=1, mean=(0.4,), std=(0.2,), confidence_threshold=0.8, **kwargs)
        self.warmup = warmup


@pytest.mark.parametrize("cls", [LowTemperatureSimCLR, GrayFixMatch], ids=lambda c: c.__name__)
def test_a_subclass_fixing_an_argument_round_trips(cls: type, tmp_path: Path) -> None:
    torch.manual_seed(0)
    extra = (
        {"projection_hidden_dim": 16, "projection_dim": 8} if cls is LowTemperatureSimCLR else {"warmup": 5}
    )
    model = cls(num_classes=3, image_size=8, **extra)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "sub.ckpt")
    loaded = cls.load_from_checkpoint(tmp_path / "sub.ckpt")
    assert dict(loaded.hparams) == dict(model.hparams)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    if cls is LowTemperatureSimCLR:
        assert loaded.criterion.temperature == 0.2  # set again by the subclass, not read from the record
    else:
        assert loaded.channels == 1 and loaded.rule.threshold == pytest.approx(0.8) and loaded.warmup == 5
        assert loaded.hparams.warmup == 5 and torch.allclose(loaded.input_mean.flatten(), torch.tensor([0.4]))


@pytest.mark.parametrize("name", MODULES)
def test_a_misspelt_keyword_is_a_type_error_naming_it(name: str) -> None:
    with pytest.raises(TypeError, match="temprature"):
        getattr(ssl_modules, name)(num_classes=3, temprature=0.5)
