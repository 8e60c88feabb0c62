"""Features and backbones out of checkpoints: ``embed``, ``load_backbone``, ``ssl-modules export``
and ``ssl-modules predict`` give the features and predictions behind the method's own ``test/acc``.

A SimCLR and a FixMatch model are fitted for a few steps on the digits (8 px); their ``test/acc``
is then reproduced from the checkpoint alone: SimCLR's by the library's offline probe fitted on
``load_backbone`` features of the labeled split, FixMatch's by ``load_backbone`` (the EMA
backbone) and the checkpoint's EMA classifier, and both by ``ssl-modules predict``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torchvision
from helpers import tiny_trainer
from torch import nn

from datamodules import DigitsDataModule
from ssl_modules import (
    BYOLModule,
    FixMatchModule,
    SimCLRModule,
    StudentTeacherModule,
    SupervisedModule,
    load_backbone,
)
from ssl_modules.backbones import build_backbone
from ssl_modules.cli import main
from ssl_modules.evaluation.probe import fit_linear_probe

TINY = dict(num_classes=4, channels=1, image_size=8, mean=(0.3,), std=(0.2,), horizontal_flip=False)
METHODS = {
    "simclr": (SimCLRModule, dict(projection_hidden_dim=16, projection_dim=8, lars=False, lr=0.05)),
    # a short EMA, so that after 12 steps the EMA weights are far from the live ones
    "fixmatch": (FixMatchModule, dict(ema_decay=0.8, confidence_threshold=0.5)),
}


def _data() -> DigitsDataModule:
    return DigitsDataModule(image_size=8, labels_per_class=3, batch_size=32)


def _facts(data: DigitsDataModule) -> dict:
    names = ("num_classes", "channels", "image_size", "mean", "std", "horizontal_flip")
    return {name: getattr(data, name) for name in names}


def _normalised(images: torch.Tensor, mean, std) -> torch.Tensor:
    """What a backbone takes, written out: uint8 -> [0, 1] -> (x - mean) / std."""
    mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std


@torch.no_grad()
def _features(backbone: nn.Module, loader, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    features, labels = [], []
    for images, targets, _ in loader:  # LabeledBatch(images, labels, index)
        features.append(backbone(_normalised(images, mean, std)))
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch):
    """``ssl_modules.cli.main`` sets ``WANDB_MODE`` when unset: keep that inside each test."""
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "offline"))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict:
    """name -> (checkpoint path, test/acc, fitted model, datamodule)."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("features")
    runs = {}
    for name, (cls, settings) in METHODS.items():
        L.seed_everything(0)
        data = _data()
        model = cls(**_facts(data), **settings)
        trainer = tiny_trainer(max_steps=12)
        trainer.fit(model, datamodule=data)
        path = folder / f"{name}.ckpt"
        trainer.save_checkpoint(path)
        accuracy = trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"]
        runs[name] = (path, accuracy, model.eval(), data)
    return runs


def test_simclr_load_backbone_features_give_test_acc_with_the_offline_probe(fitted):
    path, test_acc, model, data = fitted["simclr"]
    backbone = load_backbone(path)
    assert isinstance(backbone, nn.Module) and not backbone.training
    assert backbone.num_features == model.backbone.num_features
    labeled, labeled_y = _features(backbone, data.labeled_dataloader(), data.mean, data.std)
    test, test_y = _features(backbone, data.test_dataloader(), data.mean, data.std)
    probe = fit_linear_probe(labeled, labeled_y, num_classes=data.num_classes, weight_decay=1e-3)
    accuracy = (probe(test).argmax(1) == test_y).float().mean().item()
    assert accuracy == pytest.approx(test_acc, abs=1e-6)
    assert 0.3 < accuracy  # a trained backbone (chance is 0.1), so the equality is not vacuous


def test_fixmatch_load_backbone_is_the_ema_backbone_behind_test_acc(fitted):
    path, test_acc, model, data = fitted["fixmatch"]
    backbone = load_backbone(path)
    x = next(iter(data.test_dataloader())).images
    with torch.no_grad():
        ours = backbone(_normalised(x, data.mean, data.std))
        ema = model.ema_model.backbone(_normalised(x, data.mean, data.std))
        live = model.backbone(_normalised(x, data.mean, data.std))
    torch.testing.assert_close(ours, ema)
    assert (ours - live).abs().max() > 1e-3  # the live weights are another network
    state = torch.load(path, weights_only=True)["state_dict"]
    weight, bias = state["ema_model.classifier.weight"], state["ema_model.classifier.bias"]
    test, test_y = _features(backbone, data.test_dataloader(), data.mean, data.std)
    accuracy = ((test @ weight.T + bias).argmax(1) == test_y).float().mean().item()
    assert accuracy == pytest.approx(test_acc, abs=1e-6)


def _perturbed(module: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(0.5 * torch.rand(tensor.shape, generator=generator))


CASES = {
    # name: (class, arguments, the submodule whose weights the method evaluates with)
    "supervised": (SupervisedModule, {}, "backbone"),
    "fixmatch-ema": (FixMatchModule, {}, "ema_model.backbone"),
    "fixmatch-live": (FixMatchModule, dict(evaluate_with_ema=False), "backbone"),
    "mean-teacher": (StudentTeacherModule, dict(teacher="ema"), "teacher.backbone"),
    "simclr": (SimCLRModule, dict(projection_hidden_dim=8, projection_dim=4), "backbone"),
    "byol": (BYOLModule, dict(projection_hidden_dim=8, projection_dim=4), "backbone"),
}


@pytest.mark.parametrize("case", CASES)
def test_embed_and_load_backbone_use_the_weights_the_method_evaluates_with(case, tmp_path):
    cls, settings, evaluated = CASES[case]
    torch.manual_seed(0)
    model = cls(**TINY, **settings)
    for index, (name, child) in enumerate(model.named_children()):  # every copy its own weights
        if "backbone" in name or name in ("ema_model", "teacher"):
            _perturbed(child, index)
    model.eval()
    trainer = tiny_trainer()
    trainer.strategy.connect(model)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    expected = model.get_submodule(evaluated)(_normalised(images, TINY["mean"], TINY["std"]))
    others = [m for n, m in model.named_modules() if n.endswith("backbone") and n != evaluated]
    with torch.no_grad():
        torch.testing.assert_close(model.embed(images), expected)
        torch.testing.assert_close(
            load_backbone(path)(_normalised(images, TINY["mean"], TINY["std"])), expected
        )
        for other in others:  # every other copy gives other features: the choice is visible
            assert (other(_normalised(images, TINY["mean"], TINY["std"])) - expected).abs().max() > 1e-3
        if hasattr(model, "evaluation_classifier"):  # test/acc's logits are embed + that classifier
            torch.testing.assert_close(
                model.evaluation_logits(images.float() / 255), model.evaluation_classifier()(expected)
            )


@pytest.mark.parametrize("cls", [SimCLRModule, FixMatchModule])
def test_embed_takes_what_datamodules_yield_and_refuses_the_rest(cls):
    torch.manual_seed(0)
    model = cls(**TINY).eval()
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        from_uint8 = model.embed(images)
        from_float = model.embed(images.float() / 255.0)
        torch.testing.assert_close(from_uint8, from_float)
        model.embed((images.float() / 255.0 + 5e-4).clamp(max=1.0005))  # rounding is tolerated
        with pytest.raises(ValueError, match=r"normalis"):
            model.embed((images.float() / 255.0 - 0.3) / 0.2)  # normalised twice
        with pytest.raises(ValueError, match=r"divide by 255"):
            model.embed(images.float())  # 0-255 floats
        with pytest.raises(ValueError, match=r"channels=3"):
            model.embed(torch.rand(4, 3, 8, 8))
        with pytest.raises(ValueError, match=r"shape"):
            model.embed(torch.rand(1, 8, 8))
        with pytest.raises(ValueError, match=r"dtype"):
            model.embed(images.long())


def test_export_writes_a_plain_state_dict_that_loads_into_the_named_backbone(fitted, tmp_path):
    path, _, model, data = fitted["simclr"]
    out = tmp_path / "backbone.pt"
    main(["export", str(path), "--out", str(out)])
    state = torch.load(out, weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    info = json.loads(Path(f"{out}.json").read_text())
    assert info["backbone"] == "small_cnn" and info["channels"] == 1 and info["num_features"] == 64
    assert info["mean"] == pytest.approx(list(data.mean)) and info["std"] == pytest.approx(list(data.std))
    rebuilt = build_backbone("small_cnn", 1)
    rebuilt.load_state_dict(state)  # strict: every key, every shape
    images = next(iter(data.test_dataloader())).images
    with torch.no_grad():
        torch.testing.assert_close(
            rebuilt.eval()(_normalised(images, data.mean, data.std)),
            model.backbone(_normalised(images, data.mean, data.std)),
        )


def test_export_of_a_resnet18_loads_into_torchvision_resnet18(tmp_path):
    torch.manual_seed(0)
    model = FixMatchModule(**TINY, backbone="resnet18", evaluate_with_ema=False).eval()
    trainer = tiny_trainer()
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "r18.ckpt")
    out = tmp_path / "r18.pt"
    main(["export", str(tmp_path / "r18.ckpt"), "--out", str(out)])
    # torchvision's resnet18 with the small-image stem of the CIFAR experiments, minus fc
    resnet = torchvision.models.resnet18(weights=None)
    resnet.conv1 = nn.Conv2d(1, 64, 3, stride=1, padding=1, bias=False)
    resnet.maxpool = nn.Identity()
    resnet.fc = nn.Identity()
    resnet.load_state_dict(torch.load(out, weights_only=True))  # strict
    images = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(resnet.eval()(model.normalize(images)), model.embed(images))


@pytest.mark.parametrize("name", METHODS)
def test_predict_command_writes_predictions_that_score_test_acc(name, fitted, tmp_path):
    path, test_acc, _, data = fitted[name]
    out = tmp_path / "predictions.npy"
    main(["predict", str(path), "--split", "test", "--what", "predictions", "--out", str(out)])
    predictions = np.load(out)
    labels = torch.cat([batch.labels for batch in data.test_dataloader()]).numpy()
    assert predictions.shape == labels.shape
    assert float((predictions == labels).mean()) == pytest.approx(test_acc, abs=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_predict_command_writes_the_embeddings_of_a_chosen_split(name, fitted, tmp_path):
    path, _, _, data = fitted[name]
    out = tmp_path / "val.pt"
    main(["predict", str(path), "--split", "val", "--what", "embeddings", "--out", str(out)])
    written = torch.load(out, weights_only=True)
    expected, labels = _features(load_backbone(path), data.val_dataloader(), data.mean, data.std)
    torch.testing.assert_close(written["embeddings"], expected)
    assert torch.equal(written["labels"], labels) and written["split"] == "val"
    assert len(labels) == len(data.val_dataset)


def test_predict_refuses_data_with_another_labeled_split(fitted, tmp_path):
    path = fitted["simclr"][0]
    with pytest.raises(SystemExit, match="another labeled split"):
        main(["predict", str(path), "--set", "split_seed=1", "--out", str(tmp_path / "x.npy")])
    with pytest.raises(SystemExit, match=r"\.pt or \.npy"):
        main(["predict", str(path), "--split", "labeled", "--out", str(tmp_path / "x.csv")])


def test_predict_with_options_only_stays_lightning_predict(monkeypatch):
    import ssl_modules.cli as cli

    seen = []
    monkeypatch.setattr(cli, "build_cli", lambda args, *a, **k: seen.append(args))
    cli.main(["predict", "--config", "x.yaml"])
    assert seen == [["predict", "--config", "x.yaml"]]


def test_load_backbone_refuses_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(tmp_path / "missing.ckpt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_backbone(tmp_path / "notes.txt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="no 'state_dict'"):
        load_backbone(tmp_path / "plain.pt")
    torch.save({"state_dict": {}, "payload": Path("x")}, tmp_path / "unsafe.ckpt")  # needs unpickling code
    with pytest.raises(ValueError, match="safely"):
        load_backbone(tmp_path / "unsafe.ckpt")
