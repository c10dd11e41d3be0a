"""What a study costs as it grows: driver time per trial, and the report over many trial runs.

(a) Driver cost per trial. The same search (one LoRA arm on `vit_demo`, phantom NIH data,
`max_t = 1`, no final seeds) runs with a small and a large trial count; around `run_study` the
driver process's own CPU time (Tune's loop, the MLflow writer thread, Optuna's storage) and the
wall time are divided by the trial count. Goal: per-trial cost flat in the trial count (ratio
large/small near 1). Per-study costs (Tune's start, the first trial actors) weigh more on the
small search, so the driver CPU between trial ends is also compared between the first and the
second half of the large search. The pieces are timed on their own, in this process: the MLflow
trial tracker driven through Tune's callbacks (and its `search_runs` by trial_id, in a fresh
experiment and in the report's full store), and Optuna's ask/tell on the study's RDB storage
against an in-memory one.

(b) `cxr-study report` (`write_report`) on a synthetic MLflow store of that many trial runs
(`tests/synthetic_study.py`), with the per-epoch histories fetched the old way (a
`get_metric_history` call per run and metric) and the new way (one bulk query per metric),
side by side; the two epoch tables must be equal. Goal: the report within 60 s at 600 runs.

    python benchmarks/study_scale.py [--trials 20 100] [--runs 600] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from benchmarks._scratch import scratch  # noqa: E402
from benchmarks._study_scale_report import bench_report, print_report  # noqa: E402
from benchmarks._table import print_rows  # noqa: E402
from contract.schema import PARENT, Level, Metric, Param, Phase, Tag  # noqa: E402

# --- (a) the driver -----------------------------------------------------------------------

def study_doc(work: Path, data: Path, name: str, trials: int) -> dict:
    """One LoRA arm, one epoch per trial, no final phase; a shared image cache and MLflow store
    so only the first study pays for building them."""
    return {
        "study": {"name": name, "storage": str(work / name), "cache_dir": str(work / "cache")},
        "tasks": {"foundations": [{"name": "demo"}],
                  "datasets": [{"name": "nih", "root": str(data), "splits": "lists",
                                "list_dir": str(data)}],
                  "label_fractions": [1.0]},
        "arms": {"lora": {"space": "lora", "trials": trials}},
        "search": {"seed": 0, "max_t": 1, "grace_period": 1, "reduction_factor": 2},
        "train": {"batch_size": 32, "warmup_epochs": 0},
        "final": {"seeds": 0},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": name},
    }


@contextlib.contextmanager
def trial_stamps(starts: list[float], ends: list[tuple[float, float]]) -> Iterator[None]:
    """Wall time each trial starts, (driver CPU, wall) each time one ends: taken in the MLflow
    tracker's callbacks, which Tune calls in the driver."""
    from study.tracking import MlflowTrialTracker
    on_start, on_complete = MlflowTrialTracker.on_trial_start, MlflowTrialTracker.on_trial_complete

    def started(self, *args, **kwargs):
        starts.append(time.perf_counter())
        on_start(self, *args, **kwargs)

    def completed(self, *args, **kwargs):
        on_complete(self, *args, **kwargs)
        ends.append((time.process_time(), time.perf_counter()))
    MlflowTrialTracker.on_trial_start, MlflowTrialTracker.on_trial_complete = started, completed
    try:
        yield
    finally:
        MlflowTrialTracker.on_trial_start, MlflowTrialTracker.on_trial_complete = (
            on_start, on_complete)


def driver_cost(work: Path, data: Path, name: str, trials: int) -> dict[str, float]:
    """Per trial over the whole run_study, and between trial ends in the first and the second
    half of the search (no per-study start or end in those: growth shows as late > early)."""
    from study.config import parse_study
    from study.runner import run_study
    cfg = parse_study(study_doc(work, data, name, trials), work)
    # run_study writes its state file before anything creates the storage folder when the
    # image cache lives elsewhere (as here, shared between the studies).
    cfg.storage.mkdir(parents=True, exist_ok=True)
    starts: list[float] = []
    stamps: list[tuple[float, float]] = []
    cpu, wall = time.process_time(), time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), trial_stamps(starts, stamps):
        (outcome,) = run_study(cfg, emit=lambda s: None)  # (stdout: a line per trial)
    end_cpu, end_wall = time.process_time(), time.perf_counter()
    assert outcome.trials == trials == len(stamps), (outcome.trials, trials, len(stamps))
    out = {"trials": trials, "cpu": end_cpu - cpu, "wall": end_wall - wall,
           "cpu_per": (end_cpu - cpu) / trials, "wall_per": (end_wall - wall) / trials,
           "wall_to_start": starts[0] - wall, "wall_to_first": stamps[0][1] - wall,
           "wall_after_last": end_wall - stamps[-1][1]}
    if trials >= 4:
        a, b, c = trials // 10, trials // 2, trials - 1
        out.update(cpu_early=(stamps[b][0] - stamps[a][0]) / (b - a),
                   cpu_late=(stamps[c][0] - stamps[b][0]) / (c - b),
                   wall_early=(stamps[b][1] - stamps[a][1]) / (b - a),
                   wall_late=(stamps[c][1] - stamps[b][1]) / (c - b))
    return out


def bench_driver(work: Path, sizes: tuple[int, int], quick: bool) -> dict[str, dict[str, float]]:
    import torch

    from study.cluster import init_ray
    from study.config import parse_study
    from study.preflight import preflight, prepare_caches
    from trainables.phantom import PhantomLayout, write_nih_phantom
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*fewer than 50 positives")  # a tiny val split
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    data = write_nih_phantom(work / "nih", seed=3, layout=PhantomLayout(
        train_patients=60, val_patients=30, test_patients=30))
    # No trial's cost: the image cache, the MLflow tables, Ray's start, and a first small
    # search for what Tune and Train import and start once per process.
    cfg = parse_study(study_doc(work, data, "warmup", 2), work)
    prepare_caches(cfg, preflight(cfg), lambda s: None)
    MlflowClient(cfg.tracking.uri).search_experiments()
    init_ray(num_cpus=os.cpu_count())
    driver_cost(work, data, "warmup", 1 if quick else 2)
    out = {f"{n} trials": driver_cost(work, data, f"scale-{n}", n) for n in sizes}
    if not quick:  # the small search once more: what changed meanwhile on a shared machine
        out[f"{sizes[0]} trials again"] = driver_cost(work, data, "scale-again", sizes[0])
    return out


def _trial(i: int) -> SimpleNamespace:
    return SimpleNamespace(trial_id=f"t{i:05d}", experiment_tag=f"{i + 1}_lr=0.01",
                           config={Param.LR: 0.01, Param.RANK: 8, Param.ALPHA: 16.0,
                                   Param.TARGETS: "q+v"},
                           last_result={}, error_file=None)


def tracker_cost(work: Path, trials: int, epochs: int = 1) -> dict[str, float]:
    """MlflowTrialTracker (writing inline) through Tune's callbacks, a fresh experiment."""
    from study.tracking import MlflowTrialTracker, start_run
    uri = f"sqlite:///{work / 'tracker.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(f"tracker-{trials}",
                                   artifact_location=(work / f"art-{trials}").as_uri())
    parent = start_run(client, exp, "arm", {Tag.LEVEL: Level.ARM})
    tracker = MlflowTrialTracker(client, exp, parent, {Tag.ARM: "lora", Tag.PHASE: Phase.SEARCH},
                                 epochs, work / f"backlog-{trials}.jsonl", background=False)
    per = []
    for i in range(trials):
        trial, cpu = _trial(i), time.process_time()
        tracker.on_trial_start(0, [], trial)
        for epoch in range(1, epochs + 1):
            tracker.on_trial_result(0, [], trial, {Metric.EPOCH: epoch, Metric.VAL_AUROC: 0.6,
                                                   Metric.BEST_VAL_AUROC: 0.6,
                                                   Metric.TRAIN_LOSS: 0.5})
        tracker.on_trial_complete(0, [], trial)
        per.append(time.process_time() - cpu)

    def lookup(trial_id: str) -> float:
        start = time.perf_counter()
        for _ in range(5):
            client.search_runs([exp], filter_string=f"tags.{Tag.TRIAL_ID} = '{trial_id}' and "
                               f"tags.`{PARENT}` = '{parent}'", max_results=2)
        return (time.perf_counter() - start) / 5
    tenth = max(1, trials // 10)
    return {"cpu_per": statistics.mean(per), "first": statistics.mean(per[:tenth]),
            "last": statistics.mean(per[-tenth:]), "lookup": lookup("t-new")}


def optuna_cost(work: Path, trials: int, rdb: bool) -> dict[str, float]:
    """Ask, the LoRA space, one report, tell: as OptunaSearch drives a study per trial."""
    from search_spaces import get_space
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{work / f'optuna-{trials}.db'}") if (
        rdb) else None
    study = optuna.create_study(study_name=f"s{trials}", storage=storage, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=0))
    space = get_space("lora").fn
    per = []
    for i in range(trials):
        cpu = time.process_time()
        trial = study.ask()
        space(trial, "adamw", None)
        trial.report(0.6, 1)
        study.tell(trial, 0.5 + 0.001 * i)
        per.append(time.process_time() - cpu)
    tenth = max(1, trials // 10)
    return {"cpu_per": statistics.mean(per), "first": statistics.mean(per[:tenth]),
            "last": statistics.mean(per[-tenth:])}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def print_driver(driver: dict, tracker: dict, optuna_rdb: dict, optuna_mem: dict,
                 sizes: tuple[int, int]) -> None:
    smalls = [r for k, r in driver.items() if k.startswith(f"{sizes[0]} trials")]
    large = driver[f"{sizes[1]} trials"]
    small = {k: statistics.mean(r[k] for r in smalls) for k in ("cpu", "cpu_per", "wall_per")}
    marginal = (large["cpu"] - small["cpu"]) / (sizes[1] - sizes[0])
    print(f"(a) driver per trial: LoRA on vit_demo, max_t = 1, phantom NIH, no final seeds, "
          f"{os.cpu_count()} CPUs")
    print_rows(driver, [
        ("driver CPU per trial, ms", lambda r: 1000 * r["cpu_per"], "{:.1f}"),
        ("wall per trial, s", lambda r: r["wall_per"], "{:.2f}"),
        ("driver CPU total, s", lambda r: r["cpu"], "{:.1f}"),
        ("wall total, s", lambda r: r["wall"], "{:.1f}"),
        ("  wall until the first trial started, s", lambda r: r["wall_to_start"], "{:.1f}"),
        ("  wall until the first trial ended, s", lambda r: r["wall_to_first"], "{:.1f}"),
        ("  wall after the last trial ended, s", lambda r: r["wall_after_last"], "{:.1f}"),
        ("between trial ends, 1st half: CPU ms", lambda r: _ms(r.get("cpu_early")), "{:.1f}"),
        ("between trial ends, 2nd half: CPU ms", lambda r: _ms(r.get("cpu_late")), "{:.1f}"),
        ("between trial ends, 1st half: wall s", lambda r: r.get("wall_early"), "{:.2f}"),
        ("between trial ends, 2nd half: wall s", lambda r: r.get("wall_late"), "{:.2f}"),
    ])
    print(f"ratio {sizes[1]}/{sizes[0]} trials, driver CPU per trial: "
          f"{large['cpu_per'] / small['cpu_per']:.2f}; wall per trial: "
          f"{large['wall_per'] / small['wall_per']:.2f} (goal: about 1"
          f"{'; small: mean of both runs' if len(smalls) > 1 else ''})")
    print(f"marginal driver CPU per added trial ({sizes[0]}->{sizes[1]}): {1000 * marginal:.1f} "
          f"ms; fixed per study: {small['cpu'] - sizes[0] * marginal:.2f} s")
    if "cpu_late" in large:
        print(f"{sizes[1]} trials, 2nd half / 1st half per trial: driver CPU "
              f"{large['cpu_late'] / large['cpu_early']:.2f}, wall "
              f"{large['wall_late'] / large['wall_early']:.2f} (growth shows as > 1)")
    print()
    pieces = {f"{n}": {"tracker": tracker[n], "rdb": optuna_rdb[n], "mem": optuna_mem[n]}
              for n in sizes}
    print_rows(pieces, [
        ("MLflow tracker CPU per trial, ms", lambda r: 1000 * r["tracker"]["cpu_per"], "{:.1f}"),
        ("  first tenth of the trials, ms", lambda r: 1000 * r["tracker"]["first"], "{:.1f}"),
        ("  last tenth of the trials, ms", lambda r: 1000 * r["tracker"]["last"], "{:.1f}"),
        ("  search_runs by trial_id at the end, ms", lambda r: 1000 * r["tracker"]["lookup"],
         "{:.1f}"),
        ("Optuna RDB ask/tell CPU per trial, ms", lambda r: 1000 * r["rdb"]["cpu_per"], "{:.1f}"),
        ("  first tenth of the trials, ms", lambda r: 1000 * r["rdb"]["first"], "{:.1f}"),
        ("  last tenth of the trials, ms", lambda r: 1000 * r["rdb"]["last"], "{:.1f}"),
        ("Optuna in-memory ask/tell CPU per trial, ms", lambda r: 1000 * r["mem"]["cpu_per"],
         "{:.1f}"),
    ], column_titles=[f"{n} trials" for n in sizes])
    t_small, t_large = tracker[sizes[0]]["cpu_per"], tracker[sizes[1]]["cpu_per"]
    o_small, o_large = optuna_rdb[sizes[0]]["cpu_per"], optuna_rdb[sizes[1]]["cpu_per"]
    print(f"ratio {sizes[1]}/{sizes[0]} per trial: tracker {t_large / t_small:.2f}, Optuna RDB "
          f"{o_large / o_small:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, nargs=2, default=(20, 100),
                        help="the small and the large search")
    parser.add_argument("--runs", type=int, default=600, help="trial runs in the report's store")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--skip-driver", action="store_true", help="only part (b)")
    parser.add_argument("--skip-report", action="store_true", help="only part (a)")
    parser.add_argument("--quick", action="store_true", help="8 and 24 trials, 150 runs")
    args = parser.parse_args()
    sizes = (8, 24) if args.quick else tuple(args.trials)
    runs = 150 if args.quick else args.runs
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    began = time.perf_counter()
    with scratch("study-scale-") as work:
        if not args.skip_report:
            print_report(*bench_report(work, runs, args.n_boot, args.quick))
            print()
        if not args.skip_driver:
            tracker = {n: tracker_cost(work, n) for n in sizes}
            rdb = {n: optuna_cost(work, n, rdb=True) for n in sizes}
            mem = {n: optuna_cost(work, n, rdb=False) for n in sizes}
            driver = bench_driver(work, sizes, args.quick)
            print_driver(driver, tracker, rdb, mem, sizes)
    print(f"\n(benchmark wall time {time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
