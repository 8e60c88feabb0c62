"""SimCLR training throughput on this machine: where should augmentation run?

Measures ``train_samples_per_s`` (images per second through a full SimCLR training step:
two views, forward, NT-Xent, backward, optimizer step) in one process, for

  (a) batched on-device augmentation with kornia (the library's design);
  (b) per-image torchvision transforms in DataLoader worker processes (the common alternative);
  (c) forward + backward alone on ready-made views (the limit: no augmentation cost at all).

All three run the same ``SimCLRModule.training_step``; only where the views come from differs.
Repetitions of the three are interleaved, so a load change on a shared machine hits all of
them alike; the medians over repetitions and the ratios to (c) are printed (and written as JSON
with ``--out``).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/simclr_throughput.py            # < 2 minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
import torchvision.transforms.v2 as T
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ssl_modules import SimCLRModule
from ssl_modules.augment import to_float_images
from ssl_modules.augment.views import simclr_views


class ReadyViews(nn.Module):
    """Stands in for the augmentation: returns the given views.

    ``make_views`` calls the augmentation once on the batch repeated ``num_views`` times, so
    this returns all views concatenated (returning only the first view would halve the work of
    the step and inflate the "limit" twofold).
    """

    def __init__(self) -> None:
        super().__init__()
        self.views: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        views = torch.cat(self.views)
        if views.shape != images.shape:
            raise ValueError(f"ready views {tuple(views.shape)} do not match the batch {tuple(images.shape)}")
        return views


class TwoViewDataset(Dataset):
    """uint8 images -> two per-image torchvision views each (the DataLoader-worker pipeline)."""

    def __init__(self, images: torch.Tensor, image_size: int, jitter_strength: float = 0.5) -> None:
        self.images = images
        s = jitter_strength
        ops = [T.RandomResizedCrop(image_size, scale=(0.08, 1.0), antialias=True), T.RandomHorizontalFlip()]
        if images.shape[1] == 3:
            ops += [
                T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
                T.RandomGrayscale(0.2),
            ]
        else:
            ops += [T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s)], p=0.8)]
        self.transform = T.Compose([*ops, T.ToDtype(torch.float32, scale=True)])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        return self.transform(image), self.transform(image)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per repetition")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions of each variant")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of variant (b)")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: leave as set by OMP_NUM_THREADS)"
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    size, channels, batch = args.image_size, args.channels, args.batch_size
    images = (torch.rand(batch * (args.steps + 1), channels, size, size) * 255).to(torch.uint8)
    labels = torch.randint(0, 10, (len(images),))
    model = SimCLRModule(
        channels=channels,
        image_size=size,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        backbone=args.backbone,
        projection_hidden_dim=512,
    )
    optimizer = model.default_optimizer(None)
    kornia_views = simclr_views(channels, size, horizontal_flip=True)
    ready = ReadyViews()
    loader = DataLoader(
        TwoViewDataset(images, size),
        batch_size=batch,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        drop_last=True,
    )
    loader_iter = iter(loader)
    ready_a = to_float_images(images[:batch]).clone()
    ready_b = ready_a.flip(-1).clone()

    def train_step(step: int, views: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        x = to_float_images(images[step * batch : (step + 1) * batch])
        if views is None:
            model.augment = kornia_views
        else:
            model.augment = ready
            ready.views = list(views)
        loss = model.training_step((x, labels[:batch]), step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def next_loader_views() -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal loader_iter
        try:
            return next(loader_iter)
        except StopIteration:
            loader_iter = iter(loader)
            return next(loader_iter)

    variants = {
        "a_kornia_batched": lambda step: train_step(step, None),
        "b_torchvision_workers": lambda step: train_step(step, next_loader_views()),
        "c_ready_tensors_limit": lambda step: train_step(step, (ready_a, ready_b)),
    }
    model.train()
    for run in variants.values():  # warm-up: workers start, kernels are chosen
        run(0)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            for step in range(args.steps):
                run(step)
            rates[name].append(args.steps * batch / (time.perf_counter() - start))

    limit = statistics.median(rates["c_ready_tensors_limit"])
    result = {
        "batch_size": batch,
        "image_size": size,
        "channels": channels,
        "backbone": args.backbone,
        "torch_threads": torch.get_num_threads(),
        "workers": args.workers,
        "train_samples_per_s": {name: round(statistics.median(values), 1) for name, values in rates.items()},
        "all_repetitions": {name: [round(v, 1) for v in values] for name, values in rates.items()},
    }
    result["ratio_to_limit"] = {
        name: round(value / limit, 3) for name, value in result["train_samples_per_s"].items()
    }
    print(json.dumps(result, indent=2))
    a = result["ratio_to_limit"]["a_kornia_batched"]
    print(f"kornia batched augmentation runs at {a:.0%} of the limit (target >= 90%)")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
