"""What makes each semi-supervised method *that* method, and the EMA: one behavioural test per
defining property, each failing when that property is broken (issue 10, item 3).

Expected values are the papers' formulas written out here in plain torch, on tiny networks with
deterministic stand-ins for the augmentations (``Fn``) and, where a value must be exact, the
student's BatchNorm in eval mode so that a sample's logits do not depend on its batch.

- FixMatch: the pseudo-label comes from the weak view, the loss is on the strong view, the mean
  runs over the whole unlabeled batch, ``lambda_u`` weighs the unlabeled term only; the
  evaluation EMA is Mean Teacher's warm-up EMA of the recorded trajectory (buffers copied) and
  is what ``val``/``test`` score (the live model with ``evaluate_with_ema=False``).
- StudentTeacherModule: ``alpha * CE + (1 - alpha) * w(step) * D(teacher || student)`` with the
  teacher on its own view; Mean Teacher's teacher is the EMA of the trajectory and is what
  ``val``/``test`` score; a fixed teacher never changes; Noisy Student's teacher is clean.
- SelfTrainingModule: a round's pseudo-labels are the round-start labeler's on clean images,
  ``top_k`` keeps the ``k`` most confident per class (``k`` growing per round), ``all`` keeps
  everything, ``weighted`` weighs by confidence; online, the student's own prediction.
- During a fit, teachers and labelers run in eval mode and never change.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import ssl_modules.semi_supervised.self_training as self_training_module
from datamodules.base import NamedBatches
from ssl_modules import FixMatchModule, SelfTrainingModule, StudentTeacherModule, SupervisedModule
from ssl_modules.batch import LabeledBatch, UnlabeledBatch, train_batch
from ssl_modules.ema import ema_update

CLASSES, SIZE, MEAN, STD = 4, 8, 0.5, 0.25
FACTS = {
    "num_classes": CLASSES,
    "channels": 1,
    "image_size": SIZE,
    "mean": (MEAN,),
    "std": (STD,),
    "horizontal_flip": False,
}
# a constant learning rate: the trajectories below do not depend on the schedule
CONSTANT_LR = {
    "optimizer": lambda params: torch.optim.SGD(params, lr=0.2, momentum=0.9),
    "scheduler": lambda optimizer: None,
}


# -- helpers ------------------------------------------------------------------------------
def images(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def make_batch(labeled: int = 8, unlabeled: int = 16, seed: int = 0) -> dict:
    return train_batch(
        images(labeled, seed),
        torch.arange(labeled) % CLASSES,
        images(unlabeled, seed + 100),
        torch.arange(unlabeled) % CLASSES,
    )


def normalized(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


class Fn(nn.Module):
    """A deterministic stand-in for an augmentation."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def flip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def invert(x: torch.Tensor) -> torch.Tensor:
    return 1.0 - x


def roll(x: torch.Tensor) -> torch.Tensor:
    return x.roll(2, dims=-2)


def batchnorm_eval(module: nn.Module) -> None:
    """Running statistics: a sample's logits no longer depend on the rest of its batch."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


def net(backbone: nn.Module, classifier: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``classifier(backbone(standardise(x)))`` for images in [0, 1]."""
    return classifier(backbone(normalized(x)))


def kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.: ``T^2 * mean_b sum_c p_t (log p_t - log p_s)``, ``p = softmax(logits / T)``."""
    log_teacher = (teacher / temperature).log_softmax(dim=1)
    log_student = (student / temperature).log_softmax(dim=1)
    return temperature**2 * (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1).mean()


def softmax_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean Teacher: ``mean_b ||softmax(s_b) - softmax(t_b)||^2 / C``."""
    return ((student.softmax(dim=1) - teacher.softmax(dim=1)) ** 2).sum(dim=1).mean() / student.shape[1]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(dim=1)
    return -(p * p.log()).sum(dim=1).mean()


def at_step(monkeypatch: pytest.MonkeyPatch, cls: type, step: int) -> None:
    """Make ``global_step`` read ``step`` without a Trainer."""
    monkeypatch.setattr(cls, "global_step", property(lambda self: step))


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Running statistics := those of ``x``, then BatchNorm in eval: predictions spread over classes."""
    layers = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.momentum = 1.0
    model.backbone.train()(normalized(x))
    for layer in layers:
        layer.momentum = 0.1
    batchnorm_eval(model.backbone)


def sharpen(model: nn.Module) -> None:
    """Scale the classifier so that confidences spread over (1/C, 1): thresholds then bite."""
    with torch.no_grad():
        model.classifier.weight.mul_(4.0)


class Spy(nn.Module):
    """Wraps a function (or a loss module) and records its arguments."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn
        self.calls: list[tuple[Any, ...]] = []

    def forward(self, *args: Any) -> Any:
        self.calls.append(args)
        return self.fn(*args)


def state(*modules: tuple[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.{key}": value.detach().clone()
        for prefix, m in modules
        for key, value in m.state_dict().items()
    }


def live_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return state(("backbone", model.backbone), ("classifier", model.classifier))


def parameter_names(model: nn.Module) -> set[str]:
    return {f"backbone.{n}" for n, _ in model.backbone.named_parameters()} | {
        f"classifier.{n}" for n, _ in model.classifier.named_parameters()
    }


class PairedBatches(Dataset):
    """``{"labeled": LabeledBatch, "unlabeled": UnlabeledBatch}`` items of float images in [0, 1]."""

    def __init__(self, count: int = 48) -> None:
        self.labeled, self.unlabeled = images(count, 1), images(count, 2)
        self.labels = torch.arange(count) % CLASSES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        position = torch.tensor(index)
        return {
            "labeled": LabeledBatch(self.labeled[index], self.labels[index], position),
            "unlabeled": UnlabeledBatch(self.unlabeled[index], self.labels[index], position),
        }


def trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(tmp_path),
    }
    return L.Trainer(**{**options, **kwargs})


class Trajectory(L.Callback):
    """The live weights (parameters and buffers) after every optimizer step, and the target's at the start."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.live: list[dict[str, torch.Tensor]] = []
        self.steps: list[int] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = {k: v.detach().clone() for k, v in getattr(pl_module, self.target).state_dict().items()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.live.append(live_state(pl_module))
        self.steps.append(trainer.global_step)


def save_checkpoint(model: L.LightningModule, path: Path) -> None:
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)


# -- the EMA ------------------------------------------------------------------------------
def test_ema_update_averages_parameters_and_copies_batchnorm_buffers() -> None:
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    target = copy.deepcopy(online).requires_grad_(False)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online.train()(torch.randn(16, 3) * 3 + 1)  # moves the running statistics
    before = {k: v.clone() for k, v in target.state_dict().items()}
    ema_update(target, online, 0.7)
    online_state = online.state_dict()
    for name, _ in online.named_parameters():
        expected = 0.7 * before[name] + 0.3 * online_state[name]
        assert torch.allclose(target.state_dict()[name], expected, atol=1e-6), name
    for name, _ in online.named_buffers():  # running_mean, running_var, num_batches_tracked
        assert torch.equal(target.state_dict()[name], online_state[name]), name
        assert not torch.equal(before[name], online_state[name]), name  # the test can see a missed copy
    ema_update(target, online, 1.0)  # decay 1: parameters frozen
    for name, _ in online.named_parameters():
        assert not torch.allclose(target.state_dict()[name], online_state[name])


# -- FixMatch -----------------------------------------------------------------------------
@pytest.mark.parametrize("entropy_weight", [0.0, 0.4])
def test_fixmatch_loss_pseudo_labels_from_weak_view_taught_on_strong_view_mean_over_all(
    entropy_weight: float,
) -> None:
    """``CE(weak(x), y) + lambda_u * 1/U sum_u 1(max q_u >= tau) CE(strong(u), argmax q_u)`` with
    ``q = softmax(f(weak(u)))`` (+ entropy of the strong views)."""
    torch.manual_seed(0)
    batch = make_batch()
    (x, y, _), (u, _, _) = batch["labeled"], batch["unlabeled"]
    probe = FixMatchModule(**FACTS, confidence_threshold=0.0)
    sharpen(probe)
    calibrate_batchnorm(probe, torch.cat([x, u]))
    with torch.no_grad():
        confidence = net(probe.backbone, probe.classifier, flip(u)).softmax(dim=1).max(dim=1).values
    ordered = confidence.sort().values
    threshold = float((ordered[7] + ordered[8]) / 2)  # about half the weak views pass
    model = FixMatchModule(
        **FACTS, confidence_threshold=threshold, unlabeled_loss_weight=2.5, entropy_weight=entropy_weight
    )
    model.load_state_dict(probe.state_dict())
    model.weak, model.strong = Fn(flip), Fn(invert)  # weak and strong views, deterministic and distinct
    model.train()
    batchnorm_eval(model.backbone)
    loss = model.training_step(batch, 0)

    weak_logits = net(model.backbone, model.classifier, flip(u)).detach()
    strong_logits = net(model.backbone, model.classifier, invert(u))
    q = weak_logits.softmax(dim=1)
    mask = (q.max(dim=1).values >= threshold).float()
    assert 0 < mask.sum() < len(u)  # both branches, and "mean over kept" would differ
    unlabeled = (mask * F.cross_entropy(strong_logits, q.argmax(dim=1), reduction="none")).sum() / len(u)
    supervised = F.cross_entropy(net(model.backbone, model.classifier, flip(x)), y)
    expected = supervised + 2.5 * unlabeled + entropy_weight * entropy(strong_logits)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the gradient is that of the strong view only: the weak view is a target
    params = list(model.backbone.parameters()) + list(model.classifier.parameters())
    for got, want in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params)):
        assert torch.allclose(got, want, atol=1e-5)


# -- EMA teachers (FixMatch's evaluation EMA, Mean Teacher's teacher) ---------------------------
def ema_model_of(name: str, evaluate_with_ema: bool) -> tuple[L.LightningModule, str]:
    if name == "fixmatch":
        model = FixMatchModule(
            **FACTS,
            ema_decay=0.6,
            evaluate_with_ema=evaluate_with_ema,
            confidence_threshold=0.0,
            **CONSTANT_LR,
        )
        return model, "ema_model"
    model = StudentTeacherModule(**FACTS, teacher="ema", ema_decay=0.6, alpha=0.5, **CONSTANT_LR)
    return model, "teacher"


@pytest.mark.parametrize(
    ("name", "evaluate_with_ema"), [("fixmatch", True), ("fixmatch", False), ("mean_teacher", True)]
)
def test_ema_is_the_warm_up_ema_of_the_trajectory_and_is_what_validation_and_test_score(
    name: str, evaluate_with_ema: bool, tmp_path: Path
) -> None:
    """After each optimizer step ``t`` (0-based): ``ema = d_t ema + (1 - d_t) live_t`` with
    ``d_t = min(1 - 1/(t + 1), decay)``; buffers are the live ones. ``val``/``test`` use the EMA
    (Mean Teacher always; FixMatch with ``evaluate_with_ema``), else the live network."""
    L.seed_everything(0)
    model, target_name = ema_model_of(name, evaluate_with_ema)
    trajectory = Trajectory(target_name)
    trainer(tmp_path, max_steps=5, callbacks=[trajectory]).fit(
        model, train_dataloaders=DataLoader(PairedBatches(), batch_size=8)
    )
    assert trajectory.steps == [1, 2, 3, 4, 5]
    expected = {k: v.clone() for k, v in trajectory.start.items()}
    names = parameter_names(model)
    for step, live in enumerate(trajectory.live):
        decay = min(1.0 - 1.0 / (step + 1), 0.6)
        for key in names:
            expected[key] = decay * expected[key] + (1.0 - decay) * live[key]
    target = getattr(model, target_name)
    final = trajectory.live[-1]
    expected.update({key: value for key, value in final.items() if key not in names})
    for key, value in target.state_dict().items():
        if key in names:
            assert torch.allclose(value, expected[key], atol=1e-5), key
        else:  # BatchNorm running statistics: copied, not averaged
            assert torch.equal(value, final[key]), key
            assert not torch.equal(value, trajectory.start[key]), key
    moved = max((target.state_dict()[k] - final[k]).abs().max().item() for k in names)
    assert moved > 1e-3  # the EMA is not the live network

    # what val/loss and test/loss score, computed with the expected EMA (or the live) weights
    backbone, classifier = copy.deepcopy(model.backbone).eval(), copy.deepcopy(model.classifier).eval()
    backbone.load_state_dict(
        {k[len("backbone.") :]: v for k, v in expected.items() if k.startswith("backbone.")}
    )
    classifier.load_state_dict(
        {k[len("classifier.") :]: v for k, v in expected.items() if k.startswith("classifier.")}
    )
    x = images(32, 7)
    y = torch.arange(32) % CLASSES
    model.eval()
    with torch.no_grad():
        ema_loss = F.cross_entropy(net(backbone, classifier, x), y).item()
        live_loss = F.cross_entropy(net(model.backbone, model.classifier, x), y).item()
    assert abs(ema_loss - live_loss) > 1e-3
    wanted = ema_loss if evaluate_with_ema else live_loss
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    checker = trainer(tmp_path)
    assert checker.validate(model, dataloaders=loader, verbose=False)[0]["val/loss"] == pytest.approx(
        wanted, rel=1e-4
    )
    assert checker.test(model, dataloaders=loader, verbose=False)[0]["test/loss"] == pytest.approx(
        wanted, rel=1e-4
    )


# -- StudentTeacherModule: distillation, Mean Teacher, Noisy Student -----------------------
CONFIGS = {
    # Hinton: KL at temperature T on the student's own view, labeled images included
    "distillation": {
        "teacher": "fixed",
        "teacher_backbone": "small_cnn",
        "teacher_checkpoint": "unused.ckpt",
        "consistency": "kl",
        "temperature": 3.0,
        "teacher_input": "same",
        "consistency_on_labeled": True,
    },
    # Mean Teacher: softmax-MSE, teacher on its own view, ramped-up weight
    "mean_teacher": {
        "teacher": "ema",
        "consistency": "mse",
        "consistency_weight": 20.0,
        "rampup_steps": 10,
        "teacher_input": "weak",
        "consistency_on_labeled": True,
        "entropy_weight": 0.3,
    },
    # Noisy Student: the teacher labels the clean images, unlabeled only
    "noisy_student": {
        "teacher": "fixed",
        "teacher_backbone": "small_cnn",
        "teacher_checkpoint": "unused.ckpt",
        "consistency": "kl",
        "temperature": 1.0,
        "teacher_input": "clean",
        "consistency_on_labeled": False,
    },
}
TEACHER_VIEW = {"same": flip, "weak": roll, "clean": lambda x: x}


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("distillation", 4),
        ("noisy_student", 4),
        ("mean_teacher", 0),
        ("mean_teacher", 4),
        ("mean_teacher", 10),
    ],
)
def test_student_teacher_loss_is_alpha_ce_plus_one_minus_alpha_ramped_teacher_term(
    name: str, step: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``alpha CE(s(x), y) + (1 - alpha) w(step) D(t(view_t) || s(view_s))``; swapping ``alpha`` and
    ``1 - alpha`` changes the loss by ``(2 alpha - 1)(CE - w D)``."""
    config = CONFIGS[name]
    at_step(monkeypatch, StudentTeacherModule, step)
    batch = make_batch()
    (x, y, _), (u, _, _) = batch["labeled"], batch["unlabeled"]
    everything = torch.cat([x, u])
    losses, parts = {}, {}
    for alpha in (0.8, 0.2):
        torch.manual_seed(0)
        model = StudentTeacherModule(**FACTS, alpha=alpha, **config)
        with torch.no_grad():  # a teacher unlike the student (the EMA teacher starts as its copy)
            for p in model.teacher.parameters():
                p.add_(0.3 * torch.randn_like(p))
        model.student_augment, model.teacher_augment = Fn(flip), Fn(roll)
        model.train()
        batchnorm_eval(model.backbone)
        assert not model.teacher.training
        losses[alpha] = model.training_step(batch, 0)

        student = net(model.backbone, model.classifier, flip(everything))
        with torch.no_grad():
            teacher = model.teacher.classifier(
                model.teacher.backbone(normalized(TEACHER_VIEW[config["teacher_input"]](everything)))
            )
        first = 0 if config["consistency_on_labeled"] else len(x)
        if config["consistency"] == "kl":
            divergence = kd(student[first:], teacher[first:], config["temperature"])
        else:
            divergence = softmax_mse(student[first:], teacher[first:])
        rampup = (
            math.exp(-5.0 * (1.0 - min(1.0, step / config["rampup_steps"])) ** 2)
            if "rampup_steps" in config
            else 1.0
        )
        weight = config.get("consistency_weight", 1.0) * rampup
        supervised = F.cross_entropy(student[: len(x)], y)
        expected = alpha * supervised + (1 - alpha) * weight * divergence
        expected = expected + config.get("entropy_weight", 0.0) * entropy(student[len(x) :])
        assert losses[alpha].item() == pytest.approx(expected.item(), rel=1e-5)
        parts[alpha] = (supervised.item(), weight * divergence.item())
        params = list(model.backbone.parameters()) + list(model.classifier.parameters())
        for got, want in zip(
            torch.autograd.grad(losses[alpha], params), torch.autograd.grad(expected, params)
        ):
            assert torch.allclose(got, want, atol=1e-5)
    supervised, teacher_term = parts[0.8]
    assert abs(supervised - teacher_term) > 1e-2  # a swap is visible
    assert (losses[0.8] - losses[0.2]).item() == pytest.approx(
        (2 * 0.8 - 1) * (supervised - teacher_term), rel=1e-4
    )


def test_mean_teacher_student_and_teacher_see_different_views(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the real augmentations the teacher's weak view is its own draw, not the student's."""
    torch.manual_seed(0)
    model = StudentTeacherModule(**FACTS, teacher="ema", teacher_input="weak", student_augmentation="weak")
    seen: dict[str, torch.Tensor] = {}
    model.backbone.register_forward_pre_hook(lambda m, inputs: seen.__setitem__("student", inputs[0]))
    model.teacher.backbone.register_forward_pre_hook(lambda m, inputs: seen.__setitem__("teacher", inputs[0]))
    model.train()
    model.training_step(make_batch(), 0)
    differs = (seen["student"] - seen["teacher"]).flatten(1).abs().amax(dim=1) > 1e-6
    assert differs.float().mean() > 0.3


def test_noisy_student_teacher_is_clean_and_deterministic_and_the_student_is_noised() -> None:
    torch.manual_seed(0)
    model = StudentTeacherModule(
        **FACTS,
        teacher="fixed",
        teacher_backbone="small_cnn",
        teacher_checkpoint="unused.ckpt",
        teacher_input="clean",
        student_augmentation="strong",
        drop_rate=0.5,
        consistency="kl",
        temperature=1.0,
        consistency_on_labeled=False,
    )
    seen: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    model.backbone.register_forward_pre_hook(lambda m, inputs: seen["student"].append(inputs[0]))
    model.teacher.backbone.register_forward_pre_hook(lambda m, inputs: seen["teacher"].append(inputs[0]))
    spy = Spy(model.consistency_loss)
    model.consistency_loss = spy
    model.train()
    assert not any(m.training for m in model.teacher.modules())  # no dropout, running BatchNorm
    batch = make_batch()
    clean = normalized(torch.cat([batch["labeled"].images, batch["unlabeled"].images]))
    for seed in (1, 2):
        torch.manual_seed(seed)
        model.training_step(batch, 0)
    for teacher_input in seen["teacher"]:
        assert torch.allclose(teacher_input, clean)  # the un-augmented images
    assert torch.equal(spy.calls[0][1], spy.calls[1][1])  # the teacher's targets: no noise at all
    assert not torch.allclose(seen["student"][0], clean, atol=1e-3)  # RandAugment on the student
    assert not torch.allclose(seen["student"][0], seen["student"][1], atol=1e-3)
    # dropout: the same student input gives different logits from one call to the next
    model.student_augment = Fn(lambda x: x)
    outputs = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        model.training_step(batch, 0)
        outputs.append(spy.calls[-1][0].detach())
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-4)


@pytest.mark.parametrize("mode", ["distillation", "noisy_student"])
def test_fixed_teacher_never_changes_during_training_and_the_student_is_evaluated(
    mode: str, tmp_path: Path
) -> None:
    L.seed_everything(0)
    source = SupervisedModule(**FACTS, backbone="small_cnn")
    path = tmp_path / "teacher.ckpt"
    save_checkpoint(source, path)
    config = {k: v for k, v in CONFIGS[mode].items() if k not in ("teacher_backbone", "teacher_checkpoint")}
    noise = {"student_augmentation": "strong", "drop_rate": 0.5} if mode == "noisy_student" else {}
    model = StudentTeacherModule(**FACTS, teacher_checkpoint=str(path), **config, **noise, **CONSTANT_LR)
    start = live_state(model)
    trainer(tmp_path, max_steps=3).fit(model, train_dataloaders=DataLoader(PairedBatches(), batch_size=8))
    teacher = dict(model.teacher.named_parameters())
    for key, value in source.state_dict().items():
        if key in teacher:  # the buffers: test_frozen_networks_run_in_eval_mode_during_fit
            assert torch.equal(teacher[key], value), key
    assert any(not torch.equal(v, live_state(model)[k]) for k, v in start.items())  # the student trained
    model.eval()
    x = images(6, 9)
    with torch.no_grad():
        assert torch.allclose(model.evaluation_logits(x), net(model.backbone, model.classifier, x), atol=1e-6)
        assert not torch.allclose(
            model.evaluation_logits(x), net(model.teacher.backbone, model.teacher.classifier, x)
        )


# -- SelfTrainingModule -------------------------------------------------------------------
def top_k_mask(
    confidence: torch.Tensor, predicted: torch.Tensor, per_class: Callable[[int], int]
) -> torch.Tensor:
    """1 for the ``per_class(n_c)`` most confident predictions of each predicted class ``c``."""
    mask = torch.zeros(len(confidence))
    for cls in range(CLASSES):
        members = (predicted == cls).nonzero().flatten()
        order = members[confidence[members].argsort(descending=True)]
        mask[order[: per_class(len(members))]] = 1.0
    return mask


class RecordRoundStart(L.Callback):
    """The live weights as each epoch starts (callbacks run before the module's own hook, which
    starts the round), and the labeler as the epoch's first batch starts (just after)."""

    def __init__(self) -> None:
        self.live: dict[int, dict[str, torch.Tensor]] = {}
        self.labeler: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.live[trainer.current_epoch] = live_state(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.current_epoch not in self.labeler:
            self.labeler[trainer.current_epoch] = copy.deepcopy(pl_module.labeler.state_dict())


@pytest.mark.parametrize("selection", ["top_k", "all", "weighted"])
def test_self_training_round_pseudo_labels_are_the_round_start_labelers_selection(
    selection: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 2: the labeler is the model as round 2 starts; it labels the clean images; ``top_k``
    keeps ``ceil(min(1, 2 f) U / C)`` most confident per class, ``all`` every one, ``weighted``
    every one weighted by its confidence."""
    L.seed_everything(0)
    model = SelfTrainingModule(
        **FACTS,
        schedule="rounds",
        selection=selection,
        top_k_fraction=0.3,
        epochs_per_round=1,
        unlabeled_loss_weight=2.0,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.02),
        scheduler=lambda optimizer: None,
    )
    unlabeled, hidden = images(40, 5), torch.arange(40) % CLASSES
    loaders = {
        "labeled": DataLoader(
            NamedBatches(TensorDataset(images(8, 4), torch.arange(8) % CLASSES)), batch_size=8
        ),
        "unlabeled": DataLoader(
            NamedBatches(TensorDataset(unlabeled, hidden), UnlabeledBatch), batch_size=16
        ),
    }
    recorder = RecordRoundStart()
    trainer(tmp_path, max_epochs=3, limit_train_batches=1, callbacks=[recorder]).fit(
        model, train_dataloaders=loaders
    )
    assert int(model.round) == 2
    round_start = recorder.live[2]
    for key, value in round_start.items():  # the model as the round starts, BatchNorm included
        assert torch.equal(recorder.labeler[2][key], value), key
    # and still it at the end (its buffers: test_frozen_networks_run_in_eval_mode_during_fit)
    for key, value in model.labeler.named_parameters():
        assert torch.equal(value, round_start[key]), key
    moved = [not torch.equal(v, live_state(model)[k]) for k, v in round_start.items()]
    assert any(moved)  # the student trained on during the round

    backbone, classifier = copy.deepcopy(model.backbone).eval(), copy.deepcopy(model.classifier)
    backbone.load_state_dict({k[9:]: v for k, v in round_start.items() if k.startswith("backbone.")})
    classifier.load_state_dict({k[11:]: v for k, v in round_start.items() if k.startswith("classifier.")})
    with torch.no_grad():
        confidence, predicted = net(backbone, classifier, unlabeled).softmax(dim=1).max(dim=1)
    if selection == "top_k":
        k = math.ceil(min(1.0, 2 * 0.3) * 40 / CLASSES)  # 6 per class
        expected = top_k_mask(confidence, predicted, lambda n: min(k, n))
        assert expected.sum() < 40  # some class has more than k predictions: the selection bites
    else:
        expected = torch.ones(40)
    assert torch.equal(model.round_class_counts, torch.bincount(predicted[expected > 0], minlength=CLASSES))

    # a training step of round 2 on the whole unlabeled set: the labeler's pseudo-labels and weights
    spy = Spy(self_training_module.weighted_pseudo_label_loss)
    monkeypatch.setattr(self_training_module, "weighted_pseudo_label_loss", spy)
    model.student_augment = Fn(flip)  # the student's view is not what the labeler sees
    model.labeler.load_state_dict(recorder.labeler[2])  # undoes the BatchNorm drift of the bug below
    model.trainer = None  # a step outside the fit
    model.train()
    batchnorm_eval(model.backbone)
    x, y = images(4, 4), torch.arange(4)
    loss = model.training_step(train_batch(x, y, unlabeled, hidden), 0)
    _, pseudo_labels, weights = spy.calls[0]
    assert torch.equal(pseudo_labels, predicted)
    want = expected * confidence if selection == "weighted" else expected
    assert torch.allclose(weights, want, atol=1e-5)
    # CE(x) + lambda 1/U sum_u weight_u CE(student(view_u), pseudo_label_u)
    logits = net(model.backbone, model.classifier, flip(torch.cat([x, unlabeled])))
    per_image = F.cross_entropy(logits[4:], predicted, reduction="none")
    assert (want * per_image).mean() > 0.05  # the unlabeled term is visible
    expected_loss = F.cross_entropy(logits[:4], y) + 2.0 * (want * per_image).mean()
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)


def test_self_training_round_zero_is_supervised(monkeypatch: pytest.MonkeyPatch) -> None:
    model = SelfTrainingModule(**FACTS, schedule="rounds", selection="all")
    spy = Spy(self_training_module.weighted_pseudo_label_loss)
    monkeypatch.setattr(self_training_module, "weighted_pseudo_label_loss", spy)
    model.train()
    model.training_step(make_batch(), 0)
    assert spy.calls[0][2].sum() == 0


@pytest.mark.parametrize(("selection", "threshold"), [("top_k", 0.0), ("all", 0.6), ("weighted", 0.6)])
def test_self_training_online_loss_uses_the_students_own_prediction_and_the_selection(
    selection: str, threshold: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``CE(x) + w(step) 1/U sum_u weight_u CE(s(u), argmax s(u)) + entropy_weight H(s(u))``,
    ``w(step) = lambda exp(-5 (1 - step / warm-up)^2)``; ``top_k`` keeps ``ceil(f n_c)`` per class."""
    torch.manual_seed(0)
    at_step(monkeypatch, SelfTrainingModule, 3)
    model = SelfTrainingModule(
        **FACTS,
        schedule="online",
        selection=selection,
        confidence_threshold=threshold,
        top_k_fraction=0.4,
        unlabeled_loss_weight=3.0,
        unlabeled_warmup_steps=6,
        entropy_weight=0.5,
    )
    sharpen(model)
    spy = Spy(self_training_module.weighted_pseudo_label_loss)
    monkeypatch.setattr(self_training_module, "weighted_pseudo_label_loss", spy)
    model.student_augment = Fn(flip)
    model.train()
    batch = make_batch(unlabeled=24)
    (x, y, _), (u, _, _) = batch["labeled"], batch["unlabeled"]
    calibrate_batchnorm(model, torch.cat([x, u]))
    loss = model.training_step(batch, 0)

    logits = net(model.backbone, model.classifier, flip(torch.cat([x, u])))
    unlabeled_logits = logits[len(x) :]
    confidence, predicted = unlabeled_logits.detach().softmax(dim=1).max(dim=1)
    if selection == "top_k":
        weights = top_k_mask(confidence, predicted, lambda n: math.ceil(0.4 * n))
        assert weights.sum() < len(u)
    else:
        weights = (confidence >= threshold).float()
        assert 0 < weights.sum() < len(u)
        if selection == "weighted":
            weights = weights * confidence
    _, pseudo_labels, got_weights = spy.calls[0]
    assert torch.equal(pseudo_labels, predicted)
    assert torch.allclose(got_weights, weights, atol=1e-5)
    ramp = 3.0 * math.exp(-5.0 * (1.0 - 3 / 6) ** 2)
    per_image = F.cross_entropy(unlabeled_logits, predicted, reduction="none")
    expected = F.cross_entropy(logits[: len(x)], y) + ramp * (weights * per_image).mean()
    expected = expected + 0.5 * entropy(unlabeled_logits)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# -- frozen networks during a fit -------------------------------------------------------------
class FrozenModes(L.Callback):
    """Whether any submodule of the frozen network is in training mode at each training batch."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.training: list[bool] = []
        self.start: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        frozen = getattr(pl_module, self.name)
        self.training.append(any(m.training for m in frozen.modules()))
        self.start.setdefault(trainer.current_epoch, copy.deepcopy(frozen.state_dict()))


@pytest.mark.parametrize("name", ["mean_teacher", "distillation", "noisy_student", "self_training_rounds"])
def test_frozen_networks_run_in_eval_mode_during_fit(name: str, tmp_path: Path) -> None:
    """A teacher or labeler is a target: running BatchNorm statistics, no dropout, and a fixed
    teacher or a round's labeler never changes, buffers included."""
    L.seed_everything(0)
    source = SupervisedModule(**FACTS, backbone="small_cnn")
    path = tmp_path / "teacher.ckpt"
    save_checkpoint(source, path)
    if name == "self_training_rounds":
        model = SelfTrainingModule(**FACTS, schedule="rounds", epochs_per_round=1, **CONSTANT_LR)
        frozen, limits = "labeler", {"max_epochs": 2, "limit_train_batches": 3}
    else:
        config = {
            k: v for k, v in CONFIGS[name].items() if k not in ("teacher_backbone", "teacher_checkpoint")
        }
        if name != "distillation":
            config["drop_rate"] = 0.5
        model = StudentTeacherModule(**FACTS, teacher_checkpoint=str(path), **config, **CONSTANT_LR)
        frozen, limits = "teacher", {"max_steps": 3}
    modes = FrozenModes(frozen)
    trainer(tmp_path, callbacks=[modes], **limits).fit(
        model, train_dataloaders=DataLoader(PairedBatches(), batch_size=8)
    )
    assert modes.training and not any(modes.training)
    after = getattr(model, frozen).state_dict()
    if name in ("distillation", "noisy_student"):
        for key, value in source.state_dict().items():
            if key in after:
                assert torch.equal(after[key], value), key
    if name == "self_training_rounds":
        for key, value in modes.start[1].items():
            assert torch.equal(after[key], value), key


def test_frozen_classifier_stays_in_eval_mode_whatever_train_it_receives() -> None:
    # a custom loop may call model.train(); a target network must still run in eval mode
    from ssl_modules.semi_supervised._common import FrozenClassifier

    backbone = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5))
    frozen = FrozenClassifier(backbone, torch.nn.Linear(4, 2))
    assert not any(m.training for m in frozen.modules())
    frozen.train()
    assert not any(m.training for m in frozen.modules())
    assert not any(p.requires_grad for p in frozen.parameters())
