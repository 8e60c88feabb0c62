"""What a user meets first: logged images that show, one folder per run, checkpoints, CLI help and errors.

The fits here are a few steps on tiny generated data (3 classes, 12 px) through ``ssl_modules.cli.main``,
in a temporary working directory (``runs/`` lands there); W&B runs offline.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

import datamodules
import ssl_modules
from ssl_modules import SupervisedModule
from ssl_modules.callbacks.visuals import log_image_grid
from ssl_modules.cli import SUBCOMMANDS, build_cli, inherited_optimizer_args, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TINY_DATA = {
    "class_path": "datamodules.SyntheticDataModule",
    "init_args": {
        "num_classes": 3,
        "channels": 3,
        "image_size": 12,
        "train_per_class": 12,
        "test_per_class": 4,
        "labels_per_class": 3,
        "batch_size": 8,
        "val_size": 6,
    },
}
# an epoch of TINY_DATA is 3-4 steps, so 5 steps validate once (at the first epoch end), then train on
TINY_TRAINER = {
    "accelerator": "cpu",
    "devices": 1,
    "max_steps": 5,
    "check_val_every_n_epoch": 1,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
SIMCLR_TINY = ["--model.projection_hidden_dim=16", "--model.projection_dim=8"]


def tiny_config(directory: Path) -> Path:
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump({"data": TINY_DATA, "trainer": TINY_TRAINER, "seed_everything": 0}))
    return path


def png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def assert_visible(pixels: np.ndarray, where: Path) -> None:
    """A logged grid that shows: 0-255 values, not 0/1 (a float image written as it is), not constant."""
    assert pixels.dtype == np.uint8
    assert pixels.max() >= 128, f"{where}: brightest pixel {pixels.max()} of 255 (a near-black image)"
    assert len(np.unique(pixels)) > 16, f"{where}: {len(np.unique(pixels))} distinct values"


def finish_wandb() -> None:
    import wandb

    if wandb.run is not None:
        wandb.finish()


# -- W&B (offline) --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wandb_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """Two SimCLR fits in a row with the default logger (W&B, offline), the t-SNE callback on;
    returns the working directory and, per run, the W&B config as the run held it."""
    work = tmp_path_factory.mktemp("wandb_work")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(work)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    callbacks = work / "tsne.yaml"
    callbacks.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "callbacks": [
                        {
                            "class_path": "ssl_modules.callbacks.embeddings.EmbeddingPlotCallback",
                            "init_args": {"every_n_epochs": 1},
                        }
                    ]
                }
            }
        )
    )
    configs = []
    try:
        for seed in (0, 1):
            torch.manual_seed(0)
            main(
                ["fit", "--config", str(tiny_config(work)), "--config", str(CONFIGS / "simclr.yaml")]
                + ["--config", str(callbacks), f"--data.split_seed={seed}", *SIMCLR_TINY]
            )
            import wandb

            configs.append(dict(wandb.run.config.as_dict()))
            finish_wandb()
    finally:
        finish_wandb()
        monkeypatch.undo()
    return work, configs


def wandb_run_dirs(work: Path) -> list[Path]:
    return sorted((work / "runs" / "wandb").glob("offline-run-*"))


def test_wandb_images_are_visible_pngs(wandb_runs: tuple[Path, list[dict]]) -> None:
    work, _ = wandb_runs
    for run_dir in wandb_run_dirs(work):
        pngs = sorted((run_dir / "files" / "media" / "images").rglob("*.png"))
        keys = {png.parent.name + "/" + png.name.split("_")[0] for png in pngs}
        assert {"train/views", "val/embedding"} <= keys, keys  # the views grid and the t-SNE plot
        for png in pngs:
            assert_visible(png_pixels(png), png)


def test_wandb_runs_have_their_own_folders_with_every_record(wandb_runs: tuple[Path, list[dict]]) -> None:
    work, configs = wandb_runs
    offline = wandb_run_dirs(work)
    assert len(offline) == 2
    splits = []
    for run_dir, wandb_config in zip(offline, configs):
        run_id = run_dir.name.rsplit("-", 1)[-1]
        folder = work / "runs" / "wandb" / run_id
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert {"trainer", "data", "model", "seed_everything"} <= set(saved)
        assert saved["trainer"]["max_steps"] == 5 and saved["model"]["init_args"]["projection_dim"] == 8
        assert saved["data"]["init_args"]["image_size"] == 12
        split = json.loads((folder / "split.json").read_text())
        splits.append(split["labeled_indices"])
        assert split["split_seed"] == saved["data"]["init_args"]["split_seed"]
        assert (folder / "checkpoints" / "last.ckpt").is_file()
        assert (folder / "checkpoints" / "best.ckpt").is_file()
        # the W&B run holds the full config and both files
        for name in ("config.yaml", "split.json"):
            assert (run_dir / "files" / run_id / name).read_text() == (folder / name).read_text()
        assert wandb_config["trainer"]["max_steps"] == 5
        assert wandb_config["data"]["init_args"]["split_seed"] == saved["data"]["init_args"]["split_seed"]
        assert wandb_config["model"]["class_path"] == "ssl_modules.SimCLRModule"
        assert "data_split" in wandb_config
    assert splits[0] != splits[1], "the second run's split.json replaced the first one's"
    assert not (work / "runs" / "config.yaml").exists() and not (work / "runs" / "split.json").exists()


# -- CSV ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def csv_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two FixMatch fits with the CSV logger: 5 steps validating every epoch, then 3 steps under
    configs/trainer/cpu.yaml (validation every 5 epochs: none in 3 steps)."""
    work = tmp_path_factory.mktemp("csv_work")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(work)
    method = ["--config", str(CONFIGS / "logger" / "csv.yaml"), "--config", str(CONFIGS / "fixmatch.yaml")]
    method += ["--model.ema_decay=0"]  # a 5-step run: no EMA lag warning
    try:
        torch.manual_seed(0)
        main(["fit", "--config", str(tiny_config(work)), *method])
        main(
            ["fit", "--config", str(CONFIGS / "trainer" / "cpu.yaml"), "--config", str(tiny_config(work))]
            + ["--trainer.check_val_every_n_epoch=5", "--trainer.max_steps=3", "--data.split_seed=1", *method]
        )
    finally:
        monkeypatch.undo()
    return work


def test_csv_images_are_visible_pngs(csv_runs: Path) -> None:
    pngs = sorted((csv_runs / "runs" / "csv").glob("version_*/images/*.png"))
    assert len(pngs) == 2  # FixMatch's strong views, one per run
    for png in pngs:
        assert_visible(png_pixels(png), png)


def test_csv_runs_keep_their_own_records_and_a_final_last_checkpoint(csv_runs: Path) -> None:
    first, second = (csv_runs / "runs" / "csv" / name for name in ("version_0", "version_1"))
    splits = []
    for folder, split_seed in ((first, 0), (second, 1)):
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert saved["data"]["init_args"]["split_seed"] == split_seed
        assert saved["model"]["class_path"] == "ssl_modules.FixMatchModule"
        splits.append(json.loads((folder / "split.json").read_text())["labeled_indices"])
    assert splits[0] != splits[1]
    # validated at the first epoch end (step 3 or 4), trained on to step 5: last.ckpt is step 5
    last = torch.load(first / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    best = torch.load(first / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 5
    assert 0 < best["global_step"] < 5
    # cpu.yaml validates every 5 epochs: no validation in 3 steps, still a last.ckpt (and no best)
    assert sorted(p.name for p in (second / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.parametrize("subcommand", ["test", "validate"])
def test_test_and_validate_from_the_checkpoint_alone(csv_runs: Path, subcommand: str, tmp_path: Path) -> None:
    checkpoint = csv_runs / "runs" / "csv" / "version_0" / "checkpoints" / "last.ckpt"
    from ssl_modules.cli import with_checkpoint_config

    argv = [subcommand, "--ckpt_path", str(checkpoint), "--trainer.logger=false"]
    argv += ["--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"]
    cli = build_cli(with_checkpoint_config(argv))
    assert type(cli.model).__name__ == "FixMatchModule"
    assert type(cli.datamodule).__name__ == "SyntheticDataModule"
    assert cli.datamodule.image_size == 12 and cli.datamodule.split_seed == 0
    assert cli.model.hparams.lr == 0.03  # the checkpoint's, not a default
    metric = "test/acc" if subcommand == "test" else "val/acc"
    assert metric in cli.trainer.callback_metrics


# -- TensorBoard --------------------------------------------------------------------------
class _Trainer:
    sanity_checking = False
    global_step = 7
    global_rank = 0

    def __init__(self, logger: object) -> None:
        self.loggers = [logger]


class _Module:
    def __init__(self, logger: object) -> None:
        self._trainer = _Trainer(logger)


def test_tensorboard_gets_uint8_images() -> None:
    added = {}

    class TensorBoardLogger:  # dispatch is by class name, as for Lightning's
        class experiment:
            @staticmethod
            def add_image(key: str, image: torch.Tensor, global_step: int) -> None:
                added[key] = image

    images = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    log_image_grid(_Module(TensorBoardLogger()), "train/views", images, nrow=2)
    grid = added["train/views"]
    assert grid.dtype == torch.uint8 and grid.shape[0] == 3
    # the first image sits at (1, 1) after the 1-pixel padding: its values times 255
    expected = (images[0, 0] * 255).round().to(torch.uint8)
    assert torch.equal(grid[0, 1:7, 1:7], expected)


def test_tensorboard_event_file_image(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    images = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    log_image_grid(_Module(logger), "train/views", images, nrow=2)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    import io

    (record,) = events.Images("train/views")
    assert_visible(np.asarray(Image.open(io.BytesIO(record.encoded_image_string)).convert("RGB")), tmp_path)


# -- CLI help, class names, warnings --------------------------------------------------------
def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--help"])
    text = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", "run", "bench", "export"):
        assert f"\n  {name} " in text, name
    assert set(SUBCOMMANDS) == {"fit", "validate", "test", "predict", "run", "bench", "export"}


def _undocumented_arguments(cls: type) -> list[str]:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(cls, "init", fail_untyped=False)
    helps = {
        action.dest[len("init.") :]: action.help
        for action in parser._actions
        if action.dest.startswith("init.") and not action.dest.endswith(".help")
    }
    # the method's own arguments, and those it forwards with **kwargs to its bases (data facts,
    # optimizer, scheduler, backbone ...), which jsonargparse follows and shows too
    own = [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self"
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    return [name for name in dict.fromkeys([*own, *helps]) if not (helps.get(name) or "").strip()]


METHODS = [getattr(ssl_modules, name) for name in ssl_modules.__all__ if name.endswith(("Module", "Pretext"))]
METHODS += [ssl_modules.DenoisingAutoencoder]


@pytest.mark.parametrize("method", METHODS, ids=lambda cls: cls.__name__)
def test_every_method_argument_has_help(method: type) -> None:
    """``ssl-modules fit --model.help <Method>`` shows help text for every argument: the docstring
    parses (a trailing non-argument line in ``Args:`` used to drop the whole section)."""
    assert _undocumented_arguments(method) == []


@pytest.mark.parametrize("datamodule", [datamodules.DigitsDataModule, datamodules.SyntheticDataModule])
def test_every_datamodule_argument_has_help(datamodule: type) -> None:
    assert _undocumented_arguments(datamodule) == []


def test_short_class_names_and_no_warning_from_the_shell(tmp_path: Path) -> None:
    """``ssl-modules fit --data SyntheticDataModule --model SupervisedModule`` as typed in a shell
    (a fresh process: only what the CLI itself imports is registered), without LightningCLI's
    "args parameter" warning."""
    command = [sys.executable, "-m", "ssl_modules.cli", "fit", "--data", "SyntheticDataModule"]
    command += ["--model", "SupervisedModule", "--print_config"]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert completed.returncode == 0, completed.stderr
    printed = yaml.safe_load(completed.stdout)
    assert printed["data"]["class_path"] == "datamodules.SyntheticDataModule"
    assert printed["model"]["class_path"] == "ssl_modules.SupervisedModule"
    assert "args parameter" not in completed.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--config", "configs/fixmatch.yaml", "--model", "SimCLRModule"], {"lr", "weight_decay"}),
        (
            ["--config=configs/fixmatch.yaml", "--model=ssl_modules.SimCLRModule", "--model.lr=1"],
            {"weight_decay"},
        ),
        (
            ["--config", "configs/fixmatch.yaml", "--model", "SimCLRModule", "--model.init_args.lr", "1"],
            {"weight_decay"},
        ),
        (["--config", "configs/fixmatch.yaml", "--config", "configs/simclr.yaml"], set()),
        (["--config", "configs/fixmatch.yaml", "--model", "configs/simclr.yaml"], set()),
        (["--config", "configs/fixmatch.yaml", "--model", "FixMatchModule"], set()),
        (["--model", "SimCLRModule", "--model.lr", "1"], set()),
        (
            ["--config", "configs/supervised.yaml", "--model.class_path", "SimCLRModule"],
            {"lr", "weight_decay"},
        ),
    ],
)
def test_inherited_optimizer_args_follow_the_argument_order(
    argv: list[str], expected: set[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    source, keys = inherited_optimizer_args(argv)
    assert keys == expected
    assert (source is None) == (not expected)


def test_switching_method_warns_about_the_inherited_lr() -> None:
    args = [
        "--config",
        str(CONFIGS / "fixmatch.yaml"),
        "--model",
        "SimCLRModule",
        "--data",
        "SyntheticDataModule",
    ]
    with pytest.warns(
        UserWarning, match=r"SimCLRModule was chosen after FixMatchModule and keeps .*lr=0\.03"
    ):
        cli = build_cli([*args, "--trainer.logger=false"], run=False, save_config=False)
    assert cli.model.hparams.lr == 0.03  # what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="(?!.*was chosen after)")
        build_cli([*args, "--config", str(CONFIGS / "simclr.yaml"), "--trainer.logger=false"], run=False)


# -- errors -------------------------------------------------------------------------------
class ShapeBug(SupervisedModule):
    """A user's subclass with a bug: torch raises a ValueError for the mismatched batch sizes."""

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        images, labels = batch["labeled"].images, batch["labeled"].labels
        return F.cross_entropy(self(images)[:1], labels)


def _quiet(tmp_path: Path) -> list[str]:
    return ["--config", str(tiny_config(tmp_path)), "--trainer.logger=false", "--trainer.max_steps=2"]


@pytest.mark.parametrize("subcommand", ["fit", "run"])
def test_missing_pretrained_file_is_one_line(
    subcommand: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = [subcommand, *_quiet(tmp_path), "--model", "SupervisedModule", "--model.pretrained", "nope.ckpt"]
    with pytest.raises(SystemExit) as raised:
        main(argv)
    message = str(raised.value.code)
    assert (
        message == "error: pretrained checkpoint 'nope.ckpt' does not exist; pass the path of a .ckpt file."
    )


def test_data_error_is_one_line_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["fit", *_quiet(tmp_path), "--model", "SupervisedModule", "--data.labels_per_class=50"]
    with pytest.raises(SystemExit) as raised:
        main(argv)
    message = str(raised.value.code)
    assert message.startswith("error: labels_per_class=50 but class 0 has only") and "\n" not in message


def test_error_in_training_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["fit", *_quiet(tmp_path), "--model", f"{__name__}.ShapeBug"]
    with pytest.raises(ValueError, match="Expected input batch_size") as raised:
        main(argv)
    frames = [frame.name for frame in __import__("traceback").extract_tb(raised.value.__traceback__)]
    assert "training_step" in frames
