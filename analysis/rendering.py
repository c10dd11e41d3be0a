"""Any table as GitHub Markdown or a booktabs LaTeX tabular (no extra dependency)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def flatten_columns(table: pd.DataFrame) -> pd.DataFrame:
    """Index levels become columns; MultiIndex columns are joined with a space."""
    flat = table.reset_index() if _has_named_index(table) else table.copy()
    flat.columns = [" ".join(str(p) for p in c if str(p)) if isinstance(c, tuple) else str(c)
                    for c in flat.columns]
    return flat


def _has_named_index(table: pd.DataFrame) -> bool:
    return any(n is not None for n in table.index.names)


def format_cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    flat = flatten_columns(table)
    if flat.empty:
        return "_(no rows)_"
    header = [str(c).replace("|", "\\|") for c in flat.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for row in flat.itertuples(index=False):
        lines.append("| " + " | ".join(format_cell(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
          "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
          "^": r"\textasciicircum{}", "Δ": r"$\Delta$", "±": r"$\pm$", "–": "--"}


def _tex(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in text)


def to_latex(table: pd.DataFrame, caption: str | None = None) -> str:
    """A booktabs tabular; MultiIndex columns become a grouped header row."""
    index = [str(n) for n in table.index.names] if _has_named_index(table) else []
    body = table.reset_index() if index else table
    grouped = isinstance(table.columns, pd.MultiIndex)
    n_cols = len(body.columns)
    lines = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{'l' * n_cols}}}",
             r"\toprule"]
    if grouped:
        top, rules, col = [""] * len(index), [], len(index)
        for group in dict.fromkeys(c[0] for c in table.columns):
            width = sum(1 for c in table.columns if c[0] == group)
            top.append(rf"\multicolumn{{{width}}}{{c}}{{{_tex(str(group))}}}")
            rules.append(rf"\cmidrule(lr){{{col + 1}-{col + width}}}")
            col += width
        lines += [" & ".join(top) + r" \\", " ".join(rules)]
        names = [*index, *[str(c[-1]) for c in table.columns]]
    else:
        names = [str(c) for c in body.columns]
    lines.append(" & ".join(_tex(n) for n in names) + r" \\")
    lines.append(r"\midrule")
    for row in body.itertuples(index=False):
        lines.append(" & ".join(_tex(format_cell(v)) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(rf"\caption{{{_tex(caption)}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines)
