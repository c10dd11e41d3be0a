"""MED-PEFT split lists: one image a line, `<relative path> <label_1> ... <label_K>`.

Reading accepts CRLF endings, trailing spaces (the RSNA lists have them) and blank lines. Labels
are 0 or 1; -1 marks an ignored label (NaN), which is how `write_split_lists` stores CheXpert's
`ignore` policy. Every path must stay inside the dataset root: absolute paths and paths that
climb out with `..` are problems, reported with the list file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainables.datasets.problems import Problems
from trainables.datasets.spec import (
    LIST_FRACTIONS,
    DatasetSplits,
    list_file_for_fraction,
)

VAL_LIST = "val_list.txt"
TEST_LIST = "test_list.txt"
_DRIVE = re.compile(r"^[A-Za-z]:")
_LABEL_VALUES = {"0": 0.0, "1": 1.0, "-1": np.nan, "0.0": 0.0, "1.0": 1.0, "-1.0": np.nan}


@dataclass(frozen=True, eq=False)
class ListEntries:
    """The usable lines of one list file; `lines` are 1-based line numbers for messages."""

    source: Path
    paths: tuple[str, ...]
    labels: np.ndarray
    lines: tuple[int, ...]


def confined_path(raw: str) -> str | None:
    """`raw` as a normalised relative POSIX path, or None if absolute or escaping the root."""
    text = raw.replace("\\", "/")
    if text.startswith("/") or _DRIVE.match(text):
        return None
    parts: list[str] = []
    for part in text.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts) if parts else None


def read_list(path: Path, n_labels: int, problems: Problems) -> ListEntries:
    """Parse one list file, reporting missing files, bad lines, unsafe paths and duplicates."""
    if not path.is_file():
        problems.report("missing split list", [str(path)], "put the MED-PEFT list there or "
                        "point data.list_dir at the folder holding it", source=str(path),
                        fatal=True)
        return ListEntries(path, (), np.zeros((0, n_labels), np.float32), ())
    paths: list[str] = []
    rows: list[list[float]] = []
    lines: list[int] = []
    malformed: list[str] = []
    unsafe: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            tokens = line.split()
            if not tokens:
                continue
            values = [_LABEL_VALUES.get(t) for t in tokens[1:]]
            if len(values) != n_labels or any(v is None for v in values):
                malformed.append(f"line {number}: {line.strip()[:80]!r}")
                continue
            rel = confined_path(tokens[0])
            if rel is None:
                unsafe.append(f"line {number}: {tokens[0]}")
                continue
            paths.append(rel)
            rows.append(values)
            lines.append(number)
    source = str(path)
    problems.report("malformed line", malformed, f"write each line as '<relative path>' followed "
                    f"by {n_labels} labels 0/1", source=source)
    problems.report("absolute or escaping path", unsafe, "list paths relative to the dataset "
                    "root, without '..' leaving it", source=source)
    _report_duplicates(paths, lines, problems, source)
    problems.report("empty split", [] if paths else [source], "the list has no image lines; "
                    "restore it", source=source)
    labels = np.asarray(rows, dtype=np.float32).reshape(len(rows), n_labels)
    return ListEntries(path, tuple(paths), labels, tuple(lines))


def _report_duplicates(paths: list[str], lines: list[int], problems: Problems,
                       source: str) -> None:
    seen: dict[str, int] = {}
    repeated: list[str] = []
    for rel, number in zip(paths, lines):
        if rel in seen:
            repeated.append(f"line {number}: {rel} (first on line {seen[rel]})")
        else:
            seen[rel] = number
    problems.report("duplicated entry", repeated, "list each image once", source=source)


def list_names(label_fraction: float) -> dict[str, str]:
    """File names of the train/val/test lists for a fraction (MED-PEFT names, else train_P.txt)."""
    train = list_file_for_fraction(label_fraction)
    if train is None:
        train = f"train_{label_fraction * 100:g}.txt"
    return {"train": train, "val": VAL_LIST, "test": TEST_LIST}


def format_line(path: str, labels: np.ndarray) -> str:
    values = " ".join("-1" if np.isnan(v) else str(int(v)) for v in labels)
    return f"{path} {values}"


def write_split_lists(splits: DatasetSplits, out_dir: Path) -> str:
    """Write train/val/test in MED-PEFT format under `out_dir`; return the splits' content hash.

    The train list is named after the fraction (`train_1.txt`, `train_10.txt`, `train_list.txt`;
    other fractions `train_<percent>.txt`), so reading the folder back with `splits = "lists"`
    and the same fraction gives the same content hash. Files are written whole, then renamed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, name in list_names(splits.label_fraction).items():
        table = splits.tables()[split]
        text = "".join(format_line(p, y) + "\n" for p, y in zip(table.paths, table.labels))
        temp = out_dir / f".{name}.tmp"
        temp.write_text(text, encoding="utf-8")
        temp.replace(out_dir / name)
    return splits.content_hash


__all__ = ["LIST_FRACTIONS", "ListEntries", "confined_path", "read_list", "write_split_lists"]
