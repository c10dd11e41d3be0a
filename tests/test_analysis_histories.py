"""Per-epoch histories in one bulk query per metric, equal to asking run by run."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.tracking import MlflowClient

import analysis.runs as runs
import analysis.study_data as study_data
from analysis.runs import load_runs, metric_histories
from analysis.study_data import EPOCH_METRICS, build_tables, load_study
from tests.synthetic_study import shared_study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return shared_study(tmp_path_factory)


@pytest.fixture(scope="module")
def run_ids(study) -> list[str]:
    tables = build_tables(load_runs(study.tracking_uri, study.experiment))
    return [*tables["finals"]["run_id"], *tables["trials"]["run_id"]]  # not in id order


def test_bulk_histories_equal_the_per_run_calls_row_for_row(study, run_ids, monkeypatch):
    calls = []
    one = MlflowClient.get_metric_history
    monkeypatch.setattr(MlflowClient, "get_metric_history",
                        lambda self, *a: calls.append(a) or one(self, *a))
    bulk = metric_histories(study.tracking_uri, run_ids, EPOCH_METRICS)
    assert calls == []
    monkeypatch.delattr(SqlAlchemyStore, "get_metric_history_bulk")  # as a server's store
    per_run = metric_histories(study.tracking_uri, run_ids, EPOCH_METRICS)
    assert len(calls) == len(run_ids) * len(EPOCH_METRICS) and len(bulk) > len(run_ids)
    pd.testing.assert_frame_equal(bulk, per_run)
    assert list(dict.fromkeys(bulk["run_id"])) == run_ids  # the caller's run order


def test_batches_of_runs_give_the_same_rows(study, run_ids, monkeypatch):
    whole = metric_histories(study.tracking_uri, run_ids, ("val_auroc", "lr"))
    monkeypatch.setattr(runs, "HISTORY_BATCH", 3)
    pd.testing.assert_frame_equal(
        metric_histories(study.tracking_uri, run_ids, ("val_auroc", "lr")), whole)
    assert metric_histories(study.tracking_uri, [], ("val_auroc",)).empty


def test_a_cached_study_fetches_no_history(study, monkeypatch):
    first = load_study(study.tracking_uri, study.experiment)

    def no_fetch(*args, **kwargs):
        raise AssertionError("the cache should have answered")
    monkeypatch.setattr(study_data, "metric_histories", no_fetch)
    again = load_study(study.tracking_uri, study.experiment)
    pd.testing.assert_frame_equal(again.epochs, first.epochs)
