"""A real two-node Ray cluster on this machine (`ray start --head` plus `ray start --address`,
one CPU each, token authentication with one shared token) running a tiny study through
`cxr-study run --address`. Only processes these tests start are stopped, by process id."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.study_procs import (
    epochs_logged,
    free_port,
    kill_matching,
    kill_tree,
    run_cli,
    trial_runs,
    write_study,
)

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))


def _active_nodes(address: str, env: dict[str, str]) -> int:
    status = subprocess.run([RAY, "status", "--address", address], env=env,
                            capture_output=True, text=True, timeout=60)
    if status.returncode != 0 or "Active:" not in status.stdout:
        return 0
    active = status.stdout.split("Active:")[1].split("Pending:")[0]
    return sum(1 for line in active.splitlines() if "node_" in line)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths are limited
    logs = tmp_path_factory.mktemp("cluster")
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
              "--object-store-memory", "400000000", "--temp-dir", temp,
              "--disable-usage-stats"]
    nodes: list[subprocess.Popen] = []

    def start(*args: str, log: str) -> None:
        with open(logs / log, "wb") as out:
            nodes.append(subprocess.Popen([RAY, "start", *args, *common], env=env,
                                          stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    try:
        start("--head", "--port", str(port), "--dashboard-host", "127.0.0.1",
              "--dashboard-port", str(free_port()), "--include-dashboard", "true", log="head")
        _wait(lambda: _active_nodes(address, env) == 1, logs / "head")
        start("--address", address, log="worker")
        _wait(lambda: _active_nodes(address, env) == 2, logs / "worker")
        yield {"address": address, "env": env}
    finally:
        for node in reversed(nodes):
            kill_tree(node)
        kill_matching(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _wait(condition, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(1)


def test_study_runs_across_both_nodes(cluster, phantom_root, tmp_path):
    study = write_study(tmp_path, phantom_root, name="clustered", trials=2, max_t=2, seeds=0,
                        grace=2)
    log = tmp_path / "driver.log"
    rc = run_cli("run", str(study), "--address", cluster["address"], log=log,
                 env=cluster["env"])
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "cluster of 2 nodes: storage, cache and checkpoints visible from every node" in text
    uri = f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    runs = trial_runs(uri, "clustered")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    # One CPU per node and two concurrent trials: each node ran one.
    assert len({r.data.tags["node"] for r in runs}) == 2
    for run in runs:
        assert epochs_logged(uri, run.info.run_id) == [1, 2]


def test_a_worker_no_node_can_hold_is_refused(cluster, phantom_root, tmp_path):
    study = write_study(tmp_path, phantom_root, name="too-big", trials=1, max_t=2, seeds=0)
    study.write_text(study.read_text() + "[resources]\nnum_workers = 1\ncpus_per_worker = 2\n")
    log = tmp_path / "driver.log"
    rc = run_cli("run", str(study), "--address", cluster["address"], log=log,
                 env=cluster["env"])
    errors = [ln for ln in log.read_text().splitlines() if ln.startswith("cxr-study: error")]
    assert rc == 2 and len(errors) == 1, log.read_text()[-2000:]
    assert "cpus_per_worker" in errors[0] and "most on one node: 1 CPU" in errors[0]
    assert "Traceback" not in log.read_text()
    assert not (tmp_path / "run" / "mlflow.db").exists()  # refused before any tracking
