"""Data problems, found by one code path and either raised (training) or collected (`data check`).

Readers report each kind of problem once per file, with a count and a few examples, to a
`Problems` log. In strict mode (`load_splits`) the first report raises a one-line `DataError`;
in collecting mode (`check_dataset`) reports accumulate, and only a problem that makes further
reading impossible stops the reader (`fatal=True`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from contract.errors import DataError

MAX_EXAMPLES = 3


@dataclass(frozen=True)
class Problem:
    """One kind of problem in one place: how many, a few examples, and how to fix it."""

    kind: str
    count: int
    examples: tuple[str, ...]
    fix: str
    source: str = ""

    def message(self) -> str:
        where = f"{self.source}: " if self.source else ""
        shown = ", ".join(self.examples)
        return f"{where}{self.kind}: {self.count} (e.g. {shown}); fix: {self.fix}"


class StopReading(Exception):
    """Raised in collecting mode when a reader cannot go on (e.g. a CSV is missing)."""


@dataclass
class Problems:
    """The problem log a reader writes to; `strict` raises on the first report."""

    strict: bool = True
    found: list[Problem] = field(default_factory=list)

    def report(self, kind: str, offenders: Sequence[str], fix: str, source: str = "",
               fatal: bool = False, count: int | None = None) -> None:
        """Report `offenders` (non-empty) as one problem; nothing happens when there are none."""
        if not offenders:
            return
        problem = Problem(kind=kind, count=len(offenders) if count is None else count,
                          examples=tuple(str(o) for o in offenders[:MAX_EXAMPLES]),
                          fix=fix, source=source)
        if self.strict:
            raise DataError(problem.message())
        self.found.append(problem)
        if fatal:
            raise StopReading(problem.message())
