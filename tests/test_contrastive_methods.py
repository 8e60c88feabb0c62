"""Method-specific behaviour of SimCLR, MoCo v2, BYOL and Barlow Twins (the conformance suite
covers what every module shares)."""

from __future__ import annotations

import glob
import os
import warnings

import lightning as L
import pytest
import torch
from helpers import tiny_trainer
from lightning.pytorch.loggers import CSVLogger

from datamodules import SyntheticDataModule
from ssl_modules import BarlowTwinsModule, BYOLModule, MoCoModule, SimCLRModule
from ssl_modules.callbacks.embeddings import EmbeddingPlotCallback
from ssl_modules.ema import cosine_momentum
from ssl_modules.optim import LARS

SMALL = {
    SimCLRModule: dict(projection_hidden_dim=32, projection_dim=16),
    MoCoModule: dict(projection_hidden_dim=32, projection_dim=16, queue_size=16),
    BYOLModule: dict(projection_hidden_dim=32, projection_dim=16),
    BarlowTwinsModule: dict(projection_hidden_dim=32, projection_dim=16),
}


def make_data(**overrides) -> SyntheticDataModule:
    settings = dict(
        num_classes=4, channels=1, image_size=16, train_per_class=8, labels_per_class=2, batch_size=8
    )
    settings.update(overrides)
    return SyntheticDataModule(**settings)


def make_model(cls, data, **overrides):
    kwargs = dict(SMALL[cls])
    kwargs.update(overrides)
    return cls(
        num_classes=data.num_classes,
        channels=data.channels,
        image_size=data.image_size,
        mean=data.mean,
        std=data.std,
        horizontal_flip=data.horizontal_flip,
        **kwargs,
    )


@pytest.mark.parametrize("cls", [SimCLRModule, MoCoModule, BYOLModule, BarlowTwinsModule])
def test_constructible_from_data_facts_with_paper_defaults(cls):
    model = cls(num_classes=10, channels=1, image_size=16, mean=(0.3,), std=(0.3,), horizontal_flip=False)
    assert model.hparams.backbone == "small_cnn"
    optimizer = model.default_optimizer(None)
    if model.hparams.get("lars", False):
        assert isinstance(optimizer, LARS)
    no_decay = [g for g in optimizer.param_groups if g["weight_decay"] == 0.0]
    assert no_decay and all(p.ndim <= 1 or g.get("lars_exclude") for g in no_decay for p in g["params"])


def test_paper_defaults():
    assert SimCLRModule().criterion.temperature == 0.5
    assert MoCoModule().criterion.temperature == 0.2
    assert MoCoModule().hparams.queue_size == 65536
    assert BYOLModule().hparams.base_momentum == 0.996
    barlow = BarlowTwinsModule(projection_hidden_dim=16, projection_dim=16)
    assert barlow.criterion.redundancy_weight == 0.0051


def test_simclr_with_extra_views_trains():
    L.seed_everything(0)
    data = make_data()
    model = make_model(SimCLRModule, data, num_views=3)
    tiny_trainer(max_steps=2).fit(model, datamodule=data)
    assert model.global_step == 2


def test_moco_enqueue_wraps_around():
    model = MoCoModule(projection_hidden_dim=8, projection_dim=4, queue_size=5)
    keys = torch.arange(12, dtype=torch.float32).view(3, 4) + 1
    model.queue_pointer.fill_(3)
    model.enqueue(keys)
    normalised = torch.nn.functional.normalize(keys, dim=1)
    assert torch.allclose(model.queue[3], normalised[0])
    assert torch.allclose(model.queue[4], normalised[1])
    assert torch.allclose(model.queue[0], normalised[2])
    assert int(model.queue_pointer) == 1
    assert {"queue", "queue_pointer"} <= set(model.state_dict())  # saved in checkpoints


def test_moco_clamps_a_queue_longer_than_the_data_and_reloads(tmp_path):
    L.seed_everything(0)
    data = make_data()  # 32 training images, batch 8: 4 steps of 8 keys per epoch
    model = make_model(MoCoModule, data, queue_size=1000)
    trainer = tiny_trainer(max_steps=2)
    with pytest.warns(UserWarning, match="clamping it to 16"):
        trainer.fit(model, datamodule=data)
    assert model.queue.shape == (16, 16) and model.hparams.queue_size == 16
    assert int(model.queue_pointer) == 2 * 8 % 16
    path = tmp_path / "moco.ckpt"
    trainer.save_checkpoint(path)
    restored = MoCoModule.load_from_checkpoint(path)
    assert torch.equal(restored.queue, model.queue)
    # a run resumed with the original (too long) setting adopts the checkpoint's queue
    resumed = make_model(MoCoModule, data, queue_size=1000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_trainer(max_steps=3).fit(resumed, datamodule=data, ckpt_path=path)
    assert not [w for w in caught if "clamping" in str(w.message)]  # no second clamp
    assert resumed.queue.shape == (16, 16)


@pytest.mark.parametrize("cls", [MoCoModule, BYOLModule])
def test_momentum_encoder_is_the_ema_of_the_online_network(cls):
    L.seed_everything(0)
    data = make_data()
    model = make_model(cls, data, base_momentum=0.9)
    online = model.backbone
    target = model.momentum_backbone if cls is MoCoModule else model.target_backbone
    assert all(not p.requires_grad for p in target.parameters())
    before_target = [p.detach().clone() for p in target.parameters()]

    class Snapshot(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            assert all(p.grad is None for p in target.parameters())  # stop-gradient

    trainer = tiny_trainer(max_steps=1, callbacks=[Snapshot()])
    trainer.fit(model, datamodule=data)
    # one step: target = m * target + (1 - m) * online(after the step), m = m(global_step) at update time
    total = trainer.estimated_stepping_batches
    candidates = [cosine_momentum(step, total, 0.9) for step in (0, 1)]
    matched = False
    for momentum in candidates:
        expected = [
            momentum * b + (1 - momentum) * o.detach() for b, o in zip(before_target, online.parameters())
        ]
        if all(torch.allclose(t, e, atol=1e-6) for t, e in zip(target.parameters(), expected)):
            matched = True
    assert matched
    assert not all(torch.equal(t, b) for t, b in zip(target.parameters(), before_target))


def test_momentum_schedule_is_a_pure_function_of_the_step():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)


def test_logs_views_alignment_uniformity_and_tsne(tmp_path):
    L.seed_everything(0)
    data = make_data(val_size=8)
    model = make_model(SimCLRModule, data)
    logger = CSVLogger(tmp_path, name="run")
    trainer = tiny_trainer(
        max_epochs=1,
        logger=logger,
        limit_val_batches=None,
        log_every_n_steps=1,
        callbacks=[EmbeddingPlotCallback(every_n_epochs=1)],
    )
    trainer.fit(model, datamodule=data)
    images = {os.path.basename(p) for p in glob.glob(os.path.join(logger.log_dir, "images", "*.png"))}
    assert "train_views_step0.png" in images
    assert any(name.startswith("val_embedding_tsne") for name in images)
    assert {"train/alignment", "train/uniformity"} <= set(trainer.logged_metrics)
