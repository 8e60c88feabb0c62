"""Step time of each semi-supervised method relative to FixMatch's, at the same batch, side by side.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/rule_step_time.py [--rounds 30] [--batch 64] [--mu 7]

Builds every method from its config in ``configs/`` (FixMatch, FlexMatch, FreeMatch, SoftMatch,
UDA, MixMatch) for the digits' shape (1 x 16 x 16, 10 classes), then times ``training_step`` +
backward + optimizer step on the same batch (``batch`` labeled + ``mu x batch`` unlabeled
images), the methods interleaved round by round so that a slow moment of the machine hits
every method alike. Reports the median seconds per step and the ratio to FixMatch's median
(the issue's bar: within 10 %). ``self.log`` calls are skipped (no trainer), the EMA update of
the evaluation copy is included (``optimizer_step`` does it in a fit). The last column times the
rule's call alone (update + decide + ``log_values``) on the same batch shape: the part a rule adds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = ["fixmatch", "flexmatch", "freematch", "softmatch", "uda", "mixmatch"]
FACTS = dict(num_classes=10, channels=1, image_size=16, mean=(0.3,), std=(0.35,), horizontal_flip=False)


def build(name: str, num_unlabeled: int) -> torch.nn.Module:
    """The module of ``configs/<name>.yaml`` (its ``model`` section) for the digits' shape."""
    from jsonargparse import ArgumentParser

    import ssl_modules

    config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())["model"]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(torch.nn.Module, "model")
    init_args = {**config.get("init_args", {}), **FACTS}
    class_path = config["class_path"]
    namespace = parser.parse_object({"model": {"class_path": class_path, "init_args": init_args}})
    model = parser.instantiate_classes(namespace).model
    assert isinstance(model, (ssl_modules.FixMatchModule, ssl_modules.MixMatchModule)), type(model)
    if hasattr(model, "rule"):
        model.rule.allocate(FACTS["num_classes"], num_unlabeled)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--mu", type=int, default=1, help="unlabeled images per labeled one (digits config: 1)"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/rule_step_time.json"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from ssl_modules.batch import train_batch

    torch.manual_seed(0)
    unlabeled = args.batch * args.mu
    pool = 1000
    images = torch.randint(0, 256, (args.batch, 1, 16, 16), dtype=torch.uint8).float() / 255
    labels = torch.arange(args.batch) % 10
    unlabeled_images = torch.randint(0, 256, (unlabeled, 1, 16, 16), dtype=torch.uint8).float() / 255
    batch = train_batch(images, labels, unlabeled_images, torch.full((unlabeled,), -1))
    batch["unlabeled"] = batch["unlabeled"]._replace(index=torch.randperm(pool)[:unlabeled])
    models = {name: build(name, pool) for name in CONFIGS}
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=1e-3) for name, model in models.items()}

    def step(name: str) -> float:
        model, optimizer = models[name], optimizers[name]
        start = time.perf_counter()
        loss = model.training_step(batch, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.ema_model.ema_from(model.backbone, model.classifier, 0.99)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for round_index in range(args.warmup + args.rounds):
        order = CONFIGS[round_index % len(CONFIGS) :] + CONFIGS[: round_index % len(CONFIGS)]
        for name in order:  # a rotating order: no method always runs first
            seconds = step(name)
            if round_index >= args.warmup:
                times[name].append(seconds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    # the rule's own share: its call (update + decide + log values) on this batch's shape, alone
    probs = torch.rand(unlabeled, 10).softmax(dim=1)
    index = batch["unlabeled"].index
    rule_ms: dict[str, float | None] = {}
    for name, model in models.items():
        rule = getattr(model, "rule", None)
        if rule is None:
            rule_ms[name] = None
            continue
        calls = []
        for _ in range(200):
            start = time.perf_counter()
            rule(probs, index)
            rule.log_values()
            calls.append(time.perf_counter() - start)
        rule_ms[name] = statistics.median(calls) * 1000
    reference = medians["fixmatch"]
    rows = {
        name: {
            "median_s": medians[name],
            "ratio_to_fixmatch": medians[name] / reference,
            "rule_call_ms": rule_ms[name],
        }
        for name in CONFIGS
    }
    print(
        f"step time, median of {args.rounds} interleaved rounds, batch {args.batch} + {unlabeled}, threads "
        f"{torch.get_num_threads()}:"
    )
    print("| method | median step (ms) | ratio to FixMatch | rule call alone (ms) |\n|---|---|---|---|")
    for name, row in rows.items():
        rule = "-" if row["rule_call_ms"] is None else f"{row['rule_call_ms']:.3f}"
        print(f"| {name} | {row['median_s'] * 1000:.1f} | {row['ratio_to_fixmatch']:.3f} | {rule} |")
    Path(args.out).write_text(
        json.dumps({"settings": vars(args), "threads": torch.get_num_threads(), "rows": rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
