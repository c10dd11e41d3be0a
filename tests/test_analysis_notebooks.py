"""The analysis notebooks run headless against a synthetic study; any cell error fails. `make
notebooks` opens them from the venv on 127.0.0.1 with the study set (its command line only:
no server starts here)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.synthetic_study import methods_study, shared_study

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "analysis" / "notebooks"


@pytest.mark.parametrize("name", ["explore_study.ipynb", "lora_vs_fft.ipynb",
                                  "compare_methods.ipynb"])
def test_notebook_executes(name, tmp_path_factory, tmp_path, monkeypatch):
    # The methods notebook reads the four-method study; the others the default one.
    study = (methods_study if name == "compare_methods.ipynb" else shared_study)(
        tmp_path_factory)
    monkeypatch.setenv("CXR_TRACKING_URI", study.tracking_uri)
    monkeypatch.setenv("CXR_EXPERIMENT", study.experiment)
    monkeypatch.setenv("CXR_N_BOOT", "500")
    monkeypatch.setenv("CXR_REFERENCE_ARM", "")  # as `make notebooks` sets it: the default
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plots rendered
    if name == "compare_methods.ipynb":
        text = "".join(str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
        assert "Against fft: partial wins 2 of 2 tasks (2 significant)" in text
        assert "Friedman test over 2 blocks (task x split draw) and 4 arms" in text


def _make_notebooks(*assignments: str) -> str:
    """What `make notebooks` would run, printed by `make -n` (nothing is started)."""
    done = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), "notebooks",
                           *assignments], capture_output=True, text=True, check=True)
    return done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_notebooks_opens_the_study_from_the_venv_on_loopback(tmp_path):
    store = tmp_path / "my_study"
    store.mkdir()
    (store / "mlflow.db").touch()
    printed = _make_notebooks(f"STUDY={store}")
    command = " ".join(printed.replace("\\\n", " ").split())
    assert f"CXR_TRACKING_URI='sqlite:///{store}/mlflow.db'" in command
    assert "CXR_EXPERIMENT='my_study'" in command  # the folder's name by default
    assert ".venv-notebooks/bin/jupyter lab --ip=127.0.0.1 " in command
    assert "--KernelSpecManager.ensure_native_kernel=False" in command  # the project's kernel
    assert "--ServerApp.root_dir=analysis/notebooks" in command
    server = _make_notebooks("TRACKING_URI=http://127.0.0.1:5000", "EXPERIMENT=methods",
                             "REFERENCE_ARM=lora")
    command = " ".join(server.replace("\\\n", " ").split())
    assert "CXR_TRACKING_URI='http://127.0.0.1:5000' CXR_EXPERIMENT='methods'" in command
    assert "CXR_REFERENCE_ARM='lora'" in command
