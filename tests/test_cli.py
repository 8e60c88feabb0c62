"""The CLI parses every YAML in configs/, refuses typos, links data facts, and bench keeps its contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ssl_modules.cli import DATA_FACTS, build_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
METHOD_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml"))
RECIPES = sorted((CONFIGS / "recipes").glob("*.yaml"))
DATA_CONFIGS = sorted((CONFIGS / "data").glob("*.yaml"))
TRAINER_CONFIGS = sorted((CONFIGS / "trainer").glob("*.yaml"))
LOGGER_CONFIGS = sorted((CONFIGS / "logger").glob("*.yaml"))
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false"]

# DESIGN.md: one file a method, with these names (contract)
CONTRACT_METHOD_CONFIGS = {
    "supervised",
    "linear_probe",
    "self_training",
    "distillation",
    "mean_teacher",
    "noisy_student",
    "fixmatch",
    "rotation",
    "jigsaw",
    "colorization",
    "denoising_autoencoder",
    "simclr",
    "moco",
    "byol",
    "barlow_twins",
}
CONTRACT_DATA_CONFIGS = {
    "digits",
    "mnist",
    "fashion_mnist",
    "cifar10",
    "cifar100",
    "svhn",
    "stl10",
    "image_folder",
}


def instantiate(*configs: Path | str, extra: list[str] | None = None):
    args = []
    for config in configs:
        args += ["--config", str(config)]
    return build_cli(args=args + QUIET + list(extra or []), run=False, save_config=False)


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A supervised digits classifier: the fixed teacher of the distillation configs."""
    cli = instantiate(
        CONFIGS / "data" / "digits.yaml", CONFIGS / "supervised.yaml", extra=["--trainer.max_steps=2"]
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    cli.trainer.save_checkpoint(path)
    return path


def test_contract_config_names_exist() -> None:
    assert CONTRACT_METHOD_CONFIGS <= {p.stem for p in METHOD_CONFIGS}
    assert CONTRACT_DATA_CONFIGS <= {p.stem for p in DATA_CONFIGS}


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=lambda p: p.stem)
def test_every_method_config_instantiates_on_digits(config: Path, teacher_checkpoint: Path) -> None:
    text = yaml.safe_load(config.read_text())
    assert set(text) == {"model"}, "a method config holds only the model section"
    assert not set(text["model"].get("init_args", {})) & set(DATA_FACTS), "data facts are linked, never set"
    extra = []
    if "teacher_checkpoint" in config.read_text():
        extra = [f"--model.teacher_checkpoint={teacher_checkpoint}"]
    # colorization needs colour images (a clear error on digits, tested with the method)
    data = CONFIGS / "data" / ("synthetic.yaml" if config.stem == "colorization" else "digits.yaml")
    cli = instantiate(CONFIGS / "trainer" / "cpu.yaml", data, config, extra=extra)
    for fact in DATA_FACTS:
        expected, actual = getattr(cli.datamodule, fact), cli.model.hparams[fact]
        if isinstance(expected, tuple):
            actual = tuple(actual)
        assert actual == expected, f"{fact} was not linked from the datamodule"


@pytest.mark.parametrize("config", DATA_CONFIGS, ids=lambda p: p.stem)
def test_every_data_config_instantiates(config: Path, tmp_path: Path) -> None:
    extra = []
    if config.stem == "image_folder":
        for split in ("train", "test"):
            for cls in ("a", "b"):
                (tmp_path / split / cls).mkdir(parents=True)
                from PIL import Image

                for i in range(3):
                    Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
        extra = [f"--data.root={tmp_path}"]
    cli = instantiate(CONFIGS / "supervised.yaml", config, extra=extra)
    assert cli.model.num_classes == cli.datamodule.num_classes


@pytest.mark.parametrize(
    "config", TRAINER_CONFIGS + LOGGER_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}"
)
def test_trainer_and_logger_configs_parse(config: Path) -> None:
    from lightning.pytorch.cli import LightningArgumentParser

    parser = LightningArgumentParser()
    parser.add_lightning_class_args(__import__("lightning").Trainer, "trainer")
    parser.add_argument("--seed_everything", type=int, default=0)
    parsed = parser.parse_path(str(config))
    assert "trainer" in parsed


def test_typo_in_config_fails_with_cli_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model:\n  class_path: ssl_modules.SupervisedModule\n  init_args:\n    learning_rat: 0.1\n"
    )
    with pytest.raises(SystemExit):
        instantiate(CONFIGS / "data" / "digits.yaml", bad)


def test_unknown_backbone_lists_valid_names() -> None:
    from ssl_modules.backbones import build_backbone

    with pytest.raises(ValueError, match="unknown backbone 'resnet_9000'.*small_cnn"):
        build_backbone("resnet_9000", 3)


def run_bench(tmp_path: Path, *arguments: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """``ssl-modules bench ARGUMENTS --out``, in a fresh process in ``tmp_path``; must succeed."""
    out = tmp_path / "results.json"
    command = [sys.executable, "-m", "ssl_modules.cli", "bench", *arguments, "--out", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed, json.loads(out.read_text())


def test_bench_writes_contract_records(tmp_path: Path) -> None:
    completed, records = run_bench(
        tmp_path,
        str(CONFIGS / "supervised.yaml"),
        "--data",
        str(CONFIGS / "data" / "digits.yaml"),
        "--seeds",
        "0",
        "1",
        "--max-steps",
        "3",
        "--set",
        "data.labels_per_class=2",
        "--jobs",
        "2",
    )
    assert [r["seed"] for r in records] == [0, 1]
    for record in records:
        for key in (
            "method",
            "seed",
            "labels",
            "test_acc",
            "fit_seconds",
            "train_samples_per_s",
            "peak_memory_mb",
        ):
            assert key in record, key
        assert record["method"] == "supervised"
        assert record["labels"] == 20  # 2 per class x 10 digits
        assert record["steps"] == 3
        assert 0 <= record["test_acc"] <= 1 and record["train_samples_per_s"] > 0
    # the seed also draws the labeled split
    assert records[0]["labeled_indices"] != records[1]["labeled_indices"]
    assert "| supervised | 20 | 2 |" in completed.stdout
    assert not list(tmp_path.glob("config.yaml")), "bench must not litter the working directory"


def test_bench_last_k_reports_the_median_of_the_last_validation_runs(tmp_path: Path) -> None:
    completed, (record,) = run_bench(
        tmp_path,
        str(CONFIGS / "supervised.yaml"),
        "--data",
        str(CONFIGS / "data" / "digits.yaml"),
        "--max-steps",
        "6",
        "--last-k",
        "2",
        "--val-every",
        "2",
    )
    steps = [step for step, _ in record["val_acc_history"]]
    assert steps == [2, 4, 6]  # every 2 steps, counted across epochs
    last_two = [acc for _, acc in record["val_acc_history"][-2:]]
    assert record["val_acc_last_k"] == 2
    assert record["val_acc_last_k_median"] == pytest.approx(sum(last_two) / 2)
    assert "val_acc, median of last 2" in completed.stdout


def test_last_k_summary_needs_enough_validation_runs() -> None:
    from ssl_modules.evaluation.bench import last_k_summary

    assert last_k_summary([10, 20], [0.5, 0.7], None) == {}
    summary = last_k_summary([10, 20, 30], [0.5, 0.9, 0.7], 3)
    assert summary["val_acc_last_k_median"] == 0.7
    with pytest.raises(RuntimeError, match="needs 3 validation runs but fit made 2"):
        last_k_summary([10, 20], [0.5, 0.7], 3)


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--val-every", "5"], "only applies with --last-k"), (["--last-k", "2"], "needs --val-every")],
)
def test_bench_refuses_inconsistent_last_k_flags(flags: list[str], message: str) -> None:
    from ssl_modules.evaluation.bench import main

    with pytest.raises(SystemExit, match=message):
        main([str(CONFIGS / "supervised.yaml"), "--data", str(CONFIGS / "data" / "digits.yaml"), *flags])


def test_run_prints_test_accuracy(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "ssl_modules.cli",
        "run",
        "--config",
        str(CONFIGS / "trainer" / "cpu.yaml"),
    ]
    command += [
        "--config",
        str(CONFIGS / "data" / "digits.yaml"),
        "--config",
        str(CONFIGS / "supervised.yaml"),
    ]
    command += ["--trainer.max_steps=3", "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "test/acc = " in completed.stdout


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_name_existing_configs_and_earlier_stages(recipe: Path) -> None:
    from ssl_modules.evaluation.bench import plan_stages

    stages = plan_stages(str(recipe), downstream=None)
    names = [stage.name for stage in stages]
    assert len(set(names)) == len(names)
    for index, stage in enumerate(stages):
        assert Path(stage.config).is_file()
        if stage.checkpoint_from is not None:
            assert stage.checkpoint_from in names[:index]
            assert stages[names.index(stage.checkpoint_from)].keep_checkpoint


def test_bench_recipe_hands_checkpoint_to_next_stage(tmp_path: Path) -> None:
    _, records = run_bench(
        tmp_path,
        str(CONFIGS / "recipes" / "distillation.yaml"),
        "--data",
        str(CONFIGS / "data" / "digits.yaml"),
        "--max-steps",
        "2",
    )
    assert [r["method"] for r in records] == ["distillation-teacher", "distillation"]
    assert records[1]["initialised_from"] == "distillation-teacher"


def test_cli_shows_the_modules_own_error_message(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "ssl_modules.cli",
        "fit",
        "--config",
        str(CONFIGS / "data" / "digits.yaml"),
    ]
    command += ["--config", str(CONFIGS / "colorization.yaml"), "--trainer.logger=false"]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert completed.returncode != 0
    last_line = completed.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ColorizationPretext needs colour (3-channel RGB) images"), last_line


def test_bench_stage_settings_override_the_global_ones(tmp_path: Path) -> None:
    _, (record,) = run_bench(
        tmp_path,
        str(CONFIGS / "recipes" / "supervised_all_labels.yaml"),
        "--data",
        str(CONFIGS / "data" / "digits.yaml"),
        "--max-steps",
        "1",
    )
    assert record["method"] == "supervised-all-labels"
    assert record["labels"] > 1000 and record["labels_per_class"] is None  # every training image


def test_bench_downstream_probes_each_pretrained_checkpoint(tmp_path: Path) -> None:
    _, records = run_bench(
        tmp_path,
        str(CONFIGS / "rotation.yaml"),
        "--data",
        str(CONFIGS / "data" / "digits.yaml"),
        "--max-steps",
        "2",
        "--set",
        "data.labels_per_class=null",
        "--set",
        "data.label_fraction=0.1",
        "--downstream",
        str(CONFIGS / "linear_probe.yaml"),
        str(CONFIGS / "fine_tune.yaml"),
    )
    assert [r["method"] for r in records] == ["rotation", "rotation+linear_probe", "rotation+fine_tune"]
    assert all(
        r["label_fraction"] == 0.1 and 120 <= r["labels"] <= 140 for r in records
    )  # ~10 % of each class
    assert [r.get("initialised_from") for r in records] == [None, "rotation", "rotation"]
