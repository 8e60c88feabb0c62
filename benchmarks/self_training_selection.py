"""Self-training's three selection rules side by side, with pseudo-label accuracy per round.

Runs ``configs/self_training.yaml`` on the digits (5 labels per class) with
``selection`` = ``top_k`` / ``all`` / ``weighted`` for each seed, logging to CSV, and prints
per round: pseudo-labels kept and their accuracy against the hidden labels (a diagnostic the
module logs; no loss reads the hidden labels), then the median ``test/acc`` per rule.

    python benchmarks/self_training_selection.py [--seeds 0 1 2] [--max-steps 500]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from pathlib import Path

from ssl_modules.cli import build_cli

SELECTIONS = ("top_k", "all", "weighted")


def run(selection: str, seed: int, max_steps: int, log_dir: str) -> tuple[float, list[dict[str, float]]]:
    args = ["--config", "configs/data/digits.yaml", "--config", "configs/self_training.yaml"]
    args += [f"--model.selection={selection}", f"--seed_everything={seed}", f"--data.split_seed={seed}"]
    args += [
        f"--trainer.max_steps={max_steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
    ]
    args += ["--trainer.enable_checkpointing=false", "--trainer.enable_model_summary=false"]
    args += ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={log_dir}"]
    args += [f"--trainer.logger.name={selection}-{seed}"]
    cli = build_cli(args=args, run=False, trainer_defaults={}, save_config=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    accuracy = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]["test/acc"]
    rounds: dict[int, dict[str, float]] = {}
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            if row.get("round/index"):
                index = int(float(row["round/index"]))
                rounds[index] = {
                    "round": index,
                    "kept": float(row["round/kept"]),
                    "pseudo_label_acc": float(row["round/pseudo_label_acc"] or "nan"),
                }
    return accuracy, [rounds[k] for k in sorted(rounds)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=500)
    args = parser.parse_args()
    results: dict[str, list[float]] = {selection: [] for selection in SELECTIONS}
    with tempfile.TemporaryDirectory() as log_dir:
        for selection in SELECTIONS:
            for seed in args.seeds:
                accuracy, rounds = run(selection, seed, args.max_steps, log_dir)
                results[selection].append(accuracy)
                per_round = ", ".join(
                    f"r{r['round']}: {int(r['kept'])} kept @ {r['pseudo_label_acc']:.3f}"
                    for r in rounds
                    if r["kept"]
                )
                print(f"{selection:8s} seed {seed}: test/acc {accuracy:.4f} | {per_round}", flush=True)
    print("\n| selection | test_acc (median) | min – max |\n|---|---|---|")
    for selection, accuracies in results.items():
        print(
            f"| {selection} | {statistics.median(accuracies):.4f} | {min(accuracies):.4f} – {max(accuracies):.4f} |"
        )


if __name__ == "__main__":
    main()
