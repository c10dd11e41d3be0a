"""Analysis reads what the writer logs, by `contract.schema`: declared param types, the `kind` tag,
the task factors of arm runs, and the runs `best_configs` names."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from analysis.runs import best_configs, load_runs, run_record
from analysis.study_data import build_tables
from contract.schema import (
    PARAM_KINDS,
    PARENT,
    TASK_FACTORS,
    TRUE,
    Level,
    Metric,
    Param,
    Phase,
    Tag,
    metric,
    tag,
)
from tests.synthetic_study import T0, SyntheticTask, open_arm, shared_study, write_synthetic_study

ROOT = Path(__file__).resolve().parents[1]
PENDING = SyntheticTask("mrm", "rsna", 1.0, 1.0, 1.0, split_seed=3)  # an arm with no trial yet


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return shared_study(tmp_path_factory)


@pytest.fixture(scope="module")
def runs(study) -> pd.DataFrame:
    return load_runs(study.tracking_uri, study.experiment)


@pytest.fixture(scope="module")
def custom(study) -> pd.DataFrame:
    """A study whose arms use search spaces no registry knows, plus a LoRA arm just opened
    (no trial written yet) for a task of its own."""
    small = write_synthetic_study(study.root, "custom-spaces", tasks=(SyntheticTask(
        "mrm", "nih", 0.01, 1.0, 1.0),), trials=3, seeds=1, tracking_uri=study.tracking_uri,
        spaces={"lora": "my_lora_space", "fft": "my_fft_space"})
    first = load_runs(small.tracking_uri, small.experiment)
    parent = first.loc[first[tag(Tag.LEVEL)] == Level.STUDY, "run_id"].iloc[0]
    client = MlflowClient(small.tracking_uri)
    exp_id = client.get_experiment_by_name(small.experiment).experiment_id
    open_arm(client, exp_id, [T0], parent, PENDING, "lora_wide", "lora", "my_wide_space",
             max_t=small.max_t, trials=4)
    return load_runs(small.tracking_uri, small.experiment)


def _is(value, kind: type) -> bool:
    return value is None or (isinstance(value, kind) and not (
        kind is not bool and isinstance(value, bool)))


def test_params_come_back_with_their_declared_types(study, runs):
    levels = runs[tag(Tag.LEVEL)]
    lora = runs[(runs[tag(Tag.KIND)] == "lora") & runs[tag(Tag.TRIAL_ID)].notna()]
    fft = runs[(runs[tag(Tag.KIND)] == "fft") & runs[tag(Tag.TRIAL_ID)].notna()]
    picked = [runs.loc[levels == Level.STUDY, "run_id"].iloc[0],
              runs.loc[levels == Level.ARM, "run_id"].iloc[0],
              lora["run_id"].iloc[0], fft["run_id"].iloc[0]]
    records = [run_record(study.tracking_uri, run_id)[0] for run_id in picked]
    for params in records:
        wrong = {k: v for k, v in params.items() if not _is(v, PARAM_KINDS[k])}
        assert not wrong, f"params not of their declared type: {wrong}"
    study_params, arm_params, trial, full = records
    assert isinstance(study_params["final_seeds"], int) and study_params["arms"] == ["lora", "fft"]
    assert arm_params[Param.PRESET] == {Param.LR: 0.05}
    assert isinstance(arm_params[Param.SPLIT_SEED], int)
    assert type(trial[Param.RANK]) is int and type(trial[Param.ALPHA]) is float
    assert type(trial[Param.LABEL_FRACTION]) is float and type(trial[Param.TARGETS]) is str
    assert trial[Param.KIND] == "lora" and full[Param.KIND] == "fft"
    assert Param.RANK not in full  # a full fine-tune logs no LoRA params at all
    # In the frame: every integer param a nullable integer column, every float one a float.
    for name, kind in PARAM_KINDS.items():
        if name in runs and kind in (int, float):
            assert str(runs[name].dtype) == ("Int64" if kind is int else "float64"), name
    assert runs.loc[fft.index, Param.RANK].isna().all()


def test_best_configs_name_the_final_runs(study, runs):
    best = best_configs(runs)
    assert len(best) == 2 * len(study.tasks)
    by_id = runs.set_index("run_id")
    for row in best.itertuples():
        finals = by_id.loc[row.final_run_ids]
        assert len(finals) == study.seeds and (finals[tag(Tag.PHASE)] == Phase.FINAL).all()
        assert (finals[tag(Tag.TASK)] == row.task).all() and (finals[tag(Tag.ARM)] == row.arm).all()
        assert list(finals[Param.SEED]) == sorted(finals[Param.SEED])
        assert row.run_id == row.final_run_ids[0]  # the lowest seed: a final run, not a trial
        search = by_id.loc[row.search_run_id]
        assert search[tag(Tag.PHASE)] == Phase.SEARCH and pd.notna(search[tag(Tag.TRIAL_ID)])
        trials = runs[(runs[tag(Tag.PHASE)] == Phase.SEARCH) & (runs[tag(Tag.ARM)] == row.arm)
                      & (runs[tag(Tag.TASK)] == row.task)]
        assert search[metric(Metric.BEST_VAL_AUROC)] == trials[
            metric(Metric.BEST_VAL_AUROC)].max()
        assert row.kind == row.arm  # the synthetic arms are named after their kind
    lora = best[best["kind"] == "lora"].iloc[0]
    assert type(lora["config"][Param.RANK]) is int and type(lora["config"][Param.LR]) is float
    assert '"rank": ' + str(lora["config"][Param.RANK]) in json.dumps(
        best.to_dict(orient="records"), default=str)  # `cxr-study best --json` prints an int
    # Before the final phase the search trial is all there is.
    searched = best_configs(runs[runs[tag(Tag.PHASE)] != Phase.FINAL])
    assert (searched["run_id"] == searched["search_run_id"]).all()
    assert (searched["final_run_ids"].map(len) == 0).all()


def test_kind_comes_from_the_kind_tag_not_the_space_or_a_rank(custom):
    tables = build_tables(custom)
    arms = tables["arms"].set_index("arm")
    assert arms.loc["fft", "kind"] == "fft" and arms.loc["fft", "space"] == "my_fft_space"
    assert arms.loc["lora", "kind"] == "lora"
    assert arms.loc["lora_wide", "kind"] == "lora"  # no trial (no rank) yet, space unknown
    trials = tables["trials"]
    fft = trials[trials["arm"] == "fft"]
    assert len(fft) and (fft["kind"] == "fft").all() and fft[Param.RANK].isna().all()
    assert (trials.loc[trials["arm"] == "lora", "kind"] == "lora").all()
    assert tables["finals"].groupby("arm")["kind"].first().to_dict() == {"fft": "fft",
                                                                         "lora": "lora"}
    best = best_configs(custom).set_index("arm")
    assert best.loc["fft", "kind"] == "fft" and Param.RANK not in best.loc["fft", "config"]
    assert best.loc["lora", "kind"] == "lora"


def test_arm_rows_carry_the_task_factors_from_their_own_params(runs, custom):
    arms = build_tables(runs)["arms"]
    for row in arms.itertuples():
        own = runs.loc[runs["run_id"] == row.run_id].iloc[0]
        assert [getattr(row, f) for f in TASK_FACTORS] == [own[f] for f in TASK_FACTORS]
    assert str(arms[Param.SPLIT_SEED].dtype) == "Int64"
    assert str(arms[Param.LABEL_FRACTION].dtype) == "float64"
    assert (arms[Tag.TRIALS] == 6).all()  # the trial count is the arm run's tag
    pending = build_tables(custom)["arms"].set_index("arm").loc["lora_wide"]
    assert (pending[Param.FOUNDATION], pending[Param.DATASET]) == ("mrm", "rsna")
    assert pending[Param.LABEL_FRACTION] == 1.0 and pending[Param.SPLIT_SEED] == 3
    assert pending["task"] == PENDING.key and pending[Tag.TRIALS] == 4


def _legacy_store(uri: str, root: Path) -> pd.DataFrame:
    """Runs as an older version wrote them: no `kind` tag or param, FFT trials with rank=0,
    arm runs without task factors and with a `trials` param."""
    client = MlflowClient(uri)
    exp = client.create_experiment("legacy", artifact_location=(root / "legacy").as_uri())
    study = client.create_run(exp, tags={Tag.LEVEL: Level.STUDY}).info.run_id
    task = SyntheticTask("mrm", "nih", 0.01, 1.0, 1.0)
    for arm, space, rank in (("fft", "fft", 0), ("fft_custom", "old_fft_space", 0),
                             ("lora_custom", "old_lora_space", 4)):
        tags = {Tag.ARM: arm, Tag.TASK: task.key, Tag.PHASE: Phase.SEARCH}
        arm_run = client.create_run(exp, tags={**tags, PARENT: study, Tag.LEVEL: Level.ARM,
                                               Tag.SPACE: space}).info.run_id
        for name, value in ((Param.SPACE, space), (Tag.TRIALS, 2), (Param.MAX_T, 4)):
            client.log_param(arm_run, name, str(value))
        for i in range(2):
            trial = client.create_run(exp, tags={**tags, PARENT: arm_run,
                                                 Tag.TRIAL_ID: f"{arm}_{i}",
                                                 Tag.TRIAL_INDEX: str(i + 1),
                                                 Tag.STOPPED_EARLY: TRUE}).info.run_id
            for name, value in ((Param.ARM, arm), (Param.TASK, task.key),
                                (Param.FOUNDATION, task.foundation),
                                (Param.DATASET, task.dataset),
                                (Param.LABEL_FRACTION, task.label_fraction),
                                (Param.SPLIT_SEED, 0), (Param.RANK, rank),
                                (Param.LR, 0.01 * (i + 1)), (Param.SEED, 0)):
                client.log_param(trial, name, str(value))
            client.log_metric(trial, Metric.BEST_VAL_AUROC, 0.7 + 0.1 * i)
            client.set_terminated(trial, "FINISHED")
    return load_runs(uri, "legacy")


def test_runs_of_older_versions_keep_their_kind_and_factors(study):
    legacy = _legacy_store(study.tracking_uri, study.root)
    tables = build_tables(legacy)
    kinds = tables["arms"].set_index("arm")["kind"].to_dict()
    # rank=0 was how older versions logged full fine-tuning: it is not a LoRA rank.
    assert kinds == {"fft": "fft", "fft_custom": "fft", "lora_custom": "lora"}
    assert tables["trials"].groupby("arm")["kind"].first().to_dict() == kinds
    assert (tables["arms"][Param.FOUNDATION] == "mrm").all()  # taken from the trials
    assert (tables["arms"][Param.SPLIT_SEED] == 0).all()
    assert (tables["arms"][Tag.TRIALS] == 2).all()  # the old `trials` param
    best = best_configs(legacy).set_index("arm")
    assert best["kind"].to_dict() == kinds and best.loc["fft", "config"][Param.RANK] == 0


def _literals(path: Path) -> list[tuple[int, str]]:
    """String constants of a module that are not docstrings (f-string parts included)."""
    tree = ast.parse(path.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant)
            and isinstance(n.value, str) and id(n) not in docs]


def test_analysis_spells_no_mlflow_column_or_tag_itself():
    """Tag, metric and parent columns are built from `contract.schema`, never written out."""
    files = [*sorted((ROOT / "analysis").glob("*.py")), ROOT / "tests" / "synthetic_study.py"]
    found = [f"{path.relative_to(ROOT)}:{line}: {text!r}" for path in files
             for line, text in _literals(path)
             if text.startswith(("tag.", "metric.")) or PARENT.split(".")[-1] in text]
    assert not found, "\n".join(found)
