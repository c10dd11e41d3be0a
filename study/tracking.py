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
import subprocess
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from trainables.errors import ConfigError

PARENT_TAG = "mlflow.parentRunId"
# Metrics reported per epoch that are not worth a time series of their own.
_SKIP_METRICS = {"epoch", "training_iteration", "time_this_iter_s", "time_total_s",
                 "timestamp", "time_since_restore", "iterations_since_restore", "pid"}


def connect(uri: str, experiment: str, storage: Path) -> tuple[MlflowClient, str]:
    """Client and experiment id; an unreachable server is a ConfigError before any training.

    With a local store, a new experiment keeps its artifacts under the study directory
    (MLflow's default would be `./mlruns` of whatever folder the command ran in); a tracking
    server decides for itself.
    """
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    artifacts = (storage / "mlartifacts").resolve().as_uri() if local else None
    try:
        found = client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else client.create_experiment(
            experiment, artifact_location=artifacts)
    except Exception as exc:  # noqa: BLE001 - any transport failure means "cannot track"
        raise ConfigError(f"tracking.uri {uri}: MLflow is not reachable ({type(exc).__name__}): "
                          "start the server or fix the URI") from exc
    return client, exp_id


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


class MlflowTrialTracker(Callback):
    """Creates one run per Tune trial under `parent_run_id` and logs each epoch once."""

    def __init__(self, client: MlflowClient, exp_id: str, parent_run_id: str,
                 tags: dict[str, str], max_t: int) -> None:
        self.client, self.exp_id, self.parent = client, exp_id, parent_run_id
        self.tags, self.max_t = tags, max_t
        self.runs: dict[str, str] = {}
        self.logged_steps: dict[str, set[int]] = {}
        self.last: dict[str, dict[str, Any]] = {}

    def _run(self, trial) -> str:
        if trial.trial_id not in self.runs:
            params = {k: v for k, v in trial.config.items()
                      if k not in ("storage_path", "cache_dir", "predictions_path",
                                   "patient_salt")}
            name = f"{self.tags.get('arm', 'trial')}-{trial.trial_id}"
            # Tune's experiment tag starts with the trial's creation counter ("3_lr=..."):
            # the order the searcher suggested it in, so presets are trial_index 1.
            index = str(trial.experiment_tag).split("_", 1)[0]
            tags = dict(self.tags, trial_id=trial.trial_id, trial_index=index)
            self.runs[trial.trial_id] = start_run(self.client, self.exp_id, name, tags,
                                                  self.parent, params)
            self.client.log_dict(self.runs[trial.trial_id], dict(trial.config), "config.json")
            self.logged_steps[trial.trial_id] = set()
        return self.runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        run_id = self._run(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        self.last[trial.trial_id] = result
        if step in self.logged_steps[trial.trial_id]:
            return  # a restored trial may report an epoch again: log each epoch once
        self.logged_steps[trial.trial_id].add(step)
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in numeric_metrics(result).items()]
        # Where Ray Train stored this epoch's checkpoint: `cxr-study export` starts from it.
        tags = [RunTag("checkpoint_path", str(result["checkpoint_path"]))] if result.get(
            "checkpoint_path") else []
        self.client.log_batch(run_id, metrics=metrics, tags=tags)

    def _finish(self, trial, status: str, extra: dict[str, str]) -> None:
        run_id = self._run(trial)
        last = self.last.get(trial.trial_id, {})
        epochs = int(last.get("epoch", 0))
        tags = {"epochs_run": str(epochs), **extra}
        if status == "FINISHED":
            tags["stopped_early"] = str(epochs < self.max_t).lower()
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(run_id, status)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, "FINISHED", {})

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        error = ""
        if trial.error_file and Path(trial.error_file).exists():
            lines = Path(trial.error_file).read_text().strip().splitlines()
            error = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines
                         else "")
        self._finish(trial, "FAILED", {"error": error[:4000], "stopped_early": "false"})

    def log_artifact(self, trial_id: str, path: Path) -> None:
        if trial_id in self.runs and path.exists():
            self.client.log_artifact(self.runs[trial_id], str(path))


def end_run(client: MlflowClient, run_id: str, status: str = "FINISHED",
            metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None) -> None:
    if metrics:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    if tags:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.set_terminated(run_id, status)
