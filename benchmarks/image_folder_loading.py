"""Image-folder loading: decode every epoch (before) vs decode once into a cache (after).

Writes a folder of ``--images`` grayscale PNGs (``--size`` px, 10 classes) and, with
``num_workers=0`` (the loader runs in the training process, as on a laptop), measures:

- ``setup``: the one-time cost of ``ImageFolderDataModule.setup`` (listing, the up-front check
  of every file, and for the caches the decode into memory / a memory-mapped ``.npy``);
- ``loader``: ms per training step spent drawing the batches a method gets, alone (no model):
  the labeled batch of ``--batch-size`` and, where the method gets one, the unlabeled batch of
  ``--batch-size x --mu``; batches/s of the labeled loader;
- ``step``: ms per training step of a Lightning fit (steady state, after ``--warmup`` steps),
  loader included, for ``SupervisedModule`` and ``FixMatchModule`` with their default backbone;
  ``share``: loader / step, the part of a step spent reading images.

"before" is ``cache="none"`` (every batch decodes, converts and resizes its files) and, for
``SupervisedModule``, the unlabeled loader it was handed and never used (``uses_unlabeled``
forced on); "after" is ``cache="memory"`` / ``"disk"`` and ``SupervisedModule`` as shipped.

    OMP_NUM_THREADS=1 python benchmarks/image_folder_loading.py [--images 2000] [--steps 30] [--mu 7]

A benchmark, not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch

import datamodules.image_folder as image_folder
from datamodules import ImageFolderDataModule
from ssl_modules import FixMatchModule, SupervisedModule


def write_folder(root: Path, images: int, size: int, classes: int = 10, seed: int = 0) -> Path:
    """``images`` grayscale PNGs in ``root/train/<class>/``: a blurred class pattern plus noise,
    sides a few pixels either way of ``size`` (so they are resized, as real files are)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 256, (classes, 4, 4)).astype(np.float64)
    for index in range(images):
        label = index % classes
        height, width = size + int(rng.integers(0, 5)), size + int(rng.integers(0, 5))
        base = np.kron(patterns[label], np.ones((height // 4 + 1, width // 4 + 1)))[:height, :width]
        pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
        path = root / "train" / f"class{label}" / f"{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "L").save(path)
    return root


def make_data(args: argparse.Namespace, cache: str) -> ImageFolderDataModule:
    return ImageFolderDataModule(
        root=str(args.root),
        image_size=args.size,
        channels=1,
        horizontal_flip=False,
        labels_per_class=args.labels_per_class,
        batch_size=args.batch_size,
        unlabeled_batch_ratio=args.mu,
        num_workers=0,
        cache=cache,
        cache_dir=str(args.cache_dir),
    )


def timed_setup(args: argparse.Namespace, cache: str) -> tuple[ImageFolderDataModule, float]:
    image_folder._IN_PROCESS.clear()  # as a fresh process: nothing decoded in memory yet
    image_folder._CHECKED.clear()
    data = make_data(args, cache)
    start = time.perf_counter()
    data.setup("fit")
    return data, time.perf_counter() - start


def loader_ms_per_step(data: ImageFolderDataModule, steps: int, unlabeled: bool, repeats: int) -> float:
    """ms per step to draw a step's batches (cycling each loader as Lightning does); the median
    of ``repeats`` timings after one untimed pass."""
    loaders = data.train_dataloader()
    parts = [loaders["labeled"]] + ([loaders["unlabeled"]] if unlabeled else [])
    timings = []
    for _ in range(repeats + 1):
        iterators = [iter(loader) for loader in parts]
        start = time.perf_counter()
        for _ in range(steps):
            for i, loader in enumerate(parts):
                try:
                    next(iterators[i])
                except StopIteration:
                    iterators[i] = iter(loader)
                    next(iterators[i])
        timings.append(1e3 * (time.perf_counter() - start) / steps)
    return statistics.median(timings[1:])


class StepClock(L.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())


def fit_ms_per_step(args: argparse.Namespace, data: ImageFolderDataModule, method: type, uses: bool) -> float:
    torch.manual_seed(0)
    model = method(
        num_classes=data.num_classes,
        channels=data.channels,
        image_size=data.image_size,
        mean=data.mean,
        std=data.std,
        horizontal_flip=data.horizontal_flip,
    )
    model.uses_unlabeled = uses
    clock = StepClock()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[clock],
    )
    trainer.fit(model, datamodule=data)
    # step k's interval: from its batch_start to the next one (the next batch's fetch included)
    intervals = np.diff(clock.starts)[args.warmup :]
    return 1e3 * float(statistics.median(intervals))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mu", type=int, default=1, help="unlabeled_batch_ratio (configs/data/*: 1)")
    parser.add_argument("--labels-per-class", type=int, default=25)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="loader timings, median")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--root", type=Path, default=None, help="reuse a folder (default: a new one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as scratch:
        args.cache_dir = Path(scratch) / "cache"
        if args.root is None:
            args.root = write_folder(Path(scratch) / "folder", args.images, args.size)
        run(args)


def run(args: argparse.Namespace) -> None:
    steps = args.warmup + args.steps
    print(
        f"{args.images} PNGs, {args.size} px grayscale, labeled batch {args.batch_size}, "
        f"unlabeled batch {args.batch_size * args.mu} (mu {args.mu}), num_workers 0, "
        f"torch threads {torch.get_num_threads()}\n"
    )
    loader_ms: dict[tuple[str, bool], float] = {}
    print("| cache | setup (s) | labeled batches/s | loader ms/step, labeled only | labeled + unlabeled |")
    print("|---|---|---|---|---|")
    for cache in ("none", "memory", "disk"):
        data, setup_s = timed_setup(args, cache)
        labeled = loader_ms_per_step(data, steps, unlabeled=False, repeats=args.repeats)
        both = loader_ms_per_step(data, steps, unlabeled=True, repeats=args.repeats)
        loader_ms[(cache, False)], loader_ms[(cache, True)] = labeled, both
        print(f"| {cache} | {setup_s:.2f} | {1e3 / labeled:.0f} | {labeled:.2f} | {both:.2f} |")
    print()
    cases = [
        ("SupervisedModule", SupervisedModule, "none", True, "before: decode every epoch, unlabeled pulled"),
        ("SupervisedModule", SupervisedModule, "memory", False, "after: cached, no unlabeled loader"),
        ("FixMatchModule", FixMatchModule, "none", True, "before: decode every epoch"),
        ("FixMatchModule", FixMatchModule, "memory", True, "after: cached in memory"),
    ]
    print("| method | loading | loader ms/step | step ms (fit) | loader share of step |")
    print("|---|---|---|---|---|")
    for name, method, cache, uses, label in cases:
        data, _ = timed_setup(args, cache)
        step = fit_ms_per_step(args, data, method, uses)
        loader = loader_ms[(cache, uses)]
        print(f"| {name} | {label} | {loader:.2f} | {step:.1f} | {100 * loader / step:.0f} % |")


if __name__ == "__main__":
    main()
