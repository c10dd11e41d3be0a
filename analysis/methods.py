"""Every fine-tuning method against a reference arm (FFT unless told otherwise).

`compare_methods` gives one row per task cell (foundation x dataset x label fraction) and arm
other than the reference: the same paired patient-level bootstrap as the LoRA-vs-FFT table,
with a Holm correction across all tasks x methods. `method_points` places each arm of a cell
by its test AUROC and trainable parameters and marks its Pareto front; `methods_summary` adds
what each arm spent (epochs, run time) per task and over all tasks.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.budget import compute_table
from analysis.comparison import CELL_FACTORS, arm_cell_stats, paired_cell
from analysis.plots import pareto_front
from analysis.stats import holm
from analysis.study_data import StudyData
from contract.errors import ConfigError
from contract.schema import Metric, Param, Tag

REFERENCE_KIND = "fft"  # the default reference: the study's one full fine-tuning arm


def arm_kinds(data: StudyData) -> dict[str, str]:
    """Each arm's kind (its fine-tuning method)."""
    if data.arms.empty:
        return {}
    return data.arms.groupby(Tag.ARM)[Tag.KIND].first().to_dict()


def pick_reference(data: StudyData, reference_arm: str | None = None) -> str:
    """The arm every method is compared with: the named one, else the study's only FFT arm."""
    kinds = arm_kinds(data)
    if reference_arm is not None:
        if reference_arm not in kinds:
            raise ConfigError(f"--reference-arm {reference_arm!r} is not an arm of this study: "
                              f"arms are {sorted(kinds)}")
        return reference_arm
    of_kind = sorted(a for a, k in kinds.items() if k == REFERENCE_KIND)
    if len(of_kind) != 1:
        raise ConfigError(f"the study has {len(of_kind)} {REFERENCE_KIND} arms ({of_kind}): "
                          "name the arm to compare every method with by --reference-arm")
    return of_kind[0]


def finals_with_draw(data: StudyData) -> pd.DataFrame:
    """Every final run, each with a split seed (a study that did not record it has one draw)."""
    finals = data.finals
    return finals if Param.SPLIT_SEED in finals else finals.assign(**{Param.SPLIT_SEED: 0})


def finished_finals(data: StudyData) -> pd.DataFrame:
    """The finished final runs (none before any test AUROC is logged), each with a split seed."""
    finals = data.finals
    if finals.empty or Metric.TEST_AUROC not in finals:
        return finals.iloc[0:0]
    finals = finals_with_draw(data)
    return finals[finals["status"] == "FINISHED"]


def compare_methods(data: StudyData, reference_arm: str | None = None, n_boot: int = 1000,
                    seed: int = 0, level: float = 0.95, alpha: float = 0.05) -> pd.DataFrame:
    """One row per task cell and arm other than the reference: arm - reference on test.

    Columns as `compare_arms` gives them, for `arm` against `reference`: means and spreads over
    the final seeds (and split draws), `diff` with its paired bootstrap CI, `p_holm` adjusted
    across every row (tasks x methods), `significant` and the verdict. Each cell's bootstrap
    draws the same patients for every method (one seed per cell).
    """
    reference = pick_reference(data, reference_arm)
    kinds = arm_kinds(data)
    finals = finished_finals(data)
    rows = []
    for cell, group in finals.groupby(CELL_FACTORS, sort=True):
        ref = {f"ref_{k}": v for k, v in arm_cell_stats(group, reference).items()}
        for arm in sorted(set(group[Tag.ARM]) - {reference}):
            row = {**dict(zip(CELL_FACTORS, cell)), Tag.ARM: arm, Tag.KIND: kinds.get(arm),
                   "reference": reference,
                   "tasks": ", ".join(sorted(group[Tag.TASK].unique())),
                   "draws": group[Param.SPLIT_SEED].nunique(),
                   **arm_cell_stats(group, arm), **ref}
            row.update(paired_cell(data, group, arm, reference, n_boot, seed, level))
            rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        table = pd.DataFrame(columns=[*CELL_FACTORS, Tag.ARM, Tag.KIND, "diff", "p_holm",
                                      "significant", "verdict"])
    else:
        table["p_holm"] = holm(table["p_value"].to_numpy())
        table["significant"] = table["p_holm"] < alpha
        table["verdict"] = [_verdict(a, reference, d, s, p) for a, d, s, p in zip(
            table[Tag.ARM], table["diff"], table["significant"], table["p_value"])]
    table.attrs.update(reference=reference, n_boot=n_boot, level=level, alpha=alpha)
    return table


def _verdict(arm: str, reference: str, diff: float, significant: bool, p_value: float) -> str:
    if not math.isfinite(p_value):
        return "no test predictions" if math.isfinite(diff) else "no test results"
    if significant:
        return f"{arm} better" if diff > 0 else f"{reference} better"
    return "no significant difference"


def method_points(data: StudyData) -> pd.DataFrame:
    """One row per task cell and arm: test AUROC (mean over draws of the seed means) and
    trainable parameters (mean over the final runs); `pareto` marks the arms no other arm of
    the cell beats with fewer trainable parameters and a higher test AUROC."""
    columns = [*CELL_FACTORS, Tag.ARM, Tag.KIND, Metric.TEST_AUROC, Metric.TRAINABLE_PARAMS,
               "trainable_pct", "pareto"]
    finals = finished_finals(data)
    if finals.empty:
        return pd.DataFrame(columns=columns)
    kinds = arm_kinds(data)
    rows = []
    for cell, group in finals.groupby([*CELL_FACTORS, Tag.ARM], sort=True):
        seeds = group.groupby(Param.SPLIT_SEED)[Metric.TEST_AUROC].mean()
        rows.append({**dict(zip([*CELL_FACTORS, Tag.ARM], cell)), Tag.KIND: kinds.get(cell[-1]),
                     Metric.TEST_AUROC: float(seeds.mean()),
                     Metric.TRAINABLE_PARAMS: float(group[Metric.TRAINABLE_PARAMS].mean()),
                     "trainable_pct": float(group["trainable_pct"].mean())})
    points = pd.DataFrame(rows)
    points["pareto"] = False
    for _, group in points.groupby(CELL_FACTORS, sort=False):
        front = pareto_front(group[Metric.TRAINABLE_PARAMS], group[Metric.TEST_AUROC])
        points.loc[group.index, "pareto"] = front
    return points[columns]


def _cell_compute(data: StudyData) -> pd.DataFrame:
    """Epochs and summed run time of each arm per task cell (split draws added up)."""
    compute = compute_table(data)
    if compute.empty:
        return pd.DataFrame(columns=[*CELL_FACTORS, Tag.ARM, "epochs", "search_s", "final_s"])
    factors = data.arms.drop_duplicates(Tag.TASK).set_index(Tag.TASK)[CELL_FACTORS]
    compute = compute.join(factors, on=Tag.TASK)
    for name in ("final_epochs", "final_wall_s"):
        if name not in compute:
            compute[name] = 0.0
    compute = compute.assign(
        epochs=compute["epochs"].astype(float) + compute["final_epochs"].fillna(0),
        search_s=compute["trial_wall_s"].astype(float),
        final_s=compute["final_wall_s"].fillna(0).astype(float))
    return compute.groupby([*CELL_FACTORS, Tag.ARM], as_index=False)[
        ["epochs", "search_s", "final_s"]].sum()


def methods_summary(data: StudyData, comparison: pd.DataFrame) -> tuple[pd.DataFrame,
                                                                          pd.DataFrame]:
    """The methods summary per task cell and over all cells.

    Per task: each arm's test AUROC, Δ vs the reference with its CI and Holm-adjusted p, the
    verdict, trainable %, whether it is on the cell's Pareto front, and what it spent: epochs
    (search and finals) and run time (the search trials' and final runs' wall time summed: the
    device time where each run holds one device). Overall: per arm, the cells compared, the
    mean Δ, wins (Δ > 0), significant wins and losses, mean test AUROC and trainable %, and the
    summed epochs and run time. Δ and AUROC are fractions (x100 for points).
    """
    reference = comparison.attrs.get("reference")
    points = method_points(data)
    if points.empty:
        return pd.DataFrame(), pd.DataFrame()
    keys = [*CELL_FACTORS, Tag.ARM]
    stats = comparison[[*keys, "diff", "ci_low", "ci_high", "p_holm", "significant",
                        "verdict"]] if len(comparison) else pd.DataFrame(columns=keys)
    per_task = points.merge(stats, on=keys, how="left").merge(
        _cell_compute(data), on=keys, how="left")
    per_task["reference"] = per_task[Tag.ARM] == reference
    per_task["verdict"] = per_task["verdict"].where(~per_task["reference"], "reference")
    per_task["run_s"] = per_task["search_s"] + per_task["final_s"]
    per_task = per_task[[*keys, Tag.KIND, "reference", Metric.TEST_AUROC, "diff", "ci_low",
                         "ci_high", "p_holm", "verdict", "significant", "trainable_pct",
                         Metric.TRAINABLE_PARAMS, "pareto", "epochs", "search_s", "final_s",
                         "run_s"]]
    overall = _overall(per_task)
    return per_task.drop(columns=["significant"]), overall


def _overall(per_task: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for arm, group in per_task.groupby(Tag.ARM, sort=False):
        scored = group[np.isfinite(group["diff"].astype(float))]
        significant = scored["significant"].fillna(False).astype(bool)
        rows.append({
            Tag.ARM: arm, Tag.KIND: group[Tag.KIND].iloc[0],
            "reference": bool(group["reference"].iloc[0]), "tasks": len(group),
            "mean_diff": float(scored["diff"].mean()) if len(scored) else float("nan"),
            "wins": int((scored["diff"] > 0).sum()),
            "significant_wins": int((significant & (scored["diff"] > 0)).sum()),
            "significant_losses": int((significant & (scored["diff"] < 0)).sum()),
            Metric.TEST_AUROC: float(group[Metric.TEST_AUROC].mean()),
            "trainable_pct": float(group["trainable_pct"].mean()),
            "pareto_tasks": int(group["pareto"].sum()),
            "epochs": float(group["epochs"].sum()), "search_s": float(group["search_s"].sum()),
            "final_s": float(group["final_s"].sum()), "run_s": float(group["run_s"].sum())})
    overall = pd.DataFrame(rows)
    # The best on average first; the reference (no Δ of its own) last.
    overall["_order"] = overall["mean_diff"].where(~overall["reference"], -np.inf)
    return overall.sort_values(["_order", Metric.TEST_AUROC], ascending=False,
                               na_position="last").drop(columns="_order").reset_index(drop=True)


def methods_summary_line(comparison: pd.DataFrame) -> str:
    """'Against fft: partial wins 2 of 2 tasks (2 significant); ...', the arm with the most
    significant wins (then the largest mean Δ) first."""
    if comparison.empty:
        return "no method has final test results against the reference yet"
    reference = comparison.attrs.get("reference", "the reference")
    parts = []
    for arm, group in comparison.groupby(Tag.ARM):
        scored = group[np.isfinite(group["diff"].astype(float))]
        significant = scored["significant"].fillna(False).astype(bool)
        wins = int((scored["diff"] > 0).sum())
        sig_wins = int((significant & (scored["diff"] > 0)).sum())
        losses = int((significant & (scored["diff"] < 0)).sum())
        text = f"{arm} wins {wins} of {len(scored)} tasks ({sig_wins} significant"
        text += f", {losses} significantly worse)" if losses else ")"
        mean = float(scored["diff"].mean()) if len(scored) else -np.inf
        parts.append(((sig_wins, mean), text))
    parts.sort(key=lambda p: p[0], reverse=True)
    return f"Against {reference}: " + "; ".join(text for _, text in parts)
