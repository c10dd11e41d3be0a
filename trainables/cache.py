"""A uint8 image cache per (split contents, image size), shared read-only by every trial.

Decoding full-size PNG/DICOM every epoch would dominate training, so each split is decoded and
resized once into a `.npy` array that workers memory-map. The index (paths, patient ids, labels)
is a parquet table. A cache directory is written under a temporary name and renamed into place, so
a half-written cache is never mistaken for a valid one; a file lock makes concurrent builders
wait for the first instead of decoding twice. A builder that was killed leaves its temporary
directory behind; the next builder, holding the lock, knows no one else is writing that key and
removes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from contract.errors import DataError
from trainables.datasets import DatasetSplits, SplitTable, read_image

CACHE_VERSION = 2
META_COLUMNS = ("sex", "age", "view", "projection")  # kept for subgroup analysis
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CachedSplit:
    images: np.ndarray  # (n, size, size) uint8, memory-mapped
    labels: np.ndarray  # (n, K) float32, NaN = ignored label
    patient_ids: tuple[str, ...]
    paths: tuple[str, ...]
    meta: dict[str, list] = field(default_factory=dict)  # sex/age/view where recorded


def cache_key(splits: DatasetSplits, img_size: int) -> str:
    text = f"v{CACHE_VERSION}|{splits.dataset}|{splits.content_hash}|{img_size}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _load_resized(args: tuple[str, int]) -> np.ndarray:
    path, size = args
    img = read_image(Path(path))
    if img.shape != (size, size):
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
    return img


def _write_split(table: SplitTable, root: Path, size: int, out: Path, name: str,
                 workers: int) -> None:
    jobs = [(str(root / p), size) for p in table.paths]
    images = np.lib.format.open_memmap(out / f"{name}.npy", mode="w+", dtype=np.uint8,
                                       shape=(len(jobs), size, size))
    # disable=None: a progress bar on an interactive stderr only, never in logs or tests.
    progress = tqdm(total=len(jobs), desc=f"caching {name} at {size} px", unit="img",
                    disable=None, leave=False)
    with progress:
        if workers > 1 and len(jobs) > 256:
            with ProcessPoolExecutor(workers) as pool:
                for i, img in enumerate(pool.map(_load_resized, jobs, chunksize=64)):
                    images[i] = img
                    progress.update()
        else:
            for i, job in enumerate(jobs):
                images[i] = _load_resized(job)
                progress.update()
    images.flush()
    del images
    columns = {
        "path": list(table.paths), "patient_id": list(table.patient_ids),
        "labels": pa.array(list(table.labels.astype(np.float32)), pa.list_(pa.float32())),
    }
    if table.meta is not None:
        for column in META_COLUMNS:
            if column in table.meta:
                values = table.meta[column].reset_index(drop=True)
                values = values.astype("float64") if column == "age" else values.map(
                    lambda v: None if pd.isna(v) else str(v))
                columns[column] = values.tolist()
    index = pa.table(columns)
    pq.write_table(index, out / f"{name}.parquet")


def _needed_bytes(splits: DatasetSplits, size: int) -> int:
    return sum(len(getattr(splits, s).paths) for s in SPLITS) * size * size


def build_cache(splits: DatasetSplits, img_size: int, cache_root: Path,
                workers: int | None = None) -> Path:
    """Return the cache directory for these splits at this size, building it if missing.

    A first build that fails (an unreadable image) removes the folders it created, so a study
    refused for its data leaves no storage folder behind that looks started.
    """
    created = [p for p in (cache_root, *cache_root.parents) if not p.exists()]
    cache_root.mkdir(parents=True, exist_ok=True)
    final = cache_root / cache_key(splits, img_size)
    if (final / "meta.json").exists():
        return final
    lock_path = cache_root / f".{final.name}.lock"
    try:
        return _build_locked(splits, img_size, cache_root, final, lock_path, workers)
    except BaseException:
        if created:
            lock_path.unlink(missing_ok=True)
            for folder in created:  # deepest first; a folder another builder uses is not empty
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise


def _build_locked(splits: DatasetSplits, img_size: int, cache_root: Path, final: Path,
                  lock_path: Path, workers: int | None) -> Path:
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits here, then finds it built
        if (final / "meta.json").exists():
            return final
        for stale in cache_root.glob(f".{final.name}.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)  # a killed builder's; never read
        tmp = cache_root / f".{final.name}.tmp{os.getpid()}"
        tmp.mkdir()
        try:
            for name in SPLITS:
                _write_split(getattr(splits, name), splits.root, img_size, tmp, name,
                             workers or os.cpu_count() or 1)
            meta = {"version": CACHE_VERSION, "dataset": splits.dataset, "img_size": img_size,
                    "label_names": list(splits.label_names), "content_hash": splits.content_hash}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            os.rename(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                need = _needed_bytes(splits, img_size) / 1e9
                raise DataError(f"cache {cache_root}: out of disk space; the cache needs about "
                                f"{need:.2f} GB: free space or set a cache_dir elsewhere") from exc
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def label_names(cache_dir: Path) -> tuple[str, ...]:
    return tuple(json.loads((cache_dir / "meta.json").read_text())["label_names"])


def open_split(cache_dir: Path, name: str) -> CachedSplit:
    """Memory-map one split of a built cache (read-only)."""
    if not (cache_dir / "meta.json").exists():
        raise DataError(f"image cache {cache_dir} is missing or incomplete: "
                        "run `cxr-study data prepare` or let the study build it")
    index = pq.read_table(cache_dir / f"{name}.parquet")
    labels = np.asarray(index.column("labels").to_pylist(), dtype=np.float32)
    images = np.load(cache_dir / f"{name}.npy", mmap_mode="r")
    meta = {name: index.column(name).to_pylist() for name in META_COLUMNS
            if name in index.column_names}
    return CachedSplit(images, labels.reshape(len(images), -1),
                       tuple(index.column("patient_id").to_pylist()),
                       tuple(index.column("path").to_pylist()), meta)
