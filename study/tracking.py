"""The one module that writes MLflow.

Hierarchy: a parent run per study, a child run per task x arm, a grandchild run per trial (phase
`search`) and per final seed (phase `final`). A driver-side Tune callback owns the trial runs, so
ASHA-stopped trials end FINISHED with `stopped_early=true`, failed ones FAILED with the error,
and nothing is left RUNNING (Ray's own MLflow integrations do neither reliably).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import mlflow
import requests
import sqlalchemy.exc
from filelock import FileLock
from mlflow.entities import Metric as MlflowMetric
from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from contract.config import RunSettings, config_digest
from contract.errors import ConfigError, DivergenceError, TrackingUnavailable
from contract.schema import (
    EXPERIMENT_KIND,
    FALSE,
    PARENT,
    TRUE,
    ArmParams,
    Level,
    Metric,
    Phase,
    StudyParams,
    Tag,
    params,
)
from contract.schema import Param as ParamName
from study.backlog import Backlog
from study.pool import FINAL
from study.pool_tune import index_in_search, phase_of, search_key
from trainables.ray_train import WORKER_NODE

CONFIG_ARTIFACT = "config.json"  # a trial run's flat config, as an artifact

# What Tune adds to every result that is not worth a time series of its own.
_SKIP_METRICS = {Metric.EPOCH, "training_iteration", "time_this_iter_s", "time_total_s",
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
    # Two drivers starting at once on one sqlite store race to create its tables (MLflow's
    # migrations fail halfway: "table _alembic_tmp_experiments already exists"): on this
    # machine, one creates while the other waits.
    with _store_lock(uri):
        return _open_experiment(uri, experiment, storage, local)


def _store_lock(uri: str) -> contextlib.AbstractContextManager:
    """A lock file beside a sqlite store (none for other stores)."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    return FileLock(uri.removeprefix("sqlite:///").split("?")[0] + ".lock")


def _open_experiment(uri: str, experiment: str, storage: Path,
                     local: bool) -> tuple[MlflowClient, str]:
    client = MlflowClient(uri)
    artifacts = (storage / "mlartifacts").resolve().as_uri() if local else None
    # Two studies starting at once on one store race to create their experiments ("database
    # is locked", "already exists"): a few quick retries settle it.
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
                          ": start it (see docs/clusters.md) or fix the URI") from exc
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
        tags[Tag.GIT_COMMIT] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        tags[Tag.GIT_COMMIT] = "unknown"
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
    all_tags = dict(tags, **({PARENT: parent} if parent else {}))
    run = client.create_run(exp_id, run_name=name, tags=all_tags)
    if params:
        client.log_batch(run.info.run_id, params=[
            Param(k, _param_value(v)) for k, v in sorted(params.items())])
    return run.info.run_id


def tag_run(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def open_study_run(client: MlflowClient, exp_id: str, run_id: str | None, name: str,
                   tags: dict[str, str], record: StudyParams, tasks: int) -> str:
    """The study's run: found again (RUNNING again, provenance re-tagged) or created."""
    found = find_run(client, exp_id, run_id)
    if found:
        reopen_run(client, found)
    else:
        found = start_run(client, exp_id, name, {**tags, Tag.LEVEL: Level.STUDY},
                          params=params(record))
    tag_run(client, found, {**tags, Tag.TASKS: str(tasks)})
    return found


def arm_tags(arm: str, task: str, kind: str, phase: str = Phase.SEARCH) -> dict[str, str]:
    """The tags every run of a task x arm carries: its own run, its trials, its finals."""
    return {Tag.ARM: arm, Tag.TASK: task, Tag.KIND: kind, Tag.PHASE: phase}


def open_arm_run(client: MlflowClient, exp_id: str, run_id: str | None, parent: str,
                 name: str, arm: str, task: str, record: ArmParams) -> str:
    """A task x arm's run: found again (RUNNING again) or created with its task factors."""
    found = find_run(client, exp_id, run_id)
    if found:
        reopen_run(client, found)
        return found
    tags = {**arm_tags(arm, task, record.kind), Tag.LEVEL: Level.ARM, Tag.SPACE: record.space}
    return start_run(client, exp_id, name, tags, parent, params(record))


def set_trial_count(client: MlflowClient, run_id: str, trials: int) -> None:
    """An arm's trial count so far (a tag: a grown search raises it)."""
    tag_run(client, run_id, {Tag.TRIALS: str(trials)})


def supersede_finals(client: MlflowClient, exp_id: str, arm_run: str, digest: str) -> int:
    """Tag the final runs of an arm's earlier config `superseded` (analysis leaves them out)."""
    runs = client.search_runs([exp_id], filter_string=(
        f"tags.`{PARENT}` = '{arm_run}' and tags.{Tag.PHASE} = '{Phase.FINAL}' and "
        f"tags.{Tag.FINAL_CONFIG} = '{digest}'"), max_results=10000)
    for run in runs:
        tag_run(client, run.info.run_id, {Tag.SUPERSEDED: TRUE})
    return len(runs)


def numeric_metrics(result: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in result.items()
            if k not in _SKIP_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v))}


# Anything a tracking call can raise when the store or server is away (or a sqlite store is
# locked by another study): the record stays in the backlog and is written on the next try.
TRANSIENT = (MlflowException, OSError, requests.RequestException, sqlalchemy.exc.SQLAlchemyError)


class MlflowTrialTracker(Callback):
    """Creates one run per Tune trial under `parent_run_id` and logs each epoch once.

    Nothing is kept only in memory: a trial's run is found again by its `trial_id` tag, its
    logged epochs by its metric history, so a restored Tune experiment (whose callbacks come
    back from Ray's saved state) or a resumed study picks up the same runs without duplicates.

    Tune's callbacks only append records to a `Backlog` file in the study directory (fast,
    never blocked by the network); its writer thread applies them to MLflow in order. Records
    that cannot be written (server away, store locked) stay and are retried; `drain` writes the
    rest or raises `TrackingUnavailable` naming the file. `run` says where a trial's divergence
    marker would be.
    """

    def __init__(self, client: MlflowClient, exp_id: str, parent_run_id: str,
                 tags: dict[str, str], max_t: int, backlog: Path, index_offset: int = 0,
                 background: bool = True, run: RunSettings | None = None) -> None:
        self.client, self.exp_id, self.parent = client, exp_id, parent_run_id
        self.tags, self.max_t, self.index_offset = tags, max_t, index_offset
        self.settings = run
        self.backlog = Backlog(backlog, self._apply, TRANSIENT, background)
        self.runs: dict[str, str] = {}
        self.logged_steps: dict[str, set[int]] = {}
        self.last: dict[str, dict[str, Any]] = {}

    def _queue(self, record: dict[str, Any]) -> None:
        self.backlog.put(record)

    def drain(self) -> None:
        """Stop the writer, write whatever waits; a clear error if MLflow is still away."""
        error = self.backlog.drain()
        if error is not None:
            raise TrackingUnavailable(
                f"MLflow is not writable ({type(error).__name__}); "
                f"{len(self.backlog.pending())} record(s) are kept in {self.backlog.path}: "
                "bring the tracking store back and run again with --resume to write them")

    # -- applying records (idempotent: a record may be applied again after a crash) ---------
    def _apply(self, record: dict[str, Any]) -> None:
        kind = record["kind"]
        run_id = self._run(record["trial_id"], record.get("config"), record.get("index"),
                           reopen=kind != "finish", parent=record.get("parent"),
                           run_tags=record.get("run_tags"))
        if kind == "metrics":
            step = int(record["step"])
            if step in self.logged_steps[record["trial_id"]]:
                return  # a restored trial may report an epoch again: log each epoch once
            metrics = [MlflowMetric(k, v, record["time"], step)
                       for k, v in record["metrics"].items()]
            tags = [RunTag(k, v) for k, v in record.get("tags", {}).items()]
            self.client.log_batch(run_id, metrics=metrics, tags=tags)
            self.logged_steps[record["trial_id"]].add(step)
        elif kind == "finish":
            tag_run(self.client, run_id, record["tags"])
            self.client.set_terminated(run_id, record["status"])

    def _run(self, trial_id: str, config: dict[str, Any] | None = None,
             index: str | None = None, reopen: bool = False, parent: str | None = None,
             run_tags: dict[str, str] | None = None) -> str:
        """The trial's run, created if new; `reopen` marks a found run RUNNING again (a killed
        or interrupted trial goes on). Its params are the trial's flat config, key for key.
        `parent` and `run_tags` (the record's) override the tracker's own."""
        if trial_id in self.runs:
            return self.runs[trial_id]
        parent = parent or self.parent
        run_tags = run_tags or self.tags
        found = self.client.search_runs(
            [self.exp_id], filter_string=f"tags.{Tag.TRIAL_ID} = '{trial_id}' and "
            f"tags.`{PARENT}` = '{parent}'", max_results=2)
        if found:
            run_id = found[0].info.run_id
            if reopen and found[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            history = self.client.get_metric_history(run_id, Metric.VAL_AUROC)
            self.logged_steps[trial_id] = {m.step for m in history}
            # The store may have gone away between creating the run and writing its config.
            if config and CONFIG_ARTIFACT not in {
                    a.path for a in self.client.list_artifacts(run_id)}:
                self.client.log_dict(run_id, config, CONFIG_ARTIFACT)
        else:
            config = config or {}
            name = f"{run_tags.get(Tag.ARM, 'trial')}-{trial_id}"
            tags = {**run_tags, Tag.TRIAL_ID: trial_id, Tag.TRIAL_INDEX: str(index)}
            run_id = start_run(self.client, self.exp_id, name, tags, parent, config)
            self.client.log_dict(run_id, config, CONFIG_ARTIFACT)
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
        step = int(result.get(Metric.EPOCH, result.get("training_iteration", 0)))
        # Where this epoch's checkpoint was stored: `cxr-study export` starts from it.
        tags = {Tag.CHECKPOINT_PATH: str(result[Tag.CHECKPOINT_PATH])} if result.get(
            Tag.CHECKPOINT_PATH) else {}
        if result.get(WORKER_NODE) and self.last.get(trial.trial_id) is None:
            tags[Tag.NODE] = str(result[WORKER_NODE])  # the node its rank-0 worker ran on
        now = int(time.time() * 1000)
        # A resumed trial reports its earlier epochs again: log any that were missed.
        for past in json.loads(result.get(Metric.REPLAY) or "[]"):
            self._queue({**self._start_record(trial), "kind": "metrics", "time": now,
                         "step": int(past.get(Metric.EPOCH, 0)),
                         "metrics": numeric_metrics(past)})
        self._queue({**self._start_record(trial), "kind": "metrics", "step": step,
                     "time": now, "metrics": numeric_metrics(result), "tags": tags})
        self.last[trial.trial_id] = result

    def _finish(self, trial, status: str, extra: dict[str, str]) -> None:
        last = self.last.get(trial.trial_id) or trial.last_result or {}
        epochs = int(last.get(Metric.EPOCH, 0))
        tags = {Tag.EPOCHS_RUN: str(epochs), **extra}
        if status == "FINISHED":
            tags[Tag.STOPPED_EARLY] = TRUE if epochs < self.max_t else FALSE
        self._queue({**self._start_record(trial), "kind": "finish", "status": status,
                     "tags": tags})

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, "FINISHED", {})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        marker = self.settings.divergence_marker(trial.trial_id) if self.settings else None
        self._finish(trial, "FAILED", {Tag.ERROR: trial_error(trial, marker),
                                       Tag.STOPPED_EARLY: FALSE})

    def log_artifact(self, trial_id: str, path: Path, parent: str | None = None) -> None:
        if path.exists():
            self.client.log_artifact(self._run(trial_id, parent=parent), str(path))


class PoolTracker(MlflowTrialTracker):
    """The tracker of a study's pool: each trial's run goes under its own task x arm's run,
    with that arm's tags (and, for a final run, the digest of the config it retrains); its
    trial index counts within its own search, after `offsets[key]` trials of earlier
    experiments of that search."""

    def __init__(self, client: MlflowClient, exp_id: str, arm_runs: dict[str, str],
                 max_t: int, backlog: Path, offsets: dict[str, int] | None = None,
                 background: bool = True, run: RunSettings | None = None) -> None:
        super().__init__(client, exp_id, "", {}, max_t, backlog, 0, background, run)
        self.arm_runs, self.offsets = arm_runs, dict(offsets or {})
        self.trials: list = []
        self.indices: dict[str, int] = {}

    def _start_record(self, trial) -> dict[str, Any]:
        config = dict(trial.config)
        key, final = search_key(config), phase_of(config) == FINAL
        run_tags = arm_tags(config[ParamName.ARM], config[ParamName.TASK],
                            config[ParamName.KIND], Phase.FINAL if final else Phase.SEARCH)
        if final:
            run_tags[Tag.FINAL_CONFIG] = config_digest(config)
        if trial.trial_id not in self.indices:  # a trial's place never changes: found once
            self.indices[trial.trial_id] = index_in_search(trial, self.trials) + (
                0 if final else self.offsets.get(key, 0))
        index = self.indices[trial.trial_id]
        return {"trial_id": trial.trial_id, "config": _jsonable(config), "index": str(index),
                "parent": self.arm_runs[key], "run_tags": run_tags}

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.trials = trials
        super().on_trial_start(iteration, trials, trial, **info)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.trials = trials
        super().on_trial_result(iteration, trials, trial, result, **info)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.trials = trials
        super().on_trial_complete(iteration, trials, trial, **info)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.trials = trials
        super().on_trial_error(iteration, trials, trial, **info)


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config, default=str))


def trial_error(trial, marker: Path | None = None) -> str:
    """Why a trial failed, in one line: a divergence by its marker file (the trial wrote its
    reason there), anything else by the last error line of Tune's error file (the exception,
    not the frames)."""
    if marker is not None and marker.is_file():
        return f"{DivergenceError.__name__}: {marker.read_text().strip()}"[:4000]
    if not (trial.error_file and Path(trial.error_file).exists()):
        return ""
    lines = Path(trial.error_file).read_text().strip().splitlines()
    error = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else "")
    return error[:4000]


def end_open_runs(client: MlflowClient, exp_id: str, parent_run_id: str,
                  status: str = "KILLED") -> int:
    """End every RUNNING run below `parent_run_id` (children and grandchildren) with `status`."""
    ended = 0
    parents = [parent_run_id]
    while parents:
        current = parents.pop()
        children = client.search_runs(
            [exp_id], filter_string=f"tags.`{PARENT}` = '{current}'", max_results=50000)
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
        client.log_batch(run_id, metrics=[MlflowMetric(k, v, now, 0)
                                          for k, v in metrics.items()])
    if tags:
        tag_run(client, run_id, tags)
    client.set_terminated(run_id, status)
