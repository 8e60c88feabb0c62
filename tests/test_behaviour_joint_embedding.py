"""Behaviour of the joint-embedding methods: each test fails when one defining property of
SimCLR, MoCo v2, BYOL or Barlow Twins is broken (a fault that still trains).

What makes each method *that* method, and the test that checks it:

- SimCLR: NT-Xent between the projections of two *distinct* views of each image (never a
  view with itself), every other view of the batch a negative, gradient through both views
  -> ``test_simclr_step_is_nt_xent_between_distinct_views``, ``test_swapping_the_two_views``,
  ``test_identical_views_give_a_lower_loss_than_distinct_views``.
- MoCo v2: query from one view through the online encoder, key from the *other* view through
  the momentum encoder (no gradient), negatives = the queue as it was *before* this step's
  keys are enqueued; the L2-normalised keys of the momentum encoder are then enqueued at the
  pointer, which advances by the batch size; the momentum encoder is the EMA of the online one
  -> ``test_moco_step_matches_reference``, ``test_swapping_the_two_views``,
  ``test_momentum_network_follows_the_ema_of_the_online_trajectory``.
- BYOL: online (backbone, projector, predictor) predicts the *target* network's projection
  (target backbone + projector, no predictor, no gradient) of the other view, symmetrised
  over the two views; the target is the EMA of the online network (BatchNorm buffers copied)
  after each optimizer step with the cosine-scheduled tau -> ``test_byol_step_matches_reference``,
  ``test_swapping_the_two_views``, ``test_momentum_network_follows_the_ema_of_the_online_trajectory``.
- Barlow Twins: cross-correlation of the two views' embeddings, each standardised per
  dimension over the batch; lambda multiplies the off-diagonal terms only
  -> ``test_barlow_twins_step_matches_reference``,
  ``test_identical_views_give_a_lower_loss_than_distinct_views``.
- all: the online probe sees detached features (``test_online_probe_sends_no_gradient_into_the_encoder``);
  MoCo and BYOL are evaluated with the online backbone, as ``SelfSupervisedModule`` says
  (``test_evaluated_encoder_is_the_online_backbone``).

The references below are written out in plain torch; they call the module's networks
(backbone, projector, ...) as building blocks, never its losses. The step tests run in eval
mode, so BatchNorm is a per-sample function and the reference does not depend on how the
method batches its forward passes; a deterministic, view-dependent transform replaces the
random augmentation so that the views are known and *distinct*.
"""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_trainer
from torch import nn

import ssl_modules.evaluation.self_supervised as self_supervised
from datamodules import SyntheticDataModule
from ssl_modules import BarlowTwinsModule, BYOLModule, MoCoModule, SimCLRModule
from ssl_modules.batch import LabeledBatch, train_batch

pytestmark = pytest.mark.filterwarnings("ignore:.*self.trainer. reference is not registered")

MEAN, STD = 0.5, 0.25
FACTS = dict(num_classes=3, channels=1, image_size=8, mean=(MEAN,), std=(STD,), horizontal_flip=False)
N = 8  # images per batch
SMALL = dict(projection_hidden_dim=16, projection_dim=8)
# non-default values, so that a method ignoring its hyperparameter is caught
TEMPERATURE_SIMCLR, TEMPERATURE_MOCO, LAMBDA = 0.3, 0.15, 0.3
QUEUE_SIZE, QUEUE_START = 32, 5


def view_transform(images: torch.Tensor, view: int) -> torch.Tensor:
    """A per-image, view-dependent 'augmentation': view 0 is the image, view v is it rolled by
    v pixels, dimmed and lifted. Output stays in [0, 1]."""
    return images.roll(view, dims=-1) * (1 - 0.2 * view) + 0.1 * view


class ViewTransform(nn.Module):
    """Replaces ``model.augment``. Row r of the k-th block of ``batch_size`` rows seen since
    ``reset()`` is view ``order[k]`` of its image, however the method calls its augmentation
    (once on the repeated batch, as ``make_views`` does, or once per view)."""

    def __init__(self, batch_size: int, order: tuple[int, ...] = (0, 1, 2), identical: bool = False) -> None:
        super().__init__()
        self.batch_size, self.order, self.identical = batch_size, order, identical
        self.blocks = 0

    def reset(self) -> None:
        self.blocks = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            view = 0 if self.identical else self.order[self.blocks]
            self.blocks += 1
            out.append(view_transform(images[start : start + self.batch_size], view))
        return torch.cat(out)


def make_batch(seed: int = 0, labels_offset: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(N, 1, 8, 8, generator=generator)
    labeled = torch.rand(N, 1, 8, 8, generator=generator)
    labels = (torch.randint(0, 3, (N,), generator=generator) + labels_offset) % 3
    return train_batch(labeled, labels, images)  # hidden labels: -1 (unknown)


def build(cls, **overrides) -> nn.Module:
    torch.manual_seed(0)
    kwargs = dict(SMALL)
    if cls is SimCLRModule:
        kwargs["temperature"] = TEMPERATURE_SIMCLR
    elif cls is MoCoModule:
        kwargs.update(temperature=TEMPERATURE_MOCO, queue_size=QUEUE_SIZE)
    elif cls is BarlowTwinsModule:
        kwargs["redundancy_weight"] = LAMBDA
    elif cls is BYOLModule:  # one view pipeline, self.augment, which ViewTransform replaces below
        kwargs["asymmetric_views"] = False  # (the asymmetric views: test_byol_barlow_quality.py)
    kwargs.update(overrides)
    model = cls(**FACTS, **kwargs)
    model.augment = ViewTransform(N)
    model.logged = {}
    model.log = lambda name, value, *args, **kwargs: model.logged.__setitem__(name, value)
    return model


def target_networks(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, MoCoModule):
        return [model.momentum_backbone, model.momentum_projector]
    if isinstance(model, BYOLModule):
        return [model.target_backbone, model.target_projector]
    return []


@torch.no_grad()
def make_target_differ(model: nn.Module) -> None:
    """Move the target/momentum network away from the online one (at construction they are
    equal, which would hide a method that takes its targets from the online network)."""
    generator = torch.Generator().manual_seed(7)
    for network in target_networks(model):
        for p in network.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))


@torch.no_grad()
def calibrated_eval(model: nn.Module) -> nn.Module:
    """Eval mode with BatchNorm running statistics measured on views of random images (at
    construction they are 0 and 1, which makes every embedding nearly the same)."""
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(4 * N, 1, 8, 8, generator=generator)
    inputs = normalize(torch.cat([view_transform(images, v) for v in (0, 1)]))
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the calibration batch
    model.train()
    chains = [["backbone", "projector", "predictor"], ["target_backbone", "target_projector"]]
    chains += [["momentum_backbone", "momentum_projector"]]
    for chain in chains:
        out = inputs
        for name in chain:
            if hasattr(model, name):
                out = getattr(model, name)(out)
    return model.eval()


def run_step(model: nn.Module, batch: dict) -> torch.Tensor:
    model.augment.reset()
    model.zero_grad(set_to_none=True)
    loss = model.training_step(batch, 0)
    loss.backward()
    return loss


# -- references in plain torch ------------------------------------------------------------
def normalize(images: torch.Tensor) -> torch.Tensor:
    return (images - MEAN) / STD


def probe_reference(model: nn.Module, labeled: LabeledBatch) -> torch.Tensor:
    images, labels = labeled.images, labeled.labels
    features = model.backbone(normalize(images)).detach()
    return F.cross_entropy(model.online_probe(features), labels)


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """-log exp(s_ij / t) / sum_{k != i} exp(s_ik / t) averaged over all 2n views, j the other view."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    similarity = z @ z.T / temperature
    losses = []
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        others = [k for k in range(2 * n) if k != i]
        losses.append(torch.logsumexp(similarity[i, others], 0) - similarity[i, positive])
    return torch.stack(losses).mean()


def info_nce_reference(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, t: float) -> torch.Tensor:
    q, k, negatives = F.normalize(query, dim=1), F.normalize(key, dim=1), F.normalize(queue, dim=1)
    positive = (q * k).sum(1, keepdim=True)
    logits = torch.cat([positive, q @ negatives.T], dim=1) / t
    return (torch.logsumexp(logits, 1) - logits[:, 0]).mean()


def byol_reference(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (F.normalize(prediction, dim=1) - F.normalize(target, dim=1)).pow(2).sum(1).mean()


def barlow_reference(z1: torch.Tensor, z2: torch.Tensor, lam: float, eps: float = 1e-5) -> torch.Tensor:
    n, d = z1.shape
    s1 = (z1 - z1.mean(0)) / torch.sqrt(
        ((z1 - z1.mean(0)) ** 2).mean(0) + eps
    )  # per dimension, over the batch
    s2 = (z2 - z2.mean(0)) / torch.sqrt(((z2 - z2.mean(0)) ** 2).mean(0) + eps)
    c = torch.einsum("bi,bj->ij", s1, s2) / n
    eye = torch.eye(d, dtype=torch.bool)
    return ((c[eye] - 1) ** 2).sum() + lam * (c[~eye] ** 2).sum()


def assert_same_gradients(model: nn.Module, reference: nn.Module) -> None:
    reference_grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        expected = reference_grads[name].grad
        if expected is None:
            assert p.grad is None or not p.grad.any(), f"{name} has a gradient the method must not send"
        else:
            assert p.grad is not None, f"{name} has no gradient"
            scale = max(1.0, expected.abs().max().item())
            worst = (p.grad - expected).abs().max().item()
            assert worst <= 1e-5 * scale, f"gradient of {name} differs by {worst:.2e} (scale {scale:.2e})"


# -- SimCLR ---------------------------------------------------------------------------------
@pytest.mark.parametrize("num_views", [2, 3])
def test_simclr_step_is_nt_xent_between_distinct_views(num_views):
    model = build(SimCLRModule, num_views=num_views)
    calibrated_eval(model)
    reference = copy.deepcopy(model)
    batch = make_batch()
    loss = run_step(model, batch)

    images = batch["unlabeled"].images
    z = [
        reference.projector(reference.backbone(normalize(view_transform(images, v))))
        for v in range(num_views)
    ]
    pairs = [(i, j) for i in range(num_views) for j in range(i + 1, num_views)]
    expected = sum(nt_xent_reference(z[i], z[j], TEMPERATURE_SIMCLR) for i, j in pairs) / len(pairs)
    torch.testing.assert_close(model.logged["train/loss"], expected, atol=1e-6, rtol=1e-5)
    total = expected + probe_reference(reference, batch["labeled"])
    torch.testing.assert_close(loss, total, atol=1e-6, rtol=1e-5)
    total.backward()
    assert_same_gradients(model, reference)


# -- MoCo -----------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [False, True])
def test_moco_step_matches_reference(symmetric):
    model = build(MoCoModule, symmetric=symmetric)
    calibrated_eval(model)
    make_target_differ(model)
    model.queue_pointer.fill_(QUEUE_START)
    reference = copy.deepcopy(model)
    queue_before = model.queue.clone()
    batch = make_batch()
    loss = run_step(model, batch)
    assert model.queue_pointer.item() == QUEUE_START + N  # advances by the batch size

    images = batch["unlabeled"].images
    views = [normalize(view_transform(images, v)) for v in (0, 1)]
    queries = [reference.projector(reference.backbone(v)) for v in views]
    with torch.no_grad():
        keys = [reference.momentum_projector(reference.momentum_backbone(v)) for v in views]
    # which view is the query is a free choice (the views are i.i.d. in training): try both
    candidates = []
    for q, k in ((0, 1), (1, 0)):
        method_loss = info_nce_reference(queries[q], keys[k], queue_before, TEMPERATURE_MOCO)
        if symmetric:
            method_loss = (
                method_loss + info_nce_reference(queries[k], keys[q], queue_before, TEMPERATURE_MOCO)
            ) / 2
        candidates.append((method_loss, k))
    matching = [
        c for c in candidates if torch.allclose(model.logged["train/loss"], c[0], atol=1e-6, rtol=1e-5)
    ]
    assert matching, (
        f"loss {float(model.logged['train/loss']):.6f} is InfoNCE for neither view order: "
        + str([float(c[0]) for c in candidates])
    )
    method_loss, key_view = matching[0]
    total = method_loss + probe_reference(reference, batch["labeled"])
    torch.testing.assert_close(loss, total, atol=1e-6, rtol=1e-5)
    total.backward()
    assert_same_gradients(model, reference)
    for network in target_networks(model):  # the key encoder: no gradient, not trainable
        assert all(p.grad is None and not p.requires_grad for p in network.parameters())

    # the queue: this step's keys (momentum encoder, key view, L2-normalised) after the old entries
    expected_queue = queue_before.clone()
    expected_queue[QUEUE_START : QUEUE_START + N] = keys[key_view] / keys[key_view].norm(dim=1, keepdim=True)
    torch.testing.assert_close(model.queue, expected_queue, atol=1e-6, rtol=1e-5)


# -- BYOL -----------------------------------------------------------------------------------
def test_byol_step_matches_reference():
    model = build(BYOLModule)
    calibrated_eval(model)
    make_target_differ(model)
    reference = copy.deepcopy(model)
    batch = make_batch()
    loss = run_step(model, batch)

    images = batch["unlabeled"].images
    views = [normalize(view_transform(images, v)) for v in (0, 1)]
    online = [reference.predictor(reference.projector(reference.backbone(v))) for v in views]
    with torch.no_grad():  # the target: target backbone + projector, no predictor
        target = [reference.target_projector(reference.target_backbone(v)) for v in views]
    expected = byol_reference(online[0], target[1]) + byol_reference(online[1], target[0])  # symmetrised
    torch.testing.assert_close(model.logged["train/loss"], expected, atol=1e-6, rtol=1e-5)
    total = expected + probe_reference(reference, batch["labeled"])
    torch.testing.assert_close(loss, total, atol=1e-6, rtol=1e-5)
    total.backward()
    assert_same_gradients(model, reference)
    assert model.predictor.layers[0].weight.grad is not None
    for network in target_networks(model):
        assert all(p.grad is None and not p.requires_grad for p in network.parameters())


# -- Barlow Twins ---------------------------------------------------------------------------
def test_barlow_twins_step_matches_reference():
    model = build(BarlowTwinsModule)
    calibrated_eval(model)
    reference = copy.deepcopy(model)
    batch = make_batch()
    loss = run_step(model, batch)

    images = batch["unlabeled"].images
    z = [reference.projector(reference.backbone(normalize(view_transform(images, v)))) for v in (0, 1)]
    expected = barlow_reference(z[0], z[1], LAMBDA)
    torch.testing.assert_close(model.logged["train/loss"], expected, atol=1e-5, rtol=1e-5)
    # lambda weighs the off-diagonal terms only: with lambda = 0 only the invariance term is left
    assert not torch.allclose(expected, barlow_reference(z[0], z[1], 0.0), rtol=1e-3)
    total = expected + probe_reference(reference, batch["labeled"])
    torch.testing.assert_close(loss, total, atol=1e-5, rtol=1e-5)
    total.backward()
    assert_same_gradients(model, reference)


# -- properties shared by the methods, without a reference -------------------------------
@pytest.mark.parametrize(
    "cls, overrides, symmetric",
    [
        (SimCLRModule, {}, True),
        (MoCoModule, {}, False),  # v2: one query view, one key view
        (MoCoModule, {"symmetric": True}, True),
        (BYOLModule, {}, True),  # the loss is symmetrised over the two views
        (BarlowTwinsModule, {}, True),
    ],
)
def test_swapping_the_two_views(cls, overrides, symmetric):
    losses = []
    for order in ((0, 1), (1, 0)):
        model = calibrated_eval(build(cls, **overrides))
        make_target_differ(model)
        model.augment = ViewTransform(N, order=order)
        run_step(model, make_batch())
        losses.append(model.logged["train/loss"].detach())
    assert not torch.isclose(losses[0], torch.zeros(())), "degenerate loss"
    if symmetric:
        torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-5)
    else:
        assert (losses[0] - losses[1]).abs() > 1e-3, losses


@pytest.mark.parametrize("cls", [SimCLRModule, MoCoModule, BarlowTwinsModule])
def test_identical_views_give_a_lower_loss_than_distinct_views(cls):
    # at construction MoCo's key encoder equals its query encoder, so with identical views every
    # positive pair has cosine 1; Barlow Twins' cross-correlation then has a unit diagonal (up to eps).
    # (BYOL is left out: its predictor makes no such promise at initialisation.)
    losses = {}
    for identical in (False, True):
        model = calibrated_eval(build(cls))
        model.augment = ViewTransform(N, identical=identical)
        run_step(model, make_batch())
        losses[identical] = model.logged["train/loss"].item()
    assert losses[True] < losses[False] - 1e-3, losses


@pytest.mark.parametrize("cls", [SimCLRModule, MoCoModule, BYOLModule, BarlowTwinsModule])
def test_online_probe_sends_no_gradient_into_the_encoder(cls):
    # the probe is the only part of the step that reads the labels: changing them must leave
    # every encoder gradient unchanged and change the probe's
    gradients = []
    for offset in (0, 1):
        model = build(cls)  # train mode: the probe's features are computed as in training
        run_step(model, make_batch(labels_offset=offset))
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert set(gradients[0]) == set(gradients[1])
    for name, grad in gradients[0].items():
        if name.startswith("online_probe."):
            assert not torch.allclose(grad, gradients[1][name]), name
        else:
            torch.testing.assert_close(grad, gradients[1][name], msg=f"{name} depends on the probe labels")
    assert any(name.startswith("backbone.") for name in gradients[0])


# -- momentum networks: the EMA of the online trajectory --------------------------------
def tiny_data(**overrides) -> SyntheticDataModule:
    settings = dict(
        num_classes=4, channels=1, image_size=8, train_per_class=8, labels_per_class=2, batch_size=8
    )
    settings.update(overrides)
    return SyntheticDataModule(**settings)


def sgd(params):
    return torch.optim.SGD(params, lr=0.5)  # large steps: the online network moves visibly


class Trajectory(L.Callback):
    """Online and target states (parameters and buffers) before training and after every step."""

    def __init__(self, online: list[str], target: list[str]) -> None:
        self.online, self.target = online, target
        self.states: list[dict] = []
        self.target_grads: list[bool] = []

    def snapshot(self, module: nn.Module) -> None:
        self.states.append(
            {
                name: (
                    [p.detach().clone() for p in getattr(module, name).parameters()],
                    [b.detach().clone() for b in getattr(module, name).buffers()],
                )
                for name in self.online + self.target
            }
            | {"step": module.global_step, "pointer": int(getattr(module, "queue_pointer", torch.tensor(-1)))}
        )

    def on_train_start(self, trainer, pl_module) -> None:
        self.snapshot(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.target_grads.append(
            any(p.grad is not None for name in self.target for p in getattr(pl_module, name).parameters())
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.snapshot(pl_module)


@pytest.mark.parametrize(
    "cls, online, target",
    [
        (MoCoModule, ["backbone", "projector"], ["momentum_backbone", "momentum_projector"]),
        (BYOLModule, ["backbone", "projector"], ["target_backbone", "target_projector"]),
    ],
)
def test_momentum_network_follows_the_ema_of_the_online_trajectory(cls, online, target):
    """After optimizer step k (k = 0, 1, ...; the online network then at theta_{k+1}):
    xi_{k+1} = tau_k xi_k + (1 - tau_k) theta_{k+1}, buffers copied, with
    tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 (BYOL's schedule, k the optimizer steps
    done before this one, K the planned total). Once per step, after the step."""
    L.seed_everything(0)
    base, steps, batch = 0.5, 4, 8
    data = tiny_data()
    model = cls(
        num_classes=4,
        channels=1,
        image_size=8,
        mean=data.mean,
        std=data.std,
        horizontal_flip=False,
        **SMALL,
        base_momentum=base,
        optimizer=sgd,
        **({"queue_size": 16} if cls is MoCoModule else {}),
    )
    recorder = Trajectory(online, target)
    tiny_trainer(max_steps=steps, callbacks=[recorder]).fit(model, datamodule=data)

    assert len(recorder.states) == steps + 1 and recorder.target_grads == [False] * steps
    for network in target:
        assert all(not p.requires_grad for p in getattr(model, network).parameters())
    for k in range(steps):
        before, after = recorder.states[k], recorder.states[k + 1]
        assert after["step"] == k + 1
        tau = 1 - (1 - base) * (math.cos(math.pi * k / steps) + 1) / 2
        for online_name, target_name in zip(online, target):
            theta, online_buffers = after[online_name]
            xi_before, _ = before[target_name]
            xi_after, target_buffers = after[target_name]
            assert not all(torch.equal(a, b) for a, b in zip(theta, before[online_name][0])), (
                "online did not move"
            )
            for x_new, x_old, t in zip(xi_after, xi_before, theta):
                torch.testing.assert_close(x_new, tau * x_old + (1 - tau) * t, atol=1e-6, rtol=1e-5)
            for b_target, b_online in zip(target_buffers, online_buffers):
                torch.testing.assert_close(
                    b_target, b_online, msg=f"{target_name} buffers not copied at step {k}"
                )
        assert after[online[0]][1], "no BatchNorm buffers to check"  # running statistics, moved in train mode
        if cls is MoCoModule:
            assert after["pointer"] == (before["pointer"] + batch) % 16
    # the target is a different network from the online one by the end
    final = recorder.states[-1]
    assert not all(torch.allclose(x, t) for x, t in zip(final[target[0]][0], final[online[0]][0]))
    if cls is MoCoModule:
        torch.testing.assert_close(model.queue.norm(dim=1), torch.ones(16))


# -- evaluation: the online backbone ------------------------------------------------------
@pytest.mark.parametrize("cls", [MoCoModule, BYOLModule])
def test_evaluated_encoder_is_the_online_backbone(cls, monkeypatch):
    """``SelfSupervisedModule``: ``self.backbone`` is what is kept; ``test/acc`` is the offline
    linear probe fitted on its eval-mode features of the labeled split."""
    L.seed_everything(0)
    data = tiny_data(train_per_class=12, test_per_class=6)
    model = cls(
        num_classes=4,
        channels=1,
        image_size=8,
        mean=data.mean,
        std=data.std,
        horizontal_flip=False,
        **SMALL,
    )
    make_target_differ(model)
    with torch.no_grad():  # an online probe that always says class 0, unlike the offline one
        model.online_probe.weight.zero_()
        model.online_probe.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))

    fitted = {}
    original = self_supervised.fit_linear_probe

    def recording_fit(features, labels, **kwargs):
        fitted["probe"] = original(features, labels, **kwargs)
        fitted["features"], fitted["labels"] = features.clone(), labels.clone()
        return fitted["probe"]

    monkeypatch.setattr(self_supervised, "fit_linear_probe", recording_fit)
    result = tiny_trainer().test(model, datamodule=data, verbose=False)[0]

    model.eval()
    labeled_images, labeled_targets = data.train_dataset.__getitems__(data.labeled_indices.tolist())
    with torch.no_grad():
        online_features = model.backbone(normalize(labeled_images.float() / 255))
        target_features = target_networks(model)[0](normalize(labeled_images.float() / 255))
        assert not torch.allclose(online_features, target_features, atol=1e-3)
        torch.testing.assert_close(fitted["features"], online_features)
        assert torch.equal(fitted["labels"], labeled_targets)
        test_images, test_targets = data.test_dataset.images, data.test_dataset.targets
        logits = fitted["probe"](model.backbone(normalize(test_images.float() / 255)))
        expected = (logits.argmax(1) == test_targets).float().mean().item()
    assert result["test/acc"] == pytest.approx(expected, abs=1e-6)
    assert result["test/online_acc"] == pytest.approx(0.25, abs=1e-6)
    assert abs(expected - 0.25) > 0.05  # so the two probes are told apart
