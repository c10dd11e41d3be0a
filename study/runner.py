"""Run a study: per task, prepare the data cache; per arm, an Optuna + ASHA search through Ray
Tune, each trial a Ray Train run; then retrain each arm's best config with the final seeds and
score it on test. MLflow gets the whole hierarchy through `study.tracking`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune import Callback, FailureConfig, RunConfig, TuneConfig, Tuner
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from ray.util.placement_group import PlacementGroup, remove_placement_group

from search_spaces import default_optimizer, fft_recipe, get_space, lora_recipe, preset_point
from search_spaces.presets import Recipe, demo_recipes
from study.config import ArmSpec, StudyConfig, TaskSpec
from study.tracking import MlflowTrialTracker, connect, end_run, provenance, start_run
from trainables.cache import build_cache, label_names
from trainables.datasets import load_splits
from trainables.errors import ConfigError
from trainables.foundation import get_foundation
from trainables.models import get_backbone
from trainables.ray_train import tune_trial

# Train polls its workers this often; Ray's default of 2 s adds up to 2 s to every report.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
# The Tune trial only waits on its Train workers, which hold the CPUs; it reserves no CPU
# itself (a bundle cannot be empty, so it asks for a token amount of memory) so that N
# single-CPU workers give N concurrent trials instead of a deadlock.
TRIAL_RESOURCES = {"CPU": 0, "memory": 1 << 20}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Local Ray by default (dashboard on 127.0.0.1: Train inside Tune needs the state API)."""
    if ray.is_initialized():
        return
    os.environ.update(RAY_ENV)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune status tables
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": RAY_ENV}, "log_to_driver": False,
                              "configure_logging": False}
    if address:
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure to join is the user's to fix
            raise ConfigError(f"--address {address}: cannot join the Ray cluster "
                              f"({type(exc).__name__}): check the address and token") from exc
        return
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True,
             dashboard_host="127.0.0.1", object_store_memory=1_000_000_000, **kwargs)


def concurrency(cfg: StudyConfig) -> int:
    """How many trials fit at once; a trial that can never be placed is a ConfigError."""
    cluster = ray.cluster_resources()
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    res = cfg.resources
    fits_cpu = int(cpus // res.cpus_per_trial)
    fits_gpu = int(gpus // (res.num_workers * res.gpus_per_worker)) if res.gpus_per_worker else (
        fits_cpu)
    fits = min(fits_cpu, fits_gpu)
    if fits < 1:
        raise ConfigError(
            f"resources: a trial needs {res.cpus_per_trial:g} CPUs and "
            f"{res.num_workers * res.gpus_per_worker:g} GPUs but the cluster has {cpus:g} CPUs "
            f"and {gpus:g} GPUs: lower num_workers/cpus_per_worker/gpus_per_worker")
    return min(fits, res.max_concurrent_trials) if res.max_concurrent_trials else fits


class PlacementGroupReaper(Callback):
    """Removes a finished trial's Train worker placement group if Ray Train left it behind.

    Ray Train's own cleaner races when Tune ends a trial from outside (ASHA), and a leaked group
    keeps its CPU reserved forever, so the next trial waits for a worker that never comes.
    """

    def __init__(self) -> None:
        self.groups: dict[str, str] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get("worker_pg"):
            self.groups[trial.trial_id] = result["worker_pg"]

    def _reap(self, trial) -> None:
        pg_hex = self.groups.pop(trial.trial_id, None)
        if not pg_hex:
            return
        pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex)))
        state = ray.util.placement_group_table(pg).get("state")
        if state not in (None, "REMOVED"):
            remove_placement_group(pg)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._reap(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._reap(trial)


class TrialPrinter(Callback):
    """One line per finished trial, with a running count and an estimate of the time left."""

    def __init__(self, label: str, total: int, max_t: int) -> None:
        self.label, self.total, self.max_t = label, total, max_t
        self.done, self.start, self.last = 0, time.monotonic(), {}

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.last[trial.trial_id] = result

    def _line(self, trial, status: str) -> None:
        self.done += 1
        res = self.last.get(trial.trial_id, {})
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        searched = ("rank", "alpha", "targets", "lr") if trial.config.get("rank") else (
            "lr", "layer_decay")
        shown = {k: trial.config[k] for k in searched if k in trial.config}
        params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in shown.items())
        epochs = int(res.get("epoch", 0))
        if status == "done" and epochs < self.max_t:
            status = "stopped early"
        print(f"  [{self.done}/{self.total}] {self.label} {params} "
                  f"val_auroc={res.get('best_val_auroc', float('nan')):.4f} epochs={epochs} "
                  f"{status} (about {eta:.0f}s left)", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._line(trial, "done")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trial, "FAILED")


class _Pinned:
    """A view of an Optuna trial where values the arm fixes are returned, not sampled."""

    def __init__(self, trial: optuna.Trial, fixed: dict[str, Any]) -> None:
        self._trial, self._fixed = trial, fixed
        self.sampled: set[str] = set()

    def __getattr__(self, name: str):
        attr = getattr(self._trial, name)
        if not name.startswith("suggest_"):
            return attr

        def suggest(param: str, *args, **kwargs):
            if param in self._fixed:
                return self._fixed[param]
            self.sampled.add(param)
            return attr(param, *args, **kwargs)
        return suggest


def trial_dirname(trial) -> str:
    """Short trial folders (Tune's default spells out the whole config in the name)."""
    return f"trial_{trial.trial_id}"


@dataclass(frozen=True)
class DefineByRun:
    """The Optuna space of one arm plus its constants (picklable: Tune saves the searcher)."""

    space: str
    base: dict[str, Any]
    fixed: dict[str, Any]
    optimizer: str
    recipe: Recipe | None

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        space = get_space(self.space)
        pinned = _Pinned(trial, self.fixed)
        derived = space.fn(pinned, self.optimizer, self.recipe)
        # Derived values (alpha) come from the pinned suggestions; an explicitly fixed value wins.
        config = {**self.base, **derived, **self.fixed}
        # Constants must not override what Optuna sampled (Tune merges them over the samples).
        return {k: v for k, v in config.items() if k not in pinned.sampled}


def recipes(task: TaskSpec) -> tuple[Recipe | None, Recipe | None]:
    """(LoRA, FFT) starting points for this task: the reference presets, or the demo's own."""
    if task.foundation.name == "demo":
        return demo_recipes()
    return (lora_recipe(task.foundation.name, task.dataset.name, task.label_fraction),
            fft_recipe(task.foundation.name))


@dataclass
class ArmOutcome:
    arm: str
    task: str
    run_id: str
    best_config: dict[str, Any]
    best_val: float
    trials: int
    stopped_early: int
    failed: int
    epochs_spent: int
    wall_s: float
    final_test: list[float] = field(default_factory=list)


@dataclass
class TaskData:
    cache_dir: Path
    num_classes: int
    content_hash: str


def prepare_task_data(task: TaskSpec, cache_root: Path) -> TaskData:
    """Load the task's splits and build (or reuse) the shared image cache at the model's size."""
    splits = load_splits(task.data_spec())
    size = get_backbone(get_foundation(task.foundation.name).backbone).img_size
    cache = build_cache(splits, size, cache_root)
    return TaskData(cache, len(label_names(cache)), splits.content_hash)


def base_config(cfg: StudyConfig, task: TaskSpec, arm: ArmSpec, data: TaskData,
                recipe: Recipe | None) -> dict[str, Any]:
    """Everything a trial needs that is not searched: it all travels in the trial config."""
    optimizer = arm.optimizer or (recipe.optimizer if recipe else
                                  default_optimizer(task.foundation.name))
    res = cfg.resources
    base: dict[str, Any] = {
        "arm": arm.name, "task": task.key, "foundation": task.foundation.name,
        "model": get_foundation(task.foundation.name).backbone,
        "checkpoint": task.foundation.checkpoint, "dataset": task.dataset.name,
        "label_fraction": task.label_fraction, "split_seed": task.split_seed,
        "num_classes": data.num_classes, "cache_dir": str(data.cache_dir),
        "optimizer": optimizer, "epochs": cfg.search.max_t, "seed": cfg.search.seed,
        "weight_decay": recipe.weight_decay if recipe else 0.05,
        "layer_decay": 1.0, "phase": "search", "storage_path": str(cfg.storage / "train"),
        "num_workers": res.num_workers, "cpus_per_worker": res.cpus_per_worker,
        "gpus_per_worker": res.gpus_per_worker,
    }
    base.update(dict(cfg.train))
    if arm.kind == "fft" and recipe is not None and optimizer == recipe.optimizer:
        base["layer_decay"] = recipe.layer_decay
    return base


def search_arm(cfg: StudyConfig, task: TaskSpec, arm: ArmSpec, data: TaskData,
               client, exp_id: str, parent: str, max_concurrent: int) -> ArmOutcome:
    """One Tuner, one Optuna study, one ASHA scheduler for this task x arm."""
    space = get_space(arm.space)
    lora_r, fft_r = recipes(task)
    recipe = lora_r if space.kind == "lora" else fft_r
    base = base_config(cfg, task, arm, data, recipe)
    fixed = dict(arm.fixed)
    optimizer = base["optimizer"]

    define_by_run = DefineByRun(arm.space, base, fixed, optimizer, recipe)

    preset = preset_point(space, recipe, optimizer)
    points = [{k: v for k, v in preset.items() if k not in fixed}] if preset else None
    run_id = start_run(client, exp_id, f"{task.key}/{arm.name}",
                       {"arm": arm.name, "task": task.key, "phase": "search",
                        "level": "arm", "space": arm.space},
                       parent, {"space": arm.space, "trials": arm.trials,
                                "max_t": cfg.search.max_t, "optimizer": optimizer,
                                "preset": preset or {}, "split_hash": data.content_hash})
    storage = optuna.storages.RDBStorage(f"sqlite:///{cfg.storage / 'optuna.db'}")
    searcher = OptunaSearch(space=define_by_run, metric="val_auroc", mode="max",
                            sampler=_sampler(cfg.search.sampler, cfg.search.seed),
                            points_to_evaluate=points, storage=storage,
                            study_name=f"{cfg.name}/{task.key}/{arm.name}")
    scheduler = ASHAScheduler(time_attr="epoch", metric="val_auroc", mode="max",
                              max_t=cfg.search.max_t, grace_period=cfg.search.grace_period,
                              reduction_factor=cfg.search.reduction_factor)
    tracker = MlflowTrialTracker(client, exp_id, run_id,
                                 {"arm": arm.name, "task": task.key, "phase": "search"},
                                 cfg.search.max_t)
    start = time.monotonic()
    grid = Tuner(
        tune.with_resources(tune_trial, TRIAL_RESOURCES),
        tune_config=TuneConfig(search_alg=searcher, scheduler=scheduler,
                               num_samples=arm.trials, max_concurrent_trials=max_concurrent,
                               trial_dirname_creator=trial_dirname),
        run_config=RunConfig(
            name=f"{task.key}-{arm.name}", storage_path=str(cfg.storage / "tune"), verbose=0,
            failure_config=FailureConfig(max_failures=1),
            callbacks=[tracker, PlacementGroupReaper(),
                       TrialPrinter(f"{task.key} {arm.name}", arm.trials, cfg.search.max_t)]),
    ).fit()
    wall = time.monotonic() - start
    results = [r for r in grid if r.metrics and "best_val_auroc" in r.metrics]
    failed = sum(1 for r in grid if r.error is not None)
    if not results:
        end_run(client, run_id, "FAILED", tags={"error": "every trial failed"})
        raise ConfigError(f"{task.key}/{arm.name}: every trial failed; see the MLflow runs' "
                          "'error' tags and fix the config")
    best = max(results, key=lambda r: r.metrics["best_val_auroc"])
    epochs = sum(int(r.metrics.get("epoch", 0)) for r in results)
    stopped = sum(1 for r in results if int(r.metrics.get("epoch", 0)) < cfg.search.max_t)
    outcome = ArmOutcome(arm.name, task.key, run_id, dict(best.config),
                         float(best.metrics["best_val_auroc"]), len(grid), stopped, failed, epochs,
                         wall)
    full = arm.trials * cfg.search.max_t
    end_run(client, run_id, metrics={
        "best_val_auroc": outcome.best_val, "epochs_spent": epochs,
        "epochs_saved": full - epochs, "trials_stopped_early": stopped, "trials_failed": failed,
        "wall_s": wall, "trainable_params": float(best.metrics.get("trainable_params", 0)),
        "total_params": float(best.metrics.get("total_params", 0))})
    return outcome


def final_arm(cfg: StudyConfig, outcome: ArmOutcome, client, exp_id: str,
              max_concurrent: int) -> None:
    """Retrain the arm's best config with the final seeds; score the best-val epoch on test."""
    seeds = list(range(cfg.final.seeds))
    pred_dir = cfg.storage / "predictions" / outcome.task / outcome.arm
    config = {**outcome.best_config, "phase": "final", "seed": tune.grid_search(seeds),
              "predictions_path": str(pred_dir / "seed{seed}.parquet"),
              "patient_salt": cfg.name}
    tracker = MlflowTrialTracker(client, exp_id, outcome.run_id,
                                 {"arm": outcome.arm, "task": outcome.task, "phase": "final"},
                                 cfg.search.max_t)
    grid = Tuner(
        tune.with_resources(tune_trial, TRIAL_RESOURCES), param_space=config,
        tune_config=TuneConfig(max_concurrent_trials=max_concurrent,
                               trial_dirname_creator=trial_dirname),
        run_config=RunConfig(name=f"{outcome.task}-{outcome.arm}-final",
                             storage_path=str(cfg.storage / "tune"), verbose=0,
                             failure_config=FailureConfig(max_failures=1),
                             callbacks=[tracker, PlacementGroupReaper()]),
    ).fit()
    for result in grid:
        if result.metrics and "test_auroc" in result.metrics:
            outcome.final_test.append(float(result.metrics["test_auroc"]))
            seed = result.config["seed"]
            tracker.log_artifact(result.metrics["trial_id"],
                                 pred_dir / f"seed{seed}.parquet")


def _sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    return {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed),
            "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
            "qmc": lambda: optuna.samplers.QMCSampler(seed=seed)}[name]()


def run_study(cfg: StudyConfig, emit: Callable[[str], None] = print,
              address: str | None = None) -> list[ArmOutcome]:
    """Run every task and arm of the study; returns what each arm found."""
    cfg.storage.mkdir(parents=True, exist_ok=True)
    client, exp_id = connect(cfg.tracking.uri, cfg.tracking.experiment, cfg.storage)
    init_ray(address)
    max_concurrent = concurrency(cfg)
    checkpoints = {f"sha256_{t.foundation.name}": Path(t.foundation.checkpoint)
                   for t in cfg.tasks if t.foundation.checkpoint}
    lock = Path(__file__).resolve().parents[1] / "requirements.lock"
    tags = provenance({"study_file_sha256": cfg.source, "lock_sha256": lock, **checkpoints})
    parent = start_run(client, exp_id, cfg.name, {**tags, "level": "study"},
                       params={"tasks": len(cfg.tasks), "arms": [a.name for a in cfg.arms],
                               "max_t": cfg.search.max_t, "final_seeds": cfg.final.seeds})
    outcomes: list[ArmOutcome] = []
    status = "FAILED"
    try:
        for task in cfg.tasks:
            emit(f"task {task.key}: preparing data")
            data = prepare_task_data(task, cfg.cache_dir)
            task_outcomes = [search_arm(cfg, task, arm, data, client, exp_id, parent,
                                        max_concurrent) for arm in cfg.arms]
            if cfg.final.seeds:
                emit(f"task {task.key}: final evaluation, {cfg.final.seeds} seed(s) per arm")
                for outcome in task_outcomes:
                    final_arm(cfg, outcome, client, exp_id, max_concurrent)
            outcomes += task_outcomes
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        end_run(client, parent, status)
    return outcomes

