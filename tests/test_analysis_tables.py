"""The LoRA-vs-FFT table and its companions on a synthetic study with a known answer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from analysis import tables
from analysis.plots import pareto_front
from analysis.study_data import load_study
from contract.errors import ConfigError
from tests.synthetic_study import shared_study


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    study = shared_study(tmp_path_factory)
    return load_study(study.tracking_uri, study.experiment)


@pytest.fixture(scope="module")
def comparison(data):
    return tables.compare_arms(data, n_boot=300, seed=0)


def test_comparison_finds_the_planted_winner(comparison):
    assert len(comparison) == 2
    first, second = comparison.iloc[0], comparison.iloc[1]
    assert first["label_fraction"] == 0.01 and first["verdict"] == "LoRA better"
    assert 0 < first["ci_low"] < first["diff"] < first["ci_high"]
    assert not second["significant"] and second["ci_low"] < 0 < second["ci_high"]
    assert (comparison["p_holm"] >= comparison["p_value"]).all()
    assert (comparison["lora_seeds"] == 2).all() and (comparison["n_test_patients"] == 90).all()
    # The point difference is the difference of the logged test AUROCs (same definition).
    assert first["diff"] == pytest.approx(first["lora_mean"] - first["fft_mean"], abs=1e-9)
    assert tables.summary_line(comparison) == "LoRA wins 1 of 2 tasks (1 significant)"


def test_paper_table_shape_markdown_and_latex(comparison):
    table = tables.paper_table(comparison, reference=True)
    assert table.index.names == ["foundation", "dataset"] and len(table) == 1
    assert list(dict.fromkeys(table.columns.get_level_values(0))) == ["1%", "10%"]
    fields = list(table["1%"].columns)
    assert fields[:4] == ["LoRA", "FFT", "Δ [95% CI]", "verdict"]
    assert table.loc[("mrm", "nih"), ("1%", "FFT (published)")] == "79.4"
    assert table.loc[("mrm", "nih"), ("1%", "LoRA (published)")] == "80.6"
    assert table.loc[("mrm", "nih"), ("1%", "Δ [95% CI]")].endswith("*")
    assert "±" in table.loc[("mrm", "nih"), ("1%", "LoRA")]
    plain = tables.paper_table(comparison)
    assert "FFT (published)" not in plain["1%"].columns
    markdown = tables.to_markdown(table)
    assert markdown.count("\n") == 2 and "| 1% LoRA |" in markdown
    latex = tables.to_latex(table, caption=tables.summary_line(comparison))
    assert r"\multicolumn{" in latex and r"$\Delta$" in latex and r"1\%" in latex
    assert latex.count(r"\\") >= 3


def test_split_draws_show_their_own_spread(data, comparison):
    finals = data.finals.copy()
    twin = finals.assign(split_seed=1, task=finals["task"].str.replace("-s0", "-s1"))
    doubled = dataclasses.replace(data, finals=pd.concat([finals, twin], ignore_index=True))
    again = tables.compare_arms(doubled, n_boot=100)
    assert (again["draws"] == 2).all()
    assert again["lora_sd_draws"].fillna(0).eq(0).all()  # identical draws: no draw spread
    assert again["diff"].to_numpy() == pytest.approx(comparison["diff"].to_numpy())
    assert "sd across draws" in tables.paper_table(again)["1%"].columns


def test_arm_choice_is_explicit_when_ambiguous(data):
    assert tables.pick_arms(data) == ("lora", "fft")
    extra = data.arms.iloc[[0]].assign(arm="lora_big", kind="lora")
    ambiguous = dataclasses.replace(data, arms=pd.concat([data.arms, extra]))
    with pytest.raises(ConfigError, match="--lora-arm"):
        tables.pick_arms(ambiguous)
    assert tables.pick_arms(ambiguous, lora_arm="lora_big") == ("lora_big", "fft")
    with pytest.raises(ConfigError, match="not an arm"):
        tables.pick_arms(data, fft_arm="nope")


def test_compute_gap_calibration_and_class_tables(data):
    compute = tables.compute_table(data)
    assert len(compute) == 4 and (compute["trials"] == 6).all()
    assert (compute["epochs"] <= compute["epoch_budget"]).all()
    totals = tables.compute_totals(compute)
    assert set(totals["arm"]) == {"lora", "fft"} and (totals["trials"] == 12).all()
    asha = tables.asha_accounting(data)
    assert (asha["epochs_spent"] == compute.set_index(["task", "arm"]).loc[
        list(zip(asha["task"], asha["arm"])), "epochs"].to_numpy()).all()
    assert (asha["epochs_to_best"] <= asha["epochs_spent"]).all()
    gap = tables.val_test_gap(data)
    assert np.allclose(gap["gap"], gap["search_val"] - gap["test"])
    ece = tables.calibration_table(data)
    assert len(ece) == 4 and ece["ece_mean"].between(0, 1).all() and (ece["seeds"] == 2).all()
    per_class = tables.per_class_table(data)
    assert len(per_class) == 2 * 3 and {"lora", "fft"} <= set(per_class.columns)
    assert tables.subgroup_table(data).empty  # the synthetic predictions carry no subgroups
    best = tables.best_config_table(data)
    assert len(best) == 4 and best["config"].str.contains("lr=").all()


def test_pareto_front_keeps_only_undominated_points():
    params = [1, 2, 3, 4, 5]
    auroc = [0.70, 0.65, 0.80, 0.80, 0.90]
    assert pareto_front(params, auroc).tolist() == [True, False, True, False, True]


def test_without_saved_predictions_the_means_stand_but_no_ci(data, monkeypatch):
    monkeypatch.setattr(type(data), "predictions", lambda self, run_id: None)
    bare = tables.compare_arms(data, n_boot=100)
    assert bare["ci_low"].isna().all() and (bare["verdict"] == "no test predictions").all()
    assert np.allclose(bare["diff"], bare["lora_mean"] - bare["fft_mean"])
    assert tables.summary_line(bare) == "LoRA wins 1 of 2 tasks (0 significant)"
