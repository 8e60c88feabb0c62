"""What each pseudo-label rule decides over training, on one run per rule, as PNG charts.

    .venv/bin/python benchmarks/plot_rules.py [--configs configs/flexmatch.yaml ...] [--max-steps 500]

Runs each config on the bundled digits (1 label per class, seed 0, CSV logger) and plots every
``train/rule/*`` scalar the rule logs (per-class thresholds, global threshold, weights) plus the
mask rate and the pseudo-label accuracy against the hidden labels, against the step. The charts
land in ``benchmarks/results/rules_<method>.png``; with the W&B logger the same scalars are the
run's line charts (``train/rule/...``).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ["configs/flexmatch.yaml", "configs/freematch.yaml", "configs/softmatch.yaml"]


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{column: [(step, value), ...]}`` of a Lightning ``metrics.csv`` (empty cells skipped)."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with path.open() as handle:
        for row in csv.DictReader(handle):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                series[key].append((step, float(value)))
    return dict(series)


def plot(series: dict[str, list[tuple[int, float]]], title: str, out: Path) -> list[str]:
    """One panel of the rule's own scalars, one of mask rate and pseudo-label accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rule_keys = sorted(key for key in series if key.startswith("train/rule/"))
    diagnostics = [key for key in ("train/mask_rate", "train/pseudo_label_acc") if key in series]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for key in rule_keys:
        steps, values = zip(*series[key])
        axes[0].plot(steps, values, label=key[len("train/rule/") :], linewidth=1.2)
    axes[0].set_title(f"{title}: what the rule decides")
    axes[0].set_xlabel("step")
    if rule_keys:
        axes[0].legend(fontsize=7, ncol=2)
    for key in diagnostics:
        steps, values = zip(*series[key])
        axes[1].plot(steps, values, label=key[len("train/") :], linewidth=1.2)
    axes[1].set_title(f"{title}: mask rate and pseudo-label accuracy (hidden labels)")
    axes[1].set_xlabel("step")
    axes[1].set_ylim(0, 1.02)
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return rule_keys


def run(config: str, max_steps: int, labels_per_class: int, workdir: Path) -> Path:
    """Fit ``config`` on the digits with a CSV logger in ``workdir``; returns its metrics.csv."""
    command = [
        str(ROOT / ".venv/bin/ssl-modules"),
        "fit",
        "--config",
        "configs/trainer/cpu.yaml",
        "--config",
        "configs/data/digits.yaml",
        "--config",
        config,
        "--config",
        "configs/logger/csv.yaml",
        "--trainer.logger.init_args.save_dir",
        str(workdir),
        "--trainer.max_steps",
        str(max_steps),
        "--trainer.log_every_n_steps",
        "5",
        "--trainer.enable_progress_bar",
        "false",
        "--data.labels_per_class",
        str(labels_per_class),
    ]
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "WANDB_MODE": "offline"})
    found = sorted(workdir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no metrics.csv under {workdir}")
    return found[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--labels-per-class", type=int, default=1)
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks/results"))
    args = parser.parse_args(argv)
    for config in args.configs:
        name = Path(config).stem
        with tempfile.TemporaryDirectory() as workdir:
            metrics = run(config, args.max_steps, args.labels_per_class, Path(workdir))
            series = read_metrics(metrics)
        out = Path(args.out_dir) / f"rules_{name}.png"
        keys = plot(series, name, out)
        last = {key: round(series[key][-1][1], 4) for key in keys}
        print(f"{name}: {out} ({len(keys)} rule series; last values {last})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
