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

import psutil
import pytest

from tests.study_procs import (
    epochs_logged,
    free_port,
    kill_matching,
    kill_tree,
    run_cli,
    start_cli,
    trial_runs,
    wait_for,
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
        yield {"address": address, "env": env, "worker": nodes[1]}
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


def test_a_worker_no_node_can_hold_is_refused(cluster, phantom_root, tmp_path):
    study = write_study(tmp_path, phantom_root, name="too-big", trials=1, max_t=2, seeds=0)
    study.write_text(study.read_text() + "[resources]\nnum_workers = 1\ncpus_per_worker = 2\n")
    log = tmp_path / "driver.log"
    rc = run_cli("run", str(study), "--address", cluster["address"], "--no-report", log=log,
                 env=cluster["env"])
    errors = [ln for ln in log.read_text().splitlines() if ln.startswith("cxr-study: error")]
    assert rc == 2 and len(errors) == 1, log.read_text()[-2000:]
    assert "cpus_per_worker" in errors[0] and "most on one node: 1 CPU" in errors[0]
    assert "Traceback" not in log.read_text()
    assert not (tmp_path / "run" / "mlflow.db").exists()  # refused before any tracking


def _raylet(node_process) -> tuple[psutil.Process, str]:
    """The raylet a `ray start` process launched, and the id of its node."""
    for child in psutil.Process(node_process.pid).children(recursive=True):
        args = child.cmdline()
        if args and Path(args[0]).name == "raylet":
            node_id = next(a.split("=", 1)[1] for a in args if a.startswith("--node_id="))
            return child, node_id
    raise AssertionError("no raylet under the worker node's `ray start`")


def test_study_across_both_nodes_survives_the_worker_node_dying(cluster, phantom_root,
                                                                tmp_path):
    """A study runs a trial on each node (one CPU each); then the worker node dies (its raylet
    killed) while its trial runs. Tune retries that trial on the head node, where it continues
    from its last checkpoint (on storage both nodes see), each epoch logged once, no run left
    RUNNING. Last in this module: the cluster has one node afterwards.

    The trials are long (about 20 s) because a trial process starts seconds later on the
    worker node than on the head, and Tune hands a finished trial's process to a trial still
    waiting for its own: short trials would all run on the head. At 30 epochs (about 14 s)
    that happened once under the whole suite's load."""
    max_t = 45
    study = write_study(tmp_path, phantom_root, name="nodekill", trials=2, max_t=max_t,
                        grace=max_t, seeds=0)
    uri = f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    log = tmp_path / "driver.log"
    raylet, node_id = _raylet(cluster["worker"])

    def running_there() -> bool:
        return any(r.info.status == "RUNNING" and r.data.tags.get("node") == node_id
                   and "val_auroc" in r.data.metrics for r in trial_runs(uri, "nodekill"))
    driver = start_cli("run", str(study), "--address", cluster["address"], "--no-report",
                       log=log, env=cluster["env"])
    try:
        wait_for(running_there, driver, log)
        raylet.kill()
        rc = driver.wait(timeout=600)
    finally:
        kill_tree(driver)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "cluster of 2 nodes: storage, cache and checkpoints visible from every node" in text
    runs = trial_runs(uri, "nodekill")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["node"] for r in runs}) == 2  # each node ran one
    for run in runs:
        assert epochs_logged(uri, run.info.run_id) == list(range(1, max_t + 1))
    (moved,) = [r for r in runs if r.data.tags["node"] == node_id]
    assert 1 <= moved.data.metrics["resumed_from_epoch"] < max_t
