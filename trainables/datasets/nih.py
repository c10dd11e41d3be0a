"""NIH ChestX-ray14 as downloaded: `Data_Entry_2017.csv`, PNGs in `images/` or `images_00N/images/`.

The CSV gives patient ids, findings and per-image extras. Its original header ends with a
trailing comma (an extra empty column) and the 2020 revision (`Data_Entry_2017_v2020.csv`) has
none; both read the same. Split lists name bare files (`00003547_001.png`): each name is found
through one index of the image folders, built when the reader opens.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from trainables.datasets.lists import TEST_LIST, ListEntries
from trainables.datasets.problems import Problems
from trainables.datasets.registry import DatasetReader, Pool, missing_files, register
from trainables.datasets.spec import DataSpec, SplitTable

NIH_LABELS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
CSV_NAMES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
META_COLUMNS = {"Patient Gender": "sex", "Patient Age": "age", "View Position": "view"}
DOWNLOAD_FIX = ("unpack every images_00N archive of the download into the dataset root "
                "(images/ or images_00N/images/)")


@register
class NIHReader(DatasetReader):
    name = "nih"
    label_names = NIH_LABELS
    medpeft_folder = "NIH_ChestX-ray"

    def __init__(self, root: Path, problems: Problems) -> None:
        super().__init__(root, problems)
        self.csv_path, self.entries = _read_data_entry(root, problems)
        # Parsed even when lists supply the labels, so a damaged CSV is caught either way.
        self.labels = _finding_labels(self.entries["Finding Labels"], problems, self.csv_path)
        self.row_of = {name: i for i, name in enumerate(self.entries["Image Index"])}
        self.meta = _meta_frame(self.entries)
        self.image_index = _index_images(root, problems)

    def _resolve(self, names: tuple[str, ...], source: str) -> tuple[list[str], list[str]]:
        """Relative paths of list entries (bare names via the index) and the missing ones."""
        resolved: list[str] = []
        needs_check: list[str] = []
        missing: list[str] = []
        for rel in names:
            if "/" in rel:
                resolved.append(rel)
                needs_check.append(rel)
            elif rel in self.image_index:
                resolved.append(self.image_index[rel])
            else:
                resolved.append(rel)
                missing.append(rel)
        missing.extend(missing_files(self.root, needs_check))
        self.problems.report("missing image", missing, DOWNLOAD_FIX, source=source)
        return resolved, missing

    def _rows(self, paths: tuple[str, ...], source: str) -> np.ndarray:
        names = [p.rpartition("/")[2] for p in paths]
        unknown = [n for n in names if n not in self.row_of]
        self.problems.report("image not in the metadata CSV", unknown,
                             f"use the {CSV_NAMES[0]} of the same download", source=source)
        return np.array([self.row_of.get(n, -1) for n in names], dtype=np.int64)

    def table_from_list(self, entries: ListEntries) -> SplitTable:
        paths, _ = self._resolve(entries.paths, str(entries.source))
        rows = self._rows(entries.paths, str(entries.source))
        return SplitTable(paths=tuple(paths), labels=entries.labels,
                          patient_ids=_column_at(self.entries["Patient ID"], rows, ""),
                          meta=_meta_at(self.meta, rows))

    def pool(self, spec: DataSpec) -> Pool:
        names = tuple(self.entries["Image Index"])
        paths, missing = self._resolve(names, str(self.csv_path))
        rows = np.arange(len(names))
        table = SplitTable(paths=tuple(paths), labels=self.labels,
                           patient_ids=tuple(self.entries["Patient ID"]),
                           meta=_meta_at(self.meta, rows))
        if missing:  # collecting mode: keep only the images that exist
            gone = set(missing)
            table = table.take(np.array([i for i, p in enumerate(paths) if p not in gone]))
        official = self._official_test(table) if spec.official_test else None
        return Pool(table=table, official_test=official)

    def _official_test(self, table: SplitTable) -> np.ndarray:
        """Rows named by the official `test_list.txt` (first token per line, MED-PEFT or not)."""
        path = self.root / TEST_LIST
        if not path.is_file():
            self.problems.report("missing official test list", [str(path)], "put NIH's "
                                 "test_list.txt in the dataset root or set "
                                 "data.official_test = false", source=str(path), fatal=True)
            return np.zeros(len(table), dtype=bool)
        with open(path, encoding="utf-8", errors="replace") as fh:
            names = {line.split()[0].rpartition("/")[2] for line in fh if line.strip()}
        unknown = sorted(names - set(self.row_of))
        self.problems.report("test image not in the metadata CSV", unknown,
                             f"use the test_list.txt and {CSV_NAMES[0]} of the same download",
                             source=str(path))
        return np.array([p.rpartition("/")[2] in names for p in table.paths], dtype=bool)


def _read_data_entry(root: Path, problems: Problems) -> tuple[Path, pd.DataFrame]:
    candidates = [root / name for name in CSV_NAMES]
    path = next((p for p in candidates if p.is_file()), candidates[0])
    if not path.is_file():
        problems.report("missing metadata CSV", [str(path)], f"put {CSV_NAMES[0]} (or "
                        f"{CSV_NAMES[1]}) of the download in the dataset root",
                        source=str(root), fatal=True)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    # The original header's trailing comma adds an unnamed empty column: drop it.
    frame.columns = [str(c).strip() for c in frame.columns]
    frame = frame.loc[:, [c for c in frame.columns if c and not c.startswith("Unnamed:")]]
    absent = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    problems.report("missing column", absent, "use the published header "
                    f"({', '.join(REQUIRED_COLUMNS)}, ...)", source=str(path), fatal=True)
    for column in frame.columns:
        frame[column] = frame[column].astype(str).str.strip()
    repeated = frame["Image Index"][frame["Image Index"].duplicated()].tolist()
    problems.report("duplicated image id", repeated, "keep one row per Image Index",
                    source=str(path))
    frame = frame.drop_duplicates("Image Index").reset_index(drop=True)
    return path, frame


def _index_images(root: Path, problems: Problems) -> dict[str, str]:
    """Map each PNG file name to its path relative to root, over all image folders."""
    folders = [root / "images"] + sorted(root.glob("images_*/images"))
    index: dict[str, str] = {}
    clashes: list[str] = []
    for folder in folders:
        if not folder.is_dir():
            continue
        rel_folder = folder.relative_to(root).as_posix()
        for entry in os.scandir(folder):
            if entry.name in index:
                clashes.append(f"{entry.name} in {index[entry.name]} and {rel_folder}")
            else:
                index[entry.name] = f"{rel_folder}/{entry.name}"
    problems.report("duplicated image name", clashes, "keep each image in one folder",
                    source=str(root))
    return index


def _finding_labels(findings: pd.Series, problems: Problems, source: Path) -> np.ndarray:
    """`|`-joined finding names to a (n, 14) 0/1 matrix in reference order."""
    dummies = findings.str.get_dummies(sep="|")
    dummies.columns = [str(c).strip() for c in dummies.columns]
    dummies = dummies.T.groupby(level=0).max().T
    unknown = [c for c in dummies.columns if c not in NIH_LABELS and c != NO_FINDING]
    counts = [f"{c} ({int(dummies[c].sum())} rows)" for c in unknown]
    problems.report("unknown finding label", counts, f"use the 14 NIH names or '{NO_FINDING}'",
                    source=str(source), count=len(unknown))
    return dummies.reindex(columns=list(NIH_LABELS), fill_value=0).to_numpy(np.float32)


def _column_at(column: pd.Series, rows: np.ndarray, fill: str) -> tuple[str, ...]:
    values = column.to_numpy()
    return tuple(str(values[r]) if r >= 0 else fill for r in rows)


def _meta_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """sex, age (years, float) and view per CSV row, plus one all-missing row at the end."""
    present = [c for c in META_COLUMNS if c in frame.columns]
    meta = frame[present].rename(columns=META_COLUMNS)
    if "age" in meta.columns:  # early releases wrote ages as '058Y'
        meta["age"] = pd.to_numeric(meta["age"].str.extract(r"(\d+)")[0], errors="coerce")
    return meta.reindex(range(len(frame) + 1))


def _meta_at(meta: pd.DataFrame, rows: np.ndarray) -> pd.DataFrame:
    """The meta rows of CSV rows `rows`; -1 (image not in the CSV) gives missing values."""
    picked = np.where(rows >= 0, rows, len(meta) - 1)
    return meta.iloc[picked].reset_index(drop=True)
