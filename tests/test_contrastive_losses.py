"""Contrastive / joint-embedding losses against the papers' formulas written out plainly."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_modules.losses.contrastive import (
    BarlowTwinsLoss,
    BYOLLoss,
    InfoNCELoss,
    NTXentLoss,
    alignment,
    uniformity,
)
from ssl_modules.optim import LARS, joint_embedding_optimizer, param_groups


def cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u @ v / (u.norm() * v.norm()))


# -- NT-Xent --------------------------------------------------------------------------
def nt_xent_loop(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> float:
    """SimCLR eq. (1), averaged over all 2N views, as a double loop."""
    views = list(z_a) + list(z_b)
    n = len(z_a)
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        numerator = math.exp(cosine(views[i], views[positive]) / temperature)
        denominator = sum(math.exp(cosine(views[i], views[k]) / temperature) for k in range(2 * n) if k != i)
        total += -math.log(numerator / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_matches_loop_reference(temperature):
    torch.manual_seed(0)
    z_a, z_b = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    loss = NTXentLoss(temperature)(z_a, z_b)
    assert loss.item() == pytest.approx(nt_xent_loop(z_a, z_b, temperature), rel=1e-5)


def test_nt_xent_closed_form_orthogonal_images():
    # identical views, images along orthogonal axes: the positive has similarity 1 and every
    # one of the 2N - 2 negatives 0, so l = log(1 + (2N - 2) e^{-1/t})
    n, temperature = 4, 0.5
    z = torch.eye(n) * 3.0
    expected = math.log(1 + (2 * n - 2) * math.exp(-1 / temperature))
    assert NTXentLoss(temperature)(z, z).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_invariances():
    torch.manual_seed(1)
    z_a, z_b = torch.randn(8, 4), torch.randn(8, 4)
    loss = NTXentLoss(0.5)
    reference = loss(z_a, z_b)
    order = torch.randperm(8)
    assert loss(z_a[order], z_b[order]).item() == pytest.approx(reference.item(), rel=1e-5)  # batch order
    assert loss(z_b, z_a).item() == pytest.approx(reference.item(), rel=1e-5)  # view order
    assert loss(z_a * 7, z_b * 0.1).item() == pytest.approx(reference.item(), rel=1e-5)  # cosine: scale-free
    # the true pairing of nearly identical views beats a shuffled pairing of the same embeddings
    shift = torch.roll(torch.arange(8), 1)
    assert loss(z_a, z_a + 0.01 * z_b) < loss(z_a, z_a[shift] + 0.01 * z_b)


def test_nt_xent_checks_arguments():
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(0.0)
    with pytest.raises(ValueError, match="same shape"):
        NTXentLoss()(torch.randn(4, 3), torch.randn(5, 3))


# -- InfoNCE (MoCo) ---------------------------------------------------------------------
def info_nce_loop(query, key, queue, temperature):
    total = 0.0
    for q, k in zip(query, key):
        positive = math.exp(cosine(q, k) / temperature)
        negatives = sum(math.exp(cosine(q, negative) / temperature) for negative in queue)
        total += -math.log(positive / (positive + negatives))
    return total / len(query)


def test_info_nce_matches_loop_reference():
    torch.manual_seed(2)
    query, key = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    queue = torch.randn(7, 4, dtype=torch.float64)
    loss = InfoNCELoss(0.2)(query, key, queue)
    assert loss.item() == pytest.approx(info_nce_loop(query, key, queue, 0.2), rel=1e-5)


def test_info_nce_closed_form():
    # q = k, every queue entry orthogonal to q: l = log(1 + K e^{-1/t})
    query = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    expected = math.log(1 + 3 * math.exp(-1 / 0.2))
    assert InfoNCELoss(0.2)(query, query, queue).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_checks_queue_shape():
    with pytest.raises(ValueError, match="queue"):
        InfoNCELoss()(torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 5))


# -- BYOL ---------------------------------------------------------------------------------
def test_byol_loss_matches_formula_and_closed_form():
    torch.manual_seed(3)
    prediction, target = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    expected = sum(
        float(((p / p.norm() - z / z.norm()) ** 2).sum()) for p, z in zip(prediction, target)
    ) / len(prediction)
    loss = BYOLLoss()
    assert loss(prediction, target).item() == pytest.approx(expected, rel=1e-6)
    assert loss(prediction, 3 * prediction).item() == pytest.approx(0.0, abs=1e-6)  # aligned: 0
    assert loss(prediction, -prediction).item() == pytest.approx(4.0, rel=1e-6)  # opposite: 4


def test_byol_loss_gradient_reaches_both_inputs():
    # the stop-gradient belongs to the method (torch.no_grad around the target), not the loss
    prediction, target = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    BYOLLoss()(prediction, target).backward()
    assert prediction.grad is not None and target.grad is not None


# -- Barlow Twins ---------------------------------------------------------------------------
def barlow_loop(z_a, z_b, redundancy_weight, eps=1e-5):
    n, d = z_a.shape
    za = (z_a - z_a.mean(0)) / torch.sqrt(z_a.var(0, unbiased=False) + eps)
    zb = (z_b - z_b.mean(0)) / torch.sqrt(z_b.var(0, unbiased=False) + eps)
    total = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(float(za[b, i] * zb[b, j]) for b in range(n)) / n
            total += (1 - c) ** 2 if i == j else redundancy_weight * c**2
    return total


def test_barlow_twins_matches_loop_reference():
    torch.manual_seed(4)
    z_a, z_b = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
    loss = BarlowTwinsLoss(0.0051)(z_a, z_b)
    assert loss.item() == pytest.approx(barlow_loop(z_a, z_b, 0.0051), rel=1e-5)
    assert BarlowTwinsLoss(1.0)(z_a, z_b).item() == pytest.approx(barlow_loop(z_a, z_b, 1.0), rel=1e-5)


def test_barlow_twins_closed_form_and_invariance():
    # columns 2-4 of a 4x4 Hadamard matrix: zero mean, unit variance, mutually orthogonal ->
    # with identical views C = I / (1 + eps): the loss vanishes (up to eps)
    hadamard = torch.tensor(
        [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64
    )
    z = hadamard[:, 1:]
    assert BarlowTwinsLoss(0.0051)(z, z).item() == pytest.approx(0.0, abs=1e-4)
    # perfectly anti-correlated views: diagonal -1, so the invariance term is d * (1 - (-1))^2
    assert BarlowTwinsLoss(0.0051)(z, -z).item() == pytest.approx(3 * 4.0, rel=1e-4)
    # invariant to a per-dimension affine map of either view (it is standardised over the batch)
    torch.manual_seed(5)
    z_a, z_b = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    loss = BarlowTwinsLoss(0.01)
    shifted = z_a * torch.tensor([2.0, 0.5, 3.0, 1.5], dtype=torch.float64) + 4.0
    assert loss(shifted, z_b).item() == pytest.approx(loss(z_a, z_b).item(), rel=1e-4)


def test_barlow_twins_checks_arguments():
    with pytest.raises(ValueError, match="redundancy_weight"):
        BarlowTwinsLoss(-1.0)
    with pytest.raises(ValueError, match="at least 2"):
        BarlowTwinsLoss()(torch.randn(1, 3), torch.randn(1, 3))


# -- alignment / uniformity ----------------------------------------------------------------
def test_alignment_and_uniformity():
    z = torch.eye(3)
    assert alignment(z, z).item() == pytest.approx(0.0)
    assert alignment(z, -z).item() == pytest.approx(4.0)  # |2u|^2 on the unit sphere
    # orthonormal points: every pairwise squared distance is 2 -> log(e^{-2t}) = -4 at t = 2
    assert uniformity(z).item() == pytest.approx(-4.0, rel=1e-6)
    collapsed = torch.ones(5, 3)
    assert uniformity(collapsed).item() == pytest.approx(0.0, abs=1e-6)  # the worst possible value


def test_losses_are_float32_under_bf16_autocast():
    torch.manual_seed(6)
    z_a, z_b = torch.randn(8, 4), torch.randn(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = NTXentLoss(0.5)(z_a.bfloat16(), z_b.bfloat16())
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(
        NTXentLoss(0.5)(z_a.bfloat16().float(), z_b.bfloat16().float()).item(), rel=1e-5
    )


# -- optimizer parts ---------------------------------------------------------------------------
def test_param_groups_exclude_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    decay, no_decay = param_groups(model.parameters(), weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and not decay["lars_exclude"]
    assert {p.shape for p in decay["params"]} == {torch.Size([4, 3]), torch.Size([2, 4])}
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"]
    assert len(no_decay["params"]) == 4  # two biases, BN weight and bias


def test_lars_step_matches_hand_computation():
    weight = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    bias = torch.nn.Parameter(torch.tensor([1.0]))
    weight.grad = torch.tensor([[0.0, 1.0]])
    bias.grad = torch.tensor([2.0])
    groups = param_groups([weight, bias], weight_decay=0.1)
    optimizer = LARS(groups, lr=0.5, momentum=0.9, trust_coefficient=0.01)
    optimizer.step()
    update = torch.tensor([[0.0, 1.0]]) + 0.1 * torch.tensor([[3.0, 4.0]])  # g + wd * w
    trust = 0.01 * 5.0 / update.norm()
    assert torch.allclose(weight.detach(), torch.tensor([[3.0, 4.0]]) - 0.5 * trust * update, atol=1e-6)
    assert torch.allclose(bias.detach(), torch.tensor([1.0 - 0.5 * 2.0]))  # excluded: plain SGD, no decay


def test_joint_embedding_optimizer_keeps_probe_out_of_lars():
    model = torch.nn.Module()
    model.backbone = torch.nn.Linear(3, 4)
    model.online_probe = torch.nn.Linear(4, 2)
    optimizer = joint_embedding_optimizer(model, lr=0.1, weight_decay=1e-4, lars=True)
    probe_ids = {id(p) for p in model.online_probe.parameters()}
    for group in optimizer.param_groups:
        if any(id(p) in probe_ids for p in group["params"]):
            assert group["lars_exclude"] and group["weight_decay"] == 0.0
            assert all(id(p) in probe_ids for p in group["params"])
    seen = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert seen == {id(p) for p in model.parameters()}


def test_losses_gather_across_ranks_by_default() -> None:
    # under DDP the negatives (NT-Xent) and the batch statistics (Barlow Twins) must be global
    # unless a user turns it off: the DDP tests set the flag explicitly, so the default is checked here
    from ssl_modules import SimCLRModule

    assert NTXentLoss().gather_distributed is True
    model = SimCLRModule(num_classes=2, channels=1, image_size=8, mean=(0.5,), std=(0.25,))
    assert model.criterion.gather_distributed is True
