"""Run a study: per task, prepare the data cache; per arm, an Optuna + ASHA search through Ray
Tune, each trial a Ray Train run; then retrain each arm's best config with the final seeds and
score it on test. MLflow gets the whole hierarchy through `study.tracking`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
import torch
from mlflow.entities import RunTag
from ray import tune
from ray.tune import Callback, FailureConfig, ResultGrid, RunConfig, TuneConfig, Tuner
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from search_spaces import default_optimizer, fft_recipe, get_space, lora_recipe, preset_point
from search_spaces.presets import Recipe, demo_recipes
from study.config import ArmSpec, StudyConfig, TaskSpec, check_destinations
from study.state import Segment, StudyState, config_hash
from study.summary import config_text
from study.tracking import (
    PARENT_TAG,
    TRANSIENT,
    MlflowTrialTracker,
    TrackingUnavailable,
    check_reachable,
    connect,
    end_open_runs,
    end_run,
    find_run,
    provenance,
    reopen_run,
    start_run,
)
from trainables.cache import build_cache, label_names
from trainables.config import parse_targets
from trainables.datasets import DatasetSplits, load_splits
from trainables.errors import ConfigError
from trainables.foundation import get_foundation, load_foundation
from trainables.lora import LoraSpec, apply_lora
from trainables.models import build_backbone, get_backbone
from trainables.ray_train import trial_resources, tune_trial

# Train polls its workers this often; Ray's default of 2 s adds up to 2 s to every report
# of a multi-worker trial.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Local Ray by default (dashboard on 127.0.0.1: Train inside Tune needs the state API)."""
    if address:
        check_address(address)  # even when this process already runs Ray
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
    # Token authentication stays on (Ray's default for a new local cluster), without Ray's
    # notice about that default on every run.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True,
             dashboard_host="127.0.0.1", object_store_memory=1_000_000_000, **kwargs)


def check_address(address: str) -> None:
    """A HOST:PORT (or ray://HOST:PORT) that nothing answers on fails in seconds, not after
    Ray's own reconnect timeout."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address}: use auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigError(f"--address {address}: nothing answers there ({exc.strerror or exc}):"
                          " start the head node with `ray start --head` or fix the address"
                          ) from exc


def local_concurrency(cfg: StudyConfig) -> int:
    """`concurrency` for the local Ray this machine would start, checked before starting it."""
    node = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
    return concurrency(cfg, node, [node])


def concurrency(cfg: StudyConfig, cluster: dict[str, float] | None = None,
                per_node: list[dict[str, float]] | None = None) -> int:
    """How many trials fit at once; a trial that can never be placed is a ConfigError."""
    cluster = ray.cluster_resources() if cluster is None else cluster
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    res = cfg.resources
    fits_cpu = int(cpus // res.cpus_per_trial)
    fits_gpu = int(gpus // (res.num_workers * res.gpus_per_worker)) if res.gpus_per_worker else (
        fits_cpu)
    fits = min(fits_cpu, fits_gpu)
    if per_node is None:
        per_node = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if per_node and not any(r.get("CPU", 0) >= res.cpus_per_worker and r.get("GPU", 0) >= (
            res.gpus_per_worker) for r in per_node):
        fits = 0
    if fits < 1:
        raise ConfigError(
            f"resources: a trial needs {res.num_workers} worker(s) of {res.cpus_per_worker:g} CPU "
            f"and {res.gpus_per_worker:g} GPU but the cluster has {cpus:g} CPUs and {gpus:g} "
            f"GPUs (most on one node: {_largest_node(per_node)}): lower num_workers, "
            "cpus_per_worker or gpus_per_worker")
    return min(fits, res.max_concurrent_trials) if res.max_concurrent_trials else fits


def _largest_node(nodes: list[dict]) -> str:
    if not nodes:
        return "none"
    best = max(nodes, key=lambda r: (r.get("CPU", 0), r.get("GPU", 0)))
    return f"{best.get('CPU', 0):g} CPU, {best.get('GPU', 0):g} GPU"


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
        res = self.last.get(trial.trial_id) or trial.last_result or {}
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        params = config_text(trial.config)
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


def prepare_task_data(task: TaskSpec, cache_root: Path, splits: DatasetSplits | None = None
                      ) -> TaskData:
    """Load the task's splits and build (or reuse) the shared image cache at the model's size."""
    splits = splits or load_splits(task.data_spec())
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
        "gpus_per_worker": res.gpus_per_worker, "local_mode": res.local_mode,
        "checkpoints_to_keep": cfg.checkpoints_to_keep,
    }
    base.update(dict(cfg.train))
    if arm.kind == "fft" and recipe is not None and optimizer == recipe.optimizer:
        base["layer_decay"] = recipe.layer_decay
    return base


def trainable(cfg: StudyConfig):
    """The Tune trainable with what each trial reserves (see `trial_resources`)."""
    res = cfg.resources
    return tune.with_resources(tune_trial, trial_resources(
        res.num_workers, res.cpus_per_worker, res.gpus_per_worker, res.local_mode))


class StudyInterrupted(KeyboardInterrupt):
    """Ctrl-C reached a search: Tune saved its state, the study can be resumed."""


@dataclass
class Session:
    """What every search of one `run_study` call shares."""

    cfg: StudyConfig
    client: Any
    exp_id: str
    parent: str
    max_concurrent: int
    state: StudyState
    emit: Callable[[str], None]

    def save(self) -> None:
        self.state.save(self.cfg.storage)

    def backlog(self, name: str) -> Path:
        return self.cfg.storage / "tracking_backlog" / f"{name}.jsonl"


# Experiment folder -> whether its last fit ended with trials neither finished nor failed.
_UNFINISHED: dict[str, bool] = {}


class InterruptWatch(Callback):
    """Tells an interrupted fit from a finished one.

    On Ctrl-C Tune saves its state (trials RUNNING), then stops the trials, which then look
    TERMINATED in the ResultGrid; only trials Tune reported complete or errored (or that were
    already over when a restored fit started) have really ended.
    """

    def __init__(self, path: Path) -> None:
        self.key, self.before = str(path), None
        self.ended: set[str] = set()

    def on_step_begin(self, iteration, trials, **info) -> None:
        if self.before is None:
            self.before = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.ended.add(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.ended.add(trial.trial_id)

    def on_experiment_end(self, trials, **info) -> None:
        if self.before is None:  # no step ran: a restored experiment that had already ended
            self.before = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        over = self.ended | self.before
        _UNFINISHED[self.key] = any(t.trial_id not in over for t in trials)


class ResumableOptunaSearch(OptunaSearch):
    """OptunaSearch that survives a resume racing its storage.

    A driver killed after Optuna was told a trial's outcome but before Tune saved that the trial
    ended restores the trial as running; its next report would hit a finished Optuna trial.
    The outcome is already recorded, so those calls are skipped.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            super().on_trial_complete(trial_id, result, error)


def _fit(cfg: StudyConfig, path: Path, make: Callable[[], Tuner], expected: int, emit
         ) -> ResultGrid:
    """Fit a Tune experiment, continuing it from its folder if it already started.

    A finished experiment comes back at once with its results; unfinished trials continue
    from their last checkpoint (Ray Train finds it under the same run name). Trials that
    errored stay errored: the searcher was told, and rerunning them would count them twice.
    """
    if Tuner.can_restore(str(path)):
        emit(f"  continuing {path.name}")
        tuner = Tuner.restore(str(path), trainable=trainable(cfg), resume_unfinished=True)
    else:
        tuner = make()
    _UNFINISHED.pop(str(path), None)
    grid = tuner.fit()
    unfinished = _UNFINISHED.pop(str(path), None)
    if unfinished is None:  # the watch never heard the end: judge by the saved statuses
        unfinished = grid.num_terminated + grid.num_errors < len(grid)
    if len(grid) < expected or unfinished:
        raise StudyInterrupted(path.name)
    return grid


def search_arm(session: Session, task: TaskSpec, arm: ArmSpec, data: TaskData) -> ArmOutcome:
    """One Optuna study and ASHA scheduler for this task x arm, over one or more Tune
    experiments: the first runs the study file's trials; `--add-trials` and a raised trial
    count append more, asked from the same Optuna study (the sampler sees every past trial)."""
    cfg, client, state = session.cfg, session.client, session.state
    key = f"{task.key}/{arm.name}"
    space = get_space(arm.space)
    lora_r, fft_r = recipes(task)
    recipe = lora_r if space.kind == "lora" else fft_r
    base = base_config(cfg, task, arm, data, recipe)
    fixed = dict(arm.fixed)
    optimizer = base["optimizer"]
    define_by_run = DefineByRun(arm.space, base, fixed, optimizer, recipe)
    preset = preset_point(space, recipe, optimizer)

    run_id = find_run(client, session.exp_id, state.arm_runs.get(key))
    if run_id:
        reopen_run(client, run_id)
    else:
        run_id = start_run(client, session.exp_id, key,
                           {"arm": arm.name, "task": task.key, "phase": "search",
                            "level": "arm", "space": arm.space},
                           session.parent, {"space": arm.space, "max_t": cfg.search.max_t,
                                            "optimizer": optimizer, "preset": preset or {},
                                            "split_hash": data.content_hash})
        state.arm_runs[key] = run_id
        session.save()
    planned = state.planned(arm.name, arm.trials)
    segments = state.segments.setdefault(key, [])
    if state.done_trials(key) < planned:
        suffix = f"-add{len(segments)}" if segments else ""
        segments.append(Segment(f"{task.key}-{arm.name}{suffix}",
                                planned - state.done_trials(key)))
        session.save()
    client.set_tag(run_id, "trials", str(state.done_trials(key)))

    start = time.monotonic()
    results, failed, offset = [], 0, 0
    for number, segment in enumerate(segments):
        storage = optuna.storages.RDBStorage(f"sqlite:///{cfg.storage / 'optuna.db'}")
        name_objective(storage, f"{cfg.name}/{key}")
        points = [{k: v for k, v in preset.items() if k not in fixed}] if (
            preset and number == 0) else None
        tracker = MlflowTrialTracker(client, session.exp_id, run_id,
                                     {"arm": arm.name, "task": task.key, "phase": "search"},
                                     cfg.search.max_t, session.backlog(segment.name), offset)
        path = cfg.storage / "tune" / segment.name

        def make(segment=segment, points=points, storage=storage, tracker=tracker,
                 path=path) -> Tuner:
            searcher = ResumableOptunaSearch(space=define_by_run, metric="val_auroc", mode="max",
                                    sampler=_sampler(cfg.search.sampler, cfg.search.seed),
                                    points_to_evaluate=points, storage=storage,
                                    study_name=f"{cfg.name}/{key}")
            scheduler = ASHAScheduler(time_attr="epoch", metric="val_auroc", mode="max",
                                      max_t=cfg.search.max_t,
                                      grace_period=cfg.search.grace_period,
                                      reduction_factor=cfg.search.reduction_factor)
            return Tuner(trainable(cfg), tune_config=TuneConfig(
                search_alg=searcher, scheduler=scheduler, num_samples=segment.trials,
                max_concurrent_trials=1 if cfg.search.sequential else session.max_concurrent,
                trial_dirname_creator=trial_dirname, reuse_actors=True),
                run_config=_run_config(cfg, segment.name, [
                    tracker, PlacementGroupReaper(), InterruptWatch(path),
                    TrialPrinter(f"{task.key} {arm.name}", segment.trials, cfg.search.max_t)]))
        grid = _fit(cfg, path, make, segment.trials, session.emit)
        tracker.drain()
        fail_orphans(storage, f"{cfg.name}/{key}")
        results += [r for r in grid if r.metrics and "best_val_auroc" in r.metrics]
        failed += grid.num_errors
        offset += segment.trials
    wall = time.monotonic() - start
    if not results:
        end_run(client, run_id, "FAILED", tags={"error": "every trial failed"})
        raise ArmFailed(f"{key}: every trial failed; see the 'error' tag of its MLflow trial "
                        "runs and fix the config")
    best = max(results, key=lambda r: r.metrics["best_val_auroc"])
    epochs = sum(int(r.metrics.get("epoch", 0)) for r in results)
    stopped = sum(1 for r in results if int(r.metrics.get("epoch", 0)) < cfg.search.max_t)
    outcome = ArmOutcome(arm.name, task.key, run_id, dict(best.config),
                         float(best.metrics["best_val_auroc"]), len(results) + failed, stopped,
                         failed, epochs, wall)
    full = state.done_trials(key) * cfg.search.max_t
    end_run(client, run_id, metrics={
        "best_val_auroc": outcome.best_val, "epochs_spent": epochs,
        "epochs_saved": full - epochs, "trials_stopped_early": stopped, "trials_failed": failed,
        "wall_s": wall, "trainable_params": float(best.metrics.get("trainable_params", 0)),
        "total_params": float(best.metrics.get("total_params", 0))})
    return outcome


class ArmFailed(ConfigError):
    """Every trial of an arm failed; the study goes on with its other arms."""


def name_objective(storage: optuna.storages.BaseStorage, study_name: str) -> None:
    """The Optuna study says what it maximises (optuna-dashboard shows `val_auroc`, not
    "Objective 0"); OptunaSearch then loads it (`load_if_exists`)."""
    study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize",
                                load_if_exists=True)
    if study.metric_names is None:
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2, and still there
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["val_auroc"])


def fail_orphans(storage: optuna.storages.BaseStorage, study_name: str) -> int:
    """Optuna trials still RUNNING after their search ended were asked by a driver that died
    before Tune saved them: no Tune trial will ever report them, so they are marked FAIL (Tune
    asks new ones to reach the planned count)."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return 0
    orphans = [t for t in study.get_trials(deepcopy=False)
               if t.state == optuna.trial.TrialState.RUNNING]
    for trial in orphans:
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    return len(orphans)


def _run_config(cfg: StudyConfig, name: str, callbacks: list[Callback]) -> RunConfig:
    return RunConfig(name=name, storage_path=str(cfg.storage / "tune"), verbose=0,
                     failure_config=FailureConfig(max_failures=1), callbacks=callbacks)


def final_arm(session: Session, outcome: ArmOutcome) -> None:
    """Retrain the arm's best config with the final seeds; score the best-val epoch on test.

    The final runs belong to a config: when a grown search finds a better one, the earlier
    final runs are tagged `superseded` and the new config is retrained.
    """
    cfg, client, state = session.cfg, session.client, session.state
    key = f"{outcome.task}/{outcome.arm}"
    digest = config_hash(outcome.best_config)
    if state.finals.get(key) not in (None, digest):
        _supersede(client, session.exp_id, outcome.run_id, state.finals[key])
    state.finals[key] = digest
    session.save()
    seeds = list(range(cfg.final.seeds))
    pred_dir = cfg.storage / "predictions" / outcome.task / outcome.arm / digest
    config = {**outcome.best_config, "phase": "final", "seed": tune.grid_search(seeds),
              "predictions_path": str(pred_dir / "seed{seed}.parquet"),
              "patient_salt": cfg.name}
    name = f"{outcome.task}-{outcome.arm}-final-{digest}"
    tracker = MlflowTrialTracker(client, session.exp_id, outcome.run_id,
                                 {"arm": outcome.arm, "task": outcome.task, "phase": "final",
                                  "final_config": digest},
                                 cfg.search.max_t, session.backlog(name))

    path = cfg.storage / "tune" / name

    def make() -> Tuner:
        return Tuner(trainable(cfg), param_space=config,
                     tune_config=TuneConfig(max_concurrent_trials=session.max_concurrent,
                                            trial_dirname_creator=trial_dirname, reuse_actors=True),
                     run_config=_run_config(cfg, name, [tracker, PlacementGroupReaper(),
                                                        InterruptWatch(path)]))
    reopen_run(client, outcome.run_id)
    grid = _fit(cfg, path, make, len(seeds), session.emit)
    tracker.drain()
    for result in grid:
        if result.metrics and "test_auroc" in result.metrics:
            outcome.final_test.append(float(result.metrics["test_auroc"]))
            seed = result.config["seed"]
            tracker.log_artifact(result.metrics["trial_id"], pred_dir / f"seed{seed}.parquet")
    end_run(client, outcome.run_id)


def _supersede(client, exp_id: str, arm_run: str, digest: str) -> None:
    runs = client.search_runs([exp_id], filter_string=(
        f"tags.`{PARENT_TAG}` = '{arm_run}' and tags.phase = 'final' and "
        f"tags.final_config = '{digest}'"), max_results=10000)
    for run in runs:
        client.set_tag(run.info.run_id, "superseded", "true")


def _sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    return {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed),
            "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
            "qmc": lambda: optuna.samplers.QMCSampler(seed=seed)}[name]()


def preflight(cfg: StudyConfig) -> dict[str, DatasetSplits]:
    """Everything that can be wrong with the inputs, found before Ray, MLflow or any training,
    and without writing anything: every task's splits, every foundation checkpoint against its
    architecture, every fixed LoRA setting."""
    for ref in {t.foundation for t in cfg.tasks}:
        check_foundation(ref.name, ref.checkpoint)
    for arm in cfg.arms:
        for name in {t.foundation.name for t in cfg.tasks}:
            check_arm(arm, name)
    return {task.key: load_splits(task.data_spec()) for task in cfg.tasks}


def prepare_caches(cfg: StudyConfig, splits: dict[str, DatasetSplits],
                   emit: Callable[[str], None]) -> dict[str, TaskData]:
    """Each task's image cache (built once, reused by later runs and other studies)."""
    data = {}
    for task in cfg.tasks:
        emit(f"task {task.key}: preparing data")
        data[task.key] = prepare_task_data(task, cfg.cache_dir, splits[task.key])
    return data


def check_foundation(name: str, checkpoint: str | None) -> None:
    """The checkpoint loads into the foundation's architecture (weights only, real shapes)."""
    if not checkpoint:
        return
    model = build_backbone(get_foundation(name).backbone, 2)
    load_foundation(model, Path(checkpoint))


def check_arm(arm: ArmSpec, foundation: str) -> None:
    """Fixed LoRA settings fit the model (rank <= width, targets that exist): on meta tensors."""
    if arm.kind != "lora":
        return
    fixed = dict(arm.fixed)
    targets = parse_targets(fixed["targets"]) if "targets" in fixed else ("q", "v")
    rank = int(fixed.get("rank", 1))
    with torch.device("meta"):
        model = build_backbone(get_foundation(foundation).backbone, 2)
        try:
            apply_lora(model, LoraSpec(rank, float(rank), 0.0, targets))
        except ConfigError as exc:
            raise ConfigError(f"arms.{arm.name}.fixed: {exc}") from exc


def run_study(cfg: StudyConfig, emit: Callable[[str], None] = print,
              address: str | None = None, resume: bool = False,
              add_trials: dict[str, int] | None = None) -> list[ArmOutcome]:
    """Run (or, with `resume`, continue and grow) every task and arm of the study."""
    state = StudyState.load(cfg.storage)
    if state is not None and not resume:
        raise ConfigError(f"{cfg.storage} already holds study {state.name!r}: pass --resume to "
                          "continue or grow it, or set a new [study] storage")
    if state is not None and state.name != cfg.name:
        raise ConfigError(f"{cfg.storage} holds study {state.name!r}, the file says "
                          f"{cfg.name!r}: use the study's own name or a new storage")
    unknown = sorted(set(add_trials or {}) - {a.name for a in cfg.arms})
    if unknown:
        raise ConfigError(f"--add-trials: unknown arm(s) {unknown}; the study's arms are "
                          f"{[a.name for a in cfg.arms]}")
    # Order: what can be checked without writing anything, then the image caches (valid and
    # reusable whatever happens next), then Ray and the resources it reports, then MLflow.
    check_destinations(cfg)
    if address:
        check_address(address)
    else:
        local_concurrency(cfg)
    check_reachable(cfg.tracking.uri)
    splits = preflight(cfg)
    data = prepare_caches(cfg, splits, emit)
    init_ray(address)
    max_concurrent = concurrency(cfg)
    if (nodes := check_shared_storage(cfg)) > 1:
        emit(f"cluster of {nodes} nodes: storage, cache and checkpoints visible from every node")
    client, exp_id = connect(cfg.tracking.uri, cfg.tracking.experiment, cfg.storage)
    state = state or StudyState(cfg.name)
    for arm_name, extra in (add_trials or {}).items():
        state.added[arm_name] = state.added.get(arm_name, 0) + extra
    checkpoints = {f"sha256_{t.foundation.name}": Path(t.foundation.checkpoint)
                   for t in cfg.tasks if t.foundation.checkpoint}
    lock = Path(__file__).resolve().parents[1] / "requirements.lock"
    tags = provenance({"study_file_sha256": cfg.source, "lock_sha256": lock, **checkpoints})
    parent = find_run(client, exp_id, state.study_run)
    if parent:
        reopen_run(client, parent)
        client.log_batch(parent, tags=[RunTag(k, v) for k, v in tags.items()])
    else:
        parent = start_run(client, exp_id, cfg.name, {**tags, "level": "study"},
                           params={"arms": [a.name for a in cfg.arms],
                                   "max_t": cfg.search.max_t, "final_seeds": cfg.final.seeds})
        state.study_run = parent
    state.save(cfg.storage)
    client.set_tag(parent, "tasks", str(len(cfg.tasks)))
    session = Session(cfg, client, exp_id, parent, max_concurrent, state, emit)
    outcomes: list[ArmOutcome] = []
    failed: list[str] = []
    status = "FAILED"
    try:
        for task in cfg.tasks:
            task_outcomes = []
            for arm in cfg.arms:
                try:
                    task_outcomes.append(search_arm(session, task, arm, data[task.key]))
                except ArmFailed as exc:
                    emit(f"  {exc}")
                    failed.append(f"{task.key}/{arm.name}")
            if cfg.final.seeds and task_outcomes:
                emit(f"task {task.key}: final evaluation, {cfg.final.seeds} seed(s) per arm")
                for outcome in task_outcomes:
                    final_arm(session, outcome)
            outcomes += task_outcomes
        status = "FINISHED" if not failed else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except TRANSIENT as exc:  # MLflow went away outside a trial callback
        raise TrackingUnavailable(
            f"tracking store {cfg.tracking.uri} failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}): the study state is "
            "saved; bring the store back and run again with --resume") from exc
    finally:
        with contextlib.suppress(*TRANSIENT):  # best effort: the store may be the problem
            if status != "FINISHED":
                end_open_runs(client, exp_id, parent, "KILLED" if status == "KILLED" else
                              "FAILED")
            end_run(client, parent, status)
    if failed:
        raise ConfigError(f"every trial failed in {failed} (the other arms completed); see "
                          "the trial runs' 'error' tags, and retry under a new arm name")
    return outcomes


def _probe_nodes(nodes: list[dict], paths: list[str]) -> list[list[str]]:
    """Per node, which of `paths` it cannot see (a zero-CPU task pinned to each node)."""
    return ray.get([
        _missing_paths.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(paths) for n in nodes], timeout=120)


def check_shared_storage(cfg: StudyConfig, nodes: list[dict] | None = None,
                         probe: Callable[[list[dict], list[str]], list[list[str]]] = _probe_nodes
                         ) -> int:
    """On a cluster of several nodes, every node must see the study directory, the image cache
    and the foundation checkpoints: written here, looked for from a task pinned to each node."""
    nodes = [n for n in (ray.nodes() if nodes is None else nodes) if n.get("Alive")]
    if len(nodes) < 2:
        return len(nodes)
    token = uuid.uuid4().hex
    markers = []
    for folder in (cfg.storage, cfg.cache_dir):
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / f".visible-{token}"
        marker.write_text("cxr-study storage check\n")
        markers.append(str(marker))
    needed = markers + [t.foundation.checkpoint for t in cfg.tasks if t.foundation.checkpoint]
    try:
        missing = probe(nodes, needed)
    finally:
        for marker in markers:
            Path(marker).unlink(missing_ok=True)
    for node, paths in zip(nodes, missing, strict=True):
        if paths:
            shown = str(Path(paths[0]).parent) if ".visible-" in paths[0] else paths[0]
            raise ConfigError(f"{shown} is not visible from node {node['NodeManagerAddress']}: "
                              "on a cluster of several nodes put the study storage, cache_dir "
                              "and checkpoints on storage every node mounts at the same path")
    return len(nodes)


@ray.remote(num_cpus=0)
def _missing_paths(paths: list[str]) -> list[str]:
    return [p for p in paths if not os.path.exists(p)]
