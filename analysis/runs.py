"""MLflow runs as typed pandas DataFrames.

MLflow hands params back as strings; this is the one place that types them (by the types
`contract.schema` declares), so analysis code compares numbers with numbers and never parses run
names. Every tag, param and metric name comes from `contract.schema`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from contract.config import KINDS, METHOD_KEYS
from contract.errors import ConfigError
from contract.paths import tracking_store
from contract.schema import (
    PARAM_KINDS,
    PARENT,
    TRUE,
    Metric,
    Param,
    Phase,
    Tag,
    metric,
    read_param,
    tag,
)

# Params held as integers: a column of them is pandas' nullable "Int64", so runs without one
# (a full fine-tune has no rank) keep a real integer dtype.
INT_PARAMS = tuple(name for name, kind in PARAM_KINDS.items() if kind is int)
# What `best_configs` shows of the selected config, each with its declared type.
# Every method's own settings, then the searched training values.
CONFIG_KEYS = (*(k for k in METHOD_KEYS if k != Param.ALPHA_RATIO), Param.LR, Param.WEIGHT_DECAY,
               Param.LAYER_DECAY, Param.OPTIMIZER)


def typed_params(params: dict[str, str]) -> dict[str, Any]:
    """A run's params (MLflow's text) as their declared types, via `schema.read_param`. A value
    an older version logged in another form stays text rather than failing the whole load."""
    out = {}
    for name, text in params.items():
        try:
            out[name] = read_param(name, text)
        except (TypeError, ValueError):
            out[name] = text
    return out


def legacy_kind(space: Any, has_rank: bool) -> str:
    """The kind of an arm of an older version, whose runs carry no `kind` tag: its search
    space's in the registry, else 'lora' when its trials logged a rank (those versions logged
    rank=0 for full fine-tuning, which counts as none)."""
    from search_spaces import get_space
    try:
        return get_space(str(space)).kind
    except ConfigError:
        return "lora" if has_rank else "fft"


def known_kind(value: Any) -> str | None:
    """A `kind` tag's value if it names a kind, else None (a run of an older version)."""
    return value if isinstance(value, str) and value in KINDS else None


def _client(tracking_uri: str) -> MlflowClient:
    """A client that only reads: a local store must exist and be MLflow's, since MLflow would
    create an empty one (or add its tables to another database) just by connecting."""
    tracking_store(tracking_uri, write=False)
    return MlflowClient(tracking_uri)


def _col(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column, or an empty (NA) one where no run has it."""
    return frame[name] if name in frame else pd.Series(pd.NA, index=frame.index, dtype=object)


def _int_column(values: pd.Series) -> pd.Series:
    try:
        return values.astype("Int64")
    except (TypeError, ValueError):  # an older version logged text there: leave it as it is
        return values


def load_runs(tracking_uri: str, experiment: str,
              include_superseded: bool = False) -> pd.DataFrame:
    """One row per run: ids, status, tags (`schema.tag(name)`), params by their own names with
    their declared types, latest metrics (`schema.metric(name)`).

    Final runs of a config that a grown search has since replaced carry `superseded=true` and
    are left out unless asked for."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"experiment {experiment!r} not found at {tracking_uri}: check "
                          "--tracking-uri and --experiment (see `mlflow experiments search`)")
    rows = []
    for run in client.search_runs([exp.experiment_id], max_results=50000):
        if run.data.tags.get(Tag.SUPERSEDED) == TRUE and not include_superseded:
            continue
        row: dict[str, Any] = {"run_id": run.info.run_id, "run_name": run.info.run_name,
                               "status": run.info.status,
                               "start_time": run.info.start_time, "end_time": run.info.end_time}
        row.update({tag(k): v for k, v in run.data.tags.items()})
        row.update(typed_params(run.data.params))
        row.update({metric(k): v for k, v in run.data.metrics.items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    for name in INT_PARAMS:
        if name in frame:
            frame[name] = _int_column(frame[name])
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
    columns = ["run_id", Metric.EPOCH, "metric", "timestamp", "value"]
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


def _native(name: str, value: Any) -> Any:
    """A param's value as its declared plain Python type (numpy's int64 prints as "4" in
    `json.dumps(..., default=str)`; an int prints as 4)."""
    kind = PARAM_KINDS.get(name)
    if kind in (int, float, str) and not isinstance(value, bool):
        try:
            return kind(value)
        except (TypeError, ValueError):
            return value
    return value.item() if hasattr(value, "item") else value


def _kind(best: pd.Series, runs: pd.DataFrame, group: pd.DataFrame) -> str:
    """The selected trial's kind: its `kind` tag (or param); for runs of older versions
    without either, its arm's search space in the registry, else whether it logged a rank."""
    kind = known_kind(best.get(tag(Tag.KIND))) or known_kind(best.get(Param.KIND))
    if kind:
        return kind
    parent = runs[runs["run_id"] == best.get(tag(PARENT))]  # legacy: ask the arm's space
    space = next((v for v in (*_col(parent, tag(Tag.SPACE)), *_col(parent, Param.SPACE))
                  if isinstance(v, str)), None)
    ranks = pd.to_numeric(_col(group, Param.RANK), errors="coerce")
    return legacy_kind(space, bool((ranks > 0).any()))


def best_configs(runs: pd.DataFrame, task: str | None = None,
                 arm: str | None = None) -> pd.DataFrame:
    """The best search trial of each task and arm (by best validation AUROC): its kind, its
    config (each value its declared type), its validation AUROC, its test AUROC (mean over
    the final seeds) and trainable share, and the runs that hold it.

    `run_id` is the first final run (lowest seed) of the task x arm when it has final runs:
    they retrained the selected config and keep its best-validation weights, the ones the test
    AUROC scores (`cxr-study export` wants these); else the search trial. `final_run_ids` lists
    the final runs by seed, `search_run_id` names the search trial.
    """
    phase, trial_id = tag(Tag.PHASE), tag(Tag.TRIAL_ID)
    best_val, test = metric(Metric.BEST_VAL_AUROC), metric(Metric.TEST_AUROC)
    if runs.empty or phase not in runs or trial_id not in runs or best_val not in runs:
        return pd.DataFrame()
    trials = runs[runs[trial_id].notna()]
    search = trials[(trials[phase] == Phase.SEARCH) & trials[best_val].notna()]
    finals = trials[(trials[phase] == Phase.FINAL) & _col(trials, test).notna()
                    & (_col(trials, tag(Tag.SUPERSEDED)) != TRUE)]
    task_col, arm_col = tag(Tag.TASK), tag(Tag.ARM)
    for name, value, column in (("--task", task, task_col), ("--arm", arm, arm_col)):
        known = sorted(str(v) for v in search[column].dropna().unique())
        if value and known and value not in known:
            raise ConfigError(f"{name} {value!r} is not in this study: its {name[2:]}s with "
                              f"finished trials are {known}")
    if task:
        search = search[search[task_col] == task]
    if arm:
        search = search[search[arm_col] == arm]
    rows = []
    for (task_key, arm_name), group in search.groupby([task_col, arm_col], sort=True):
        best = group.loc[group[best_val].idxmax()]
        tests = finals[(finals[task_col] == task_key) & (finals[arm_col] == arm_name)]
        if Param.SEED in tests:
            tests = tests.sort_values([Param.SEED, "start_time"], kind="stable")
        final_ids = [str(r) for r in tests["run_id"]]
        trainable = best.get(metric(Metric.TRAINABLE_PARAMS))
        total = best.get(metric(Metric.TOTAL_PARAMS))
        rows.append({
            Tag.TASK: task_key, Tag.ARM: arm_name, Tag.KIND: _kind(best, runs, group),
            "val_auroc": float(best[best_val]),  # the selected trial's best
            Metric.TEST_AUROC: float(tests[test].mean()) if len(tests) else float("nan"),
            "test_seeds": len(tests),
            Metric.TRAINABLE_PARAMS: int(trainable) if pd.notna(trainable) else None,
            "trainable_pct": 100.0 * trainable / total if pd.notna(trainable) and total
            else float("nan"),
            Tag.TRIALS: len(group),
            Tag.STOPPED_EARLY: int((_col(group, tag(Tag.STOPPED_EARLY)) == TRUE).sum()),
            "config": {k: _native(k, best[k]) for k in CONFIG_KEYS
                       if k in best and pd.notna(best[k])},
            "run_id": final_ids[0] if final_ids else str(best["run_id"]),
            "final_run_ids": final_ids,
            "search_run_id": str(best["run_id"]),
        })
    return pd.DataFrame(rows)


def run_record(tracking_uri: str, run_id: str) -> tuple[dict[str, Any], dict[str, str]]:
    """One run's params (their declared types) and its tags; an unknown run id is a
    ConfigError."""
    client = _client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for "no such run"
        raise ConfigError(f"run {run_id} not found at {tracking_uri}: pass a final or trial "
                          "run id from `cxr-study best --json`") from exc
    return typed_params(run.data.params), dict(run.data.tags)


def trial_status(runs: pd.DataFrame) -> pd.DataFrame:
    """Trials per task, arm and phase: finished, stopped early, failed, still running."""
    columns = [Tag.TASK, Tag.ARM, Tag.PHASE, "finished", Tag.STOPPED_EARLY, "failed", "running"]
    trials = runs[runs[tag(Tag.TRIAL_ID)].notna()] if tag(Tag.TRIAL_ID) in runs else (
        runs.iloc[0:0])
    if trials.empty:
        return pd.DataFrame(columns=columns)
    stopped = _col(trials, tag(Tag.STOPPED_EARLY)).eq(TRUE)
    frame = pd.DataFrame({
        Tag.TASK: trials[tag(Tag.TASK)], Tag.ARM: trials[tag(Tag.ARM)],
        Tag.PHASE: trials[tag(Tag.PHASE)],
        "finished": trials["status"].eq("FINISHED") & ~stopped,
        Tag.STOPPED_EARLY: trials["status"].eq("FINISHED") & stopped,
        "failed": trials["status"].isin(["FAILED", "KILLED"]),
        "running": trials["status"].eq("RUNNING"),
    })
    return frame.groupby(columns[:3], as_index=False).sum()


def experiments_in(tracking_uri: str) -> list[str]:
    """Names of the experiments in a store (a study directory holds one per study)."""
    return [e.name for e in _client(tracking_uri).search_experiments()
            if e.name != "Default"]
