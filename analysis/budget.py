"""What each arm spent: trials, epochs and wall time, and what ASHA's early stopping saved."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.study_data import TASK_ARM, StudyData
from contract.schema import Metric, Param, Tag


def compute_table(data: StudyData) -> pd.DataFrame:
    """What each arm spent: trials, epochs and wall time in search and in the final runs.

    trial_wall_s and final_wall_s sum the runs' own wall times (the device time, where each
    run holds one device); search_wall_s is the search's elapsed time (the arm run's)."""
    if data.trials.empty:
        return pd.DataFrame()
    stopped = data.trials[Tag.STOPPED_EARLY].fillna(False).astype(bool)
    out = data.trials.assign(stopped=stopped).groupby(TASK_ARM).agg(
        **{Tag.TRIALS: ("run_id", "count"), Tag.STOPPED_EARLY: ("stopped", "sum"),
           "failed": ("failed", "sum"), "epochs": (Tag.EPOCHS_RUN, "sum"),
           "trial_wall_s": (Metric.WALL_S, "sum")})
    arms = data.arms.set_index(TASK_ARM)
    out.insert(0, Tag.KIND, arms[Tag.KIND].reindex(out.index))
    out[Param.MAX_T] = arms[Param.MAX_T].reindex(out.index)
    out["epoch_budget"] = out[Tag.TRIALS] * out[Param.MAX_T]
    out["search_wall_s"] = arms[Metric.WALL_S].reindex(out.index)
    if len(data.finals):
        finals = data.finals.groupby(TASK_ARM)
        out["final_runs"] = finals["run_id"].count()
        out["final_epochs"] = finals[Tag.EPOCHS_RUN].sum()
        out["final_wall_s"] = finals[Metric.WALL_S].sum()
    out = out.reset_index()
    for name in (Tag.TRIALS, Tag.STOPPED_EARLY, "failed", "epochs", "epoch_budget"):
        out[name] = out[name].astype("Int64")
    return out


def compute_totals(compute: pd.DataFrame) -> pd.DataFrame:
    """The compute table summed over tasks: one row per arm (and its method), to check the
    budgets match; total_epochs and total_wall_s add the final runs to the search."""
    if compute.empty:
        return compute
    keys = [Tag.ARM, Tag.KIND] if Tag.KIND in compute else [Tag.ARM]
    numeric = [c for c in compute.columns if c not in (*TASK_ARM, *keys, Param.MAX_T)]
    out = compute.groupby(keys, dropna=False)[numeric].sum().reset_index()
    final_epochs = out["final_epochs"] if "final_epochs" in out else 0
    final_wall = out["final_wall_s"] if "final_wall_s" in out else 0.0
    out["total_epochs"] = out["epochs"] + final_epochs
    out["total_wall_s"] = out["trial_wall_s"] + final_wall
    return out


def asha_accounting(data: StudyData) -> pd.DataFrame:
    """Per task and arm: epochs ASHA spent against the full budget, and when the best was found.

    `epochs_to_best` counts the epochs spent (in trial order) until the final best validation
    AUROC was first reached: the rest of the budget bought no improvement.
    """
    curve = budget_curve(data)
    if curve.empty:
        return pd.DataFrame()
    rows = []
    for (task, arm), group in curve.groupby(TASK_ARM, sort=True):
        best = group["running_best"].max()
        reached = group.loc[group["running_best"] >= best, "cumulative_epochs"].min()
        full = int(group[Tag.TRIALS].iloc[0]) * int(group[Param.MAX_T].iloc[0])
        spent = int(group["cumulative_epochs"].max())
        rows.append({Tag.TASK: task, Tag.ARM: arm, Tag.TRIALS: len(group),
                     Metric.EPOCHS_SPENT: spent, "epochs_full_budget": full,
                     "saved_pct": 100.0 * (1 - spent / full),
                     Tag.STOPPED_EARLY: int(group[Tag.STOPPED_EARLY].sum()),
                     Metric.BEST_VAL_AUROC: best, "epochs_to_best": int(reached)})
    return pd.DataFrame(rows)


def budget_curve(data: StudyData) -> pd.DataFrame:
    """Trials in the order they started: cumulative epochs and the best val AUROC so far."""
    if data.trials.empty:
        return pd.DataFrame()
    max_t = data.arms.set_index(TASK_ARM)[Param.MAX_T].to_dict()
    parts = []
    for (task, arm), group in data.trials.groupby(TASK_ARM, sort=True):
        group = group.sort_values(["start_time", Tag.TRIAL_INDEX])
        best = group[Metric.BEST_VAL_AUROC].astype(float).fillna(-np.inf).cummax()
        epochs = group[Tag.EPOCHS_RUN].fillna(0).astype(int)
        parts.append(pd.DataFrame({
            Tag.TASK: task, Tag.ARM: arm, Tag.TRIAL_ID: group[Tag.TRIAL_ID].to_numpy(),
            Tag.EPOCHS_RUN: epochs.to_numpy(), "cumulative_epochs": epochs.cumsum().to_numpy(),
            "running_best": best.replace(-np.inf, np.nan).to_numpy(),
            Tag.STOPPED_EARLY: group[Tag.STOPPED_EARLY].fillna(False).astype(bool).to_numpy(),
            Tag.TRIALS: len(group),
            Param.MAX_T: max_t.get((task, arm), group[Param.EPOCHS].max())}))
    return pd.concat(parts, ignore_index=True)
