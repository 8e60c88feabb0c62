"""DDP correctness: two training steps on a global batch split over 2 ranks (gloo, CPU) give the
same gradients, and then the same parameters and buffers, as the whole batch in one process,
for every joint-embedding method: SimCLR (NT-Xent gathers both views with gradients), Barlow
Twins (gathers both views' embeddings with gradients), MoCo v2 and its symmetric variant
(enqueues the keys of every rank) and BYOL (no gather: a per-sample mean).

The real modules' ``training_step`` and ``optimizer_step`` (paper optimizer, then the momentum
update of MoCo/BYOL) run on both sides, with two changes that remove what legitimately
differs between a split and an unsplit batch:

- the modules are in **eval mode**, so BatchNorm uses its running statistics (a per-sample
  function) instead of per-rank batch statistics — the batch-level statistics under test are
  the ones the losses compute themselves (NT-Xent's negatives, Barlow Twins' standardisation
  and cross-correlation, MoCo's queue), which must be global;
- the random augmentation is replaced by a fixed per-image transform that depends on the view
  index, so both sides see the same views and the two views of an image are **distinct**
  (with identical views, gathering the views in swapped order, or one view twice, would go
  unnoticed).

The ranks' gradients are averaged with ``all_reduce`` exactly as DDP does. Control runs with the
gather switched off must *not* match, so the test can fail.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_modules import BarlowTwinsModule, BYOLModule, MoCoModule, SimCLRModule
from ssl_modules.augment.views import make_views
from ssl_modules.batch import train_batch

pytestmark = pytest.mark.filterwarnings("ignore:.*self.trainer. reference is not registered")

WORLD_SIZE = 2
GLOBAL_BATCH = 8
STEPS = 2
METHODS = ["simclr", "moco", "moco_symmetric", "byol", "barlow_twins"]
CONTROLS = ["simclr_without_gather", "barlow_twins_without_gather"]


def view_transform(images: torch.Tensor, view: int) -> torch.Tensor:
    """View 0: the image; view 1: mirrored, dimmed and lifted. Per image, so a split batch gets the same views."""
    return images.flip(-1) * 0.8 + 0.1 if view else images


class DistinctViews(torch.nn.Module):
    """Replaces ``model.augment``: the k-th block of ``batch_size`` rows it sees in a step is view k
    (``make_views`` calls it once on the batch repeated per view; a method calling it once per
    view gets the same)."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.blocks = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            out.append(view_transform(images[start : start + self.batch_size], self.blocks))
            self.blocks += 1
        return torch.cat(out)


def build(method: str, batch_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    facts = dict(num_classes=3, channels=1, image_size=12, mean=(0.5,), std=(0.25,), horizontal_flip=False)
    small = dict(projection_hidden_dim=16, projection_dim=8)
    if method.startswith("simclr"):
        model = SimCLRModule(**facts, **small)
        model.criterion.gather_distributed = method == "simclr"
    elif method.startswith("moco"):
        model = MoCoModule(
            **facts, **small, queue_size=16, base_momentum=0.5, symmetric=method == "moco_symmetric"
        )
    elif method == "byol":
        # one view pipeline (self.augment), which DistinctViews replaces below
        model = BYOLModule(**facts, **small, base_momentum=0.5, asymmetric_views=False)
    else:
        model = BarlowTwinsModule(**facts, **small)
        model.criterion.gather_distributed = method == "barlow_twins"
    model.augment = DistinctViews(batch_size)
    return model.eval()


def global_batch(step: int) -> dict:
    generator = torch.Generator().manual_seed(123 + step)
    images = torch.rand(GLOBAL_BATCH, 1, 12, 12, generator=generator)
    labeled = torch.rand(GLOBAL_BATCH, 1, 12, 12, generator=generator)
    labels = torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator)
    return train_batch(labeled, labels, images)  # index 0 .. GLOBAL_BATCH - 1, hidden labels -1


def slice_batch(batch: dict, rank: int, world_size: int) -> dict:
    size = GLOBAL_BATCH // world_size
    part = slice(rank * size, (rank + 1) * size)
    # each rank keeps its rows' fields, index included (the images' positions in the global batch)
    return {key: type(named)(*(tensor[part] for tensor in named)) for key, named in batch.items()}


def train(method: str, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """STEPS steps of the module on this rank's part of each global batch. Returns the first
    step's (rank-averaged) gradients as ``grad:<name>`` and the final state as ``state:<name>``."""
    model = build(method, GLOBAL_BATCH // world_size)
    optimizer = model.default_optimizer(None)  # the paper optimizer (LARS or SGD)
    result = {}
    for step in range(STEPS):
        model.augment.blocks = 0
        loss = model.training_step(slice_batch(global_batch(step), rank, world_size), step)
        loss.backward()
        for name, p in model.named_parameters():
            if p.grad is not None and world_size > 1:
                dist.all_reduce(p.grad)  # DDP: average the gradients over ranks
                p.grad /= world_size
            if step == 0 and p.grad is not None:
                result[f"grad:{name}"] = p.grad.clone()
        model.optimizer_step(0, step, optimizer, None)  # the step, then MoCo/BYOL's momentum update
        optimizer.zero_grad(set_to_none=True)
    result.update({f"state:{name}": value.clone() for name, value in model.state_dict().items()})
    return result


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        for method in METHODS + CONTROLS:
            result = train(method, rank, WORLD_SIZE)
            torch.save(result, os.path.join(out_dir, f"{method}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results():
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        mp.spawn(_worker, args=(init_file, out_dir), nprocs=WORLD_SIZE, join=True)
        yield {
            (method, rank): torch.load(os.path.join(out_dir, f"{method}-rank{rank}.pt"))
            for method in METHODS + CONTROLS
            for rank in range(WORLD_SIZE)
        }


def test_the_two_views_differ():
    model = build("simclr", GLOBAL_BATCH)
    images = global_batch(0)["unlabeled"].images
    view_a, view_b = make_views(images, model.augment)
    assert (view_a - view_b).abs().mean() > 0.05
    torch.testing.assert_close(view_a, images)


@pytest.mark.parametrize("method", METHODS)
def test_split_batch_step_equals_whole_batch_step(method, distributed_results):
    torch.set_num_threads(1)
    single = train(method, rank=0, world_size=1)
    for rank in range(WORLD_SIZE):
        split = distributed_results[(method, rank)]
        assert set(single) == set(split)
        for name, expected in single.items():
            if expected.is_floating_point():
                scale = max(1.0, expected.abs().max().item())
                worst = (split[name] - expected).abs().max().item()
                assert worst <= 1e-5 * scale, f"{method} rank {rank}: {name} differs by {worst:.2e}"
            else:
                assert torch.equal(split[name], expected), f"{method} rank {rank}: {name}"
    grads = [name for name in single if name.startswith("grad:")]
    assert any(name.startswith("grad:backbone.") for name in grads)  # the encoder is part of the check
    # the parameters moved: the comparison after the steps is not the initialisation's
    initial = build(method, GLOBAL_BATCH).state_dict()
    assert not torch.equal(single["state:backbone.features.0.weight"], initial["backbone.features.0.weight"])
    if method.startswith("moco"):  # the queue holds every rank's keys, in rank order
        assert int(single["state:queue_pointer"]) == STEPS * GLOBAL_BATCH % 16


@pytest.mark.parametrize(
    "control, method", [("simclr_without_gather", "simclr"), ("barlow_twins_without_gather", "barlow_twins")]
)
def test_without_the_gather_the_gradients_differ(control, method, distributed_results):
    # control: each rank's own batch only (SimCLR: own negatives; Barlow Twins: own statistics) is a different loss
    single = train(method, rank=0, world_size=1)
    split = distributed_results[(control, 0)]
    worst = max(
        (split[name] - single[name]).abs().max().item() for name in single if name.startswith("grad:")
    )
    assert worst > 1e-4
