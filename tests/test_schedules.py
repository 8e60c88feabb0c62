"""Every schedule of the library is a pure function of the step, checked at the start, the middle
and the end against the paper's formula written out here (not computed by the code under test).

- LR: ``WarmupCosine`` (half cosine after a linear warm-up), ``FixMatchCosine``
  (``cos(7 pi k / 16 K)``, Sohn et al., 2020), and the LR a real FixMatch fit applies per step;
- EMA decay: Mean Teacher's warm-up ``min(1 - 1 / (t + 1), decay)``;
- momentum: BYOL's ``1 - (1 - tau_base) (cos(pi k / K) + 1) / 2``;
- consistency ramp-up: Mean Teacher's ``exp(-5 (1 - t)^2)``;
- self-training's growing per-class fraction ``min(1, r * fraction)``.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from datamodules import SyntheticDataModule
from ssl_modules import FixMatchModule, SelfTrainingModule
from ssl_modules.base import FixMatchCosine, WarmupCosine
from ssl_modules.ema import cosine_momentum, warmup_ema_decay
from ssl_modules.losses.semi_supervised import sigmoid_rampup

PI = 3.141592653589793


def test_fixmatch_cosine_is_cos_7_pi_k_over_16_K() -> None:
    schedule = FixMatchCosine(1000)
    # the paper: eta * cos(7 pi k / (16 K))
    assert schedule(0) == pytest.approx(1.0)
    assert schedule(500) == pytest.approx(math.cos(7 * PI * 500 / (16 * 1000)))  # 0.773
    assert schedule(500) == pytest.approx(0.7730, abs=1e-4)
    assert schedule(1000) == pytest.approx(math.cos(7 * PI / 16))  # 0.195, not 0
    assert schedule(1000) == pytest.approx(0.1951, abs=1e-4)
    # the review's point: from k/K = 4/7 on, the broken factor was 0; the paper's is cos(pi / 4)
    assert schedule(4000 / 7 * 1) == pytest.approx(math.cos(PI / 4), abs=1e-9)
    values = [schedule(k) for k in range(0, 1001, 50)]
    assert all(b < a for a, b in zip(values, values[1:]))  # strictly decreasing
    assert min(values) > 0.19  # never clipped to 0 before (or at) the end
    assert schedule(5000) == pytest.approx(schedule(1000))  # clamped past the end


def test_fixmatch_cosine_refuses_fractions_that_reach_zero() -> None:
    with pytest.raises(ValueError, match="fraction"):
        FixMatchCosine(100, fraction=0.5)


@pytest.mark.parametrize("final", [0.0, 0.1])
def test_warmup_cosine_values(final: float) -> None:
    total, warmup = 110, 10
    schedule = WarmupCosine(total, warmup_steps=warmup, final_factor=final)
    # warm-up: (k + 1) / W
    assert schedule(0) == pytest.approx(1 / 10)
    assert schedule(4) == pytest.approx(5 / 10)
    assert schedule(9) == pytest.approx(1.0)
    # then final + (1 - final) * (1 + cos(pi p)) / 2, p = (k - W) / (K - W)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(final + (1 - final) * 0.5)  # the middle: p = 1/2
    assert schedule(35) == pytest.approx(final + (1 - final) * (1 + math.cos(PI * 0.25)) / 2)
    assert schedule(110) == pytest.approx(final)
    assert schedule(500) == pytest.approx(final)


def test_warmup_cosine_without_warmup_starts_at_one() -> None:
    schedule = WarmupCosine(100)
    assert schedule(0) == pytest.approx(1.0)
    assert schedule(50) == pytest.approx(0.5)
    assert schedule(100) == pytest.approx(0.0, abs=1e-12)


def test_warmup_ema_decay_values() -> None:
    # Mean Teacher: alpha_t = min(1 - 1 / (t + 1), alpha)
    assert warmup_ema_decay(0, 0.99) == 0.0  # the first update copies the student
    assert warmup_ema_decay(9, 0.99) == pytest.approx(0.9)
    assert warmup_ema_decay(49, 0.99) == pytest.approx(0.98)
    assert warmup_ema_decay(99, 0.99) == pytest.approx(0.99)
    assert warmup_ema_decay(10_000, 0.99) == pytest.approx(0.99)
    assert warmup_ema_decay(10_000, 0.999) == pytest.approx(0.999)


def test_cosine_momentum_values() -> None:
    # BYOL: tau = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2
    base = 0.996
    assert cosine_momentum(0, 1000, base) == pytest.approx(base)
    assert cosine_momentum(500, 1000, base) == pytest.approx(1 - (1 - base) / 2)
    assert cosine_momentum(250, 1000, base) == pytest.approx(1 - (1 - base) * (math.cos(PI / 4) + 1) / 2)
    assert cosine_momentum(1000, 1000, base) == pytest.approx(1.0)
    assert cosine_momentum(2000, 1000, base) == pytest.approx(1.0)


def test_sigmoid_rampup_values() -> None:
    # Mean Teacher: exp(-5 (1 - t)^2), t = step / rampup_steps in [0, 1]
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5.0))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5.0 * 0.25))
    assert sigmoid_rampup(100, 100) == pytest.approx(1.0)
    assert sigmoid_rampup(1000, 100) == pytest.approx(1.0)
    assert sigmoid_rampup(0, 0) == 1.0  # no ramp-up


def test_self_training_kept_fraction_grows_per_round() -> None:
    model = SelfTrainingModule(
        num_classes=3, channels=1, image_size=8, mean=(0.5,), std=(0.25,), top_k_fraction=0.3
    )
    # round r keeps min(1, r * fraction) of each predicted class
    assert model.kept_fraction(0) == 0.0
    assert model.kept_fraction(1) == pytest.approx(0.3)
    assert model.kept_fraction(2) == pytest.approx(0.6)
    assert model.kept_fraction(4) == 1.0


class _LearningRates(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_fixmatch_fit_applies_the_paper_schedule_at_every_step() -> None:
    torch.manual_seed(0)
    total = 8
    data = SyntheticDataModule(
        num_classes=3, channels=1, image_size=8, train_per_class=8, labels_per_class=2, batch_size=4
    )
    model = FixMatchModule(
        num_classes=3,
        channels=1,
        image_size=8,
        mean=data.mean,
        std=data.std,
        horizontal_flip=False,
        lr=0.03,
        ema_decay=0.5,
    )
    recorder = _LearningRates()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=total,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[recorder],
    )
    trainer.fit(model, datamodule=data)
    expected = [0.03 * math.cos(7 * PI * k / (16 * total)) for k in range(total)]
    assert recorder.lrs == pytest.approx(expected, rel=1e-9)
    assert recorder.lrs[-1] > 0.03 * 0.2  # nowhere near 0 at the last step


def test_schedules_accept_degenerate_lengths() -> None:
    # a run that is all warm-up, or of unknown length (0): no division by zero, sensible factors
    assert WarmupCosine(10, warmup_steps=10)(9) == pytest.approx(1.0)
    assert WarmupCosine(10, warmup_steps=10)(10) == pytest.approx(1.0)  # p = 0 right after warm-up
    assert FixMatchCosine(0)(0) == pytest.approx(1.0)
    assert FixMatchCosine(0)(1) == pytest.approx(math.cos(7 * PI / 16))
