"""Shared fixtures: one small phantom NIH dataset and its image cache per test session, and
empty MLflow stores made by copying one blank store."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from trainables.cache import build_cache
from trainables.datasets import DataSpec, load_splits
from trainables.phantom import PhantomLayout, write_nih_phantom

SMALL = PhantomLayout(train_patients=60, val_patients=30, test_patients=30)
IMG_SIZE = 48  # vit_demo's input size


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with end-to-end (slow) tests first: the two pytest workers (`make test`) take
    whole files in this order, so the long ones start at once and the short ones fill in
    around them instead of one long file running alone at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: file order kept


@pytest.fixture(autouse=True, scope="session")
def _single_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and stay fast on a busy shared machine (two
    busy-waiting torch threads on a loaded 2-core machine slow down tenfold)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    return write_nih_phantom(tmp_path_factory.mktemp("nih"), seed=7, layout=SMALL)


@pytest.fixture(scope="session")
def phantom_splits(phantom_root):
    return load_splits(DataSpec("nih", str(phantom_root), splits="lists",
                                list_dir=str(phantom_root)))


@pytest.fixture(scope="session")
def phantom_cache(phantom_splits, tmp_path_factory) -> Path:
    return build_cache(phantom_splits, IMG_SIZE, tmp_path_factory.mktemp("cache"), workers=1)


@pytest.fixture(scope="session")
def _blank_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its schema made (MLflow's migrations take about a second)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def fresh_mlflow(_blank_mlflow_db) -> Callable[[Path], str]:
    """`fresh_mlflow(folder)`: a new, empty MLflow store in `folder` (a copy of the blank
    one), returned as its tracking URI."""
    def make(folder: Path) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_blank_mlflow_db, folder / "mlflow.db")
        return f"sqlite:///{folder / 'mlflow.db'}"
    return make
