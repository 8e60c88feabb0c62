"""The supervised baseline vs a plain PyTorch loop, side by side, per label budget and image size.

A semi-supervised gain is only as real as the baseline it is measured against (Oliver et al.,
2018, "Realistic Evaluation of Deep Semi-Supervised Learning Algorithms",
https://arxiv.org/abs/1804.09170). This script trains, in one run and on the same data:

(a) ``library``: ``SupervisedModule`` built exactly as ``configs/supervised.yaml`` builds it (its
    ``class_path`` and ``init_args``, the data facts linked from the datamodule), under the
    Lightning ``Trainer`` with the real ``DigitsDataModule`` (labeled + unlabeled loaders).
(b) ``plain``: a plain PyTorch loop a practitioner would write, fixed before any measurement
    and never tuned: the same ``small_cnn`` backbone + linear classifier, the same labeled
    images (``datamodule.labeled_indices``), batches of ``--batch-size`` drawn by reshuffling
    the (repeated) labeled set every pass, AdamW at lr 1e-3 with PyTorch's default weight
    decay (0.01), constant lr, random shifts of up to 12.5 % of the side with zero padding,
    inputs standardised with the data's mean/std.

Both train for the same ``--steps``; the seed sets ``seed_everything`` and draws the labeled
split (``split_seed``), so both sides of a row see the same labeled images. For each (labels per
class, image size, seed) the final model is scored once on the validation split (``val_acc``,
145 images held out of train, the only number used to choose anything) and once on the test
split (``test_acc``, 359 images, reported, never used to choose). The table shows medians over
seeds and, last, each seed's paired ``val_acc`` difference (library minus plain, same split).

    OMP_NUM_THREADS=1 python benchmarks/plain_loop.py [--steps 500] [--seeds 0 1 2] \\
        [--labels 2 5 10 all] [--sizes 16 32] [--out benchmarks/results/plain_loop.json]

``--grid`` instead runs the candidate recipes of ``CANDIDATES`` for the module side (and the
plain loop, for reference) and reports ``val_acc`` only: the test split is not even evaluated.
That is how ``SupervisedModule``'s default recipe was chosen; the numbers are in
``benchmarks/results/plain_loop_grid.json`` (median ``val_acc`` over seeds 0 1, 500 steps):

    candidate                         16 px, 5 labels/class   32 px, 2 labels/class
    sgd0.03 (the former default)      0.9207                  0.7000
    sgd0.1  (chosen)                  0.9345                  0.7414
    sgd0.03-zeropad                   0.9138                  -
    adamw1e-3                         0.9241                  -
    adamw3e-3                         0.9138                  -
    adamw1e-3-zeropad                 0.9345                  0.6828
    adamw1e-3-warmup                  0.9310                  -
    adamw1e-3-ls0.1                   0.9172                  -
    plain loop                        0.9310                  0.6897

SGD lr 0.1 was best or tied best on both (the 16 px differences are one or two of the 145
validation images; the 32 px lead held on both seeds). ``--jobs N`` runs N runs at once;
``--resume`` keeps the runs already in the output file (it is rewritten after every run).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import kornia.augmentation as K
import lightning as L
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from datamodules import DigitsDataModule
from ssl_modules import SupervisedModule
from ssl_modules.backbones import build_backbone
from ssl_modules.base import WarmupCosine

ROOT = Path(__file__).resolve().parents[1]
SUPERVISED_CONFIG = ROOT / "configs" / "supervised.yaml"

# Candidate recipes for SupervisedModule's defaults (module side of ``--grid``), the ones measured
# in the docstring's table: each changes the optimizer, lr, weight decay, warm-up (fraction of
# the steps), the shift's padding, or label smoothing, relative to the former SGD lr 0.03 recipe.
CANDIDATES: dict[str, dict[str, Any]] = {
    "sgd0.03": dict(optimizer="sgd", lr=0.03, weight_decay=5e-4),  # the former default
    "sgd0.1": dict(optimizer="sgd", lr=0.1, weight_decay=5e-4),
    "sgd0.03-zeropad": dict(optimizer="sgd", lr=0.03, weight_decay=5e-4, padding_mode="constant"),
    "adamw1e-3": dict(optimizer="adamw", lr=1e-3, weight_decay=0.01),
    "adamw3e-3": dict(optimizer="adamw", lr=3e-3, weight_decay=0.01),
    "adamw1e-3-warmup": dict(optimizer="adamw", lr=1e-3, weight_decay=0.01, warmup=0.05),
    "adamw1e-3-zeropad": dict(optimizer="adamw", lr=1e-3, weight_decay=0.01, padding_mode="constant"),
    "adamw1e-3-ls0.1": dict(optimizer="adamw", lr=1e-3, weight_decay=0.01, label_smoothing=0.1),
}


def trainer_for(steps: int, fitting: bool = True) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0 if fitting else 1.0,  # no validation during fit: the final model is scored once
        num_sanity_val_steps=0,
    )


def make_data(labels_per_class: int | None, image_size: int, seed: int, batch_size: int) -> DigitsDataModule:
    data = DigitsDataModule(
        image_size=image_size, labels_per_class=labels_per_class, split_seed=seed, batch_size=batch_size
    )
    data.setup("fit")
    if data.val_dataset is None:
        raise RuntimeError("the benchmark chooses on the validation split; DigitsDataModule made none")
    return data


def data_facts(data: DigitsDataModule) -> dict[str, Any]:
    return dict(
        num_classes=data.num_classes,
        channels=data.channels,
        image_size=data.image_size,
        mean=data.mean,
        std=data.std,
        horizontal_flip=data.horizontal_flip,
    )


def library_model(data: DigitsDataModule) -> SupervisedModule:
    """``SupervisedModule`` as ``configs/supervised.yaml`` builds it (data facts linked, as the CLI does)."""
    model_config = yaml.safe_load(SUPERVISED_CONFIG.read_text())["model"]
    module_path, _, class_name = model_config["class_path"].rpartition(".")
    cls = getattr(__import__(module_path, fromlist=[class_name]), class_name)
    return cls(**model_config.get("init_args", {}), **data_facts(data))


class CandidateModule(SupervisedModule):
    """``SupervisedModule`` with one candidate recipe of ``CANDIDATES`` (for ``--grid`` only)."""

    def __init__(
        self,
        optimizer_name: str,
        warmup: float = 0.0,
        translate: float = 0.125,
        padding_mode: str = "reflect",
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.optimizer_name = optimizer_name
        self.warmup = warmup
        self.label_smoothing = label_smoothing
        size = self.image_size
        padding = max(1, int(round(translate * size)))
        self.augment = K.AugmentationSequential(
            K.RandomCrop((size, size), padding=padding, padding_mode=padding_mode)
        )

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return torch.optim.SGD(
            params, lr=self.hparams.lr, momentum=0.9, nesterov=True, weight_decay=self.hparams.weight_decay
        )

    def default_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        total = self.trainer.estimated_stepping_batches
        schedule = WarmupCosine(total, warmup_steps=int(self.warmup * total))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch["labeled"].images, batch["labeled"].labels
        logits = self(self.augment(images))
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


def candidate_model(data: DigitsDataModule, recipe: dict[str, Any]) -> CandidateModule:
    recipe = dict(recipe)
    return CandidateModule(
        optimizer_name=recipe.pop("optimizer"), backbone="small_cnn", **recipe, **data_facts(data)
    )


def run_module(
    model: SupervisedModule, data: DigitsDataModule, seed: int, steps: int, with_test: bool
) -> dict[str, Any]:
    trainer = trainer_for(steps)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    evaluator = trainer_for(steps, fitting=False)
    record = {"val_acc": float(evaluator.validate(model, datamodule=data, verbose=False)[0]["val/acc"])}
    if with_test:
        record["test_acc"] = float(evaluator.test(model, datamodule=data, verbose=False)[0]["test/acc"])
    return {**record, "steps": int(trainer.global_step), "fit_seconds": seconds}


# -- the plain loop ----------------------------------------------------------------------
def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by an independent integer offset in [-max_shift, max_shift], zero padding.

    Shape: (batch_size, channels, H, W) -> same.
    """
    batch, _, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (batch,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (batch,), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(width))[:, None, :]  # (B, 1, W)
    picked = padded.permute(0, 2, 3, 1)[torch.arange(batch)[:, None, None], rows, cols]  # (B, H, W, C)
    return picked.permute(0, 3, 1, 2).contiguous()


def split_tensors(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8, labels) of an ``InMemoryDataset`` or an ``IndexedSubset`` of one."""
    if hasattr(dataset, "indices"):
        index = torch.as_tensor(dataset.indices, dtype=torch.long)
        return dataset.dataset.images[index], dataset.dataset.targets[index]
    return dataset.images, dataset.targets


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize: Any) -> float:
    model.eval()
    correct = 0
    for first in range(0, len(images), 256):
        x = normalize(images[first : first + 256].float() / 255.0)
        correct += int((model(x).argmax(1) == labels[first : first + 256]).sum())
    return correct / len(images)


def run_plain(
    data: DigitsDataModule, seed: int, steps: int, batch_size: int, with_test: bool
) -> dict[str, Any]:
    """The plain loop (b): AdamW 1e-3 (weight decay 0.01), constant lr, random shifts, zero padding."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_images, train_labels = split_tensors(data.train_dataset)
    labeled = torch.as_tensor(data.labeled_indices, dtype=torch.long)
    images, labels = train_images[labeled], train_labels[labeled]
    backbone = build_backbone("small_cnn", data.channels)
    model = nn.Sequential(backbone, nn.Linear(backbone.num_features, data.num_classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) / std

    max_shift = max(1, round(0.125 * data.image_size))
    repeats = -(-batch_size // len(labeled))  # fewer labeled images than a batch: repeat them
    pool = torch.arange(len(labeled)).repeat(repeats)
    step = 0
    start = time.perf_counter()
    while step < steps:
        model.train()
        order = pool[torch.randperm(len(pool), generator=generator)]
        for first in range(0, len(order) - batch_size + 1, batch_size):
            index = order[first : first + batch_size]
            x = normalize(random_shift(images[index].float() / 255.0, max_shift, generator))
            loss = F.cross_entropy(model(x), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
    seconds = time.perf_counter() - start
    record = {"val_acc": accuracy(model, *split_tensors(data.val_dataset), normalize)}
    if with_test:
        record["test_acc"] = accuracy(model, *split_tensors(data.test_dataset), normalize)
    return {**record, "steps": step, "fit_seconds": seconds}


# -- driver ------------------------------------------------------------------------------
def quiet() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # one line per run is enough
    warnings.filterwarnings("ignore", module="lightning")


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    """One (side, labels per class, image size, seed): fit, then score val (and test unless a grid)."""
    quiet()
    side, labels, size, seed = task["side"], task["labels"], task["size"], task["seed"]
    with_test = not task["grid"]
    L.seed_everything(seed, verbose=False)
    data = make_data(labels, size, seed, task["batch_size"])
    if side == "plain":
        result = run_plain(data, seed, task["steps"], task["batch_size"], with_test=with_test)
    else:
        model = library_model(data) if side == "library" else candidate_model(data, CANDIDATES[side])
        result = run_module(model, data, seed, task["steps"], with_test=with_test)
    return {
        "side": side,
        "labels_per_class": labels,
        "image_size": size,
        "seed": seed,
        "labels": int(len(data.labeled_indices)),
        "labeled_indices": data.labeled_indices.tolist(),
        **result,
    }


def budget_name(labels: int | None) -> str:
    return "all" if labels is None else str(labels)


def median_of(records: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return statistics.median(values) if values else None


def summarise(records: list[dict[str, Any]], sides: list[str]) -> list[dict[str, Any]]:
    """One row per (labels per class, image size): medians over seeds of each side."""
    rows = []
    keys = sorted(
        {(r["labels_per_class"], r["image_size"]) for r in records}, key=lambda k: (k[1], k[0] or 1e9)
    )
    for labels, size in keys:
        row: dict[str, Any] = {"labels_per_class": labels, "image_size": size}
        for side in sides:
            runs = [
                r
                for r in records
                if r["side"] == side and r["labels_per_class"] == labels and r["image_size"] == size
            ]
            row[side] = {
                "seeds": [r["seed"] for r in runs],
                "labels": runs[0]["labels"] if runs else None,
                "val_acc_median": median_of(runs, "val_acc"),
                "test_acc_median": median_of(runs, "test_acc"),
            }
        # paired by seed (same labeled split): val_acc of each side minus the plain loop's
        plain = {
            r["seed"]: r["val_acc"]
            for r in records
            if r["side"] == "plain" and r["labels_per_class"] == labels and r["image_size"] == size
        }
        for side in sides:
            if side == "plain":
                continue
            own = {
                r["seed"]: r["val_acc"]
                for r in records
                if r["side"] == side and r["labels_per_class"] == labels and r["image_size"] == size
            }
            row[side]["val_acc_minus_plain"] = [own[s] - plain[s] for s in sorted(own) if s in plain]
        rows.append(row)
    return rows


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def markdown(rows: list[dict[str, Any]], sides: list[str], with_test: bool) -> str:
    header = "| labels/class | labels | px |"
    rule = "|---|---|---|"
    for side in sides:
        header += f" {side} val_acc |" + (f" {side} test_acc |" if with_test else "")
        rule += "---|" + ("---|" if with_test else "")
    paired = sides[0] != "plain" and "plain" in sides
    if paired:
        header += f" {sides[0]} − plain val_acc, per seed |"
        rule += "---|"
    lines = [header, rule]
    for row in rows:
        first = row[sides[0]]
        line = f"| {budget_name(row['labels_per_class'])} | {first['labels']} | {row['image_size']} |"
        for side in sides:
            line += f" {fmt(row[side]['val_acc_median'])} |"
            if with_test:
                line += f" {fmt(row[side]['test_acc_median'])} |"
        if paired:
            diffs = row[sides[0]].get("val_acc_minus_plain", [])
            line += " " + " ".join(f"{round(d, 3) + 0.0:+.3f}" for d in diffs) + " |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--labels", nargs="+", default=["2", "5", "10", "all"], help="labels per class, or 'all'"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32], help="image sizes (px)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plain_loop.json"))
    parser.add_argument("--grid", nargs="*", default=None, help="candidate names (none: all); val only")
    parser.add_argument("--grid-out", default=None, help="where --grid writes its records")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    parser.add_argument("--resume", action="store_true", help="skip the runs already in the output file")
    args = parser.parse_args(argv)
    quiet()
    budgets = [None if b == "all" else int(b) for b in args.labels]
    grid = args.grid is not None
    if grid:
        unknown = set(args.grid) - set(CANDIDATES) - {"library"}
        if unknown:
            raise SystemExit(
                f"unknown candidates {sorted(unknown)}; choose from library, {', '.join(CANDIDATES)}"
            )
        sides = (args.grid or list(CANDIDATES)) + ["plain"]
    else:
        sides = ["library", "plain"]
    settings = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "labels_per_class": args.labels,
        "image_sizes": args.sizes,
        "threads": torch.get_num_threads(),
        "library_config": yaml.safe_load(SUPERVISED_CONFIG.read_text())["model"],
    }
    out = args.grid_out if grid else args.out
    records: list[dict[str, Any]] = []
    if args.resume and out and Path(out).is_file():
        previous = json.loads(Path(out).read_text())
        if previous["settings"] != settings:
            raise SystemExit(f"--resume: {out} was written with other settings; rerun without --resume")
        records = previous["records"]

    def output(final: bool) -> dict[str, Any]:
        rows = summarise(records, sides)
        table = markdown(rows, sides, with_test=not grid)
        result = {"settings": settings, "sides": sides, "complete": final, "rows": rows, "records": records}
        result["table"] = table
        if grid:
            result["candidates"] = {name: CANDIDATES[name] for name in sides if name in CANDIDATES}
        if out:  # rewritten after every run, so an interrupted run keeps what it measured
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result, indent=1))
        return result

    done = {(r["side"], r["labels_per_class"], r["image_size"], r["seed"]) for r in records}
    tasks = [
        dict(
            side=side,
            labels=labels,
            size=size,
            seed=seed,
            steps=args.steps,
            batch_size=args.batch_size,
            grid=grid,
        )
        for size in args.sizes
        for labels in budgets
        for seed in args.seeds
        for side in sides
        if (side, labels, size, seed) not in done
    ]

    def finished(record: dict[str, Any]) -> None:
        records.append(record)
        output(final=False)
        shown = " ".join(f"{k}={record[k]:.4f}" for k in ("val_acc", "test_acc") if k in record)
        print(
            f"[{len(records)}] {record['side']:>18} labels/class={budget_name(record['labels_per_class']):>3} "
            f"{record['image_size']}px seed={record['seed']} {shown} ({record['fit_seconds']:.0f}s)",
            flush=True,
        )

    if args.jobs > 1:  # ``--jobs`` worker processes, each with OMP_NUM_THREADS threads
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            for future in as_completed([pool.submit(run_task, task) for task in tasks]):
                finished(future.result())
    else:
        for task in tasks:
            finished(run_task(task))
    order = {side: i for i, side in enumerate(sides)}
    records.sort(key=lambda r: (r["image_size"], r["labels_per_class"] or 10**9, r["seed"], order[r["side"]]))
    final = output(final=True)
    print(final["table"])
    return final


if __name__ == "__main__":
    main()
