"""Paths a command writes to or reads a store from, checked before anything is written.

A destination that can never be written (under a regular file, on /proc, in a read-only folder)
or a path of the wrong kind (a folder where a file goes, a text file where an MLflow store goes)
is one ConfigError naming the path, raised before any cache, store or model is made, instead of
a traceback halfway through a command that has already written part of its output.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from pathlib import Path

from contract.errors import ConfigError

SQLITE_MAGIC = b"SQLite format 3\x00"
# Tables every MLflow store has. An sqlite file without them is another program's database
# (Optuna's optuna.db sits beside mlflow.db), which MLflow would silently extend with its own.
MLFLOW_TABLES = frozenset({"experiments", "runs"})


def _nearest_existing(path: Path) -> Path:
    """`path` or its deepest ancestor that exists (a dangling link counts: it blocks a mkdir)."""
    return next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())


def writable_dir(path: Path, what: str) -> Path:
    """`path` is a folder this process can write to, or one it can create; returns `path`."""
    path = Path(path)
    _creatable(path, path, what)
    return path


def writable_file(path: Path, what: str) -> Path:
    """`path` can be written as a file: a writable file, or a new one in a folder that is (or
    can be) writable; never a folder."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder: name a file (e.g. one inside it)")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{what} {path} is not writable: choose a file you can write")
        return path
    _creatable(path, path.parent, what)
    return path


def _creatable(target: Path, folder: Path, what: str) -> None:
    """`folder` (where `target`, the path the user named, goes) can be written or created.

    Permission bits cannot answer this (root passes them on /proc and on read-only mounts), so
    a temporary folder is made and removed where `folder` is or would be: nothing is left.
    """
    full = folder.absolute()
    existing = _nearest_existing(full)
    if not existing.is_dir():
        if existing == target.absolute():
            raise ConfigError(f"{what} {target} is a file, not a folder: name a folder, or a "
                              "path where one can be created")
        raise ConfigError(f"{what} {target} cannot be created: {existing} is a file, not a "
                          "folder: choose another path")
    try:
        probe = tempfile.mkdtemp(prefix=".cxr-write-check-", dir=existing)
    except OSError as exc:
        problem = "is not writable" if existing == target.absolute() else "cannot be created"
        raise ConfigError(f"{what} {target} {problem} ({existing}: {exc.strerror or exc}): "
                          "choose a folder you can write to") from exc
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(probe)


def safetensors_file(path: Path, what: str) -> Path:
    """A weights file to write: safetensors by name, since checkpoints are told apart by suffix
    when read (`read_checkpoint`), and writable."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"{what} {path} must end in .safetensors (checkpoints are read by "
                          "their suffix)")
    return writable_file(path, what)


def sqlite_file(uri: str) -> Path | None:
    """The database file of an `sqlite:///` tracking URI; None for any other URI or in memory."""
    if not uri.startswith("sqlite:///"):
        return None
    name = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(name) if name and name != ":memory:" else None


def _sqlite_tables(db: Path) -> frozenset[str] | None:
    """The tables of an sqlite file (an empty file is an empty database); None if it is not
    an sqlite database. Read-only: opening it must not create or change anything."""
    try:
        with db.open("rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise ConfigError(f"tracking store {db} cannot be read ({exc.strerror or exc}): check "
                          "its permissions") from exc
    if not head:
        return frozenset()
    if head != SQLITE_MAGIC:
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro",
                                                uri=True)) as con:
            rows = con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    except sqlite3.Error:  # e.g. locked by a running study: it is an sqlite file, and what
        return MLFLOW_TABLES  # is in it MLflow will tell when it opens it
    return frozenset(row[0] for row in rows)


def tracking_store(uri: str, write: bool) -> None:
    """A local sqlite tracking URI names an MLflow store, or (to write) a new or empty file in
    a writable folder. Reading never creates a store, and never adds MLflow's tables to a
    database that is not one. Servers are checked by asking them (`study.tracking`)."""
    db = sqlite_file(uri)
    if db is None:
        return
    fix = "check [tracking] uri" if write else "check --tracking-uri"
    if not db.exists():
        if not write:
            raise ConfigError(f"tracking store {db} does not exist: check --tracking-uri, or "
                              "run the study first")
        _creatable(db, db.parent, "tracking store")
        return
    if db.is_dir():
        raise ConfigError(f"tracking store {db} is a folder, not an sqlite file: {fix} (a "
                          "study's store is <storage>/mlflow.db)")
    tables = _sqlite_tables(db)
    if tables is None:
        raise ConfigError(f"tracking store {db} is not an sqlite database: {fix} (a study's "
                          "store is <storage>/mlflow.db)")
    # To write to, an empty database will do, and so will a store another study is creating
    # right now (MLflow makes `experiments` first); to read from, a store must be whole.
    usable = (not tables or "experiments" in tables) if write else MLFLOW_TABLES <= tables
    if not usable:
        what = "an empty database" if not tables else "an sqlite database but not an MLflow store"
        raise ConfigError(f"tracking store {db} is {what}: {fix} (a study's store is "
                          "<storage>/mlflow.db; optuna.db is Optuna's)")
    if write and not os.access(db, os.W_OK):
        raise ConfigError(f"tracking store {db} is not writable: {fix}, or make it writable")
