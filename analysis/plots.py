"""Figures of a study, drawn with matplotlib's object API on the Agg canvas.

Each function takes tables (or the StudyData) and returns a `Figure`; `save` writes it as PNG
and SVG. No pyplot state is touched, so plotting in a notebook, a test or a report is the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.metrics import roc_curve

from analysis.stats import Predictions, class_aurocs
from analysis.study_data import TASK_ARM, StudyData
from contract.schema import Metric, Param, Phase, Tag

if TYPE_CHECKING:  # analysis.ranks imports this module (through analysis.methods)
    from analysis.ranks import MethodRanks

ARM_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _panels(n: int, width: float, height: float, max_cols: int = 3) -> Figure:
    """A figure sized for `n` panels of `width` x `height`, `max_cols` to a row."""
    return _figure(width * max(1, min(n, max_cols)), height * math.ceil(max(1, n) / max_cols))


def _say(ax, text: str) -> None:
    """A panel that only says why it is empty."""
    ax.text(0.5, 0.5, text, ha="center", va="center")
    ax.set_axis_off()


def _grid(fig: Figure, n: int, max_cols: int = 3):
    cols = max(1, min(n, max_cols))
    rows = max(1, math.ceil(n / cols))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]


def arm_colors(arms: Sequence[str]) -> dict[str, str]:
    return {arm: ARM_COLORS[i % len(ARM_COLORS)] for i, arm in enumerate(sorted(arms))}


def save(fig: Figure, out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write `name.png` (for reports) and `name.svg` (for papers) under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png, svg = out_dir / f"{name}.png", out_dir / f"{name}.svg"
    fig.savefig(png, dpi=110)
    fig.savefig(svg)
    return png, svg


def learning_curves(data: StudyData, task: str) -> Figure:
    """Validation AUROC by epoch of every search trial, one panel per arm.

    Trials that ran the whole budget are solid; ASHA-stopped ones are dashed and end in a cross,
    failed ones are dotted: the plot shows where the budget went, not only the winners.
    """
    epochs = data.epochs[(data.epochs[Tag.TASK] == task) & (data.epochs[Tag.PHASE] == Phase.SEARCH)]
    trials = data.trials[data.trials[Tag.TASK] == task].set_index("run_id")
    arms = sorted(trials[Tag.ARM].unique())
    colors = arm_colors(arms)
    fig = _figure(5.0 * max(1, min(len(arms), 3)), 3.6)
    for ax, arm in zip(_grid(fig, len(arms)), arms):
        for run_id, curve in epochs[epochs[Tag.ARM] == arm].groupby("run_id"):
            curve = curve.sort_values(Metric.EPOCH)
            info = trials.loc[run_id] if run_id in trials.index else None
            failed = info is not None and info["status"] == "FAILED"
            stopped = info is not None and pd.notna(info[Tag.STOPPED_EARLY]) and bool(
                info[Tag.STOPPED_EARLY])
            style = {"color": "0.55" if stopped else ("black" if failed else colors[arm]),
                     "linestyle": ":" if failed else ("--" if stopped else "-"), "lw": 1.3,
                     "alpha": 0.85}
            ax.plot(curve[Metric.EPOCH], curve[Metric.VAL_AUROC], **style)
            if stopped or failed:
                ax.plot(curve[Metric.EPOCH].iloc[-1], curve[Metric.VAL_AUROC].iloc[-1], "x",
                        color=style["color"], ms=6)
        ax.set(title=f"{arm}", xlabel="epoch", ylabel="validation macro AUROC")
        ax.grid(alpha=0.3)
        ax.legend(handles=[
            Line2D([], [], color=colors[arm], label="ran to max_t"),
            Line2D([], [], color="0.55", ls="--", marker="x", label="stopped by ASHA"),
            Line2D([], [], color="black", ls=":", marker="x", label="failed")],
            fontsize=8, loc="lower right")
    fig.suptitle(f"Learning curves: {task}")
    return fig


def pareto_front(params: Sequence[float], auroc: Sequence[float]) -> np.ndarray:
    """Mask of points no other point beats on both fewer trainable params and higher AUROC."""
    p, a = np.asarray(params, float), np.asarray(auroc, float)
    mask = np.zeros(len(p), dtype=bool)
    best = -np.inf
    for i in np.lexsort((-a, p)):  # by params ascending, then AUROC descending
        if np.isfinite(a[i]) and a[i] > best:
            mask[i], best = True, a[i]
    return mask


def auroc_vs_params(data: StudyData) -> Figure:
    """Best validation AUROC of each trial against its trainable parameters, per task;
    the Pareto front is the line, final test AUROC of each arm the star."""
    tasks = data.tasks
    trials = data.trials[data.trials["status"] == "FINISHED"]
    size = Metric.TRAINABLE_PARAMS
    colors = arm_colors(data.trials[Tag.ARM].unique())
    fig = _panels(len(tasks), 5.0, 3.8)
    for ax, task in zip(_grid(fig, len(tasks)), tasks):
        part = trials[(trials[Tag.TASK] == task) & trials[size].notna()]
        for arm, group in part.groupby(Tag.ARM):
            ax.scatter(group[size], group[Metric.BEST_VAL_AUROC], s=22,
                       color=colors[arm], alpha=0.75, label=f"{arm} trials")
        front = part[pareto_front(part[size], part[Metric.BEST_VAL_AUROC])]
        front = front.sort_values(size)
        ax.step(front[size], front[Metric.BEST_VAL_AUROC], where="post", color="black",
                lw=1.2, label="Pareto front")
        finals = data.finals[data.finals[Tag.TASK] == task] if len(data.finals) else data.finals
        for arm, group in finals.groupby(Tag.ARM) if len(finals) else []:
            ax.scatter(group[size].mean(), group[Metric.TEST_AUROC].mean(), marker="*",
                       s=160, color=colors.get(arm, "black"), edgecolor="black",
                       label=f"{arm} test (final)")
        ax.set_xscale("log")
        ax.set(title=task, xlabel="trainable parameters", ylabel="macro AUROC")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("AUROC vs trainable parameters")
    return fig


def _cell_label(row) -> str:
    return f"{row.foundation} {row.dataset} {100 * row.label_fraction:g}%"


def methods_pareto(points: pd.DataFrame) -> Figure:
    """Test AUROC of each arm's final models against its trainable parameters, one panel per
    task cell (`analysis.methods.method_points`); the line joins the Pareto front, the arms no
    other beats with fewer trainable parameters and a higher test AUROC."""
    cells = list(points.groupby([Param.FOUNDATION, Param.DATASET, Param.LABEL_FRACTION],
                                sort=True)) if len(points) else []
    fig = _panels(len(cells), 5.2, 4.0)
    if not cells:
        _say(fig.subplots(), "no final test results")
        return fig
    colors = arm_colors(points[Tag.ARM].unique())
    size = Metric.TRAINABLE_PARAMS
    for ax, (_, group) in zip(_grid(fig, len(cells)), cells):
        group = group[group[size].notna() & group[Metric.TEST_AUROC].notna()]
        front = group[group["pareto"].astype(bool)].sort_values(size)
        ax.step(front[size], front[Metric.TEST_AUROC], where="post", color="black", lw=1.2,
                zorder=1, label="Pareto front")
        for row in group.itertuples():
            on_front = bool(row.pareto)
            ax.scatter(getattr(row, size), row.test_auroc, s=70 if on_front else 45,
                       color=colors[row.arm], edgecolor="black" if on_front else "none",
                       zorder=2, label=f"{row.arm} ({row.kind})")
            ax.annotate(row.arm, (getattr(row, size), row.test_auroc), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        title = _cell_label(group.iloc[0]) if len(group) else ""
        ax.set(title=title, xlabel="trainable parameters (log)", ylabel="test macro AUROC")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Test AUROC vs trainable parameters per method")
    return fig


def critical_difference(ranks: MethodRanks) -> Figure:
    """The critical difference diagram of `analysis.ranks`: each arm at its mean rank over
    the blocks (1 = best, left) and a bar joining the arms whose pairwise Nemenyi p is at
    least alpha. The critical difference is named in the title: the library would draw it
    over the rank axis's tick labels."""
    mean_ranks = ranks.mean_ranks
    fig = _figure(7.5, 1.6 + 0.3 * max(1, len(mean_ranks)))
    ax = fig.subplots()
    if not ranks.enough:
        _say(ax, "not enough tasks or arms to rank")
        return fig
    import scikit_posthocs  # heavy (statsmodels, seaborn): only when a diagram is drawn

    scikit_posthocs.critical_difference_diagram(
        mean_ranks, ranks.pairwise, ax=ax, alpha=ranks.alpha,
        color_palette=arm_colors(mean_ranks.index), label_fmt_left="{label} ({rank:.2f})",
        label_fmt_right="({rank:.2f}) {label}", label_props={"fontsize": 9})
    ax.set_xlim(0.95, len(mean_ranks) + 0.05)  # the whole range of ranks, 1 to the arms
    ax.set_title(f"Mean rank over {ranks.blocks} blocks (1 = best); bars join the arms Nemenyi "
                 f"does not tell apart (α = {ranks.alpha:g}, "
                 f"CD = {ranks.critical_difference:.2f})", fontsize=9, pad=14)
    return fig


def rank_lr_heatmap(data: StudyData, task: str, arm: str, bins: int = 6) -> Figure:
    """Best validation AUROC over LoRA rank (rows) and log-spaced lr bins (columns)."""
    trials = data.trials[(data.trials[Tag.TASK] == task) & (data.trials[Tag.ARM] == arm)
                         & (data.trials["status"] == "FINISHED")]
    trials = trials[trials[Param.RANK].notna() & trials[Param.LR].notna()] if (
        Param.RANK in trials) else trials.iloc[0:0]
    fig = _figure(6.0, 3.8)
    ax = fig.subplots()
    if trials.empty:
        _say(ax, "no finished LoRA trials")
        return fig
    lrs = trials[Param.LR].astype(float)
    low, high = math.log10(lrs.min()), math.log10(lrs.max())
    edges = np.logspace(low, high + 1e-9, bins + 1) if high > low else np.array(
        [lrs.min() * 0.99, lrs.max() * 1.01])
    column = np.clip(np.searchsorted(edges, lrs, side="right") - 1, 0, len(edges) - 2)
    ranks = sorted(int(r) for r in trials[Param.RANK].unique())
    grid = np.full((len(ranks), len(edges) - 1), np.nan)
    best = trials[Metric.BEST_VAL_AUROC]
    for (r, c), v in zip(zip(trials[Param.RANK].astype(int), column), best):
        i = ranks.index(r)
        grid[i, c] = v if np.isnan(grid[i, c]) else max(grid[i, c], v)
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", origin="lower")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] < np.nanmean(grid) else "black")
    ax.set_yticks(range(len(ranks)), [str(r) for r in ranks])
    centres = np.sqrt(edges[:-1] * edges[1:])
    ax.set_xticks(range(len(centres)), [f"{c:.1e}" for c in centres], rotation=30, fontsize=8)
    ax.set(xlabel="learning rate (bin centre)", ylabel="LoRA rank",
           title=f"Best validation AUROC by rank x lr: {task} {arm}")
    fig.colorbar(image, ax=ax, label="best val AUROC")
    return fig


def importance_bars(importance: pd.DataFrame) -> Figure:
    """fANOVA importance per task and arm, one panel each."""
    groups = list(importance.groupby(TASK_ARM, sort=True)) if len(importance) else []
    fig = _panels(len(groups), 4.6, 3.2)
    if not groups:
        _say(fig.subplots(), "not enough finished trials for fANOVA")
        return fig
    colors = arm_colors(importance[Tag.ARM].unique())
    for ax, ((task, arm), group) in zip(_grid(fig, len(groups)), groups):
        group = group.sort_values("importance")
        ax.barh(group["param"], group["importance"], color=colors[arm])
        ax.set(title=f"{task}\n{arm} ({int(group[Tag.TRIALS].iloc[0])} trials)",
               xlabel="fANOVA importance", xlim=(0, 1))
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("Hyperparameter importance (Optuna fANOVA)")
    return fig


def forest_plot(comparison: pd.DataFrame) -> Figure:
    """LoRA - FFT macro AUROC (points) per task with its 95% CI; filled = Holm-significant.
    A methods comparison (`analysis.methods.compare_methods`) gets a row per task and arm."""
    rows = comparison[np.isfinite(comparison["diff"].astype(float))] if len(comparison) else (
        comparison)
    fig = _figure(7.0, 1.2 + 0.55 * max(1, len(rows)))
    ax = fig.subplots()
    if rows.empty:
        _say(ax, "no final test results")
        return fig
    methods = Tag.ARM in rows and "reference" in rows
    labels = [_cell_label(r) + (f" {r.arm}" if methods else "") for r in rows.itertuples()]
    y = np.arange(len(rows))[::-1]
    diff = 100 * rows["diff"].to_numpy(float)
    low = 100 * rows["ci_low"].to_numpy(float)
    high = 100 * rows["ci_high"].to_numpy(float)
    has_ci = np.isfinite(low)
    ax.errorbar(diff[has_ci], y[has_ci], xerr=[diff[has_ci] - low[has_ci],
                                               high[has_ci] - diff[has_ci]],
                fmt="none", ecolor="black", capsize=4)
    significant = rows["significant"].fillna(False).to_numpy(bool)
    colors = np.where(diff > 0, "#1f77b4", "#d62728")
    ax.scatter(diff[significant], y[significant], c=colors[significant], s=60, zorder=3,
               label="Holm-significant")
    ax.scatter(diff[~significant], y[~significant], facecolors="white",
               edgecolors=colors[~significant], s=60, zorder=3, label="not significant")
    ax.axvline(0, color="0.4", lw=1)
    ax.set_yticks(y, labels)
    if methods:
        reference = rows["reference"].iloc[0]
        ax.set(xlabel=f"method − {reference} test macro AUROC (points, 95% paired bootstrap "
                      "CI)", title=f"Every method vs {reference} per task")
    else:
        ax.set(xlabel="LoRA − FFT test macro AUROC (points, 95% paired bootstrap CI)",
               title="LoRA vs FFT per task")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="best")
    return fig


def roc_curves(data: StudyData, task: str) -> Figure:
    """ROC per class of each arm's final model (lowest seed), one panel per arm."""
    finals = data.finals[data.finals[Tag.TASK] == task] if len(data.finals) else data.finals
    arms = sorted(finals[Tag.ARM].unique()) if len(finals) else []
    fig = _panels(len(arms), 4.6, 4.2)  # a methods study has 3 rows of 3
    for ax, arm in zip(_grid(fig, max(1, len(arms))), arms or [None]):
        run = finals[finals[Tag.ARM] == arm].sort_values(Param.SEED).head(1) if arm else finals
        frame = data.predictions(run["run_id"].iloc[0]) if len(run) else None
        if frame is None:
            _say(ax, "no saved test predictions")
            continue
        pred = Predictions.from_frame(frame)
        aucs = class_aurocs(pred)
        for k, name in enumerate(pred.classes):
            known = ~np.isnan(pred.labels[:, k])
            y = pred.labels[known, k]
            if y.min() == y.max():
                continue
            fpr, tpr, _ = roc_curve(y, pred.probs[known, k])
            ax.plot(fpr, tpr, lw=1.1, label=f"{name} ({aucs[name]:.3f})")
        ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=0.8)
        ax.set(title=f"{arm} (seed {int(run[Param.SEED].iloc[0])})", xlabel="false positive rate",
               ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"Test ROC per class: {task}")
    return fig


def budget_plot(curve: pd.DataFrame) -> Figure:
    """Best validation AUROC found so far against epochs spent, per task and arm (ASHA)."""
    tasks = sorted(curve[Tag.TASK].unique()) if len(curve) else []
    fig = _panels(len(tasks), 5.0, 3.4)
    colors = arm_colors(curve[Tag.ARM].unique()) if len(curve) else {}
    for ax, task in zip(_grid(fig, max(1, len(tasks))), tasks or [None]):
        if task is None:
            _say(ax, "no search trials")
            continue
        for arm, group in curve[curve[Tag.TASK] == task].groupby(Tag.ARM):
            ax.step(group["cumulative_epochs"], group["running_best"], where="post",
                    color=colors[arm], label=arm)
            full = int(group[Tag.TRIALS].iloc[0]) * int(group[Param.MAX_T].iloc[0])
            ax.axvline(full, color=colors[arm], ls=":", lw=1)
        ax.set(title=task, xlabel="epochs spent (dotted: budget without early stopping)",
               ylabel="best val AUROC so far")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("ASHA accounting: epochs spent vs best AUROC found")
    return fig
