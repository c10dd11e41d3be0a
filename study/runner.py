"""Run a study: per task, prepare the data cache; per arm, an Optuna + ASHA search through Ray
Tune, each trial a Ray Train run; then retrain each arm's best config with the final seeds and
score it on test. MLflow gets the whole hierarchy through `study.tracking`.

The parts live beside it: `study.cluster` (Ray), `study.preflight` (inputs and caches),
`study.trials` (what a trial is told), `study.callbacks` (Tune plug-ins) and
`search_spaces.define_by_run` (Optuna).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune import Callback, FailureConfig, ResultGrid, RunConfig, TuneConfig, Tuner
from ray.tune.schedulers import ASHAScheduler

from search_spaces import get_space, preset_point
from search_spaces.define_by_run import DefineByRun, fail_orphans, name_objective, sampler
from study.callbacks import (
    _UNFINISHED,
    InterruptWatch,
    PlacementGroupReaper,
    ResumableOptunaSearch,
    TrialPrinter,
    trial_dirname,
)
from study.cluster import (
    check_address,
    check_shared_storage,
    concurrency,
    init_ray,
    local_concurrency,
)
from study.config import ArmSpec, StudyConfig, TaskSpec, check_destinations
from study.preflight import TaskData, preflight, prepare_caches
from study.schema import (
    SEARCH_METRIC,
    SEARCH_MODE,
    ArmParams,
    Metric,
    Phase,
    StudyParams,
    Tag,
    checkpoint_sha_tag,
)
from study.state import Segment, StudyState, config_hash
from study.tracking import (
    TRANSIENT,
    MlflowTrialTracker,
    arm_tags,
    check_reachable,
    connect,
    end_open_runs,
    end_run,
    open_arm_run,
    open_study_run,
    provenance,
    reopen_run,
    set_trial_count,
    supersede_finals,
)
from study.trials import arm_optimizer, arm_recipe, run_settings, search_constants, study_trainable
from trainables.config import RunSettings, TrialSpec
from trainables.errors import ArmFailed, ConfigError, StudyFailed, TrackingUnavailable


@dataclass
class ArmOutcome:
    arm: str
    kind: str
    task: str
    run_id: str
    best_config: dict[str, Any]
    best_val: float
    trials: int
    stopped_early: int
    failed: int
    epochs_spent: int
    wall_s: float
    settings: RunSettings
    final_test: list[float] = field(default_factory=list)


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


def _fit(path: Path, make: Callable[[], Tuner], trainable: Any, expected: int, emit
         ) -> ResultGrid:
    """Fit a Tune experiment, continuing it from its folder if it already started.

    A finished experiment comes back at once with its results; unfinished trials continue
    from their last checkpoint (Ray Train finds it under the same run name). Trials that
    errored stay errored: the searcher was told, and rerunning them would count them twice.
    """
    if Tuner.can_restore(str(path)):
        emit(f"  continuing {path.name}")
        tuner = Tuner.restore(str(path), trainable=trainable, resume_unfinished=True)
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
    recipe = arm_recipe(task, arm)
    optimizer = arm_optimizer(task, arm, recipe)
    fixed = dict(arm.fixed)
    define_by_run = DefineByRun(arm.space, search_constants(cfg, task, arm, data, recipe,
                                                            optimizer), fixed, optimizer, recipe)
    preset = preset_point(space, recipe, optimizer)
    record = ArmParams(space=arm.space, kind=arm.kind, max_t=cfg.search.max_t,
                       optimizer=optimizer, preset=preset or {}, split_hash=data.content_hash,
                       foundation=task.foundation.name, dataset=task.dataset.name,
                       label_fraction=task.label_fraction, split_seed=task.split_seed)
    run_id = open_arm_run(client, session.exp_id, state.arm_runs.get(key), session.parent, key,
                          arm.name, task.key, record)
    if state.arm_runs.get(key) != run_id:
        state.arm_runs[key] = run_id
        session.save()
    planned = state.planned(arm.name, arm.trials)
    segments = state.segments.setdefault(key, [])
    if state.done_trials(key) < planned:
        suffix = f"-add{len(segments)}" if segments else ""
        segments.append(Segment(f"{task.key}-{arm.name}{suffix}",
                                planned - state.done_trials(key)))
        session.save()
    set_trial_count(client, run_id, state.done_trials(key))
    settings = run_settings(cfg, data)
    trainable = study_trainable(cfg, settings)

    start = time.monotonic()
    results, failed, offset = [], 0, 0
    for number, segment in enumerate(segments):
        storage = optuna.storages.RDBStorage(f"sqlite:///{cfg.storage / 'optuna.db'}")
        name_objective(storage, f"{cfg.name}/{key}", SEARCH_METRIC, SEARCH_MODE)
        points = [{k: v for k, v in preset.items() if k not in fixed}] if (
            preset and number == 0) else None
        tracker = MlflowTrialTracker(client, session.exp_id, run_id,
                                     arm_tags(arm.name, task.key, arm.kind), cfg.search.max_t,
                                     session.backlog(segment.name), offset, run=settings)
        path = cfg.storage / "tune" / segment.name

        def make(segment=segment, points=points, storage=storage, tracker=tracker,
                 path=path) -> Tuner:
            searcher = ResumableOptunaSearch(space=define_by_run, metric=SEARCH_METRIC,
                                             mode=SEARCH_MODE, points_to_evaluate=points,
                                             sampler=sampler(cfg.search.sampler,
                                                             cfg.search.seed),
                                             storage=storage, study_name=f"{cfg.name}/{key}")
            scheduler = ASHAScheduler(time_attr=Metric.EPOCH, metric=SEARCH_METRIC,
                                      mode=SEARCH_MODE,
                                      max_t=cfg.search.max_t,
                                      grace_period=cfg.search.grace_period,
                                      reduction_factor=cfg.search.reduction_factor)
            return Tuner(trainable, tune_config=TuneConfig(
                search_alg=searcher, scheduler=scheduler, num_samples=segment.trials,
                max_concurrent_trials=1 if cfg.search.sequential else session.max_concurrent,
                trial_dirname_creator=trial_dirname, reuse_actors=True),
                run_config=_run_config(cfg, segment.name, [
                    tracker, PlacementGroupReaper(), InterruptWatch(path),
                    TrialPrinter(f"{task.key} {arm.name}", segment.trials, cfg.search.max_t)]))
        grid = _fit(path, make, trainable, segment.trials, session.emit)
        tracker.drain()
        fail_orphans(storage, f"{cfg.name}/{key}")
        results += [r for r in grid if r.metrics and Metric.BEST_VAL_AUROC in r.metrics]
        failed += grid.num_errors
        offset += segment.trials
    wall = time.monotonic() - start
    if not results:
        end_run(client, run_id, "FAILED", tags={Tag.ERROR: "every trial failed"})
        raise ArmFailed(f"{key}: all {failed} trial(s) failed while training; the study went "
                        f"on without this arm. The '{Tag.ERROR}' tag of each trial run says why")
    best = max(results, key=lambda r: r.metrics[Metric.BEST_VAL_AUROC])
    epochs = sum(int(r.metrics.get(Metric.EPOCH, 0)) for r in results)
    stopped = sum(1 for r in results if int(r.metrics.get(Metric.EPOCH, 0)) < cfg.search.max_t)
    outcome = ArmOutcome(arm.name, arm.kind, task.key, run_id, dict(best.config),
                         float(best.metrics[Metric.BEST_VAL_AUROC]), len(results) + failed,
                         stopped, failed, epochs, wall, settings)
    full = state.done_trials(key) * cfg.search.max_t
    end_run(client, run_id, metrics={
        Metric.BEST_VAL_AUROC: outcome.best_val, Metric.EPOCHS_SPENT: epochs,
        Metric.EPOCHS_SAVED: full - epochs, Metric.TRIALS_STOPPED_EARLY: stopped,
        Metric.TRIALS_FAILED: failed, Metric.WALL_S: wall,
        Metric.TRAINABLE_PARAMS: float(best.metrics.get(Metric.TRAINABLE_PARAMS, 0)),
        Metric.TOTAL_PARAMS: float(best.metrics.get(Metric.TOTAL_PARAMS, 0))})
    return outcome


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
        supersede_finals(client, session.exp_id, outcome.run_id, state.finals[key])
    state.finals[key] = digest
    session.save()
    seeds = list(range(cfg.final.seeds))
    pred_dir = cfg.storage / "predictions" / outcome.task / outcome.arm / digest
    config = {**outcome.best_config, **dict(phase=Phase.FINAL, seed=tune.grid_search(seeds))}
    settings = dataclasses.replace(outcome.settings,
                                   predictions_path=str(pred_dir / "seed{seed}.parquet"),
                                   patient_salt=cfg.name)
    trainable = study_trainable(cfg, settings)
    name = f"{outcome.task}-{outcome.arm}-final-{digest}"
    tags = {**arm_tags(outcome.arm, outcome.task, outcome.kind, Phase.FINAL),
            Tag.FINAL_CONFIG: digest}
    tracker = MlflowTrialTracker(client, session.exp_id, outcome.run_id, tags,
                                 cfg.search.max_t, session.backlog(name), run=settings)

    path = cfg.storage / "tune" / name

    def make() -> Tuner:
        return Tuner(trainable, param_space=config,
                     tune_config=TuneConfig(max_concurrent_trials=session.max_concurrent,
                                            trial_dirname_creator=trial_dirname, reuse_actors=True),
                     run_config=_run_config(cfg, name, [tracker, PlacementGroupReaper(),
                                                        InterruptWatch(path)]))
    reopen_run(client, outcome.run_id)
    grid = _fit(path, make, trainable, len(seeds), session.emit)
    tracker.drain()
    for result in grid:
        if result.metrics and Metric.TEST_AUROC in result.metrics:
            outcome.final_test.append(float(result.metrics[Metric.TEST_AUROC]))
            spec_seed = TrialSpec.from_tune(result.config).train.seed
            tracker.log_artifact(result.metrics["trial_id"],
                                 pred_dir / f"seed{spec_seed}.parquet")
    end_run(client, outcome.run_id)


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
    checkpoints = {checkpoint_sha_tag(t.foundation.name): Path(t.foundation.checkpoint)
                   for t in cfg.tasks if t.foundation.checkpoint}
    lock = Path(__file__).resolve().parents[1] / "requirements.lock"
    tags = provenance({Tag.STUDY_FILE_SHA: cfg.source, Tag.LOCK_SHA: lock, **checkpoints})
    record = StudyParams(arms=[a.name for a in cfg.arms], max_t=cfg.search.max_t,
                         final_seeds=cfg.final.seeds)
    parent = open_study_run(client, exp_id, state.study_run, cfg.name, tags, record,
                            len(cfg.tasks))
    state.study_run = parent
    state.save(cfg.storage)
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
        raise StudyFailed(f"the study finished without {failed}: every trial of those failed "
                          f"while training (the other arms completed); the trial runs' "
                          f"'{Tag.ERROR}' tags say why. Fix the cause and retry under a new arm "
                          "name")
    return outcomes
