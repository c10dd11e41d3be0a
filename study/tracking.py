"""The one module that writes MLflow.

Hierarchy: a parent run per study, a child run per task x arm, a grandchild run per trial (phase
`search`) and per final seed (phase `final`). A driver-side Tune callback owns the trial runs, so
ASHA-stopped trials end FINISHED with `stopped_early=true`, failed ones FAILED with the error,
and nothing is left RUNNING (Ray's own MLflow integrations do neither reliably).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import mlflow
import requests
import sqlalchemy.exc
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from trainables.errors import ConfigError, StudyError

PARENT_TAG = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment without this tag in its GenAI view ("0 traces"); a study's
# experiment is model training, so the UI lands on its runs.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# Metrics reported per epoch that are not worth a time series of their own.
_SKIP_METRICS = {"epoch", "training_iteration", "time_this_iter_s", "time_total_s",
                 "timestamp", "time_since_restore", "iterations_since_restore", "pid"}


def connect(uri: str, experiment: str, storage: Path) -> tuple[MlflowClient, str]:
    """Client and experiment id; an unreachable server is a ConfigError before any training.

    With a local store, a new experiment keeps its artifacts under the study directory
    (MLflow's default would be `./mlruns` of whatever folder the command ran in); a tracking
    server decides for itself.
    """
    local = is_local(uri)
    if not local:
        # A study must not stall for minutes inside MLflow's retry loop when a server is away:
        # the tracker keeps what it could not write and says so (the user may set these).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        _check_server(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    artifacts = (storage / "mlartifacts").resolve().as_uri() if local else None
    # Two studies starting at once on one sqlite store race to create its tables and their
    # experiments ("database is locked", "already exists"): a few quick retries settle it.
    for attempt in range(5):
        try:
            found = client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found else client.create_experiment(
                experiment, artifact_location=artifacts, tags=dict([EXPERIMENT_KIND]))
            if found and EXPERIMENT_KIND[0] not in found.tags:
                client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
            return client, exp_id
        except Exception as exc:  # noqa: BLE001 - any transport failure means "cannot track"
            if attempt == 4 or not (local and isinstance(exc, TRANSIENT)):
                raise ConfigError(f"tracking.uri {uri}: MLflow is not reachable "
                                  f"({type(exc).__name__}): start the server or fix the URI"
                                  ) from exc
            time.sleep(0.5 * (attempt + 1))
            client = MlflowClient(uri)
    raise AssertionError("unreachable")


def is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def check_reachable(uri: str) -> None:
    """Before anything is written or trained: a tracking server must answer."""
    if not is_local(uri):
        _check_server(uri)


def _check_server(uri: str) -> None:
    """A tracking server must answer its health check before anything is trained."""
    try:
        reply = requests.get(uri.rstrip("/") + "/health", timeout=5)
    except requests.RequestException as exc:
        raise ConfigError(f"tracking.uri {uri}: no MLflow server answers ({type(exc).__name__})"
                          ": start it (see the README's team section) or fix the URI") from exc
    if reply.status_code == 401:
        raise ConfigError(f"tracking.uri {uri}: the server wants credentials: set "
                          "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    if reply.status_code >= 400:
        raise ConfigError(f"tracking.uri {uri}: /health answered HTTP {reply.status_code}: "
                          "is this an MLflow server?")


def provenance(files: dict[str, Path | None]) -> dict[str, str]:
    """Git commit of the code and SHA-256 of the given files, as tags for every run."""
    tags = {}
    try:
        tags["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        tags["git_commit"] = "unknown"
    for key, path in files.items():
        if path is not None and Path(path).is_file():
            tags[key] = sha256_file(Path(path))
    return tags


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _param_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict, tuple)) else str(value)


def start_run(client: MlflowClient, exp_id: str, name: str, tags: dict[str, str],
              parent: str | None = None, params: dict[str, Any] | None = None) -> str:
    all_tags = dict(tags, **({PARENT_TAG: parent} if parent else {}))
    run = client.create_run(exp_id, run_name=name, tags=all_tags)
    if params:
        client.log_batch(run.info.run_id, params=[
            Param(k, _param_value(v)) for k, v in sorted(params.items())])
    return run.info.run_id


def numeric_metrics(result: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in result.items()
            if k not in _SKIP_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v))}


class TrackingUnavailable(StudyError):
    """MLflow could not be written; what was not written is kept in a backlog file."""


# Anything a tracking call can raise when the store or server is away (or a sqlite store is
# locked by another study): the record stays in the backlog and is written on the next try.
TRANSIENT = (MlflowException, OSError, requests.RequestException, sqlalchemy.exc.SQLAlchemyError)


RETRY_AFTER_S = 20.0


class MlflowTrialTracker(Callback):
    """Creates one run per Tune trial under `parent_run_id` and logs each epoch once.

    Nothing is kept only in memory: a trial's run is found again by its `trial_id` tag, its
    logged epochs by its metric history, so a restored Tune experiment (whose callbacks come
    back from Ray's saved state) or a resumed study picks up the same runs without duplicates.

    Tune's callbacks only append records to a JSON-lines backlog in the study directory (fast,
    never blocked by the network); a writer thread applies them to MLflow in order and drops
    what it wrote. Records that cannot be written (server away, store locked) stay and are
    retried; `drain` writes the rest or raises `TrackingUnavailable` naming the file.
    """

    def __init__(self, client: MlflowClient, exp_id: str, parent_run_id: str,
                 tags: dict[str, str], max_t: int, backlog: Path, index_offset: int = 0,
                 background: bool = True) -> None:
        self.client, self.exp_id, self.parent = client, exp_id, parent_run_id
        self.tags, self.max_t, self.backlog = tags, max_t, backlog
        self.index_offset, self.background = index_offset, background
        self.runs: dict[str, str] = {}
        self.logged_steps: dict[str, set[int]] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.warned = False
        self._threads()

    def _threads(self) -> None:
        self._lock = threading.Lock()  # guards the backlog file
        self._wake, self._stop = threading.Event(), threading.Event()
        self._writer: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:  # Tune saves its callbacks with the experiment
        return {k: v for k, v in self.__dict__.items()
                if k not in ("_lock", "_wake", "_stop", "_writer")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._threads()

    # -- records ----------------------------------------------------------------------------
    def _queue(self, record: dict[str, Any]) -> None:
        with self._lock:
            self.backlog.parent.mkdir(parents=True, exist_ok=True)
            with open(self.backlog, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if not self.background:
            self._flush()
            return
        if self._writer is None or not self._writer.is_alive():
            self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                            name="mlflow-writer")
            self._writer.start()
        self._wake.set()

    def _write_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=RETRY_AFTER_S)
            self._wake.clear()
            if self._flush() is not None:
                self._stop.wait(RETRY_AFTER_S)  # MLflow failed a moment ago: back off

    def _read_backlog(self) -> list[dict[str, Any]]:
        if not self.backlog.is_file():
            return []
        return [json.loads(line) for line in self.backlog.read_text().splitlines() if line]

    def _flush(self) -> Exception | None:
        """Apply the backlog's records in order; keep the rest and whatever arrived meanwhile."""
        with self._lock:
            pending = self._read_backlog()
        done, error = 0, None
        try:
            for record in pending:
                self._apply(record)
                done += 1
        except TRANSIENT as exc:
            error = exc
            if not self.warned:
                print(f"warning: MLflow write failed ({type(exc).__name__}); keeping "
                      f"{len(pending) - done} record(s) in {self.backlog} and retrying",
                      file=sys.stderr, flush=True)
                self.warned = True
        if done:
            with self._lock:
                rest = self._read_backlog()[done:]
                if rest:
                    tmp = self.backlog.with_suffix(".tmp")
                    tmp.write_text("".join(json.dumps(r) + "\n" for r in rest))
                    os.replace(tmp, self.backlog)
                else:
                    self.backlog.unlink(missing_ok=True)
        return error

    def drain(self) -> None:
        """Stop the writer, write whatever waits; a clear error if MLflow is still away."""
        if self._writer is not None:
            self._stop.set()
            self._wake.set()
            self._writer.join()
            self._threads()
        error = self._flush() if self._read_backlog() else None
        if error is not None:
            raise TrackingUnavailable(
                f"MLflow is not writable ({type(error).__name__}); {len(self._read_backlog())} "
                f"record(s) are kept in {self.backlog}: bring the tracking store back and run "
                "again with --resume to write them")

    # -- applying records (idempotent: a record may be applied again after a crash) ---------
    def _apply(self, record: dict[str, Any]) -> None:
        kind = record["kind"]
        run_id = self._run(record["trial_id"], record.get("config"), record.get("index"),
                           reopen=kind != "finish")
        if kind == "metrics":
            step = int(record["step"])
            if step in self.logged_steps[record["trial_id"]]:
                return  # a restored trial may report an epoch again: log each epoch once
            metrics = [Metric(k, v, record["time"], step) for k, v in record["metrics"].items()]
            tags = [RunTag(k, v) for k, v in record.get("tags", {}).items()]
            self.client.log_batch(run_id, metrics=metrics, tags=tags)
            self.logged_steps[record["trial_id"]].add(step)
        elif kind == "finish":
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
            self.client.set_terminated(run_id, record["status"])

    def _run(self, trial_id: str, config: dict[str, Any] | None = None,
             index: str | None = None, reopen: bool = False) -> str:
        """The trial's run, created if new; `reopen` marks a found run RUNNING again (a killed
        or interrupted trial goes on)."""
        if trial_id in self.runs:
            return self.runs[trial_id]
        found = self.client.search_runs(
            [self.exp_id], filter_string=f"tags.trial_id = '{trial_id}' and "
            f"tags.`{PARENT_TAG}` = '{self.parent}'", max_results=2)
        if found:
            run_id = found[0].info.run_id
            if reopen and found[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            history = self.client.get_metric_history(run_id, "val_auroc")
            self.logged_steps[trial_id] = {m.step for m in history}
        else:
            config = config or {}
            params = {k: v for k, v in config.items() if k not in _NOT_PARAMS}
            name = f"{self.tags.get('arm', 'trial')}-{trial_id}"
            tags = dict(self.tags, trial_id=trial_id, trial_index=str(index))
            run_id = start_run(self.client, self.exp_id, name, tags, self.parent, params)
            self.client.log_dict(run_id, config, "config.json")
            self.logged_steps[trial_id] = set()
        self.runs[trial_id] = run_id
        return run_id

    # -- Tune callbacks ---------------------------------------------------------------------
    def _start_record(self, trial) -> dict[str, Any]:
        # Tune's experiment tag starts with the trial's creation counter ("3_lr=..."): the order
        # the searcher suggested it in, so presets are trial_index 1; later segments of a grown
        # search continue the count.
        counter = str(trial.experiment_tag).split("_", 1)[0]
        index = str(int(counter) + self.index_offset) if counter.isdigit() else counter
        return {"trial_id": trial.trial_id, "config": _jsonable(dict(trial.config)),
                "index": index}

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._queue({**self._start_record(trial), "kind": "start"})

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        # Where this epoch's checkpoint was stored: `cxr-study export` starts from it.
        tags = {"checkpoint_path": str(result["checkpoint_path"])} if result.get(
            "checkpoint_path") else {}
        if result.get("worker_node") and self.last.get(trial.trial_id) is None:
            tags["node"] = str(result["worker_node"])  # the Ray node its rank-0 worker ran on
        now = int(time.time() * 1000)
        # A resumed trial reports its earlier epochs again: log any that were missed.
        for past in json.loads(result.get("replay") or "[]"):
            self._queue({**self._start_record(trial), "kind": "metrics", "time": now,
                         "step": int(past.get("epoch", 0)), "metrics": numeric_metrics(past)})
        self._queue({**self._start_record(trial), "kind": "metrics", "step": step,
                     "time": now, "metrics": numeric_metrics(result), "tags": tags})
        self.last[trial.trial_id] = result

    def _finish(self, trial, status: str, extra: dict[str, str]) -> None:
        last = self.last.get(trial.trial_id) or trial.last_result or {}
        epochs = int(last.get("epoch", 0))
        tags = {"epochs_run": str(epochs), **extra}
        if status == "FINISHED":
            tags["stopped_early"] = str(epochs < self.max_t).lower()
        self._queue({**self._start_record(trial), "kind": "finish", "status": status,
                     "tags": tags})

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, "FINISHED", {})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, "FAILED", {"error": trial_error(trial), "stopped_early": "false"})

    def log_artifact(self, trial_id: str, path: Path) -> None:
        if path.exists():
            self.client.log_artifact(self._run(trial_id), str(path))


_NOT_PARAMS = ("storage_path", "cache_dir", "predictions_path", "patient_salt",
               "checkpoints_to_keep")


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config, default=str))


def trial_error(trial) -> str:
    """The most telling line of a failed trial's error file (the exception, not the frames)."""
    if not (trial.error_file and Path(trial.error_file).exists()):
        return ""
    lines = Path(trial.error_file).read_text().strip().splitlines()
    ours = [ln for ln in lines if "DivergenceError" in ln or "StudyError" in ln]
    error = next((ln for ln in reversed(ours or lines) if "Error" in ln),
                 lines[-1] if lines else "")
    return error[:4000]


def end_open_runs(client: MlflowClient, exp_id: str, parent_run_id: str,
                  status: str = "KILLED") -> int:
    """End every RUNNING run below `parent_run_id` (children and grandchildren) with `status`."""
    ended = 0
    parents = [parent_run_id]
    while parents:
        current = parents.pop()
        children = client.search_runs(
            [exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{current}'", max_results=50000)
        for run in children:
            parents.append(run.info.run_id)
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, status)
                ended += 1
    return ended


def find_run(client: MlflowClient, exp_id: str, run_id: str | None) -> str | None:
    """`run_id` if it still exists in the experiment (a resumed study reuses its runs)."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return run_id if run.info.experiment_id == exp_id else None


def reopen_run(client: MlflowClient, run_id: str) -> None:
    client.update_run(run_id, status="RUNNING")


def end_run(client: MlflowClient, run_id: str, status: str = "FINISHED",
            metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None) -> None:
    if metrics:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    if tags:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.set_terminated(run_id, status)
