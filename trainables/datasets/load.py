"""`load_splits`: a `DataSpec` in, a checked `DatasetSplits` out, for all three protocols.

- `medpeft`: the reference lists packaged in `trainables/datasets/medpeft/`.
- `lists`: lists in the same format in `spec.list_dir` (relative paths resolve against root).
- `patient`: our protocol. Test is the dataset's official test list where it has one (NIH with
  `official_test`), otherwise the first 20% of a stratified patient order drawn with seed 0, so
  the test set never moves with `split_seed`. Validation is the first `val_fraction` of a
  stratified order of the remaining patients drawn with `split_seed`; train fraction f is the
  first f of the rest of that order, so 1% of patients lie inside 10% inside 100%.

Every result passes the leakage guard (no patient in two splits) and warns when a class has
fewer than 50 positive images in validation, where model selection happens.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from trainables.datasets.lists import list_names, read_list
from trainables.datasets.problems import Problems
from trainables.datasets.registry import MEDPEFT_DIR, DatasetReader, Pool, get_reader
from trainables.datasets.spec import DatasetSplits, DataSpec, SplitTable, make_splits
from trainables.datasets.stratify import patient_labels, stratified_order

CARVED_TEST_FRACTION = 0.2
MIN_VAL_POSITIVES = 50
# Independent random streams per purpose, so the test draw cannot depend on split_seed.
TEST_STREAM, VAL_TRAIN_STREAM = 1, 2
TEST_SEED = 0


def load_splits(spec: DataSpec) -> DatasetSplits:
    """Read the dataset and its splits as `spec` asks; any data problem is a one-line DataError."""
    return build_splits(spec, Problems(strict=True))


def build_splits(spec: DataSpec, problems: Problems) -> DatasetSplits:
    """`load_splits` with an explicit problem log (collecting mode serves `check_dataset`)."""
    # Absolute, so the paths stay valid for workers started in another directory.
    root = Path(spec.root).expanduser().absolute()
    if not root.is_dir():
        problems.report("missing dataset root", [str(root)], "set data.root to the dataset "
                        "folder as downloaded", source=str(root), fatal=True)
    reader = get_reader(spec.dataset)(root, problems)
    if spec.splits == "patient":
        tables = patient_tables(reader.pool(spec), spec, reader.label_names, problems)
    else:
        tables = list_tables(reader, spec, problems)
    splits = make_splits(spec.dataset, root, reader.label_names, tables["train"], tables["val"],
                         tables["test"], spec.label_fraction)
    guard_leakage(splits, problems)
    warn_small_validation(splits, spec)
    return splits


def list_folder(spec: DataSpec, medpeft_folder: str) -> Path:
    if spec.splits == "medpeft":
        return MEDPEFT_DIR / medpeft_folder
    folder = Path(spec.list_dir or "").expanduser()
    return folder if folder.is_absolute() else Path(spec.root).expanduser() / folder


def list_tables(reader: DatasetReader, spec: DataSpec, problems: Problems) -> dict[str, SplitTable]:
    folder = list_folder(spec, reader.medpeft_folder)
    k = len(reader.label_names)
    tables: dict[str, SplitTable] = {}
    for split, name in list_names(spec.label_fraction).items():
        path = folder / name
        if split == "train" and spec.splits == "medpeft" and not path.is_file():
            continue  # not published: derived below from the dataset's own CSV
        tables[split] = reader.table_from_list(read_list(path, k, problems))
    if "train" not in tables:
        held_out = set(tables["val"].patient_ids) | set(tables["test"].patient_ids)
        derived = reader.full_train_without(held_out)
        if derived is None:
            problems.report("missing split list", [str(folder / list_names(1.0)["train"])],
                            "restore the packaged MED-PEFT lists", source=str(folder), fatal=True)
        tables["train"] = derived
    return {s: tables[s] for s in ("train", "val", "test")}


def _patient_index(table: SplitTable) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique patient ids and, per row, the index of its patient."""
    ids, inverse = np.unique(np.asarray(table.patient_ids, dtype=object).astype(str),
                             return_inverse=True)
    return ids, inverse.reshape(-1)


def _first(order: np.ndarray, fraction: float) -> int:
    return min(len(order), max(1, round(fraction * len(order))))


def patient_tables(pool: Pool, spec: DataSpec, label_names: tuple[str, ...],
                   problems: Problems) -> dict[str, SplitTable]:
    table = pool.table
    ids, row_patient = _patient_index(table)
    y = patient_labels(table.labels, row_patient, len(ids))
    if pool.official_test is not None:
        test_patients = np.unique(row_patient[pool.official_test])
        test_rows = pool.official_test
    else:
        order = stratified_order(y, np.random.default_rng([TEST_SEED, TEST_STREAM]))
        test_patients = np.sort(order[:_first(order, CARVED_TEST_FRACTION)])
        test_rows = np.isin(row_patient, test_patients)
    rest = np.setdiff1d(np.arange(len(ids)), test_patients)
    order = rest[stratified_order(y[rest], np.random.default_rng([spec.split_seed,
                                                                  VAL_TRAIN_STREAM]))]
    n_val = _first(order, spec.effective_val_fraction)
    val_patients, train_order = order[:n_val], order[n_val:]
    train_patients = train_order[:_first(train_order, spec.label_fraction)]
    tables = {
        "train": table.take(np.flatnonzero(np.isin(row_patient, train_patients))),
        "val": table.take(np.flatnonzero(np.isin(row_patient, val_patients))),
        "test": table.take(np.flatnonzero(test_rows)),
    }
    for split, part in tables.items():
        problems.report("empty split", [] if len(part) else [split], "the dataset has too few "
                        "patients for this split; check the data or the fractions",
                        source=f"{spec.dataset} patient split")
    _require_train_positives(tables["train"], label_names, spec, problems)
    return tables


def _require_train_positives(train: SplitTable, label_names: tuple[str, ...], spec: DataSpec,
                             problems: Problems) -> None:
    positives = (train.labels == 1.0).sum(axis=0)
    empty = [name for name, n in zip(label_names, positives) if n == 0]
    problems.report("class without a positive in train", empty,
                    f"label_fraction = {spec.label_fraction:g} leaves no positive image of "
                    "these classes; use a larger label_fraction (or another split_seed)",
                    source=f"{spec.dataset} patient split (seed {spec.split_seed})")


def guard_leakage(splits: DatasetSplits, problems: Problems) -> None:
    """No patient may appear in two of train, val and test."""
    sets = {name: set(t.patient_ids) - {""} for name, t in splits.tables().items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = sorted(sets[a] & sets[b])
        problems.report(f"patient overlap between {a} and {b}",
                        [f"patient {p}" for p in shared],
                        "make the split lists patient-disjoint (or use splits = 'patient')",
                        source=f"{splits.dataset} splits")


def warn_small_validation(splits: DatasetSplits, spec: DataSpec) -> None:
    positives = (splits.val.labels == 1.0).sum(axis=0)
    few = [f"{name} ({int(n)})" for name, n in zip(splits.label_names, positives)
           if n < MIN_VAL_POSITIVES]
    if few:
        fix = (f"raise val_fraction (now {spec.effective_val_fraction:g})"
               if spec.splits == "patient" else "consider splits = 'patient' with a larger "
               "val_fraction")
        warnings.warn(f"{splits.dataset}: validation has fewer than {MIN_VAL_POSITIVES} "
                      f"positives for {', '.join(few)}; model selection on it is noisy - "
                      f"{fix}", stacklevel=4)
