"""A durable queue of records: a JSON-lines file, applied in order by a writer thread.

Appending is fast and never blocked by whoever applies the records (a network, a locked
database). The writer applies them in order and drops what it applied; a record whose apply
raises one of the `transient` errors stays, with everything after it, and is retried. A crash
loses nothing: the file is the queue. Knows nothing of what the records mean.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

RETRY_AFTER_S = 20.0

Record = dict[str, Any]


class Backlog:
    """`put` appends a record; `apply(record)` is called for each, in order, by one thread
    (or at once when `background` is False); `drain` stops the thread and applies the rest."""

    def __init__(self, path: Path, apply: Callable[[Record], None],
                 transient: tuple[type[BaseException], ...], background: bool = True) -> None:
        self.path, self.apply, self.transient = path, apply, transient
        self.background = background
        self.warned = False
        self._threads()

    def _threads(self) -> None:
        self._lock = threading.Lock()  # guards the file
        self._wake, self._stop = threading.Event(), threading.Event()
        self._writer: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:  # Tune saves its callbacks with the experiment
        return {k: v for k, v in self.__dict__.items()
                if k not in ("_lock", "_wake", "_stop", "_writer")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._threads()

    def put(self, record: Record) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if not self.background:
            self.flush()
            return
        if self._writer is None or not self._writer.is_alive():
            self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                            name="backlog-writer")
            self._writer.start()
        self._wake.set()

    def _write_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=RETRY_AFTER_S)
            self._wake.clear()
            if self.flush() is not None:
                self._stop.wait(RETRY_AFTER_S)  # the last apply failed a moment ago: back off

    def pending(self) -> list[Record]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def flush(self) -> BaseException | None:
        """Apply the records in order; keep the rest and whatever arrived meanwhile. Returns
        the transient error that stopped it, if one did."""
        with self._lock:
            pending = self.pending()
        done, error = 0, None
        try:
            for record in pending:
                self.apply(record)
                done += 1
        except self.transient as exc:
            error = exc
            if not self.warned:
                print(f"warning: write failed ({type(exc).__name__}); keeping "
                      f"{len(pending) - done} record(s) in {self.path} and retrying",
                      file=sys.stderr, flush=True)
                self.warned = True
        if done:
            with self._lock:
                rest = self.pending()[done:]
                if rest:
                    tmp = self.path.with_suffix(".tmp")
                    tmp.write_text("".join(json.dumps(r) + "\n" for r in rest))
                    os.replace(tmp, self.path)
                else:
                    self.path.unlink(missing_ok=True)
        return error

    def drain(self) -> BaseException | None:
        """Stop the writer and apply whatever waits; the error if some records remain."""
        if self._writer is not None:
            self._stop.set()
            self._wake.set()
            self._writer.join()
            self._threads()
        return self.flush() if self.pending() else None
