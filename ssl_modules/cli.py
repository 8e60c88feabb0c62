"""``ssl-modules``: LightningCLI for every module and datamodule, plus ``ssl-modules bench``.

    ssl-modules fit --config configs/trainer/cpu.yaml --config configs/data/digits.yaml \\
                    --config configs/fixmatch.yaml
    ssl-modules run   ...same arguments as fit...      # fit, then test the final model
    ssl-modules bench configs/supervised.yaml configs/fixmatch.yaml --data configs/data/digits.yaml

Models and datamodules are chosen by ``class_path`` (the registry is the import path); the
datamodule's data facts (``num_classes``, ``channels``, ``image_size``, ``mean``, ``std``,
``horizontal_flip``) are linked into the model, so a method config never names a dataset.
A typo in a config fails with the CLI's own error.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

# linked from the datamodule into every model (contract: DESIGN.md, "Data")
DATA_FACTS = ("num_classes", "channels", "image_size", "mean", "std", "horizontal_flip")


def _wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def default_to_offline_wandb() -> None:
    """Without a W&B account, log offline (``wandb sync`` uploads later) instead of prompting."""
    if "WANDB_MODE" not in os.environ and not _wandb_credentials_present():
        os.environ["WANDB_MODE"] = "offline"


class SSLCLI(LightningCLI):
    """LightningCLI with the data facts linked into the model."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (jsonargparse parser)
        for name in DATA_FACTS:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")


TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {"project": "ssl-modules", "save_dir": "runs"},
    },
}


def build_cli(
    args: list[str] | None = None,
    run: bool = True,
    trainer_defaults: dict | None = None,
    save_config: bool = True,
) -> SSLCLI:
    """The CLI object; ``run=False`` only instantiates (what ``bench`` and the tests use).

    ``save_config=False`` skips writing ``config.yaml`` (the bench runs without a run folder).
    """
    return SSLCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        trainer_defaults=TRAINER_DEFAULTS if trainer_defaults is None else trainer_defaults,
        save_config_kwargs={"overwrite": True},
        save_config_callback=SaveConfigCallback if save_config else None,
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    default_to_offline_wandb()
    if argv and argv[0] == "bench":
        from ssl_modules.evaluation.bench import main as bench_main

        bench_main(argv[1:])
        return
    if argv and argv[0] == "run":
        fit_then_test(argv[1:])
        return
    try:
        build_cli(argv)
    except ValueError as error:
        raise SystemExit(f"error: {readable_error(error)}") from error


def readable_error(error: Exception) -> str:
    """The module's own message out of jsonargparse's "Does not validate against any of the
    Union subtypes" wrapper (a model or datamodule refused its arguments in ``__init__``)."""
    text = str(error)
    if "Does not validate against any of the Union subtypes" not in text:
        return text
    reasons = [
        line.strip()[2:]
        for line in text.splitlines()
        if line.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in line
    ]
    return "\n".join(reasons) or text


def fit_then_test(argv: list[str]) -> dict[str, float]:
    """``ssl-modules run``: ``fit`` then ``test`` of the final model in one process; prints ``test/acc``.

    Takes the same ``--config``/``--key value`` arguments as ``ssl-modules fit``.
    """
    try:
        cli = build_cli(argv, run=False)
    except ValueError as error:
        raise SystemExit(f"error: {readable_error(error)}") from error
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule)[0]
    if cli.trainer.is_global_zero:
        print(f"test/acc = {results['test/acc']:.4f}")
    return results


if __name__ == "__main__":
    main()
