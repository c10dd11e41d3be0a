"""Two processes asking for the same cache at once decode it once; a killed builder's leftovers
are never taken for a cache.

The builders run in spawned processes (as Ray workers would), each slowed down so that their
builds would overlap: every split a process starts writing is appended to a shared log, so the
log shows how many builds really happened. Without the file lock both processes would find no
cache, both would write all three splits, and the log would name two processes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

from trainables.cache import SPLITS, build_cache, cache_key, open_split

SIZE = 48  # the size of the session's `phantom_cache`, so its contents are the reference
SLOW_S = 0.01  # per image: a build of the phantom takes a few seconds, so the two overlap


def _slow_logged_builder(log: Path) -> None:
    """In a child process: slow down decoding and log each split a build starts."""
    import trainables.cache as cache

    decode, write = cache._load_resized, cache._write_split

    def slow_decode(job):
        time.sleep(SLOW_S)
        return decode(job)

    def logged_write(table, root, size, out, name, workers):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()} {name}\n")
        return write(table, root, size, out, name, workers)

    cache._load_resized, cache._write_split = slow_decode, logged_write


def _build_together(splits, cache_root: Path, log: Path, start, results) -> None:
    _slow_logged_builder(log)
    start.wait()  # both children call build_cache at the same moment
    results.put((os.getpid(), str(build_cache(splits, SIZE, cache_root, workers=1))))


def _build_until_killed(splits, cache_root: Path, log: Path) -> None:
    _slow_logged_builder(log)
    build_cache(splits, SIZE, cache_root, workers=1)


def _assert_same_as_reference(cache_dir: Path, reference: Path) -> None:
    for name in SPLITS:
        got, want = open_split(cache_dir, name), open_split(reference, name)
        np.testing.assert_array_equal(got.images, want.images)
        np.testing.assert_array_equal(got.labels, want.labels)


def test_two_processes_build_one_cache(tmp_path, phantom_splits, phantom_cache):
    ctx = mp.get_context("spawn")
    cache_root, log = tmp_path / "cache", tmp_path / "builds.log"
    start, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_together,
                         args=(phantom_splits, cache_root, log, start, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)

    builds = [line.split() for line in log.read_text().splitlines()]
    assert len({pid for pid, _ in builds}) == 1, f"two builders wrote the cache: {builds}"
    assert [name for _, name in builds] == list(SPLITS)
    assert [p.exitcode for p in procs] == [0, 0]
    found = dict(results.get(timeout=10) for _ in procs)
    assert set(found) == {p.pid for p in procs}
    (path,) = set(found.values())
    assert Path(path) == cache_root / cache_key(phantom_splits, SIZE)
    _assert_same_as_reference(Path(path), phantom_cache)
    assert sorted(p.name for p in cache_root.iterdir()) == sorted(
        [Path(path).name, f".{Path(path).name}.lock"])  # no temp dir left behind


def test_killed_builder_leaves_nothing_that_is_read(tmp_path, phantom_splits, phantom_cache):
    ctx = mp.get_context("spawn")
    cache_root, log = tmp_path / "cache", tmp_path / "builds.log"
    key = cache_key(phantom_splits, SIZE)
    victim = ctx.Process(target=_build_until_killed, args=(phantom_splits, cache_root, log))
    victim.start()
    deadline = time.monotonic() + 120
    while not (log.exists() and list(cache_root.glob(f".{key}.tmp*/train.npy"))):
        assert time.monotonic() < deadline and victim.is_alive(), "the builder never started"
        time.sleep(0.05)
    victim.kill()  # SIGKILL mid-build: no cleanup code runs
    victim.join(timeout=30)

    (leftover,) = cache_root.glob(f".{key}.tmp*")
    assert not (cache_root / key).exists()
    # Even a leftover that looks complete must not be taken for the cache.
    (leftover / "meta.json").write_text("{}")
    for name in SPLITS:
        np.save(leftover / f"{name}.npy", np.zeros((1, SIZE, SIZE), np.uint8))

    built = build_cache(phantom_splits, SIZE, cache_root, workers=1)  # the lock was released
    assert built == cache_root / key
    assert not leftover.exists()
    _assert_same_as_reference(built, phantom_cache)
