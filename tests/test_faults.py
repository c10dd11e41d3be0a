"""Faults a long study meets on a shared machine, each survived or reported, never silent:
two studies writing one MLflow sqlite store at once, one with a Train worker process killed
mid-trial, the other with a diverging trial. (The driver SIGKILL, Ctrl-C,
damaged checkpoint, MLflow outage and full disk cases live in test_study_resume.py,
test_study_state.py, test_tracking_server.py and test_cache.py.)"""

from __future__ import annotations

import sqlite3

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.study_procs import (
    epochs_logged,
    kill_tree,
    running_after_epoch,
    start_cli,
    trial_runs,
    wait_for,
    write_study,
)

pytestmark = pytest.mark.slow


def _trial_workers(driver) -> list[psutil.Process]:
    """The processes running the driver's trials. A one-worker trial runs its fit loop in Ray
    Train's local mode inside the Tune trial's own process, titled after Tune's function
    trainable class: that process is the worker."""
    return [p for p in psutil.Process(driver.pid).children(recursive=True)
            if "ImplicitFunc" in " ".join(p.cmdline())]


BOOM = '[arms.boom]\nspace = "lora"\ntrials = 1\noptimizer = "sgd"\nfixed = { lr = 1e30 }\n'
LEFT_MAX_T = 8  # long enough that the worker kill lands mid-trial


@pytest.fixture(scope="module")
def shared_store(phantom_root, tmp_path_factory):
    """Two studies at once writing one MLflow sqlite store: `left` one trial whose Train worker
    process is killed after its first epoch, `right` a search with a diverging arm (`boom`, SGD
    at lr 1e30) beside a healthy one, then its final phase. Each driver is a real `cxr-study`
    process."""
    root = tmp_path_factory.mktemp("shared")
    store = root / "shared" / "mlflow.db"
    store.parent.mkdir()
    uri = f"sqlite:///{store}"
    tracking = f'[tracking]\nuri = "{uri}"\n'
    studies = {"left": dict(trials=1, seeds=0, max_t=LEFT_MAX_T, grace=LEFT_MAX_T),
               "right": dict(trials=1, extra_arms=BOOM, max_t=2, grace=2)}
    drivers = {}
    for name, options in studies.items():
        study = write_study(root / name, phantom_root, name=name, tracking=tracking, **options)
        log = root / f"{name}.log"
        drivers[name] = (start_cli("run", str(study), "--no-report", log=log), log)
    try:
        left, left_log = drivers["left"]
        wait_for(running_after_epoch(uri, "left"), left, left_log)
        workers = _trial_workers(left)
        for worker in workers:
            worker.kill()
        codes = {name: proc.wait(timeout=900) for name, (proc, _) in drivers.items()}
    finally:
        for proc, _ in drivers.values():
            kill_tree(proc)
    return {"store": store, "uri": uri, "root": root, "codes": codes, "killed": len(workers),
            "logs": {name: log for name, (_, log) in drivers.items()}}


def test_killed_train_worker_resumes_from_its_checkpoint(shared_store):
    uri, log = shared_store["uri"], shared_store["logs"]["left"]
    assert shared_store["killed"] == 1
    assert shared_store["codes"]["left"] == 0, log.read_text()[-3000:]
    (run,) = trial_runs(uri, "left")
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    assert epochs_logged(uri, run.info.run_id) == list(range(1, LEFT_MAX_T + 1))
    assert 1 <= run.data.metrics["resumed_from_epoch"] < LEFT_MAX_T


def test_diverging_trial_fails_at_once_and_the_study_goes_on(shared_store):
    uri, root = shared_store["uri"], shared_store["root"]
    log = shared_store["logs"]["right"].read_text()
    errors = [ln for ln in log.splitlines() if ln.startswith("cxr-study: error")]
    assert shared_store["codes"]["right"] == 2 and len(errors) == 1 and "boom" in errors[0], (
        log[-3000:])
    runs = trial_runs(uri, "right")
    (failed,) = [r for r in runs if r.data.tags["arm"] == "boom"]
    assert failed.info.status == "FAILED"
    assert "loss became" in failed.data.tags["error"]
    assert failed.data.tags["epochs_run"] == "0"  # stopped in its first epoch
    assert epochs_logged(uri, failed.info.run_id) == []
    ok = [r for r in runs if r.data.tags["arm"] == "lora"]
    assert {r.data.tags["phase"] for r in ok} == {"search", "final"}
    assert all(r.info.status == "FINISHED" for r in ok)
    storage = f"sqlite:///{root / 'right' / 'run' / 'optuna.db'}"
    told = optuna.load_study(study_name="right/demo-nih-1-s0/boom", storage=storage).trials
    assert [t.state for t in told] == [optuna.trial.TrialState.FAIL]  # the searcher knows
    markers = list((root / "right" / "run" / "train").glob("train-*/diverged.txt"))
    assert len(markers) == 1 and "loss became" in markers[0].read_text()


def test_two_studies_share_one_sqlite_store(shared_store):
    uri = shared_store["uri"]
    assert shared_store["codes"]["left"] == 0, shared_store["logs"]["left"].read_text()[-2000:]
    for run in trial_runs(uri, "right"):  # every epoch once (left's: checked above)
        if run.info.status == "FINISHED" and run.data.tags["phase"] == "search":
            assert epochs_logged(uri, run.info.run_id) == [1, 2]
    client = MlflowClient(uri)
    for name, count in (("left", 3), ("right", 6)):  # study, arms, trials: none lost or doubled
        exp = client.get_experiment_by_name(name)
        assert len(client.search_runs([exp.experiment_id])) == count, name
    with sqlite3.connect(shared_store["store"]) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
