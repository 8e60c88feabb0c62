"""MixMatch (Berthelot et al., 2019): its parts against the paper's formulas written out here,
and one behavioural test per defining property of the step.

- sharpening ``p^(1/T) / sum p^(1/T)``; ``L_U`` = squared error averaged over classes and rows;
  the linear ramp of ``lambda_u``; MixUp with ``lambda' = max(lambda, 1 - lambda)``;
- the step: the guess is the sharpened mean over the K views' softmax, without gradient; the
  labeled rows are mixed with ``lambda'`` (labeled-dominated); ``L_X`` uses the mixed one-hot
  labels; ``L_U`` the mixed guesses; the total is ``L_X + lambda_u r(step) L_U``;
- the guess's forward leaves BatchNorm's running statistics alone; the K views are independent
  draws; ``hidden_labels`` never reach the loss; the EMA copy moves every step and is what
  ``evaluation_logits`` uses; the default optimizer is Adam with kernel-only decoupled decay
  and a constant learning rate.

Exact values use deterministic stand-ins for the views and the MixUp draws, and BatchNorm in
eval mode so that a row's logits do not depend on its batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader

import ssl_modules.semi_supervised.mixmatch as mixmatch
from ssl_modules.batch import train_batch
from ssl_modules.semi_supervised.mixmatch import (
    MixMatchModule,
    linear_rampup,
    mixmatch_unlabeled_loss,
    mixup,
    sharpen,
    soft_cross_entropy,
)

CLASSES, SIZE, MEAN, STD = 4, 8, 0.5, 0.25
FACTS = {
    "num_classes": CLASSES,
    "channels": 1,
    "image_size": SIZE,
    "mean": (MEAN,),
    "std": (STD,),
    "horizontal_flip": False,
}
LABELED, UNLABELED = 4, 6


# -- helpers ------------------------------------------------------------------------------
def images(count: int, seed: int, size: int = SIZE) -> torch.Tensor:
    return torch.rand(count, 1, size, size, generator=torch.Generator().manual_seed(seed))


def normalized(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def net(model: MixMatchModule, x: torch.Tensor) -> torch.Tensor:
    return model.classifier(model.backbone(normalized(x)))


def flip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def roll(x: torch.Tensor) -> torch.Tensor:
    return x.roll(2, dims=-2)


def invert(x: torch.Tensor) -> torch.Tensor:
    return 1.0 - x


def shade(x: torch.Tensor) -> torch.Tensor:
    return 0.3 + 0.6 * x.flip(-2)


class ScriptedViews(nn.Module):
    """Deterministic weak views: ``labeled_view`` for the labeled images, and the unlabeled
    images' k-th call gets ``unlabeled_views[k]`` (the step draws its K views one call each)."""

    def __init__(
        self,
        labeled: torch.Tensor,
        labeled_view: Callable[[torch.Tensor], torch.Tensor],
        unlabeled_views: list[Callable[[torch.Tensor], torch.Tensor]],
    ) -> None:
        super().__init__()
        self.labeled, self.labeled_view, self.unlabeled_views = labeled, labeled_view, unlabeled_views
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape == self.labeled.shape and torch.equal(x, self.labeled):
            return self.labeled_view(x)
        view = self.unlabeled_views[self.calls % len(self.unlabeled_views)]
        self.calls += 1
        return view(x)


def batchnorm_eval(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


@torch.no_grad()
def calibrate(model: MixMatchModule, x: torch.Tensor) -> None:
    """Running statistics := those of ``x``, BatchNorm then in eval mode, and a sharper classifier:
    the guesses spread over the classes, so sharpening and averaging visibly matter."""
    layers = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.momentum = 1.0
    model.backbone.train()(normalized(x))
    for layer in layers:
        layer.momentum = 0.1
    batchnorm_eval(model.backbone)
    model.classifier.weight.mul_(4.0)


def at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    monkeypatch.setattr(MixMatchModule, "global_step", property(lambda self: step))


def fix_mixup_draws(monkeypatch: pytest.MonkeyPatch, weights: torch.Tensor, partners: torch.Tensor) -> None:
    monkeypatch.setattr(mixmatch, "sample_mixup_weights", lambda alpha, count: weights[:count].clone())
    monkeypatch.setattr(mixmatch, "mixup_partners", lambda count, device: partners[:count].clone())


def record_logs(model: MixMatchModule) -> dict[str, torch.Tensor]:
    logged: dict[str, Any] = {}
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, value)  # type: ignore[method-assign]
    return logged


def written_out_sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    out = torch.empty_like(p)
    for i in range(p.shape[0]):
        powered = [float(p[i, c]) ** (1.0 / temperature) for c in range(p.shape[1])]
        total = sum(powered)
        for c in range(p.shape[1]):
            out[i, c] = powered[c] / total
    return out


def expected_step(
    model: MixMatchModule,
    x: torch.Tensor,
    y: torch.Tensor,
    u: torch.Tensor,
    labeled_view: Callable,
    unlabeled_views: list[Callable],
    weights: torch.Tensor,
    partners: torch.Tensor,
    temperature: float,
) -> dict[str, torch.Tensor]:
    """The paper's Algorithm 1 and eqs. 2-5, written out row by row."""
    k = len(unlabeled_views)
    with torch.no_grad():
        probs = [net(model, view(u)).softmax(dim=1) for view in unlabeled_views]
        guess = written_out_sharpen(sum(probs) / k, temperature)
    inputs = torch.cat([labeled_view(x)] + [view(u) for view in unlabeled_views])
    targets = torch.cat([F.one_hot(y, CLASSES).float()] + [guess] * k)
    mixed_x, mixed_t = [], []
    for i in range(len(inputs)):
        lam = max(float(weights[i]), 1.0 - float(weights[i]))
        j = int(partners[i])
        mixed_x.append(lam * inputs[i] + (1 - lam) * inputs[j])
        mixed_t.append(lam * targets[i] + (1 - lam) * targets[j])
    mixed_x, mixed_t = torch.stack(mixed_x), torch.stack(mixed_t)
    logits = net(model, mixed_x)
    b = len(x)
    log_p = logits[:b].log_softmax(dim=1)
    supervised = sum(-(mixed_t[i] * log_p[i]).sum() for i in range(b)) / b
    q = logits[b:].softmax(dim=1)
    rows, classes = q.shape
    unlabeled = sum((q[i, c] - mixed_t[b + i, c]) ** 2 for i in range(rows) for c in range(classes))
    unlabeled = unlabeled / (rows * classes)
    return {
        "guess": guess,
        "mixed_x": mixed_x,
        "mixed_t": mixed_t,
        "supervised": supervised,
        "unlabeled": unlabeled,
    }


K_VIEWS = [roll, invert, shade]
ROWS = LABELED + len(K_VIEWS) * UNLABELED  # 22
# row i of X_hat + U_hat_1..K (4 + 3 * 6 = 22 rows) is mixed with partners[i]: labeled rows with
# unlabeled ones (so their targets take in the guess) and the reverse
PARTNERS = torch.tensor([5, 12, 20, 9, 0, 1, 2, 3, 21, 17, 14, 15, 11, 13, 16, 4, 10, 6, 19, 7, 18, 8])
# lambda below 0.5 on most rows: lambda' = 1 - lambda must be used there
WEIGHTS = torch.tensor([0.1, 0.3, 0.8, 0.45, 0.2, 0.95, 0.35, 0.6, 0.15, 0.4, 0.05] * 2)


def step_setup(monkeypatch: pytest.MonkeyPatch, step: int) -> tuple[MixMatchModule, dict, dict[str, Any]]:
    """A calibrated model with K = 3 scripted views, fixed MixUp draws, at ``step`` (ramp of 10)."""
    torch.manual_seed(0)
    x, u = images(LABELED, 1), images(UNLABELED, 2)
    y = torch.tensor([0, 1, 2, 3])
    hidden = torch.tensor([0, 1, 2, 3, 0, 1])
    model = MixMatchModule(**FACTS, num_augmentations=len(K_VIEWS), rampup_steps=10)
    model.train()
    calibrate(model, torch.cat([x, u]))
    model.weak = ScriptedViews(x, flip, K_VIEWS)
    fix_mixup_draws(monkeypatch, WEIGHTS, PARTNERS)
    at_step(monkeypatch, step)
    return model, train_batch(x, y, u, hidden), {"x": x, "y": y, "u": u}


def expected_for(model: MixMatchModule, setup: dict[str, Any]) -> dict[str, torch.Tensor]:
    return expected_step(model, setup["x"], setup["y"], setup["u"], flip, K_VIEWS, WEIGHTS, PARTNERS, 0.5)


# -- the parts ----------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.5, 0.25, 1.0, 2.0])
def test_sharpen_is_the_papers_formula(temperature: float) -> None:
    p = torch.softmax(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    got = sharpen(p, temperature)
    torch.testing.assert_close(got, written_out_sharpen(p, temperature))
    assert torch.equal(got.argmax(dim=1), p.argmax(dim=1))
    entropy = lambda q: -(q * q.log()).sum(dim=1)  # noqa: E731
    if temperature < 1:
        assert (entropy(got) < entropy(p)).all()
    if temperature == 1.0:
        torch.testing.assert_close(got, p)
    with pytest.raises(ValueError, match="temperature"):
        sharpen(p, 0.0)


def test_unlabeled_loss_is_the_squared_error_averaged_over_classes_and_rows() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5, generator=generator)
    targets = torch.softmax(torch.randn(6, 5, generator=generator), dim=1)
    p = logits.softmax(dim=1)
    expected = sum(float(p[i, c] - targets[i, c]) ** 2 for i in range(6) for c in range(5)) / (6 * 5)
    assert float(mixmatch_unlabeled_loss(logits, targets)) == pytest.approx(expected, rel=1e-6)
    # closed form: equal logits against the uniform target cost nothing
    assert float(mixmatch_unlabeled_loss(torch.zeros(3, 4), torch.full((3, 4), 0.25))) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="shape"):
        mixmatch_unlabeled_loss(logits, targets[:, :4])


def test_soft_cross_entropy_is_the_mean_of_minus_sum_target_log_softmax() -> None:
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 3, generator=generator)
    targets = torch.softmax(torch.randn(5, 3, generator=generator), dim=1)
    log_p = logits.log_softmax(dim=1)
    expected = sum(-float(targets[i, c] * log_p[i, c]) for i in range(5) for c in range(3)) / 5
    assert float(soft_cross_entropy(logits, targets)) == pytest.approx(expected, rel=1e-6)
    hard = torch.tensor([2, 0, 1, 1, 0])  # one-hot targets: the usual cross-entropy
    assert float(soft_cross_entropy(logits, F.one_hot(hard, 3).float())) == pytest.approx(
        float(F.cross_entropy(logits, hard)), rel=1e-6
    )


def test_mixup_mixes_each_row_with_its_partner_at_max_lambda() -> None:
    generator = torch.Generator().manual_seed(3)
    inputs = torch.rand(4, 1, 2, 2, generator=generator)
    targets = torch.softmax(torch.randn(4, 3, generator=generator), dim=1)
    weights = torch.tensor([0.1, 0.7, 0.5, 0.3])
    partners = torch.tensor([2, 0, 3, 1])
    mixed_x, mixed_t = mixup(inputs, targets, weights, partners)
    for i, lam in enumerate([0.9, 0.7, 0.5, 0.7]):  # max(lambda, 1 - lambda)
        j = int(partners[i])
        torch.testing.assert_close(mixed_x[i], lam * inputs[i] + (1 - lam) * inputs[j])
        torch.testing.assert_close(mixed_t[i], lam * targets[i] + (1 - lam) * targets[j])
    torch.testing.assert_close(mixed_t.sum(dim=1), torch.ones(4))


def test_linear_rampup_and_the_modules_unlabeled_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [linear_rampup(s, 100) for s in (0, 25, 50, 100, 250)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert linear_rampup(0, 0) == 1.0
    model = MixMatchModule(**FACTS, unlabeled_loss_weight=75.0, rampup_steps=16_000)
    for step, weight in ((0, 0.0), (8_000, 37.5), (16_000, 75.0), (40_000, 75.0)):
        at_step(monkeypatch, step)
        assert model.unlabeled_weight() == pytest.approx(weight)


# -- the step -----------------------------------------------------------------------------
@pytest.mark.parametrize("step", [3, 10])
def test_step_loss_is_mixed_cross_entropy_plus_ramped_l2_on_mixed_guesses(
    step: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``H(X') + 75 * min(1, step / 10) * L2(U')``, each term against its written-out formula,
    and the gradient is that of the formula with the guess held constant."""
    model, batch, setup = step_setup(monkeypatch, step)
    logged = record_logs(model)
    loss = model.training_step(batch, 1)
    expected = expected_for(model, setup)
    weight = 75.0 * min(1.0, step / 10)
    assert float(logged["train/unlabeled_weight"]) == pytest.approx(weight)
    assert float(logged["train/sup_loss"]) == pytest.approx(expected["supervised"].item(), rel=1e-5)
    assert float(logged["train/unsup_loss"]) == pytest.approx(expected["unlabeled"].item(), rel=1e-5)
    total = expected["supervised"] + weight * expected["unlabeled"]
    assert loss.item() == pytest.approx(total.item(), rel=1e-5)
    params = list(model.backbone.parameters()) + list(model.classifier.parameters())
    for got, want in zip(torch.autograd.grad(loss, params), torch.autograd.grad(total, params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_supervised_loss_uses_the_mixed_one_hot_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """At step 0 the ramp is 0: the loss is ``H(X')`` alone, whose targets mix each one-hot label
    with its partner's target (here all partners of labeled rows are unlabeled views)."""
    model, batch, setup = step_setup(monkeypatch, step=0)
    loss = model.training_step(batch, 1)
    expected = expected_for(model, setup)
    assert loss.item() == pytest.approx(expected["supervised"].item(), rel=1e-5)
    # the unmixed labels would give another value: the test can tell them apart
    unmixed = F.cross_entropy(net(model, expected["mixed_x"][:LABELED]), setup["y"])
    assert abs(unmixed.item() - expected["supervised"].item()) > 1e-3


def test_guess_is_the_sharpened_mean_over_the_k_views_and_carries_no_gradient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without mixing (lambda = 1), ``L2(U')`` compares each view's prediction with the guess
    ``sharpen(mean_k softmax(f(view_k(u))))``; gradients flow through the predictions only."""
    model, batch, setup = step_setup(monkeypatch, step=10)
    fix_mixup_draws(monkeypatch, torch.ones(ROWS), torch.arange(ROWS))  # lambda' = 1: no mixing
    logged = record_logs(model)
    loss = model.training_step(batch, 1)
    u = setup["u"]
    with torch.no_grad():
        per_view = [net(model, view(u)).softmax(dim=1) for view in K_VIEWS]
        guess = written_out_sharpen((per_view[0] + per_view[1] + per_view[2]) / 3, 0.5)
        first_view_only = written_out_sharpen(per_view[0], 0.5)
    assert (guess - first_view_only).abs().max() > 1e-3  # averaging matters here
    predictions = torch.cat([net(model, view(u)).softmax(dim=1) for view in K_VIEWS])
    l2 = ((predictions - guess.repeat(3, 1)) ** 2).mean()
    assert float(logged["train/unsup_loss"]) == pytest.approx(l2.item(), rel=1e-5)
    supervised = F.cross_entropy(net(model, flip(setup["x"])), setup["y"])
    total = supervised + 75.0 * l2
    params = list(model.backbone.parameters()) + list(model.classifier.parameters())
    for got, want in zip(torch.autograd.grad(loss, params), torch.autograd.grad(total, params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # every guess is used (mask rate 1), and its accuracy is scored against the hidden labels
    assert float(logged["train/mask_rate"]) == 1.0
    hidden = batch["unlabeled"].hidden_labels
    accuracy = (guess.argmax(dim=1) == hidden).float().mean()
    assert float(logged["train/pseudo_label_acc"]) == pytest.approx(float(accuracy))


def test_mixup_keeps_labeled_rows_dominated_by_their_own_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch that reaches the network: labeled row i is ``lambda'_i flip(x_i) + (1 - lambda'_i)
    view_k(u_j)`` (its partner, an unlabeled view here) with ``lambda' = max(lambda, 1 - lambda)``
    >= 0.5, even where the draw ``lambda`` is below 0.5."""
    model, batch, setup = step_setup(monkeypatch, step=10)
    seen: list[torch.Tensor] = []
    model.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    model.training_step(batch, 1)
    assert len(seen) == 2  # the guess (K U rows), then the mixed batch (B + K U rows)
    assert len(seen[0]) == ROWS - LABELED and len(seen[1]) == ROWS
    own = flip(setup["x"])
    assert (WEIGHTS[:LABELED] < 0.5).sum() >= 2  # the max must act on these rows
    for i in range(LABELED):
        lam = max(float(WEIGHTS[i]), 1 - float(WEIGHTS[i]))
        partner = int(PARTNERS[i]) - LABELED
        view, image = K_VIEWS[partner // UNLABELED], partner % UNLABELED
        expected = lam * own[i] + (1 - lam) * view(setup["u"])[image]
        torch.testing.assert_close(seen[1][i], normalized(expected), rtol=1e-5, atol=1e-5)
    # and the whole batch, unlabeled rows included
    torch.testing.assert_close(
        seen[1], normalized(expected_for(model, setup)["mixed_x"]), rtol=1e-5, atol=1e-5
    )


def test_hidden_labels_never_reach_the_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    results = []
    for hidden in (torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([3, 3, 0, 1, 2, 2]), torch.full((6,), -1)):
        model, batch, _ = step_setup(monkeypatch, step=10)
        batch["unlabeled"] = batch["unlabeled"]._replace(hidden_labels=hidden)
        logged = record_logs(model)
        loss = model.training_step(batch, 1)
        grads = torch.autograd.grad(loss, list(model.backbone.parameters()))
        results.append((loss.item(), grads, logged["train/pseudo_label_acc"]))
    for loss, grads, _ in results[1:]:
        assert loss == results[0][0]
        for got, want in zip(grads, results[0][1]):
            assert torch.equal(got, want)
    assert float(results[0][2]) != float(results[1][2])  # they are read, for the diagnostics only


def test_the_guess_does_not_move_batchnorm_running_statistics() -> None:
    """In train mode the running statistics after a step are those of the mixed batch's forward
    alone: the guess's forward normalises with its batch but is not counted."""
    torch.manual_seed(0)
    x, u = images(LABELED, 1), images(UNLABELED, 2)
    model = MixMatchModule(**FACTS)
    model.train()
    before = copy.deepcopy(model.backbone)
    seen: list[torch.Tensor] = []
    model.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    model.training_step(train_batch(x, torch.tensor([0, 1, 2, 3]), u), 0)
    assert len(seen) == 2
    with torch.no_grad():
        before.train()(seen[1])  # only the mixed batch
    for (name, got), want in zip(model.backbone.named_buffers(), before.buffers()):
        assert torch.equal(got, want), name


def test_the_k_views_are_independent_weak_augmentations() -> None:
    """The real weak augmentation (flip + shift), K = 2: the two views of an image differ (the
    same draw reused twice would give identical views), and each differs from the labeled view."""
    torch.manual_seed(0)
    size, count = 16, 12
    facts = {**FACTS, "image_size": size, "horizontal_flip": True}
    model = MixMatchModule(**facts)
    model.train()
    seen: list[torch.Tensor] = []
    model.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    u = images(count, 2, size)
    model.training_step(train_batch(images(4, 1, size), torch.tensor([0, 1, 2, 3]), u), 0)
    views = seen[0].view(2, count, 1, size, size)
    identical = sum(torch.equal(views[0, i], views[1, i]) for i in range(count))
    assert identical <= 2, f"{identical} of {count} images got the same view twice"
    originals = normalized(u)
    changed = sum(not torch.equal(views[k, i], originals[i]) for k in range(2) for i in range(count))
    assert changed >= 2 * count - 4  # they are augmentations, not the images themselves


# -- EMA evaluation and the optimizer -------------------------------------------------------
class Trajectory(L.Callback):
    def __init__(self) -> None:
        self.live: list[dict[str, torch.Tensor]] = []
        self.ema: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = {k: v.detach().clone() for k, v in pl_module.ema_model.state_dict().items()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        live = {f"backbone.{k}": v for k, v in pl_module.backbone.state_dict().items()}
        live.update({f"classifier.{k}": v for k, v in pl_module.classifier.state_dict().items()})
        self.live.append({k: v.detach().clone() for k, v in live.items()})
        self.ema.append({k: v.detach().clone() for k, v in pl_module.ema_model.state_dict().items()})


@pytest.mark.parametrize("evaluate_with_ema", [True, False])
def test_ema_copy_moves_every_step_and_is_what_evaluation_uses(
    evaluate_with_ema: bool, tmp_path: Path
) -> None:
    L.seed_everything(0)
    model = MixMatchModule(**FACTS, ema_decay=0.6, rampup_steps=0, evaluate_with_ema=evaluate_with_ema)
    batches = [
        train_batch(images(4, s), torch.arange(4) % CLASSES, images(4, s + 50), torch.arange(4))
        for s in range(4)
    ]
    trajectory = Trajectory()
    L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[trajectory],
    ).fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    assert len(trajectory.ema) == 4
    expected = dict(trajectory.start)
    parameters = {n for n, _ in model.ema_model.named_parameters()}
    previous = trajectory.start
    for step, (live, ema) in enumerate(zip(trajectory.live, trajectory.ema)):
        decay = min(1.0 - 1.0 / (step + 1), 0.6)
        for key in parameters:
            expected[key] = decay * expected[key] + (1 - decay) * live[key]
            torch.testing.assert_close(ema[key], expected[key], rtol=1e-5, atol=1e-6)
        assert any(not torch.equal(ema[key], previous[key]) for key in parameters), f"no move at {step}"
        previous = ema
    x = images(8, 99)
    model.eval()
    with torch.no_grad():
        ema_logits = model.ema_model(normalized(x))
        live_logits = net(model, x)
        assert (ema_logits - live_logits).abs().max() > 1e-4
        wanted = ema_logits if evaluate_with_ema else live_logits
        torch.testing.assert_close(model.evaluation_logits(x), wanted)
        torch.testing.assert_close(model.evaluation_classifier()(model.embed(x)), wanted)


def test_default_optimizer_is_adam_with_kernel_only_decoupled_decay_and_a_constant_lr() -> None:
    model = MixMatchModule(**FACTS)
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)  # no scheduler: the paper keeps lr constant
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.02 for p in g["params"]}
    for name, p in list(model.backbone.named_parameters()) + list(model.classifier.named_parameters()):
        assert (id(p) in decayed) == (p.ndim >= 2), name
    assert all(g["lr"] == 0.002 for g in optimizer.param_groups)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.trainable_parameters()))


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("temperature", 0.0),
        ("num_augmentations", 0),
        ("mixup_alpha", 0.0),
        ("unlabeled_loss_weight", -1.0),
        ("rampup_steps", -1),
        ("ema_decay", 1.5),
    ],
)
def test_refused_arguments_name_the_problem(argument: str, value: float) -> None:
    with pytest.raises(ValueError, match=argument):
        MixMatchModule(**FACTS, **{argument: value})


# -- the paper's settings -------------------------------------------------------------------
PAPER = {
    "temperature": 0.5,
    "num_augmentations": 2,
    "mixup_alpha": 0.75,
    "unlabeled_loss_weight": 75.0,
    "rampup_steps": 16_000,
    "ema_decay": 0.999,
    "evaluate_with_ema": True,
    "lr": 0.002,
    "weight_decay": 0.02,
}
REFERENCE = sorted((Path(__file__).resolve().parents[1] / "configs" / "reference").glob("mixmatch_*.yaml"))


def test_the_defaults_are_the_papers_cifar10_settings() -> None:
    hparams = MixMatchModule(**FACTS).hparams
    assert {key: hparams[key] for key in PAPER} == PAPER


@pytest.mark.parametrize("config", REFERENCE, ids=[path.stem for path in REFERENCE])
def test_reference_configs_carry_the_papers_settings(config: Path) -> None:
    """Berthelot et al. 2019 and google-research/mixmatch: B 64 labeled + 64 unlabeled, 2^20
    steps; CIFAR-100: lambda_u 150 and wd 0.04 (runs/table1.sh)."""
    raw = yaml.safe_load(config.read_text())
    data, model = raw["data"]["init_args"], raw["model"]["init_args"]
    assert raw["model"]["class_path"] == "ssl_modules.MixMatchModule"
    assert (data["batch_size"], data["unlabeled_batch_ratio"]) == (64, 1)
    assert raw["trainer"]["max_steps"] == 2**20
    cifar100 = "cifar100" in config.stem
    expected = {**PAPER, "unlabeled_loss_weight": 150.0 if cifar100 else 75.0}
    expected["weight_decay"] = 0.04 if cifar100 else 0.02
    assert {key: model[key] for key in expected} == expected
    assert model["backbone"] == ("wrn_28_8" if cifar100 else "wrn_28_2")
    labels = int(config.stem.rsplit("_", 1)[1])
    assert data["labels_per_class"] * (100 if cifar100 else 10) == labels, (
        "the file name states the label count"
    )
