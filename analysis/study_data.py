"""One study, read from MLflow into tidy DataFrames and cached as parquet.

Run metadata comes fresh from MLflow on every load (`load_runs`, one paged query). What is slow
to fetch, the per-epoch metric histories and the test-prediction artifacts, is cached next to the
store and fetched again only for runs that changed since the cache was written: a finished run
never changes, so a study that is still running costs only its new runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from analysis.runs import known_kind, legacy_kind, load_runs, metric_histories
from contract.errors import ConfigError
from contract.schema import (
    FALSE,
    PARAM_KINDS,
    PARENT,
    TASK_FACTORS,
    TRUE,
    ArmParams,
    Level,
    Metric,
    Param,
    Phase,
    Tag,
    metric,
    tag,
)

CACHE_VERSION = 2
# Per-epoch series worth a learning curve; per-class validation series stay in MLflow.
EPOCH_METRICS = (Metric.VAL_AUROC, Metric.VAL_AUPRC, Metric.TRAIN_LOSS, Metric.LR,
                 Metric.BEST_VAL_AUROC)
TERMINAL = ("FINISHED", "FAILED", "KILLED")
_INFO = ("run_id", "run_name", "status", "start_time", "end_time")
_TABLES = ("study", "arms", "trials", "finals", "epochs")
# The key of a task x arm in every table (the run tags the columns copy).
TASK_ARM = [Tag.TASK, Tag.ARM]


@dataclass(frozen=True, eq=False)
class StudyData:
    """A study's runs as tables; `predictions(run_id)` reads a final run's test predictions.

    study: the study run (one row); arms: one row per task x arm (search summary);
    trials: one row per search trial; finals: one row per final seed; epochs: one row per
    trial or final run and epoch. Every hyperparameter is its own typed column.
    """

    tracking_uri: str
    experiment: str
    cache_dir: Path
    runs: pd.DataFrame = field(repr=False)
    study: pd.DataFrame = field(repr=False)
    arms: pd.DataFrame = field(repr=False)
    trials: pd.DataFrame = field(repr=False)
    finals: pd.DataFrame = field(repr=False)
    epochs: pd.DataFrame = field(repr=False)

    @property
    def tasks(self) -> list[str]:
        """Task keys (foundation-dataset-fraction-split seed) that have runs, sorted."""
        keys = [t[Tag.TASK] for t in (self.arms, self.trials, self.finals) if len(t)]
        return sorted(set(pd.concat(keys).dropna())) if keys else []

    def predictions(self, run_id: str) -> pd.DataFrame | None:
        """The test predictions (image, patient, label_*, prob_*) a final run saved, or None."""
        cached = self.cache_dir / "predictions" / f"{run_id}.parquet"
        if not cached.is_file():
            if not _download_predictions(self.tracking_uri, run_id, cached):
                return None
        return pd.read_parquet(cached)


def load_study(tracking_uri: str, experiment: str, cache_dir: Path | None = None,
               refresh: bool = False) -> StudyData:
    """Read a study; reuse the parquet cache unless MLflow has new or changed runs."""
    runs = load_runs(tracking_uri, experiment)
    if runs.empty or tag(Tag.LEVEL) not in runs:
        raise ConfigError(f"experiment {experiment!r} at {tracking_uri} has no study runs yet: "
                          "run `cxr-study run` first")
    cache = Path(cache_dir) if cache_dir else default_cache_dir(tracking_uri, experiment)
    state = _run_states(runs)
    stamp = _fingerprint(runs, state)
    meta = _read_meta(cache)
    if not refresh and meta.get("fingerprint") == stamp:
        tables = {name: _read_table(cache, name, meta) for name in _TABLES}
        if all(t is not None for t in tables.values()):  # a deleted file: rebuild below
            return StudyData(tracking_uri, experiment, cache, runs, **tables)
    tables = build_tables(runs)
    old_epochs = None if refresh else _read_table(cache, "epochs", meta)
    reusable = {rid for rid, st in meta.get("runs", {}).items()
                if st[0] in TERMINAL and state.get(rid) == st} if old_epochs is not None else set()
    tables["epochs"] = _epochs(tracking_uri, tables["trials"], tables["finals"], old_epochs,
                               reusable)
    _write_cache(cache, tables, {"fingerprint": stamp, "runs": state})
    return StudyData(tracking_uri, experiment, cache, runs, **tables)


def default_cache_dir(tracking_uri: str, experiment: str) -> Path:
    """Beside a local store (sqlite file or mlruns folder); under ~/.cache for a server."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment).strip("_") or "experiment"
    slug = f"{slug}-{hashlib.sha1(experiment.encode()).hexdigest()[:8]}"
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        return Path(tracking_uri.removeprefix("sqlite:///")).parent / "analysis_cache" / slug
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path) or ".").resolve().parent / "analysis_cache" / slug
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    server = hashlib.sha1(tracking_uri.encode()).hexdigest()[:12]
    return base / "cxr-lora-study" / server / slug


# --- tidy tables from the runs frame ------------------------------------------------------------

def build_tables(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """study, arms, trials and finals tables from `load_runs` output (no epochs)."""
    level = _col(runs, tag(Tag.LEVEL))
    phase = _col(runs, tag(Tag.PHASE))
    has_trial = _col(runs, tag(Tag.TRIAL_ID)).notna()
    arms = _arm_table(runs[level == Level.ARM], runs[has_trial])
    kinds = dict(zip(zip(arms[Tag.TASK], arms[Tag.ARM]), arms[Tag.KIND]))
    trials = _trial_table(runs[(phase == Phase.SEARCH) & has_trial], kinds)
    finals = _final_table(runs[(phase == Phase.FINAL) & has_trial], kinds)
    arms = _legacy_task_factors(arms, trials if len(trials) else finals)
    study = runs[level == Level.STUDY].dropna(axis=1, how="all").reset_index(drop=True)
    return {"study": study, "arms": arms, "trials": trials, "finals": finals}


def _col(frame: pd.DataFrame, name: str) -> pd.Series:
    return frame[name] if name in frame else pd.Series(pd.NA, index=frame.index, dtype=object)


def _params(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c not in _INFO and not c.startswith((tag(""), metric("")))]


def _numeric(values: pd.Series) -> np.ndarray:
    return pd.to_numeric(values, errors="coerce").to_numpy()


def _tagged_kinds(frame: pd.DataFrame) -> list[str | None]:
    """Each run's kind: its `kind` tag, else its `kind` param; None for runs of older versions
    that carry neither."""
    return [known_kind(t) or known_kind(p)
            for t, p in zip(_col(frame, tag(Tag.KIND)), _col(frame, Param.KIND))]


def _ranked(children: pd.DataFrame) -> set[str]:
    """Legacy: the arm runs whose trials logged a LoRA rank (rank=0 meant full fine-tuning)."""
    ranks = pd.to_numeric(_col(children, Param.RANK), errors="coerce")
    return set(_col(children, tag(PARENT))[ranks > 0].dropna())


def _arm_table(arm_runs: pd.DataFrame, children: pd.DataFrame) -> pd.DataFrame:
    """One row per task x arm run: its tags, its params (`ArmParams`: the search and the task's
    factors) and the search summary the runner logged as metrics."""
    metrics = (Metric.BEST_VAL_AUROC, Metric.EPOCHS_SPENT, Metric.EPOCHS_SAVED,
               Metric.TRIALS_STOPPED_EARLY, Metric.TRIALS_FAILED, Metric.WALL_S,
               Metric.TRAINABLE_PARAMS, Metric.TOTAL_PARAMS)
    arm_runs = arm_runs.reset_index(drop=True)
    out = pd.DataFrame({
        "run_id": arm_runs["run_id"], Tag.TASK: _col(arm_runs, tag(Tag.TASK)),
        Tag.ARM: _col(arm_runs, tag(Tag.ARM)), "status": arm_runs["status"],
        Tag.SPACE: _col(arm_runs, tag(Tag.SPACE)).fillna(_col(arm_runs, Param.SPACE))})
    tagged = _tagged_kinds(arm_runs)
    if not all(tagged):  # runs of older versions: the space registry, then the trials' rank
        ranked = _ranked(children)
        tagged = [k or legacy_kind(s, r in ranked)
                  for k, s, r in zip(tagged, out[Tag.SPACE], out["run_id"])]
    out[Tag.KIND] = tagged
    for f in dataclasses.fields(ArmParams):
        if f.name not in out:
            out[f.name] = _col(arm_runs, f.name)
    # A tag, not a param: a grown search raises it (older versions also logged a param).
    out[Tag.TRIALS] = pd.Series(_numeric(_col(arm_runs, tag(Tag.TRIALS)))).fillna(
        pd.Series(_numeric(_col(arm_runs, Tag.TRIALS))))
    for name in metrics:
        out[name] = _numeric(_col(arm_runs, metric(name)))
    out = _typed_factors(out)
    out[Tag.TRIALS] = out[Tag.TRIALS].astype("Int64")
    return out.sort_values([Tag.TASK, Tag.ARM]).reset_index(drop=True)


def _typed_factors(arms: pd.DataFrame) -> pd.DataFrame:
    """Numeric arm params as numbers (integers as "Int64") whatever filled them."""
    for name, kind in PARAM_KINDS.items():
        if name in arms and kind in (int, float):
            values = pd.to_numeric(arms[name], errors="coerce")
            arms[name] = values.astype("Int64") if kind is int else values.astype(float)
    return arms


def _child_table(frame: pd.DataFrame, kinds: dict[tuple[str, str], str]) -> pd.DataFrame:
    """Columns shared by trial and final runs: ids, outcome, then every param."""
    out = pd.DataFrame({
        "run_id": frame["run_id"].to_numpy(),
        Tag.TASK: _col(frame, tag(Tag.TASK)).to_numpy(),
        Tag.ARM: _col(frame, tag(Tag.ARM)).to_numpy(),
        Tag.PHASE: _col(frame, tag(Tag.PHASE)).to_numpy(),
        Tag.TRIAL_ID: _col(frame, tag(Tag.TRIAL_ID)).to_numpy(),
        Tag.TRIAL_INDEX: _numeric(_col(frame, tag(Tag.TRIAL_INDEX))),
        "status": frame["status"].to_numpy(),
        Tag.EPOCHS_RUN: _numeric(_col(frame, tag(Tag.EPOCHS_RUN))),
        Tag.STOPPED_EARLY: _col(frame, tag(Tag.STOPPED_EARLY)).map(
            {TRUE: True, FALSE: False}).to_numpy(),
        Tag.ERROR: _col(frame, tag(Tag.ERROR)).to_numpy(),
        "start_time": pd.to_datetime(frame["start_time"], unit="ms").to_numpy(),
        "end_time": pd.to_datetime(frame["end_time"], unit="ms").to_numpy(),
    })
    out[Metric.WALL_S] = (out["end_time"] - out["start_time"]).dt.total_seconds()
    for name in (Tag.TRIAL_INDEX, Tag.EPOCHS_RUN):
        out[name] = out[name].astype("Int64")
    out[Tag.STOPPED_EARLY] = out[Tag.STOPPED_EARLY].astype("boolean")
    # Its own `kind` tag; runs of older versions take their arm's (which says how it knows).
    ranks = pd.to_numeric(_col(frame, Param.RANK), errors="coerce").to_numpy()
    out[Tag.KIND] = [k or kinds.get((t, a)) or ("lora" if r > 0 else "fft") for k, t, a, r in
                     zip(_tagged_kinds(frame), out[Tag.TASK], out[Tag.ARM], ranks)]
    for name in (Metric.BEST_VAL_AUROC, Metric.VAL_AUROC, Metric.VAL_AUPRC, Metric.TRAIN_LOSS,
                 Metric.TRAINABLE_PARAMS, Metric.TOTAL_PARAMS):
        out[name] = _numeric(_col(frame, metric(name)))
    out["trainable_pct"] = 100.0 * out[Metric.TRAINABLE_PARAMS] / out[Metric.TOTAL_PARAMS]
    # Params of other run levels (the study's `arms`, an arm's `preset`) are empty here.
    params = frame[[p for p in _params(frame) if p not in out.columns]].dropna(axis=1, how="all")
    return pd.concat([out, params.reset_index(drop=True)], axis=1)


def _trial_table(frame: pd.DataFrame, kinds: dict[tuple[str, str], str]) -> pd.DataFrame:
    if frame.empty:
        return pd.DataFrame(columns=["run_id", Tag.TASK, Tag.ARM, Tag.KIND, Tag.TRIAL_ID])
    out = _child_table(frame, kinds)
    out["failed"] = out["status"] == "FAILED"
    return out.sort_values([Tag.TASK, Tag.ARM, Tag.TRIAL_INDEX, "start_time"]).reset_index(
        drop=True)


def _final_table(frame: pd.DataFrame, kinds: dict[tuple[str, str], str]) -> pd.DataFrame:
    if frame.empty:
        return pd.DataFrame(columns=["run_id", Tag.TASK, Tag.ARM, Tag.KIND, Param.SEED,
                                     Metric.TEST_AUROC])
    out = _child_table(frame, kinds)
    # Test metrics (macro and per class), per-class validation AUROC, the best epoch.
    wanted = (metric("test_"), metric(f"{Metric.VAL_AUROC}_"), metric(Metric.BEST_EPOCH))
    tests = sorted(c for c in frame.columns if c.startswith(wanted))
    extra = {c.removeprefix(metric("")): _numeric(frame[c]) for c in tests}
    out = pd.concat([out, pd.DataFrame(extra)], axis=1)
    return out.sort_values([Tag.TASK, Tag.ARM, Param.SEED]).reset_index(drop=True)


def _legacy_task_factors(arms: pd.DataFrame, children: pd.DataFrame) -> pd.DataFrame:
    """Legacy: arm runs of older versions carry no task factors (foundation, dataset, label
    fraction, split seed); take them from a child run of the task. Arms that have them keep
    their own."""
    missing = arms[list(TASK_FACTORS)].isna().all(axis=1)
    have = [f for f in TASK_FACTORS if f in children]
    if not missing.any() or not have or children.empty:
        return arms
    first = children.groupby(Tag.TASK, sort=False)[have].first()
    for name in have:
        arms[name] = arms[name].astype(object).where(~missing, arms[Tag.TASK].map(first[name]))
    return _typed_factors(arms)


# --- epochs --------------------------------------------------------------------------------

def _epochs(tracking_uri: str, trials: pd.DataFrame, finals: pd.DataFrame,
            old: pd.DataFrame | None, reusable: set[str]) -> pd.DataFrame:
    """Per-epoch metrics of every trial and final run, long in epochs, wide in metrics."""
    keys = ["run_id", Tag.TASK, Tag.ARM, Tag.KIND, Tag.PHASE]
    children = pd.concat([t[keys] for t in (trials, finals) if len(t)], ignore_index=True) if (
        len(trials) or len(finals)) else pd.DataFrame(columns=keys)
    kept = old[old["run_id"].isin(reusable)] if old is not None and len(old) else None
    wanted = [r for r in children["run_id"] if r not in reusable]
    fresh = metric_histories(tracking_uri, wanted, EPOCH_METRICS)
    if len(fresh):
        fresh = (fresh.sort_values("timestamp")
                 .pivot_table(index=["run_id", Metric.EPOCH], columns="metric", values="value",
                              aggfunc="last").reset_index())
        fresh.columns.name = None
        fresh = fresh.merge(children, on="run_id", how="left")
    else:
        fresh = pd.DataFrame(columns=[*keys, Metric.EPOCH])
    parts = [p for p in (kept, fresh) if p is not None and len(p)]
    epochs = pd.concat(parts, ignore_index=True) if parts else fresh
    epochs = epochs[[*keys, Metric.EPOCH, *[m for m in EPOCH_METRICS if m in epochs]]]
    epochs[Metric.EPOCH] = epochs[Metric.EPOCH].astype("int64")
    return epochs.sort_values([Tag.TASK, Tag.ARM, Tag.PHASE, "run_id", Metric.EPOCH]).reset_index(
        drop=True)


# --- cache ---------------------------------------------------------------------------------

def _run_states(runs: pd.DataFrame) -> dict[str, list]:
    """run_id -> [status, end_time, digest of latest metrics while it is still running]."""
    metric_cols = [c for c in runs.columns if c.startswith(metric(""))]
    states = {}
    for row in runs.itertuples(index=False):
        status = row.status
        end = None if pd.isna(row.end_time) else int(row.end_time)
        live = ""
        if status not in TERMINAL:
            values = runs.loc[runs["run_id"] == row.run_id, metric_cols].to_numpy(dtype=float)
            live = hashlib.sha1(np.nan_to_num(values, nan=-1.0).tobytes()).hexdigest()[:12]
        states[row.run_id] = [status, end, live]
    return states


def _fingerprint(runs: pd.DataFrame, states: dict[str, list]) -> str:
    body = json.dumps([CACHE_VERSION, sorted((k, *v) for k, v in states.items()),
                       sorted(runs.columns)], default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def _read_meta(cache: Path) -> dict:
    path = cache / "cache.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _read_table(cache: Path, name: str, meta: dict) -> pd.DataFrame | None:
    path = cache / f"{name}.parquet"
    if not path.is_file():
        return None
    frame = pd.read_parquet(path)
    for column in meta.get("json_columns", {}).get(name, []):
        frame[column] = [json.loads(v) if isinstance(v, str) else v for v in frame[column]]
    return frame


def _write_cache(cache: Path, tables: dict[str, pd.DataFrame], meta: dict) -> None:
    """Parquet per table; dict/list cells go in as JSON text and are decoded on read."""
    cache.mkdir(parents=True, exist_ok=True)
    encoded: dict[str, list[str]] = {}
    for name, frame in tables.items():
        frame = frame.copy()
        for column in frame.columns:
            if frame[column].dtype == object and frame[column].map(
                    lambda v: isinstance(v, (dict, list))).any():
                frame[column] = [json.dumps(v) if isinstance(v, (dict, list)) else v
                                 for v in frame[column]]
                encoded.setdefault(name, []).append(column)
            elif frame[column].dtype == object:  # mixed scalars (a param that is 1 or "a")
                kinds = {type(v) for v in frame[column] if v is not None and not (
                    isinstance(v, float) and np.isnan(v))}
                if len(kinds) > 1:
                    frame[column] = [None if v is None else str(v) for v in frame[column]]
        frame.to_parquet(cache / f"{name}.parquet", index=False)
    (cache / "cache.json").write_text(json.dumps({**meta, "json_columns": encoded}))


def _download_predictions(tracking_uri: str, run_id: str, target: Path) -> bool:
    """Copy the run's prediction parquet (seed<k>.parquet) into the cache; False if absent."""
    client = MlflowClient(tracking_uri)
    names = [a.path for a in client.list_artifacts(run_id) if a.path.endswith(".parquet")]
    if not names:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp, _quiet_downloads():
        local = client.download_artifacts(run_id, sorted(names)[0], tmp)
        shutil.move(local, target)
    return True


@contextmanager
def _quiet_downloads():
    """MLflow draws a progress bar per download: noise in a report or a notebook cell."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
