"""Mutation testing of the parts where a wrong line still trains: does the suite notice?

Plant one fault at a time in a copy of the repository, run the tests that should catch it,
and count the faults ("mutants") that leave every selected test green ("survivors").

Usage (slow: not part of ``make test``; ``make mutation`` runs the first line)::

    .venv/bin/python benchmarks/mutation.py --kind all --jobs 2
    .venv/bin/python benchmarks/mutation.py --kind method --only fixmatch --jobs 1
    .venv/bin/python benchmarks/mutation.py --list            # the mutants, nothing run

Two kinds of mutants:

- ``operator``: generated with Python's ``ast`` over ``ssl_modules/losses/*.py``,
  ``ssl_modules/ema.py``, ``ssl_modules/dist.py`` and the LR schedules of
  ``ssl_modules/base.py``: ``+``/``-``, ``*``/``/``, ``**`` -> ``*``, comparison boundaries
  (``<``/``<=``, ``>``/``>=``, ``==``/``!=``), ``and``/``or``, dropped ``not`` and unary minus,
  numeric constants 0 -> 1, 1 -> 0, 2 -> 1, ``True``/``False``, ``mean``/``sum``,
  ``max``/``min``, ``argmax``/``argmin``, ``softmax``/``log_softmax``, a dropped ``.detach()``,
  ``torch.no_grad()`` -> ``torch.enable_grad()``, the first two positional arguments of a call
  swapped, the two items of a ``torch.cat``/``stack`` list or of a 2-tuple assignment swapped.
  Docstrings, comments, f-strings, annotations and decorators are never mutated; mutants on
  validation code (``raise``, an ``if`` whose body only raises, ``_check_*``/``check_*``
  functions) only change error messages and are left out (``--include-validation`` adds them).
- ``method``: hand-planted faults in each method's ``training_step`` / update code, listed
  below as data (``METHOD_MUTANTS``: exact original snippet(s), replacement, description,
  the test files that must catch it), covering every module of ``ssl_modules.__all__``:
  which views are compared, which network is the target and how it moves, where the
  stop-gradient is, what is enqueued when, which weight multiplies which term, which view sets
  the pseudo-label, what DDP gathers, what a pretext task hides and predicts, how the
  representation is evaluated. ``tests/test_mutation_harness.py`` checks that every snippet
  still occurs exactly once, so the list cannot silently rot.

Why a harness of our own rather than ``mutmut``: on the project's 2-core CPU a generic tool
generates hundreds of mutants per ``training_step`` file (every token of every line,
argument checks and logging included), and the faults that matter there are method-level
(which view, which network, which weight), which an operator-level tool never writes; each
needs a behavioural test of seconds to a minute, so the generic run would take hours and
still miss the faults the issue lists. Here the operator mutants stay on the pure loss / EMA /
DDP / schedule code, where the fast loss-level tests run in seconds, and the method-level
faults are written by hand once and kept exact by a test.

How a mutant is run: the repository (``git ls-files --cached --others --exclude-standard``:
tracked files and new, not-ignored ones) is copied once per job into a temporary folder;
each mutant is applied there, ``python -m pytest -x -q -p no:cacheprovider <tests>`` runs with
the working directory and ``PYTHONPATH`` at the copy (checked at start: ``ssl_modules`` and
``datamodules`` must import from the copy, not from the editable install in ``.venv``) and
with ``PYTHONDONTWRITEBYTECODE=1`` (a stale ``.pyc`` of the same size and second could
otherwise hide a mutant), then the file is restored. A mutant is *killed* when pytest exits
non-zero (a timeout counts as killed and is reported apart). Each distinct test selection is
first run on the unmutated copy: a selection that fails there is reported and its mutants are
not run. Test files that do not exist (yet) are skipped and listed.

Survivors are either equivalent mutants (list them in ``EQUIVALENT`` with the reason) or
gaps in the tests. ``--confirm-survivors`` re-runs each survivor against the whole of
``tests/`` (what ``make test`` runs; slow).
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = "benchmarks/results/mutation.json"

# -- test selections ------------------------------------------------------------------------------
# Fast, most specific files first: pytest -x stops at the first failure.
T_JOINT_BEHAVIOUR = "tests/test_behaviour_joint_embedding.py"
T_SEMI_BEHAVIOUR = "tests/test_behaviour_semi_supervised.py"
T_PRETEXT_BEHAVIOUR = "tests/test_behaviour_pretext.py"
T_SCHEDULES = "tests/test_schedules.py"
T_DDP = "tests/test_ddp_gradients.py"
T_CONTRASTIVE_LOSSES = "tests/test_contrastive_losses.py"
T_CONTRASTIVE_METHODS = "tests/test_contrastive_methods.py"
T_SEMI_LOSSES = "tests/test_semi_supervised_losses.py"
T_SEMI_METHODS = "tests/test_semi_supervised_methods.py"
T_PRETEXT_AUGMENT = "tests/test_pretext_augment.py"
T_PRETEXT_METHODS = "tests/test_pretext_methods.py"
T_EVALUATION = "tests/test_ssl_evaluation.py"
T_NO_TEST_SELECTION = "tests/test_no_test_selection.py"
T_SUPERVISED = "tests/test_supervised.py"
T_MIXMATCH = "tests/test_mixmatch.py"
T_VICREG_SIMSIAM = "tests/test_vicreg_simsiam.py"
T_RULES_FLEX_FREE = "tests/test_rules_flexmatch_freematch.py"
T_RULES_SOFT_UDA = "tests/test_rules_softmatch_uda.py"
T_DINO_SWAV = ("tests/test_dino_swav_losses.py", "tests/test_dino_swav.py")
T_MAE = ("tests/test_mae.py", "tests/test_mae_loss.py")
T_TEMPLATE = "tests/test_joint_embedding_template.py"
T_MULTICROP = "tests/test_multicrop.py"
T_DDP_EXACT_SWAV = "tests/test_conformance.py::test_ddp_spawn_two_processes_on_cpu[SwAVModule]"
T_DDP_EXACT_DINO = "tests/test_conformance.py::test_ddp_spawn_two_processes_on_cpu[DINOModule]"

JOINT = (T_JOINT_BEHAVIOUR, T_CONTRASTIVE_LOSSES, T_CONTRASTIVE_METHODS)
JOINT_DDP = (*JOINT, T_DDP)
SEMI = (T_SEMI_BEHAVIOUR, T_SEMI_LOSSES, T_SCHEDULES, T_SEMI_METHODS)
PRETEXT = (T_PRETEXT_BEHAVIOUR, T_PRETEXT_AUGMENT, T_PRETEXT_METHODS)
EVALUATION = (T_EVALUATION, T_NO_TEST_SELECTION, T_JOINT_BEHAVIOUR, T_PRETEXT_BEHAVIOUR)
SUPERVISED = (T_SUPERVISED, T_SEMI_BEHAVIOUR, T_PRETEXT_BEHAVIOUR)
EMA_TESTS = (T_SCHEDULES, T_SEMI_BEHAVIOUR, T_JOINT_BEHAVIOUR, T_CONTRASTIVE_METHODS, T_SEMI_METHODS)

# Operator mutants: file -> (test selection, qualname prefixes to mutate or None for the whole file).
OPERATOR_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...] | None]] = {
    "ssl_modules/losses/contrastive.py": ((T_CONTRASTIVE_LOSSES, T_JOINT_BEHAVIOUR, T_DDP), None),
    "ssl_modules/losses/semi_supervised.py": ((T_SEMI_LOSSES, T_SCHEDULES, T_SEMI_BEHAVIOUR), None),
    "ssl_modules/losses/pretext.py": ((T_PRETEXT_BEHAVIOUR, T_PRETEXT_METHODS, T_PRETEXT_AUGMENT), None),
    # (not warn_if_ema_outlasts_run: it only words a warning)
    "ssl_modules/ema.py": (EMA_TESTS, ("warmup_ema_decay", "cosine_momentum", "copy_frozen", "ema_update")),
    "ssl_modules/dist.py": ((T_DDP,), None),
    "ssl_modules/base.py": ((T_SCHEDULES,), ("WarmupCosine", "FixMatchCosine")),
}

# Survivors known to be equivalent (no test can tell them apart): mutant id -> reason.
EQUIVALENT: dict[str, str] = {
    "losses/contrastive.py::BarlowTwinsLoss.forward::swap assigned pair#0": (
        "swapping z_a and z_b transposes the cross-correlation: same loss, same gradient"
    ),
    "losses/contrastive.py::BarlowTwinsLoss.forward::swap assigned pair#1": (
        "gathering both views swapped transposes the cross-correlation: same loss, same gradient"
    ),
    "losses/contrastive.py::alignment::swap assigned pair#0": "|a - b| is symmetric",
    "losses/semi_supervised.py::ConsistencyLoss.forward::swap args of softmax_mse_loss#0": (
        "the squared difference is symmetric and the teacher carries no gradient"
    ),
    "dist.py::is_distributed::>->>=#0": "with one rank the gather is the identity either way",
    "dist.py::is_distributed::const 1->0#0": "with one rank the gather is the identity either way",
}


# -- mutants ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Edit:
    """Replace ``original`` by ``replacement`` in ``path`` (repo-relative): at ``offset`` (a
    character offset) when given, else at its only occurrence."""

    path: str
    original: str
    replacement: str
    offset: int | None = None


@dataclass(frozen=True)
class Mutant:
    id: str
    kind: str  # "operator" or "method"
    description: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]
    module: str = ""  # the ssl_modules.__all__ class it breaks ("" for shared code)
    line: int = 0
    validation: bool = False

    @property
    def path(self) -> str:
        return self.edits[0].path


class MutationError(RuntimeError):
    pass


def apply_edits(text: str, edits: list[Edit]) -> str:
    """``text`` with every edit applied (all edits of one file); raises if a snippet is not
    found exactly where (or as often as) expected."""
    spans = []
    for edit in edits:
        if edit.offset is None:
            count = text.count(edit.original)
            if count != 1:
                raise MutationError(
                    f"{edit.path}: snippet found {count} times, expected once: {edit.original!r}"
                )
            start = text.index(edit.original)
        else:
            start = edit.offset
            if text[start : start + len(edit.original)] != edit.original:
                raise MutationError(f"{edit.path}: {edit.original!r} is no longer at offset {start}")
        spans.append((start, start + len(edit.original), edit.replacement))
    spans.sort()
    for (_, end, _), (next_start, _, _) in zip(spans, spans[1:]):
        if end > next_start:
            raise MutationError("overlapping edits")
    for start, end, replacement in reversed(spans):
        text = text[:start] + replacement + text[end:]
    return text


def mutated_sources(mutant: Mutant, root: Path) -> dict[str, tuple[str, str]]:
    """``{path: (original text, mutated text)}`` for the files ``mutant`` changes under ``root``."""
    by_path: dict[str, list[Edit]] = defaultdict(list)
    for edit in mutant.edits:
        by_path[edit.path].append(edit)
    result = {}
    for path, edits in by_path.items():
        original = (root / path).read_text(encoding="utf-8")
        result[path] = (original, apply_edits(original, edits))
    return result


@contextlib.contextmanager
def applied(mutant: Mutant, root: Path):
    """Apply ``mutant`` to the tree at ``root`` for the duration of the block, then restore it."""
    sources = mutated_sources(mutant, root)
    try:
        for path, (_, mutated) in sources.items():
            (root / path).write_text(mutated, encoding="utf-8")
        yield
    finally:
        for path, (original, _) in sources.items():
            (root / path).write_text(original, encoding="utf-8")
            if (root / path).read_text(encoding="utf-8") != original:
                raise MutationError(f"could not restore {path}")


# -- operator mutants, generated with ast -----------------------------------------------------------
BINOP_SWAPS = {
    ast.Add: ("+", "-"),
    ast.Sub: ("-", "+"),
    ast.Mult: ("*", "/"),
    ast.Div: ("/", "*"),
    ast.Pow: ("**", "*"),
    ast.FloorDiv: ("//", "/"),
}
COMPARE_SWAPS = {
    ast.Lt: ("<", "<="),
    ast.LtE: ("<=", "<"),
    ast.Gt: (">", ">="),
    ast.GtE: (">=", ">"),
    ast.Eq: ("==", "!="),
    ast.NotEq: ("!=", "=="),
}
METHOD_SWAPS = {
    "mean": "sum",
    "sum": "mean",
    "max": "min",
    "min": "max",
    "argmax": "argmin",
    "argmin": "argmax",
    "softmax": "log_softmax",
    "log_softmax": "softmax",
}
# calls whose first two arguments commute (or that only check): swapping them is equivalent
NO_SWAP_CALLS = {
    "zip", "isinstance", "issubclass", "getattr", "hasattr", "setattr", "range", "print", "max", "min",
    "len", "dict", "tuple", "list", "enumerate", "ValueError", "TypeError", "RuntimeError",
    "cosine_similarity", "mse_loss", "maximum", "minimum", "add", "mul", "eq", "rank_zero_warn",
    "lru_cache", "linspace", "meshgrid",
}  # fmt: skip


def _char_offsets(source: str) -> list[int]:
    """Character offset of the start of every line (1-based line numbers: index 0 unused)."""
    starts = [0, 0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    return starts


class _OperatorCollector(ast.NodeVisitor):
    def __init__(self, source: str, path: str, scopes: tuple[str, ...] | None) -> None:
        self.source = source
        self.lines = source.splitlines(keepends=True)
        self.line_starts = _char_offsets(source)
        self.path = path
        self.scopes = scopes
        self.qualname: list[str] = []
        self.validation = 0
        self.found: list[tuple[str, str, int, str, str, int, bool]] = []

    # positions ----------------------------------------------------------------------------------
    def offset(self, lineno: int, col_byte: int) -> int:
        line = self.lines[lineno - 1]
        return self.line_starts[lineno] + len(line.encode("utf-8")[:col_byte].decode("utf-8"))

    def start(self, node: ast.AST) -> int:
        return self.offset(node.lineno, node.col_offset)

    def end(self, node: ast.AST) -> int:
        return self.offset(node.end_lineno, node.end_col_offset)

    def add(self, label: str, start: int, original: str, replacement: str, lineno: int) -> None:
        if self.source[start : start + len(original)] != original:
            return  # could not locate the token exactly: skip rather than guess
        if self.scopes is not None and not any(
            ".".join(self.qualname).startswith(scope) for scope in self.scopes
        ):
            return
        qualname = ".".join(self.qualname) or "<module>"
        self.found.append((qualname, label, start, original, replacement, lineno, self.validation > 0))

    def add_in_gap(
        self, label: str, left: ast.AST, right: ast.AST, symbol: str, new: str, lineno: int
    ) -> None:
        gap_start = self.end(left)
        gap = self.source[gap_start : self.start(right)]
        match = re.search(r"(?<![\w=<>!*/])" + re.escape(symbol) + r"(?![=<>*/\w])", gap)
        if match is not None:
            self.add(label, gap_start + match.start(), symbol, new, lineno)

    # scopes -------------------------------------------------------------------------------------
    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.qualname.append(node.name)
        checker = node.name.startswith(("_check", "check_"))
        self.validation += checker
        for default in [*node.args.defaults, *[d for d in node.args.kw_defaults if d is not None]]:
            self.visit(default)
        for statement in node.body:  # decorators, annotations: never mutated
            self.visit(statement)
        self.validation -= checker
        self.qualname.pop()

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.qualname.append(node.name)
        for statement in node.body:
            self.visit(statement)
        self.qualname.pop()

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        return  # f-strings: messages only (and their positions are unreliable before 3.12)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        return

    def visit_Raise(self, node: ast.Raise) -> None:
        self.validation += 1
        self.generic_visit(node)
        self.validation -= 1

    def visit_If(self, node: ast.If) -> None:
        raises_only = bool(node.body) and all(isinstance(s, ast.Raise) for s in node.body)
        self.validation += raises_only
        self.visit(node.test)
        for statement in node.body:
            self.visit(statement)
        self.validation -= raises_only
        for statement in node.orelse:
            self.visit(statement)

    # mutations ----------------------------------------------------------------------------------
    def visit_BinOp(self, node: ast.BinOp) -> None:
        swap = BINOP_SWAPS.get(type(node.op))
        if swap is not None:
            symbol, new = swap
            self.add_in_gap(f"{symbol}->{new}", node.left, node.right, symbol, new, node.lineno)
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        left = node.left
        for op, right in zip(node.ops, node.comparators):
            swap = COMPARE_SWAPS.get(type(op))
            if swap is not None:
                symbol, new = swap
                self.add_in_gap(f"{symbol}->{new}", left, right, symbol, new, node.lineno)
            left = right
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        symbol, new = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
        for left, right in zip(node.values, node.values[1:]):
            self.add_in_gap(f"{symbol}->{new}", left, right, symbol, new, node.lineno)
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        start = self.start(node)
        if isinstance(node.op, ast.USub):
            self.add("drop unary -", start, "-", "", node.lineno)
        elif isinstance(node.op, ast.Not):
            match = re.match(r"not\s*", self.source[start:])
            if match is not None:
                self.add("drop not", start, match.group(), "", node.lineno)
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        value = node.value
        start, end = self.start(node), self.end(node)
        text = self.source[start:end]
        if isinstance(value, bool):
            self.add(f"{value}->{not value}", start, text, str(not value), node.lineno)
        elif isinstance(value, (int, float)) and value in (0, 1, 2):
            new = {0: 1, 1: 0, 2: 1}[int(value)]
            new_text = str(float(new)) if isinstance(value, float) else str(new)
            self.add(f"const {text}->{new_text}", start, text, new_text, node.lineno)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if isinstance(func, ast.Attribute):
            name_start = self.end(func) - len(func.attr)
            if func.attr in METHOD_SWAPS:
                new = METHOD_SWAPS[func.attr]
                self.add(f".{func.attr}->.{new}", name_start, func.attr, new, node.lineno)
            if func.attr == "detach" and not node.args and not node.keywords:
                start = self.end(func.value)
                self.add("drop .detach()", start, self.source[start : self.end(node)], "", node.lineno)
            if func.attr == "no_grad" and not node.args:
                self.add("no_grad->enable_grad", name_start, "no_grad", "enable_grad", node.lineno)
        elif isinstance(func, ast.Name) and func.id in ("min", "max"):
            new = "max" if func.id == "min" else "min"
            self.add(f"{func.id}->{new}", self.start(func), func.id, new, node.lineno)
        positional = [a for a in node.args if not isinstance(a, ast.Starred)]
        if (
            len(positional) == len(node.args) >= 2
            and name not in NO_SWAP_CALLS
            and not name.startswith(("_check", "check_"))
            and not any(isinstance(a, ast.Constant) for a in positional[:2])
        ):
            self._swap_two(f"swap args of {name}", positional[0], positional[1], node.lineno)
        if name in ("cat", "stack") and node.args and isinstance(node.args[0], (ast.List, ast.Tuple)):
            items = node.args[0].elts
            if len(items) == 2 and not any(isinstance(e, (ast.Constant, ast.Starred)) for e in items):
                self._swap_two(f"swap {name} items", items[0], items[1], node.lineno)
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        value = node.value
        if (
            isinstance(value, ast.Tuple)
            and len(value.elts) == 2
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Tuple)
            and not any(isinstance(e, (ast.Constant, ast.Starred)) for e in value.elts)
        ):
            self._swap_two("swap assigned pair", value.elts[0], value.elts[1], node.lineno)
        self.generic_visit(node)

    def _swap_two(self, label: str, first: ast.AST, second: ast.AST, lineno: int) -> None:
        start, end = self.start(first), self.end(second)
        a, b = self.source[start : self.end(first)], self.source[self.start(second) : end]
        if a == b:
            return
        middle = self.source[self.end(first) : self.start(second)]
        self.add(label, start, self.source[start:end], b + middle + a, lineno)


def operator_mutants(root: Path = REPO, include_validation: bool = False) -> list[Mutant]:
    """Every operator mutant of ``OPERATOR_TARGETS`` (validation code only if asked)."""
    mutants = []
    for path, (tests, scopes) in OPERATOR_TARGETS.items():
        source = (root / path).read_text(encoding="utf-8")
        collector = _OperatorCollector(source, path, scopes)
        collector.visit(ast.parse(source))
        seen: Counter = Counter()
        short = path.removeprefix("ssl_modules/")
        for qualname, label, start, original, replacement, lineno, validation in collector.found:
            key = (qualname, label)
            mutant_id = f"{short}::{qualname}::{label}#{seen[key]}"
            seen[key] += 1
            if validation and not include_validation:
                continue
            edit = Edit(path, original, replacement, offset=start)
            try:
                ast.parse(apply_edits(source, [edit]))
            except SyntaxError:
                continue
            line_text = source.splitlines()[lineno - 1].strip()
            mutants.append(
                Mutant(
                    id=mutant_id,
                    kind="operator",
                    description=f"{label} in {qualname}, line {lineno}: {line_text[:90]}",
                    edits=(edit,),
                    tests=tests,
                    line=lineno,
                    validation=validation,
                )
            )
    return mutants


# -- method mutants, planted by hand ----------------------------------------------------------------
def _method(
    mutant_id: str, module: str, path: str, description: str, tests: tuple[str, ...], *edits: tuple[str, str]
) -> Mutant:
    return Mutant(
        id=mutant_id,
        kind="method",
        description=description,
        edits=tuple(Edit(path, original, replacement) for original, replacement in edits),
        tests=tests,
        module=module,
    )


SIMCLR = "ssl_modules/self_supervised/simclr.py"
BYOL = "ssl_modules/self_supervised/byol.py"
MOCO = "ssl_modules/self_supervised/moco.py"
BARLOW = "ssl_modules/self_supervised/barlow_twins.py"
JOINT_EMBEDDING = "ssl_modules/self_supervised/joint_embedding.py"
ROTATION = "ssl_modules/self_supervised/rotation.py"
JIGSAW = "ssl_modules/self_supervised/jigsaw.py"
COLORIZATION = "ssl_modules/self_supervised/colorization.py"
DENOISING = "ssl_modules/self_supervised/denoising_autoencoder.py"
FIXMATCH = "ssl_modules/semi_supervised/fixmatch.py"
STUDENT_TEACHER = "ssl_modules/semi_supervised/student_teacher.py"
SELF_TRAINING = "ssl_modules/semi_supervised/self_training.py"
COMMON = "ssl_modules/semi_supervised/_common.py"
SUPERVISED_PY = "ssl_modules/supervised.py"
CONTRASTIVE = "ssl_modules/losses/contrastive.py"
EMA = "ssl_modules/ema.py"
DIST = "ssl_modules/dist.py"
BASE = "ssl_modules/base.py"
PRETEXT_AUGMENT = "ssl_modules/augment/pretext.py"
EVAL_SSL = "ssl_modules/evaluation/self_supervised.py"
MIXMATCH = "ssl_modules/semi_supervised/mixmatch.py"
VICREG_LOSS = "ssl_modules/losses/joint_embedding.py"
SIMSIAM = "ssl_modules/self_supervised/simsiam.py"
RULES = "ssl_modules/semi_supervised/rules"
SELF_DISTILLATION = "ssl_modules/losses/self_distillation.py"
DINO = "ssl_modules/self_supervised/dino.py"
SWAV = "ssl_modules/self_supervised/swav.py"
MAE = "ssl_modules/self_supervised/mae.py"
MASKED_MODELING = "ssl_modules/losses/masked_modeling.py"
MULTICROP = "ssl_modules/augment/multicrop.py"
PRETEXT_IMAGES = (
    "images = labeled.images if unlabeled is None else torch.cat([labeled.images, unlabeled.images])"
)

METHOD_MUTANTS: list[Mutant] = [
    # -- SimCLR --------------------------------------------------------------------------------------
    _method(
        "simclr/view-contrasted-with-itself", "SimCLRModule", SIMCLR,
        "SimCLR: each view's positive is itself (z[i] vs z[i])", JOINT,
        ("self.criterion(z[i], z[j]) for i, j in pairs", "self.criterion(z[i], z[i]) for i, j in pairs"),
    ),
    _method(
        "simclr/identical-views", "SimCLRModule", JOINT_EMBEDDING,
        "SimCLR: one augmentation reused for every view (views identical)", JOINT,
        (
            "return make_views(images, self.augment, self.num_views)",
            "return [self.augment(images).clamp(0, 1)] * self.num_views",
        ),
    ),
    _method(
        "simclr/no-projection-head", "SimCLRModule", SIMCLR,
        "SimCLR: NT-Xent on h = f(x) (projection head g skipped)", JOINT,
        ("z = self.projector(torch.cat(features)).chunk(len(views))", "z = torch.cat(features).chunk(len(views))"),
    ),
    _method(
        "simclr/labeled-images-only", "SimCLRModule", JOINT_EMBEDDING,
        "SimCLR: contrasts the labeled batch instead of the unlabeled one", JOINT,
        ("images = (unlabeled or labeled).images", "images = labeled.images"),
    ),
    _method(
        "ntxent/ddp-views-swapped", "SimCLRModule", CONTRASTIVE,
        "NT-Xent under DDP gathers the two views in swapped order", JOINT_DDP,
        ("all_a, all_b = dist.gather(z_a), dist.gather(z_b)", "all_a, all_b = dist.gather(z_b), dist.gather(z_a)"),
    ),
    _method(
        "ntxent/ddp-no-rank-offset", "SimCLRModule", CONTRASTIVE,
        "NT-Xent under DDP: every rank takes its images to be the first n of the global batch", JOINT_DDP,
        ("offset = dist.rank() * n", "offset = 0"),
    ),
    # -- BYOL ----------------------------------------------------------------------------------------
    _method(
        "byol/target-from-online-with-stopgrad", "BYOLModule", BYOL,
        "BYOL: target computed by the online network (under no_grad)", JOINT,
        (
            "target_features = self.encode(views, self.target_backbone)  # 2 x (n, num_features)\n"
            "            target = self.target_projector(torch.cat(target_features))",
            "target_features = self.encode(views)\n            target = self.projector(torch.cat(target_features))",
        ),
    ),
    _method(
        "byol/target-from-online-without-stopgrad", "BYOLModule", BYOL,
        "BYOL: target computed by the online network, gradient flowing through it", JOINT,
        (
            "with torch.no_grad():  # stop-gradient: the target only provides regression targets\n"
            "            target_features = self.encode(views, self.target_backbone)  # 2 x (n, num_features)\n"
            "            target = self.target_projector(torch.cat(target_features))",
            "if True:\n            target_features = self.encode(views)\n"
            "            target = self.projector(torch.cat(target_features))",
        ),
    ),
    _method(
        "byol/loss-one-direction", "BYOLModule", BYOL,
        "BYOL: loss in one direction only (not symmetrised)", JOINT,
        (
            "loss = self.criterion(online_a, target_b) + self.criterion(online_b, target_a)",
            "loss = 2 * self.criterion(online_a, target_b)",
        ),
    ),
    _method(
        "byol/same-view-target", "BYOLModule", BYOL,
        "BYOL: each view regresses the target of the same view", JOINT,
        (
            "loss = self.criterion(online_a, target_b) + self.criterion(online_b, target_a)",
            "loss = self.criterion(online_a, target_a) + self.criterion(online_b, target_b)",
        ),
    ),
    _method(
        "byol/no-predictor", "BYOLModule", BYOL,
        "BYOL: online branch without the predictor", JOINT,
        (
            "online = self.predictor(self.projector(torch.cat(features)))",
            "online = self.projector(torch.cat(features))",
        ),
    ),
    _method(
        "byol/symmetric-by-default", "BYOLModule", BYOL,
        "BYOL: two draws of one augmentation unless asked for the paper's asymmetric views",
        ("tests/test_byol_barlow_quality.py",),
        ("        asymmetric_views: bool = True,", "        asymmetric_views: bool = False,"),
    ),
    _method(
        "byol/solarize-the-wrong-view", "BYOLModule", "ssl_modules/augment/views.py",
        "BYOL's asymmetric views: view 1 solarized, view 2 not (the paper's are the other way)",
        ("tests/test_byol_barlow_quality.py",),
        ("BYOL_SOLARIZE_PROBABILITIES = (0.0, 0.2)", "BYOL_SOLARIZE_PROBABILITIES = (0.2, 0.0)"),
    ),
    _method(
        "byol/no-momentum-update", "BYOLModule", BYOL,
        "BYOL: target network never updated", JOINT,
        (
            "return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]",
            "return []",
        ),
    ),
    _method(
        "byol/momentum-inverted", "BYOLModule", JOINT_EMBEDDING,
        "BYOL: target networks move with 1 - tau instead of tau", JOINT,
        ("ema_update(target, online, momentum)", "ema_update(target, online, 1 - momentum)"),
    ),
    # -- MoCo ----------------------------------------------------------------------------------------
    _method(
        "moco/enqueue-before-loss", "MoCoModule", MOCO,
        "MoCo: keys enqueued before the loss (each positive is also a negative)", JOINT_DDP,
        (
            "negatives = self.queue.clone()",
            "self.enqueue(key_k)\n        negatives = self.queue.clone()",
        ),
        ("        self.enqueue(key_k)\n        return JointEmbeddingLoss", "        return JointEmbeddingLoss"),
    ),
    _method(
        "moco/keys-from-query-encoder", "MoCoModule", MOCO,
        "MoCo: keys computed by the query encoder instead of the momentum encoder", JOINT_DDP,
        (
            "key_k = self.momentum_projector(self.momentum_backbone(self.backbone_input(views[1])))",
            "key_k = self.projector(self.backbone(self.backbone_input(views[1])))",
        ),
    ),
    _method(
        "moco/key-same-view-as-query", "MoCoModule", MOCO,
        "MoCo: the key is encoded from the query's view", JOINT_DDP,
        (
            "key_k = self.momentum_projector(self.momentum_backbone(self.backbone_input(views[1])))",
            "key_k = self.momentum_projector(self.momentum_backbone(self.backbone_input(views[0])))",
        ),
    ),
    _method(
        "moco/no-momentum-update", "MoCoModule", MOCO,
        "MoCo: key encoder never updated", JOINT,
        (
            "return [(self.backbone, self.momentum_backbone), (self.projector, self.momentum_projector)]",
            "return []",
        ),
    ),
    _method(
        "moco/enqueue-queries", "MoCoModule", MOCO,
        "MoCo: the queries, not the keys, enter the queue", JOINT_DDP,
        ("        self.enqueue(key_k)\n", "        self.enqueue(query_q.detach())\n"),
    ),
    _method(
        "moco/queue-pointer-frozen", "MoCoModule", MOCO,
        "MoCo: the queue pointer never advances (always overwrites the same slots)", JOINT,
        ("self.queue_pointer.copy_((self.queue_pointer + len(keys)) % size)", "pass"),
    ),
    # -- Barlow Twins --------------------------------------------------------------------------------
    _method(
        "barlow/same-view", "BarlowTwinsModule", BARLOW,
        "Barlow Twins: cross-correlation of a view with itself", JOINT,
        ("loss = self.criterion(z_a, z_b)", "loss = self.criterion(z_a, z_a)"),
    ),
    _method(
        "barlow/ddp-one-view-twice", "BarlowTwinsModule", CONTRASTIVE,
        "Barlow Twins under DDP gathers one view twice", JOINT_DDP,
        ("z_a, z_b = dist.gather(z_a), dist.gather(z_b)", "z_a, z_b = dist.gather(z_a), dist.gather(z_a)"),
    ),
    _method(
        "barlow/ddp-no-gather", "BarlowTwinsModule", CONTRASTIVE,
        "Barlow Twins under DDP standardises and correlates the per-rank batch only", JOINT_DDP,
        ("z_a, z_b = dist.gather(z_a), dist.gather(z_b)", "pass"),
    ),
    # -- shared: DDP gather, EMA ---------------------------------------------------------------------
    _method(
        "dist/backward-no-all-reduce", "", DIST,
        "gather's backward keeps only this rank's own gradient (no all-reduce)", (T_DDP,),
        ("dist.all_reduce(grad, op=dist.ReduceOp.SUM)", "pass"),
    ),
    _method(
        "dist/backward-wrong-slice", "", DIST,
        "gather's backward returns rank 0's slice on every rank", (T_DDP,),
        ("start = dist.get_rank() * ctx.batch_size", "start = 0"),
    ),
    _method(
        "ema/buffers-not-copied", "", EMA,
        "EMA no longer copies BatchNorm buffers", EMA_TESTS,
        (
            "for target_buffer, online_buffer in zip(target.buffers(), online.buffers()):\n"
            "        target_buffer.copy_(online_buffer)",
            "pass",
        ),
    ),
    _method(
        "ema/decay-inverted", "", EMA,
        "EMA weight on the online network is decay instead of 1 - decay", EMA_TESTS,
        ("torch._foreach_lerp_(target_params, online_params, 1.0 - decay)",
         "torch._foreach_lerp_(target_params, online_params, decay)"),
    ),
    _method(
        "ema/warmup-max", "", EMA,
        "EMA warm-up uses max instead of min (no warm-up)", EMA_TESTS,
        ("return min(1.0 - 1.0 / (step + 1), decay)", "return max(1.0 - 1.0 / (step + 1), decay)"),
    ),
    _method(
        "ema/cosine-momentum-reversed", "", EMA,
        "momentum schedule runs from 1 down to the base momentum", EMA_TESTS,
        ("(math.cos(math.pi * progress) + 1) / 2", "(1 - math.cos(math.pi * progress)) / 2"),
    ),
    # -- pretext tasks -------------------------------------------------------------------------------
    _method(
        "rotation/labels-off-by-one", "RotationPretext", PRETEXT_AUGMENT,
        "rotation labels shifted by one (k * 90 degrees labelled k + 1)", PRETEXT,
        (
            "labels = torch.arange(4, device=images.device).repeat_interleave(len(images))",
            "labels = (torch.arange(4, device=images.device) + 1).remainder(4).repeat_interleave(len(images))",
        ),
    ),
    _method(
        "rotation/network-sees-unrotated", "RotationPretext", ROTATION,
        "rotation: the network classifies unrotated images (labels unpredictable)", PRETEXT,
        ("logits = self.rotation_logits(rotated)", "logits = self.rotation_logits(views.repeat(4, 1, 1, 1))"),
    ),
    _method(
        "rotation/labeled-only", "RotationPretext", ROTATION,
        "rotation: the unlabeled images are dropped from the pretext task", PRETEXT,
        (PRETEXT_IMAGES, "images = labeled.images"),
    ),
    _method(
        "jigsaw/label-not-permutation-index", "JigsawPretext", JIGSAW,
        "jigsaw: the target is the first tile's index, not the permutation index", PRETEXT,
        (
            "pretext_loss = F.cross_entropy(logits, permutation)",
            "pretext_loss = F.cross_entropy(logits, self.permutations[permutation, 0].long())",
        ),
    ),
    _method(
        "jigsaw/tiles-not-shuffled", "JigsawPretext", JIGSAW,
        "jigsaw: every puzzle is shuffled with permutation 0, whatever the label", PRETEXT,
        (
            "tiles = jigsaw_tiles(images, self.permutations, permutation, self.grid_size)",
            "tiles = jigsaw_tiles(images, self.permutations, torch.zeros_like(permutation), self.grid_size)",
        ),
    ),
    _method(
        "colorization/backbone-sees-ab", "ColorizationPretext", COLORIZATION,
        "colorization: the backbone sees the a channel (the answer) instead of L", PRETEXT,
        ("features = self.backbone(lightness)", "features = self.backbone(lab[:, 1:2] / AB_SCALE)"),
    ),
    _method(
        "colorization/target-includes-lightness", "ColorizationPretext", COLORIZATION,
        "colorization: the target is (L, a) instead of (a, b)", PRETEXT,
        ("ab = F.adaptive_avg_pool2d(lab[:, 1:], size)", "ab = F.adaptive_avg_pool2d(lab[:, :2], size)"),
    ),
    _method(
        "colorization/prior-not-estimated", "ColorizationPretext", COLORIZATION,
        "colorization: the rebalancing prior is never updated from the data", PRETEXT,
        ("self.ab_bin_counts += torch.bincount(bins, minlength=len(self.ab_bin_counts)).float()", "pass"),
    ),
    _method(
        "denoising/target-is-corrupted", "DenoisingAutoencoder", DENOISING,
        "denoising: the loss compares the reconstruction with the corrupted input", PRETEXT,
        (
            "pretext_loss = F.mse_loss(reconstruction.float(), self.normalize(images))",
            "pretext_loss = F.mse_loss(reconstruction.float(), self.normalize(corrupted))",
        ),
    ),
    _method(
        "denoising/input-not-corrupted", "DenoisingAutoencoder", DENOISING,
        "denoising: the encoder sees the clean image (a plain autoencoder)", PRETEXT,
        (
            "reconstruction = self.reconstruct(corrupted)  # (B, C, H, W), normalised space",
            "reconstruction = self.reconstruct(images)",
        ),
    ),
    _method(
        "denoising/labeled-only", "DenoisingAutoencoder", DENOISING,
        "denoising: the unlabeled images are dropped from the pretext task", PRETEXT,
        (PRETEXT_IMAGES, "images = labeled.images"),
    ),
    # -- evaluation of the self-supervised methods ---------------------------------------------------
    _method(
        "probe/not-detached", "", EVAL_SSL,
        "online probe sends gradient into the backbone", EVALUATION,
        (
            "            with torch.no_grad():\n                features = self.embed(images)\n"
            "        logits = self.online_probe(features.detach())",
            "            features = self.embed(images)\n        logits = self.online_probe(features)",
        ),
    ),
    _method(
        "probe/fitted-on-test", "", EVAL_SSL,
        "offline probe (test/acc) fitted on the test split", EVALUATION,
        ("datamodule.labeled_dataloader(), module.device", "datamodule.test_dataloader(), module.device"),
    ),
    _method(
        "probe/test-acc-is-online-probe", "", EVAL_SSL,
        "test/acc reports the online probe instead of the offline one", EVALUATION,
        (
            "(probe(features).argmax(1) == labels).float().mean() if probe is not None else online_acc",
            "online_acc",
        ),
    ),
    # -- FixMatch ------------------------------------------------------------------------------------
    _method(
        "fixmatch/pseudo-label-from-strong-view", "FixMatchModule", FIXMATCH,
        "FixMatch: the pseudo-label comes from the strong view", SEMI,
        ("weak_probs = weak_logits.float().softmax(dim=1)", "weak_probs = strong_logits.float().softmax(dim=1)"),
    ),
    _method(
        "fixmatch/strong-view-is-weak", "FixMatchModule", FIXMATCH,
        "FixMatch: the 'strong' view is a weak augmentation", SEMI,
        ("strong_unlabeled = self.strong(unlabeled_images)", "strong_unlabeled = self.weak(unlabeled_images)"),
    ),
    _method(
        "fixmatch/evaluates-live-weights", "FixMatchModule", COMMON,
        "FixMatch evaluates with the live weights although evaluate_with_ema", SEMI,
        ("if not self.hparams.evaluate_with_ema:", "if True:"),
    ),
    _method(
        "fixmatch/ema-never-updated", "FixMatchModule", COMMON,
        "FixMatch: the evaluation EMA is never updated", SEMI,
        ("self.ema_model.ema_from(", "(lambda *args: None)("),
    ),
    _method(
        "fixmatch/ema-without-warmup", "FixMatchModule", COMMON,
        "FixMatch: the EMA decay skips Mean Teacher's warm-up", SEMI,
        ("warmup_ema_decay(self.global_step, self.hparams.ema_decay)", "self.hparams.ema_decay"),
    ),
    _method(
        "fixmatch/unlabeled-weight-ignored", "FixMatchModule", FIXMATCH,
        "FixMatch: lambda_u ignored (unlabeled loss weight 1)", SEMI,
        (
            "loss = supervised_loss + self.hparams.unlabeled_loss_weight * unlabeled_loss",
            "loss = supervised_loss + unlabeled_loss",
        ),
    ),
    _method(
        "fixmatch/schedule-2pi", "FixMatchModule", BASE,
        "FixMatch LR factor cos(7 pi k / 8K) clipped at 0 (the bug of issue 10)", (T_SCHEDULES, *SEMI),
        (
            "return math.cos(self.fraction * math.pi * progress)",
            "return max(0.0, math.cos(2 * self.fraction * math.pi * progress))",
        ),
    ),
    _method(
        "fixmatch/schedule-fraction", "FixMatchModule", FIXMATCH,
        "FixMatch's scheduler built with the wrong fraction (cos(pi k / 4K))", (T_SCHEDULES, *SEMI),
        ("FixMatchCosine(total)", "FixMatchCosine(total, fraction=0.25)"),
    ),
    # -- Mean Teacher / distillation / Noisy Student -------------------------------------------------
    _method(
        "mean-teacher/ema-update-removed", "StudentTeacherModule", STUDENT_TEACHER,
        "Mean Teacher: the EMA teacher is never updated", SEMI,
        ("self.teacher.ema_from(self.backbone, self.classifier, decay)", "pass"),
    ),
    _method(
        "student-teacher/one-minus-alpha-dropped", "StudentTeacherModule", STUDENT_TEACHER,
        "student-teacher: the teacher term lacks its (1 - alpha) factor", SEMI,
        (
            "loss = alpha * supervised_loss + (1 - alpha) * weight * consistency",
            "loss = alpha * supervised_loss + weight * consistency",
        ),
    ),
    _method(
        "student-teacher/alpha-swapped", "StudentTeacherModule", STUDENT_TEACHER,
        "distillation: alpha and 1 - alpha swapped", SEMI,
        (
            "loss = alpha * supervised_loss + (1 - alpha) * weight * consistency",
            "loss = (1 - alpha) * supervised_loss + alpha * weight * consistency",
        ),
    ),
    _method(
        "student-teacher/teacher-is-student", "StudentTeacherModule", STUDENT_TEACHER,
        "student-teacher: the 'teacher' prediction is the student's own", SEMI,
        (
            "teacher_logits = self.teacher(self.normalize(teacher_views))",
            "teacher_logits = self(teacher_views)",
        ),
    ),
    _method(
        "student-teacher/rampup-ignored", "StudentTeacherModule", STUDENT_TEACHER,
        "student-teacher: the consistency ramp-up is ignored", SEMI,
        (
            "weight = self.hparams.consistency_weight * sigmoid_rampup(self.global_step, self.hparams.rampup_steps)",
            "weight = self.hparams.consistency_weight",
        ),
    ),
    _method(
        "student-teacher/evaluates-student", "StudentTeacherModule", STUDENT_TEACHER,
        "Mean Teacher evaluates the student instead of the teacher", SEMI,
        ('if self.hparams.teacher != "ema":\n            return self(images)', "if True:\n            return self(images)"),
    ),
    _method(
        "student-teacher/teacher-in-train-mode", "StudentTeacherModule", COMMON,
        "frozen teachers/labelers follow the parent's train mode (dropout, batch statistics)", SEMI,
        ("return super().train(False)  # a target: always eval", "return super().train(mode)  # a target"),
    ),
    _method(
        "student-teacher/same-input-is-weak", "StudentTeacherModule", STUDENT_TEACHER,
        "distillation (teacher_input='same'): the teacher sees its own weak view", SEMI,
        ('"same": lambda: student_views,', '"same": lambda: self.teacher_augment(all_images),'),
    ),
    _method(
        "student-teacher/clean-input-is-weak", "StudentTeacherModule", STUDENT_TEACHER,
        "Noisy Student (teacher_input='clean'): the teacher sees an augmented view", SEMI,
        ('"clean": lambda: all_images,', '"clean": lambda: self.teacher_augment(all_images),'),
    ),
    # -- self-training -------------------------------------------------------------------------------
    _method(
        "self-training/rounds-labels-from-student", "SelfTrainingModule", SELF_TRAINING,
        "self-training rounds: pseudo-labels from the live student, not the frozen labeler", SEMI,
        (
            "probs = self.labeler(self.normalize(unlabeled_images)).float().softmax(dim=1)",
            "probs = unlabeled_logits.float().softmax(dim=1)",
        ),
    ),
    _method(
        "self-training/labeler-not-refreshed", "SelfTrainingModule", SELF_TRAINING,
        "self-training: the labeler is not refreshed at a round start", SEMI,
        ("self.labeler.copy_from(self.backbone, self.classifier)", "pass"),
    ),
    _method(
        "self-training/selection-ignored", "SelfTrainingModule", SELF_TRAINING,
        "self-training: every pseudo-label kept with weight 1 (selection ignored)", SEMI,
        ("weights = self._select(confidence, pseudo_labels)", "weights = torch.ones_like(confidence)"),
    ),
    _method(
        "self-training/top-k-least-confident", "SelfTrainingModule", SELF_TRAINING,
        "self-training rounds: top-k keeps the least confident predictions of each class", SEMI,
        (
            "members = confidence[predicted == cls].sort(descending=True).values\n"
            "                keep = min(per_class, len(members))",
            "members = confidence[predicted == cls].sort(descending=False).values\n"
            "                keep = min(per_class, len(members))",
        ),
    ),
    _method(
        "self-training/kept-fraction-constant", "SelfTrainingModule", SELF_TRAINING,
        "self-training rounds: the kept fraction does not grow with the round", (T_SCHEDULES, *SEMI),
        (
            "return min(1.0, round_index * self.hparams.top_k_fraction)",
            "return min(1.0, self.hparams.top_k_fraction)",
        ),
    ),
    _method(
        "self-training/unlabeled-weight-ignored", "SelfTrainingModule", SELF_TRAINING,
        "self-training: the unlabeled weight (and its ramp-up) is ignored", SEMI,
        ("loss = supervised_loss + weight * pseudo_label_loss", "loss = supervised_loss + pseudo_label_loss"),
    ),
    # -- supervised baseline / linear probe ----------------------------------------------------------
    _method(
        "supervised/no-augmentation", "SupervisedModule", SUPERVISED_PY,
        "supervised: the labeled images are not augmented", SUPERVISED,
        ("views = self.augment(images)  # flip + shift", "views = images  # flip + shift"),
    ),
    _method(
        "supervised/frozen-backbone-batchnorm-trains", "SupervisedModule", SUPERVISED_PY,
        "linear probe: the frozen backbone's BatchNorm statistics move during training", SUPERVISED,
        (
            "if self.freeze_backbone:  # Lightning restores per-module modes around validation\n"
            "            self.backbone.eval()",
            "pass",
        ),
        ("self.backbone.eval()  # a probe measures fixed features", "pass  # a probe measures fixed features"),
    ),
    _method(
        "supervised/frozen-backbone-trains", "SupervisedModule", SUPERVISED_PY,
        "linear probe: the backbone is not frozen", SUPERVISED,
        ("            self.backbone.requires_grad_(False)\n", "            pass\n"),
    ),
    # -- MixMatch ------------------------------------------------------------------------------------
    _method(
        "mixmatch/no-sharpening", "MixMatchModule", MIXMATCH,
        "MixMatch: the guess is not sharpened (T ignored)", (T_MIXMATCH,),
        ("powered = probabilities.pow(1.0 / temperature)", "powered = probabilities"),
    ),
    _method(
        "mixmatch/lambda-not-maxed", "MixMatchModule", MIXMATCH,
        "MixMatch: MixUp with lambda instead of max(lambda, 1 - lambda)", (T_MIXMATCH,),
        ("lam = torch.maximum(weights, 1.0 - weights).to(inputs.dtype)", "lam = weights.to(inputs.dtype)"),
    ),
    _method(
        "mixmatch/guess-from-first-view", "MixMatchModule", MIXMATCH,
        "MixMatch: the guess is the first view's prediction, not the mean over the K views", (T_MIXMATCH,),
        (
            "mean_probs = view_probs.view(num_views, num_unlabeled, -1).mean(dim=0)",
            "mean_probs = view_probs.view(num_views, num_unlabeled, -1)[0]",
        ),
    ),
    _method(
        "mixmatch/unlabeled-loss-is-cross-entropy", "MixMatchModule", MIXMATCH,
        "MixMatch: the unlabeled loss is cross-entropy instead of the L2 of the paper", (T_MIXMATCH,),
        (
            "unlabeled_loss = mixmatch_unlabeled_loss(logits[num_labeled:], mixed_targets[num_labeled:])",
            "unlabeled_loss = soft_cross_entropy(logits[num_labeled:], mixed_targets[num_labeled:])",
        ),
    ),
    # -- VICReg and SimSiam --------------------------------------------------------------------------
    _method(
        "vicreg/variance-term-dropped", "VICRegModule", VICREG_LOSS,
        "VICReg: the variance term is not in the loss", (T_VICREG_SIMSIAM,),
        ("            + self.variance_weight * terms.variance\n", "\n"),
    ),
    _method(
        "vicreg/covariance-weight-is-variance-weight", "VICRegModule", VICREG_LOSS,
        "VICReg: the covariance term is weighted by mu instead of nu", (T_VICREG_SIMSIAM,),
        ("+ self.covariance_weight * terms.covariance", "+ self.variance_weight * terms.covariance"),
    ),
    _method(
        "vicreg/no-gather", "VICRegModule", VICREG_LOSS,
        "VICReg under DDP: variance and covariance on the rank's rows only", (T_VICREG_SIMSIAM,),
        ("z_a, z_b = dist.gather(z_a), dist.gather(z_b)  # (world_size * n, dim)", "pass"),
    ),
    _method(
        "simsiam/no-stop-gradient", "SimSiamModule", SIMSIAM,
        "SimSiam: the target branch carries gradient (no stop-gradient)", (T_VICREG_SIMSIAM,),
        (
            "loss = (self.criterion(p_a, z_b.detach()) + self.criterion(p_b, z_a.detach())) / 2",
            "loss = (self.criterion(p_a, z_b) + self.criterion(p_b, z_a)) / 2",
        ),
    ),
    _method(
        "simsiam/one-direction", "SimSiamModule", SIMSIAM,
        "SimSiam: one direction of the symmetric loss only", (T_VICREG_SIMSIAM,),
        (
            "loss = (self.criterion(p_a, z_b.detach()) + self.criterion(p_b, z_a.detach())) / 2",
            "loss = self.criterion(p_a, z_b.detach())",
        ),
    ),
    # -- pseudo-label rules (FixMatchModule with FlexMatch / FreeMatch / SoftMatch / UDA) ---------------
    _method(
        "fixmatch/rule-without-index", "FixMatchModule", FIXMATCH,
        "FixMatch: the rule gets no sample index (FlexMatch's status cannot be kept)",
        (T_RULES_FLEX_FREE, T_SEMI_METHODS),
        ("pseudo = self.rule(weak_probs, unlabeled.index)", "pseudo = self.rule(weak_probs, None)"),
    ),
    _method(
        "flexmatch/linear-mapping-always", "FixMatchModule", f"{RULES}/flexmatch.py",
        "FlexMatch: the convex mapping x / (2 - x) is ignored", (T_RULES_FLEX_FREE,),
        ('mapped = beta / (2.0 - beta) if self.mapping == "convex" else beta', "mapped = beta"),
    ),
    _method(
        "flexmatch/no-warmup", "FixMatchModule", f"{RULES}/flexmatch.py",
        "FlexMatch: the threshold warm-up (unused images in the normaliser) is ignored", (T_RULES_FLEX_FREE,),
        ("normaliser = torch.maximum(normaliser, unused)", "pass"),
    ),
    _method(
        "flexmatch/status-not-gathered", "FixMatchModule", f"{RULES}/flexmatch.py",
        "FlexMatch under DDP: each rank writes only its own images' status", (T_RULES_FLEX_FREE,),
        ("index = ssl_dist.gather_no_grad(index.to(self.status.device))", "index = index.to(self.status.device)"),
        ("predictions = ssl_dist.gather_no_grad(predictions)", "pass"),
        ("confidence = ssl_dist.gather_no_grad(confidence)", "pass"),
    ),
    _method(
        "freematch/no-maxnorm", "FixMatchModule", f"{RULES}/freematch.py",
        "FreeMatch: per-class thresholds without MaxNorm of p_t", (T_RULES_FLEX_FREE,),
        (
            "return self.class_probs / self.class_probs.max() * self.global_threshold",
            "return self.class_probs * self.global_threshold",
        ),
    ),
    _method(
        "freematch/global-threshold-not-global", "FixMatchModule", f"{RULES}/freematch.py",
        "FreeMatch under DDP: the global threshold uses the rank's batch only", (T_RULES_FLEX_FREE,),
        (
            "self.global_threshold.mul_(keep).add_(global_mean(confidence.mean()), alpha=new)",
            "self.global_threshold.mul_(keep).add_(confidence.mean(), alpha=new)",
        ),
    ),
    _method(
        "softmatch/no-truncation", "FixMatchModule", f"{RULES}/softmatch.py",
        "SoftMatch: the Gaussian is not truncated at mu_t (confident images weighted below 1)", (T_RULES_SOFT_UDA,),
        (
            "below_mean = (confidence - self.confidence_mean).clamp(max=0.0)",
            "below_mean = confidence - self.confidence_mean",
        ),
    ),
    _method(
        "softmatch/biased-variance", "FixMatchModule", f"{RULES}/softmatch.py",
        "SoftMatch: the biased variance of the confidence", (T_RULES_SOFT_UDA,),
        ("* (count / (count - 1))", "* 1.0"),
    ),
    _method(
        "uda/not-sharpened", "FixMatchModule", f"{RULES}/uda.py",
        "UDA: the targets are not sharpened (T ignored)", (T_RULES_SOFT_UDA,),
        (
            "sharpened = torch.softmax(probs.log() / self.temperature, dim=1)",
            "sharpened = torch.softmax(probs.log(), dim=1)",
        ),
    ),
    _method(
        "alignment/no-alignment", "FixMatchModule", f"{RULES}/base.py",
        "distribution alignment: the probabilities are returned unaligned", (T_RULES_SOFT_UDA,),
        ("return aligned / aligned.sum(dim=1, keepdim=True)", "return probs"),
    ),
    # -- DINO, SwAV, MAE -------------------------------------------------------------------------------
    _method(
        "dino/no-centering", "DINOModule", SELF_DISTILLATION,
        "DINO: the teacher's outputs are not centred", T_DINO_SWAV,
        ("F.softmax((t.to(dtype) - center) / teacher_temperature, dim=1)", "F.softmax(t.to(dtype) / teacher_temperature, dim=1)"),
    ),
    _method(
        "dino/teacher-sees-all-crops", "DINOModule", DINO,
        "DINO: the teacher also encodes the local crops", T_DINO_SWAV,
        ("global_views = views[: self.num_global_crops]", "global_views = views"),
    ),
    _method(
        "swav/prototypes-never-frozen", "SwAVModule", SWAV,
        "SwAV: the prototypes train from the first step", T_DINO_SWAV,
        ("            self.prototypes.layer.weight.grad = None  # the authors' freeze_prototypes_niters", "            pass"),
    ),
    _method(
        "swav/prototypes-not-normalised", "SwAVModule", SWAV,
        "SwAV: the prototypes are not renormalised after each step", T_DINO_SWAV,
        ("        self.prototypes.normalize_()  # back to the unit sphere after every step", "        pass"),
    ),
    _method(
        "swav/whole-queue-on-every-rank", "SwAVModule", SWAV,
        "SwAV under DDP: every rank puts the whole queue into the Sinkhorn (counted once per rank)",
        (*T_DINO_SWAV, T_DDP_EXACT_SWAV),
        ("return [self.prototypes(self.queue[i, rows]) for i in range(self.num_global_crops)]",
         "return [self.prototypes(self.queue[i]) for i in range(self.num_global_crops)]"),
    ),
    _method(
        "swav/queue-per-rank", "SwAVModule", SWAV,
        "SwAV under DDP: each rank enqueues only its own embeddings (DDP's buffer broadcast then overwrites them)",
        (*T_DINO_SWAV, T_DDP_EXACT_SWAV),
        ("gathered = dist.gather_no_grad(embedding.contiguous())", "gathered = torch.cat([embedding] * dist.world_size())"),
    ),
    _method(
        "dino/center-per-rank", "DINOModule", SELF_DISTILLATION,
        "DINO under DDP: the center is the EMA of the rank's own teacher outputs",
        (*T_DINO_SWAV, T_DDP_EXACT_DINO),
        ("total = _all_reduce(stacked.sum(dim=0), enabled=self.gather_distributed)",
         "total = stacked.sum(dim=0) * dist.world_size()"),
    ),
    _method(
        "mae/target-not-the-clean-views", "MAEModule", MAE,
        "MAE: the pixel loss ignores the per-patch normalisation", T_MAE,
        ("            norm_pix_loss=self.hparams.norm_pix_loss,\n        )\n        probe_loss", "            norm_pix_loss=False,\n        )\n        probe_loss"),
    ),
    _method(
        "mae/labeled-images", "MAEModule", MAE,
        "MAE: reconstructs the labeled images instead of the unlabeled ones", T_MAE,
        ("images = labeled.images if unlabeled is None else unlabeled.images", "images = labeled.images"),
    ),
    _method(
        "mae/one-mask-for-the-batch", "MAEModule", MASKED_MODELING,
        "MAE: every image of the batch gets the same mask", T_MAE,
        ("noise = torch.rand(batch_size, num_patches, generator=generator, device=device)  # (B, N)",
         "noise = torch.rand(1, num_patches, generator=generator, device=device).expand(batch_size, -1)  # (B, N)"),
    ),
    _method(
        "mae/loss-on-every-patch", "MAEModule", MASKED_MODELING,
        "MAE: the pixel loss averages over every patch, the visible ones included", T_MAE,
        ("return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)", "return per_patch.mean()"),
    ),
    # -- the joint-embedding template and multi-crop (issue 14) -----------------------------------
    _method(
        "template/ema-before-the-optimizer-step", "BYOLModule", JOINT_EMBEDDING,
        "template: the targets' EMA update runs before the optimizer step instead of after it",
        (T_TEMPLATE, T_JOINT_BEHAVIOUR),
        ("        super().optimizer_step(*args, **kwargs)\n        pairs = self.momentum_pairs()\n"
         "        if pairs:\n            momentum = self.momentum()\n            for online, target in pairs:\n"
         "                ema_update(target, online, momentum)\n",
         "        pairs = self.momentum_pairs()\n        if pairs:\n            momentum = self.momentum()\n"
         "            for online, target in pairs:\n                ema_update(target, online, momentum)\n"
         "        super().optimizer_step(*args, **kwargs)\n"),
    ),
    _method(
        "template/each-view-its-own-backbone-call", "SimCLRModule", JOINT_EMBEDDING,
        "template: the backbone encodes each view in its own call (BatchNorm sees one view at a time)",
        (T_TEMPLATE, T_JOINT_BEHAVIOUR),
        ("return list(indices_by_size(views).values())", "return [[index] for index in range(len(views))]"),
    ),
    _method(
        "template/probe-loss-dropped", "SimCLRModule", JOINT_EMBEDDING,
        "template: the online probe's loss is not added (the probe never trains)",
        (T_TEMPLATE, T_JOINT_BEHAVIOUR, T_EVALUATION),
        ("return output.loss + probe_loss", "return output.loss"),
    ),
    _method(
        "multicrop/local-crops-at-the-global-size", "DINOModule", MULTICROP,
        "multi-crop: the local crops are made at the global crops' size", (T_MULTICROP, *T_DINO_SWAV),
        ("self.local_augment = simclr_views(channels, self.local_size,",
         "self.local_augment = simclr_views(channels, self.global_size,"),
    ),
    _method(
        "dino/teacher-backbone-not-the-ema", "DINOModule", DINO,
        "DINO: only the teacher's head follows the student by EMA; its backbone stays at init",
        T_DINO_SWAV,
        ("return [(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)]",
         "return [(self.head, self.teacher_head)]"),
    ),
    _method(
        "dino/same-view-pairs", "DINOModule", SELF_DISTILLATION,
        "DINO: the student also predicts the teacher's output of the same crop", T_DINO_SWAV,
        ("if v == i:  # the same view: skipped", "if v == i and False:  # the same view: skipped"),
    ),
    _method(
        "dino/teacher-temperature-never-warms", "DINOModule", SELF_DISTILLATION,
        "DINO: the teacher temperature is the final one from step 0 (no warm-up)", T_DINO_SWAV,
        ("if step >= self.warmup_teacher_temperature_steps:", "if True:"),
    ),
    _method(
        "dino/last-layer-never-frozen", "DINOModule", DINO,
        "DINO: the last layer trains from the first step", T_DINO_SWAV,
        ("if self.global_step < self.hparams.freeze_last_layer_steps:", "if False:"),
    ),
    _method(
        "swav/crop-predicts-its-own-code", "SwAVModule", SELF_DISTILLATION,
        "SwAV: a crop also predicts its own code (swapped prediction not swapped)", T_DINO_SWAV,
        ("if v == i:  # a crop does not predict its own code", "if v == i and False:  # a crop does not predict its own code"),
    ),
    _method(
        "simsiam/predictor-lr-decayed", "SimSiamModule", SIMSIAM,
        "SimSiam: the predictor's lr follows the cosine schedule (paper: fixed)", (T_VICREG_SIMSIAM,),
        ('{"params": groups["predictor"], "weight_decay": weight_decay, "fixed_lr": fixed}',
         '{"params": groups["predictor"], "weight_decay": weight_decay, "fixed_lr": False}'),
    ),
    _method(
        "vicreg/biased-variance", "VICRegModule", VICREG_LOSS,
        "VICReg: the variance term uses the biased variance", (T_VICREG_SIMSIAM,),
        ("std = torch.sqrt(z.var(dim=0) + self.eps)", "std = torch.sqrt(z.var(dim=0, unbiased=False) + self.eps)"),
    ),
]  # fmt: skip


# Controls, run before the mutants on the first file of the fastest selection: the no-op edit must
# survive (the tests are not flaky) and the broken import must be killed (pytest imports the
# copy's code, not the editable install's).
CONTROL_NO_OP = Mutant(
    id="control/no-op",
    kind="control",
    description="a comment added to ssl_modules/ema.py: must survive",
    edits=(Edit(EMA, "import copy\n", "import copy  # mutation control: no change\n"),),
    tests=(),
)
CONTROL_BROKEN = Mutant(
    id="control/broken-import",
    kind="control",
    description="ssl_modules/__init__.py raises on import: must be killed",
    edits=(Edit("ssl_modules/__init__.py", "", 'raise RuntimeError("mutation control")\n', offset=0),),
    tests=(),
)


def all_mutants(kind: str = "all", include_validation: bool = False, root: Path = REPO) -> list[Mutant]:
    mutants: list[Mutant] = []
    if kind in ("operator", "all"):
        mutants += operator_mutants(root, include_validation)
    if kind in ("method", "all"):
        mutants += METHOD_MUTANTS
    return mutants


# -- runner ---------------------------------------------------------------------------------------
@dataclass
class Result:
    mutant: Mutant
    status: str  # killed, survived, timeout, baseline-failed, no-tests, error
    seconds: float = 0.0
    killed_by: list[str] = field(default_factory=list)
    missing_tests: list[str] = field(default_factory=list)
    output_tail: str = ""
    full_suite: str | None = None  # with --confirm-survivors: killed / survived / timeout

    def as_json(self) -> dict:
        return {
            "id": self.mutant.id,
            "kind": self.mutant.kind,
            "module": self.mutant.module,
            "path": self.mutant.path,
            "line": self.mutant.line,
            "description": self.mutant.description,
            "tests": [t for t in self.mutant.tests if t not in self.missing_tests],
            "missing_tests": self.missing_tests,
            "status": self.status,
            "equivalent": EQUIVALENT.get(self.mutant.id),
            "seconds": round(self.seconds, 1),
            "killed_by": self.killed_by,
            "full_suite": self.full_suite,
            "output_tail": self.output_tail if self.status not in ("killed",) else "",
        }


def repository_files(repo: Path) -> list[str]:
    """Tracked files and untracked, not-ignored ones (new tests), relative to ``repo``."""
    try:
        output = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=repo,
            check=True,
            capture_output=True,
        ).stdout.decode()
        return sorted({name for name in output.split("\0") if name and (repo / name).is_file()})
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "runs", "data", "__pycache__", "lightning_logs", "wandb", ".pytest_cache"}
        files = []
        for folder, dirs, names in os.walk(repo):
            dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
            files += [str(Path(folder, n).relative_to(repo)) for n in names if not n.endswith(".pyc")]
        return sorted(files)


def make_copy(repo: Path, destination: Path, files: list[str]) -> None:
    for name in files:
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, target)


def child_env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
    env["WANDB_MODE"] = "offline"
    env.setdefault("MPLBACKEND", "Agg")
    return env


def check_imports_from_copy(python: str, copy: Path) -> None:
    """The copy's packages, not the editable install's, must be the ones imported."""
    code = "import ssl_modules, datamodules; print(ssl_modules.__file__); print(datamodules.__file__)"
    output = subprocess.run(
        [python, "-c", code], cwd=copy, env=child_env(copy), capture_output=True, text=True, check=True
    ).stdout.split()
    for location in output:
        if not Path(location).resolve().is_relative_to(copy.resolve()):
            raise MutationError(
                f"imports {location}, not the copy at {copy}: the mutants would not be tested"
            )


def run_pytest(
    python: str, copy: Path, tests: list[str], timeout: float
) -> tuple[str, float, list[str], str]:
    """``(status, seconds, failing test ids, output tail)``; status killed/survived/timeout."""
    # a private --basetemp: concurrent pytest sessions never clean up each other's tmp_path
    basetemp = copy.parent / f"{copy.name}-tmp"
    command = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"--basetemp={basetemp}", *tests]
    start = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=copy,
        env=child_env(copy),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the whole group (DDP workers included) can be killed
    )
    try:
        output, _ = process.communicate(timeout=timeout)
        status = "survived" if process.returncode == 0 else "killed"
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        status = "timeout"
    seconds = time.monotonic() - start
    failing = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.MULTILINE)
    if status == "killed" and not failing:
        failing = [f"pytest exit code {process.returncode}"]
    return status, seconds, failing, output[-3000:]


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.python = args.python
        self.workdir = Path(tempfile.mkdtemp(prefix="ssl-mutation-"))
        self.copies: queue.Queue[Path] = queue.Queue()
        self.lock = threading.Lock()
        self.done = 0
        self.total = 0

    def setup(self) -> None:
        files = repository_files(REPO)
        for index in range(self.args.jobs):
            copy = self.workdir / f"copy{index}"
            make_copy(REPO, copy, files)
            check_imports_from_copy(self.python, copy)
            self.copies.put(copy)
        print(
            f"{self.args.jobs} cop{'y' if self.args.jobs == 1 else 'ies'} of {len(files)} files in {self.workdir}"
        )

    def cleanup(self) -> None:
        if not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @contextlib.contextmanager
    def copy(self):
        copy = self.copies.get()
        try:
            yield copy
        finally:
            self.copies.put(copy)

    def baseline(self, tests: tuple[str, ...]) -> tuple[bool, float, str]:
        with self.copy() as copy:
            status, seconds, failing, tail = run_pytest(
                self.python, copy, list(tests), self.args.baseline_timeout
            )
        return status == "survived", seconds, tail if status != "survived" else ""

    def run_one(self, mutant: Mutant, tests: list[str], timeout: float, missing: list[str]) -> Result:
        with self.copy() as copy, applied(mutant, copy):
            status, seconds, failing, tail = run_pytest(self.python, copy, tests, timeout)
        result = Result(mutant, status, seconds, failing, missing, tail)
        if status == "survived" and self.args.confirm_survivors:
            with self.copy() as copy, applied(mutant, copy):
                everything = ["tests", "--ignore=tests/test_mutation_harness.py"]  # it checks the snippets
                full, _, failing, _ = run_pytest(self.python, copy, everything, self.args.full_timeout)
            result.full_suite = full
            result.killed_by = failing
        with self.lock:
            self.done += 1
            killer = f" <- {failing[0]}" if failing else ""
            print(
                f"[{self.done}/{self.total}] {status.upper():9s} {mutant.id} ({seconds:.0f}s){killer}",
                flush=True,
            )
        return result


def existing_tests(tests: tuple[str, ...]) -> tuple[list[str], list[str]]:
    present, missing = [], []
    for test in tests:
        (present if (REPO / test.split("::")[0]).exists() else missing).append(test)
    return present, missing


def run(args: argparse.Namespace, mutants: list[Mutant]) -> list[Result]:
    results: list[Result] = []
    plans = []
    missing_files: set[str] = set()
    for mutant in mutants:
        present, missing = existing_tests(mutant.tests)
        missing_files.update(missing)
        if not present:
            results.append(Result(mutant, "no-tests", missing_tests=missing))
        else:
            plans.append((mutant, tuple(present), missing))
    if missing_files:
        print("test files missing (skipped):", ", ".join(sorted(missing_files)))
    if not plans:
        return results
    runner = Runner(args)
    try:
        runner.setup()
        selections = sorted({tests for _, tests, _ in plans})
        baselines: dict[tuple[str, ...], tuple[bool, float, str]] = {}
        print(f"baseline: {len(selections)} test selection(s) on the unmutated copy")
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for tests, outcome in zip(selections, pool.map(runner.baseline, selections)):
                baselines[tests] = outcome
                print(f"  {'ok    ' if outcome[0] else 'FAILED'} {outcome[1]:5.0f}s  {' '.join(tests)}")
                if not outcome[0]:
                    print(outcome[2])
        runnable = [(m, t, missing) for m, t, missing in plans if baselines[t][0]]
        if runnable:
            fastest = min({t for _, t, _ in runnable}, key=lambda t: baselines[t][1])
            for control, expected in ((CONTROL_NO_OP, "survived"), (CONTROL_BROKEN, "killed")):
                with runner.copy() as copy, applied(control, copy):
                    status, seconds, failing, tail = run_pytest(
                        args.python, copy, list(fastest[:1]), args.baseline_timeout
                    )
                print(f"control {control.id}: {status} ({seconds:.0f}s, expected {expected})")
                if status != expected:
                    raise MutationError(
                        f"control {control.id} {status}, expected {expected}; output:\n{tail}"
                    )
        for mutant, tests, missing in plans:
            if not baselines[tests][0]:
                results.append(Result(mutant, "baseline-failed", missing_tests=missing))
        # slowest selections first, so the pool ends with short jobs
        runnable.sort(key=lambda plan: -baselines[plan[1]][1])
        runner.total = len(runnable)
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = []
            for mutant, tests, missing in runnable:
                timeout = args.timeout or max(args.min_timeout, args.timeout_factor * baselines[tests][1])
                futures.append(pool.submit(runner.run_one, mutant, list(tests), timeout, missing))
            for future, (mutant, _, missing) in zip(futures, runnable):
                try:
                    results.append(future.result())
                except Exception as error:  # e.g. a snippet that no longer matches
                    print(f"ERROR {mutant.id}: {error}")
                    results.append(Result(mutant, "error", missing_tests=missing, output_tail=str(error)))
    finally:
        runner.cleanup()
    order = {m.id: i for i, m in enumerate(mutants)}
    return sorted(results, key=lambda r: order[r.mutant.id])


def summarise(results: list[Result]) -> dict:
    def counts(group: list[Result]) -> dict:
        status = Counter(r.status for r in group)
        tested = status["killed"] + status["survived"] + status["timeout"]
        equivalent = sum(1 for r in group if r.status == "survived" and r.mutant.id in EQUIVALENT)
        return {
            "killed": status["killed"] + status["timeout"],
            "timeouts": status["timeout"],
            "survived": status["survived"],
            "equivalent_survivors": equivalent,
            "tested": tested,
            "not_run": len(group) - tested,
        }

    by_kind: dict[str, list[Result]] = defaultdict(list)
    by_file: dict[str, list[Result]] = defaultdict(list)
    for result in results:
        by_kind[result.mutant.kind].append(result)
        by_file[result.mutant.path].append(result)
    return {
        "total": counts(results),
        "by_kind": {kind: counts(group) for kind, group in sorted(by_kind.items())},
        "by_file": {path: counts(group) for path, group in sorted(by_file.items())},
    }


def print_summary(summary: dict, results: list[Result]) -> None:
    def line(name: str, c: dict) -> str:
        extra = f", {c['timeouts']} by timeout" if c["timeouts"] else ""
        if c["equivalent_survivors"]:
            n = c["equivalent_survivors"]
            extra += f" ({c['killed']} / {c['tested'] - n} without the {n} equivalent)"
        extra += f", {c['not_run']} not run" if c["not_run"] else ""
        return f"  {name:48s} killed {c['killed']:4d} / {c['tested']:4d}{extra}"

    print("\n== mutation score (killed / tested) ==")
    print(line("all", summary["total"]))
    for kind, c in summary["by_kind"].items():
        print(line(kind, c))
    print("by file:")
    for path, c in summary["by_file"].items():
        print(line(path, c))
    survivors = [r for r in results if r.status == "survived"]
    if survivors:
        print(f"\nsurvivors ({len(survivors)}):")
        for r in survivors:
            note = f"  [equivalent: {EQUIVALENT[r.mutant.id]}]" if r.mutant.id in EQUIVALENT else ""
            full = f"  [full suite: {r.full_suite}]" if r.full_suite else ""
            print(f"  {r.mutant.id}: {r.mutant.description}{note}{full}")
    not_run = [r for r in results if r.status not in ("killed", "survived", "timeout")]
    for r in not_run:
        print(f"  not run ({r.status}): {r.mutant.id}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("operator", "method", "all"), default="all")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="run mutants whose id, path or description contains this (repeatable)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="mutants run in parallel (one repo copy each)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON results (relative to the repo)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument(
        "--sample", type=int, default=0, help="at most this many operator mutants, evenly spaced (0: all)"
    )
    parser.add_argument("--include-validation", action="store_true", help="also mutate argument checks")
    parser.add_argument(
        "--timeout", type=float, default=0, help="per-mutant timeout in s (default: from the baseline)"
    )
    parser.add_argument("--timeout-factor", type=float, default=3.0, help="timeout = factor x baseline time")
    parser.add_argument("--min-timeout", type=float, default=60.0)
    parser.add_argument("--baseline-timeout", type=float, default=1800.0)
    parser.add_argument(
        "--confirm-survivors", action="store_true", help="re-run survivors on all of tests/ (slow)"
    )
    parser.add_argument("--full-timeout", type=float, default=3600.0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies")
    default_python = REPO / ".venv" / "bin" / "python"
    parser.add_argument(
        "--python", default=str(default_python) if default_python.exists() else sys.executable
    )
    return parser.parse_args(argv)  # fmt: skip


def select(mutants: list[Mutant], only: list[str], sample: int = 0) -> list[Mutant]:
    """Mutants matching any of ``only`` (all if empty); with ``sample``, at most that many
    operator mutants, evenly spaced over the generated list (so every file keeps its share)."""
    if only:
        mutants = [m for m in mutants if any(s in m.id or s in m.path or s in m.description for s in only)]
    operators = [m for m in mutants if m.kind == "operator"]
    if 0 < sample < len(operators):
        step = len(operators) / sample
        kept = {operators[int(i * step)].id for i in range(sample)}
        mutants = [m for m in mutants if m.kind != "operator" or m.id in kept]
    return mutants


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mutants = select(all_mutants(args.kind, args.include_validation), args.only, args.sample)
    kinds = Counter(m.kind for m in mutants)
    print(f"{len(mutants)} mutants: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    if args.list:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `--list | head` ends quietly
        for m in mutants:
            present, missing = existing_tests(m.tests)
            print(f"{m.kind:8s} {m.id}\n         {m.description}\n         tests: {' '.join(present) or '-'}"
                  + (f" (missing: {' '.join(missing)})" if missing else ""))  # fmt: skip
        return 0
    if not mutants:
        return 1
    started = time.time()
    try:
        results = run(args, mutants)
    except MutationError as error:
        print(f"mutation run stopped: {error}")
        return 2
    summary = summarise(results)
    print_summary(summary, results)
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": "python benchmarks/mutation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": round(time.time() - started),
        "summary": summary,
        "mutants": [r.as_json() for r in results],
    }
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
