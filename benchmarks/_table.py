"""One way to print a benchmark's results: a row per measured ratio, a column per model."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

Row = tuple[str, Callable[[Any], float | None], str]


def print_rows(results: Mapping[str, Any], rows: Sequence[Row],
               column_titles: Sequence[str] | None = None, cell_width: int = 18) -> None:
    """Print `rows` (label, value of one model's results, format) for every model in `results`;
    a value of None prints as n/a."""
    names = list(results)
    titles = list(column_titles) if column_titles else names
    width = max(len(label) for label, _, _ in rows)
    header = f"{'':<{width}} " + " ".join(f"{t:>{cell_width}}" for t in titles)
    print(header)
    print("-" * len(header))
    for label, value, fmt in rows:
        cells = []
        for name in names:
            v = value(results[name])
            cells.append(f"{'n/a' if v is None else fmt.format(v):>{cell_width}}")
        print(f"{label:<{width}} {' '.join(cells)}")
