"""`check_dataset`: read everything a `DataSpec` touches and report every problem at once.

It runs the same reading code as `load_splits` (so training refuses exactly what the check
reports), but collects problems instead of raising, then decodes every image of the three
splits to find unreadable or truncated files. Decoding runs in threads: Pillow and zlib release
the GIL, so this scales with cores.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from contract.errors import DataError
from trainables.datasets.images import read_image
from trainables.datasets.load import build_splits
from trainables.datasets.problems import Problem, Problems, StopReading
from trainables.datasets.spec import DatasetSplits, DataSpec


def check_dataset(spec: DataSpec, workers: int | None = None) -> list[Problem]:
    """All problems of the dataset and splits `spec` names; an empty list means usable."""
    problems = Problems(strict=False)
    try:
        splits = build_splits(spec, problems)
    except StopReading:
        return problems.found
    report_undecodable(splits, problems, workers)
    return problems.found


def _decode_error(path: Path) -> str | None:
    """Why `path` cannot be decoded, or None if it decodes (or is absent: reported already)."""
    try:
        read_image(path)
    except DataError as exc:
        if not path.exists():
            return None
        return str(exc).split(": fix:")[0].split("; fix:")[0]
    return None


def report_undecodable(splits: DatasetSplits, problems: Problems,
                       workers: int | None = None) -> None:
    paths = sorted({p for table in splits.tables().values() for p in table.paths})
    files = [splits.root / p for p in paths]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        errors = [e for e in pool.map(_decode_error, files, chunksize=64) if e]
    problems.report("unreadable or truncated image", errors, "re-download these files or "
                    "remove them from the split lists", source=str(splits.root))
