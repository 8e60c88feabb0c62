"""Pretext methods' ``test/acc`` vs a randomly initialised backbone probed the same way.

For each method and seed: fit ``--max-steps`` steps, then ``trainer.test`` (the offline linear
probe on the labeled split behind ``test/acc``). ``random_init`` is the same offline probe on an
untrained backbone (the module tested without fitting; ``random_init:colorization`` probes an
untrained colorization backbone, which sees the L channel); ``linear_probe`` is
``SupervisedModule(freeze_backbone=True)`` with no checkpoint (configs/linear_probe.yaml) and
``supervised`` the supervised baseline (configs/supervised.yaml), both fitted for ``--max-steps``.

Usage::

    .venv/bin/python benchmarks/pretext_vs_random.py --data digits --methods rotation jigsaw denoising_autoencoder
    .venv/bin/python benchmarks/make_color_folder.py /tmp/color_shapes
    .venv/bin/python benchmarks/pretext_vs_random.py --data /tmp/color_shapes --methods colorization
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import lightning as L
import yaml

import ssl_modules
from datamodules import DigitsDataModule
from datamodules.image_folder import ImageFolderDataModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def make_data(data: str, labels_per_class: int, seed: int) -> L.LightningDataModule:
    if data == "digits":
        return DigitsDataModule(
            image_size=16, labels_per_class=labels_per_class, split_seed=seed, batch_size=64
        )
    return ImageFolderDataModule(
        root=data,
        image_size=32,
        channels=3,
        labels_per_class=labels_per_class,
        split_seed=seed,
        batch_size=64,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )


def make_model(method: str, datamodule: L.LightningDataModule, overrides: dict) -> L.LightningModule:
    config = yaml.safe_load((CONFIGS / f"{method}.yaml").read_text())["model"]
    cls = getattr(ssl_modules, config["class_path"].split(".")[-1])
    facts = {
        k: getattr(datamodule, k)
        for k in ("num_classes", "channels", "image_size", "mean", "std", "horizontal_flip")
    }
    return cls(**facts, **{**config.get("init_args", {}), **overrides})


class PretextAccuracy(L.Callback):
    """Mean ``train/pretext_acc`` over the first and the last ``window`` steps: does it rise?"""

    def __init__(self, window: int = 50) -> None:
        self.window = window
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        value = trainer.callback_metrics.get("train/pretext_acc")
        if value is not None:
            self.values.append(float(value))

    def summary(self) -> dict:
        if not self.values:
            return {}
        first, last = self.values[: self.window], self.values[-self.window :]
        return {"pretext_acc_first": sum(first) / len(first), "pretext_acc_last": sum(last) / len(last)}


def run(method: str, data: str, seed: int, max_steps: int, labels_per_class: int, overrides: dict) -> dict:
    L.seed_everything(seed, workers=True)
    datamodule = make_data(data, labels_per_class, seed)
    # random_init[:METHOD]: METHOD's module (default rotation) tested without training, so its
    # backbone sees the same input as the trained one (colorization: the L channel)
    untrained = method.startswith("random_init")
    name = (method.partition(":")[2] or "rotation") if untrained else method
    model = make_model(name, datamodule, overrides)
    pretext_accuracy = PretextAccuracy()
    trainer = L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
        callbacks=[pretext_accuracy],
    )
    start = time.time()
    if not untrained:
        trainer.fit(model, datamodule=datamodule)
    fit_seconds = time.time() - start
    pretext = pretext_accuracy.summary()
    metrics = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    return {
        "method": method,
        "seed": seed,
        "test_acc": metrics["test/acc"],
        "fit_seconds": fit_seconds,
        **pretext,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="digits")
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--labels-per-class", type=int, default=5)
    parser.add_argument("--set", nargs="*", default=[], help="model overrides KEY=VALUE (YAML values)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    records = []
    for method in args.methods:
        for seed in args.seeds:
            record = run(
                method,
                args.data,
                seed,
                args.max_steps,
                args.labels_per_class,
                overrides if method != "linear_probe" and method != "supervised" else {},
            )
            print(json.dumps(record), flush=True)
            records.append(record)
    print(
        "\n| method | "
        + " | ".join(f"seed {s}" for s in args.seeds)
        + " | mean |\n|---|"
        + "---|" * (len(args.seeds) + 1)
    )
    for method in args.methods:
        accs = [r["test_acc"] for r in records if r["method"] == method]
        print(f"| {method} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {sum(accs) / len(accs):.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
