"""Datasets by name. Adding a dataset is one `DatasetReader` subclass decorated with `register`.

A reader is opened on a dataset root (it reads the metadata CSV and indexes image folders once)
and then answers three questions: the table of a MED-PEFT list, the pool of all labelled images
for the patient protocol, and (CheXpert only) the derived 100% train list.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from contract.errors import ConfigError
from trainables.datasets.lists import ListEntries
from trainables.datasets.problems import Problems
from trainables.datasets.spec import DataSpec, SplitTable

MEDPEFT_DIR = Path(__file__).resolve().parent / "medpeft"


@dataclass(frozen=True, eq=False)
class Pool:
    """All labelled images of a dataset, plus which rows form its official test set (if any)."""

    table: SplitTable
    official_test: np.ndarray | None = None


class DatasetReader:
    """Base class of the dataset readers; subclasses set the class attributes and methods."""

    name: ClassVar[str]
    label_names: ClassVar[tuple[str, ...]]
    medpeft_folder: ClassVar[str]

    def __init__(self, root: Path, problems: Problems) -> None:
        self.root = root
        self.problems = problems

    def table_from_list(self, entries: ListEntries) -> SplitTable:
        raise NotImplementedError

    def pool(self, spec: DataSpec) -> Pool:
        raise NotImplementedError

    def full_train_without(self, patients: set[str]) -> SplitTable | None:
        """The 100% train set when the reference did not publish one; None if it did."""
        return None


_READERS: dict[str, type[DatasetReader]] = {}


def register(cls: type[DatasetReader]) -> type[DatasetReader]:
    _READERS[cls.name] = cls
    return cls


def dataset_names() -> tuple[str, ...]:
    return tuple(sorted(_READERS))


def get_reader(name: str) -> type[DatasetReader]:
    if name not in _READERS:
        raise ConfigError(f"data.dataset = {name!r} is unknown: use one of "
                          f"{', '.join(dataset_names())}")
    return _READERS[name]


def missing_files(root: Path, rel_paths: Iterable[str]) -> list[str]:
    """The paths (relative to `root`) that are not files; each folder is listed only once."""
    by_dir: dict[str, list[str]] = defaultdict(list)
    for rel in rel_paths:
        parent, _, name = rel.rpartition("/")
        by_dir[parent].append(name)
    missing: list[str] = []
    for parent, names in by_dir.items():
        folder = root / parent if parent else root
        try:
            present = {e.name for e in os.scandir(folder) if not e.is_dir()}
        except OSError:
            present = set()
        missing.extend(f"{parent}/{n}" if parent else n for n in names if n not in present)
    return missing
