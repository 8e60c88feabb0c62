"""The mutation harness (``benchmarks/mutation.py``, ``make mutation``) cannot rot silently.

Runs no mutant: checks that every hand-planted fault's snippet still occurs exactly once in
its file, that every mutant (hand-planted or generated) really changes its file into valid
Python, that the generator leaves docstrings, comments, f-strings and argument checks alone,
and that applying a mutant in a copy changes the file and restoring it gives it back.
"""

from __future__ import annotations

import ast
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

import ssl_modules

REPO = Path(__file__).resolve().parents[1]


def _load_harness():
    spec = importlib.util.spec_from_file_location("mutation_harness", REPO / "benchmarks" / "mutation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


harness = _load_harness()
OPERATOR_MUTANTS = harness.operator_mutants(REPO)


@pytest.mark.parametrize("mutant", harness.METHOD_MUTANTS, ids=lambda m: m.id)
def test_method_mutant_snippets_occur_exactly_once_and_mutate_into_valid_python(mutant) -> None:
    for edit in mutant.edits:
        text = (REPO / edit.path).read_text(encoding="utf-8")
        assert text.count(edit.original) == 1, (
            f"{mutant.id}: the snippet {edit.original!r} occurs {text.count(edit.original)} times in "
            f"{edit.path}; update METHOD_MUTANTS in benchmarks/mutation.py to the current code"
        )
        assert edit.replacement != edit.original
    for path, (original, mutated) in harness.mutated_sources(mutant, REPO).items():
        assert mutated != original
        ast.parse(mutated, filename=path)


def test_every_public_module_has_hand_planted_faults() -> None:
    covered = {mutant.module for mutant in harness.METHOD_MUTANTS}
    assert set(ssl_modules.__all__) <= covered, set(ssl_modules.__all__) - covered


def test_operator_mutants_cover_every_target_and_each_changes_its_file_into_valid_python() -> None:
    per_file = {path: 0 for path in harness.OPERATOR_TARGETS}
    sources = {path: (REPO / path).read_text(encoding="utf-8") for path in harness.OPERATOR_TARGETS}
    for mutant in OPERATOR_MUTANTS:
        (edit,) = mutant.edits
        source = sources[edit.path]
        assert source[edit.offset : edit.offset + len(edit.original)] == edit.original, mutant.id
        mutated = harness.apply_edits(source, [edit])
        assert mutated != source, mutant.id
        ast.parse(mutated)
        assert not mutant.validation
        per_file[edit.path] += 1
    assert all(count >= 5 for count in per_file.values()), per_file


def test_mutant_ids_are_unique() -> None:
    ids = [m.id for m in harness.all_mutants("all")]
    assert len(ids) == len(set(ids))


def test_generator_skips_docstrings_comments_f_strings_and_argument_checks() -> None:
    source = (
        "def f(x, y=1):\n"
        '    """doc: 1 + 2 < 3"""\n'
        "    # a comment: x - y\n"
        "    if x < 0:\n"
        '        raise ValueError(f"bad {x + 1}")\n'
        "    return x * (y - 2)\n"
    )
    collector = harness._OperatorCollector(source, "example.py", None)
    collector.visit(ast.parse(source))
    kept = sorted((label, line) for _, label, _, _, _, line, validation in collector.found if not validation)
    checks = sorted((label, line) for _, label, _, _, _, line, validation in collector.found if validation)
    assert kept == [("*->/", 6), ("-->+", 6), ("const 1->0", 1), ("const 2->1", 6)]
    assert checks == [("<-><=", 4), ("const 0->1", 4)]  # the check; the f-string is never mutated


def test_applying_a_mutant_in_a_copy_changes_the_file_and_restoring_gives_it_back(tmp_path: Path) -> None:
    method = next(m for m in harness.METHOD_MUTANTS if m.id == "ema/buffers-not-copied")
    operator = next(m for m in OPERATOR_MUTANTS if m.path == "ssl_modules/ema.py")
    for mutant in (method, operator):
        for edit in mutant.edits:
            (tmp_path / edit.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / edit.path, tmp_path / edit.path)
        before = {e.path: (tmp_path / e.path).read_text(encoding="utf-8") for e in mutant.edits}
        with harness.applied(mutant, tmp_path):
            for path, text in before.items():
                changed = (tmp_path / path).read_text(encoding="utf-8")
                assert changed != text
                assert all(e.replacement in changed for e in mutant.edits if e.path == path)
        assert {path: (tmp_path / path).read_text(encoding="utf-8") for path in before} == before
    assert (REPO / method.path).read_text(encoding="utf-8").count(method.edits[0].original) == 1


def test_a_snippet_that_no_longer_matches_is_an_error_not_a_silent_no_op(tmp_path: Path) -> None:
    (tmp_path / "module.py").write_text("x = 1\n", encoding="utf-8")
    stale = harness.Mutant("stale", "method", "", (harness.Edit("module.py", "x = 2", "x = 3"),), ())
    with pytest.raises(harness.MutationError), harness.applied(stale, tmp_path):
        pass
    assert (tmp_path / "module.py").read_text(encoding="utf-8") == "x = 1\n"


def test_test_selections_name_test_files_and_each_mutant_has_one_that_exists() -> None:
    for mutant in harness.all_mutants("all"):
        assert mutant.tests, mutant.id
        files = [t.split("::")[0] for t in mutant.tests]  # a file, or one test of it by node id
        assert all(f.startswith("tests/test_") and f.endswith(".py") for f in files), mutant.id
        assert any((REPO / f).exists() for f in files), mutant.id


@pytest.mark.parametrize("control", [harness.CONTROL_NO_OP, harness.CONTROL_BROKEN], ids=lambda m: m.id)
def test_control_mutants_apply(control) -> None:
    for path, (original, mutated) in harness.mutated_sources(control, REPO).items():
        assert mutated != original
        ast.parse(mutated, filename=path)
