"""Reading a study from MLflow: tidy typed tables, the parquet cache and its refresh."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from analysis.study_data import default_cache_dir, load_study
from contract.errors import ConfigError
from contract.schema import PARENT, Metric, Param, Phase, Tag
from tests.synthetic_study import SyntheticTask, shared_study, write_synthetic_study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return shared_study(tmp_path_factory)


def test_tables_have_one_row_per_run_with_typed_params(study):
    data = load_study(study.tracking_uri, study.experiment)
    tasks, arms = len(study.tasks), 2
    assert len(data.study) == 1
    assert len(data.arms) == tasks * arms
    assert set(data.arms["kind"]) == {"lora", "fft"}
    assert len(data.trials) == tasks * arms * study.trials
    assert len(data.finals) == tasks * arms * study.seeds
    trials = data.trials
    assert str(trials["lr"].dtype) == "float64" and str(trials["rank"].dtype) == "Int64"
    assert str(trials["stopped_early"].dtype) == "boolean"
    assert trials["failed"].sum() == 1 and trials.loc[trials["failed"], "error"].str.contains(
        "out of memory").all()
    assert trials.loc[trials["kind"] == "fft", "rank"].isna().all()
    assert set(data.arms["foundation"]) == {"mrm"}
    assert {"test_auroc", "test_auroc_Atelectasis", "best_epoch"} <= set(data.finals.columns)


def test_epochs_follow_each_run_and_stopped_trials_end_early(study):
    data = load_study(study.tracking_uri, study.experiment)
    last = data.epochs.groupby("run_id")["epoch"].max()
    stopped = data.trials.loc[data.trials["stopped_early"].fillna(False).astype(bool), "run_id"]
    assert len(stopped) and (last[stopped] < study.max_t).all()
    assert (last[data.finals["run_id"]] == study.max_t).all()
    assert data.epochs["val_auroc"].between(0, 1).all()


def test_predictions_come_from_the_run_artifact(study):
    data = load_study(study.tracking_uri, study.experiment)
    frame = data.predictions(data.finals["run_id"].iloc[0])
    assert {"image", "patient", "label_Effusion", "prob_Effusion"} <= set(frame.columns)
    assert frame.groupby("patient")["image"].count().max() <= 3
    assert data.predictions(data.trials["run_id"].iloc[0]) is None  # search trials save none


def test_cache_is_reused_then_refreshed_when_mlflow_has_new_runs(study, monkeypatch):
    small = write_synthetic_study(study.root, "refresh", tasks=(SyntheticTask(
        "mrm", "rsna", 1.0, 1.0, 1.0),), trials=3, seeds=1, tracking_uri=study.tracking_uri)
    first = load_study(small.tracking_uri, small.experiment)
    assert first.cache_dir == default_cache_dir(small.tracking_uri, small.experiment)
    assert (first.cache_dir / "epochs.parquet").is_file()

    def no_fetch(*args, **kwargs):
        raise AssertionError("the cache should have answered")
    monkeypatch.setattr(MlflowClient, "get_metric_history", no_fetch)
    again = load_study(small.tracking_uri, small.experiment)
    assert len(again.trials) == len(first.trials) and len(again.epochs) == len(first.epochs)
    assert again.arms["preset"].iloc[0] == {"lr": 0.05}  # JSON cells survive the cache
    monkeypatch.undo()

    client = MlflowClient(small.tracking_uri)
    exp = client.get_experiment_by_name(small.experiment)
    parent = first.arms["run_id"].iloc[0]
    arm = first.arms.iloc[0]
    run = client.create_run(exp.experiment_id, tags={
        PARENT: parent, Tag.PHASE: Phase.SEARCH, Tag.ARM: arm[Tag.ARM], Tag.TASK: arm[Tag.TASK],
        Tag.KIND: arm[Tag.KIND], Tag.TRIAL_ID: "late_00001", Tag.TRIAL_INDEX: "9"})
    client.log_param(run.info.run_id, Param.LR, "0.01")
    client.log_metric(run.info.run_id, Metric.VAL_AUROC, 0.7, step=1)
    fresh = load_study(small.tracking_uri, small.experiment)
    assert len(fresh.trials) == len(first.trials) + 1
    assert (fresh.epochs["run_id"] == run.info.run_id).sum() == 1


def test_missing_store_or_experiment_is_a_config_error(study, tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_study(study.tracking_uri, "no-such-experiment")
    with pytest.raises(ConfigError, match="does not exist"):
        load_study(f"sqlite:///{tmp_path / 'missing.db'}", "x")
    assert not (tmp_path / "missing.db").exists()


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_analysis_never_imports_ray():
    """Follow analysis/ and every project module it reaches; none may import Ray."""
    root = Path(__file__).resolve().parents[1]
    todo, seen = list((root / "analysis").glob("*.py")), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            assert name != "ray" and not name.startswith("ray."), f"{path} imports {name}"
            parts = name.split(".")
            if parts[0] in ("analysis", "search_spaces", "trainables"):
                module = root.joinpath(*parts)
                todo += [p for p in (module.with_suffix(".py"), module / "__init__.py")
                         if p.is_file()]
    assert len(seen) > 6
