"""The LoRA-vs-FFT table: one numeric row per task cell, and the paper's layout of it.

`compare_arms` gives one row per task cell (foundation x dataset x label fraction): means and
spreads over final seeds (and over split draws where a study repeats them), the paired
patient-bootstrap difference with its CI, Holm-adjusted significance across the cells, and the
verdict. `paper_table` lays those rows out as the paper does.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.stats import Predictions, holm, paired_bootstrap_draws
from analysis.study_data import StudyData
from contract.errors import ConfigError
from contract.schema import Metric, Param, Tag

# Published macro AUROC (paper_presets.md): MRM full fine-tuning as reported by the MRM/MaCo
# line of work, and the paper's LoRA headline number. Keyed by (foundation, dataset, fraction).
REFERENCE_FFT = {
    ("mrm", "nih", 0.01): 0.794, ("mrm", "nih", 0.1): 0.840, ("mrm", "nih", 1.0): 0.859,
    ("mrm", "chexpert", 0.01): 0.885, ("mrm", "chexpert", 0.1): 0.885,
    ("mrm", "chexpert", 1.0): 0.887,
    ("mrm", "rsna", 0.01): 0.913, ("mrm", "rsna", 0.1): 0.927, ("mrm", "rsna", 1.0): 0.933,
}
REFERENCE_LORA = {("mrm", "nih", 0.01): 0.806}
# A cell of the comparison: its split draws (split seeds) are pooled within it.
CELL_FACTORS = [Param.FOUNDATION, Param.DATASET, Param.LABEL_FRACTION]


def pick_arms(data: StudyData, lora_arm: str | None = None,
              fft_arm: str | None = None) -> tuple[str, str]:
    """The LoRA and the FFT arm to compare: the named ones, else the only one of each kind."""
    kinds = data.arms.groupby(Tag.ARM)[Tag.KIND].first().to_dict() if len(data.arms) else {}
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
    if finals.empty or Metric.TEST_AUROC not in finals:
        return pd.DataFrame(columns=[*CELL_FACTORS, "diff", "verdict"])
    finals = finals[finals["status"] == "FINISHED"]
    if Param.SPLIT_SEED not in finals:  # a study that did not record it has one draw
        finals = finals.assign(**{Param.SPLIT_SEED: 0})
    rows = [_compare_cell(data, cell, group, lora, fft, n_boot, seed, level)
            for cell, group in finals.groupby(CELL_FACTORS, sort=True)]
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
    row: dict = dict(zip(CELL_FACTORS, cell))
    row["tasks"] = ", ".join(sorted(group[Tag.TASK].unique()))
    row["draws"] = group[Param.SPLIT_SEED].nunique()
    for arm, name in ((lora, "lora"), (fft, "fft")):
        row.update({f"{name}_{k}": v for k, v in arm_cell_stats(group, arm).items()})
    row.update(paired_cell(data, group, lora, fft, n_boot, seed, level))
    return row


def arm_cell_stats(group: pd.DataFrame, arm: str) -> dict:
    """One arm's final runs in a cell: seeds, the mean of its draws' seed means, the seed
    spread (within a draw), the draw spread (between the draws' means), trainable share."""
    runs = group[group[Tag.ARM] == arm]
    by_draw = runs.groupby(Param.SPLIT_SEED)[Metric.TEST_AUROC]
    means = by_draw.mean()
    return {"seeds": len(runs), "mean": float(means.mean()) if len(means) else float("nan"),
            "sd": float(by_draw.std().mean()) if len(runs) > 1 else float("nan"),
            "sd_draws": float(means.std()) if len(means) > 1 else float("nan"),
            "trainable_pct": float(runs["trainable_pct"].mean())}


def paired_cell(data: StudyData, group: pd.DataFrame, a: str, b: str, n_boot: int, seed: int,
                level: float) -> dict:
    """Arm a - arm b in a cell: the difference of their means, and with saved predictions the
    paired patient bootstrap over the split draws (CI, p-value, test set size)."""
    stats = [arm_cell_stats(group, arm)["mean"] for arm in (a, b)]
    out = {"diff": stats[0] - stats[1], "ci_low": np.nan, "ci_high": np.nan,
           "p_value": np.nan, "n_test_images": np.nan, "n_test_patients": np.nan}
    paired = []
    for draw in sorted(group[Param.SPLIT_SEED].unique()):
        first = _draw_predictions(data, group, a, draw)
        second = _draw_predictions(data, group, b, draw)
        if first and second:
            paired.append((first, second))
    if paired:
        result = paired_bootstrap_draws(paired, n_boot, seed, level)
        out.update(diff=result.diff, ci_low=result.low, ci_high=result.high,
                   p_value=result.p_value, n_test_images=result.n_images,
                   n_test_patients=result.n_patients)
    return out


def _draw_predictions(data: StudyData, group: pd.DataFrame, arm: str,
                      draw) -> list[Predictions]:
    runs = group[(group[Tag.ARM] == arm) & (group[Param.SPLIT_SEED] == draw)]
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
    fractions = sorted(comparison[Param.LABEL_FRACTION].unique())
    order = [(_fraction_label(f), name) for f in fractions for name in fields]
    table = table.reindex(columns=pd.MultiIndex.from_tuples(order)).fillna("–")
    table.index = pd.MultiIndex.from_tuples(table.index, names=CELL_FACTORS[:2])
    table.attrs["summary"] = summary_line(comparison)
    return table


def _num(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "–"


def _points(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"
