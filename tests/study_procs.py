"""Helpers for tests that run real studies in their own driver processes and stop them the hard
way: a tiny study file, the CLI in a subprocess, waiting on what MLflow shows, and killing a
driver with everything it started (as a reboot would)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from mlflow.tracking import MlflowClient

TINY = """
[study]
name = "{name}"
storage = "run"
[tasks]
foundations = [{{ name = "demo" }}]
datasets = [{{ name = "nih", root = "{root}", splits = "lists", list_dir = "{root}" }}]
label_fractions = {fractions}
[arms.lora]
space = "lora"
trials = {trials}
{extra_arms}
[search]
max_t = {max_t}
grace_period = {grace}
reduction_factor = 2
[train]
batch_size = 32
warmup_epochs = 1
[final]
seeds = {seeds}
{tracking}
"""


def write_study(folder: Path, root: Path, name: str = "tiny", trials: int = 3, max_t: int = 3,
                seeds: int = 1, fractions: str = "[1.0]", extra_arms: str = "",
                tracking: str = "", grace: int = 1) -> Path:
    """A study of the demo foundation on phantom NIH data; `grace = max_t` turns ASHA's
    early stopping off (every trial runs to max_t)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.toml"
    path.write_text(TINY.format(name=name, root=root, trials=trials, max_t=max_t, seeds=seeds,
                                fractions=fractions, extra_arms=extra_arms, tracking=tracking,
                                grace=grace))
    return path


def start_cli(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`cxr-study ARGS` as its own process group, output to `log`."""
    env = dict(env or os.environ, PYTHONUNBUFFERED="1")
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "study", *args], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)


def run_cli(*args: str, log: Path, timeout: float = 600,
            env: dict[str, str] | None = None) -> int:
    proc = start_cli(*args, log=log, env=env)
    try:
        return proc.wait(timeout=timeout)
    finally:
        kill_tree(proc)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_matching(text: str) -> None:
    """Kill every process whose command line mentions `text` (e.g. a Ray temp dir)."""
    victims = [p for p in psutil.process_iter(["cmdline"])
               if any(text in part for part in (p.info["cmdline"] or []))]
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Kill a driver and every process it started (Ray's included): a crash or a reboot."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in [psutil.Process(proc.pid)] if proc.poll() is None else []:
        family.append(p)
    for p in family:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)
    proc.wait(timeout=30)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, log: Path,
             timeout: float = 300) -> None:
    """Poll `condition` until it holds; fail with the driver's log if the driver ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"driver ended ({proc.returncode}) first:\n"
                                 f"{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def trial_runs(uri: str, experiment: str) -> list:
    """Every MLflow trial run (search and final) of the experiment; [] before it exists."""
    client = MlflowClient(uri)
    try:
        exp = client.get_experiment_by_name(experiment)
    except Exception:  # noqa: BLE001 - the store may be mid-creation
        return []
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id], max_results=10000)
            if "trial_id" in r.data.tags]


def epochs_logged(uri: str, run_id: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, "val_auroc"))


def running_after_epoch(uri: str, experiment: str, phase: str = "search"
                        ) -> Callable[[], bool]:
    """True once a trial that is still running has logged at least one epoch: stopping the
    driver now leaves a trial that must continue from a checkpoint."""
    def check() -> bool:
        return any(r.info.status == "RUNNING" and "val_auroc" in r.data.metrics
                   and r.data.tags.get("phase") == phase
                   for r in trial_runs(uri, experiment))
    return check


def ctrl_c(proc: subprocess.Popen) -> None:
    """What a terminal does on Ctrl-C: SIGINT to the driver's whole process group."""
    os.killpg(proc.pid, signal.SIGINT)
