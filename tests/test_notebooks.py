"""The notebooks in notebooks/ are executed top to bottom, so they cannot rot.

Each runs with the ``python3`` kernel of the current environment (ipykernel installs it into
the venv) from the notebooks/ folder, as a user would open it; a cell that raises fails the
test with the cell's traceback. Committed notebooks carry no outputs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["quickstart.ipynb", "semi_supervised.ipynb"]


@pytest.fixture(scope="module")
def kernel_env():
    """The kernel is a child process: give it this interpreter's environment, one thread."""
    saved = dict(os.environ)
    os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    os.environ["WANDB_MODE"] = "offline"
    # the venv's bin first, so a kernelspec that says "python" finds this interpreter
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_notebooks_are_committed_without_outputs():
    for name in NAMES:
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code, f"{name} has no code cells"
        for cell in code:
            assert not cell.get("outputs") and cell.get("execution_count") is None, (
                f"{name} has committed outputs; clear them (Kernel > Restart & Clear Output)"
            )


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, kernel_env):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
        allow_errors=False,
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors
    images = sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    assert images >= 2, f"{name} drew {images} figures; expected its plots"
