"""Both analysis notebooks run headless against a synthetic study; any cell error fails."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.synthetic_study import shared_study

NOTEBOOKS = Path(__file__).resolve().parents[1] / "analysis" / "notebooks"


@pytest.mark.parametrize("name", ["explore_study.ipynb", "lora_vs_fft.ipynb"])
def test_notebook_executes(name, tmp_path_factory, tmp_path, monkeypatch):
    study = shared_study(tmp_path_factory)
    monkeypatch.setenv("CXR_TRACKING_URI", study.tracking_uri)
    monkeypatch.setenv("CXR_EXPERIMENT", study.experiment)
    monkeypatch.setenv("CXR_N_BOOT", "200")
    root = str(NOTEBOOKS.parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plots rendered
