"""Training throughput, side by side in one run: the library's GPU path vs the usual pipeline vs the limit.

For FixMatch (WRN-28-2, labeled batch 64, mu 7, 32 px RGB: 64 + 448 images a step, 960 views
through the network) and SimCLR (ResNet-18 with the small-image stem, batch 512: 1024 views),
three ways to feed the same model:

  (a) ``library``: the library's module under the Lightning ``Trainer``, its training split
      resident on the device as uint8 (``ssl_modules.accel.DeviceResidentDataModule``) and
      augmented there in batches (kornia + the batched RandAugment/Cutout/views of
      ``ssl_modules.augment``), with ``CudaSpeedups`` on CUDA;
  (b) ``usual``: the same module's ``training_step`` fed the usual way: torchvision per-image
      transforms in DataLoader worker processes from PIL images (FixMatch: flip + reflect-pad
      crop for the weak view, + RandAugment with a random magnitude per image, 2 ops, + Cutout
      for the strong one, one loader for the labeled and one for the unlabeled images with
      ``--workers`` workers each, as FixMatch-pytorch and USB do; SimCLR: the two-view
      torchvision pipeline of ``benchmarks/simclr_throughput.py`` on uint8 tensors);
  (c) ``limit``: the same ``training_step`` on views that are ready on the device: forward,
      backward, optimizer step (and FixMatch's EMA update), nothing else.

(b) and (c) run in a plain loop (no Trainer), so (a)/(c) charges the library with both its
augmentation and the Trainer's overhead. Repetitions of the variants are interleaved (a load
change on a shared machine hits all alike) and medians are reported: images/s (the labeled +
unlabeled images of a step; SimCLR: the batch), steps/s, the ratio to (c) (the median of the
ratios within each repetition, robust to a load that drifts on a shared machine), the share of
the step spent in augmentation ((a): the batched augmentation timed alone, over the step time;
(b): the time the step waits for the loader beyond the limit, ``1 - rate_b / rate_c``), peak memory (CUDA: per variant; CPU:
the process's peak RSS, worker processes not counted) and, for FixMatch, the projected time of
the paper's 2^20 steps.

    OMP_NUM_THREADS=2 python benchmarks/throughput.py --small --device cpu      # CPU, a few minutes
    python benchmarks/throughput.py --workers 2 8 --out results/               # GPU, full size

``--small`` shrinks the sizes for a CPU (FixMatch: WRN-28-2 at 32 px, batch 8, mu 2; SimCLR:
ResNet-18 at 16 px, batch 16, projection 128 wide): the ratios, not the absolute numbers, are
what a CPU run shows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simclr_throughput import ReadyViews, TwoViewDataset  # noqa: E402

from datamodules.base import InMemoryDataset, SemiSupervisedDataModule  # noqa: E402
from ssl_modules import FixMatchModule, SimCLRModule  # noqa: E402
from ssl_modules.accel import CudaSpeedups, DeviceResidentDataModule  # noqa: E402
from ssl_modules.augment import to_float_images  # noqa: E402
from ssl_modules.augment.views import make_views  # noqa: E402
from ssl_modules.batch import train_batch  # noqa: E402

PAPER_STEPS = 2**20
FULL = {
    "fixmatch": {"backbone": "wrn_28_2", "batch_size": 64, "mu": 7, "image_size": 32, "num_classes": 10},
    "simclr": {
        "backbone": "resnet18",
        "batch_size": 512,
        "image_size": 32,
        "num_classes": 10,
        "hidden": 2048,
    },
}
SMALL = {
    "fixmatch": {"backbone": "wrn_28_2", "batch_size": 8, "mu": 2, "image_size": 32, "num_classes": 10},
    "simclr": {"backbone": "resnet18", "batch_size": 16, "image_size": 16, "num_classes": 10, "hidden": 128},
}
TINY = {  # for the tests and gpu_check's self-test: seconds, not a measurement
    "fixmatch": {"backbone": "small_cnn", "batch_size": 2, "mu": 2, "image_size": 8, "num_classes": 4},
    "simclr": {"backbone": "small_cnn", "batch_size": 4, "image_size": 8, "num_classes": 4, "hidden": 16},
}
CHANNELS = 3


# -- data ----------------------------------------------------------------------------------
class RandomImagesDataModule(SemiSupervisedDataModule):
    """Seeded random uint8 RGB images with balanced labels: the real loader path, no dataset files."""

    def __init__(self, num_images: int, num_classes: int, image_size: int, **kwargs: Any) -> None:
        super().__init__(labels_per_class=4, val_size=0, **kwargs)
        self.num_classes = num_classes
        self.channels = CHANNELS
        self.image_size = image_size
        self.mean = (0.5,) * CHANNELS
        self.std = (0.25,) * CHANNELS
        self.num_images = num_images

    def load_split(self, name: str) -> Dataset | None:
        if name not in ("train", "test"):
            return None
        generator = torch.Generator().manual_seed(0 if name == "train" else 1)
        count = self.num_images if name == "train" else 2 * self.num_classes
        shape = (count, CHANNELS, self.image_size, self.image_size)
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        return InMemoryDataset(images, torch.arange(count) % self.num_classes)


def make_datamodule(method: str, cfg: dict) -> RandomImagesDataModule:
    per_step = cfg["batch_size"] * cfg.get("mu", 1)
    return RandomImagesDataModule(
        num_images=max(4 * per_step, 64),
        num_classes=cfg["num_classes"],
        image_size=cfg["image_size"],
        batch_size=cfg["batch_size"],
        unlabeled_batch_ratio=cfg.get("mu", 1),
    )


class Cutout:
    """FixMatch's Cutout on one float image: a gray square of side U(0, 0.5) x the image side."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _, height, width = image.shape
        side = int(random.uniform(0, 0.5) * min(height, width))
        y, x = random.randrange(height), random.randrange(width)
        image = image.clone()
        image[:, max(0, y - side // 2) : y + (side + 1) // 2, max(0, x - side // 2) : x + (side + 1) // 2] = (
            0.5
        )
        return image


class RandomMagnitudeRandAugment(T.RandAugment):
    """torchvision's RandAugment with FixMatch's random magnitude: a new one for every image."""

    def forward(self, *inputs: Any) -> Any:
        self.magnitude = random.randint(1, self.num_magnitude_bins - 1)
        return super().forward(*inputs)


def fixmatch_transforms(image_size: int) -> tuple[Callable, Callable]:
    """The usual per-image weak and strong FixMatch transforms, PIL in, float tensor in [0, 1] out."""
    to_tensor = [T.ToImage(), T.ToDtype(torch.float32, scale=True)]
    crop = T.RandomCrop(image_size, padding=int(0.125 * image_size), padding_mode="reflect")
    weak = T.Compose([T.RandomHorizontalFlip(), crop, *to_tensor])
    strong = T.Compose(
        [T.RandomHorizontalFlip(), crop, RandomMagnitudeRandAugment(num_ops=2), *to_tensor, Cutout()]
    )
    return weak, strong


class UsualFixMatchDataset(Dataset):
    """Per-image PIL pipeline: labeled -> (weak, label); unlabeled -> (weak, strong)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, unlabeled: bool) -> None:
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C) uint8, as PIL wants
        self.labels = labels
        self.unlabeled = unlabeled
        self.weak, self.strong = fixmatch_transforms(images.shape[-1])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = Image.fromarray(self.images[index])
        if self.unlabeled:
            return self.weak(image), self.strong(image)
        return self.weak(image), self.labels[index]


def endless_loader(dataset: Dataset, batch_size: int, workers: int, pin: bool) -> DataLoader:
    sampler = RandomSampler(dataset, replacement=True, num_samples=10**8)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True, pin_memory=pin
    )


# -- stand-ins for the augmentation ----------------------------------------------------------
class Feed(nn.Module):
    """Stands in for an augmentation module: returns the next prepared view, checking its shape."""

    def __init__(self) -> None:
        super().__init__()
        self.queue: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        view = self.queue.pop(0)
        if view.shape != images.shape:
            raise ValueError(
                f"prepared view {tuple(view.shape)} does not match the batch {tuple(images.shape)}"
            )
        return view


# -- timing ------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Wall time of steps ``warmup + 1 .. warmup + steps`` (each: fetch, augment, forward, backward, step)."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.start = self.end = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in (self.warmup, self.warmup + self.steps):
            synchronize(pl_module.device)
            now = time.perf_counter()
            if trainer.global_step == self.warmup:
                self.start = now
            else:
                self.end = now


def library_fit_rate(
    model: L.LightningModule,
    datamodule: Any,
    device: torch.device,
    warmup: int,
    steps: int,
    precision: str = "32-true",
    callbacks: tuple[L.Callback, ...] = (),
) -> float:
    """Steps/s of ``steps`` timed steps after ``warmup`` of ``model`` fitted by a bare Trainer
    (no logger, checkpoints, progress bar or validation) on ``datamodule``'s training split
    resident on the device (``DeviceResidentDataModule``)."""
    timer = StepTimer(warmup, steps)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer, *callbacks],
    )
    trainer.fit(model, datamodule=DeviceResidentDataModule(datamodule))
    return steps / (timer.end - timer.start)


def timed_rate(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    """Steps/s of ``step()`` called ``steps`` times after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps / (time.perf_counter() - start)


def quiet_lightning() -> None:
    """No warnings, and only Lightning's errors: a benchmark prints its own table."""
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def write_results(out: str | Path, stem: str, result: dict, table: str) -> None:
    """``<out>/<stem>.json`` (the result) and ``<out>/<stem>.md`` (its table)."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (folder / f"{stem}.md").write_text(table)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


class Bench:
    """One method's model, data and the three ways to feed it."""

    def __init__(self, method: str, cfg: dict, device: torch.device, args: argparse.Namespace) -> None:
        self.method, self.cfg, self.device, self.args = method, cfg, device, args
        torch.manual_seed(0)
        size = cfg["image_size"]
        facts = dict(num_classes=cfg["num_classes"], channels=CHANNELS, image_size=size)
        if method == "fixmatch":
            self.model = FixMatchModule(**facts, backbone=cfg["backbone"])
            self.augmentations = {"weak": self.model.weak, "strong": self.model.strong}
        else:
            self.model = SimCLRModule(**facts, backbone=cfg["backbone"], projection_hidden_dim=cfg["hidden"])
            self.augmentations = {"augment": self.model.augment}
        self.datamodule = make_datamodule(method, cfg)
        self.datamodule.setup("fit")
        self.images_per_step = cfg["batch_size"] * cfg.get("mu", 1) + (
            cfg["batch_size"] if method == "fixmatch" else 0
        )
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16 if "bf16" in args.precision else torch.float16)
            if device.type == "cuda" and "mixed" in args.precision
            else contextlib.nullcontext()
        )
        if device.type == "cuda" and args.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if args.compile:
            self.model.backbone.compile()
        self.ready = self._ready_views()
        self.loaders: dict[int, tuple[DataLoader, ...]] = {}

    # the views of one step, ready on the device (for (c))
    def _ready_views(self) -> dict[str, torch.Tensor]:
        cfg, size = self.cfg, self.cfg["image_size"]
        generator = torch.Generator().manual_seed(1)

        def rand(n: int) -> torch.Tensor:
            return torch.rand(n, CHANNELS, size, size, generator=generator).to(self.device)

        labels = torch.randint(0, cfg["num_classes"], (cfg["batch_size"],), generator=generator).to(
            self.device
        )
        if self.method == "fixmatch":
            unlabeled = cfg["batch_size"] * cfg["mu"]
            return {
                "weak_l": rand(cfg["batch_size"]),
                "weak_u": rand(unlabeled),
                "strong_u": rand(unlabeled),
                "y": labels,
            }
        return {
            "x": rand(cfg["batch_size"]),
            "v1": rand(cfg["batch_size"]),
            "v2": rand(cfg["batch_size"]),
            "y": labels,
        }

    def _set_augmentations(self, modules: dict[str, nn.Module]) -> None:
        for name, module in modules.items():
            setattr(self.model, name, module)

    # -- (a) ----------------------------------------------------------------------------------
    def run_library(self, steps: int) -> float:
        self._set_augmentations(self.augmentations)
        return library_fit_rate(
            self.model,
            self.datamodule,
            self.device,
            self.args.warmup,
            steps,
            precision=self.args.precision if self.device.type == "cuda" else "32-true",
            callbacks=(CudaSpeedups(channels_last=self.args.channels_last),),
        )

    # -- (b) and (c): a plain loop over training_step -----------------------------------------------
    def _plain_setup(self) -> tuple[torch.optim.Optimizer, Feed]:
        self.model.trainer = None  # detached from the last Trainer: a plain loop, self.log is a no-op
        self.model.to(self.device).train()
        optimizers = self.model.configure_optimizers()
        optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
        feed: nn.Module = Feed() if self.method == "fixmatch" else ReadyViews()
        names = ("weak", "strong") if self.method == "fixmatch" else ("augment",)
        self._set_augmentations(dict.fromkeys(names, feed))
        return optimizer, feed

    def _plain_step(self, optimizer: torch.optim.Optimizer, batch: dict) -> None:
        with self.autocast:
            loss = self.model.training_step(batch, 1)  # batch_idx 1: no step-0 image grid
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if self.method == "fixmatch":
            self.model.ema_model.ema_from(
                self.model.backbone, self.model.classifier, self.model.hparams.ema_decay
            )

    def _fixmatch_batch(self, feed: Feed, weak_l, y, weak_u, strong_u) -> dict:
        feed.queue = [weak_l, weak_u, strong_u]
        return train_batch(weak_l, y, weak_u)  # hidden labels unknown (-1)

    def _simclr_batch(self, feed: ReadyViews, x, y, v1, v2) -> dict:
        feed.views = [v1, v2]
        return train_batch(x, y, x)

    def _timed_loop(
        self, steps: int, next_batch: Callable[[], dict], optimizer: torch.optim.Optimizer
    ) -> float:
        return timed_rate(
            lambda: self._plain_step(optimizer, next_batch()), self.args.warmup, steps, self.device
        )

    def run_limit(self, steps: int) -> float:
        optimizer, feed = self._plain_setup()
        r = self.ready
        if self.method == "fixmatch":
            return self._timed_loop(
                steps,
                lambda: self._fixmatch_batch(feed, r["weak_l"], r["y"], r["weak_u"], r["strong_u"]),
                optimizer,
            )
        return self._timed_loop(
            steps, lambda: self._simclr_batch(feed, r["x"], r["y"], r["v1"], r["v2"]), optimizer
        )

    def _usual_loaders(self, workers: int) -> tuple[DataLoader, ...]:
        data, cfg = self.datamodule, self.cfg
        images, targets = data.train_dataset.images, data.train_dataset.targets
        pin = self.device.type == "cuda"
        if self.method == "fixmatch":
            labeled = UsualFixMatchDataset(images[data.labeled_indices], targets[data.labeled_indices], False)
            unlabeled = UsualFixMatchDataset(images, targets, True)
            return (
                endless_loader(labeled, cfg["batch_size"], workers, pin),
                endless_loader(unlabeled, cfg["batch_size"] * cfg["mu"], workers, pin),
            )
        return (endless_loader(TwoViewDataset(images, cfg["image_size"]), cfg["batch_size"], workers, pin),)

    def run_usual(self, steps: int, workers: int) -> float:
        optimizer, feed = self._plain_setup()
        # fresh iterators (and worker processes) every repetition, shut down afterwards: idle
        # workers must neither run ahead during the other variants nor take their CPU
        iterators = [iter(loader) for loader in self._usual_loaders(workers)]
        device = self.device

        def to_device(tensors) -> list[torch.Tensor]:
            return [t.to(device, non_blocking=True) for t in tensors]

        def next_batch() -> dict:
            if self.method == "fixmatch":
                weak_l, y = to_device(next(iterators[0]))
                weak_u, strong_u = to_device(next(iterators[1]))
                return self._fixmatch_batch(feed, weak_l, y, weak_u, strong_u)
            v1, v2 = to_device(next(iterators[0]))
            return self._simclr_batch(feed, v1, self.ready["y"], v1, v2)

        try:
            return self._timed_loop(steps, next_batch, optimizer)
        finally:
            iterators.clear()

    # -- augmentation alone ------------------------------------------------------------------------
    def run_augmentation_only(self, steps: int) -> float:
        """Steps/s of (a)'s batched augmentation alone, on one step's uint8 images on the device."""
        batch = DeviceResidentDataModule(self.datamodule, device=str(self.device)).train_dataloader().batch(0)
        labeled = to_float_images(batch["labeled"].images)
        unlabeled = to_float_images(batch["unlabeled"].images)
        for module in self.augmentations.values():
            module.to(self.device)

        def step() -> None:
            with torch.no_grad():
                if self.method == "fixmatch":
                    self.augmentations["weak"](labeled)
                    self.augmentations["weak"](unlabeled)
                    self.augmentations["strong"](unlabeled)
                else:
                    make_views(unlabeled, self.augmentations["augment"], 2)

        for _ in range(self.args.warmup):
            step()
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(self.device)
        return steps / (time.perf_counter() - start)


def run_method(method: str, cfg: dict, device: torch.device, args: argparse.Namespace) -> dict:
    bench = Bench(method, cfg, device, args)
    variants: dict[str, Callable[[], float]] = {"a_library": lambda: bench.run_library(args.steps)}
    for workers in args.workers:
        variants[f"b_usual_{workers}w"] = lambda w=workers: bench.run_usual(args.steps, w)
    variants["c_limit"] = lambda: bench.run_limit(args.steps)
    variants["augmentation_only"] = lambda: bench.run_augmentation_only(args.steps)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    peaks: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for repeat in range(args.repeats):
        # rotate the order every repetition: no variant always runs right after the same one
        for name in order[repeat % len(order) :] + order[: repeat % len(order)]:
            reset_peak(device)
            rates[name].append(variants[name]())
            if device.type == "cuda":
                peaks[name].append(peak_mb(device))
    steps_per_s = {name: statistics.median(values) for name, values in rates.items()}
    rows = {}
    for name, rate in steps_per_s.items():
        if name == "augmentation_only":
            continue
        # ratios paired within a repetition (the variants ran minutes apart at most), then the
        # median: robust to a load that drifts over the run on a shared machine
        ratio = statistics.median(x / c for x, c in zip(rates[name], rates["c_limit"]))
        if name == "a_library":
            aug_share = statistics.median(x / g for x, g in zip(rates[name], rates["augmentation_only"]))
        elif name.startswith("b_usual"):
            aug_share = max(0.0, 1 - ratio)
        else:
            aug_share = 0.0
        row = {
            "steps_per_s": round(rate, 4),
            "images_per_s": round(rate * bench.images_per_step, 1),
            "ratio_to_limit": round(ratio, 3),
            "augmentation_share": round(aug_share, 3),
            "peak_memory_mb": round(max(peaks[name]), 1) if peaks[name] else None,
            "repetitions_steps_per_s": [round(v, 4) for v in rates[name]],
        }
        if method == "fixmatch":
            row["projected_hours_2^20_steps"] = round(PAPER_STEPS / rate / 3600, 1)
        rows[name] = row
    return {
        "config": {**cfg, "channels": CHANNELS, "images_per_step": bench.images_per_step},
        "augmentation_ms_per_step": round(1000 / steps_per_s["augmentation_only"], 2),
        "variants": rows,
    }


def to_markdown(result: dict) -> str:
    """One table: a row per (method, variant)."""
    env = result["environment"]
    lines = [
        f"Throughput on {env['device_name']} ({env['device']}, torch {env['torch']}, {env['torch_threads']} threads, "
        f"precision {env['precision']}, {env['steps']} timed steps x {env['repeats']} interleaved repetitions, medians; "
        f"sizes: {env['sizes']}).",
        "",
        "| method | variant | images/s | steps/s | ratio to (c) | augmentation share | peak MB | 2^20 steps (h) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, block in result["methods"].items():
        for name, row in block["variants"].items():
            peak = row["peak_memory_mb"] if row["peak_memory_mb"] is not None else "-"
            hours = row.get("projected_hours_2^20_steps", "-")
            lines.append(
                f"| {method} | {name} | {row['images_per_s']} | {row['steps_per_s']} | {row['ratio_to_limit']} | "
                f"{row['augmentation_share']:.1%} | {peak} | {hours} |"
            )
    if result.get("peak_rss_mb") is not None:
        lines += [
            "",
            f"Peak RSS of the benchmark process: {result['peak_rss_mb']:.0f} MB (DataLoader workers not counted).",
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    parser.add_argument(
        "--methods", nargs="+", default=["fixmatch", "simclr"], choices=["fixmatch", "simclr"]
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="CPU sizes (see the docstring)")
    size.add_argument(
        "--tiny", action="store_true", help="seconds-long smoke sizes (tests), not a measurement"
    )
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[2], help="DataLoader workers of (b), one row each"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repetition")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each timed run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of every variant")
    parser.add_argument(
        "--precision", default="bf16-mixed", help="CUDA only: bf16-mixed, 16-mixed or 32-true"
    )
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="CUDA only")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone (every variant)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as OMP_NUM_THREADS sets)")
    parser.add_argument("--out", default=None, help="folder for throughput.json and throughput.md")
    return parser.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(args: argparse.Namespace) -> dict:
    quiet_lightning()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sizes = TINY if args.tiny else SMALL if args.small else FULL
    result = {
        "environment": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "precision": args.precision if device.type == "cuda" else "32-true",
            "channels_last": bool(args.channels_last and device.type == "cuda"),
            "compile_backbone": args.compile,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "workers": args.workers,
            "sizes": "tiny" if args.tiny else "small" if args.small else "full",
        },
        "methods": {method: run_method(method, sizes[method], device, args) for method in args.methods},
    }
    if device.type == "cpu":
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    table = to_markdown(result)
    print(table)
    if args.out:
        write_results(args.out, "throughput", result, table)
    return result


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    main()
