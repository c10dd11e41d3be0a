"""Part (b) of `study_scale.py`: `cxr-study report` over a synthetic store of many trial runs,
with the per-epoch histories fetched per run (the old way) and in bulk (the new way)."""

from __future__ import annotations

import contextlib
import functools
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from benchmarks._table import print_rows
from contract.schema import PARENT, Metric, Tag

REPORT_LIMIT_S = 60.0

# --- (b) the report -----------------------------------------------------------------------

def epochs_per_run_calls(tracking_uri: str, trials: pd.DataFrame, finals: pd.DataFrame,
                         old: pd.DataFrame | None, reusable: set[str]) -> pd.DataFrame:
    """`analysis.study_data._epochs` as it was: one get_metric_history call per run and key."""
    from analysis.study_data import EPOCH_METRICS
    client = MlflowClient(tracking_uri)
    keys = ["run_id", Tag.TASK, Tag.ARM, Tag.KIND, Tag.PHASE]
    children = pd.concat([t[keys] for t in (trials, finals) if len(t)], ignore_index=True) if (
        len(trials) or len(finals)) else pd.DataFrame(columns=keys)
    kept = old[old["run_id"].isin(reusable)] if old is not None and len(old) else None
    rows = []
    for run in children.itertuples(index=False):
        if run.run_id in reusable:
            continue
        for key in EPOCH_METRICS:
            for m in client.get_metric_history(run.run_id, key):
                rows.append((run.run_id, int(m.step), key, m.timestamp, float(m.value)))
    fresh = pd.DataFrame(rows, columns=["run_id", Metric.EPOCH, "metric", "timestamp", "value"])
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


@contextlib.contextmanager
def timed(spans: dict[str, float], targets: list[tuple[object, str, str]]) -> Iterator[None]:
    """Add each call's seconds of module.function to spans[label] while inside."""
    saved = []
    for module, name, label in targets:
        original = getattr(module, name)

        def wrapper(*args, _original=original, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spans[_label] = spans.get(_label, 0.0) + time.perf_counter() - start
        saved.append((module, name, original))
        setattr(module, name, functools.wraps(original)(wrapper))
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def report_once(tracking_uri: str, experiment: str, out: Path, n_boot: int,
                epochs_fn: Callable | None) -> dict[str, float]:
    """A cold report (no analysis cache), with `epochs_fn` standing in for `_epochs`."""
    import analysis.report as report
    import analysis.study_data as study_data
    from analysis.study_data import default_cache_dir
    shutil.rmtree(default_cache_dir(tracking_uri, experiment), ignore_errors=True)
    spans: dict[str, float] = {}
    targets = [(study_data, "load_runs", "load_runs"), (study_data, "_epochs", "epochs"),
               (report, "load_study", "load_study"), (report, "compare_arms", "compare"),
               (report, "param_importance", "fanova"), (report.plots, "save", "figures")]
    original = study_data._epochs
    try:
        if epochs_fn is not None:
            study_data._epochs = epochs_fn
        with timed(spans, targets):
            start = time.perf_counter()
            report.write_report(tracking_uri, experiment, out, n_boot=n_boot)
            spans["total"] = time.perf_counter() - start
    finally:
        study_data._epochs = original
    return spans


def fanova_cost(tracking_uri: str, experiment: str) -> dict[str, dict[str, float]]:
    """fANOVA (Optuna's evaluator) on a quarter of each arm's trials and on all of them."""
    from analysis.importance import param_importance
    from analysis.study_data import load_study
    data = load_study(tracking_uri, experiment)
    out = {}
    for share in (4, 1):
        trials = pd.concat([g.head(max(3, len(g) // share))
                            for _, g in data.trials.groupby([Tag.TASK, Tag.ARM])])
        start = time.perf_counter()
        param_importance(trials, data.arms)
        seconds = time.perf_counter() - start
        out[f"1/{share}"] = {"trials": len(trials), "s": seconds, "per": seconds / len(trials)}
    return out


def bench_report(work: Path, runs: int, n_boot: int, quick: bool) -> tuple[dict, dict, dict]:
    """Quick: the epoch histories side by side, one report (the new way), no fANOVA probe."""
    from analysis.runs import load_runs
    from analysis.study_data import _epochs, build_tables
    from tests.synthetic_study import DEFAULT_TASKS, write_synthetic_study
    per_arm = max(2, -(-runs // (2 * len(DEFAULT_TASKS))))
    start = time.perf_counter()
    study = write_synthetic_study(work / "synthetic", trials=per_arm)
    written = time.perf_counter() - start
    uri, experiment = study.tracking_uri, study.experiment
    tables = build_tables(load_runs(uri, experiment))
    trial_runs = len(tables["trials"])
    print(f"(b) report over {trial_runs} trial runs + {len(tables['finals'])} final runs "
          f"(synthetic store written in {written:.0f} s)")
    histories = {}
    for label, fn in (("before: a call per run", epochs_per_run_calls),
                      ("after: a bulk query", _epochs)):
        start = time.perf_counter()
        frame = fn(uri, tables["trials"], tables["finals"], None, set())
        histories[label] = {"s": time.perf_counter() - start, "frame": frame, "rows": len(frame)}
    frames = [h["frame"] for h in histories.values()]
    pd.testing.assert_frame_equal(frames[0], frames[1])
    lookups = trial_lookup(uri, experiment, tables["trials"])
    reports = {} if quick else {"before": report_once(
        uri, experiment, work / "report-before", n_boot, epochs_per_run_calls)}
    reports["after"] = report_once(uri, experiment, work / "report-after", n_boot, None)
    facts = {"trial_runs": trial_runs, "runs": len(tables["trials"]) + len(
        tables["finals"]) + len(tables["arms"]) + 1, **lookups}
    if not quick:
        facts.update(same=_same_report(work / "report-before", work / "report-after"),
                     fanova=fanova_cost(uri, experiment))
    return histories, reports, facts


def trial_lookup(tracking_uri: str, experiment: str, trials: pd.DataFrame) -> dict[str, float]:
    """The tracker's query for a trial's run (`MlflowTrialTracker._run`), in a full store: a
    trial that has a run and a new one that has none."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment).experiment_id
    parent = client.get_run(trials["run_id"].iloc[-1]).data.tags[PARENT]
    out = {}
    for label, trial_id in (("lookup_hit", trials[Tag.TRIAL_ID].iloc[-1]),
                            ("lookup_miss", "new")):
        start = time.perf_counter()
        for _ in range(10):
            client.search_runs([exp], filter_string=f"tags.{Tag.TRIAL_ID} = '{trial_id}' and "
                               f"tags.`{PARENT}` = '{parent}'", max_results=2)
        out[label] = (time.perf_counter() - start) / 10
    return out


def _same_report(a: Path, b: Path) -> bool:
    """The Markdown of both reports matches, but for the time each was written."""
    def text(folder: Path) -> list[str]:
        return [ln for ln in (folder / "report.md").read_text().splitlines()
                if "report written" not in ln]
    return text(a) == text(b)


def print_report(histories: dict, reports: dict, facts: dict) -> None:
    print_rows(histories, [
        ("epoch histories of every run, s", lambda r: r["s"], "{:.2f}"),
        ("epoch table rows", lambda r: r["rows"], "{:.0f}"),
    ])
    before, after = (h["s"] for h in histories.values())
    print(f"epoch histories: {before / after:.1f}x faster, tables equal")
    print()
    print_rows(reports, [
        ("write_report (cold cache), s", lambda r: r["total"], "{:.1f}"),
        ("  load_study, s", lambda r: r.get("load_study"), "{:.1f}"),
        ("    load_runs (one search_runs), s", lambda r: r.get("load_runs"), "{:.1f}"),
        ("    epoch histories, s", lambda r: r.get("epochs"), "{:.1f}"),
        ("  LoRA vs FFT with bootstrap, s", lambda r: r.get("compare"), "{:.1f}"),
        ("  fANOVA importance, s", lambda r: r.get("fanova"), "{:.1f}"),
        ("  figures (PNG + SVG), s", lambda r: r.get("figures"), "{:.1f}"),
    ])
    print(f"the tracker's trial lookup (search_runs by trial_id) in this store of "
          f"{facts['runs']} runs: {1000 * facts['lookup_hit']:.1f} ms found, "
          f"{1000 * facts['lookup_miss']:.1f} ms new")
    total = reports["after"]["total"]
    if "before" in reports:
        print(f"report after/before: {total / reports['before']['total']:.2f}; report.md "
              f"identical: {facts['same']}")
    print(f"report: {total:.1f} s at {facts['trial_runs']} trial runs (goal <= "
          f"{REPORT_LIMIT_S:.0f} s at 600): {'met' if total <= REPORT_LIMIT_S else 'NOT met'}")
    if "fanova" not in facts:
        return
    fanova = facts["fanova"]
    quarter, full = fanova["1/4"], fanova["1/1"]
    print(f"fANOVA s per trial: {quarter['per'] * 1000:.1f} ms at {quarter['trials']} trials, "
          f"{full['per'] * 1000:.1f} ms at {full['trials']} (ratio "
          f"{full['per'] / quarter['per']:.2f}; Optuna's evaluator)")
