"""SupervisedModule: baseline, linear probe and fine-tuning from any checkpoint of the library."""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import SyntheticDataModule
from ssl_modules import FixMatchModule, RotationPretext, SupervisedModule


def facts(data: SyntheticDataModule) -> dict:
    return dict(
        num_classes=data.num_classes,
        channels=data.channels,
        image_size=data.image_size,
        mean=data.mean,
        std=data.std,
        horizontal_flip=data.horizontal_flip,
    )


def fit(model: L.LightningModule, data: SyntheticDataModule, steps: int = 2) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data)
    return trainer


@pytest.fixture(scope="module")
def rotation_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = SyntheticDataModule(num_classes=4, channels=3)
    model = RotationPretext(**facts(data))
    trainer = fit(model, data)
    path = tmp_path_factory.mktemp("ckpt") / "rotation.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_fine_tune_starts_from_the_pretrained_backbone(rotation_checkpoint: Path) -> None:
    data = SyntheticDataModule(num_classes=4, channels=3)
    pretrained = RotationPretext.load_from_checkpoint(rotation_checkpoint).backbone.state_dict()
    model = SupervisedModule(**facts(data), pretrained=str(rotation_checkpoint))
    model.setup("fit")
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, pretrained[key]), key
    assert int(model.pretrained_loaded) == 1


def test_reloaded_fine_tuned_model_does_not_reload_pretrained_weights(
    rotation_checkpoint: Path, tmp_path
) -> None:
    data = SyntheticDataModule(num_classes=4, channels=3)
    model = SupervisedModule(**facts(data), pretrained=str(rotation_checkpoint))
    trainer = fit(model, data, steps=3)
    path = tmp_path / "fine_tuned.ckpt"
    trainer.save_checkpoint(path)
    reloaded = SupervisedModule.load_from_checkpoint(path)
    reloaded.setup("fit")  # the pretrained file would overwrite the fine-tuned backbone if reloaded
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, reloaded.backbone.state_dict()[key]), key


def test_linear_probe_trains_only_the_classifier_and_keeps_batchnorm_statistics(
    rotation_checkpoint: Path,
) -> None:
    data = SyntheticDataModule(num_classes=4, channels=3)
    model = SupervisedModule(
        **facts(data), pretrained=str(rotation_checkpoint), freeze_backbone=True, augment=False
    )
    model.setup("fit")
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    classifier_before = model.classifier.weight.clone()
    fit(model, data, steps=3)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed in a frozen backbone"
    assert not torch.equal(model.classifier.weight, classifier_before)


def test_frozen_probe_reports_the_offline_probe_as_test_acc() -> None:
    L.seed_everything(0)
    data = SyntheticDataModule(num_classes=4, channels=3)
    model = SupervisedModule(**facts(data), freeze_backbone=True, augment=False)
    trainer = fit(model, data, steps=1)
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    assert {"test/acc", "test/online_acc"} <= set(result)


def test_fixmatch_can_start_from_a_self_supervised_backbone(rotation_checkpoint: Path) -> None:
    data = SyntheticDataModule(num_classes=4, channels=3)
    pretrained = RotationPretext.load_from_checkpoint(rotation_checkpoint).backbone.state_dict()
    model = FixMatchModule(**facts(data), pretrained=str(rotation_checkpoint))
    model.setup("fit")
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, pretrained[key]), key


def test_checkpoint_from_other_number_of_classes_is_refused(rotation_checkpoint: Path) -> None:
    data = SyntheticDataModule(num_classes=5, channels=3)
    model = SupervisedModule(**facts(data), pretrained=str(rotation_checkpoint))
    with pytest.raises(ValueError, match="trained for 4 classes but the data has 5.*allow_class_mismatch"):
        model.setup("fit")
    SupervisedModule(**facts(data), pretrained=str(rotation_checkpoint), allow_class_mismatch=True).setup(
        "fit"
    )


def test_checkpoint_from_other_number_of_channels_is_refused(rotation_checkpoint: Path) -> None:
    data = SyntheticDataModule(num_classes=4, channels=1)
    model = SupervisedModule(**facts(data), pretrained=str(rotation_checkpoint))
    with pytest.raises(ValueError, match="expects 3-channel images but the data has 1"):
        model.setup("fit")


def test_checkpoint_with_other_backbone_is_refused(rotation_checkpoint: Path) -> None:
    data = SyntheticDataModule(num_classes=4, channels=3)
    model = SupervisedModule(**facts(data), backbone="small_cnn_wide", pretrained=str(rotation_checkpoint))
    with pytest.raises(ValueError, match="has backbone 'small_cnn'.*set model.backbone=small_cnn"):
        model.setup("fit")


def test_refusal_happens_before_training(rotation_checkpoint: Path) -> None:
    data = SyntheticDataModule(num_classes=5, channels=3)
    model = SupervisedModule(**facts(data), pretrained=str(rotation_checkpoint))
    with pytest.raises(ValueError, match="classes"):
        fit(model, data)
    assert model.global_step == 0


def test_missing_checkpoint_names_the_path(tmp_path) -> None:
    data = SyntheticDataModule(num_classes=4, channels=3)
    model = SupervisedModule(**facts(data), pretrained=str(tmp_path / "nope.ckpt"))
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        model.setup("fit")


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/ssl_modules_exploit_marker"),))


def test_checkpoint_that_would_run_code_is_not_executed(tmp_path) -> None:
    marker = Path("/tmp/ssl_modules_exploit_marker")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": {"backbone.x": _Exploit()}}, handle)
    data = SyntheticDataModule(num_classes=4, channels=3)
    model = SupervisedModule(**facts(data), pretrained=str(path))
    with pytest.raises(pickle.UnpicklingError):
        model.setup("fit")
    assert not marker.exists()


def test_wrong_channels_in_a_batch_name_the_fix() -> None:
    data = SyntheticDataModule(num_classes=4, channels=3)
    model = SupervisedModule(**facts(data))
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, H, W\).*channels=1"):
        model(torch.rand(2, 1, 16, 16))


def test_supervised_learns_the_synthetic_classes() -> None:
    L.seed_everything(0)
    data = SyntheticDataModule(num_classes=4, channels=3, labels_per_class=8)
    model = SupervisedModule(**facts(data), lr=0.05)
    trainer = fit(model, data, steps=40)
    assert trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"] >= 0.9
