"""The LoRA-vs-FFT table and the tables that keep it honest.

`compare_arms` gives one numeric row per task cell (foundation x dataset x label fraction):
means and spreads over final seeds (and over split draws where a study repeats them), the paired
patient-bootstrap difference with its CI, Holm-adjusted significance across the cells, and the
verdict. `paper_table` lays those rows out as the paper does; `to_markdown` / `to_latex` print
any table. The others answer the follow-up questions: was the budget equal (compute), did the
search overfit validation (val-test gap), are the probabilities usable (ECE), which classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.runs import best_configs
from analysis.stats import (
    Predictions,
    expected_calibration_error,
    holm,
    paired_bootstrap_draws,
)
from analysis.study_data import StudyData
from trainables.errors import ConfigError

# Published macro AUROC (paper_presets.md): MRM full fine-tuning as reported by the MRM/MaCo
# line of work, and the paper's LoRA headline number. Keyed by (foundation, dataset, fraction).
REFERENCE_FFT = {
    ("mrm", "nih", 0.01): 0.794, ("mrm", "nih", 0.1): 0.840, ("mrm", "nih", 1.0): 0.859,
    ("mrm", "chexpert", 0.01): 0.885, ("mrm", "chexpert", 0.1): 0.885,
    ("mrm", "chexpert", 1.0): 0.887,
    ("mrm", "rsna", 0.01): 0.913, ("mrm", "rsna", 0.1): 0.927, ("mrm", "rsna", 1.0): 0.933,
}
REFERENCE_LORA = {("mrm", "nih", 0.01): 0.806}
TASK_FACTORS = ["foundation", "dataset", "label_fraction"]


def pick_arms(data: StudyData, lora_arm: str | None = None,
              fft_arm: str | None = None) -> tuple[str, str]:
    """The LoRA and the FFT arm to compare: the named ones, else the only one of each kind."""
    kinds = data.arms.groupby("arm")["kind"].first().to_dict() if len(data.arms) else {}
    picked = []
    for kind, name in (("lora", lora_arm), ("fft", fft_arm)):
        if name is not None:
            if name not in kinds:
                raise ConfigError(f"--{kind}-arm {name!r} is not an arm of this study: "
                                  f"arms are {sorted(kinds)}")
            picked.append(name)
            continue
        of_kind = sorted(a for a, k in kinds.items() if k == kind)
        if len(of_kind) != 1:
            raise ConfigError(f"the study has {len(of_kind)} {kind} arms ({of_kind}): name the "
                              f"one to compare with --{kind}-arm")
        picked.append(of_kind[0])
    return picked[0], picked[1]


def compare_arms(data: StudyData, lora_arm: str | None = None, fft_arm: str | None = None,
                 n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                 alpha: float = 0.05) -> pd.DataFrame:
    """One row per foundation x dataset x label fraction: LoRA vs FFT on test, with statistics.

    Differences are LoRA - FFT in macro AUROC. `significant` uses Holm-adjusted bootstrap
    p-values across all rows; a row without saved predictions gets means but no CI.
    """
    lora, fft = pick_arms(data, lora_arm, fft_arm)
    finals = data.finals
    if finals.empty or "test_auroc" not in finals:
        return pd.DataFrame(columns=[*TASK_FACTORS, "diff", "verdict"])
    finals = finals[finals["status"] == "FINISHED"]
    if "split_seed" not in finals:  # a study that did not record it has one draw
        finals = finals.assign(split_seed=0)
    rows = [_compare_cell(data, cell, group, lora, fft, n_boot, seed, level)
            for cell, group in finals.groupby(TASK_FACTORS, sort=True)]
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["p_holm"] = holm(table["p_value"].to_numpy())
    table["significant"] = table["p_holm"] < alpha
    table["verdict"] = [_verdict(d, s, p) for d, s, p in
                        zip(table["diff"], table["significant"], table["p_value"])]
    table["ref_fft"] = [REFERENCE_FFT.get(_ref_key(r)) for r in table.itertuples()]
    table["ref_lora"] = [REFERENCE_LORA.get(_ref_key(r)) for r in table.itertuples()]
    table.attrs.update(lora_arm=lora, fft_arm=fft, n_boot=n_boot, level=level, alpha=alpha)
    return table


def _ref_key(row) -> tuple[str, str, float]:
    return (str(row.foundation), str(row.dataset), round(float(row.label_fraction), 6))


def _verdict(diff: float, significant: bool, p_value: float) -> str:
    if not math.isfinite(p_value):
        return "no test predictions" if math.isfinite(diff) else "no test results"
    if significant:
        return "LoRA better" if diff > 0 else "FFT better"
    return "no significant difference"


def _compare_cell(data: StudyData, cell: tuple, group: pd.DataFrame, lora: str, fft: str,
                  n_boot: int, seed: int, level: float) -> dict:
    """Seed means per split draw, their spreads, and the paired bootstrap over the draws."""
    row: dict = dict(zip(TASK_FACTORS, cell))
    row["tasks"] = ", ".join(sorted(group["task"].unique()))
    draws = sorted(group["split_seed"].unique())
    row["draws"] = len(draws)
    paired = []
    for arm, name in ((lora, "lora"), (fft, "fft")):
        runs = group[group["arm"] == arm]
        by_draw = runs.groupby("split_seed")["test_auroc"]
        means = by_draw.mean()
        row[f"{name}_seeds"] = len(runs)
        row[f"{name}_mean"] = float(means.mean()) if len(means) else float("nan")
        # Seed spread: within a draw; draw spread: between the draws' means.
        row[f"{name}_sd"] = float(by_draw.std().mean()) if len(runs) > 1 else float("nan")
        row[f"{name}_sd_draws"] = float(means.std()) if len(means) > 1 else float("nan")
        row[f"{name}_trainable_pct"] = float(runs["trainable_pct"].mean())
    for draw in draws:
        a = _draw_predictions(data, group, lora, draw)
        b = _draw_predictions(data, group, fft, draw)
        if a and b:
            paired.append((a, b))
    row["diff"] = row["lora_mean"] - row["fft_mean"]
    row.update(ci_low=np.nan, ci_high=np.nan, p_value=np.nan, n_test_images=np.nan,
               n_test_patients=np.nan)
    if paired:
        result = paired_bootstrap_draws(paired, n_boot, seed, level)
        row.update(diff=result.diff, ci_low=result.low, ci_high=result.high,
                   p_value=result.p_value, n_test_images=result.n_images,
                   n_test_patients=result.n_patients)
    return row


def _draw_predictions(data: StudyData, group: pd.DataFrame, arm: str,
                      draw) -> list[Predictions]:
    runs = group[(group["arm"] == arm) & (group["split_seed"] == draw)]
    frames = [data.predictions(r) for r in runs["run_id"]]
    return [Predictions.from_frame(f) for f in frames if f is not None]


def summary_line(comparison: pd.DataFrame) -> str:
    """'LoRA wins k of n tasks (m significant)', counting rows with a test difference."""
    if comparison.empty:
        return "no task has final test results yet"
    scored = comparison[np.isfinite(comparison["diff"].astype(float))]
    wins = int((scored["diff"] > 0).sum())
    significant = int((scored["significant"] & (scored["diff"] > 0)).sum())
    line = f"LoRA wins {wins} of {len(scored)} tasks ({significant} significant)"
    losses = int((scored["significant"] & (scored["diff"] < 0)).sum())
    if losses:
        line += f"; FFT significantly better on {losses}"
    return line


def _fraction_label(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def _pm(mean: float, sd: float) -> str:
    if not math.isfinite(mean):
        return "–"
    return f"{100 * mean:.1f}" + (f" ± {100 * sd:.1f}" if math.isfinite(sd) else "")


def _diff_text(row) -> str:
    if not math.isfinite(row.diff):
        return "–"
    text = f"{100 * row.diff:+.1f}"
    if math.isfinite(row.ci_low):
        text += f" [{100 * row.ci_low:+.1f}, {100 * row.ci_high:+.1f}]"
    return text + ("*" if bool(row.significant) else "")


def paper_table(comparison: pd.DataFrame, reference: bool = False) -> pd.DataFrame:
    """Rows foundation x dataset, columns (label fraction, field); AUROC in points (x100).

    Fields: LoRA and FFT as mean ± sd over final seeds, Δ = LoRA - FFT with its CI (* marks
    Holm-significant), the verdict, trainable % as "LoRA / FFT"; with `reference`, the
    published FFT (and LoRA) number; where split draws repeat, the spread of the draws' means
    ("LoRA / FFT") beside the seed sd of the cells.
    """
    if comparison.empty:
        return pd.DataFrame()
    several_draws = bool((comparison["draws"] > 1).any())
    cells: dict[tuple[str, str], dict[tuple[str, str], str]] = {}
    for row in comparison.itertuples():
        fields = {"LoRA": _pm(row.lora_mean, row.lora_sd), "FFT": _pm(row.fft_mean, row.fft_sd),
                  "Δ [95% CI]": _diff_text(row), "verdict": row.verdict,
                  "trainable %": f"{_num(row.lora_trainable_pct, 2)} / "
                                 f"{_num(row.fft_trainable_pct, 0)}"}
        if several_draws:
            fields["sd across draws"] = (f"{_num(100 * row.lora_sd_draws, 1)} / "
                                         f"{_num(100 * row.fft_sd_draws, 1)}")
        if reference:
            fields["FFT (published)"] = _points(row.ref_fft)
            fields["LoRA (published)"] = _points(row.ref_lora)
        frac = _fraction_label(row.label_fraction)
        target = cells.setdefault((row.foundation, row.dataset), {})
        target.update({(frac, name): value for name, value in fields.items()})
    table = pd.DataFrame.from_dict(cells, orient="index")
    fractions = sorted(comparison["label_fraction"].unique())
    order = [(_fraction_label(f), name) for f in fractions for name in fields]
    table = table.reindex(columns=pd.MultiIndex.from_tuples(order)).fillna("–")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["foundation", "dataset"])
    table.attrs["summary"] = summary_line(comparison)
    return table


def _num(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "–"


def _points(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


# --- follow-up tables ---------------------------------------------------------------------

def calibration_table(data: StudyData, bins: int = 15) -> pd.DataFrame:
    """Macro ECE of each final model, mean and sd over seeds, per task and arm."""
    rows = []
    for run in data.finals.itertuples():
        frame = data.predictions(run.run_id)
        if frame is not None:
            ece = expected_calibration_error(Predictions.from_frame(frame), bins)
            rows.append({"task": run.task, "arm": run.arm, "seed": run.seed, "ece": ece})
    if not rows:
        return pd.DataFrame(columns=["task", "arm", "seeds", "ece_mean", "ece_sd"])
    per_seed = pd.DataFrame(rows)
    return (per_seed.groupby(["task", "arm"])["ece"]
            .agg(seeds="count", ece_mean="mean", ece_sd="std").reset_index())


def per_class_table(data: StudyData) -> pd.DataFrame:
    """Test AUROC per class, mean over final seeds; rows task x class, one column per arm."""
    columns = [c for c in data.finals.columns if c.startswith("test_auroc_")]
    if not columns:
        return pd.DataFrame()
    long = data.finals.melt(id_vars=["task", "arm"], value_vars=columns, var_name="class",
                            value_name="auroc")
    long["class"] = long["class"].str.removeprefix("test_auroc_")
    wide = long.groupby(["task", "class", "arm"])["auroc"].mean().unstack("arm")
    wide.columns.name = None
    return wide.reset_index()


def val_test_gap(data: StudyData) -> pd.DataFrame:
    """Per task and arm: validation AUROC that selected the config vs its test AUROC.

    A large positive gap means the search fitted the validation split (small validation sets
    reward lucky configs); compare it between arms before trusting a win.
    """
    search = data.trials[data.trials["status"] == "FINISHED"] if len(data.trials) else (
        data.trials)
    if search.empty:
        return pd.DataFrame(columns=["task", "arm", "search_val", "test", "gap"])
    best = search.groupby(["task", "arm"])["best_val_auroc"].max().rename("search_val")
    out = best.to_frame()
    if len(data.finals) and "test_auroc" in data.finals:
        finals = data.finals.groupby(["task", "arm"])
        out = out.join(finals["best_val_auroc"].mean().rename("final_val"))
        out = out.join(finals["test_auroc"].mean().rename("test"))
    else:
        out["final_val"], out["test"] = np.nan, np.nan
    out["gap"] = out["search_val"] - out["test"]
    out["final_gap"] = out["final_val"] - out["test"]
    return out.reset_index()


def compute_table(data: StudyData) -> pd.DataFrame:
    """What each arm spent: trials, epochs and wall time in search and in the final runs."""
    if data.trials.empty:
        return pd.DataFrame()
    trials = data.trials.assign(stopped=data.trials["stopped_early"].fillna(False).astype(bool))
    out = trials.groupby(["task", "arm"]).agg(
        trials=("run_id", "count"), stopped_early=("stopped", "sum"),
        failed=("failed", "sum"), epochs=("epochs_run", "sum"),
        trial_wall_s=("wall_s", "sum"))
    arms = data.arms.set_index(["task", "arm"])
    out["max_t"] = arms["max_t"].reindex(out.index)
    out["epoch_budget"] = out["trials"] * out["max_t"]
    out["search_wall_s"] = arms["wall_s"].reindex(out.index)
    if len(data.finals):
        finals = data.finals.groupby(["task", "arm"])
        out["final_runs"] = finals["run_id"].count()
        out["final_epochs"] = finals["epochs_run"].sum()
        out["final_wall_s"] = finals["wall_s"].sum()
    out = out.reset_index()
    for name in ("trials", "stopped_early", "failed", "epochs", "epoch_budget"):
        out[name] = out[name].astype("Int64")
    return out


def compute_totals(compute: pd.DataFrame) -> pd.DataFrame:
    """The compute table summed over tasks: one row per arm, to check the budgets match."""
    if compute.empty:
        return compute
    numeric = [c for c in compute.columns if c not in ("task", "arm", "max_t")]
    return compute.groupby("arm")[numeric].sum().reset_index()


def asha_accounting(data: StudyData) -> pd.DataFrame:
    """Per task and arm: epochs ASHA spent against the full budget, and when the best was found.

    `epochs_to_best` counts the epochs spent (in trial order) until the final best validation
    AUROC was first reached: the rest of the budget bought no improvement.
    """
    curve = budget_curve(data)
    if curve.empty:
        return pd.DataFrame()
    rows = []
    for (task, arm), group in curve.groupby(["task", "arm"], sort=True):
        best = group["running_best"].max()
        reached = group.loc[group["running_best"] >= best, "cumulative_epochs"].min()
        full = int(group["trials"].iloc[0]) * int(group["max_t"].iloc[0])
        spent = int(group["cumulative_epochs"].max())
        rows.append({"task": task, "arm": arm, "trials": len(group), "epochs_spent": spent,
                     "epochs_full_budget": full, "saved_pct": 100.0 * (1 - spent / full),
                     "stopped_early": int(group["stopped_early"].sum()),
                     "best_val_auroc": best, "epochs_to_best": int(reached)})
    return pd.DataFrame(rows)


def budget_curve(data: StudyData) -> pd.DataFrame:
    """Trials in the order they started: cumulative epochs and the best val AUROC so far."""
    if data.trials.empty:
        return pd.DataFrame()
    max_t = data.arms.set_index(["task", "arm"])["max_t"].to_dict()
    parts = []
    for (task, arm), group in data.trials.groupby(["task", "arm"], sort=True):
        group = group.sort_values(["start_time", "trial_index"])
        best = group["best_val_auroc"].astype(float).fillna(-np.inf).cummax()
        parts.append(pd.DataFrame({
            "task": task, "arm": arm, "trial_id": group["trial_id"].to_numpy(),
            "epochs_run": group["epochs_run"].fillna(0).astype(int).to_numpy(),
            "cumulative_epochs": group["epochs_run"].fillna(0).astype(int).cumsum().to_numpy(),
            "running_best": best.replace(-np.inf, np.nan).to_numpy(),
            "stopped_early": group["stopped_early"].fillna(False).astype(bool).to_numpy(),
            "trials": len(group),
            "max_t": max_t.get((task, arm), group["epochs"].max())}))
    return pd.concat(parts, ignore_index=True)


SUBGROUP_COLUMNS = ("sex", "age_band", "view", "projection")


def subgroup_table(data: StudyData, columns: Sequence[str] = SUBGROUP_COLUMNS) -> pd.DataFrame:
    """Test macro AUROC per subgroup, for subgroup columns the saved predictions carry.

    Predictions record sex, age (banded here), view where the dataset provides them; an empty
    table means no final run saved such a column.
    """
    from analysis.stats import macro_auroc
    rows = []
    for run in data.finals.itertuples():
        frame = data.predictions(run.run_id)
        if frame is None:
            continue
        if "age" in frame and "age_band" not in frame:
            frame = frame.assign(age_band=pd.cut(frame["age"], [0, 40, 60, 80, 200], right=False,
                                                 labels=["<40", "40-59", "60-79", "80+"]))
        for column in [c for c in columns if c in frame]:
            for value, part in frame.groupby(column, observed=True):
                rows.append({"task": run.task, "arm": run.arm, "seed": run.seed,
                             "subgroup": column, "value": str(value), "images": len(part),
                             "auroc": macro_auroc(Predictions.from_frame(part))})
    if not rows:
        return pd.DataFrame(columns=["task", "arm", "subgroup", "value", "images", "auroc"])
    return (pd.DataFrame(rows).groupby(["task", "subgroup", "value", "arm"])
            .agg(images=("images", "first"), auroc=("auroc", "mean")).reset_index())


def best_config_table(data: StudyData) -> pd.DataFrame:
    """The selected config of each task and arm (from `analysis.runs.best_configs`)."""
    best = best_configs(data.runs)
    if best.empty:
        return best
    config = best["config"].map(lambda c: ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items()))
    return best.drop(columns=["config"]).assign(config=config)


# --- printing -----------------------------------------------------------------------------

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
