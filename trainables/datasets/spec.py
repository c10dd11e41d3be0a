"""The data objects: what a study asks for (`DataSpec`) and what it gets (`DatasetSplits`).

`DataSpec` is validated once, at the edge; everything below it may trust its fields.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from contract.errors import ConfigError

SPLIT_PROTOCOLS = ("medpeft", "lists", "patient")
UNCERTAINTY_POLICIES = ("ones", "zeros", "ignore")
VIEW_CHOICES = ("all", "frontal")
# MED-PEFT publishes three label fractions, each as its own train list.
LIST_FRACTIONS = {0.01: "train_1.txt", 0.1: "train_10.txt", 1.0: "train_list.txt"}
DEFAULT_VAL_FRACTION = 0.1


def list_file_for_fraction(label_fraction: float) -> str | None:
    """The MED-PEFT train-list name of a fraction, or None when the reference has no such list."""
    for fraction, name in LIST_FRACTIONS.items():
        if math.isclose(label_fraction, fraction, rel_tol=1e-9, abs_tol=1e-12):
            return name
    return None


def _fail(name: str, value: object, fix: str) -> None:
    raise ConfigError(f"data.{name} = {value!r} is invalid: {fix}")


@dataclass(frozen=True)
class DataSpec:
    """Which dataset, where it lives, and how it is split.

    `uncertainty` and `views` shape CheXpert labels under the `patient` protocol only: with
    `medpeft` and `lists` the labels and the image set come from the list files. `val_fraction`
    (share of the non-test patients used for validation, default 0.1) and `official_test` (use a
    dataset's official test list where it has one: NIH `test_list.txt`) apply to `patient` only.
    """

    dataset: str
    root: str
    splits: str = "medpeft"
    label_fraction: float = 1.0
    split_seed: int = 0
    list_dir: str | None = None
    uncertainty: str = "ones"
    views: str = "all"
    val_fraction: float | None = None
    official_test: bool = True

    def __post_init__(self) -> None:
        from trainables.datasets.registry import dataset_names

        if self.dataset not in dataset_names():
            _fail("dataset", self.dataset, f"use one of {', '.join(dataset_names())}")
        if isinstance(self.root, os.PathLike):
            object.__setattr__(self, "root", os.fspath(self.root))
        if not isinstance(self.root, str) or not self.root:
            _fail("root", self.root, "give the dataset directory as downloaded")
        if self.splits not in SPLIT_PROTOCOLS:
            _fail("splits", self.splits, f"use one of {', '.join(SPLIT_PROTOCOLS)}")
        self._check_fraction()
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int) \
                or self.split_seed < 0:
            _fail("split_seed", self.split_seed, "use an integer >= 0")
        self._check_list_dir()
        self._check_label_policy()
        self._check_val_fraction()
        if not isinstance(self.official_test, bool):
            _fail("official_test", self.official_test, "use true or false")

    def _check_fraction(self) -> None:
        f = self.label_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            _fail("label_fraction", f, "use a number with 0 < label_fraction <= 1")
        if self.splits != "patient" and list_file_for_fraction(f) is None:
            _fail("label_fraction", f, f"splits = {self.splits!r} has lists for 0.01, 0.1 and "
                  "1.0 only; use one of those or splits = 'patient'")

    def _check_list_dir(self) -> None:
        if self.splits == "lists" and not self.list_dir:
            _fail("list_dir", self.list_dir, "splits = 'lists' needs the folder holding "
                  "train_1.txt, train_10.txt, train_list.txt, val_list.txt, test_list.txt")
        if self.splits != "lists" and self.list_dir is not None:
            _fail("list_dir", self.list_dir, "list_dir is read only with splits = 'lists'; "
                  "remove it or set splits = 'lists'")

    def _check_label_policy(self) -> None:
        if self.uncertainty not in UNCERTAINTY_POLICIES:
            _fail("uncertainty", self.uncertainty, f"use one of {', '.join(UNCERTAINTY_POLICIES)}")
        if self.views not in VIEW_CHOICES:
            _fail("views", self.views, f"use one of {', '.join(VIEW_CHOICES)}")
        custom = (self.uncertainty, self.views) != ("ones", "all")
        if custom and self.dataset != "chexpert":
            _fail("uncertainty/views", (self.uncertainty, self.views),
                  "these apply to dataset = 'chexpert' only; remove them")
        if custom and self.splits != "patient":
            _fail("uncertainty/views", (self.uncertainty, self.views),
                  f"with splits = {self.splits!r} labels and views come from the list files; "
                  "remove them or use splits = 'patient'")

    def _check_val_fraction(self) -> None:
        v = self.val_fraction
        if v is None:
            return
        if self.splits != "patient":
            _fail("val_fraction", v, "applies to splits = 'patient' only; remove it")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
            _fail("val_fraction", v, "use a number with 0 < val_fraction < 1")

    @property
    def effective_val_fraction(self) -> float:
        return DEFAULT_VAL_FRACTION if self.val_fraction is None else float(self.val_fraction)


@dataclass(frozen=True, eq=False)
class SplitTable:
    """One split: image paths (relative to the dataset root), labels and patients, row-aligned.

    `labels` is float32 (n, K); NaN marks a label to ignore in the loss. `meta` optionally holds
    per-image extras (sex, age, view) in the same row order.
    """

    paths: tuple[str, ...]
    labels: np.ndarray
    patient_ids: tuple[str, ...]
    meta: pd.DataFrame | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, dtype=np.float32)
        if labels.ndim != 2 or labels.shape[0] != len(self.paths):
            raise ConfigError(f"SplitTable.labels has shape {labels.shape}, expected "
                              f"({len(self.paths)}, K): build labels with one row per path")
        if len(self.patient_ids) != len(self.paths):
            raise ConfigError(f"SplitTable.patient_ids has {len(self.patient_ids)} entries for "
                              f"{len(self.paths)} paths: give one patient id per path")
        if self.meta is not None and len(self.meta) != len(self.paths):
            raise ConfigError(f"SplitTable.meta has {len(self.meta)} rows for {len(self.paths)} "
                              "paths: give one row per path")
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, rows: np.ndarray) -> SplitTable:
        """The sub-table of the given row indices, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        meta = None if self.meta is None else self.meta.iloc[rows].reset_index(drop=True)
        return SplitTable(
            paths=tuple(self.paths[i] for i in rows),
            labels=self.labels[rows],
            patient_ids=tuple(self.patient_ids[i] for i in rows),
            meta=meta,
        )


def content_hash(label_names: tuple[str, ...], tables: dict[str, SplitTable]) -> str:
    """sha256 over label names and each split's paths and labels, in split order.

    Labels are hashed as little-endian float32 so NaN (ignored) differs from 0 and 1.
    """
    digest = hashlib.sha256()
    digest.update("\t".join(label_names).encode())
    for name, table in tables.items():
        digest.update(f"\n#{name}:{len(table)}\n".encode())
        digest.update("\n".join(table.paths).encode())
        labels = np.where(np.isnan(table.labels), np.float32(np.nan), table.labels)
        digest.update(np.ascontiguousarray(labels, dtype="<f4").tobytes())
    return digest.hexdigest()


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """Train/val/test of one dataset as loaded for one `DataSpec`; `content_hash` is logged."""

    dataset: str
    root: Path
    label_names: tuple[str, ...]
    train: SplitTable
    val: SplitTable
    test: SplitTable
    content_hash: str
    label_fraction: float = 1.0

    def tables(self) -> dict[str, SplitTable]:
        return {"train": self.train, "val": self.val, "test": self.test}


def make_splits(dataset: str, root: Path, label_names: tuple[str, ...], train: SplitTable,
                val: SplitTable, test: SplitTable, label_fraction: float) -> DatasetSplits:
    """Assemble a `DatasetSplits`, computing its content hash (the one way to build one)."""
    tables = {"train": train, "val": val, "test": test}
    return DatasetSplits(dataset=dataset, root=root, label_names=label_names, train=train,
                         val=val, test=test, content_hash=content_hash(label_names, tables),
                         label_fraction=float(label_fraction))
