"""The Colab notebooks: committed without outputs, and each one runs top to bottom on the tiny checkpoint.

Every notebook is executed in memory (the committed file is never rewritten) by a kernel of this interpreter,
offline, with ``XCODEC2_MODEL`` pointing at the ``reference`` fixture's tiny random checkpoint. The notebooks
share their clip lengths and engine settings, so through the session's persistent compilation cache (see
conftest) the codec's encoder compiles once for all three: together they run in about 1.5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO_ROOT / "notebooks"
# What each notebook must show: figures (image/png outputs) and audio players (IPython.display.Audio's HTML).
EXPECTED = {
    "01_quickstart.ipynb": {"figures": 2, "players": 2},
    "02_batch_tokenization.ipynb": {"figures": 1, "players": 1},
    "03_llm_tts_integration.ipynb": {"figures": 1, "players": 1},
}
CELL_TIMEOUT_S = 600


def test_every_notebook_is_tested():
    assert sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_clean(name):
    """Valid nbformat, no outputs or execution counts, and the documented model default and override."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=nbformat.NO_CONVERT)
    nbformat.validate(notebook)
    dirty = [index for index, cell in enumerate(notebook.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{name}: code cells {dirty} hold outputs; commit notebooks with outputs cleared"
    source = "\n".join(cell.source for cell in notebook.cells)
    assert 'os.environ.get("XCODEC2_MODEL", "HKUSTAudio/xcodec2-hf")' in source


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_runs(name, reference, tmp_path):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    env = {
        **os.environ,
        "XCODEC2_MODEL": str(reference.checkpoint),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"),
        # This checkout's package, even where another version is installed.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    for variable in ("XCODEC2_AUDIO", "XCODEC2_AUDIO_DIR", "MPLBACKEND"):  # the notebooks' defaults; inline plots
        env.pop(variable, None)
    # Kernel spec "python3" resolved to ipykernel's own spec for this interpreter, whatever else is installed.
    kernel = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    client = NotebookClient(notebook, km=kernel, timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(tmp_path)}})  # the kernel's working directory
    client.execute(env=env)  # raises CellExecutionError, with the cell's traceback, at the first failing cell

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    errors = [f"{output.ename}: {output.evalue}" for output in outputs if output.output_type == "error"]
    assert not errors, f"{name}: {errors}"
    data = [output.get("data", {}) for output in outputs]
    figures = sum("image/png" in item for item in data)
    players = sum("<audio" in item.get("text/html", "") for item in data)
    assert figures >= EXPECTED[name]["figures"], f"{name}: {figures} figure(s)"
    assert players >= EXPECTED[name]["players"], f"{name}: {players} audio player(s)"
