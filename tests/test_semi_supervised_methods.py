"""SelfTrainingModule, StudentTeacherModule, FixMatchModule: gradients, teachers, rounds, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

import ssl_modules.semi_supervised.fixmatch as fixmatch_module
import ssl_modules.semi_supervised.self_training as self_training_module
from datamodules.digits import DigitsDataModule
from ssl_modules import FixMatchModule, SelfTrainingModule, StudentTeacherModule, SupervisedModule
from ssl_modules.batch import train_batch
from ssl_modules.ema import warn_if_ema_outlasts_run

FACTS = {
    "num_classes": 4,
    "channels": 1,
    "image_size": 12,
    "mean": (0.5,),
    "std": (0.25,),
    "horizontal_flip": False,
}
DIGITS = {
    "num_classes": 10,
    "channels": 1,
    "image_size": 8,
    "mean": (0.305,),
    "std": (0.319,),
    "horizontal_flip": False,
}


def make_batch(
    channels: int = 1, size: int = 12, classes: int = 4, labeled: int = 8, unlabeled: int = 16
) -> dict:
    generator = torch.Generator().manual_seed(0)
    return train_batch(
        torch.rand(labeled, channels, size, size, generator=generator),
        torch.arange(labeled) % classes,
        torch.rand(unlabeled, channels, size, size, generator=generator),
        torch.arange(unlabeled) % classes,
    )


def save_checkpoint(model: L.LightningModule, path: str | Path) -> None:
    """What ``Trainer.save_checkpoint`` writes, minus the training state."""
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    torch.save({**checkpoint, "pytorch-lightning_version": L.__version__}, path)


def frozen_parameter_names(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if not p.requires_grad]


@pytest.fixture
def teacher_checkpoint(tmp_path: Path) -> str:
    """A SupervisedModule checkpoint (wider backbone than the students below), 4 classes, 1 channel."""
    teacher = SupervisedModule(**FACTS, backbone="small_cnn_wide")
    path = tmp_path / "teacher.ckpt"
    save_checkpoint(teacher, path)
    return str(path)


def build(name: str, teacher_checkpoint: str, facts: dict = FACTS, **kwargs: Any) -> L.LightningModule:
    if name == "self_training_rounds":
        return SelfTrainingModule(**facts, schedule="rounds", **kwargs)
    if name == "self_training_online":
        return SelfTrainingModule(**facts, schedule="online", selection="top_k", **kwargs)
    if name == "mean_teacher":
        return StudentTeacherModule(**facts, teacher="ema", **kwargs)
    if name == "distillation":
        return StudentTeacherModule(**facts, teacher="fixed", teacher_checkpoint=teacher_checkpoint, **kwargs)
    if name == "noisy_student":
        return StudentTeacherModule(
            **facts,
            teacher="fixed",
            teacher_checkpoint=teacher_checkpoint,
            teacher_input="clean",
            student_augmentation="strong",
            drop_rate=0.5,
            **kwargs,
        )
    return FixMatchModule(**facts, confidence_threshold=0.0, **kwargs)


METHODS = [
    "self_training_rounds",
    "self_training_online",
    "mean_teacher",
    "distillation",
    "noisy_student",
    "fixmatch",
]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", METHODS)
def test_one_step_gives_every_trainable_parameter_a_gradient_and_teachers_none(
    name: str, channels: int, teacher_checkpoint: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    facts = {**FACTS, "channels": channels, "mean": (0.5,) * channels, "std": (0.25,) * channels}
    if channels == 3 and name in ("distillation", "noisy_student"):
        teacher = SupervisedModule(**facts, backbone="small_cnn_wide")
        teacher_checkpoint = str(tmp_path / "teacher3.ckpt")
        save_checkpoint(teacher, teacher_checkpoint)
    model = build(name, teacher_checkpoint, facts)
    if name == "self_training_rounds":
        model.class_thresholds.zero_()  # as in a round >= 1: the labeler's pseudo-labels count
    model.setup("fit")
    model.train()
    loss = model.training_step(make_batch(channels), 0)
    loss.backward()
    frozen = frozen_parameter_names(model)
    if name != "self_training_online":
        assert frozen, "the teacher / EMA / labeler must be frozen"
    for param_name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, param_name
        else:
            assert param.grad is None, param_name


class Spy(torch.nn.Module):
    """Wraps a loss and records its arguments."""

    def __init__(self, loss: Any) -> None:
        super().__init__()
        self.loss = loss
        self.calls: list[tuple[torch.Tensor, ...]] = []

    def forward(self, *args: torch.Tensor) -> Any:
        self.calls.append(args)
        return self.loss(*args)


@pytest.mark.parametrize("teacher", ["ema", "fixed"])
def test_consistency_compares_the_student_with_the_teacher_not_a_network_with_itself(
    teacher: str, teacher_checkpoint: str
) -> None:
    # Issue item 5: a Mean Teacher that took the student's logits from the teacher had a
    # consistency loss of zero for years. The student's side must carry the gradient and be the
    # student's own forward; the teacher's side must be the teacher's forward, without gradient.
    torch.manual_seed(0)
    kwargs = {"teacher_checkpoint": teacher_checkpoint} if teacher == "fixed" else {}
    model = StudentTeacherModule(
        **FACTS,
        teacher=teacher,
        alpha=0.0,  # consistency only
        consistency_on_labeled=False,
        student_augmentation="none",
        teacher_input="clean",
        **kwargs,
    )
    model.setup("fit")
    with torch.no_grad():  # make the teacher differ from the student
        for param in model.teacher.parameters():
            param.add_(0.3 * torch.randn_like(param))
    spy = Spy(model.consistency_loss)
    model.consistency_loss = spy
    model.train()
    batch = make_batch()
    loss = model.training_step(batch, 0)
    student_logits, teacher_logits = spy.calls[0]
    assert student_logits.requires_grad and not teacher_logits.requires_grad
    unlabeled = batch["unlabeled"].images
    with torch.no_grad():
        labeled = batch["labeled"].images
        expected_student = model(torch.cat([labeled, unlabeled]))[len(labeled) :]
        expected_teacher = model.teacher(model.normalize(unlabeled))
    assert torch.allclose(student_logits, expected_student, atol=1e-5)
    assert torch.allclose(teacher_logits, expected_teacher, atol=1e-5)
    assert not torch.allclose(student_logits, teacher_logits, atol=1e-3)
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_fixmatch_pseudo_label_target_carries_no_gradient_and_the_strong_view_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model = FixMatchModule(**FACTS, confidence_threshold=0.0)
    rule_inputs: list[tuple[torch.Tensor, ...]] = []
    model.rule.register_forward_pre_hook(lambda _, args: rule_inputs.append(args))
    spy = Spy(fixmatch_module.weighted_pseudo_label_loss)
    monkeypatch.setattr(fixmatch_module, "weighted_pseudo_label_loss", spy)
    model.train()
    batch = make_batch()
    model.training_step(batch, 0)
    weak_probs, index = rule_inputs[0]
    strong_logits = spy.calls[0][0]
    assert torch.equal(index, batch["unlabeled"].index)  # the rule is keyed on the images' own index
    assert strong_logits.requires_grad and not weak_probs.requires_grad
    assert torch.allclose(weak_probs.sum(dim=1), torch.ones(len(weak_probs)))
    assert not torch.allclose(strong_logits.softmax(dim=1), weak_probs, atol=1e-3)  # different views


def test_self_training_rounds_pseudo_labels_come_from_the_frozen_labeler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model = SelfTrainingModule(**FACTS, schedule="rounds", selection="all")
    model.class_thresholds.zero_()
    with torch.no_grad():
        for param in model.labeler.parameters():
            param.add_(0.3 * torch.randn_like(param))
    spy = Spy(self_training_module.weighted_pseudo_label_loss)
    monkeypatch.setattr(self_training_module, "weighted_pseudo_label_loss", spy)
    model.train()
    batch = make_batch()
    model.training_step(batch, 0)
    logits, pseudo_labels, weights = spy.calls[0]
    with torch.no_grad():
        expected = model.labeler(model.normalize(batch["unlabeled"].images)).argmax(dim=1)
    assert logits.requires_grad
    assert torch.equal(pseudo_labels, expected)
    assert torch.equal(weights, torch.ones_like(weights))


def digits(**kwargs: Any) -> DigitsDataModule:
    return DigitsDataModule(image_size=8, labels_per_class=3, batch_size=32, **kwargs)


def trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    options = {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 1,
        "default_root_dir": str(tmp_path),
    }
    return L.Trainer(**{**options, **kwargs})


def test_self_training_rounds_advance_select_balanced_top_k_and_survive_a_checkpoint(tmp_path: Path) -> None:
    L.seed_everything(0)
    model = SelfTrainingModule(
        **DIGITS, schedule="rounds", selection="top_k", top_k_fraction=0.25, epochs_per_round=1
    )
    fit = trainer(tmp_path, max_epochs=3, limit_train_batches=4, enable_checkpointing=False)
    fit.fit(model, datamodule=digits())
    assert int(model.round) == 2
    unlabeled = len(fit.train_dataloader["unlabeled"].dataset)
    per_class = -(-int(0.5 * unlabeled) // 10)  # round 2 keeps min(1, 2 * 0.25) of a balanced share
    counts = model.round_class_counts
    assert counts.max() <= per_class + 2  # ties at the threshold may add a few
    assert counts.sum() > 0
    # the labeler is the model frozen at the start of round 2, not the live student
    assert any(not torch.equal(a, b) for a, b in zip(model.labeler.parameters(), model.backbone.parameters()))
    path = tmp_path / "rounds.ckpt"
    fit.save_checkpoint(path)
    reloaded = SelfTrainingModule.load_from_checkpoint(path)
    assert int(reloaded.round) == 2
    assert torch.equal(reloaded.class_thresholds, model.class_thresholds)
    assert torch.equal(reloaded.round_class_counts, counts)
    for a, b in zip(reloaded.labeler.state_dict().values(), model.labeler.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("selection", ["all", "weighted"])
def test_self_training_all_and_weighted_keep_every_prediction(selection: str) -> None:
    model = SelfTrainingModule(**FACTS, selection=selection, confidence_threshold=0.3)
    model.class_thresholds.zero_()  # thresholds of a round >= 1 for "all"/"weighted"
    confidence = torch.tensor([0.2, 0.5, 0.9])
    weights = model._select(confidence, torch.tensor([0, 1, 2]))
    expected = torch.tensor([0.0, 1.0, 1.0]) * (confidence if selection == "weighted" else 1.0)
    assert torch.allclose(weights, expected)


def test_fixmatch_ema_warm_up_and_evaluation_with_ema(tmp_path: Path) -> None:
    L.seed_everything(0)
    model = FixMatchModule(**DIGITS)
    fit = trainer(tmp_path, max_steps=1, enable_checkpointing=False)
    fit.fit(model, datamodule=digits())
    # step 0: decay min(1 - 1/1, 0.999) = 0 -> the EMA is the live model
    for ema, live in zip(model.ema_model.backbone.parameters(), model.backbone.parameters()):
        assert torch.allclose(ema, live)
    with torch.no_grad():
        model.ema_model.classifier.bias.add_(torch.arange(10.0) * 100)  # the EMA now predicts class 9
    model.eval()
    images = torch.rand(4, 1, 8, 8)
    assert model.evaluation_logits(images).argmax(dim=1).tolist() == [9] * 4
    model.hparams.evaluate_with_ema = False
    assert torch.allclose(model.evaluation_logits(images), model(images))


def test_ema_longer_than_the_run_is_flagged_with_a_usable_decay() -> None:
    with pytest.warns(UserWarning, match="lag"):
        message = warn_if_ema_outlasts_run(0.999, 500, "EMA")
    assert message is not None and "1000 steps" in message and "0.99" in message
    assert warn_if_ema_outlasts_run(0.99, 500, "EMA") is None  # 100 steps: 20% of the run
    assert warn_if_ema_outlasts_run(0.999, 2**20, "EMA") is None  # the paper's run
    assert warn_if_ema_outlasts_run(0.999, float("inf"), "EMA") is None  # length unknown


def test_fixmatch_warns_at_fit_start_when_its_ema_outlasts_the_run(tmp_path: Path) -> None:
    fit = trainer(tmp_path, max_steps=2, enable_checkpointing=False)
    with pytest.warns(UserWarning, match="FixMatch's evaluation EMA: ema_decay=0.999"):
        fit.fit(FixMatchModule(**DIGITS), datamodule=digits())


def test_mean_teacher_evaluates_with_the_teacher() -> None:
    model = StudentTeacherModule(**FACTS, teacher="ema").eval()
    with torch.no_grad():
        model.teacher.classifier.bias.copy_(torch.tensor([0.0, 0.0, 100.0, 0.0]))
    assert model.evaluation_logits(torch.rand(3, 1, 12, 12)).argmax(dim=1).tolist() == [2, 2, 2]


def test_fixed_teacher_with_a_different_backbone_loads_once_and_reloads_without_its_file(
    tmp_path: Path, teacher_checkpoint: str
) -> None:
    L.seed_everything(0)
    teacher_state = torch.load(teacher_checkpoint, weights_only=True)["state_dict"]
    model = StudentTeacherModule(
        **FACTS, teacher="fixed", teacher_checkpoint=teacher_checkpoint, backbone="small_cnn"
    )
    assert model.hparams.teacher_backbone == "small_cnn_wide"
    assert not bool(model.teacher_loaded)
    model.setup("fit")
    assert bool(model.teacher_loaded)
    assert torch.equal(model.teacher.classifier.weight, teacher_state["classifier.weight"])
    path = tmp_path / "student.ckpt"
    save_checkpoint(model, path)
    Path(teacher_checkpoint).unlink()
    reloaded = StudentTeacherModule.load_from_checkpoint(path)
    reloaded.setup("fit")  # already loaded: reads no file
    assert torch.equal(reloaded.teacher.classifier.weight, teacher_state["classifier.weight"])
    assert reloaded.backbone.num_features < reloaded.teacher.backbone.num_features


def test_a_student_checkpoint_is_the_next_teacher(tmp_path: Path, teacher_checkpoint: str) -> None:
    # Noisy Student's iteration: round k's student checkpoint is round k + 1's teacher
    student = StudentTeacherModule(
        **FACTS, teacher="fixed", teacher_checkpoint=teacher_checkpoint, backbone="small_cnn_wide"
    )
    student.setup("fit")
    path = tmp_path / "round1.ckpt"
    save_checkpoint(student, path)
    next_round = StudentTeacherModule(
        **FACTS, teacher="fixed", teacher_checkpoint=str(path), backbone="small_cnn_wide"
    )
    next_round.setup("fit")
    assert torch.equal(next_round.teacher.classifier.weight, student.classifier.weight)
    assert not torch.equal(next_round.teacher.classifier.weight, student.teacher.classifier.weight)


def test_teacher_checkpoint_with_other_num_classes_is_refused(teacher_checkpoint: str) -> None:
    with pytest.raises(ValueError, match="trained for 4 classes but the data has 10"):
        StudentTeacherModule(**DIGITS, teacher="fixed", teacher_checkpoint=teacher_checkpoint)


def test_missing_or_absent_teacher_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StudentTeacherModule(**FACTS, teacher="fixed", teacher_checkpoint=str(tmp_path / "missing.ckpt"))
    with pytest.raises(ValueError, match="needs teacher_checkpoint"):
        StudentTeacherModule(**FACTS, teacher="fixed")
    model = StudentTeacherModule(
        **FACTS, teacher="fixed", teacher_checkpoint=str(tmp_path / "gone.ckpt"), teacher_backbone="small_cnn"
    )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.setup("fit")  # before any training step


@pytest.mark.parametrize("threshold", [-0.5, 1.01])
def test_confidence_threshold_outside_unit_interval_is_refused(threshold: float) -> None:
    with pytest.raises(ValueError, match="confidence_threshold"):
        FixMatchModule(**FACTS, confidence_threshold=threshold)
    with pytest.raises(ValueError, match="confidence_threshold"):
        SelfTrainingModule(**FACTS, confidence_threshold=threshold)


@pytest.mark.parametrize("temperature", [0.0, -2.0])
def test_non_positive_temperature_is_refused(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        StudentTeacherModule(**FACTS, temperature=temperature)


def test_unknown_choices_are_refused() -> None:
    with pytest.raises(ValueError, match="teacher must be"):
        StudentTeacherModule(**FACTS, teacher="frozen")
    with pytest.raises(ValueError, match="selection"):
        SelfTrainingModule(**FACTS, selection="best")
    with pytest.raises(ValueError, match="schedule"):
        SelfTrainingModule(**FACTS, schedule="epochs")
    with pytest.raises(ValueError, match="augmentation"):
        StudentTeacherModule(**FACTS, student_augmentation="heavy")


@pytest.mark.parametrize("name", METHODS)
def test_loss_does_not_read_hidden_labels(name: str, teacher_checkpoint: str) -> None:
    model = build(name, teacher_checkpoint)
    model.setup("fit")
    if name == "self_training_rounds":
        model.class_thresholds.zero_()
    model.train()
    losses = []
    for permutation in (torch.arange(16), torch.randperm(16), torch.full((16,), -1)):
        batch = make_batch()
        hidden = batch["unlabeled"].hidden_labels
        batch["unlabeled"] = batch["unlabeled"]._replace(
            hidden_labels=hidden[permutation] if permutation.min() >= 0 else permutation
        )
        torch.manual_seed(1)
        losses.append(model.training_step(batch, 1).item())
    assert losses[0] == pytest.approx(losses[1]) == pytest.approx(losses[2])


@pytest.mark.parametrize("name", ["self_training_online", "mean_teacher", "fixmatch"])
def test_entropy_weight_adds_the_entropy_term(name: str, teacher_checkpoint: str) -> None:
    torch.manual_seed(0)
    base = build(name, teacher_checkpoint).train()
    with_entropy = build(name, teacher_checkpoint, entropy_weight=1.0).train()
    with_entropy.load_state_dict(base.state_dict())
    losses = []
    for model in (base, with_entropy):
        torch.manual_seed(5)  # the same augmentations
        losses.append(model.training_step(make_batch(), 1).item())
    assert losses[1] > losses[0] + 0.1  # a fresh network's predictions have entropy > 0
