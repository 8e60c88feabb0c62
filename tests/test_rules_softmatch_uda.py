"""SoftMatch's truncated-Gaussian weights, UDA's sharpened masked targets and training-signal
annealing, each against the paper's formula written out here in plain loops; their state
(checkpointed, resumed exactly, frozen in evaluation); and FixMatch unchanged by the TSA option.

- SoftMatch, Chen et al., 2023, https://arxiv.org/abs/2301.10921
- UDA, Xie et al., 2020, https://arxiv.org/abs/1904.12848
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from ssl_modules import FixMatchModule
from ssl_modules.batch import train_batch
from ssl_modules.losses.semi_supervised import weighted_pseudo_label_loss
from ssl_modules.semi_supervised.rules import DistributionAlignment, build_rule, rule_record
from ssl_modules.semi_supervised.rules import softmatch as softmatch_module
from ssl_modules.semi_supervised.rules.softmatch import SoftMatchWeights
from ssl_modules.semi_supervised.rules.uda import (
    UDAConsistency,
    annealed_cross_entropy,
    tsa_threshold,
)

FACTS = {
    "num_classes": 4,
    "channels": 1,
    "image_size": 12,
    "mean": (0.5,),
    "std": (0.25,),
    "horizontal_flip": False,
}


def random_probs(rows: int, classes: int, seed: int, scale: float = 3.0, bias: list[float] | None = None):
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(rows, classes, generator=generator)
    if bias is not None:
        logits = logits + torch.tensor(bias)
    return logits.softmax(dim=1)


# -- the formulas, written out --------------------------------------------------------------------
def mean_of(values: list[float]) -> float:
    return sum(values) / len(values)


def unbiased_variance_of(values: list[float]) -> float:
    mean = mean_of(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


class SoftMatchReference:
    """SoftMatch (Chen et al., 2023, Eq. 7-8 and Sec. 3.3) in plain Python floats."""

    def __init__(
        self, classes: int, momentum: float, num_sigmas: float, max_weight: float, align: bool
    ) -> None:
        self.classes, self.momentum, self.num_sigmas, self.max_weight, self.align = (
            classes,
            momentum,
            num_sigmas,
            max_weight,
            align,
        )
        self.mu = 1.0 / classes
        self.var = 1.0
        self.p_model: list[float] | None = None  # set to the first training batch's mean (USB)

    def aligned(self, row: list[float]) -> list[float]:
        scaled = [row[c] * (1.0 / self.classes) / self.p_model[c] for c in range(self.classes)]
        return [s / sum(scaled) for s in scaled]

    def step(self, probs: torch.Tensor, training: bool = True) -> tuple[list[int], list[float]]:
        rows = probs.tolist()
        if self.align and training:
            for c in range(self.classes):
                batch_mean = mean_of([row[c] for row in rows])
                if self.p_model is None:
                    self.p_model = [None] * self.classes
                if self.p_model[c] is None:
                    self.p_model[c] = batch_mean
                else:
                    self.p_model[c] = self.momentum * self.p_model[c] + (1 - self.momentum) * batch_mean
        weighed = [self.aligned(row) for row in rows] if self.align and self.p_model is not None else rows
        confidences = [max(row) for row in weighed]
        if training:
            self.mu = self.momentum * self.mu + (1 - self.momentum) * mean_of(confidences)
            self.var = self.momentum * self.var + (1 - self.momentum) * unbiased_variance_of(confidences)
        weights = []
        for c in confidences:
            if c >= self.mu:
                weights.append(self.max_weight)
            else:
                weights.append(
                    self.max_weight * math.exp(-((c - self.mu) ** 2) / (2 * self.var / self.num_sigmas**2))
                )
        labels = [max(range(self.classes), key=lambda k, row=row: row[k]) for row in rows]  # raw prediction
        return labels, weights


# -- SoftMatch -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("momentum", "num_sigmas", "max_weight", "start"),
    [(0.999, 2.0, 1.0, (0.7, 0.02)), (0.8, 2.0, 1.0, None), (0.7, 3.0, 0.6, None)],
)
def test_softmatch_weights_follow_the_truncated_gaussian_over_several_updates(
    momentum, num_sigmas, max_weight, start
):
    rule = SoftMatchWeights(
        momentum=momentum, num_sigmas=num_sigmas, max_weight=max_weight, uniform_alignment=False
    ).train()
    reference = SoftMatchReference(5, momentum, num_sigmas, max_weight, align=False)
    rule.allocate(5)
    if start is not None:  # the paper's momentum barely moves from mu_0 = 1/C in 5 steps: start later
        reference.mu, reference.var = start
        rule.confidence_mean.fill_(start[0])
        rule.confidence_variance.fill_(start[1])
    below_and_above = [0, 0]
    for step in range(5):
        probs = random_probs(9, 5, seed=step, scale=1.0 + step)
        pseudo = rule(probs, torch.arange(9))
        labels, weights = reference.step(probs)
        assert pseudo.targets.dtype == torch.int64 and pseudo.targets.tolist() == labels
        assert torch.allclose(pseudo.weights, torch.tensor(weights), rtol=1e-5, atol=1e-6), step
        assert rule.confidence_mean.item() == pytest.approx(reference.mu, rel=1e-5)
        assert rule.confidence_variance.item() == pytest.approx(reference.var, rel=1e-5)
        below_and_above[0] += sum(w < max_weight for w in weights)
        below_and_above[1] += sum(w == max_weight for w in weights)
    assert min(below_and_above) > 0, "the batches must hit both sides of the truncation"


def test_softmatch_starts_at_one_over_classes_and_unit_variance():
    rule = SoftMatchWeights().eval()
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.2, 0.3, 0.3, 0.2]])
    pseudo = rule(probs)
    assert rule.confidence_mean.item() == pytest.approx(0.25) and rule.confidence_variance.item() == 1.0
    assert pseudo.weights.tolist() == [1.0, 1.0]  # both above mu_0 = 1/4 (the aligner is still uniform)


def test_softmatch_uniform_alignment_sets_the_weights_not_the_labels():
    momentum = 0.6  # a short memory, so that p_model moves visibly
    rule = SoftMatchWeights(momentum=momentum).train()
    unaligned = SoftMatchWeights(momentum=momentum, uniform_alignment=False).train()
    reference = SoftMatchReference(4, momentum, 2.0, 1.0, align=True)
    bias = [3.0, 0.0, 0.0, -1.0]  # the model over-predicts class 0: alignment lifts the others
    label_moved = weights_moved = False
    for step in range(4):
        probs = random_probs(12, 4, seed=10 + step, scale=1.5, bias=bias)
        pseudo = rule(probs)
        labels, weights = reference.step(probs)
        assert pseudo.targets.tolist() == labels == probs.argmax(dim=1).tolist()
        assert torch.allclose(pseudo.weights, torch.tensor(weights), rtol=1e-5, atol=1e-6), step
        assert torch.allclose(rule.alignment.p_model, torch.tensor(reference.p_model), rtol=1e-5)
        aligned_labels = [
            max(range(4), key=lambda k, r=row: r[k]) for row in map(reference.aligned, probs.tolist())
        ]
        label_moved |= aligned_labels != labels
        weights_moved |= not torch.allclose(unaligned(probs).weights, pseudo.weights, atol=1e-4)
    assert label_moved, "alignment must change some argmax here, or the label test proves nothing"
    assert weights_moved
    assert torch.allclose(rule.alignment.p_model.sum(), torch.tensor(1.0))


def test_softmatch_statistics_are_those_of_the_global_batch(monkeypatch: pytest.MonkeyPatch):
    """Two simulated ranks: the EMA moves with the mean and unbiased variance of both ranks'
    images together (E[c], E[c^2] averaged over ranks, N = 2 U), not of this rank's alone."""
    here = random_probs(6, 3, seed=1, scale=2.0)
    other = random_probs(6, 3, seed=2, scale=0.5)
    other_moments = torch.stack([other.max(dim=1).values.mean(), other.max(dim=1).values.square().mean()])
    monkeypatch.setattr(softmatch_module, "global_mean", lambda local: (local + other_moments) / 2)
    monkeypatch.setattr(softmatch_module.ssl_dist, "world_size", lambda: 2)
    rule = SoftMatchWeights(momentum=0.5, uniform_alignment=False).train()
    rule(here)
    together = torch.cat([here, other]).max(dim=1).values.tolist()
    assert rule.confidence_mean.item() == pytest.approx(0.5 / 3 + 0.5 * mean_of(together), rel=1e-5)
    assert rule.confidence_variance.item() == pytest.approx(
        0.5 + 0.5 * unbiased_variance_of(together), rel=1e-5
    )


def test_softmatch_state_is_checkpointed_and_resumes_exactly():
    rule = SoftMatchWeights(momentum=0.7).train()
    for step in range(3):
        rule(random_probs(8, 4, seed=step, bias=[1.0, 0, 0, 0]))
    state = rule.state_dict()
    assert {"confidence_mean", "confidence_variance", "alignment.p_model"} <= set(state)
    assert "last_mean_weight" not in state  # a diagnostic, not state
    resumed = build_rule(rule_record(rule)).train()  # a fresh rule, not yet allocated
    resumed.load_state_dict(state)
    resumed.allocate(4)  # the fit's setup after loading must keep the loaded statistics
    for name, value in state.items():
        assert torch.equal(resumed.state_dict()[name], value), name
    for step in range(3, 6):
        probs = random_probs(8, 4, seed=step, bias=[1.0, 0, 0, 0])
        a, b = rule(probs), resumed(probs)
        assert torch.equal(a.targets, b.targets) and torch.equal(a.weights, b.weights)
    for name, value in rule.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_softmatch_does_not_move_in_evaluation():
    rule = SoftMatchWeights(momentum=0.5).train()
    rule(random_probs(8, 4, seed=0))
    before = {name: value.clone() for name, value in rule.state_dict().items()}
    rule.eval()
    first = rule(random_probs(8, 4, seed=1))
    rule(random_probs(8, 4, seed=2, bias=[4.0, 0, 0, 0]))
    again = rule(random_probs(8, 4, seed=1))
    for name, value in rule.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert torch.equal(first.weights, again.weights)
    rule.train()
    rule(random_probs(8, 4, seed=1))
    assert not torch.equal(rule.confidence_mean, before["confidence_mean"])  # and it does in training


def test_softmatch_logs_its_gaussian_and_the_mean_weight():
    rule = SoftMatchWeights(momentum=0.5, uniform_alignment=False).train()
    pseudo = rule(random_probs(8, 4, seed=3))
    values = rule.log_values()
    assert set(values) == {"confidence_mean", "confidence_std", "mean_weight"}
    assert values["confidence_mean"].item() == pytest.approx(rule.confidence_mean.item())
    assert values["confidence_std"].item() == pytest.approx(math.sqrt(rule.confidence_variance.item()))
    assert values["mean_weight"].item() == pytest.approx(pseudo.weights.mean().item())


# -- UDA -------------------------------------------------------------------------------------------
def uda_reference(rows: list[list[float]], threshold: float, temperature: float):
    targets, mask = [], []
    for row in rows:
        powered = [q ** (1.0 / temperature) for q in row]
        targets.append([p / sum(powered) for p in powered])
        mask.append(1.0 if max(row) >= threshold else 0.0)
    return targets, mask


@pytest.mark.parametrize(("threshold", "temperature"), [(0.8, 0.4), (0.5, 0.7)])
def test_uda_sharpens_and_masks_as_the_paper(threshold, temperature):
    logits = 2.5 * torch.randn(10, 5, generator=torch.Generator().manual_seed(0))
    probs = torch.cat([logits.softmax(dim=1), torch.tensor([[threshold, 1 - threshold, 0.0, 0.0, 0.0]])])
    pseudo = UDAConsistency(threshold=threshold, temperature=temperature).train()(probs)
    targets, mask = uda_reference(probs.tolist(), threshold, temperature)
    assert pseudo.targets.shape == probs.shape and pseudo.targets.dtype == torch.float32
    assert torch.allclose(pseudo.targets, torch.tensor(targets), atol=1e-6)
    assert pseudo.weights.tolist() == mask
    assert pseudo.weights[-1] == 1.0, "confidence equal to the threshold is kept"
    assert 0 < sum(mask) < len(mask)
    # sharpening the probabilities is sharpening the logits: softmax(logits / T)
    assert torch.allclose(pseudo.targets[:-1], (logits / temperature).softmax(dim=1), atol=1e-6)


def test_uda_composes_with_distribution_alignment():
    momentum, classes = 0.5, 4
    rule = UDAConsistency(threshold=0.6, temperature=0.5, alignment=DistributionAlignment(momentum)).train()
    p_model = None  # the first training batch's mean, then an EMA (USB's DistAlignEMAHook)
    for step in range(3):
        probs = random_probs(10, classes, seed=20 + step, bias=[2.0, 0.0, 0.0, 0.0])
        rows = probs.tolist()
        means = [mean_of([row[c] for row in rows]) for c in range(classes)]
        p_model = (
            means if p_model is None else [momentum * p + (1 - momentum) * m for p, m in zip(p_model, means)]
        )
        aligned = []
        for row in rows:
            scaled = [row[c] * (1.0 / classes) / p_model[c] for c in range(classes)]
            aligned.append([s / sum(scaled) for s in scaled])
        targets, mask = uda_reference(aligned, 0.6, 0.5)
        pseudo = rule(probs)
        assert torch.allclose(pseudo.targets, torch.tensor(targets), atol=1e-5)
        assert pseudo.weights.tolist() == mask
    plain, _ = uda_reference(probs.tolist(), 0.6, 0.5)
    assert not torch.allclose(pseudo.targets, torch.tensor(plain), atol=1e-3), "alignment must matter here"
    assert rule.log_values()["threshold"].item() == pytest.approx(0.6)


def test_soft_target_loss_is_the_weighted_cross_entropy_of_the_formula():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 3, generator=generator, requires_grad=True)
    targets = torch.rand(6, 3, generator=generator).softmax(dim=1)
    weights = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 2.0])
    loss = weighted_pseudo_label_loss(logits, targets, weights)
    expected = 0.0
    for i, row in enumerate(logits.tolist()):
        log_normaliser = math.log(sum(math.exp(z) for z in row))
        cross_entropy = -sum(targets[i, c].item() * (row[c] - log_normaliser) for c in range(3))
        expected += weights[i].item() * cross_entropy
    assert loss.item() == pytest.approx(expected / 6, rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[weights == 0] == 0) and torch.all(
        logits.grad[weights > 0].abs().sum(dim=1) > 0
    )


# -- training-signal annealing -----------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "log", "exp"])
@pytest.mark.parametrize("classes", [2, 10])
def test_tsa_threshold_at_the_start_middle_and_end(schedule, classes):
    alpha = {
        "linear": lambda t: t,
        "log": lambda t: 1 - math.exp(-5 * t),
        "exp": lambda t: math.exp(5 * (t - 1)),
    }[schedule]
    for progress in (0.0, 0.5, 1.0):
        expected = alpha(progress) * (1 - 1 / classes) + 1 / classes
        assert tsa_threshold(schedule, progress, classes) == pytest.approx(expected, rel=1e-12)
    assert tsa_threshold(schedule, 1.7, classes) == tsa_threshold(schedule, 1.0, classes)  # clipped
    assert tsa_threshold(schedule, 1.0, classes) == pytest.approx(
        1.0 if schedule != "log" else 1 - math.exp(-5) * (1 - 1 / classes)
    )


def test_annealed_loss_drops_confident_labeled_images_from_loss_and_gradient():
    logits = torch.tensor(
        [[4.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 6.0], [1.0, 1.0, 0.0]], requires_grad=True
    )
    labels = torch.tensor([0, 1, 2, 1])
    threshold = 0.6
    loss, kept = annealed_cross_entropy(logits, labels, threshold)
    total, count, expected_kept = 0.0, 0, []
    for row, label in zip(logits.tolist(), labels.tolist()):
        p_correct = math.exp(row[label]) / sum(math.exp(z) for z in row)
        keep = p_correct <= threshold
        expected_kept.append(float(keep))
        if keep:
            total += -math.log(p_correct)
            count += 1
    assert kept.tolist() == expected_kept == [0.0, 1.0, 0.0, 1.0]
    assert loss.item() == pytest.approx(total / max(1, count), rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[kept == 0] == 0), "a dropped image must not contribute gradient"
    assert torch.all(logits.grad[kept == 1].abs().sum(dim=1) > 0)
    # nothing kept: zero loss, zero gradient (sum over none / max(1, 0))
    logits.grad = None
    loss, kept = annealed_cross_entropy(logits, labels, 0.0)
    loss.backward()
    assert kept.sum() == 0 and loss.item() == 0.0 and torch.all(logits.grad == 0)


# -- the module: FixMatch unchanged without TSA, annealed with it ------------------------------------
def make_batch() -> dict:
    generator = torch.Generator().manual_seed(0)
    return train_batch(
        torch.rand(8, 1, 12, 12, generator=generator),
        torch.arange(8) % 4,
        torch.rand(16, 1, 12, 12, generator=generator),
    )


def run_step(model: FixMatchModule, batch: dict, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One training step; returns the loss, the logits of the one forward, and what was logged."""
    outputs, logged = [], {}
    forward = model.forward

    def recording_forward(images: torch.Tensor) -> torch.Tensor:
        out = forward(images)
        outputs.append(out)
        return out

    model.forward = recording_forward
    model.log = lambda name, value, **_: logged.__setitem__(name, value)
    torch.manual_seed(seed)  # the same augmentations
    loss = model.training_step(batch, 1)
    (logits,) = outputs
    return loss, logits.detach(), logged


def cross_entropy_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -logits.log_softmax(dim=1).gather(1, labels[:, None]).squeeze(1)


def test_fixmatch_loss_without_tsa_is_the_fixed_threshold_formula():
    torch.manual_seed(0)
    probe = FixMatchModule(**FACTS).train()
    batch = make_batch()
    _, probe_logits, _ = run_step(probe, batch)
    # a threshold at the median confidence of this step's weak views: half kept, half not
    threshold = probe_logits[8:24].softmax(dim=1).max(dim=1).values.median().item()
    model = FixMatchModule(**FACTS, confidence_threshold=threshold).train()
    model.load_state_dict(probe.state_dict())
    assert model.hparams.tsa is None
    loss, logits, _ = run_step(model, batch)
    assert torch.equal(logits, probe_logits)
    labeled, (weak, strong) = logits[:8], logits[8:].split(16)
    weak_probs = weak.softmax(dim=1)
    mask = (weak_probs.max(dim=1).values >= threshold).float()
    assert 0 < mask.sum() < len(mask), "a mixed mask, or the comparison proves little"
    expected = (
        cross_entropy_of(labeled, batch["labeled"].labels).mean()
        + (mask * cross_entropy_of(strong, weak_probs.argmax(dim=1))).mean()
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-7)
    explicit = FixMatchModule(**FACTS, confidence_threshold=threshold, tsa=None).train()
    explicit.load_state_dict(model.state_dict())
    assert torch.equal(run_step(explicit, batch)[0], loss)


def with_fake_trainer(model: FixMatchModule, step: int, total: int) -> FixMatchModule:
    model._trainer = SimpleNamespace(global_step=step, estimated_stepping_batches=total)
    return model


@pytest.mark.parametrize("schedule", ["linear", "log", "exp"])
def test_fixmatch_with_tsa_anneals_the_labeled_loss(schedule):
    torch.manual_seed(0)
    model = FixMatchModule(**FACTS, confidence_threshold=0.95, tsa=schedule).train()
    with torch.no_grad():  # the network predicts class 0 for every image, with probability ~0.9
        model.classifier.weight.mul_(0.01)
        model.classifier.bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))
    batch = make_batch()
    labels = batch["labeled"].labels
    dropped_some = False
    for step in (0, 5, 10):
        with_fake_trainer(model, step, 10)
        _, logits, logged = run_step(model, batch)
        eta = tsa_threshold(schedule, step / 10, 4)
        assert logged["train/tsa_threshold"] == pytest.approx(eta)
        p_correct = logits[:8].softmax(dim=1).gather(1, labels[:, None]).squeeze(1)
        keep = (p_correct <= eta).float()
        expected = (keep * cross_entropy_of(logits[:8], labels)).sum() / keep.sum().clamp_min(1)
        assert logged["train/sup_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
        assert logged["train/tsa_kept_rate"].item() == pytest.approx(keep.mean().item())
        dropped_some |= bool(keep.sum() < len(keep))
    assert dropped_some
    # at the end every schedule but "log" reaches eta = 1: nothing dropped, the plain mean
    if schedule != "log":
        assert logged["train/sup_loss"].item() == pytest.approx(
            cross_entropy_of(logits[:8], labels).mean().item()
        )


def test_tsa_choices_are_checked_and_need_a_known_run_length():
    with pytest.raises(ValueError, match=r"tsa must be one of \('linear', 'log', 'exp'\)"):
        FixMatchModule(**FACTS, tsa="cosine")
    with pytest.raises(ValueError, match="tsa must be one of"):
        tsa_threshold("none", 0.5, 10)
    model = with_fake_trainer(FixMatchModule(**FACTS, tsa="linear"), 0, float("inf"))
    with pytest.raises(ValueError, match="max_steps"):
        model.on_fit_start()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SoftMatchWeights(momentum=1.5), "momentum"),
        (lambda: SoftMatchWeights(num_sigmas=0.0), "num_sigmas"),
        (lambda: SoftMatchWeights(max_weight=-1.0), "max_weight"),
        (lambda: UDAConsistency(threshold=1.2), "threshold"),
        (lambda: UDAConsistency(temperature=0.0), "temperature"),
    ],
)
def test_bad_rule_arguments_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# -- recording and rebuilding ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "rule",
    [
        SoftMatchWeights(momentum=0.99, num_sigmas=3.0, max_weight=0.5, uniform_alignment=False),
        SoftMatchWeights(),
        UDAConsistency(threshold=0.7, temperature=0.5, alignment=DistributionAlignment(0.99)),
        UDAConsistency(),
    ],
    ids=["softmatch_args", "softmatch", "uda_aligned", "uda"],
)
def test_rule_record_and_build_rule_round_trip(rule):
    record = rule_record(rule)
    rebuilt = build_rule(record)
    assert type(rebuilt) is type(rule) and rule_record(rebuilt) == record
    assert set(rebuilt.state_dict()) == set(rule.state_dict())
    model = FixMatchModule(**FACTS, rule=record)
    assert type(model.rule) is type(rule) and model.hparams["rule"] == record


def test_softmatch_and_tsa_fit_and_reload_from_a_checkpoint(tmp_path: Path):
    from datamodules import DigitsDataModule

    L.seed_everything(0)
    model = FixMatchModule(
        num_classes=10,
        channels=1,
        image_size=8,
        mean=(0.305,),
        std=(0.319,),
        horizontal_flip=False,
        rule=SoftMatchWeights(momentum=0.9),
        tsa="exp",
        evaluate_with_ema=False,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        max_steps=2,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, datamodule=DigitsDataModule(image_size=8, labels_per_class=2, batch_size=16))
    assert model.rule.confidence_mean.item() != pytest.approx(0.1)  # it moved with the two batches
    path = tmp_path / "softmatch.ckpt"
    trainer.save_checkpoint(path)
    reloaded = FixMatchModule.load_from_checkpoint(path)
    assert isinstance(reloaded.rule, SoftMatchWeights) and reloaded.hparams.tsa == "exp"
    for name, value in model.rule.state_dict().items():
        assert torch.equal(reloaded.rule.state_dict()[name], value), name
