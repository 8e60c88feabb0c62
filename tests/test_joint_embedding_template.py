"""The joint-embedding template (``ssl_modules.self_supervised.joint_embedding``).

- SimCLR, MoCo v2, BYOL and Barlow Twins moved onto the template with unchanged results: the
  losses of 3 training steps and a fingerprint of the state_dict after 3 optimizer steps of a
  tiny deterministic fit equal the numbers recorded with the code *before* the move
  (``RECORDED``: produced by the pre-refactor modules with the same fit, script
  ``/tmp/je_before.py`` of the refactoring session; bitwise equal there, on torch 2.14 with
  1 thread) -> ``test_refactor_keeps_the_recorded_results``;
- their parameter and buffer names are unchanged, so old checkpoints load
  -> ``test_state_dict_names_are_unchanged``;
- the backbone runs once per resolution, whatever the number of views
  -> ``test_backbone_runs_once_per_resolution``;
- every declared (online, target) pair is updated once per optimizer step, after it, with the
  momentum of the step, and nothing else is -> ``test_momentum_pairs_follow_the_ema_after_each_step``;
- the named heads: the presets keep the modules' names (above); SwAV's prototypes score cosine
  similarities against unit-norm rows -> ``test_prototypes_score_cosine_similarities``.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_modules import BarlowTwinsModule, BYOLModule, MoCoModule, SimCLRModule
from ssl_modules.batch import train_batch
from ssl_modules.ema import copy_frozen, cosine_momentum
from ssl_modules.heads import prototypes
from ssl_modules.self_supervised.joint_embedding import JointEmbeddingLoss, JointEmbeddingModule

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*self.trainer. reference is not registered"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
]

FACTS = dict(
    num_classes=3, channels=3, image_size=12, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3), horizontal_flip=True
)
SMALL = dict(projection_hidden_dim=16, projection_dim=8)
STEPS, BATCH = 3, 8
CASES = {
    "SimCLRModule": (SimCLRModule, {}),
    "MoCoModule": (MoCoModule, {"queue_size": 8, "base_momentum": 0.9}),
    # asymmetric_views False: the views the pinned (pre-template) numbers were recorded with
    "BYOLModule": (BYOLModule, {"base_momentum": 0.9, "asymmetric_views": False}),
    # bias_lr_ratio 1.0: the optimizer the pinned (pre-template) numbers were recorded with
    "BarlowTwinsModule": (BarlowTwinsModule, {"redundancy_weight": 0.02, "bias_lr_ratio": 1.0}),
    "SimCLRModule-3views": (SimCLRModule, {"num_views": 3}),
    "MoCoModule-symmetric": (MoCoModule, {"queue_size": 8, "base_momentum": 0.9, "symmetric": True}),
}

# Recorded with the modules as they were BEFORE they moved onto the template (each wrote its own
# training_step/optimizer_step), by the fit in ``fit_and_record`` below. "losses": train/loss of
# steps 1-3; "totals": the returned loss (+ online probe); the sums run over every floating
# state_dict entry after 3 optimizer steps ("weighted_sum" weights element i by i % 7 + 1, so a
# permutation shows). Never regenerate these from the current code: they are the reference.
RECORDED = {
    "SimCLRModule": {
        "losses": [2.7889132499694824, 2.6545486450195312, 2.7711379528045654],
        "totals": [3.928060293197632, 4.041164398193359, 3.97739577293396],
        "sum": 346.2552329408165,
        "abs_sum": 2117.289766682513,
        "weighted_sum": 1360.9534325764432,
    },
    "MoCoModule": {
        "losses": [0.41514408588409424, 2.173673152923584, 2.1029083728790283],
        "totals": [1.5542911291122437, 3.2901666164398193, 3.2090871334075928],
        "sum": 636.0588641140396,
        "abs_sum": 4184.3078514978915,
        "weighted_sum": 2501.3163720919656,
    },
    "BYOLModule": {
        "losses": [2.3366377353668213, 0.7141846418380737, 0.7796972990036011],
        "totals": [3.4757847785949707, 1.9812945127487183, 1.8762775659561157],
        "sum": 721.0217991111144,
        "abs_sum": 4296.609631722321,
        "weighted_sum": 2811.678248817441,
    },
    "BarlowTwinsModule": {
        "losses": [9.441014289855957, 15.274636268615723, 9.326114654541016],
        "totals": [10.580161094665527, 16.567272186279297, 10.550087928771973],
        "sum": 377.137925952914,
        "abs_sum": 2265.1162553106724,
        "weighted_sum": 1438.389209948614,
    },
    "SimCLRModule-3views": {
        "losses": [2.7568161487579346, 2.661954641342163, 2.691889762878418],
        "totals": [3.895963191986084, 4.047036170959473, 3.9016408920288086],
        "sum": 346.2894860104327,
        "abs_sum": 2115.941288577834,
        "weighted_sum": 1361.7486121062684,
    },
    "MoCoModule-symmetric": {
        "losses": [0.42667365074157715, 2.1697182655334473, 2.110973834991455],
        "totals": [1.5658206939697266, 3.285475492477417, 3.2192625999450684],
        "sum": 592.3408799628844,
        "abs_sum": 4152.305247807539,
        "weighted_sum": 2329.4730183844467,
    },
}

# state_dict names and shapes of the pre-refactor modules (SMALL heads, small_cnn on 3 channels)
SMALL_CNN = {
    **{f"features.{i}.weight": shape for i, shape in [(0, [32, 3, 3, 3]), (3, [32, 32, 3, 3])]},
    **{f"features.{i}.weight": shape for i, shape in [(7, [64, 32, 3, 3]), (11, [64, 64, 3, 3])]},
    **{
        f"features.{i}.{name}": [width] if name != "num_batches_tracked" else []
        for i, width in [(1, 32), (4, 32), (8, 64), (12, 64)]
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    },
}
BATCH_NORM_16 = {name: [16] for name in ("weight", "bias", "running_mean", "running_var")}
BATCH_NORM_16["num_batches_tracked"] = []
PROJECTOR_BN = {  # Linear(64, 16, no bias) -> BN -> ReLU -> Linear(16, 8)
    "layers.0.weight": [16, 64],
    **{f"layers.1.{name}": shape for name, shape in BATCH_NORM_16.items()},
    "layers.3.weight": [8, 16],
    "layers.3.bias": [8],
}
PROBE = {"online_probe.weight": [3, 64], "online_probe.bias": [3]}


def prefixed(prefix: str, names: dict) -> dict:
    return {f"{prefix}.{name}": shape for name, shape in names.items()}


MOCO_PROJECTOR = {
    "layers.0.weight": [16, 64],
    "layers.0.bias": [16],
    "layers.2.weight": [8, 16],
    "layers.2.bias": [8],
}
EXPECTED_NAMES = {
    "SimCLRModule": {**prefixed("backbone", SMALL_CNN), **PROBE, **prefixed("projector", PROJECTOR_BN)},
    "MoCoModule": {
        **prefixed("backbone", SMALL_CNN),
        **prefixed("momentum_backbone", SMALL_CNN),
        **PROBE,
        **prefixed("projector", MOCO_PROJECTOR),
        **prefixed("momentum_projector", MOCO_PROJECTOR),
        "queue": [8, 8],
        "queue_pointer": [],
    },
    "BYOLModule": {
        **prefixed("backbone", SMALL_CNN),
        **prefixed("target_backbone", SMALL_CNN),
        **PROBE,
        **prefixed("projector", PROJECTOR_BN),
        **prefixed("target_projector", PROJECTOR_BN),
        "predictor.layers.0.weight": [16, 8],
        **prefixed("predictor.layers.1", BATCH_NORM_16),
        "predictor.layers.3.weight": [8, 16],
        "predictor.layers.3.bias": [8],
    },
    "BarlowTwinsModule": {
        **prefixed("backbone", SMALL_CNN),
        **PROBE,
        "projector.layers.0.weight": [16, 64],
        **prefixed("projector.layers.1", BATCH_NORM_16),
        "projector.layers.3.weight": [16, 16],
        **prefixed("projector.layers.4", BATCH_NORM_16),
        "projector.layers.6.weight": [8, 16],
        "projector.layers.6.bias": [8],
    },
}


def fixed_batches(channels: int = 3, size: int = 12) -> list[dict]:
    generator = torch.Generator().manual_seed(123)
    batches = []
    for _ in range(STEPS):
        labeled = torch.randint(0, 256, (BATCH, channels, size, size), generator=generator, dtype=torch.uint8)
        labels = torch.randint(0, 3, (BATCH,), generator=generator)
        unlabeled = torch.randint(
            0, 256, (BATCH, channels, size, size), generator=generator, dtype=torch.uint8
        )
        hidden = torch.randint(0, 3, (BATCH,), generator=generator)
        batches.append(train_batch(labeled, labels, unlabeled, hidden))
    return batches


def make_trainer(callbacks: list[L.Callback], max_steps: int = STEPS) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def loader(batches: list[dict]) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.totals: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.totals.append(float(outputs["loss"]))
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def fit_and_record(cls: type, kwargs: dict) -> dict:
    L.seed_everything(0, verbose=False)
    model = cls(**FACTS, **SMALL, **kwargs)
    recorder = Recorder()
    trainer = make_trainer([recorder])
    trainer.fit(model, train_dataloaders=loader(fixed_batches()))
    assert trainer.global_step == STEPS
    total = absolute = weighted = 0.0
    for key in sorted(model.state_dict()):
        value = model.state_dict()[key]
        if value.is_floating_point():
            flat = value.detach().double().flatten()
            total += float(flat.sum())
            absolute += float(flat.abs().sum())
            weighted += float((flat * (torch.arange(len(flat), dtype=torch.float64) % 7 + 1)).sum())
    return {
        "losses": recorder.losses,
        "totals": recorder.totals,
        "sum": total,
        "abs_sum": absolute,
        "weighted_sum": weighted,
    }


@pytest.fixture
def one_thread():
    """The recorded numbers were made with 1 thread; float sums in another order (2 threads)
    differ by up to ~1e-5 relative in Barlow Twins' loss."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", list(CASES))
def test_refactor_keeps_the_recorded_results(case: str, one_thread) -> None:
    cls, kwargs = CASES[case]
    result = fit_and_record(cls, kwargs)
    expected = RECORDED[case]
    # bitwise equal on the recording machine; the tolerance only absorbs another CPU's kernels
    assert result["losses"] == pytest.approx(expected["losses"], rel=1e-5, abs=1e-6)
    assert result["totals"] == pytest.approx(expected["totals"], rel=1e-5, abs=1e-6)
    for key in ("sum", "abs_sum", "weighted_sum"):
        assert result[key] == pytest.approx(expected[key], rel=1e-6), key


@pytest.mark.parametrize("name", list(EXPECTED_NAMES))
def test_state_dict_names_are_unchanged(name: str) -> None:
    cls, kwargs = CASES[name]
    model = cls(**FACTS, **SMALL, **kwargs)
    names = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert names == EXPECTED_NAMES[name]
    # an old checkpoint's state_dict loads strictly into the new module
    model.load_state_dict(
        {key: torch.zeros(shape) for key, shape in EXPECTED_NAMES[name].items()}, strict=True
    )


# -- the template's own behaviour ---------------------------------------------------------
class TwoSizeViews(JointEmbeddingModule):
    """A toy method with multi-crop-like views: 2 views at the image size, 3 at half of it
    (each view a deterministic transform, so features can be checked view by view)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.projector = nn.Linear(self.backbone.num_features, 4)

    def make_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        small = F.interpolate(images, scale_factor=0.5, mode="bilinear", align_corners=False)
        return [images, images.flip(-1), small, small.flip(-1), 1 - small]

    def joint_embedding_loss(self, views, features) -> JointEmbeddingLoss:
        z = [self.projector(feature) for feature in features]
        loss = sum(F.mse_loss(z[0], other) for other in z[1:])
        return JointEmbeddingLoss(loss, z[0], z[1])


def test_backbone_runs_once_per_resolution() -> None:
    torch.manual_seed(0)
    model = TwoSizeViews(**FACTS).eval()  # eval: BatchNorm is per-sample, so per-view calls compare
    calls: list[tuple[int, ...]] = []
    model.backbone.register_forward_hook(lambda module, inputs, output: calls.append(tuple(inputs[0].shape)))
    images = torch.rand(BATCH, 3, 12, 12)
    views = model.make_views(images)
    features = model.encode(views)
    assert calls == [
        (2 * BATCH, 3, 12, 12),
        (3 * BATCH, 3, 6, 6),
    ]  # one call per size, views of a size together
    with torch.no_grad():
        for view, feature in zip(views, features):
            torch.testing.assert_close(feature, model.backbone(model.normalize(view)))

    # the whole step runs with views of two sizes: finite loss, the probe added
    model.train()
    model.log = lambda *args, **kwargs: None
    batch = train_batch(images, torch.randint(0, 3, (BATCH,)), torch.rand(BATCH, 3, 12, 12))
    calls.clear()
    loss = model.training_step(batch, 0)
    assert math.isfinite(float(loss.detach()))
    assert calls[:2] == [(2 * BATCH, 3, 12, 12), (3 * BATCH, 3, 6, 6)]  # then the probe's labeled batch
    assert calls[2:] == [(BATCH, 3, 12, 12)]


class WithTarget(JointEmbeddingModule):
    """A toy method with one declared (online, target) pair and one frozen module that is *not*
    declared (it must never move)."""

    def __init__(self, *, base_momentum: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.projector = nn.Linear(self.backbone.num_features, 4)
        self.target_projector = copy_frozen(self.projector)
        self.undeclared = copy_frozen(self.projector)
        self.augment = nn.Identity()

    def momentum_pairs(self):
        return [(self.projector, self.target_projector)]

    def joint_embedding_loss(self, views, features) -> JointEmbeddingLoss:
        z_a = self.projector(features[0])
        with torch.no_grad():
            z_b = self.target_projector(features[1])
        return JointEmbeddingLoss(F.mse_loss(z_a, z_b), z_a, z_b)


def test_momentum_pairs_follow_the_ema_after_each_step() -> None:
    torch.manual_seed(0)
    base = 0.5
    model = WithTarget(**FACTS, base_momentum=base)
    with torch.no_grad():  # start the target away from the online module
        for parameter in model.target_projector.parameters():
            parameter.add_(1.0)
    undeclared = [p.clone() for p in model.undeclared.parameters()]
    steps = []

    class Track(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            steps.append({"target": [p.clone() for p in pl_module.target_projector.parameters()]})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            steps[-1]["online"] = [p.clone() for p in pl_module.projector.parameters()]
            steps[-1]["target_after"] = [p.clone() for p in pl_module.target_projector.parameters()]

    trainer = make_trainer([Track()])
    trainer.fit(model, train_dataloaders=loader(fixed_batches()))
    total = trainer.estimated_stepping_batches
    assert len(steps) == STEPS
    for k, step in enumerate(steps):
        # after optimizer step k (global_step k while it runs): target = m_k target + (1 - m_k) online
        momentum = cosine_momentum(k, total, base)
        assert momentum < 1
        for before, online, after in zip(step["target"], step["online"], step["target_after"]):
            torch.testing.assert_close(after, momentum * before + (1 - momentum) * online)
    for before, after in zip(undeclared, model.undeclared.parameters()):
        assert torch.equal(before, after)


def test_prototypes_score_cosine_similarities() -> None:
    """SwAV's prototypes: unit-norm rows (again after ``normalize_``), scores = cosine similarities."""
    torch.manual_seed(0)
    head = prototypes(6, num_prototypes=5)
    assert head.layer.bias is None
    torch.testing.assert_close(head.layer.weight.norm(dim=1), torch.ones(5))
    with torch.no_grad():
        head.layer.weight.mul_(3.0)  # an optimizer step moves them off the sphere ...
    head.normalize_()  # ... and SwAV puts them back
    torch.testing.assert_close(head.layer.weight.norm(dim=1), torch.ones(5))
    features = torch.randn(4, 6) * 10
    expected = torch.stack(
        [torch.stack([F.cosine_similarity(f, c, dim=0) for c in head.layer.weight]) for f in features]
    )
    torch.testing.assert_close(head(features), expected)
    with pytest.raises(ValueError, match="num_prototypes"):
        prototypes(6, num_prototypes=0)
