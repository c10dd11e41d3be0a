"""RSNA Pneumonia Detection as downloaded: `stage_2_train_labels.csv` and DICOM images.

The CSV has one row per bounding box (`patientId,x,y,width,height,Target`), so a patient with
several boxes has several rows; they reduce to one label, the maximum Target. Each patient has
one image, `stage_2_train_images/<patientId>.dcm`, so the file name is the patient id.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from trainables.datasets.lists import ListEntries
from trainables.datasets.problems import Problems
from trainables.datasets.registry import DatasetReader, Pool, missing_files, register
from trainables.datasets.spec import DataSpec, SplitTable

LABELS_CSV = "stage_2_train_labels.csv"
IMAGE_DIR = "stage_2_train_images"
REQUIRED_COLUMNS = ("patientId", "Target")
DOWNLOAD_FIX = (f"unpack {IMAGE_DIR}/ (and stage_2_test_images/ for the medpeft test list) "
                "of the Kaggle download under the dataset root")


@register
class RSNAReader(DatasetReader):
    name = "rsna"
    label_names = ("Pneumonia",)
    medpeft_folder = "RSNA_Pneumonia"

    def __init__(self, root: Path, problems: Problems) -> None:
        super().__init__(root, problems)
        self.csv_path = root / LABELS_CSV
        self.targets = _read_targets(self.csv_path, problems)

    def _table(self, paths: list[str], labels: np.ndarray, source: str) -> SplitTable:
        self.problems.report("missing image", missing_files(self.root, paths), DOWNLOAD_FIX,
                             source=source)
        return SplitTable(paths=tuple(paths), labels=labels,
                          patient_ids=tuple(PurePosixPath(p).stem for p in paths))

    def table_from_list(self, entries: ListEntries) -> SplitTable:
        return self._table(list(entries.paths), entries.labels, str(entries.source))

    def pool(self, spec: DataSpec) -> Pool:
        paths = [f"{IMAGE_DIR}/{pid}.dcm" for pid in self.targets.index]
        labels = self.targets.to_numpy(np.float32).reshape(-1, 1)
        return Pool(self._table(paths, labels, str(self.csv_path)))


def _read_targets(path: Path, problems: Problems) -> pd.Series:
    """Target per patientId (max over that patient's rows), in first-appearance order."""
    if not path.is_file():
        problems.report("missing metadata CSV", [str(path)], f"put {LABELS_CSV} of the Kaggle "
                        "download in the dataset root", source=str(path.parent), fatal=True)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.columns = [str(c).strip() for c in frame.columns]
    absent = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    problems.report("missing column", absent, "use the published header "
                    "(patientId,x,y,width,height,Target)", source=str(path), fatal=True)
    ids = frame["patientId"].str.strip()
    target = frame["Target"].str.strip()
    bad = [f"line {i + 2}: Target = {t!r}" for i, t in enumerate(target) if t not in ("0", "1")]
    problems.report("unknown label value", bad, "Target must be 0 or 1", source=str(path))
    empty = [f"line {i + 2}" for i, p in enumerate(ids) if not p]
    problems.report("row without patientId", empty, "fill in patientId", source=str(path))
    unsafe = ids.str.contains(r"[/\\]|^\.\.?$", regex=True)
    problems.report("absolute or escaping path", [f"line {i + 2}: {p}" for i, p in
                                                  enumerate(ids) if unsafe.iat[i]],
                    "patientId must be a plain file stem", source=str(path))
    keep = target.isin(("0", "1")) & (ids != "") & ~unsafe
    values = target[keep].astype(int)
    return values.groupby(ids[keep], sort=False).max()
