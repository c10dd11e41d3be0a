"""MLflow runs as typed pandas DataFrames.

MLflow hands params back as strings; this is the one place that types them, so analysis code
compares numbers with numbers and never parses run names.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from trainables.errors import ConfigError
from trainables.paths import tracking_store

INT_PARAMS = ("rank", "epochs", "warmup_epochs", "batch_size", "seed", "split_seed",
              "num_classes", "num_workers", "trials", "max_t")
FLOAT_PARAMS = ("alpha", "alpha_ratio", "lr", "weight_decay", "layer_decay", "lora_dropout",
                "label_fraction", "min_lr", "drop_path", "grad_clip", "cpus_per_worker",
                "gpus_per_worker")


def _typed(name: str, value: str) -> Any:
    if value in ("None", ""):
        return None
    if name in INT_PARAMS:
        return int(float(value))
    if name in FLOAT_PARAMS:
        return float(value)
    if value.startswith(("{", "[")):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _client(tracking_uri: str) -> MlflowClient:
    """A client that only reads: a local store must exist and be MLflow's, since MLflow would
    create an empty one (or add its tables to another database) just by connecting."""
    tracking_store(tracking_uri, write=False)
    return MlflowClient(tracking_uri)


def load_runs(tracking_uri: str, experiment: str,
              include_superseded: bool = False) -> pd.DataFrame:
    """One row per run: ids, status, tags (`tag.*`), typed params, latest metrics.

    Final runs of a config that a grown search has since replaced carry `superseded=true` and
    are left out unless asked for."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"experiment {experiment!r} not found at {tracking_uri}: check "
                          "--tracking-uri and --experiment (see `mlflow experiments search`)")
    rows = []
    for run in client.search_runs([exp.experiment_id], max_results=50000):
        if run.data.tags.get("superseded") == "true" and not include_superseded:
            continue
        row: dict[str, Any] = {"run_id": run.info.run_id, "run_name": run.info.run_name,
                               "status": run.info.status,
                               "start_time": run.info.start_time, "end_time": run.info.end_time}
        row.update({f"tag.{k}": v for k, v in run.data.tags.items()})
        row.update({k: _typed(k, v) for k, v in run.data.params.items()})
        row.update({f"metric.{k}": v for k, v in run.data.metrics.items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    for name in INT_PARAMS:  # runs without the param (FFT has no rank) keep a real integer dtype
        if name in frame:
            frame[name] = frame[name].astype("Int64")
    return frame


# Run ids per bulk query: far below any database's bound-parameter limit (SQLite's is 32766).
HISTORY_BATCH = 500
_NO_LIMIT = 10**12  # the bulk query takes a row limit; a study never logs this many values


def metric_histories(tracking_uri: str, run_ids: Sequence[str],
                     keys: Sequence[str]) -> pd.DataFrame:
    """Every logged value of `keys` in `run_ids`: columns run_id, epoch (the step), metric,
    timestamp, value; rows by run (in the given order), then key, then as MLflow returns one
    run's history (by timestamp, step, value).

    One call per run and key costs a query each (a report of 600 trial runs made 3,000); a
    database store answers one query per key for a batch of runs (`get_metric_history_bulk`,
    the query MLflow's UI uses). Other stores (a tracking server, a file store) lack it and
    are asked per run.
    """
    columns = ["run_id", "epoch", "metric", "timestamp", "value"]
    client = _client(tracking_uri)
    bulk = getattr(getattr(client, "_tracking_client", None), "store", None)
    bulk = getattr(bulk, "get_metric_history_bulk", None)
    rows: list[tuple[str, int, str, int, float]] = []
    if bulk is None:
        for run_id in run_ids:
            for key in keys:
                rows += [(run_id, int(m.step), key, m.timestamp, float(m.value))
                         for m in client.get_metric_history(run_id, key)]
        return pd.DataFrame(rows, columns=columns)
    ids = list(dict.fromkeys(run_ids))
    for key in keys:
        for start in range(0, len(ids), HISTORY_BATCH):
            found = bulk(ids[start:start + HISTORY_BATCH], key, _NO_LIMIT)
            rows += [(m.run_id, int(m.step), key, m.timestamp, float(m.value)) for m in found]
    frame = pd.DataFrame(rows, columns=columns)
    # The bulk query sorts by run id; put runs and keys back in the per-run loop's order (a
    # stable sort keeps each run's history in MLflow's order).
    position = {run_id: i for i, run_id in enumerate(ids)}
    rank = {key: i for i, key in enumerate(keys)}
    order = frame["run_id"].map(position) * len(rank) + frame["metric"].map(rank)
    return frame.iloc[order.argsort(kind="stable")].reset_index(drop=True)


def best_configs(runs: pd.DataFrame, task: str | None = None,
                 arm: str | None = None) -> pd.DataFrame:
    """Best search trial per task and arm (by best validation AUROC), with its test AUROC
    (mean over the final seeds) and trainable share."""
    if runs.empty or "tag.phase" not in runs:
        return pd.DataFrame()
    search = runs[(runs["tag.phase"] == "search") & runs["tag.trial_id"].notna()
                  & runs["metric.best_val_auroc"].notna()]
    finals = runs[(runs["tag.phase"] == "final") & runs["metric.test_auroc"].notna()] if (
        "metric.test_auroc" in runs) else runs.iloc[0:0]
    if task:
        search = search[search["tag.task"] == task]
    if arm:
        search = search[search["tag.arm"] == arm]
    rows = []
    for (task_key, arm_name), group in search.groupby(["tag.task", "tag.arm"], sort=True):
        best = group.loc[group["metric.best_val_auroc"].idxmax()]
        tests = finals[(finals["tag.task"] == task_key) & (finals["tag.arm"] == arm_name)]
        trainable, total = best["metric.trainable_params"], best["metric.total_params"]
        rows.append({
            "task": task_key, "arm": arm_name, "val_auroc": best["metric.best_val_auroc"],
            "test_auroc": tests["metric.test_auroc"].mean() if len(tests) else float("nan"),
            "test_seeds": len(tests), "trainable_params": int(trainable),
            "trainable_pct": 100.0 * trainable / total,
            "trials": len(group),
            "stopped_early": int((group["tag.stopped_early"] == "true").sum()),
            "config": {k: best[k] for k in ("rank", "alpha", "targets", "lr", "weight_decay",
                                            "layer_decay", "lora_dropout", "optimizer")
                       if k in best and pd.notna(best[k])},
            "run_id": best["run_id"],
        })
    return pd.DataFrame(rows)


def run_record(tracking_uri: str, run_id: str) -> tuple[dict[str, Any], dict[str, str]]:
    """One run's typed params and its tags; an unknown run id is a ConfigError."""
    client = _client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for "no such run"
        raise ConfigError(f"run {run_id} not found at {tracking_uri}: pass a trial run id "
                          "from `cxr-study best --json`") from exc
    return {k: _typed(k, v) for k, v in run.data.params.items()}, dict(run.data.tags)


def trial_status(runs: pd.DataFrame) -> pd.DataFrame:
    """Trials per task, arm and phase: finished, stopped early, failed, still running."""
    trials = runs[runs.get("tag.trial_id", pd.Series(dtype=object)).notna()] if (
        "tag.trial_id" in runs) else runs.iloc[0:0]
    if trials.empty:
        return pd.DataFrame(columns=["task", "arm", "phase", "finished", "stopped_early",
                                     "failed", "running"])
    stopped = trials["tag.stopped_early"].eq("true")
    frame = pd.DataFrame({
        "task": trials["tag.task"], "arm": trials["tag.arm"], "phase": trials["tag.phase"],
        "finished": trials["status"].eq("FINISHED") & ~stopped,
        "stopped_early": trials["status"].eq("FINISHED") & stopped,
        "failed": trials["status"].isin(["FAILED", "KILLED"]),
        "running": trials["status"].eq("RUNNING"),
    })
    return frame.groupby(["task", "arm", "phase"], as_index=False).sum()


def experiments_in(tracking_uri: str) -> list[str]:
    """Names of the experiments in a store (a study directory holds one per study)."""
    return [e.name for e in _client(tracking_uri).search_experiments()
            if e.name != "Default"]
