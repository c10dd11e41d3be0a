"""The study report: one Markdown file beside its figures, and one self-contained HTML page.

Both are rendered from the same list of sections, so they always say the same thing. The HTML
carries its images as base64 data, so it can be mailed or attached to a ticket as one file.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from analysis import plots
from analysis.importance import marginal_effects, param_importance
from analysis.methods import (
    arm_kinds,
    compare_methods,
    methods_summary,
    methods_summary_line,
    pick_reference,
)
from analysis.ranks import method_ranks, ranks_line
from analysis.study_data import StudyData, load_study
from analysis.tables import (
    CELL_FACTORS,
    asha_accounting,
    best_config_table,
    budget_curve,
    calibration_table,
    compare_arms,
    compute_table,
    compute_totals,
    flatten_columns,
    format_cell,
    paper_table,
    per_class_table,
    subgroup_table,
    summary_line,
    to_markdown,
    val_test_gap,
)
from contract.errors import ConfigError
from contract.schema import Metric, Param, StudyParams, Tag, tag


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    figures: list[tuple[str, Path]] = field(default_factory=list)


def write_report(tracking_uri: str, experiment: str, out_dir: Path, n_boot: int = 1000,
                 lora_arm: str | None = None, fft_arm: str | None = None,
                 reference: bool | None = None, seed: int = 0,
                 reference_arm: str | None = None) -> Path:
    """Write out_dir/report.md (+ figures/) and out_dir/report.html; return the HTML path.

    `reference` adds the published MRM numbers as columns (default: when any task has one).
    `reference_arm` is the arm every method is compared with (default: the one FFT arm).
    """
    out_dir = Path(out_dir)
    figures = out_dir / "figures"
    data = load_study(tracking_uri, experiment)
    sections = build_sections(data, figures, n_boot, lora_arm, fft_arm, reference, seed,
                              reference_arm)
    title = (f"Fine-tuning methods: {experiment}" if _several_methods(data, reference_arm)
             else f"LoRA vs full fine-tuning: {experiment}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(render_markdown(title, sections, out_dir))
    page = out_dir / "report.html"
    page.write_text(render_html(title, sections))
    return page


def build_sections(data: StudyData, figures: Path, n_boot: int = 1000,
                   lora_arm: str | None = None, fft_arm: str | None = None,
                   reference: bool | None = None, seed: int = 0,
                   reference_arm: str | None = None) -> list[Section]:
    """Compute every table and figure of the report, in reading order.

    A study of one LoRA and one FFT arm gets the LoRA-vs-FFT report alone; a study with other
    methods (or a named `reference_arm`) also gets every method against the reference."""
    if reference_arm is not None:
        pick_reference(data, reference_arm)  # a name that is no arm fails before any work
    sections = [_overview(data)]
    comparison = _comparison(data, n_boot, lora_arm, fft_arm, seed)
    sections.append(_headline(comparison, figures, reference))
    if _several_methods(data, reference_arm):
        sections.append(_methods(data, figures, n_boot, seed, reference_arm))
    best = best_config_table(data)
    sections.append(Section("Selected configurations", [
        "The best search trial of each task and arm (by best validation AUROC); its test AUROC "
        "is the mean over the final seeds."], [("best configs", best.drop(
            columns=["run_id", "final_run_ids", "search_run_id"], errors="ignore"))]))
    sections.append(_budget(data, figures))
    sections.append(_honesty(data))
    sections.append(_importance(data, figures))
    sections.append(_curves(data, figures))
    return sections


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _figure(fig, figures: Path, name: str) -> Path:
    return plots.save(fig, figures, _slug(name))[0]


def _overview(data: StudyData) -> Section:
    study = data.study.iloc[0] if len(data.study) else pd.Series(dtype=object)
    # The study run's params, by their record's fields ("–" where a store lacks one).
    record = StudyParams(**{f.name: study.get(f.name, "–") for f in fields(StudyParams)})
    facts = {
        "experiment": data.experiment, "tracking URI": data.tracking_uri,
        "study run": study.get("run_name", "–"), "status": study.get("status", "–"),
        "git commit": study.get(tag(Tag.GIT_COMMIT), "–"),
        "tasks": ", ".join(data.tasks) or "–",
        "arms": ", ".join(f"{r.arm} ({r.kind}, space {r.space})" for r in
                          data.arms.drop_duplicates(Tag.ARM).itertuples()) or "–",
        "epochs per trial (max_t)": record.max_t,
        "final seeds": record.final_seeds,
        "search trials": len(data.trials), "final runs": len(data.finals),
        "report written": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    foundations = _foundations(data)
    terms, notes = _terms(foundations)
    if foundations:
        facts["weights' terms"] = "; ".join(f"{name}: {terms.get(name, 'not in this registry')}"
                                            for name in foundations)
    table = pd.DataFrame({"": list(facts), "value": [str(v) for v in facts.values()]})
    return Section("Study", text=[f"Terms: {note}." for note in notes], tables=[("", table)])


def _foundations(data: StudyData) -> list[str]:
    """The foundations the study's arms ran on, in order of first appearance."""
    if Param.FOUNDATION not in data.arms:
        return []
    return list(dict.fromkeys(str(n) for n in data.arms[Param.FOUNDATION].dropna()))


def _terms(names: list[str]) -> tuple[dict[str, str], list[str]]:
    """Each known foundation's terms as `cxr-study foundations` shows them, and the notes the
    plan gives on restricted weights. The registry imports torch, so it is read only when
    there are foundations to look up."""
    if not names:
        return {}, []
    from trainables.foundation import FOUNDATIONS, terms_notes

    return {n: FOUNDATIONS[n].terms.text() for n in names if n in FOUNDATIONS}, terms_notes(names)


def _several_methods(data: StudyData, reference_arm: str | None) -> bool:
    """Whether the study is more than one LoRA and one FFT arm (or a reference was named)."""
    kinds = sorted(arm_kinds(data).values())
    return reference_arm is not None or (len(kinds) > 1 and kinds != ["fft", "lora"])


def _comparison(data: StudyData, n_boot: int, lora_arm: str | None, fft_arm: str | None,
                seed: int) -> pd.DataFrame | str:
    """The comparison table, or why there is none: a study without one of the two kinds, or
    with several of one and none named (the methods section still compares them all)."""
    kinds = list(arm_kinds(data).values())
    missing = [k for k in ("lora", "fft") if k not in kinds]
    if missing and not (lora_arm and fft_arm):
        return f"no comparison: the study has no {' or '.join(missing)} arm"
    several = [k for k, name in (("lora", lora_arm), ("fft", fft_arm))
               if name is None and kinds.count(k) > 1]
    if several:
        return (f"no LoRA-vs-FFT table: the study has several {' and '.join(several)} arms; "
                f"name the pair with {' and '.join(f'--{k}-arm' for k in several)}")
    return compare_arms(data, lora_arm, fft_arm, n_boot=n_boot, seed=seed)


def _headline(comparison: pd.DataFrame | str, figures: Path,
              reference: bool | None) -> Section:
    section = Section("LoRA vs FFT on test")
    if isinstance(comparison, str) or comparison.empty:
        section.text.append(comparison if isinstance(comparison, str) else
                            "No final test results yet: run the study's final phase.")
        return section
    attrs = comparison.attrs
    if reference is None:
        reference = bool(comparison["ref_fft"].notna().any())
    section.text += [
        f"**{summary_line(comparison)}** (LoRA arm `{attrs['lora_arm']}`, FFT arm "
        f"`{attrs['fft_arm']}`).",
        "Cells are test macro AUROC x100, mean ± sd over the final seeds. Δ = LoRA − FFT with a "
        f"{100 * attrs['level']:g}% paired bootstrap CI over test patients ({attrs['n_boot']} "
        "replicates, a patient's images resampled together, both arms scored on the same draw); "
        f"* marks differences significant after a Holm correction across the "
        f"{len(comparison)} tasks (α = {attrs['alpha']}). Trainable % and spreads across split "
        "draws are given as LoRA / FFT."]
    if reference:
        section.text.append("Published: MRM full fine-tuning as reported by the MRM/MaCo line "
                            "of work, and the paper's LoRA result (NIH 1%), for comparison "
                            "with this run's numbers.")
    section.tables.append(("paper table", paper_table(comparison, reference=reference)))
    detail = comparison.drop(columns=["tasks", "ref_fft", "ref_lora"], errors="ignore")
    section.tables.append(("statistics per task (AUROC as fractions)", detail))
    section.figures.append(("Paired difference per task", _figure(
        plots.forest_plot(comparison), figures, "forest")))
    return section


# What the per-task methods table shows (the statistics table has the rest).
_METHOD_COLUMNS = [*CELL_FACTORS, Tag.ARM, Tag.KIND, Metric.TEST_AUROC, "diff", "ci_low",
                   "ci_high", "p_holm", "verdict", "trainable_pct", "pareto", "epochs", "run_s"]


def _methods(data: StudyData, figures: Path, n_boot: int, seed: int,
             reference_arm: str | None) -> Section:
    section = Section("Every method vs the reference")
    try:
        comparison = compare_methods(data, reference_arm, n_boot=n_boot, seed=seed)
    except ConfigError as exc:  # no FFT arm, or several, and no --reference-arm
        section.text.append(f"No methods comparison: {exc}.")
        _add_ranks(section, data, figures)  # ranks need no reference arm
        return section
    per_task, overall = methods_summary(data, comparison)
    if per_task.empty:
        section.text.append("No final test results yet: run the study's final phase.")
        return section
    attrs, m = comparison.attrs, int(comparison["p_value"].notna().sum())
    section.text += [
        f"**{methods_summary_line(comparison)}** (reference arm `{attrs['reference']}`).",
        "Δ = method − reference in test macro AUROC (fractions; x100 for points), the same "
        f"{100 * attrs['level']:g}% paired bootstrap over test patients as the LoRA-vs-FFT "
        f"table ({attrs['n_boot']} replicates); p_holm is Holm-adjusted across all {m} "
        f"tasks x methods (α = {attrs['alpha']}). Pareto: no other arm of the task has fewer "
        "trainable parameters and a higher test AUROC. Epochs count search trials and final "
        "runs; run time (s) is their wall time summed, search trials and final runs: the "
        "device time where each run holds one device (the store does not record which "
        "device, GPU or CPU, a run had)."]
    floor = 2 * m / (attrs["n_boot"] + 1)
    if m and floor >= attrs["alpha"]:
        section.text.append(
            f"With {m} comparisons and {attrs['n_boot']} replicates no difference can reach "
            f"Holm significance (the smallest bootstrap p is {2 / (attrs['n_boot'] + 1):.2g}): "
            f"use --n-boot {_n_boot_for(m, attrs['alpha'])} or more.")
    section.tables += [
        ("methods summary (all tasks)", overall),
        ("methods summary per task", per_task[_METHOD_COLUMNS]),
        ("statistics per task and method (AUROC as fractions)",
         comparison.drop(columns=["tasks", "reference"], errors="ignore"))]
    section.figures += [
        ("Test AUROC vs trainable parameters (Pareto front)", _figure(
            plots.methods_pareto(per_task), figures, "methods_pareto")),
        ("Every method vs the reference per task", _figure(
            plots.forest_plot(comparison), figures, "methods_forest"))]
    _add_ranks(section, data, figures)
    return section


def _add_ranks(section: Section, data: StudyData, figures: Path) -> None:
    """Every method over every task by mean rank, with the Friedman test and the critical
    difference diagram; one sentence alone where there are too few tasks or arms."""
    ranks = method_ranks(data)
    section.text.append(f"**{ranks_line(ranks)}**")
    if not ranks.enough:
        return
    section.text.append(
        "Mean ranks: within each block (task x split draw) the arms are ranked by test macro "
        "AUROC, the mean over their final seeds (1 = best, ties share the mean rank), and the "
        "ranks are averaged over the blocks. Pairs: the Nemenyi test, corrected for all "
        f"pairs; two arms differ at α = {ranks.alpha:g} when their mean ranks are more than "
        f"the critical difference apart (CD = {ranks.critical_difference:.2f}).")
    section.tables.append(("mean ranks over tasks", ranks.table))
    section.figures.append(("Critical difference diagram (mean rank over tasks)", _figure(
        plots.critical_difference(ranks), figures, "methods_cd")))


def _n_boot_for(comparisons: int, alpha: float) -> int:
    """Replicates at which the smallest bootstrap p, Holm-adjusted, falls below alpha."""
    needed = int(2 * comparisons / alpha)
    return int(-(-needed // 1000) * 1000)  # rounded up to a thousand


def _budget(data: StudyData, figures: Path) -> Section:
    compute = compute_table(data)
    section = Section("Compute and ASHA accounting", [
        "Every arm should have had the same budget: trials, epochs and wall time per arm. ASHA "
        "accounting shows how many epochs early stopping saved and after how many epochs the "
        "best configuration had been found. Per method: epochs and wall time (s) of the "
        "search trials and final runs, summed over tasks."])
    section.tables += [("compute per task and arm", compute),
                       ("compute per method (all tasks)", compute_totals(compute)),
                       ("ASHA accounting", asha_accounting(data))]
    curve = budget_curve(data)
    section.figures.append(("Epochs spent vs best validation AUROC found", _figure(
        plots.budget_plot(curve), figures, "asha_budget")))
    return section


def _honesty(data: StudyData) -> Section:
    section = Section("Validation-test gap, calibration, classes, subgroups", [
        "gap = best validation AUROC of the search − mean test AUROC of the retrained config. "
        "A large gap in one arm only means its search fitted the validation split.",
        "ECE: expected calibration error (15 equal-width bins, mean over classes and seeds)."])
    section.tables += [("validation-test gap", val_test_gap(data)),
                       ("calibration (ECE)", calibration_table(data)),
                       ("test AUROC per class (mean over seeds)", per_class_table(data))]
    subgroups = subgroup_table(data)
    if subgroups.empty:
        section.text.append("Subgroups: the saved test predictions carry no sex, age or view "
                            "columns, so no subgroup AUROC is reported.")
    else:
        section.tables.append(("test AUROC by subgroup", subgroups))
    return section


def _importance(data: StudyData, figures: Path) -> Section:
    importance = param_importance(data.trials, data.arms)
    section = Section("Hyperparameter importance", [
        "fANOVA (Optuna) over each arm's finished search trials, objective = best validation "
        "AUROC; only parameters the arm's search space samples are scored. With few trials "
        "these are indications, not measurements."])
    section.tables.append(("importance", importance))
    section.tables.append(("marginal effects (best validation AUROC by value)",
                           marginal_effects(data.trials)))
    section.figures.append(("fANOVA importance", _figure(
        plots.importance_bars(importance), figures, "importance")))
    return section


def _curves(data: StudyData, figures: Path) -> Section:
    section = Section("Search and final models")
    if data.trials.empty:
        section.text.append("No search trials recorded.")
        return section
    section.figures.append(("AUROC vs trainable parameters", _figure(
        plots.auroc_vs_params(data), figures, "auroc_vs_params")))
    for task in data.tasks:
        section.figures.append((f"Learning curves: {task}", _figure(
            plots.learning_curves(data, task), figures, f"learning_curves_{task}")))
        trials = data.trials
        lora_arms = sorted(trials.loc[(trials[Tag.TASK] == task) & (trials[Tag.KIND] == "lora"),
                                      Tag.ARM].unique())
        for arm in lora_arms:
            section.figures.append((f"Rank x lr: {task} {arm}", _figure(
                plots.rank_lr_heatmap(data, task, arm), figures, f"rank_lr_{task}_{arm}")))
        if len(data.finals) and (data.finals[Tag.TASK] == task).any():
            section.figures.append((f"Test ROC per class: {task}", _figure(
                plots.roc_curves(data, task), figures, f"roc_{task}")))
    return section


# --- rendering ------------------------------------------------------------------------------

def render_markdown(title: str, sections: list[Section], out_dir: Path) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for text in section.text:
            lines += [text, ""]
        for caption, table in section.tables:
            if caption:
                lines += [f"**{caption}**", ""]
            lines += [to_markdown(table), ""]
        for caption, path in section.figures:
            lines += [f"![{caption}]({path.relative_to(out_dir).as_posix()})", ""]
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1400px;
 padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #1f77b4;padding-bottom:.2em}
h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.15em}
.tablewrap{overflow-x:auto;margin:.6em 0 1.4em}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;white-space:nowrap}
th{background:#f0f4f8} th.group{text-align:center;background:#dde8f3}
tr:nth-child(even) td{background:#fafafa}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
figure{margin:1em 0 2em} figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:13px} code{background:#f3f3f3;padding:0 3px}
.summary{font-size:1.15em}
"""


def _inline(text: str) -> str:
    """The little Markdown the sections use (**bold**, `code`) as HTML, escaped."""
    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


def _html_header(table: pd.DataFrame) -> str:
    """One header row, or two where columns are grouped (label fraction over its fields)."""
    if not isinstance(table.columns, pd.MultiIndex):
        return "<tr>" + "".join(f"<th>{html.escape(str(c))}</th>"
                                for c in flatten_columns(table).columns) + "</tr>"
    index = [str(n) for n in table.index.names] if any(table.index.names) else []
    top = "".join(f"<th rowspan='2'>{html.escape(n)}</th>" for n in index)
    for group in dict.fromkeys(c[0] for c in table.columns):
        width = sum(1 for c in table.columns if c[0] == group)
        top += f"<th colspan='{width}' class='group'>{html.escape(str(group))}</th>"
    fields = "".join(f"<th>{html.escape(str(c[-1]))}</th>" for c in table.columns)
    return f"<tr>{top}</tr><tr>{fields}</tr>"


def _html_table(caption: str, table: pd.DataFrame) -> str:
    flat = flatten_columns(table)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(format_cell(v))}</td>" for v in row)
                   + "</tr>" for row in flat.itertuples(index=False))
    if flat.empty:
        rows = f"<tr><td colspan='{max(1, len(flat.columns))}'>(no rows)</td></tr>"
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return (f"<div class='tablewrap'><table>{cap}<thead>{_html_header(table)}</thead>"
            f"<tbody>{rows}</tbody></table></div>")


def _html_figure(caption: str, path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def render_html(title: str, sections: list[Section]) -> str:
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts += [f"<p>{_inline(t)}</p>" for t in section.text]
        parts += [_html_table(c, t) for c, t in section.tables]
        parts += [_html_figure(c, p) for c, p in section.figures]
    parts.append("</body></html>")
    return "\n".join(parts)
