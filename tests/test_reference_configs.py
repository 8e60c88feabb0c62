"""configs/reference/*.yaml: each is a complete config the CLI accepts, with the papers' settings.

Every file is parsed *and instantiated* by the real CLI (a typo, a wrong type or a value the
module refuses fails), on CPU and without a logger; the datasets are not on disk, and nothing
here reads them (datamodules load in ``setup``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ssl_modules.cli import build_cli

REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "reference"
CONFIGS = sorted(REFERENCE.glob("*.yaml"))
CPU = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.precision=32-true",
    "--trainer.logger=false",
]


def instantiate(config: Path | str, extra: list[str] | None = None):
    return build_cli(["--config", str(config), *CPU, *(extra or [])], run=False, save_config=False)


def test_the_reference_set_is_there():
    names = {path.stem for path in CONFIGS}
    for expected in (
        "fixmatch_cifar10_40",
        "fixmatch_cifar10_250",
        "fixmatch_cifar10_4000",
        "fixmatch_cifar100_2500",
        "fixmatch_cifar100_10000",
        "fixmatch_svhn_40",
        "fixmatch_svhn_250",
        "fixmatch_svhn_1000",
        "fixmatch_stl10_1000",
        "simclr_cifar10",
        "moco_v2_cifar10",
        "byol_cifar10",
        "barlow_twins_cifar10",
        *(
            f"{method}_{setting}"
            for method in ("uda", "mixmatch", "flexmatch", "freematch", "softmatch")
            for setting in ("cifar10_40", "cifar10_250", "cifar10_4000", "cifar100_400")
        ),
        "vicreg_cifar10",
        "simsiam_cifar10",
        "mae_cifar10",
        "dino_cifar10",
        "swav_cifar10",
    ):
        assert expected in names


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_reference_config_instantiates(config, tmp_path):
    raw = yaml.safe_load(config.read_text())
    assert {"trainer", "data", "model"} <= set(raw), f"{config.name} must be a complete config"
    cli = instantiate(config, [f"--data.root={tmp_path}"])
    model, data = cli.model, cli.datamodule
    assert type(model).__name__ == raw["model"]["class_path"].rsplit(".", 1)[1]
    # the data facts reach the model through the CLI's links, never from the method section
    assert model.hparams.num_classes == data.num_classes
    assert model.hparams.image_size == data.image_size
    for key, value in raw["model"]["init_args"].items():
        assert model.hparams[key] == value, f"{config.name}: model.{key}"
    for key, value in raw["data"]["init_args"].items():
        if key != "root":
            assert getattr(data, key) == value, f"{config.name}: data.{key}"


FIXMATCH = [path for path in CONFIGS if path.stem.startswith("fixmatch_")]


@pytest.mark.parametrize("config", FIXMATCH, ids=[path.stem for path in FIXMATCH])
def test_fixmatch_references_carry_the_papers_settings(config):
    """Sohn et al. 2020, Sec. 4: B 64, mu 7, SGD 0.03 Nesterov, 2^20 steps, EMA 0.999, tau 0.95."""
    raw = yaml.safe_load(config.read_text())
    data, model = raw["data"]["init_args"], raw["model"]["init_args"]
    assert (data["batch_size"], data["unlabeled_batch_ratio"]) == (64, 7)
    assert raw["trainer"]["max_steps"] == 2**20
    assert (model["lr"], model["confidence_threshold"], model["ema_decay"]) == (0.03, 0.95, 0.999)
    assert model["evaluate_with_ema"] is True
    assert model["weight_decay"] == (1e-3 if "cifar100" in config.stem else 5e-4)
    labels = int(config.stem.rsplit("_", 1)[1])
    classes = 100 if "cifar100" in config.stem else 10
    assert data["labels_per_class"] * classes == labels, "the file name states the total label count"


def test_a_typo_in_a_config_fails(tmp_path):
    source = yaml.safe_load((REFERENCE / "fixmatch_cifar10_40.yaml").read_text())
    source["model"]["init_args"]["confidence_treshold"] = 0.9  # misspelt key
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(source))
    with pytest.raises(SystemExit):
        instantiate(broken, [f"--data.root={tmp_path}"])


def test_a_refused_value_fails(tmp_path):
    source = yaml.safe_load((REFERENCE / "fixmatch_cifar10_40.yaml").read_text())
    source["model"]["init_args"]["confidence_threshold"] = 1.5
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(source))
    with pytest.raises((SystemExit, ValueError)):
        instantiate(broken, [f"--data.root={tmp_path}"])
