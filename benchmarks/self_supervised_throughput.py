"""Self-supervised training throughput against its limit, side by side in one run.

For each method, its config as it is (``configs/<method>.yaml``: backbone, heads, crops,
optimizer), two ways to run the same module's training step:

  (a) ``library``: the module under the Lightning ``Trainer``, the training split resident on
      the device as uint8 (``DeviceResidentDataModule``), the views made there in batches
      (``make_views``: two views, or multi-crop's global and local crops; MAE: its crop), the
      online probe, logging, the method's hooks (DINO's and SwAV's frozen last layer /
      prototypes, the momentum update of the targets, the prototypes' normalisation);
  (c) ``limit``: the same ``training_step``, ``on_after_backward`` and ``optimizer_step`` in a
      plain loop (no Trainer) on views that are already on the device (one step's views, made
      once): forward, backward, the optimizer step and the method's own updates, nothing else.

``train_samples_per_s`` is the images of a step (the batch) per second; the ratio (a)/(c) is
the median of the ratios within each interleaved repetition (robust to a load that drifts on a
shared machine). (a) pays for the augmentation and the Trainer; the issue's bar is (a)/(c) >= 0.9.

    OMP_NUM_THREADS=1 python benchmarks/self_supervised_throughput.py --out benchmarks/results
    python benchmarks/self_supervised_throughput.py --methods dino mae --device cuda --batch-size 256

Sizes: RGB images at ``--image-size`` (32), batch ``--batch-size`` (64), the labeled batch of
the online probe as large (the self-supervised datamodules' default ``unlabeled_batch_ratio`` 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import (  # noqa: E402
    CHANNELS,
    RandomImagesDataModule,
    library_fit_rate,
    quiet_lightning,
    resolve_device,
    timed_rate,
    write_results,
)

import ssl_modules  # noqa: E402
from ssl_modules.accel import DeviceResidentDataModule  # noqa: E402
from ssl_modules.augment import to_float_images  # noqa: E402
from ssl_modules.batch import train_batch  # noqa: E402
from ssl_modules.self_supervised.joint_embedding import JointEmbeddingModule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("simclr", "moco", "byol", "barlow_twins", "vicreg", "simsiam", "dino", "swav", "mae")
NUM_CLASSES = 10


def build_module(method: str, image_size: int, overrides: dict[str, Any]) -> L.LightningModule:
    """The method's module from ``configs/<method>.yaml`` (its init_args as they are), for RGB
    images of ``image_size``. The class is looked up in ``ssl_modules`` by its name, never
    imported from an arbitrary path."""
    config = yaml.safe_load((ROOT / "configs" / f"{method}.yaml").read_text())["model"]
    class_name = config["class_path"].rsplit(".", 1)[-1]
    cls = getattr(ssl_modules, class_name)
    init_args = {**config.get("init_args", {}), **overrides}
    return cls(num_classes=NUM_CLASSES, channels=CHANNELS, image_size=image_size, **init_args)


class ReadyImage(nn.Module):
    """Stands in for MAE's crop: returns the prepared view, checking its shape."""

    def __init__(self, view: torch.Tensor) -> None:
        super().__init__()
        self.view = view

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape != self.view.shape:
            raise ValueError(
                f"ready view {tuple(self.view.shape)} does not match the batch {tuple(images.shape)}"
            )
        return self.view


class Bench:
    """One method's module, its data, and the two ways to run it."""

    def __init__(self, method: str, device: torch.device, args: argparse.Namespace) -> None:
        self.method, self.device, self.args = method, device, args
        torch.manual_seed(0)
        overrides = {"backbone": args.backbone} if args.backbone and method != "mae" else {}
        self.model = build_module(method, args.image_size, overrides)
        self.datamodule = RandomImagesDataModule(
            num_images=max(4 * args.batch_size, 64),
            num_classes=NUM_CLASSES,
            image_size=args.image_size,
            batch_size=args.batch_size,
            unlabeled_batch_ratio=1,
        )
        self.datamodule.setup("fit")
        self.images_per_step = args.batch_size  # the unlabeled batch the views are made from
        self.ready = self._ready_step()

    def _ready_step(self) -> dict[str, Any]:
        """One step's inputs on the device: the labeled batch (float), its labels, the views."""
        self.model.to(self.device)
        batch = DeviceResidentDataModule(self.datamodule, device=str(self.device)).train_dataloader().batch(0)
        labeled = to_float_images(batch["labeled"].images)
        unlabeled = to_float_images(batch["unlabeled"].images)
        with torch.no_grad():
            if isinstance(self.model, JointEmbeddingModule):
                views: Any = [view.detach() for view in self.model.make_views(unlabeled)]
            else:  # MAE: one crop of each image
                views = self.model.augment(unlabeled).detach()
        return {"labeled": labeled, "labels": batch["labeled"].labels, "unlabeled": unlabeled, "views": views}

    # -- (a) ------------------------------------------------------------------------------------
    def run_library(self, steps: int) -> float:
        return library_fit_rate(self.model, self.datamodule, self.device, self.args.warmup, steps)

    # -- (c) ------------------------------------------------------------------------------------
    def run_limit(self, steps: int) -> float:
        model, ready = self.model, self.ready
        model.trainer = None  # detached from the last Trainer: a plain loop, self.log is a no-op
        model.to(self.device).train()
        optimizers = model.configure_optimizers()
        optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
        # the views are ready: the augmentation is replaced by returning them (instance attributes,
        # removed afterwards, so (a) runs the real augmentation again)
        augment = getattr(model, "augment", None)
        if isinstance(model, JointEmbeddingModule):
            model.make_views = lambda images: list(ready["views"])
        else:
            model.augment = ReadyImage(ready["views"])

        def restore() -> None:
            if isinstance(model, JointEmbeddingModule):
                del model.make_views
            else:
                model.augment = augment

        batch = train_batch(ready["labeled"], ready["labels"], ready["unlabeled"])

        def one_step() -> None:
            def closure() -> torch.Tensor:
                loss = model.training_step(batch, 1)  # batch_idx 1: no first-step image grids
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                model.on_after_backward()
                return loss

            # the module's own optimizer_step: the optimizer step, then the method's updates
            # (momentum targets, DINO's weight decay schedule, SwAV's prototype normalisation)
            model.optimizer_step(0, 1, optimizer, closure)

        try:
            return timed_rate(one_step, self.args.warmup, steps, self.device)
        finally:
            restore()


def run_method(method: str, device: torch.device, args: argparse.Namespace) -> dict:
    bench = Bench(method, device, args)
    variants: dict[str, Callable[[], float]] = {
        "a_library": lambda: bench.run_library(args.steps),
        "c_limit": lambda: bench.run_limit(args.steps),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for repeat in range(args.repeats):
        for name in order[repeat % len(order) :] + order[: repeat % len(order)]:  # alternate the order
            rates[name].append(variants[name]())
    ratios = [a / c for a, c in zip(rates["a_library"], rates["c_limit"])]
    views = bench.ready["views"]
    shapes = [list(v.shape) for v in views] if isinstance(views, list) else [list(views.shape)]
    return {
        "class": type(bench.model).__name__,
        "backbone": bench.model.hparams.get("backbone"),
        "views": shapes,
        "train_samples_per_s": {
            name: round(statistics.median(values) * bench.images_per_step, 1)
            for name, values in rates.items()
        },
        "ratio_to_limit": round(statistics.median(ratios), 3),
        "ratios_per_repetition": [round(r, 3) for r in ratios],
        "repetitions_steps_per_s": {name: [round(v, 4) for v in values] for name, values in rates.items()},
    }


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"Self-supervised throughput on {env['device']} (torch {env['torch']}, {env['torch_threads']} threads; "
        f"RGB {env['image_size']} px, batch {env['batch_size']}; {env['steps']} timed steps x {env['repeats']} "
        "interleaved repetitions, medians).",
        "",
        "| method | backbone | views | library samples/s | limit samples/s | library / limit |",
        "|---|---|---|---:|---:|---:|",
    ]
    for method, row in result["methods"].items():
        sizes: dict[int, int] = {}
        for shape in row["views"]:
            sizes[shape[-1]] = sizes.get(shape[-1], 0) + 1
        views = " + ".join(f"{count}x{size}px" for size, count in sizes.items())
        rates = row["train_samples_per_s"]
        lines.append(
            f"| {method} | {row['backbone']} | {views} | {rates['a_library']} | {rates['c_limit']} | "
            f"{row['ratio_to_limit']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--backbone", default=None, help="override the joint-embedding configs' backbone (MAE keeps its ViT)"
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repetition")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each timed run")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions of both variants")
    parser.add_argument("--out", default=None, help="folder for self_supervised_throughput.{json,md}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    quiet_lightning()
    device = resolve_device(args.device)
    result = {
        "environment": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
        },
        "methods": {},
    }
    for method in args.methods:
        result["methods"][method] = run_method(method, device, args)
        print(f"{method}: {result['methods'][method]['ratio_to_limit']}", flush=True)
    table = to_markdown(result)
    print(table)
    if args.out:
        write_results(args.out, "self_supervised_throughput", result, table)
    return result


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    main()
