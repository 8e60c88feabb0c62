"""DDP correctness: one step on a global batch split over 2 ranks (gloo, CPU) gives the same
gradient as the whole batch in one process, for SimCLR, MoCo and Barlow Twins.

The real modules' ``training_step`` runs on both sides, with two changes that remove what
legitimately differs between a split and an unsplit batch:

- the modules are in **eval mode**, so BatchNorm uses its running statistics (a per-sample
  function) instead of per-rank batch statistics — the batch-level statistics under test are
  the ones the losses compute themselves (NT-Xent's negatives, Barlow Twins' standardisation
  and cross-correlation), which must be global;
- the random augmentation is replaced by a fixed per-image transform, so both sides see the
  same views.

The ranks' gradients are averaged with ``all_reduce`` exactly as DDP does. A control run with
the gather switched off must *not* match, so the test can fail.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_modules import BarlowTwinsModule, MoCoModule, SimCLRModule

pytestmark = pytest.mark.filterwarnings("ignore:.*self.trainer. reference is not registered")

WORLD_SIZE = 2
GLOBAL_BATCH = 8
METHODS = ["simclr", "moco", "barlow_twins", "simclr_without_gather"]


class FixedViews(torch.nn.Module):
    """Deterministic per-image 'augmentation': alternately the image and a brightened mirror of it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return images if self.calls % 2 else (images.flip(-1) * 0.8 + 0.1)


def build(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    facts = dict(num_classes=3, channels=1, image_size=12, mean=(0.5,), std=(0.25,), horizontal_flip=False)
    if method.startswith("simclr"):
        model = SimCLRModule(**facts, projection_hidden_dim=16, projection_dim=8)
        model.criterion.gather_distributed = method == "simclr"
    elif method == "moco":
        model = MoCoModule(**facts, projection_hidden_dim=16, projection_dim=8, queue_size=16, symmetric=True)
    else:
        model = BarlowTwinsModule(**facts, projection_hidden_dim=16, projection_dim=8)
    model.augment = FixedViews()
    return model.eval()


def global_batch() -> dict:
    generator = torch.Generator().manual_seed(123)
    images = torch.rand(GLOBAL_BATCH, 1, 12, 12, generator=generator)
    labeled = torch.rand(GLOBAL_BATCH, 1, 12, 12, generator=generator)
    labels = torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator)
    return {"labeled": (labeled, labels), "unlabeled": (images, torch.full((GLOBAL_BATCH,), -1))}


def slice_batch(batch: dict, rank: int, world_size: int) -> dict:
    size = GLOBAL_BATCH // world_size
    part = slice(rank * size, (rank + 1) * size)
    return {key: tuple(tensor[part] for tensor in pair) for key, pair in batch.items()}


def one_step(method: str, batch: dict) -> dict[str, torch.Tensor]:
    model = build(method)
    loss = model.training_step(batch, 0)
    loss.backward()
    result = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    if method == "moco":
        result["buffer:queue"] = model.queue.clone()
        result["buffer:queue_pointer"] = model.queue_pointer.clone()
    return result


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        for method in METHODS:
            result = one_step(method, slice_batch(global_batch(), rank, WORLD_SIZE))
            for name, value in result.items():
                if not name.startswith("buffer:"):
                    dist.all_reduce(value)  # DDP: average the gradients over ranks
                    value /= WORLD_SIZE
            if rank == 0:
                torch.save(result, os.path.join(out_dir, f"{method}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results():
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        mp.spawn(_worker, args=(init_file, out_dir), nprocs=WORLD_SIZE, join=True)
        yield {method: torch.load(os.path.join(out_dir, f"{method}.pt")) for method in METHODS}


@pytest.mark.parametrize("method", ["simclr", "moco", "barlow_twins"])
def test_split_batch_gradient_equals_whole_batch_gradient(method, distributed_results):
    torch.set_num_threads(1)
    single = one_step(method, global_batch())
    split = distributed_results[method]
    assert set(single) == set(split)
    for name, expected in single.items():
        assert torch.allclose(split[name], expected, atol=1e-5, rtol=1e-4), (
            f"{method}: {name} differs by {(split[name] - expected).abs().max().item():.2e}"
        )
    assert any(name.startswith("backbone.") for name in single)  # the encoder is part of the check


def test_without_the_gather_the_gradients_differ(distributed_results):
    # control: SimCLR with only each rank's own negatives is a different loss
    single = one_step("simclr", global_batch())
    split = distributed_results["simclr_without_gather"]
    worst = max((split[name] - single[name]).abs().max().item() for name in single)
    assert worst > 1e-4
