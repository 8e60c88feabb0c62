"""Semi-supervised losses against the papers' formulas written plainly, closed forms and invariants."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_modules.losses.semi_supervised import (
    ConsistencyLoss,
    FixMatchLoss,
    distillation_loss,
    entropy_loss,
    sigmoid_rampup,
    softmax_mse_loss,
    weighted_pseudo_label_loss,
)


def _softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def reference_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    """Hinton et al.: T^2 * mean_b sum_c p_t log(p_t / p_s), p = softmax(logits / T)."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p_s, p_t = _softmax(s_row, temperature), _softmax(t_row, temperature)
        total += sum(t * math.log(t / s) for s, t in zip(p_s, p_t))
    return temperature**2 * total / len(student)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 10.0])
def test_distillation_loss_matches_reference_with_t_squared(temperature: float) -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 5, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(6, 5, generator=generator, dtype=torch.float64) * 3
    loss = distillation_loss(student, teacher, temperature)
    assert loss.item() == pytest.approx(reference_kd(student, teacher, temperature), rel=1e-5)


def test_distillation_gradient_magnitude_is_roughly_constant_in_temperature() -> None:
    # Hinton et al.: for large T the soft-target gradient scales as 1/T^2; the T^2 factor undoes it
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(64, 10, generator=generator)
    start = torch.randn(64, 10, generator=generator)
    norms = []
    for temperature in (5.0, 10.0, 20.0):
        student = start.clone().requires_grad_()
        distillation_loss(student, teacher, temperature).backward()
        norms.append(student.grad.norm().item())
    assert max(norms) / min(norms) < 1.3  # without T^2 the ratio would be about (20 / 5)^2 = 16


def test_distillation_closed_form_and_invariants() -> None:
    logits = torch.randn(4, 7)
    assert distillation_loss(logits, logits, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    # a per-row constant shift of either logit vector changes no softmax
    other = torch.randn(4, 7)
    shifted = distillation_loss(logits + 5.0, other - 2.0, 2.0)
    assert shifted.item() == pytest.approx(distillation_loss(logits, other, 2.0).item(), rel=1e-5)
    # two classes, teacher (log 3, 0) at T=1 -> p_t = (3/4, 1/4); student uniform -> KL = sum p_t log(2 p_t)
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    student = torch.zeros(1, 2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert distillation_loss(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-5)
    assert distillation_loss(logits, other, 1.0).item() > 0


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature_raises(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature)
    with pytest.raises(ValueError, match="temperature"):
        ConsistencyLoss("kl", temperature)


def test_softmax_mse_matches_mean_teacher_reference() -> None:
    student, teacher = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    # Mean Teacher: sum over classes and batch of squared softmax differences / num_classes / batch
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        expected += sum((a - b) ** 2 for a, b in zip(_softmax(s_row), _softmax(t_row)))
    expected /= 4 * 5
    assert softmax_mse_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert ConsistencyLoss("mse")(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert softmax_mse_loss(student, student).item() == 0.0
    # the "kl" kind is the distillation loss
    assert ConsistencyLoss("kl", 2.0)(student, teacher).item() == pytest.approx(
        distillation_loss(student, teacher, 2.0).item()
    )
    with pytest.raises(ValueError, match="consistency kind"):
        ConsistencyLoss("l1")


def test_fixmatch_loss_matches_reference() -> None:
    generator = torch.Generator().manual_seed(2)
    strong = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    weak_probs = torch.randn(8, 3, generator=generator, dtype=torch.float64).mul(3).softmax(dim=1)
    threshold = 0.7
    loss, mask = FixMatchLoss(threshold)(strong, weak_probs)
    # 1/(mu B) sum_b 1(max q_b >= tau) * -log softmax(strong_b)[argmax q_b]
    expected, expected_mask = 0.0, []
    for s_row, q_row in zip(strong.tolist(), weak_probs.tolist()):
        keep = max(q_row) >= threshold
        expected_mask.append(float(keep))
        if keep:
            expected -= math.log(_softmax(s_row)[q_row.index(max(q_row))])
    expected /= len(strong)
    assert 0 < sum(expected_mask) < len(strong)  # the case exercises both branches
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert mask.tolist() == expected_mask


def test_fixmatch_loss_closed_forms() -> None:
    strong = torch.randn(4, 5)
    confident = torch.eye(5)[:4]  # one-hot: every pseudo-label passes any threshold
    loss, mask = FixMatchLoss(1.0)(strong, confident)
    assert mask.tolist() == [1.0] * 4
    assert loss.item() == pytest.approx(
        torch.nn.functional.cross_entropy(strong, torch.arange(4)).item(), rel=1e-6
    )
    uniform = torch.full((4, 5), 0.2)
    loss, mask = FixMatchLoss(0.95)(strong, uniform)
    assert loss.item() == 0.0 and mask.sum().item() == 0.0
    # threshold 0 keeps everything
    _, mask = FixMatchLoss(0.0)(strong, uniform)
    assert mask.sum().item() == 4


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_confidence_threshold_outside_unit_interval_raises(threshold: float) -> None:
    with pytest.raises(ValueError, match="confidence_threshold"):
        FixMatchLoss(threshold)


def test_weighted_pseudo_label_loss_matches_reference() -> None:
    logits = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    weights = torch.tensor([0.9, 0.0, 0.5, 1.0, 0.2, 0.7], dtype=torch.float64)
    expected = sum(
        -w * math.log(_softmax(row)[y])
        for row, y, w in zip(logits.tolist(), labels.tolist(), weights.tolist())
    ) / len(labels)
    assert weighted_pseudo_label_loss(logits, labels, weights).item() == pytest.approx(expected, rel=1e-6)
    # unit weights: plain cross-entropy; zero weights: zero
    ones = torch.ones(6, dtype=torch.float64)
    assert weighted_pseudo_label_loss(logits, labels, ones).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels).item()
    )
    assert weighted_pseudo_label_loss(logits, labels, torch.zeros(6)).item() == 0.0
    with pytest.raises(ValueError):
        weighted_pseudo_label_loss(logits, labels, torch.ones(5))


def test_entropy_matches_reference_and_bounds() -> None:
    logits = torch.randn(5, 6, dtype=torch.float64)
    expected = sum(-sum(p * math.log(p) for p in _softmax(row)) for row in logits.tolist()) / 5
    assert entropy_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    assert entropy_loss(torch.zeros(3, 6)).item() == pytest.approx(math.log(6))  # uniform: the maximum
    assert entropy_loss(torch.tensor([[100.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)
    assert 0 <= entropy_loss(logits).item() <= math.log(6)


def test_sigmoid_rampup() -> None:
    assert sigmoid_rampup(0, 0) == 1.0
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(1000, 100) == 1.0
