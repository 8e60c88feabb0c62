"""``ssl-modules bench``: run methods on one data configuration, side by side, and tabulate.

    ssl-modules bench METHOD_CONFIG... --data DATA_CONFIG [--set KEY=VALUE ...]
                      [--seeds 0 1 2] [--max-steps N] [--out results.json]
                      [--downstream CONFIG ...] [--trainer TRAINER_CONFIG] [--jobs N]
                      [--last-k K [--val-every STEPS]]

Writes one JSON record per (method, seed) with ``method``, ``seed``, ``labels``, ``test_acc``,
``fit_seconds``, ``train_samples_per_s``, ``peak_memory_mb`` (contract, DESIGN.md) plus the
split (``labels_per_class``, ``label_fraction``, ``split_seed``, ``labeled_indices``) and the
settings, and prints a markdown table of medians over seeds.

Each (method, seed) runs in a fresh Python process (``--jobs N`` runs N at once, e.g. one per
core; rows measured that way share the machine equally, so their speed ratios still compare), so ``peak_memory_mb`` (peak RSS, or the
CUDA peak on a GPU) is that run's own and no state leaks between methods. The seed sets both
``seed_everything`` and the labeled split (``data.split_seed``), as is usual in the field;
``--set data.split_seed=K`` pins the split instead.

With ``--downstream``, every method config is a pretraining stage: its final checkpoint is
handed to each downstream config (``model.pretrained=<ckpt>``, e.g. ``linear_probe.yaml`` or
``fine_tune.yaml``), and the downstream's ``test_acc`` is reported as ``method+downstream``.

A METHOD_CONFIG may also be a *recipe*: a YAML file with a ``stages`` list, each stage a
method config run in turn, a later stage receiving an earlier one's final checkpoint::

    stages:
      - name: teacher                       # reported as its own row
        config: configs/supervised.yaml
      - name: distillation
        config: configs/distillation.yaml
        checkpoint_from: teacher
        checkpoint_into: model.teacher_checkpoint
        set: [model.temperature=4.0]        # optional, this stage only

``test_acc`` is the final model's (or the EMA/teacher model's, where the method evaluates
with it) — never a checkpoint selected on the test set. ``--last-k K`` adds a second number that
smooths out where the run happened to stop: the model is evaluated on the *validation* split every
``--val-every`` steps, and ``val_acc_last_k_median`` is the median of the last K of those
evaluations (``val_acc_history`` keeps them all, with their steps). The test split is still
touched once, by the final model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

BENCH_TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "accelerator": "auto",
    "devices": 1,
    "limit_val_batches": 0,
    "num_sanity_val_steps": 0,
}


def _cli_args(
    configs: list[str], seed: int, max_steps: int | None, overrides: list[str], extra: list[str] | None = None
) -> list[str]:
    args: list[str] = []
    for config in configs:
        args += ["--config", config]
    args += ["--seed_everything", str(seed), "--data.split_seed", str(seed)]
    if max_steps is not None:
        args += ["--trainer.max_steps", str(max_steps)]
    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"--set takes KEY=VALUE (e.g. data.labels_per_class=10); got {item!r}")
        key, value = item.split("=", 1)
        args.append(f"--{key}={value}")
    return args + list(extra or [])  # a stage's own settings win over the global --set


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Fit and test one configuration in this process; returns the record (worker side)."""
    import resource

    import torch

    from ssl_modules.callbacks.history import ValidationHistory
    from ssl_modules.cli import build_cli

    cli = build_cli(
        args=spec["cli_args"], run=False, trainer_defaults=dict(BENCH_TRAINER_DEFAULTS), save_config=False
    )
    model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    counter = {"images": 0}
    backbone = getattr(model, "backbone", None)
    if backbone is not None:

        def count_images(module: Any, inputs: tuple, output: Any) -> None:
            if trainer.training:
                counter["images"] += int(inputs[0].shape[0])

        backbone.register_forward_hook(count_images)
    if spec.get("last_k") and not datamodule.has_validation_split:
        raise ValueError(
            NO_VALIDATION_MESSAGE.format(data=type(datamodule).__name__, val_size=datamodule.val_size)
        )
    history = ValidationHistory()
    trainer.callbacks.append(history)  # read at every validation end, so appending before fit works
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    if spec.get("save_checkpoint"):
        # the pretraining stage of a two-stage protocol hands its final weights on
        trainer.save_checkpoint(spec["save_checkpoint"])
    results = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "test_acc": float(results["test/acc"]),
        "fit_seconds": fit_seconds,
        "train_samples_per_s": counter["images"] / fit_seconds if fit_seconds > 0 else 0.0,
        "train_images": counter["images"],
        "peak_memory_mb": peak_mb,
        "steps": int(trainer.global_step),
        "class_path": f"{type(model).__module__}.{type(model).__name__}",
        "labels": int(len(datamodule.labeled_indices)),
        "labels_per_class": datamodule.labels_per_class,
        "label_fraction": datamodule.label_fraction,
        "split_seed": datamodule.split_seed,
        "labeled_indices": datamodule.labeled_indices.tolist(),
        "other_metrics": {k: float(v) for k, v in results.items() if k != "test/acc"},
        **last_k_summary(history.steps, history.accuracies, spec.get("last_k")),
    }


NO_VALIDATION_MESSAGE = (
    "--last-k selects nothing on the test split, so it needs a validation split, and {data} has none "
    "(val_size={val_size}); hold part of train out for validation with --set data.val_size=0.1 "
    "(or give the dataset a val/ split)."
)


def require_validation_split(base_configs: list[str], method_config: str, overrides: list[str]) -> None:
    """Refuse ``--last-k`` before any run starts when the data configuration has no validation
    split: the history would otherwise be empty (``val_dataloader`` never serves the test split)."""
    from ssl_modules.cli import build_cli

    args = _cli_args([*base_configs, method_config], 0, None, overrides)
    cli = build_cli(args=args, run=False, trainer_defaults=dict(BENCH_TRAINER_DEFAULTS), save_config=False)
    datamodule = cli.datamodule
    if not datamodule.has_validation_split:
        raise SystemExit(
            NO_VALIDATION_MESSAGE.format(data=type(datamodule).__name__, val_size=datamodule.val_size)
        )


def last_k_summary(steps: list[int], accuracies: list[float], last_k: int | None) -> dict[str, Any]:
    """The record's ``val_acc_*`` fields: the history and the median of its last ``last_k`` values."""
    if not last_k:
        return {}
    if len(accuracies) < last_k:
        raise RuntimeError(
            f"--last-k {last_k} needs {last_k} validation runs but fit made {len(accuracies)}; "
            "lower --val-every (or --last-k)."
        )
    return {
        "val_acc_history": [[step, acc] for step, acc in zip(steps, accuracies)],
        "val_acc_last_k": last_k,
        "val_acc_last_k_median": statistics.median(accuracies[-last_k:]),
    }


def _run_in_subprocess(spec: dict[str, Any], log_path: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec_path.write_text(json.dumps(spec))
        with open(log_path, "w") as log:
            code = subprocess.call(
                [
                    sys.executable,
                    "-m",
                    "ssl_modules.evaluation.bench",
                    "--worker",
                    str(spec_path),
                    str(out_path),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if code != 0 or not out_path.exists():
            tail = "".join(open(log_path).readlines()[-15:])
            return {"error": f"exit code {code}; last lines of {log_path}:\n{tail}"}
        return json.loads(out_path.read_text())


def _fmt_seconds(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def markdown_table(records: list[dict[str, Any]]) -> str:
    """Medians over seeds per method; speed as a ratio to the first method, measured in this run."""
    methods: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if "error" not in record:
            methods.setdefault(record["method"], []).append(record)
    lines = [
        "| method | labels | seeds | test_acc (median) | min – max | fit s (median) | samples/s (median) "
        "| speed vs first | peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    with_val = any("val_acc_last_k_median" in r for runs in methods.values() for r in runs)
    if with_val:
        k = next(r["val_acc_last_k"] for runs in methods.values() for r in runs if "val_acc_last_k" in r)
        lines[0] += f" val_acc, median of last {k} (median) |"
        lines[1] += "---|"
    reference = None
    for name, runs in methods.items():
        accs = [r["test_acc"] for r in runs]
        speed = statistics.median(r["train_samples_per_s"] for r in runs)
        reference = reference or speed or None
        ratio = f"{speed / reference:.2f}x" if reference else "n/a"
        lines.append(
            f"| {name} | {runs[0]['labels']} | {len(runs)} | {statistics.median(accs):.4f} | "
            f"{min(accs):.4f} – {max(accs):.4f} | {statistics.median(r['fit_seconds'] for r in runs):.1f} | "
            f"{speed:.0f} | {ratio} | {statistics.median(r['peak_memory_mb'] for r in runs):.0f} |"
        )
        if with_val:
            values = [r["val_acc_last_k_median"] for r in runs if "val_acc_last_k_median" in r]
            lines[-1] += f" {statistics.median(values):.4f} |" if values else " n/a |"
    return "\n".join(lines)


@dataclass
class Stage:
    name: str
    config: str
    checkpoint_from: str | None = None
    checkpoint_into: str = "model.pretrained"
    overrides: tuple[str, ...] = ()
    keep_checkpoint: bool = False


def _resolve(path: str, recipe: Path) -> str:
    """A recipe's paths are relative to the working directory or to the project holding it."""
    if Path(path).is_file() or Path(path).is_absolute():
        return path
    for folder in recipe.resolve().parents:
        if (folder / path).is_file():
            return str(folder / path)
    raise SystemExit(f"recipe {str(recipe)!r}: config {path!r} not found")


def plan_stages(config: str, downstream: list[str] | None) -> list[Stage]:
    """The stages one METHOD_CONFIG runs: itself, a recipe's stages, plus any downstream stages."""
    text = yaml.safe_load(Path(config).read_text()) or {}
    if "stages" in text:
        unknown = set(text) - {"stages"}
        if unknown:
            raise SystemExit(
                f"recipe {config!r}: unknown top-level keys {sorted(unknown)}; only 'stages' is allowed"
            )
        stages = []
        for item in text["stages"]:
            unknown = set(item) - {"name", "config", "checkpoint_from", "checkpoint_into", "set"}
            if unknown or "name" not in item or "config" not in item:
                raise SystemExit(
                    f"recipe {config!r}: a stage needs 'name' and 'config' and may have 'checkpoint_from', "
                    f"'checkpoint_into', 'set'; got {sorted(item)}"
                )
            stages.append(
                Stage(
                    name=item["name"],
                    config=_resolve(item["config"], Path(config)),
                    checkpoint_from=item.get("checkpoint_from"),
                    checkpoint_into=item.get("checkpoint_into", "model.pretrained"),
                    overrides=tuple(item.get("set", [])),
                )
            )
        for stage in stages:
            for other in stages:
                if other.checkpoint_from == stage.name:
                    stage.keep_checkpoint = True
    else:
        stages = [Stage(name=Path(config).stem, config=config)]
    if downstream:
        source = stages[-1]
        source.keep_checkpoint = True
        for path in downstream:
            stages.append(Stage(f"{source.name}+{Path(path).stem}", path, checkpoint_from=source.name))
    return stages


def log_wandb_table(records: list[dict[str, Any]], project: str, settings: dict[str, Any]) -> None:
    """One W&B run (job_type "bench") holding every record as a row of the ``results`` Table."""
    import wandb

    columns = ["method", "seed", "labels", "test_acc", "fit_seconds", "train_samples_per_s", "peak_memory_mb"]
    run = wandb.init(project=project, job_type="bench", config=settings, dir=tempfile.gettempdir())
    table = wandb.Table(
        columns=columns, data=[[r.get(c) for c in columns] for r in records if "error" not in r]
    )
    run.log({"results": table})
    run.finish()


class _Progress:
    """Thread-safe "[done/total] ... elapsed, time left" lines."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.start = time.perf_counter()
        self.lock = threading.Lock()

    def started(self, name: str, seed: int) -> None:
        with self.lock:
            elapsed = time.perf_counter() - self.start
            eta = (
                f", about {_fmt_seconds(elapsed / self.done * (self.total - self.done))} left"
                if self.done
                else ""
            )
            print(
                f"[{self.done + 1}/{self.total}] {name} seed {seed} ({_fmt_seconds(elapsed)} elapsed{eta})",
                flush=True,
            )

    def finished(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.done += 1
            if "error" in record:
                print(f"  {record['method']} seed {record['seed']} FAILED: {record['error']}", flush=True)
            else:
                print(
                    f"  {record['method']} seed {record['seed']}: test_acc={record['test_acc']:.4f} "
                    f"fit={record['fit_seconds']:.1f}s samples/s={record['train_samples_per_s']:.0f}",
                    flush=True,
                )


def _validation_args(val_every: int) -> list[str]:
    """Trainer settings that validate on the whole validation split every ``val_every`` steps."""
    return [
        "--trainer.limit_val_batches=1.0",
        f"--trainer.val_check_interval={val_every}",
        "--trainer.check_val_every_n_epoch=null",  # count steps across epochs
    ]


def run_pipeline(
    stages: list[Stage],
    seed: int,
    base_configs: list[str],
    args: argparse.Namespace,
    work_dir: Path,
    progress: _Progress,
) -> list[dict[str, Any]]:
    """Run one seed of one METHOD_CONFIG's stages in order, each in its own process."""
    records: list[dict[str, Any]] = []
    checkpoints: dict[str, str] = {}
    for stage in stages:
        progress.started(stage.name, seed)
        extra = [f"--{key}={value}" for key, value in (item.split("=", 1) for item in stage.overrides)]
        if stage.checkpoint_from is not None:
            if stage.checkpoint_from not in checkpoints:
                raise SystemExit(
                    f"stage {stage.name!r}: checkpoint_from {stage.checkpoint_from!r} names no earlier stage"
                )
            extra.append(f"--{stage.checkpoint_into}={checkpoints[stage.checkpoint_from]}")
        checkpoint = str(work_dir / f"{stage.name}-seed{seed}.ckpt") if stage.keep_checkpoint else None
        if args.last_k:
            extra = _validation_args(args.val_every) + extra
        spec = {
            "cli_args": _cli_args([*base_configs, stage.config], seed, args.max_steps, args.set, extra),
            "save_checkpoint": checkpoint,
            "last_k": args.last_k,
        }
        result = _run_in_subprocess(spec, work_dir / f"{stage.name}-seed{seed}.log")
        record = {"method": stage.name, "seed": seed, "config": stage.config, "data": args.data}
        record.update({"max_steps": args.max_steps, "overrides": args.set + list(stage.overrides)})
        if stage.checkpoint_from is not None:
            record["initialised_from"] = stage.checkpoint_from
        record.update(result)
        records.append(record)
        progress.finished(record)
        if "error" in record:
            break  # later stages need this one's checkpoint
        if checkpoint:
            checkpoints[stage.name] = checkpoint
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ssl-modules bench",
        description="Run methods on one data configuration and tabulate test/acc (medians over seeds).",
    )
    parser.add_argument("method_configs", nargs="+", help="method YAML files (configs/<method>.yaml)")
    parser.add_argument("--data", required=True, help="data YAML file (configs/data/<name>.yaml)")
    parser.add_argument("--trainer", default=None, help="optional trainer YAML; default: 1 device, no logger")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="CLI override, repeatable"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--max-steps", type=int, default=None, help="same step budget for every method")
    parser.add_argument("--out", default=None, help="write the JSON records here")
    parser.add_argument(
        "--downstream",
        nargs="+",
        default=None,
        help="configs run on each method's checkpoint (model.pretrained)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="run this many (method, seed) pipelines at once (CPU cores / GPUs)",
    )
    parser.add_argument(
        "--wandb", default=None, metavar="PROJECT", help="also log the records as a W&B Table to this project"
    )
    parser.add_argument(
        "--last-k",
        type=int,
        default=None,
        metavar="K",
        help="also report the median val/acc of the last K validation evaluations (val_acc_last_k_median)",
    )
    parser.add_argument(
        "--val-every",
        type=int,
        default=None,
        metavar="STEPS",
        help="with --last-k: validate every STEPS steps (default: max-steps / (2 K))",
    )
    args = parser.parse_args(argv)
    if args.last_k is not None:
        if args.last_k < 1:
            raise SystemExit(f"--last-k must be >= 1; got {args.last_k}")
        if args.val_every is None:
            if args.max_steps is None:
                raise SystemExit("--last-k needs --val-every STEPS (or --max-steps, to derive it)")
            args.val_every = max(1, args.max_steps // (2 * args.last_k))
        if args.val_every < 1:
            raise SystemExit(f"--val-every must be >= 1; got {args.val_every}")
    elif args.val_every is not None:
        raise SystemExit("--val-every only applies with --last-k K")
    for path in [
        *args.method_configs,
        args.data,
        *(args.downstream or []),
        *([args.trainer] if args.trainer else []),
    ]:
        if not Path(path).is_file():
            raise SystemExit(f"config file {path!r} does not exist")

    base_configs = [args.data] + ([args.trainer] if args.trainer else [])
    if args.last_k is not None:
        first = plan_stages(args.method_configs[0], None)[0]
        require_validation_split(base_configs, first.config, [*args.set, *first.overrides])
    pipelines = [plan_stages(config, args.downstream) for config in args.method_configs]
    jobs = [(index, seed, stages) for index, stages in enumerate(pipelines) for seed in args.seeds]
    progress = _Progress(total=sum(len(stages) for _, _, stages in jobs))
    work_dir = Path(tempfile.mkdtemp(prefix="ssl-bench-"))

    def run_job(job: tuple[int, int, list[Stage]]) -> list[dict[str, Any]]:
        _, seed, stages = job
        return run_pipeline(stages, seed, base_configs, args, work_dir, progress)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(run_job, jobs))  # in submission order: the table's row order
    records = [record for job_records in results for record in job_records]
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1))
    print()
    print(markdown_table(records))
    if args.wandb:
        log_wandb_table(records, args.wandb, vars(args))
    failed = [r for r in records if "error" in r]
    if failed:
        raise SystemExit(
            f"{len(failed)} run(s) failed: " + ", ".join(f"{r['method']}/seed{r['seed']}" for r in failed)
        )


def _worker(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("WANDB_MODE", "offline")
    record = run_one(spec)
    Path(out_path).write_text(json.dumps(record))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
    else:
        main()
