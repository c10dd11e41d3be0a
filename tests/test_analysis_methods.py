"""Every method against a reference arm, on a synthetic four-method study with a planted
winner (partial fine-tuning), a planted loser (the linear probe) and a known Pareto front."""

from __future__ import annotations

import dataclasses
import io
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import plots, report, tables
from analysis.stats import holm
from analysis.study_data import load_study
from contract.errors import ConfigError
from study.cli import main
from tests.synthetic_study import METHODS_WINNER, methods_study

# Holm over 2 tasks x 3 methods needs 6 x (the smallest bootstrap p, 2 / (n + 1)) < 0.05.
N_BOOT = 500


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return methods_study(tmp_path_factory)


@pytest.fixture(scope="module")
def data(study):
    return load_study(study.tracking_uri, study.experiment)


@pytest.fixture(scope="module")
def comparison(data):
    return tables.compare_methods(data, n_boot=N_BOOT, seed=0)


def test_every_method_against_fft_names_the_planted_winner(data, comparison):
    assert comparison.attrs["reference"] == "fft"
    assert len(comparison) == 6 and set(comparison["arm"]) == {"lora", "linear_probe", "partial"}
    # One Holm family across tasks x methods: the smallest p is multiplied by all six.
    assert comparison["p_holm"].to_numpy() == pytest.approx(holm(comparison["p_value"]))
    assert comparison["p_holm"].min() == pytest.approx(6 * comparison["p_value"].min())
    winner = comparison[comparison["arm"] == METHODS_WINNER]
    assert winner["significant"].all() and (winner["verdict"] == "partial better").all()
    assert (winner["ci_low"] > 0).all() and (winner["p_holm"] < 0.05).all()
    probe = comparison[comparison["arm"] == "linear_probe"]
    assert (probe["verdict"] == "fft better").all() and (probe["ci_high"] < 0).all()
    line = tables.methods_summary_line(comparison)
    assert line.startswith("Against fft: partial wins 2 of 2 tasks (2 significant);")
    assert "linear_probe wins 0 of 2 tasks (0 significant, 2 significantly worse)" in line
    # The LoRA rows are the LoRA-vs-FFT table's rows (the same bootstrap); only Holm differs.
    pair = tables.compare_arms(data, n_boot=N_BOOT, seed=0)
    lora = comparison[comparison["arm"] == "lora"]
    for name in ("diff", "ci_low", "ci_high", "p_value"):
        assert lora[name].to_numpy() == pytest.approx(pair[name].to_numpy())


def test_methods_summary_per_task_and_overall(data, comparison):
    per_task, overall = tables.methods_summary(data, comparison)
    assert len(per_task) == 8 and set(per_task["arm"]) == {"fft", "lora", "linear_probe",
                                                            "partial"}
    assert (per_task.loc[per_task["reference"], "verdict"] == "reference").all()
    assert per_task.loc[per_task["reference"], "diff"].isna().all()
    assert np.allclose(per_task["run_s"], per_task["search_s"] + per_task["final_s"])
    top, last = overall.iloc[0], overall.iloc[-1]
    assert top["arm"] == METHODS_WINNER and top["wins"] == top["significant_wins"] == 2
    assert top["trainable_pct"] < 100 and last["arm"] == "fft" and last["reference"]
    assert overall.set_index("arm").loc["linear_probe", "significant_losses"] == 2
    # What each method spent, epochs and run time, is the compute table's: search + finals.
    totals = tables.compute_totals(tables.compute_table(data)).set_index("arm")
    spent = overall.set_index("arm")
    assert np.allclose(spent["epochs"], totals.loc[spent.index, "total_epochs"].astype(float))
    assert np.allclose(spent["run_s"], totals.loc[spent.index, "total_wall_s"])
    assert (totals["kind"] == totals.index).all()  # each arm is named after its method here


def test_the_reference_arm_is_settable(data, comparison):
    against_lora = tables.compare_methods(data, reference_arm="lora", n_boot=100)
    assert against_lora.attrs["reference"] == "lora"
    assert set(against_lora["arm"]) == {"fft", "linear_probe", "partial"}
    fft = against_lora[against_lora["arm"] == "fft"]["diff"].to_numpy()
    lora = comparison[comparison["arm"] == "lora"]["diff"].to_numpy()
    assert fft == pytest.approx(-lora)  # fft - lora, the same test AUROCs
    with pytest.raises(ConfigError, match="--reference-arm 'nope' is not an arm of this study"):
        tables.pick_reference(data, "nope")
    twin = data.arms.iloc[[0]].assign(arm="fft_long", kind="fft")
    two = dataclasses.replace(data, arms=pd.concat([data.arms, twin], ignore_index=True))
    with pytest.raises(ConfigError, match="2 fft arms .* --reference-arm"):
        tables.pick_reference(two)
    assert tables.pick_reference(two, "fft_long") == "fft_long"
    assert tables.pick_arms(data) == ("lora", "fft")  # other kinds leave the pair unambiguous


def test_a_missing_reference_arm_is_a_one_line_error(study, tmp_path, capsys):
    code = main(["report", "--tracking-uri", study.tracking_uri, "--experiment",
                 study.experiment, "--out", str(tmp_path), "--reference-arm", "nope"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--reference-arm 'nope' is not an arm" in err
    assert not (tmp_path / "report.md").exists()


def test_pareto_front_of_the_methods(data):
    # Ties: equal parameters keep the better; equal AUROC with more parameters is dominated.
    assert plots.pareto_front([10, 10, 20, 5, 30], [0.8, 0.7, 0.8, 0.6, np.nan]).tolist() == [
        True, False, False, True, False]
    points = tables.method_points(data)
    assert len(points) == 8
    for _, cell in points.groupby("label_fraction"):
        # linear probe (fewest parameters), LoRA, partial (best); FFT is dominated by partial.
        assert set(cell.loc[cell["pareto"], "arm"]) == {"linear_probe", "lora", "partial"}
    fig = plots.methods_pareto(points)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2
    front = points[points["pareto"] & (points["label_fraction"] == 0.01)].sort_values(
        "trainable_params")
    line = axes[0].get_lines()[0]  # the step through the front
    assert list(line.get_xdata()) == pytest.approx(front["trainable_params"].tolist())


def test_report_renders_the_methods_section(study, tmp_path, monkeypatch):
    """The whole report through the CLI; figures are stubbed (drawing them is what takes time,
    and the default study's report draws every one)."""
    drawn: list[str] = []

    def stub(fig, figures: Path, name: str) -> Path:
        drawn.append(name)
        figures.mkdir(parents=True, exist_ok=True)
        (figures / f"{name}.png").write_bytes(b"png")
        return figures / f"{name}.png"

    monkeypatch.setattr(report, "_figure", stub)
    printed = io.StringIO()
    with redirect_stdout(printed):
        code = main(["report", "--tracking-uri", study.tracking_uri, "--experiment",
                     study.experiment, "--out", str(tmp_path), "--n-boot", str(N_BOOT)])
    assert code == 0
    markdown = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    assert {"methods_pareto", "methods_forest", "forest"} <= set(drawn)
    for needle in ("Fine-tuning methods: synthetic-methods", "Every method vs the reference",
                   "Against fft: partial wins 2 of 2 tasks (2 significant)",
                   "methods summary (all tasks)", "methods summary per task",
                   "partial better", "LoRA vs FFT on test", "compute per method (all tasks)",
                   "total_wall_s", "total_epochs"):
        assert needle in markdown and needle in page, needle
    assert "paper table" in markdown  # one LoRA and one FFT arm: the paper's table stays
    assert "significance" not in markdown  # 500 replicates suffice for six comparisons


def test_too_few_replicates_for_the_holm_family_are_named(data, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "_figure", lambda fig, figures, name: figures / name)
    section = report._methods(data, tmp_path, n_boot=100, seed=0, reference_arm=None)
    warning = [t for t in section.text if "no difference can reach Holm significance" in t]
    assert warning and "use --n-boot 1000 or more" in warning[0]
    assert not any("partial better" in str(v) for _, t in section.tables
                   for v in t.get("verdict", []))


def test_roc_panels_of_many_methods_get_a_row_each_three(data):
    """Four methods need two rows of panels: the figure grows with them instead of squeezing
    both rows into one row's height."""
    task = data.tasks[0]
    fig = plots.roc_curves(data, task)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(shown) == 4
    width, height = fig.get_size_inches()
    assert height == pytest.approx(2 * 4.2) and width == pytest.approx(3 * 4.6)
