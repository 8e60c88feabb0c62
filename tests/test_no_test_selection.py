"""Nothing is chosen on the test split: validation never serves test images, ``--last-k`` is
refused without a validation split, and callbacks that look at images during training use the
validation split."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from datamodules import SyntheticDataModule
from ssl_modules import SimCLRModule, SupervisedModule
from ssl_modules.callbacks.embeddings import EmbeddingPlotCallback

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def make_data(**overrides) -> SyntheticDataModule:
    settings = dict(
        num_classes=3, channels=1, image_size=8, train_per_class=10, labels_per_class=2, batch_size=4
    )
    settings.update(overrides)
    return SyntheticDataModule(**settings)


def facts(data: SyntheticDataModule) -> dict:
    return dict(
        num_classes=data.num_classes,
        channels=data.channels,
        image_size=data.image_size,
        mean=data.mean,
        std=data.std,
        horizontal_flip=data.horizontal_flip,
    )


def forbid_test_split(data: SyntheticDataModule) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the test split was read during training")

    data.test_dataloader = refuse


def trainer(**overrides) -> L.Trainer:
    settings = dict(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    settings.update(overrides)
    return L.Trainer(**settings)


def test_validation_loader_serves_the_held_out_train_images_not_test() -> None:
    data = make_data(val_size=6)
    data.setup("fit")
    assert data.has_validation_split
    val_images = torch.cat([batch.images for batch in data.val_dataloader()])
    test_images = torch.cat([batch.images for batch in data.test_dataloader()])
    assert len(val_images) == 6 and len(test_images) != 6
    held = data.val_dataset.indices
    expected = torch.stack([data.train_dataset[int(i)][0] for i in held])
    assert torch.equal(val_images, expected)
    # held out of train: neither labeled nor unlabeled
    assert not set(np.asarray(held).tolist()) & set(data.unlabeled_indices.tolist())


def test_without_a_validation_split_validation_is_off() -> None:
    data = make_data(val_size=0)
    assert not data.has_validation_split
    assert data.val_dataloader() == []
    forbid_test_split(data)
    model = SupervisedModule(**facts(data))
    fit = trainer(val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1.0)
    fit.fit(model, datamodule=data)  # would raise if validation fell back to the test split
    assert "val/acc" not in fit.callback_metrics
    assert fit.global_step == 4


def test_validation_during_fit_never_reads_test(tmp_path: Path) -> None:
    data = make_data(val_size=6)
    forbid_test_split(data)
    model = SupervisedModule(**facts(data))
    fit = trainer(val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1.0)
    fit.fit(model, datamodule=data)
    assert "val/acc" in fit.callback_metrics


def test_embedding_plot_callback_embeds_validation_images(tmp_path: Path) -> None:
    L.seed_everything(0)
    data = make_data(val_size=6, channels=3, image_size=12)
    forbid_test_split(data)
    model = SimCLRModule(**facts(data), projection_hidden_dim=8, projection_dim=4)
    seen: list[int] = []
    original = model.embed

    def embed(images: torch.Tensor) -> torch.Tensor:
        seen.append(len(images))
        return original(images)

    model.embed = embed
    callback = EmbeddingPlotCallback(every_n_epochs=1, max_points=100)
    fit = trainer(
        max_steps=-1, max_epochs=1, num_sanity_val_steps=0, limit_val_batches=1.0, callbacks=[callback]
    )
    fit.fit(model, datamodule=data)
    assert 6 in seen  # the validation split (6 images) was embedded in one batch; test never read


@pytest.mark.parametrize("config", ["supervised.yaml", "recipes/supervised_all_labels.yaml"])
def test_bench_last_k_is_refused_without_a_validation_split(tmp_path: Path, config: str) -> None:
    command = [
        sys.executable,
        "-m",
        "ssl_modules.cli",
        "bench",
        str(CONFIGS / config),
        "--data",
        str(CONFIGS / "data" / "digits.yaml"),
        "--max-steps",
        "4",
        "--last-k",
        "2",
        "--set",
        "data.val_size=0",
        "--out",
        str(tmp_path / "out.json"),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert completed.returncode != 0
    assert "needs a validation split" in completed.stderr
    assert "data.val_size=0.1" in completed.stderr  # the fix is named
    assert not (tmp_path / "out.json").exists()  # refused before any run
