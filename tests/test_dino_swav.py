"""Behaviour of DINO and SwAV: each test fails when one defining property is broken.

- DINO: the teacher sees the global crops only and the student every crop; the loss is the
  cross-entropy from the centred, sharpened teacher to the student over pairs of different
  views -> ``test_dino_step_matches_reference``; the center moves as the EMA of the teacher's
  outputs in training -> ``test_dino_step_updates_the_center``; the teacher is the EMA of the
  student after every optimizer step and gets no gradient ->
  ``test_dino_teacher_follows_the_ema_of_the_student``; the weight-decay and teacher-temperature
  schedules and the frozen last layer -> ``test_dino_schedules_and_frozen_last_layer``.
- SwAV: codes from Sinkhorn-Knopp on the global crops, predicted from every other crop ->
  ``test_swav_step_matches_reference``; prototypes frozen during the first
  ``freeze_prototypes_steps`` and unit-norm after every step ->
  ``test_swav_prototypes_frozen_then_trained_and_normalised``; the queue joins the Sinkhorn once
  full -> ``test_swav_queue_is_filled_then_used``.
- both: a few steps on tiny data with a finite loss; the visuals (DINO's attention maps with a
  ViT, SwAV's prototype usage) are uint8 images of the right shape, logged at the first step of
  every epoch.

The references are written out in plain torch and call the modules' networks (backbone, head,
projector, prototypes) as building blocks, never their losses. The step tests run in eval mode
(BatchNorm per sample) with fixed, distinct views in place of the random multi-crop.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from datamodules import SyntheticDataModule
from ssl_modules.batch import train_batch
from ssl_modules.self_supervised.dino import DINOHead, DINOModule
from ssl_modules.self_supervised.swav import SwAVModule, usage_bars

pytestmark = pytest.mark.filterwarnings("ignore:.*self.trainer. reference is not registered")

MEAN, STD = 0.5, 0.25
FACTS = dict(num_classes=3, channels=1, image_size=16, mean=(MEAN,), std=(STD,), horizontal_flip=False)
N = 6  # images per batch
NUM_GLOBAL, NUM_LOCAL, LOCAL_SIZE = 2, 3, 8
DINO_SMALL = dict(projection_hidden_dim=16, bottleneck_dim=8, out_dim=12, num_local_crops=NUM_LOCAL)
SWAV_SMALL = dict(projection_hidden_dim=16, projection_dim=8, num_prototypes=5, num_local_crops=NUM_LOCAL)


class FixedCrops(nn.Module):
    """Replaces ``model.multicrop``: known, distinct views. Global view v: the image rolled by v
    pixels and dimmed; local view v: a corner of the image, resized to 8 px."""

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        views = [images.roll(v, dims=-1) * (1 - 0.2 * v) + 0.1 * v for v in range(NUM_GLOBAL)]
        for v in range(NUM_LOCAL):
            corner = images[..., v : v + 10, v : v + 10]
            views.append(F.interpolate(corner, size=LOCAL_SIZE, mode="bilinear", align_corners=False))
        return views


def make_batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(N, 1, 16, 16, generator=generator)
    labeled = torch.rand(N, 1, 16, 16, generator=generator)
    labels = torch.randint(0, 3, (N,), generator=generator)
    return train_batch(labeled, labels, images)


def normalize(images: torch.Tensor) -> torch.Tensor:
    return (images - MEAN) / STD


def build(cls, **overrides) -> nn.Module:
    torch.manual_seed(0)
    kwargs = dict(DINO_SMALL if cls is DINOModule else SWAV_SMALL) | overrides
    model = cls(**FACTS, **kwargs)
    model.multicrop = FixedCrops()
    model.logged = {}
    model.log = lambda name, value, *args, **kwargs: model.logged.__setitem__(name, value)
    return model


def probe_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    images, labels = batch["labeled"].images, batch["labeled"].labels
    return F.cross_entropy(model.online_probe(model.backbone(normalize(images))), labels)


class InputRecorder:
    """Forward pre-hook: every input a network is called with."""

    def __init__(self, network: nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        network.register_forward_pre_hook(lambda module, args: self.inputs.append(args[0].detach().clone()))


# -- DINO ---------------------------------------------------------------------------------
def test_dino_step_matches_reference():
    model = build(DINOModule, student_temperature=0.2, teacher_temperature=0.05, center_momentum=0.7).eval()
    with torch.no_grad():  # a teacher different from the student, and a non-zero center
        for p in list(model.teacher_backbone.parameters()) + list(model.teacher_head.parameters()):
            p.add_(0.1 * torch.randn_like(p))
        model.criterion.center.copy_(torch.randn(12) * 0.3)
    center = model.criterion.center.clone()
    teacher_inputs, student_inputs = InputRecorder(model.teacher_backbone), InputRecorder(model.backbone)
    batch = make_batch()
    loss = model.training_step(batch, 0)
    teacher_calls, student_calls = list(teacher_inputs.inputs), list(student_inputs.inputs)

    views = FixedCrops()(batch["unlabeled"].images)
    with torch.no_grad():
        teacher = [model.teacher_head(model.teacher_backbone(normalize(v))) for v in views[:NUM_GLOBAL]]
        student = [model.head(model.backbone(normalize(v))) for v in views]
        expected, pairs = 0.0, 0
        for i, t in enumerate(teacher):
            target = torch.softmax((t - center) / 0.05, dim=1)
            for v, s in enumerate(student):
                if v != i:
                    expected += -(target * torch.log_softmax(s / 0.2, dim=1)).sum(dim=1).mean()
                    pairs += 1
        expected = expected / pairs + probe_loss(model, batch)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert pairs == NUM_GLOBAL * (NUM_GLOBAL + NUM_LOCAL) - NUM_GLOBAL
    # the teacher saw the global crops only, in one call; the student every crop (+ the probe's images)
    assert len(teacher_calls) == 1
    torch.testing.assert_close(teacher_calls[0], normalize(torch.cat(views[:NUM_GLOBAL])))
    local_rows = [x for x in student_calls if x.shape[-1] == LOCAL_SIZE]
    assert sum(len(x) for x in local_rows) == NUM_LOCAL * N
    # in eval mode the center stays put
    torch.testing.assert_close(model.criterion.center, center)


def test_dino_step_updates_the_center():
    model = build(DINOModule, center_momentum=0.7).eval()
    model.criterion.train()  # the loss in training mode, the networks per-sample
    batch = make_batch(1)
    model.training_step(batch, 0)
    views = FixedCrops()(batch["unlabeled"].images)
    with torch.no_grad():
        teacher = torch.cat(
            [model.teacher_head(model.teacher_backbone(normalize(v))) for v in views[:NUM_GLOBAL]]
        )
    expected = 0.7 * torch.zeros(12) + 0.3 * teacher.mean(dim=0)
    torch.testing.assert_close(model.criterion.center, expected, rtol=1e-5, atol=1e-7)
    assert model.criterion.center.abs().max() > 1e-4


def tiny_data(**overrides) -> SyntheticDataModule:
    settings = dict(
        num_classes=3, channels=1, image_size=16, train_per_class=8, labels_per_class=2, batch_size=8
    )
    return SyntheticDataModule(**(settings | overrides))


def sgd(params):
    return torch.optim.SGD(params, lr=0.5)  # large steps: every network moves visibly


def real_model(cls, data: SyntheticDataModule, **overrides) -> nn.Module:
    torch.manual_seed(0)
    kwargs = dict(DINO_SMALL if cls is DINOModule else SWAV_SMALL) | overrides
    facts = FACTS | dict(mean=data.mean, std=data.std)
    return cls(**facts, **kwargs)


class Snapshots(L.Callback):
    """Named parameters of ``names`` before training and after every step; whether any of
    ``no_grad`` had a gradient before an optimizer step."""

    def __init__(self, names: list[str], no_grad: list[str] = ()) -> None:
        self.names, self.no_grad = names, list(no_grad)
        self.states: list[dict[str, list[torch.Tensor]]] = []
        self.had_grad: list[bool] = []
        self.weight_decays: list[list[float]] = []

    def snapshot(self, module: nn.Module) -> None:
        self.states.append(
            {name: [p.detach().clone() for p in getattr(module, name).parameters()] for name in self.names}
        )

    def on_train_start(self, trainer, pl_module) -> None:
        self.snapshot(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.had_grad.append(
            any(p.grad is not None for name in self.no_grad for p in getattr(pl_module, name).parameters())
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.snapshot(pl_module)
        self.weight_decays.append([group["weight_decay"] for group in trainer.optimizers[0].param_groups])


def test_dino_teacher_follows_the_ema_of_the_student():
    """After optimizer step k: teacher = tau_k teacher + (1 - tau_k) student, tau_k cosine from
    base_momentum to 1; the teacher never has a gradient."""
    L.seed_everything(0)
    base, steps = 0.5, 3
    data = tiny_data()
    model = real_model(DINOModule, data, base_momentum=base, optimizer=sgd)
    recorder = Snapshots(
        ["backbone", "head", "teacher_backbone", "teacher_head"], ["teacher_backbone", "teacher_head"]
    )
    tiny_trainer(max_steps=steps, callbacks=[recorder]).fit(model, datamodule=data)
    assert recorder.had_grad == [False] * steps
    assert all(not p.requires_grad for p in model.teacher_backbone.parameters())
    for k in range(steps):
        tau = 1 - (1 - base) * (math.cos(math.pi * k / steps) + 1) / 2
        before, after = recorder.states[k], recorder.states[k + 1]
        for online, target in (("backbone", "teacher_backbone"), ("head", "teacher_head")):
            assert not all(torch.equal(a, b) for a, b in zip(after[online], before[online])), (
                "student did not move"
            )
            for new, old, student in zip(after[target], before[target], after[online]):
                torch.testing.assert_close(new, tau * old + (1 - tau) * student, atol=1e-6, rtol=1e-5)


def test_dino_schedules_and_frozen_last_layer():
    L.seed_everything(0)
    steps = 4
    data = tiny_data()
    model = real_model(
        DINOModule,
        data,
        weight_decay=0.04,
        weight_decay_end=0.4,
        freeze_last_layer_steps=2,
        warmup_teacher_temperature_steps=2,
    )
    loss_steps: list[int] = []
    forward = model.criterion.forward
    model.criterion.forward = lambda *args, step=0: loss_steps.append(step) or forward(*args, step=step)
    recorder = Snapshots(["head"])
    tiny_trainer(max_steps=steps, callbacks=[recorder]).fit(model, datamodule=data)
    assert loss_steps == [0, 1, 2, 3]  # the teacher temperature's schedule reads the global step
    # the weights' group follows the cosine 0.04 -> 0.4 (set before step k); biases and the probe stay 0
    for k, decays in enumerate(recorder.weight_decays):
        expected = 0.4 - (0.4 - 0.04) * (math.cos(math.pi * k / steps) + 1) / 2
        assert decays[0] == pytest.approx(expected)
        assert all(d == 0.0 for d in decays[1:])
    # the head's last layer (direction v) holds still for 2 steps, then moves; the MLP moves from the start
    names = [name for name, _ in model.head.named_parameters()]
    states = [dict(zip(names, s["head"])) for s in recorder.states]
    last = [state["last_layer_direction"] for state in states]
    assert torch.equal(last[0], last[1]) and torch.equal(last[1], last[2])
    assert not torch.equal(last[2], last[3])
    assert not torch.equal(states[0]["mlp.layers.0.weight"], states[1]["mlp.layers.0.weight"])


def test_dino_head_shapes_and_unit_last_layer():
    head = DINOHead(10, 16, 8, 20)
    features = torch.randn(4, 10)
    assert head(features).shape == (4, 20)
    torch.testing.assert_close(head.embed(features).norm(dim=1), torch.ones(4))
    # norm_last_layer: each output is a cosine between the embedding and a unit row, so |logit| <= 1
    assert head(features).abs().max() <= 1 + 1e-5
    assert not head.last_layer_scale.requires_grad
    # weight normalisation: rescaling the rows of v leaves the logits unchanged
    before = head(features)
    with torch.no_grad():
        head.last_layer_direction.mul_(torch.rand(20, 1) * 10 + 0.1)
    torch.testing.assert_close(head(features), before)
    assert DINOHead(10, 16, 8, 20, norm_last_layer=False).last_layer_scale.requires_grad


# -- SwAV ---------------------------------------------------------------------------------
def sinkhorn_reference(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    q = torch.exp(scores / epsilon).T  # (K, B)
    q = q / q.sum()
    num_prototypes, batch_size = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / num_prototypes
        q = q / q.sum(dim=0, keepdim=True) / batch_size
    return (q * batch_size).T


def test_swav_step_matches_reference():
    model = build(SwAVModule, temperature=0.2, queue_length=0).eval()
    batch = make_batch(2)
    loss = model.training_step(batch, 0)
    views = FixedCrops()(batch["unlabeled"].images)
    with torch.no_grad():
        prototypes = F.normalize(model.prototypes.layer.weight, dim=1)  # (K, dim)
        scores = [
            F.normalize(model.projector(model.backbone(normalize(v))), dim=1) @ prototypes.T for v in views
        ]
        codes = [sinkhorn_reference(s) for s in scores[:NUM_GLOBAL]]  # the global crops only
        expected = 0.0
        for i, q in enumerate(codes):
            sub = sum(
                -(q * torch.log_softmax(scores[v] / 0.2, dim=1)).sum(dim=1).mean()
                for v in range(len(views))
                if v != i
            )
            expected += sub / (len(views) - 1)
        expected = expected / NUM_GLOBAL + probe_loss(model, batch)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_swav_prototypes_frozen_then_trained_and_normalised():
    L.seed_everything(0)
    data = tiny_data()
    model = real_model(SwAVModule, data, freeze_prototypes_steps=2, queue_length=0, optimizer=sgd)
    recorder = Snapshots(["prototypes", "projector"])
    tiny_trainer(max_steps=4, callbacks=[recorder]).fit(model, datamodule=data)
    weights = [s["prototypes"][0] for s in recorder.states]
    for weight in weights:  # unit rows before training and after every step
        torch.testing.assert_close(weight.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(weights[1], weights[0], atol=1e-6, rtol=0)  # frozen at steps 0 and 1
    torch.testing.assert_close(weights[2], weights[0], atol=1e-6, rtol=0)
    assert (weights[3] - weights[2]).abs().max() > 1e-3  # trained from step 2 on
    projector = [s["projector"][0] for s in recorder.states]
    assert not torch.equal(projector[0], projector[1])  # the rest trains meanwhile


class CriterionSpy(nn.Module):
    def __init__(self, criterion: nn.Module) -> None:
        super().__init__()
        self.criterion = criterion
        self.queue_scores: list = []

    def codes(self, *args, **kwargs):
        return self.criterion.codes(*args, **kwargs)

    def forward(self, global_scores, local_scores, queue_scores=None):
        self.queue_scores.append(None if queue_scores is None else [q.detach().clone() for q in queue_scores])
        return self.criterion(global_scores, local_scores, queue_scores)


class EnqueueSpy(L.Callback):
    def __init__(self) -> None:
        self.pushed: list[list[torch.Tensor]] = []
        self.prototypes: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module) -> None:
        original = pl_module.enqueue

        def enqueue(embeddings):
            self.pushed.append([e.detach().clone() for e in embeddings])
            self.prototypes.append(pl_module.prototypes.layer.weight.detach().clone())
            original(embeddings)

        pl_module.enqueue = enqueue


@pytest.mark.parametrize("queue_length", [16, 0])
def test_swav_queue_is_filled_then_used(queue_length):
    """Batch 8, queue 16 from step 1: steps 1 and 2 fill it, step 3 uses it (newest first, scored
    against the current prototypes); without a queue it is never used."""
    L.seed_everything(0)
    data = tiny_data()
    model = real_model(
        SwAVModule, data, queue_length=queue_length, queue_start_step=1, freeze_prototypes_steps=0
    )
    model.criterion = CriterionSpy(model.criterion)
    spy = EnqueueSpy()
    tiny_trainer(max_steps=4, callbacks=[spy]).fit(model, datamodule=data)
    used = [q is not None for q in model.criterion.queue_scores]
    if queue_length == 0:
        assert used == [False] * 4
        return
    assert used == [False, False, False, True]
    assert int(model.queue_filled) == 16
    queue_at_step3 = [torch.cat([spy.pushed[2][i], spy.pushed[1][i]]) for i in range(NUM_GLOBAL)]
    prototypes = spy.prototypes[3]  # the prototypes of step 3 (recorded before its enqueue)
    for i in range(NUM_GLOBAL):
        torch.testing.assert_close(model.criterion.queue_scores[3][i], queue_at_step3[i] @ prototypes.T)
        # after step 3 the queue holds steps 3 and 2, newest first
        torch.testing.assert_close(model.queue[i], torch.cat([spy.pushed[3][i], spy.pushed[2][i]]))
        torch.testing.assert_close(model.queue[i].norm(dim=1), torch.ones(16))


def test_swav_refuses_a_queue_shorter_than_the_batch():
    model = build(SwAVModule, queue_length=4)
    with pytest.raises(ValueError, match="queue_length"):
        model.training_step(make_batch(), 0)


# -- both: tiny runs and visuals -------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, backbone",
    [(DINOModule, "small_cnn"), (DINOModule, "vit_mini"), (SwAVModule, "small_cnn")],
)
def test_trains_a_few_steps_and_logs_its_visuals(cls, backbone, tmp_path):
    L.seed_everything(0)
    data = tiny_data(train_per_class=6, labels_per_class=2, batch_size=6)  # 18 images: 3 steps per epoch
    extra = dict(queue_length=12, freeze_prototypes_steps=1) if cls is SwAVModule else {}
    model = real_model(cls, data, backbone=backbone, **extra)
    losses: list[float] = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    trainer = tiny_trainer(max_steps=6, logger=CSVLogger(tmp_path), callbacks=[Losses()])
    trainer.fit(model, datamodule=data)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    images = Path(trainer.log_dir) / "images"
    key = {DINOModule: "train_attention", SwAVModule: "train_prototype_usage"}[cls]
    logged = sorted(path.name for path in images.glob(f"{key}_step*.png"))
    if cls is DINOModule and backbone == "small_cnn":
        assert logged == []  # attention maps need a ViT
    else:
        assert logged == [f"{key}_step0.png", f"{key}_step3.png"]  # the first step of each epoch


def test_dino_attention_maps_are_the_teachers_beside_each_image():
    model = build(DINOModule, backbone="vit_mini")
    with torch.no_grad():  # a student different from the teacher
        for p in model.backbone.parameters():
            p.add_(0.5 * torch.randn_like(p))
    images = torch.rand(3, 1, 16, 16)
    maps = model.attention_maps(images)
    heads = model.teacher_backbone.blocks[-1].attn.num_heads
    assert maps.dtype == torch.uint8 and maps.shape == (3 * (1 + heads), 1, 16, 16)
    rows = maps.view(3, 1 + heads, 1, 16, 16)
    torch.testing.assert_close(rows[:, 0], (images * 255).round().to(torch.uint8))  # the image first
    attention = model.teacher_backbone.last_block_attention(normalize(images)).view(3, heads, 4, 4)
    expected = attention / attention.amax(dim=(2, 3), keepdim=True)
    expected = expected.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # 4 px patches
    torch.testing.assert_close(rows[:, 1:, 0], (expected * 255).round().to(torch.uint8), atol=1, rtol=0)
    assert rows[:, 1:].amax(dim=(2, 3, 4)).min() == 255  # each map scaled to its maximum
    with pytest.raises(ValueError, match="ViT"):
        build(DINOModule).attention_maps(images)


def test_swav_usage_bars_and_counts():
    image = usage_bars(torch.tensor([1.0, 4.0, 0.0, 2.0]), height=8, max_width=8)
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)
    column_heights = (image[0] < 128).sum(dim=0)  # dark pixels per column, sorted bars of width 2
    assert column_heights.tolist() == [8, 8, 4, 4, 2, 2, 0, 0]
    many = usage_bars(torch.arange(3000.0), max_width=512)
    assert many.shape == (3, 64, 512)
    model = build(SwAVModule)
    scores = [torch.randn(N, 5) for _ in range(NUM_GLOBAL)]
    counts = model.log_prototype_usage(scores, None)
    assert counts.shape == (5,) and counts.sum() == NUM_GLOBAL * N
    expected = torch.bincount(torch.cat(model.criterion.codes(scores)).argmax(dim=1), minlength=5)
    torch.testing.assert_close(counts, expected.float())
    assert 0 < float(model.logged["train/usage_entropy"]) <= 1
