"""``ssl-modules``: LightningCLI for every module and datamodule, plus ``ssl-modules bench``.

    ssl-modules fit --config configs/trainer/cpu.yaml --config configs/data/digits.yaml \\
                    --config configs/fixmatch.yaml
    ssl-modules run   ...same arguments as fit...      # fit, then test the final model
    ssl-modules test --ckpt_path runs/wandb/<run id>/checkpoints/last.ckpt   # the checkpoint's own config
    ssl-modules bench configs/supervised.yaml configs/fixmatch.yaml --data configs/data/digits.yaml

Models and datamodules are chosen by ``class_path`` or short class name (``--model SimCLRModule``,
``--data DigitsDataModule``); the datamodule's data facts (``num_classes``, ``channels``,
``image_size``, ``mean``, ``std``, ``horizontal_flip``) are linked into the model, so a method
config never names a dataset.

Every run with a logger gets its own folder ``runs/<logger>/<run id>/`` (``runs/wandb/<W&B run
id>/``, ``runs/csv/version_<n>/``): ``config.yaml`` (the full resolved config), ``split.json`` (the
labeled split) and ``checkpoints/`` (``last.ckpt`` at the end of every fit, ``best.ckpt`` on
``val/acc``); a W&B run also gets the full config and both files.

Errors: a configuration or data problem found while building the run or setting it up (before the
first training step) is one line, ``error: <what is wrong and how to fix it>``; anything raised
later (a bug, a shape error) keeps its full traceback (``SSL_MODULES_TRACEBACK=1`` shows it for
setup errors too).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_warn

# linked from the datamodule into every model (contract: DESIGN.md, "Data")
DATA_FACTS = ("num_classes", "channels", "image_size", "mean", "std", "horizontal_flip")

# ``ssl-modules --help``: every subcommand, in the order a user meets them
SUBCOMMANDS = {
    "fit": "train a model: --config TRAINER.yaml --config DATA.yaml --config METHOD.yaml [--key value ...]",
    "validate": "evaluate on the validation split (--ckpt_path CKPT: model and data from the checkpoint)",
    "test": "evaluate on the test split: test/acc (--ckpt_path CKPT: model and data from the checkpoint)",
    "predict": "embeddings or predictions of a checkpoint's model for a chosen split, written to a file",
    "run": "fit, then test the final model in one process; prints test/acc (the arguments of fit)",
    "bench": "several method configs x seeds, one JSON record each and a markdown table of medians",
    "export": "write a checkpoint's backbone as a plain state dict (e.g. --out backbone.pt)",
}

# arguments a method's config sets for its own optimizer: carried over silently by jsonargparse
# when ``--model`` switches to another method that accepts them too
METHOD_OPTIMIZER_ARGS = ("lr", "weight_decay")

# exceptions that mean "the configuration or the data is wrong" when raised before training starts
_SETUP_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
# function names on the traceback of an error raised while building or setting up a run:
# LightningCLI/jsonargparse instantiating the classes, Lightning's prepare_data and setup hooks
_SETUP_FRAMES = frozenset({"instantiate_classes", "prepare_data", "_call_setup_hook"})
_TRAINING_FRAMES = frozenset({"_run_stage", "_run_sanity_check"})


def _wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def default_to_offline_wandb() -> None:
    """Without a W&B account, log offline (``wandb sync`` uploads later) instead of prompting."""
    if "WANDB_MODE" not in os.environ and not _wandb_credentials_present():
        os.environ["WANDB_MODE"] = "offline"


# -- run folder, checkpoints, records ---------------------------------------------------
def _is_wandb(logger: object) -> bool:
    return any(cls.__name__ == "WandbLogger" for cls in type(logger).__mro__)


def prepare_run_folder(trainer: Any) -> str | None:
    """Make ``trainer.log_dir`` this run's own folder; returns a W&B run's (``None`` otherwise).

    CSV and TensorBoard loggers already have one (``<save_dir>/<name>/version_<n>``). A W&B
    logger's ``log_dir`` is its ``save_dir``, shared by every run; it becomes
    ``<save_dir>/wandb/<run id>`` (next to wandb's own ``offline-run-*`` folders), so
    ``config.yaml`` and ``split.json`` of two runs never overwrite each other. Creates the W&B run
    (rank 0) to learn its id; ``wandb.init`` has already used the original ``save_dir``.
    """
    if not trainer.loggers:
        return None
    logger = trainer.loggers[0]
    if _is_wandb(logger) and getattr(logger, "_ssl_run_dir", None) is None:
        # two wandb warnings on every run: Lightning passes anonymous=None (wandb 0.31 warns the
        # setting is gone), and wandb looks for a git repository in save_dir before creating it
        init_kwargs = getattr(logger, "_wandb_init", None)
        if isinstance(init_kwargs, dict) and init_kwargs.get("anonymous", False) is None:
            del init_kwargs["anonymous"]
        if logger.save_dir and trainer.is_global_zero:
            os.makedirs(logger.save_dir, exist_ok=True)
        _ = logger.experiment  # the run (rank 0 only; other ranks read log_dir from rank 0)
        run_id = logger.version
        if run_id is not None and hasattr(logger, "_save_dir"):
            run_dir = os.path.join(logger.save_dir or ".", "wandb", str(run_id))
            logger._save_dir = run_dir  # WandbLogger.save_dir, the Trainer's log_dir, has no setter
            logger._ssl_run_dir = run_dir
            return run_dir
    return getattr(logger, "_ssl_run_dir", None)


class RunCheckpoint(ModelCheckpoint):
    """``checkpoints/`` of the run folder: ``last.ckpt`` at the end of every fit and ``best.ckpt``,
    the best ``val/acc`` (where validation runs).

    Lightning's ``ModelCheckpoint`` writes ``last.ckpt`` only when it also saves a top-k checkpoint
    (at a validation or an epoch end), so a run whose last steps see no validation (``max_steps``
    inside ``check_val_every_n_epoch``) would end with a stale ``last.ckpt`` or none at all; this
    one also saves it when training ends. Without ``dirpath`` it writes to
    ``<trainer.log_dir>/checkpoints`` (for W&B: the run folder, not ``<save_dir>/<project>/<id>``).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = "best",
        monitor: str | None = "val/acc",
        mode: str = "max",
        save_last: bool = True,
        save_top_k: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            mode=mode,
            save_last=save_last,
            save_top_k=save_top_k,
            **kwargs,
        )

    # False for test/validate/predict: nothing to resume, and the run folder always differs
    # from the one the checkpoint was written in (Lightning would warn about it)
    restore_state: bool = True

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.restore_state:
            super().load_state_dict(state_dict)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.save_last or trainer.fast_dev_run or trainer.global_step == 0:
            return
        candidates = self._monitor_candidates(trainer)
        path = self.format_checkpoint_name(candidates, self.CHECKPOINT_NAME_LAST)
        if self._last_global_step_saved == trainer.global_step and self._last_checkpoint_saved == path:
            return  # last.ckpt is already this step's (a validation at the final step wrote it)
        self.last_model_path = path
        # as ModelCheckpoint saves (every rank calls it, rank 0 writes), loggers are told (W&B log_model)
        self._save_checkpoint(trainer, self.last_model_path)


class RunRecords(SaveConfigCallback):
    """``config.yaml`` in the run folder (``SaveConfigCallback``), plus:

    - a W&B run gets the full config (``trainer``, ``data``, ``model`` with any injected optimizer
      and scheduler, ``seed_everything``) in its config panel and ``config.yaml`` and
      ``split.json`` in its files (``<run id>/config.yaml``: wandb's own ``config.yaml`` keeps its name);
    - every checkpoint gets the datamodule's config (``datamodule_hyper_parameters``, in the
      format Lightning uses for a datamodule that saves its hyperparameters under the CLI), so
      ``ssl-modules test --ckpt_path CKPT`` needs nothing else.
    """

    _run_dir: str | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.save_to_log_dir:
            self._run_dir = trainer.log_dir  # a collective under DDP: every rank asks
        super().setup(trainer, pl_module, stage)

    def _config_dict(self) -> dict[str, Any]:
        return yaml.safe_load(self.parser.dump(self.config, skip_none=False)) or {}

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:  # rank 0 only
        if self._run_dir is None:
            return
        for logger in trainer.loggers:
            if not _is_wandb(logger):
                continue
            experiment = logger.experiment
            config = {key: value for key, value in self._config_dict().items() if key != "config"}
            experiment.config.update(config, allow_val_change=True)
            # copies in the W&B run's own files folder, saved from there: wandb.save of files
            # outside it symlinks them and warns about it on every run
            records = Path(experiment.dir, Path(self._run_dir).name)
            records.mkdir(parents=True, exist_ok=True)
            for name in ("config.yaml", "split.json"):
                if Path(self._run_dir, name).is_file():
                    shutil.copyfile(Path(self._run_dir, name), records / name)
            experiment.save(
                os.path.join(glob.escape(str(records)), "*"), base_path=experiment.dir, policy="now"
            )

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        data = self._config_dict().get("data")
        if not isinstance(data, dict) or "class_path" not in data:
            return
        checkpoint.setdefault(
            "datamodule_hyper_parameters",
            {
                "_class_path": data["class_path"],
                **(data.get("init_args") or {}),
                "_instantiator": "lightning.pytorch.cli.instantiate_module",
            },
        )


# -- the CLI ------------------------------------------------------------------------------
class SSLCLI(LightningCLI):
    """LightningCLI with the data facts linked into the model, a folder per run, checkpoints in it,
    and a warning when ``--model`` switches methods but keeps the earlier method's ``lr``."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (jsonargparse parser)
        for name in DATA_FACTS:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:  # noqa: ANN001
        # LightningCLI warns whenever ``args`` is given while sys.argv has arguments, which is
        # every call of ``ssl-modules`` (main passes sys.argv[1:] on): parse without the warning
        self._raw_args = args
        if isinstance(args, dict) or type(args).__name__ == "Namespace":
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args(args)

    def before_instantiate_classes(self) -> None:
        if isinstance(getattr(self, "_raw_args", None), list):
            warn_inherited_optimizer_args(self._raw_args, self._get(self.config, "model"))

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        config = self._get(self.config_init, "trainer", default={}) or {}
        callbacks = kwargs.get("callbacks", config.get("callbacks")) or []
        callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
        logger = kwargs.get("logger", config.get("logger"))
        has_logger = logger is not False and logger != []  # None/True: Lightning's default logger
        # with a logger the run folder gets checkpoints/; test/validate/predict save nothing, but
        # a checkpoint made with RunCheckpoint warns when loaded into a trainer without one
        evaluating = self.subcommand in ("validate", "test", "predict")
        if (
            (has_logger or evaluating)
            and kwargs.get("enable_checkpointing", config.get("enable_checkpointing")) is not False
            and not any(isinstance(callback, ModelCheckpoint) for callback in callbacks)
        ):
            checkpoint = RunCheckpoint()
            checkpoint.restore_state = not evaluating
            kwargs["callbacks"] = [*callbacks, checkpoint]
        trainer = super().instantiate_trainer(**kwargs)
        prepare_run_folder(trainer)
        return trainer


TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {"project": "ssl-modules", "save_dir": "runs", "log_model": False},
    },
}


def build_cli(
    args: list[str] | None = None,
    run: bool = True,
    trainer_defaults: dict | None = None,
    save_config: bool = True,
) -> SSLCLI:
    """The CLI object; ``run=False`` only instantiates (what ``bench`` and the tests use).

    ``save_config=False`` skips the run records (``config.yaml``; the bench runs without a run folder).
    """
    # jsonargparse resolves short class names among the imported subclasses: the methods are
    # (this package), the datamodules must be too (``--data DigitsDataModule``)
    import datamodules  # noqa: F401

    return SSLCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        trainer_defaults=TRAINER_DEFAULTS if trainer_defaults is None else trainer_defaults,
        save_config_kwargs={"overwrite": True},
        save_config_callback=RunRecords if save_config else None,
        auto_configure_optimizers=False,
    )


def print_help(file: Any = None) -> None:
    """``ssl-modules --help``: every subcommand with one line each."""
    lines = ["usage: ssl-modules SUBCOMMAND [options]", "", "subcommands:"]
    lines += [f"  {name:<9} {text}" for name, text in SUBCOMMANDS.items()]
    lines += [
        "",
        "ssl-modules SUBCOMMAND --help shows a subcommand's options;",
        "ssl-modules fit --model.help SimCLRModule (or --data.help DigitsDataModule) a class's arguments.",
    ]
    print("\n".join(lines), file=file or sys.stdout)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print_help()
        if not argv:
            raise SystemExit(2)
        return
    default_to_offline_wandb()
    if argv[0] == "bench":
        from ssl_modules.evaluation.bench import main as bench_main

        bench_main(argv[1:])
        return
    if argv[0] == "run":
        fit_then_test(argv[1:])
        return
    # `export CKPT ...` and `predict CKPT ...` (a checkpoint first) are ssl_modules.export's;
    # `predict --config ... --ckpt_path ...` (options only) stays LightningCLI's predict
    if argv[0] == "export" or (argv[0] == "predict" and len(argv) > 1 and not argv[1].startswith("-")):
        from ssl_modules.export import export_main, predict_main

        (export_main if argv[0] == "export" else predict_main)(argv[1:])
        return
    try:
        build_cli(with_checkpoint_config(argv))
    except Exception as error:
        message = configuration_error_message(error)
        if message is None:
            raise
        raise SystemExit(f"error: {message}") from error


def configuration_error_message(error: BaseException) -> str | None:
    """The one-line message of a configuration or data error, ``None`` for anything else.

    A configuration or data error is a ``ValueError`` or ``OSError`` (a missing file) raised while
    the CLI builds the model, datamodule and trainer, or in ``prepare_data``/``setup`` before
    the first step. Everything else (a bug in user code, a shape error during training) keeps
    its traceback, as does everything with ``SSL_MODULES_TRACEBACK=1``.
    """
    if os.environ.get("SSL_MODULES_TRACEBACK") or not isinstance(error, _SETUP_ERRORS):
        return None
    frames = {frame.name for frame in traceback.extract_tb(error.__traceback__)}
    if not frames & _SETUP_FRAMES or frames & _TRAINING_FRAMES:
        return None
    return readable_error(error)


def readable_error(error: BaseException) -> str:
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


# -- test/validate/predict --ckpt_path: the checkpoint's own config ----------------------
def _option_values(argv: list[str], option: str) -> list[str]:
    values = []
    for index, token in enumerate(argv):
        if token == option and index + 1 < len(argv):
            values.append(argv[index + 1])
        elif token.startswith(option + "="):
            values.append(token.split("=", 1)[1])
    return values


def checkpoint_config_args(path: str | Path) -> list[str]:
    """``--model``/``--data`` arguments rebuilding a checkpoint's model and datamodule config.

    The model's comes from the checkpoint's ``hyper_parameters`` (``_class_path`` and the init
    arguments the CLI saved), the datamodule's from ``datamodule_hyper_parameters`` (saved by
    ``RunRecords``). The data facts are left out: they are linked from the datamodule again.
    """
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    args: list[str] = []
    for option, key, skip in (
        ("--data", "datamodule_hyper_parameters", ()),
        ("--model", "hyper_parameters", DATA_FACTS),
    ):
        saved = dict(checkpoint.get(key) or {})
        if "_class_path" not in saved:
            continue
        init_args = {k: v for k, v in saved.items() if not k.startswith("_") and k not in skip}
        args += [option, json.dumps({"class_path": saved["_class_path"], "init_args": init_args})]
    return args


def with_checkpoint_config(argv: list[str]) -> list[str]:
    """``test``/``validate``/``predict`` with ``--ckpt_path``: the checkpoint's model and data
    config go first, so the checkpoint alone is enough and any later argument still overrides."""
    if not argv or argv[0] not in ("test", "validate", "predict"):
        return argv
    paths = _option_values(argv[1:], "--ckpt_path")
    if not paths or not Path(paths[-1]).is_file():
        return argv
    return [argv[0], *checkpoint_config_args(paths[-1]), *argv[1:]]


# -- a method switched with --model keeps the earlier method's lr --------------------------
def _class_name(value: str) -> str:
    return value.rsplit(".", 1)[-1]


def _model_section(value: Any) -> tuple[str | None, set[str]]:
    """(class name or None, init-arg keys) of a ``model:`` section or a ``--model`` value."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            value = yaml.safe_load(text)
        elif text.endswith((".yaml", ".yml")) and Path(text).is_file():
            value = yaml.safe_load(Path(text).read_text())
            value = value.get("model", value) if isinstance(value, dict) else value
        else:
            return _class_name(text), set()
    if not isinstance(value, dict):
        return None, set()
    class_path = value.get("class_path")
    keys = set(value.get("init_args") or {}) | {k for k in value if k not in ("class_path", "init_args")}
    return (_class_name(class_path) if class_path else None), keys


def inherited_optimizer_args(argv: list[str]) -> tuple[str | None, set[str]]:
    """The earlier method and the ``lr``/``weight_decay`` it set that the method chosen later with
    ``--model`` (or a later config's ``class_path``) inherits, reading ``argv`` in order."""
    current: str | None = None
    set_by: dict[str, str | None] = {}  # optimizer argument -> the method whose config set it

    def choose(name: str | None, keys: set[str]) -> None:
        nonlocal current
        current = name or current
        for key in keys & set(METHOD_OPTIMIZER_ARGS):
            set_by[key] = current

    index = 0
    while index < len(argv):
        option, equals, value = argv[index].partition("=")
        if not equals and (option in ("--config", "--model") or option.startswith("--model.")):
            index += 1
            value = argv[index] if index < len(argv) else ""
        index += 1
        if option == "--config" and Path(value).is_file():
            loaded = yaml.safe_load(Path(value).read_text()) or {}
            if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
                choose(*_model_section(loaded["model"]))
        elif option == "--model":
            choose(*_model_section(value))
        elif option == "--model.class_path":
            choose(_class_name(value), set())
        elif option.startswith("--model.") and not option.endswith(".help"):
            choose(None, {option[len("--model.") :].removeprefix("init_args.").split(".")[0]})
    inherited = {key: source for key, source in set_by.items() if source is not None and source != current}
    return (sorted(set(inherited.values()))[0] if inherited else None), set(inherited)


def warn_inherited_optimizer_args(argv: list[str], model_config: Any) -> None:
    source, keys = inherited_optimizer_args(argv)
    if not keys or model_config is None:
        return
    import importlib
    import inspect

    class_path = model_config.get("class_path") if hasattr(model_config, "get") else None
    init_args = model_config.get("init_args") if hasattr(model_config, "get") else None
    if not class_path:
        return
    module, name = class_path.rsplit(".", 1)
    try:
        parameters = inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters
    except (ImportError, AttributeError, ValueError):
        parameters = {}
    kept = ", ".join(f"{key}={getattr(init_args, key, None) if init_args else None}" for key in sorted(keys))
    defaults = ", ".join(
        f"{key}={parameters[key].default}"
        for key in sorted(keys)
        if key in parameters and parameters[key].default is not inspect.Parameter.empty
    )
    rank_zero_warn(
        f"the model {name} was chosen after {source} and keeps {source}'s {kept} from an earlier config "
        f"(the CLI carries over the arguments both methods accept); {name}'s own default is "
        f"{defaults or 'not set'}; pass its config (--config configs/<method>.yaml) after the other one, "
        f"or set {' and '.join('--model.' + key for key in sorted(keys))} explicitly.",
        category=UserWarning,
    )


def fit_then_test(argv: list[str]) -> dict[str, float]:
    """``ssl-modules run``: ``fit`` then ``test`` of the final model in one process; prints ``test/acc``.

    Takes the same ``--config``/``--key value`` arguments as ``ssl-modules fit``.
    """
    try:
        cli = build_cli(argv, run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    except Exception as error:
        message = configuration_error_message(error)
        if message is None:
            raise
        raise SystemExit(f"error: {message}") from error
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule)[0]
    if cli.trainer.is_global_zero:
        print(f"test/acc = {results['test/acc']:.4f}")
    return results


if __name__ == "__main__":
    main()
