"""VICReg and SimSiam: their losses against the formulas written out here, and each method's
defining property as a test that fails when it is broken.

- VICReg's loss: lambda s + mu (v(Z) + v(Z')) / 2 + nu (c(Z) + c(Z')) with the three terms
  written as plain loops -> ``test_vicreg_loss_matches_the_formula``; each term with its own
  weight, alone -> ``test_each_vicreg_term_has_its_own_weight``; closed forms (decorrelated
  unit-variance embeddings cost 0, a collapsed batch costs mu (1 - sqrt(eps)))
  -> ``test_vicreg_closed_forms``; variance and covariance on the gathered global batch, the
  invariance on the rank's own pairs -> ``test_vicreg_gathers_only_for_variance_and_covariance``;
  the module's step on two distinct views -> ``test_vicreg_step_matches_reference``.
- SimSiam's D(p, z) = -cos(p, z) -> ``test_negative_cosine_similarity_matches_the_formula``;
  the stop-gradient on the target branch and the symmetric loss
  -> ``test_simsiam_step_has_stop_gradient_and_is_symmetric``, ``test_swapping_the_views``;
  the predictor's fixed learning rate -> ``test_simsiam_predictor_lr_is_not_decayed``.
- both: paper defaults (``test_paper_defaults``) and a few training steps with finite losses
  that move the backbone (``test_trains_a_few_steps``).

References (not dependencies): lightly's ``lightly.loss.VICRegLoss`` computes the same VICReg
loss (it follows the authors' code, facebookresearch/vicreg, with the 1/2 on the variance term)
and ``lightly.loss.NegativeCosineSimilarity`` SimSiam's D (lightly returns +cos and the SimSiam
example negates it). The formulas below are written from the papers:
- VICReg, Bardes et al., 2022, https://arxiv.org/abs/2105.04906 (eqs. 1-6, Algorithm 1)
- SimSiam, Chen & He, 2021, https://arxiv.org/abs/2011.10566 (eqs. 1-4, Algorithm 1)
"""

from __future__ import annotations

import copy
import inspect
import math

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

import ssl_modules.dist as ssl_dist
from ssl_modules.batch import train_batch
from ssl_modules.losses.joint_embedding import NegativeCosineSimilarity, VICRegLoss
from ssl_modules.self_supervised.simsiam import SimSiamModule
from ssl_modules.self_supervised.vicreg import VICRegModule

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*self.trainer. reference is not registered"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
]

MEAN, STD = 0.5, 0.25
FACTS = dict(num_classes=3, channels=1, image_size=8, mean=(MEAN,), std=(STD,), horizontal_flip=False)
N = 8
SMALL = dict(projection_hidden_dim=16, projection_dim=8)
EPS = 1e-4


# -- the formulas, written out --------------------------------------------------------------
def invariance_reference(z_a: np.ndarray, z_b: np.ndarray) -> float:
    n, d = z_a.shape
    total = 0.0
    for i in range(n):
        for k in range(d):
            total += (z_a[i, k] - z_b[i, k]) ** 2
    return total / (n * d)


def variance_reference(z: np.ndarray, gamma: float = 1.0, eps: float = EPS) -> float:
    n, d = z.shape
    hinge = 0.0
    for j in range(d):
        mean = sum(z[i, j] for i in range(n)) / n
        var = sum((z[i, j] - mean) ** 2 for i in range(n)) / (n - 1)
        hinge += max(0.0, gamma - math.sqrt(var + eps))
    return hinge / d


def covariance_reference(z: np.ndarray) -> float:
    n, d = z.shape
    means = [sum(z[i, j] for i in range(n)) / n for j in range(d)]
    total = 0.0
    for j in range(d):
        for k in range(d):
            if j != k:
                c = sum((z[i, j] - means[j]) * (z[i, k] - means[k]) for i in range(n)) / (n - 1)
                total += c**2
    return total / d


def vicreg_reference(z_a, z_b, lam: float, mu: float, nu: float) -> float:
    z_a, z_b = np.asarray(z_a, dtype=np.float64), np.asarray(z_b, dtype=np.float64)
    variance = (variance_reference(z_a) + variance_reference(z_b)) / 2
    covariance = covariance_reference(z_a) + covariance_reference(z_b)
    return lam * invariance_reference(z_a, z_b) + mu * variance + nu * covariance


def negative_cosine_reference(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -(p / |p|) . (z / |z|), averaged over the batch (SimSiam eq. 1)."""
    rows = [-(p[i] @ z[i]) / (p[i].norm() * z[i].norm()) for i in range(len(p))]
    return torch.stack(rows).mean()


def embeddings(seed: int = 0, n: int = 6, d: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Two correlated embeddings whose dimensions have standard deviations on both sides of 1
    (so the variance hinge is active on some dimensions and not on others)."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.3, 2.0, 0.7, 1.5, 0.1])[:d]
    z_a = torch.randn(n, d, generator=generator) * scale
    z_b = z_a + 0.5 * torch.randn(n, d, generator=generator) * scale
    z_a[:, 1] += 0.8 * z_a[:, 0]  # correlated dimensions
    return z_a.double(), z_b.double()


# -- VICReg loss ------------------------------------------------------------------------------
def test_vicreg_loss_matches_the_formula() -> None:
    for seed in range(3):
        z_a, z_b = embeddings(seed)
        expected = vicreg_reference(z_a.numpy(), z_b.numpy(), 25.0, 25.0, 1.0)
        assert float(VICRegLoss()(z_a, z_b)) == pytest.approx(expected, rel=1e-5)
        # non-default weights
        expected = vicreg_reference(z_a.numpy(), z_b.numpy(), 2.0, 3.0, 5.0)
        assert float(VICRegLoss(2.0, 3.0, 5.0)(z_a, z_b)) == pytest.approx(expected, rel=1e-5)


def test_each_vicreg_term_has_its_own_weight() -> None:
    z_a, z_b = embeddings(1)
    a, b = z_a.numpy(), z_b.numpy()
    invariance = invariance_reference(a, b)
    variance = (variance_reference(a) + variance_reference(b)) / 2
    covariance = covariance_reference(a) + covariance_reference(b)
    assert min(invariance, variance, covariance) > 1e-3  # every term is active in this case
    # one weight at a time: a term multiplied by the wrong weight (or missing) fails here
    assert float(VICRegLoss(1.0, 0.0, 0.0)(z_a, z_b)) == pytest.approx(invariance, rel=1e-5)
    assert float(VICRegLoss(0.0, 1.0, 0.0)(z_a, z_b)) == pytest.approx(variance, rel=1e-5)
    assert float(VICRegLoss(0.0, 0.0, 1.0)(z_a, z_b)) == pytest.approx(covariance, rel=1e-5)
    assert float(VICRegLoss(0.0, 7.0, 0.0)(z_a, z_b)) == pytest.approx(7.0 * variance, rel=1e-5)
    terms = VICRegLoss().terms(z_a, z_b)
    assert [float(t) for t in terms] == pytest.approx([invariance, variance, covariance], rel=1e-5)


def test_vicreg_closed_forms() -> None:
    # columns of a 4x4 Hadamard matrix without the constant one: zero mean, variance 4/3 (> 1)
    # and mutually orthogonal -> identical views of such embeddings cost exactly 0
    hadamard = torch.tensor([[1, 1, 1], [-1, 1, -1], [1, -1, -1], [-1, -1, 1]], dtype=torch.float64)
    assert float(VICRegLoss()(hadamard, hadamard.clone())) == pytest.approx(0.0, abs=1e-7)
    # a collapsed batch (every row the same): std 0, so each dimension's hinge is 1 - sqrt(eps)
    collapsed = torch.ones(5, 3, dtype=torch.float64)
    terms = VICRegLoss().terms(collapsed, collapsed)
    assert float(terms.variance) == pytest.approx(1 - math.sqrt(EPS), rel=1e-6)  # computed in float32
    assert float(terms.invariance) == 0.0 and float(terms.covariance) == 0.0
    assert float(VICRegLoss()(collapsed, collapsed)) == pytest.approx(25 * (1 - math.sqrt(EPS)), rel=1e-6)


def test_vicreg_gathers_only_for_variance_and_covariance(monkeypatch) -> None:
    """Under DDP the variance and covariance terms see every rank's embeddings; the invariance
    term is a per-pair mean of this rank's own pairs (DDP's gradient averaging does the rest)."""
    z_a, z_b = embeddings(2)
    other_a, other_b = embeddings(3)  # "the other rank's" embeddings
    others = iter([other_a, other_b])  # the loss gathers z_a, then z_b
    monkeypatch.setattr(ssl_dist, "is_distributed", lambda: True)
    monkeypatch.setattr(ssl_dist, "gather", lambda z: torch.cat([z, next(others).to(z.dtype)]))
    all_a, all_b = torch.cat([z_a, other_a]).numpy(), torch.cat([z_b, other_b]).numpy()
    terms = VICRegLoss().terms(z_a, z_b)
    assert float(terms.invariance) == pytest.approx(invariance_reference(z_a.numpy(), z_b.numpy()), rel=1e-6)
    assert float(terms.variance) == pytest.approx(
        (variance_reference(all_a) + variance_reference(all_b)) / 2, rel=1e-6
    )
    assert float(terms.covariance) == pytest.approx(
        covariance_reference(all_a) + covariance_reference(all_b), rel=1e-6
    )
    # and gather_distributed=False keeps everything on the rank
    local = VICRegLoss(gather_distributed=False).terms(z_a, z_b)
    assert float(local.covariance) == pytest.approx(
        covariance_reference(z_a.numpy()) + covariance_reference(z_b.numpy()), rel=1e-6
    )


def test_vicreg_loss_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="variance_weight"):
        VICRegLoss(variance_weight=-1.0)
    with pytest.raises(ValueError, match="at least 2"):
        VICRegLoss()(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="same shape"):
        VICRegLoss()(torch.randn(4, 4), torch.randn(4, 3))


# -- SimSiam's D ------------------------------------------------------------------------------
def test_negative_cosine_similarity_matches_the_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    p, z = torch.randn(7, 5, generator=generator), torch.randn(7, 5, generator=generator)
    criterion = NegativeCosineSimilarity()
    torch.testing.assert_close(criterion(p, z), negative_cosine_reference(p, z))
    assert float(criterion(z, 3 * z)) == pytest.approx(-1.0)  # aligned, whatever the norm
    assert float(criterion(z, -z)) == pytest.approx(1.0)
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert float(criterion(orthogonal, orthogonal.flip(1))) == pytest.approx(0.0)


# -- the modules' steps -----------------------------------------------------------------------
def view_transform(images: torch.Tensor, view: int) -> torch.Tensor:
    """View 0: the image; view 1: rolled by a pixel, dimmed and lifted. Stays in [0, 1]."""
    return images.roll(view, dims=-1) * (1 - 0.2 * view) + 0.1 * view


class ViewTransform(nn.Module):
    """Replaces ``model.augment``: the k-th block of N rows (``make_views`` passes the batch
    repeated once per view) is view ``order[k]`` of its image."""

    def __init__(self, order: tuple[int, int] = (0, 1)) -> None:
        super().__init__()
        self.order = order

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        blocks = images.split(N)
        return torch.cat([view_transform(block, self.order[k]) for k, block in enumerate(blocks)])


def make_batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    labeled = torch.rand(N, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 3, (N,), generator=generator)
    unlabeled = torch.rand(N, 1, 8, 8, generator=generator)
    return train_batch(labeled, labels, unlabeled)


def build(cls, order: tuple[int, int] = (0, 1), **overrides) -> nn.Module:
    torch.manual_seed(0)
    kwargs = dict(SMALL)
    if cls is SimSiamModule:
        kwargs["prediction_hidden_dim"] = 4
    kwargs.update(overrides)
    model = cls(**FACTS, **kwargs)
    model.augment = ViewTransform(order)
    model.logged = {}
    model.log = lambda name, value, *args, **kwargs: model.logged.__setitem__(name, value)
    model.log_dict = lambda values, *args, **kwargs: model.logged.update(values)
    # eval mode: BatchNorm is a per-sample function, so the reference below does not depend on
    # how the module batches its forward passes
    return model.eval()


def normalize(images: torch.Tensor) -> torch.Tensor:
    return (images - MEAN) / STD


def test_vicreg_step_matches_reference() -> None:
    weights = dict(invariance_weight=2.0, variance_weight=3.0, covariance_weight=0.5)
    model = build(VICRegModule, **weights)
    batch = make_batch()
    model.training_step(batch, 0)
    images = batch["unlabeled"].images
    with torch.no_grad():
        z = [model.projector(model.backbone(normalize(view_transform(images, v)))) for v in (0, 1)]
    expected = vicreg_reference(z[0].numpy(), z[1].numpy(), lam=2.0, mu=3.0, nu=0.5)
    assert float(model.logged["train/loss"].detach()) == pytest.approx(expected, rel=1e-4)
    a, b = z[0].double().numpy(), z[1].double().numpy()
    assert float(model.logged["train/invariance"]) == pytest.approx(invariance_reference(a, b), rel=1e-4)
    assert float(model.logged["train/variance"]) == pytest.approx(
        (variance_reference(a) + variance_reference(b)) / 2, rel=1e-4
    )
    assert float(model.logged["train/covariance"]) == pytest.approx(
        covariance_reference(a) + covariance_reference(b), rel=1e-4
    )


def simsiam_reference(model: nn.Module, images: torch.Tensor, order=(0, 1), stop_gradient: bool = True):
    z = [model.projector(model.backbone(normalize(view_transform(images, v)))) for v in order]
    p = [model.predictor(zv) for zv in z]
    target = [zv.detach() for zv in z] if stop_gradient else z
    return (negative_cosine_reference(p[0], target[1]) + negative_cosine_reference(p[1], target[0])) / 2


def encoder_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: p.grad.clone()
        for name, p in model.named_parameters()
        if p.grad is not None and not name.startswith("online_probe.")
    }


def test_simsiam_step_has_stop_gradient_and_is_symmetric() -> None:
    model = build(SimSiamModule)
    batch = make_batch()
    reference = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    model.training_step(batch, 0).backward()
    images = batch["unlabeled"].images

    expected = simsiam_reference(reference, images)  # (D(p1, sg(z2)) + D(p2, sg(z1))) / 2
    assert float(model.logged["train/loss"].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    expected.backward()
    actual, wanted = encoder_gradients(model), encoder_gradients(reference)
    assert actual.keys() == wanted.keys() and any(k.startswith("predictor.") for k in actual)
    for name in wanted:
        torch.testing.assert_close(actual[name], wanted[name], msg=name)

    # the control: with gradient through the target branch the encoder's gradients differ, so
    # the comparison above can tell a step without the stop-gradient
    control = copy.deepcopy(reference)
    control.zero_grad(set_to_none=True)
    simsiam_reference(control, images, stop_gradient=False).backward()
    leaked = encoder_gradients(control)
    assert any(
        not torch.allclose(leaked[name], wanted[name], atol=1e-6) for name in wanted if "backbone" in name
    )


def test_swapping_the_views() -> None:
    """The symmetric loss: feeding the two views in the other order gives the same loss."""
    batch = make_batch(1)
    losses = []
    for order in ((0, 1), (1, 0)):
        model = build(SimSiamModule, order=order)
        model.training_step(batch, 0)
        losses.append(float(model.logged["train/loss"].detach()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    one_sided = float(negative_cosine_reference(*_p_and_target(build(SimSiamModule), batch)))
    assert one_sided != pytest.approx(losses[0], rel=1e-3)  # a one-sided loss would be told apart


def _p_and_target(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    images = batch["unlabeled"].images
    with torch.no_grad():
        z = [model.projector(model.backbone(normalize(view_transform(images, v)))) for v in (0, 1)]
        return model.predictor(z[0]), z[1]


# -- optimisation and training -------------------------------------------------------------
def fixed_batches(steps: int) -> list[dict]:
    batches = []
    for step in range(steps):
        batch = make_batch(10 + step)
        batches.append(
            train_batch(
                (batch["labeled"].images * 255).to(torch.uint8),
                batch["labeled"].labels,
                (batch["unlabeled"].images * 255).to(torch.uint8),
            )
        )
    return batches


def fit(model: L.LightningModule, steps: int) -> tuple[L.Trainer, list[float]]:
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(trainer.callback_metrics["train/loss"]))

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
    )
    loader = torch.utils.data.DataLoader(
        fixed_batches(steps), batch_size=None, collate_fn=lambda batch: batch
    )
    trainer.fit(model, train_dataloaders=loader)
    return trainer, losses


@pytest.mark.parametrize("fixed", [True, False])
def test_simsiam_predictor_lr_is_not_decayed(fixed: bool) -> None:
    L.seed_everything(0, verbose=False)
    lr = 0.05
    model = SimSiamModule(**FACTS, **SMALL, prediction_hidden_dim=4, fixed_predictor_lr=fixed, lr=lr)
    trainer, _ = fit(model, steps=4)
    optimizer = trainer.optimizers[0]
    predictor = {id(p) for p in model.predictor.parameters()}
    (predictor_group,) = [g for g in optimizer.param_groups if {id(p) for p in g["params"]} == predictor]
    others = [g for g in optimizer.param_groups if g is not predictor_group]
    assert all(g["lr"] < 0.5 * lr for g in others)  # the cosine reached its end
    if fixed:
        assert predictor_group["lr"] == pytest.approx(lr)
    else:
        assert predictor_group["lr"] < 0.5 * lr
    # weight decay on every weight, as in the paper (the online probe aside)
    encoder = next(g for g in others if any(p is model.backbone.features[0].weight for p in g["params"]))
    assert encoder["weight_decay"] == pytest.approx(1e-4)
    assert any(p is model.projector.layers[1].bias for p in encoder["params"])


@pytest.mark.parametrize("cls", [VICRegModule, SimSiamModule])
def test_trains_a_few_steps(cls) -> None:
    L.seed_everything(0, verbose=False)
    extra = {"prediction_hidden_dim": 4} if cls is SimSiamModule else {}
    model = cls(**FACTS, **SMALL, **extra)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    _, losses = fit(model, steps=3)
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses), losses
    assert any(not torch.equal(b, p) for b, p in zip(before, model.backbone.parameters()))


def test_paper_defaults() -> None:
    vicreg = inspect.signature(VICRegModule.__init__).parameters
    assert {k: vicreg[k].default for k in ("invariance_weight", "variance_weight", "covariance_weight")} == {
        "invariance_weight": 25.0,
        "variance_weight": 25.0,
        "covariance_weight": 1.0,
    }
    assert (vicreg["projection_hidden_dim"].default, vicreg["projection_dim"].default) == (8192, 8192)
    assert (vicreg["lars"].default, vicreg["lr"].default, vicreg["weight_decay"].default) == (True, 0.2, 1e-6)
    simsiam = inspect.signature(SimSiamModule.__init__).parameters
    assert (simsiam["projection_dim"].default, simsiam["prediction_hidden_dim"].default) == (2048, 512)
    assert (simsiam["lr"].default, simsiam["weight_decay"].default) == (0.05, 1e-4)
    assert simsiam["fixed_predictor_lr"].default is True
    # SimSiam's heads: 3-layer projector with BatchNorm on its output (no affine, no bias before
    # it), a 2048 -> 512 -> 2048 bottleneck predictor
    model = SimSiamModule(**FACTS)
    layers = list(model.projector.layers)
    linears = [layer for layer in layers if isinstance(layer, nn.Linear)]
    assert [layer.out_features for layer in linears] == [2048, 2048, 2048]
    assert isinstance(layers[-1], nn.BatchNorm1d) and not layers[-1].affine and linears[-1].bias is None
    assert [layer.out_features for layer in model.predictor.layers if isinstance(layer, nn.Linear)] == [
        512,
        2048,
    ]
    loss = VICRegModule(**FACTS, **SMALL).criterion
    assert (loss.invariance_weight, loss.variance_weight, loss.covariance_weight) == (25.0, 25.0, 1.0)
