"""What a Tune trial costs beyond its fit, measured side by side in one run.

The same small fit (LoRA r4 q+v on `vit_demo`, phantom NIH data, one thread) runs N times three
ways, one trial at a time:

- `bare`: `fit` called directly in this process, reporting to a list;
- `local`: Tune trials running the fit through Ray Train's local mode (the one-worker path);
- `worker group`: Tune trials running the fit on a one-worker Ray Train worker group (the
  multi-worker path, `[resources] local_mode = false`).

For each it prints the wall time per trial, the time from the trial's start to its first
report, and the throughput ratio against the bare loop. For Tune, a trial starts when Tune
calls `on_trial_start` (its process is up: started for the first trial, reused by the later
ones) and a report counts when the driver receives it; "whole run / trials" also counts Tune's
set-up and the trial process's start (its imports), paid once per search. Goal: first report
within 3 s of the trial's start and a ratio of at least 0.9 for trials of about 10 s of work.

    python benchmarks/trial_overhead.py [--trials 4] [--epochs 6] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import torch  # noqa: E402
from ray import tune  # noqa: E402

from benchmarks._table import print_rows  # noqa: E402
from contract.config import RunSettings, TrialSpec  # noqa: E402
from contract.schema import task_key  # noqa: E402
from study.cluster import init_ray  # noqa: E402
from trainables.cache import build_cache  # noqa: E402
from trainables.datasets import DataSpec, load_splits  # noqa: E402
from trainables.fit import fit  # noqa: E402
from trainables.phantom import PhantomLayout, write_nih_phantom  # noqa: E402
from trainables.ray_train import trainable, trial_resources  # noqa: E402


def trial_config(epochs: int) -> dict:
    """The flat form Tune searches: task factors, arm and recipe (no paths, no resources)."""
    return {"arm": "lora", "kind": "lora", "task": task_key("demo", "nih", 1.0, 0),
            "foundation": "demo", "model": "vit_demo", "dataset": "nih", "label_fraction": 1.0,
            "split_seed": 0, "num_classes": 14, "epochs": epochs, "warmup_epochs": 1,
            "optimizer": "adamw", "lr": 1e-3, "batch_size": 32, "seed": 0, "rank": 4,
            "alpha": 8.0, "targets": "q+v"}


def run_settings(cache: Path, storage: Path, local_mode: bool) -> RunSettings:
    """Paths and resources: one 1-CPU worker, in local mode or as a worker group."""
    return RunSettings(cache_dir=str(cache), storage_path=str(storage / "train"),
                       checkpoints_to_keep=2, num_workers=1, cpus_per_worker=1,
                       gpus_per_worker=0, local_mode=local_mode)


class Stamps:
    """Trial start and report times, per trial, on one clock."""

    def __init__(self) -> None:
        self.start: dict[str, float] = {}
        self.reports: dict[str, list[float]] = {}
        self.total = 0.0  # the whole run: every trial, Tune's set-up and process starts


class Clock(tune.Callback):
    def __init__(self, stamps: Stamps) -> None:
        self.stamps = stamps

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.stamps.start[trial.trial_id] = time.perf_counter()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.stamps.reports.setdefault(trial.trial_id, []).append(time.perf_counter())


class ListReporter:
    def __init__(self, stamps: Stamps, key: str) -> None:
        self.stamps, self.key = stamps, key

    def report(self, metrics, checkpoint_dir) -> None:
        self.stamps.reports.setdefault(self.key, []).append(time.perf_counter())

    def latest_checkpoint(self):
        return None


def run_bare(config: dict, run: RunSettings, trials: int) -> Stamps:
    stamps = Stamps()
    begin = time.perf_counter()
    for i in range(trials):
        spec = TrialSpec.from_tune({**config, "seed": i}, run)
        stamps.start[str(i)] = time.perf_counter()
        fit(spec, ListReporter(stamps, str(i)))
    stamps.total = time.perf_counter() - begin
    return stamps


def run_tune(config: dict, run: RunSettings, trials: int, storage: Path, name: str) -> Stamps:
    stamps = Stamps()
    resources = trial_resources(run.num_workers, run.cpus_per_worker, run.gpus_per_worker,
                                run.local_mode)
    tuner = tune.Tuner(
        trainable(run, resources),
        param_space={**config, "seed": tune.grid_search(list(range(trials)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(storage / "tune"), verbose=0,
                                  callbacks=[Clock(stamps)]))
    begin = time.perf_counter()
    grid = tuner.fit()
    stamps.total = time.perf_counter() - begin
    assert grid.num_errors == 0, [r.error for r in grid if r.error]
    return stamps


def summary(stamps: Stamps) -> dict[str, float]:
    keys = sorted(stamps.start, key=stamps.start.get)
    first = [stamps.reports[k][0] - stamps.start[k] for k in keys]
    wall = [stamps.reports[k][-1] - stamps.start[k] for k in keys]
    return {"total": stamps.total / len(keys),
            "wall": statistics.mean(wall), "wall_later": statistics.mean(wall[1:] or wall),
            "first": first[0], "first_later": statistics.mean(first[1:] or first),
            "first_max_later": max(first[1:] or first)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="3 trials of 3 epochs")
    args = parser.parse_args()
    trials, epochs = (3, 3) if args.quick else (args.trials, args.epochs)
    torch.set_num_threads(1)  # the trials use one CPU each
    work = Path(tempfile.mkdtemp(prefix="trial-overhead-"))
    root = write_nih_phantom(work / "nih", seed=3, layout=PhantomLayout(train_patients=300))
    splits = load_splits(DataSpec("nih", str(root), splits="lists", list_dir=str(root)))
    cache = build_cache(splits, 48, work / "cache", workers=1)
    init_ray(num_cpus=2)
    try:
        config = trial_config(epochs)
        results = {
            "bare": summary(run_bare(config, run_settings(cache, work, True), trials)),
            "local": summary(run_tune(config, run_settings(cache, work, True), trials, work,
                                      "local")),
            "group": summary(run_tune(config, run_settings(cache, work, False), trials, work,
                                      "group")),
        }
    finally:
        ray.shutdown()
    bare = results["bare"]["wall_later"]
    print(f"{trials} trials x {epochs} epochs of LoRA r4 on vit_demo, one at a time, 1 thread")
    print_rows(results, [
        ("whole run / trials, s", lambda r: r["total"], "{:.2f}"),
        ("wall per trial, s (all)", lambda r: r["wall"], "{:.2f}"),
        ("wall per trial, s (after the first)", lambda r: r["wall_later"], "{:.2f}"),
        ("first trial: start to first report, s", lambda r: r["first"], "{:.2f}"),
        ("later trials: start to first report, s", lambda r: r["first_later"], "{:.2f}"),
        ("later trials: worst first report, s", lambda r: r["first_max_later"], "{:.2f}"),
        ("throughput vs bare (after the first)", lambda r: bare / r["wall_later"], "{:.3f}"),
        ("throughput vs bare (all)", lambda r: results["bare"]["wall"] / r["wall"], "{:.3f}"),
        ("throughput vs bare (whole run)", lambda r: results["bare"]["total"] / r["total"],
         "{:.3f}"),
    ], column_titles=["bare loop", "local mode", "worker group (1)"])


if __name__ == "__main__":
    main()
