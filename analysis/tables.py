"""The LoRA-vs-FFT table, every method against a reference, and the tables that keep them
honest, importable from one place.

Each lives in the module of its kind: `analysis.comparison` (the per-cell comparison, the
paper's layout, the summary line), `analysis.methods` (every method vs the reference arm, its
summary and Pareto points), `analysis.diagnostics` (val-test gap, calibration, classes,
subgroups, selected configs), `analysis.budget` (compute and ASHA accounting) and
`analysis.rendering` (Markdown and LaTeX). Reports, notebooks and tests import them from here.
"""

from __future__ import annotations

from analysis.budget import asha_accounting, budget_curve, compute_table, compute_totals
from analysis.comparison import (
    CELL_FACTORS,
    REFERENCE_FFT,
    REFERENCE_LORA,
    compare_arms,
    paper_table,
    pick_arms,
    summary_line,
)
from analysis.diagnostics import (
    SUBGROUP_COLUMNS,
    best_config_table,
    calibration_table,
    per_class_table,
    subgroup_table,
    val_test_gap,
)
from analysis.methods import (
    compare_methods,
    method_points,
    methods_summary,
    methods_summary_line,
    pick_reference,
)
from analysis.rendering import flatten_columns, format_cell, to_latex, to_markdown

__all__ = [
    "CELL_FACTORS", "REFERENCE_FFT", "REFERENCE_LORA", "SUBGROUP_COLUMNS", "asha_accounting",
    "best_config_table", "budget_curve", "calibration_table", "compare_arms", "compare_methods",
    "compute_table", "compute_totals", "flatten_columns", "format_cell", "method_points",
    "methods_summary", "methods_summary_line", "paper_table", "per_class_table", "pick_arms",
    "pick_reference", "subgroup_table", "summary_line", "to_latex", "to_markdown",
    "val_test_gap",
]
