"""CheXpert as downloaded: `train.csv` / `valid.csv` and JPEGs, small or full-size release.

`Path` values start with `CheXpert-v1.0-small/` or `CheXpert-v1.0/`. The dataset root may be the
folder holding that directory or the directory itself; either way paths are rewritten to be
relative to the root, and list entries naming the other release are mapped onto the one present.
The separately released test set (the MED-PEFT test list points at `test/...`) must be unpacked
as `test/` next to `train/` and `valid/`.

Labels are the 5 competition observations. In the CSVs 1 is positive, 0 negative, -1 uncertain
and empty "not mentioned", which is read as negative. The uncertainty policy maps -1 to 1
(`ones`), 0 (`zeros`) or NaN (`ignore`: masked in the loss). Patient ids come from the
`patientNNNNN` folder of each path.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from trainables.datasets.lists import ListEntries, confined_path
from trainables.datasets.problems import Problems
from trainables.datasets.registry import DatasetReader, Pool, missing_files, register
from trainables.datasets.spec import DataSpec, SplitTable

COMPETITION_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                      "Pleural Effusion")
RELEASES = ("CheXpert-v1.0-small", "CheXpert-v1.0")
REQUIRED_COLUMNS = ("Path", "Frontal/Lateral", *COMPETITION_LABELS)
META_COLUMNS = {"Sex": "sex", "Age": "age", "Frontal/Lateral": "view", "AP/PA": "projection"}
_PATIENT = re.compile(r"(?:^|/)(patient\d+)(?:/|$)")
DOWNLOAD_FIX = ("unpack CheXpert (train/ and valid/, and the separately released test/ for the "
                "medpeft test list) under the dataset root")


def patient_of(path: str) -> str:
    match = _PATIENT.search(path)
    return match.group(1) if match else ""


def apply_policy(raw: np.ndarray, uncertainty: str) -> np.ndarray:
    """Raw CSV values (1, 0, -1, NaN for empty) to float32 labels under an uncertainty policy."""
    labels = np.where(np.isnan(raw), 0.0, raw)
    uncertain = {"ones": 1.0, "zeros": 0.0, "ignore": np.nan}[uncertainty]
    return np.where(labels == -1.0, uncertain, labels).astype(np.float32)


@register
class CheXpertReader(DatasetReader):
    name = "chexpert"
    label_names = COMPETITION_LABELS
    medpeft_folder = "CheXpert"

    def __init__(self, root: Path, problems: Problems) -> None:
        super().__init__(root, problems)
        self.base = _locate_release(root, problems)
        self.train, self.train_raw = self._read_csv(root / self.base / "train.csv")
        valid_csv = root / self.base / "valid.csv"
        valid = self._read_csv(valid_csv)[0] if valid_csv.is_file() else self.train.iloc[:0]
        both = pd.concat([self.train, valid], ignore_index=True).drop_duplicates("rel")
        self.meta_by_path = both.set_index("rel")[list(META_COLUMNS.values())]

    def rel_path(self, path: str) -> str | None:
        """A CSV or list path as a path relative to the dataset root (None if unsafe)."""
        rel = confined_path(path)
        if rel is None:
            return None
        first, _, rest = rel.partition("/")
        if first in RELEASES:
            rel = rest
        return f"{self.base}/{rel}" if self.base else rel

    def _read_csv(self, path: Path) -> tuple[pd.DataFrame, np.ndarray]:
        """The CSV with `rel` (path under root), `patient` and meta columns; raw labels."""
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        frame.columns = [str(c).strip() for c in frame.columns]
        absent = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        self.problems.report("missing column", absent, "use the published CheXpert header "
                             "(Path, Sex, Age, Frontal/Lateral, AP/PA, No Finding, ...)",
                             source=str(path), fatal=True)
        rel = [self.rel_path(p) for p in frame["Path"]]
        unsafe = [f"line {i + 2}: {p}" for i, (p, r) in enumerate(zip(frame["Path"], rel))
                  if r is None]
        self.problems.report("absolute or escaping path", unsafe, "keep Path values as "
                             "published (CheXpert-v1.0-small/...)", source=str(path))
        frame["rel"] = [r or "" for r in rel]
        frame["patient"] = [patient_of(r) for r in frame["rel"]]
        no_patient = [f"line {i + 2}: {p}" for i, (p, r) in enumerate(zip(frame["Path"], rel))
                      if r is not None and not frame["patient"].iat[i]]
        self.problems.report("path without patientNNNNN folder", no_patient,
                             "keep Path values as published", source=str(path))
        repeated = frame["rel"][frame["rel"].duplicated() & (frame["rel"] != "")].tolist()
        self.problems.report("duplicated image id", repeated, "keep one row per Path",
                             source=str(path))
        frame = frame[(frame["rel"] != "") & (frame["patient"] != "")]
        frame = frame.drop_duplicates("rel").reset_index(drop=True)
        raw = self._raw_labels(frame, path)
        for column, short in META_COLUMNS.items():
            frame[short] = frame[column] if column in frame.columns else ""
        frame["age"] = pd.to_numeric(frame["age"], errors="coerce")
        return frame, raw

    def _raw_labels(self, frame: pd.DataFrame, path: Path) -> np.ndarray:
        text = frame[list(COMPETITION_LABELS)].apply(lambda s: s.str.strip())
        raw = text.apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
        bad = (~np.isin(raw, (1.0, 0.0, -1.0)) & ~np.isnan(raw)) | (np.isnan(raw) & (
            text.to_numpy() != ""))
        rows, cols = np.nonzero(bad)
        offenders = [f"line {r + 2}, {COMPETITION_LABELS[c]} = {text.iat[r, c]!r}"
                     for r, c in zip(rows, cols)]
        self.problems.report("unknown label value", offenders, "use 1, 0, -1 or empty",
                             source=str(path))
        return np.where(bad, np.nan, raw)

    def _table(self, frame: pd.DataFrame, labels: np.ndarray, source: str) -> SplitTable:
        self.problems.report("missing image", missing_files(self.root, frame["rel"]),
                             DOWNLOAD_FIX, source=source)
        return SplitTable(paths=tuple(frame["rel"]), labels=labels,
                          patient_ids=tuple(frame["patient"]),
                          meta=frame[list(META_COLUMNS.values())].reset_index(drop=True))

    def table_from_list(self, entries: ListEntries) -> SplitTable:
        paths = [self.rel_path(p) or p for p in entries.paths]
        source = str(entries.source)
        self.problems.report("missing image", missing_files(self.root, paths), DOWNLOAD_FIX,
                             source=source)
        patients = [patient_of(p) for p in paths]
        self.problems.report("path without patientNNNNN folder",
                             [p for p, pid in zip(paths, patients) if not pid],
                             "list CheXpert paths as published", source=source)
        meta = self.meta_by_path.reindex(paths).reset_index(drop=True)
        return SplitTable(paths=tuple(paths), labels=entries.labels,
                          patient_ids=tuple(patients), meta=meta)

    def pool(self, spec: DataSpec) -> Pool:
        frame = self.train
        keep = np.ones(len(frame), dtype=bool)
        if spec.views == "frontal":
            keep = (frame["Frontal/Lateral"].str.strip().str.lower() == "frontal").to_numpy()
        labels = apply_policy(self.train_raw[keep], spec.uncertainty)
        return Pool(self._table(frame[keep], labels, str(self.root / self.base / "train.csv")))

    def full_train_without(self, patients: set[str]) -> SplitTable:
        """The MED-PEFT 100% train list, which the reference did not publish.

        Derived from `train.csv` the way the published 1% and 10% lists were made: all views
        (lateral included), uncertain labels as positive (U-Ones), empty as negative; patients
        of the val and test lists are left out so the guard holds.
        """
        frame = self.train
        keep = ~frame["patient"].isin(patients).to_numpy()
        labels = apply_policy(self.train_raw[keep], "ones")
        return self._table(frame[keep], labels, str(self.root / self.base / "train.csv"))


def _locate_release(root: Path, problems: Problems) -> str:
    """The folder (relative to root, '' for root itself) holding train.csv."""
    for candidate in (*RELEASES, ""):
        if (root / candidate / "train.csv").is_file():
            return candidate
    problems.report("missing metadata CSV", [str(root / RELEASES[0] / "train.csv")],
                    "set data.root to the folder holding CheXpert-v1.0-small/ (or "
                    "CheXpert-v1.0/), or to that folder itself", source=str(root), fatal=True)
    return ""
