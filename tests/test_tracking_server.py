"""A real `mlflow server` on 127.0.0.1 as the study's tracking URI: refused cleanly when it is
not there at start; when it goes away mid-study, nothing is dropped (records wait in the
study's backlog, the driver stops with a one-line error) and `--resume` after a restart writes
everything exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from study.cli import main
from tests.study_procs import (
    epochs_logged,
    free_port,
    kill_tree,
    run_cli,
    start_cli,
    trial_runs,
    wait_for,
    write_study,
)

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def start_server(folder: Path, port: int) -> subprocess.Popen:
    """`mlflow server` bound to 127.0.0.1 with a sqlite store; returns once it is healthy."""
    with open(folder / "server.log", "ab") as out:
        proc = subprocess.Popen(
            [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
             "--artifacts-destination", str(folder / "artifacts")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return proc
        except requests.RequestException:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (
            (folder / "server.log").read_text()[-2000:])
        time.sleep(0.5)


def test_unreachable_server_is_refused_before_anything_is_written(capsys, tmp_path,
                                                                    phantom_root):
    uri = f"http://127.0.0.1:{free_port()}"
    study = write_study(tmp_path, phantom_root, tracking=f'[tracking]\nuri = "{uri}"\n')
    assert main(["run", str(study)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and uri in err[0] and "start it" in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_server_lost_mid_study_then_resumed_writes_everything_once(tmp_path, phantom_root):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    study = write_study(tmp_path, phantom_root, name="served", trials=2, max_t=2, grace=2,
                        tracking=f'[tracking]\nuri = "{uri}"\n')
    log = tmp_path / "driver.log"
    # A refused connection fails at once instead of after MLflow's retries and back-off.
    env = dict(os.environ, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    driver = start_cli("run", str(study), "--no-report", log=log, env=env)
    try:
        wait_for(lambda: any("val_auroc" in r.data.metrics for r in trial_runs(uri, "served")),
                 driver, log)
        kill_tree(server)  # the server goes away while trials are training
        rc = driver.wait(timeout=600)
    finally:
        kill_tree(driver)
    errors = [ln for ln in log.read_text().splitlines() if ln.startswith("cxr-study: error")]
    assert rc == 2 and len(errors) == 1, log.read_text()[-3000:]
    assert "are kept in" in errors[0] and "--resume" in errors[0]
    backlog = list((tmp_path / "run" / "tracking_backlog").glob("*.jsonl"))
    assert backlog and backlog[0].read_text().strip()

    server = start_server(tmp_path, port)
    try:
        rc = run_cli("run", str(study), "--resume", "--no-report", log=log)
        assert rc == 0, log.read_text()[-3000:]
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("served")
        runs = client.search_runs([exp.experiment_id])
        assert all(r.info.status == "FINISHED" for r in runs)
        trials = trial_runs(uri, "served")
        search = [r for r in trials if r.data.tags["phase"] == "search"]
        final = [r for r in trials if r.data.tags["phase"] == "final"]
        assert len(search) == 2 and len(final) == 1
        for run in trials:
            assert epochs_logged(uri, run.info.run_id) == [1, 2]
            assert "config.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert not list((tmp_path / "run" / "tracking_backlog").glob("*.jsonl"))
        assert any(a.path.endswith(".parquet")
                   for a in client.list_artifacts(final[0].info.run_id))
    finally:
        kill_tree(server)
