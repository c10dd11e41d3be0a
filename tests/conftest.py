"""Shared fixtures: one small phantom NIH dataset and its image cache per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from trainables.cache import build_cache
from trainables.datasets import DataSpec, load_splits
from trainables.phantom import PhantomLayout, write_nih_phantom

SMALL = PhantomLayout(train_patients=60, val_patients=30, test_patients=30)
IMG_SIZE = 48  # vit_demo's input size


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
