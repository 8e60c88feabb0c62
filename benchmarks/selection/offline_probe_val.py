"""Secondary check of a selection (not its decision metric): the offline linear probe behind
``test/acc`` (logistic regression on standardised frozen features of the labeled split), scored on
the VALIDATION split, for checkpoints that ``ssl-modules bench`` kept in its work folder
(``/tmp/ssl-bench-*/<stage>-seed<k>.ckpt``), or for the random initialisation.

    python benchmarks/selection/offline_probe_val.py CONFIG SEED [CHECKPOINT] [--set KEY=VALUE ...]

Prints ``{"checkpoint": ..., "seed": ..., "val_offline_probe_acc": ...}``. The data settings of
``benchmarks/selection/byol_barlow.sh`` (digits, 28 px, 10 labels per class; the seed also draws
the split) are fixed here.
"""

from __future__ import annotations

import argparse
import json

import torch

from ssl_modules.augment import to_float_images
from ssl_modules.cli import build_cli
from ssl_modules.evaluation.bench import BENCH_TRAINER_DEFAULTS
from ssl_modules.evaluation.probe import extract_features, fit_linear_probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("seed", type=int)
    parser.add_argument("checkpoint", nargs="?", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cli_args = ["--config", "configs/data/digits.yaml", "--config", args.config]
    cli_args += ["--seed_everything", str(args.seed), "--data.split_seed", str(args.seed)]
    cli_args += ["--data.image_size=28", "--data.labels_per_class=10", *[f"--{item}" for item in args.set]]
    cli = build_cli(
        args=cli_args, run=False, trainer_defaults=dict(BENCH_TRAINER_DEFAULTS), save_config=False
    )
    model, datamodule = cli.model, cli.datamodule
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        model.load_state_dict(state)
    datamodule.setup("fit")
    model.eval()
    train = extract_features(model.embed, datamodule.labeled_dataloader(), model.device, to_float_images)
    val = extract_features(model.embed, datamodule.val_dataloader(), model.device, to_float_images)
    probe = fit_linear_probe(*train, num_classes=model.num_classes, weight_decay=model.probe_weight_decay)
    accuracy = float((probe(val[0]).argmax(1) == val[1]).float().mean())
    record = {"checkpoint": args.checkpoint, "seed": args.seed, "val_offline_probe_acc": accuracy}
    print(json.dumps(record))


if __name__ == "__main__":
    main()
