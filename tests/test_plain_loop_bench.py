"""benchmarks/plain_loop.py: the supervised baseline vs a plain PyTorch loop, at a tiny size."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from ssl_modules import SupervisedModule

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("plain_loop_bench", ROOT / "benchmarks" / "plain_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain_loop") / "plain_loop.json"
    argv = ["--steps", "3", "--seeds", "0", "1", "--labels", "2", "all", "--sizes", "8", "--out", str(out)]
    bench.main(argv)
    return json.loads(out.read_text())


def test_output_has_both_sides_for_every_budget_size_and_seed(tiny_run) -> None:
    assert tiny_run["sides"] == ["library", "plain"]
    assert tiny_run["settings"]["steps"] == 3
    records = tiny_run["records"]
    assert len(records) == 2 * 2 * 2  # budgets x seeds x sides
    for record in records:
        assert record["steps"] == 3
        assert record["image_size"] == 8
        for key in ("val_acc", "test_acc"):
            assert 0.0 <= record[key] <= 1.0
    few = [r for r in records if r["labels_per_class"] == 2]
    assert all(r["labels"] == 20 for r in few)
    every = [r for r in records if r["labels_per_class"] is None]
    assert len({r["labels"] for r in every}) == 1 and every[0]["labels"] > 1000


def test_both_sides_of_a_row_train_on_the_same_labeled_split(tiny_run) -> None:
    by_key: dict = {}
    for record in tiny_run["records"]:
        key = (record["labels_per_class"], record["image_size"], record["seed"])
        by_key.setdefault(key, {})[record["side"]] = record["labeled_indices"]
    for sides in by_key.values():
        assert sides["library"] == sides["plain"]
    # the seed draws the split: two seeds, two different 2-per-class splits
    assert by_key[(2, 8, 0)]["plain"] != by_key[(2, 8, 1)]["plain"]


def test_rows_are_medians_over_seeds_and_the_table_shows_them(tiny_run) -> None:
    rows = tiny_run["rows"]
    assert [(r["labels_per_class"], r["image_size"]) for r in rows] == [(2, 8), (None, 8)]
    for row in rows:
        for side in ("library", "plain"):
            runs = [
                r
                for r in tiny_run["records"]
                if r["side"] == side and r["labels_per_class"] == row["labels_per_class"]
            ]
            assert row[side]["seeds"] == [0, 1]
            for key in ("val_acc", "test_acc"):
                assert row[side][f"{key}_median"] == pytest.approx(statistics.median(r[key] for r in runs))
    lines = tiny_run["table"].splitlines()
    assert "library val_acc" in lines[0] and "plain test_acc" in lines[0]
    assert len(lines) == 2 + len(rows)
    assert lines[2].startswith("| 2 | 20 | 8 |") and lines[3].startswith("| all |")
    assert f"{rows[0]['plain']['test_acc_median']:.4f}" in lines[2]


def test_summary_takes_the_median_over_seeds_per_side_budget_and_size(bench) -> None:
    def record(side, labels, size, seed, val, test):
        return dict(
            side=side,
            labels_per_class=labels,
            image_size=size,
            seed=seed,
            labels=10,
            val_acc=val,
            test_acc=test,
        )

    records = [
        record("library", 2, 16, 0, 0.1, 0.5),
        record("library", 2, 16, 1, 0.2, 0.9),
        record("library", 2, 16, 2, 0.9, 0.6),
        record("plain", 2, 16, 0, 0.3, 0.3),
        record("plain", 2, 16, 1, 0.4, 0.3),
        record("plain", 2, 16, 2, 0.5, 0.0),
        record("library", 2, 32, 0, 0.7, 0.7),
        record("plain", 2, 32, 0, 0.8, 0.8),
    ]
    rows = bench.summarise(records, ["library", "plain"])
    assert [(r["labels_per_class"], r["image_size"]) for r in rows] == [(2, 16), (2, 32)]
    assert rows[0]["library"]["val_acc_median"] == pytest.approx(0.2)  # the mean would be 0.4
    assert rows[0]["library"]["test_acc_median"] == pytest.approx(0.6)
    assert rows[0]["plain"]["val_acc_median"] == pytest.approx(0.4)
    assert rows[0]["plain"]["test_acc_median"] == pytest.approx(0.3)
    assert rows[0]["library"]["seeds"] == [0, 1, 2]
    assert rows[1]["plain"]["val_acc_median"] == pytest.approx(0.8)
    # paired by seed: each seed's library val_acc minus the plain loop's on the same split
    assert rows[0]["library"]["val_acc_minus_plain"] == pytest.approx([-0.2, -0.2, 0.4])
    assert rows[1]["library"]["val_acc_minus_plain"] == pytest.approx([-0.1])


def test_grid_mode_never_touches_the_test_split(bench, tmp_path, monkeypatch) -> None:
    make_data = bench.make_data

    def without_test(*args, **kwargs):
        data = make_data(*args, **kwargs)
        data.test_dataset = None  # any evaluation on test would now fail
        return data

    monkeypatch.setattr(bench, "make_data", without_test)
    out = tmp_path / "grid.json"
    argv = ["--grid", "sgd0.03", "adamw1e-3", "--steps", "2", "--seeds", "0", "--labels", "2"]
    bench.main(argv + ["--sizes", "8", "--grid-out", str(out)])
    result = json.loads(out.read_text())
    assert result["sides"] == ["sgd0.03", "adamw1e-3", "plain"]
    assert set(result["candidates"]) == {"sgd0.03", "adamw1e-3"}
    for record in result["records"]:
        assert "test_acc" not in record and 0.0 <= record["val_acc"] <= 1.0
    assert "test_acc" not in result["table"]


def test_plain_loop_trains_on_the_labeled_images_only(bench, monkeypatch) -> None:
    data = bench.make_data(2, 8, seed=3, batch_size=16)
    images, _ = bench.split_tensors(data.train_dataset)
    labeled = {images[i].flatten().tolist().__repr__() for i in data.labeled_indices}
    seen = []
    shift = bench.random_shift

    def recording(batch, max_shift, generator):
        seen.append((batch * 255).round().to(torch.uint8))
        return shift(batch, max_shift, generator)

    monkeypatch.setattr(bench, "random_shift", recording)
    record = bench.run_plain(data, seed=3, steps=4, batch_size=16, with_test=False)
    assert record["steps"] == 4 and len(seen) == 4
    for batch in seen:
        assert len(batch) == 16
        assert all(image.flatten().tolist().__repr__() in labeled for image in batch)


def test_random_shift_moves_each_image_by_an_integer_offset_with_zero_fill(bench) -> None:
    torch.manual_seed(0)
    images = torch.rand(64, 2, 6, 7) + 0.5  # no zeros inside, so the zero fill is visible
    out = bench.random_shift(images, 2, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    offsets = set()
    for image, shifted in zip(images, out):
        matches = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                expected = torch.zeros_like(image)  # content moves by (dy, dx); what enters is 0
                h, w = image.shape[1:]
                expected[:, max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)] = image[
                    :, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)
                ]
                if torch.equal(shifted, expected):
                    matches.append((dy, dx))
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 10  # independent offsets per image, not one for the whole batch


def test_library_side_is_supervised_yaml_and_matches_the_module_defaults(bench) -> None:
    data = bench.make_data(2, 8, seed=0, batch_size=16)
    model = bench.library_model(data)
    init_args = yaml.safe_load((ROOT / "configs" / "supervised.yaml").read_text())["model"]["init_args"]
    assert type(model) is SupervisedModule
    for key, value in init_args.items():
        assert model.hparams[key] == value, key
    # the config spells out the module's defaults: the README's baseline is the default recipe
    default = SupervisedModule(**bench.data_facts(data))
    for key in ("lr", "weight_decay", "backbone"):
        assert default.hparams[key] == init_args[key], key
