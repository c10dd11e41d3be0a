"""Run a study as one pool: every task x arm search (an Optuna study with its own ASHA) and
every arm's finals (its best config retrained with the final seeds, scored on test) share the
cluster through one Tune experiment per driver run. MLflow gets the whole hierarchy through
`study.tracking`.

The parts live beside it: `study.pool` (which search gets the next slot, no Ray),
`study.pool_tune` (how Tune executes that), `study.cluster` (Ray), `study.preflight` (inputs
and caches), `study.trials` (what a trial is told), `study.callbacks` (Tune plug-ins) and
`search_spaces.define_by_run` (Optuna).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from ray.tune import FailureConfig, ResultGrid, RunConfig, TuneConfig, Tuner
from ray.tune.schedulers import ASHAScheduler

from contract.config import RunSettings, config_digest
from contract.errors import ArmFailed, ConfigError, StudyFailed, TrackingUnavailable
from contract.schema import (
    SEARCH_METRIC,
    SEARCH_MODE,
    ArmParams,
    Metric,
    Param,
    StudyParams,
    Tag,
    checkpoint_sha_tag,
)
from search_spaces import get_space, preset_point
from search_spaces.define_by_run import DefineByRun, fail_orphans, name_objective, sampler
from study.callbacks import (
    _UNFINISHED,
    InterruptWatch,
    PlacementGroupReaper,
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
from study.pool import FINAL, SearchPlan
from study.pool import search_key as key_of
from study.pool_tune import (
    Best,
    PoolScheduler,
    PoolSearcher,
    ResumableOptunaSearch,
    phase_of,
    search_key,
)
from study.preflight import TaskData, preflight, prepare_caches
from study.state import Pool, Segment, StudyState
from study.tracking import (
    TRANSIENT,
    PoolTracker,
    check_reachable,
    connect,
    end_open_runs,
    end_run,
    open_arm_run,
    open_study_run,
    provenance,
    set_trial_count,
    supersede_finals,
)
from study.trials import (
    arm_optimizer,
    arm_recipe,
    predictions_file,
    run_settings,
    search_constants,
    study_trainable,
)


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
    final_test: list[float] = field(default_factory=list)


class StudyInterrupted(KeyboardInterrupt):
    """Ctrl-C reached the pool: Tune saved its state, the study can be resumed."""


@dataclass
class Session:
    """What every part of one `run_study` call shares."""

    cfg: StudyConfig
    client: Any
    exp_id: str
    parent: str
    slots: int
    state: StudyState
    emit: Callable[[str], None]

    def save(self) -> None:
        self.state.save(self.cfg.storage)

    def backlog(self, name: str) -> Path:
        return self.cfg.storage / "tracking_backlog" / f"{name}.jsonl"


@dataclass
class Search:
    """One task x arm search as the driver prepared it: its MLflow run and Optuna space."""

    task: TaskSpec
    arm: ArmSpec
    data: TaskData
    run_id: str
    define_by_run: DefineByRun
    preset: dict[str, Any] | None

    @property
    def key(self) -> str:
        return key_of(self.task.key, self.arm.name)


def _fit(path: Path, make: Callable[[], Tuner], trainable: Any, emit) -> ResultGrid:
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
    if unfinished:
        raise StudyInterrupted(path.name)
    return grid


def prepare_search(session: Session, task: TaskSpec, arm: ArmSpec, data: TaskData) -> Search:
    """The search's MLflow run (found again or created) and its Optuna define-by-run space."""
    cfg, state = session.cfg, session.state
    key = key_of(task.key, arm.name)
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
    run_id = open_arm_run(session.client, session.exp_id, state.arm_runs.get(key),
                          session.parent, key, arm.name, task.key, record)
    if state.arm_runs.get(key) != run_id:
        state.arm_runs[key] = run_id
        session.save()
    points = {k: v for k, v in preset.items() if k not in fixed} if preset else None
    return Search(task, arm, data, run_id, define_by_run, points)


def _optuna_storage(cfg: StudyConfig) -> optuna.storages.RDBStorage:
    """Every search's Optuna study lives in the study's `optuna.db`."""
    return optuna.storages.RDBStorage(f"sqlite:///{cfg.storage / 'optuna.db'}")


def _optuna(cfg: StudyConfig, search: Search, first: bool) -> ResumableOptunaSearch:
    """The search's Optuna study in the study's storage (every experiment of the search asks
    the same study, so its sampler sees every past trial); the preset is its first trial."""
    storage = _optuna_storage(cfg)
    name = f"{cfg.name}/{search.key}"
    name_objective(storage, name, SEARCH_METRIC, SEARCH_MODE)
    return ResumableOptunaSearch(space=search.define_by_run, metric=SEARCH_METRIC,
                                 mode=SEARCH_MODE,
                                 points_to_evaluate=[search.preset] if (
                                     search.preset and first) else None,
                                 sampler=sampler(cfg.search.sampler, cfg.search.seed),
                                 storage=storage, study_name=name)


def _asha(cfg: StudyConfig) -> ASHAScheduler:
    return ASHAScheduler(time_attr=Metric.EPOCH, metric=SEARCH_METRIC, mode=SEARCH_MODE,
                         max_t=cfg.search.max_t, grace_period=cfg.search.grace_period,
                         reduction_factor=cfg.search.reduction_factor)


@dataclass
class Trials:
    """What the study's pool experiments hold so far, per search key."""

    search: dict[str, list[Any]] = field(default_factory=dict)  # Tune Results, in order
    failed: dict[str, int] = field(default_factory=dict)
    finals: dict[str, list[Any]] = field(default_factory=dict)

    def add(self, grid: ResultGrid) -> None:
        for result in grid:
            config = result.config or {}
            if Param.TASK not in config:
                continue
            key = search_key(config)
            if phase_of(config) == FINAL:
                self.finals.setdefault(key, []).append(result)
            elif result.error is not None or not (
                    result.metrics and Metric.BEST_VAL_AUROC in result.metrics):
                self.failed[key] = self.failed.get(key, 0) + 1
            else:
                self.search.setdefault(key, []).append(result)

    def final_runs(self, key: str) -> list[Any]:
        """The finals that retrained the search's current best config."""
        best = self.best(key)
        digest = config_digest(best.config) if best else None
        return [r for r in self.finals.get(key, []) if config_digest(r.config) == digest]

    def best(self, key: str) -> Best | None:
        """The search's best trial: highest best validation AUROC, the earliest on ties (the
        pool's searcher chooses the finals' config by the same rule)."""
        best = None
        for order, result in enumerate(self.search.get(key, [])):
            found = Best(float(result.metrics[Metric.BEST_VAL_AUROC]), order,
                         dict(result.config))
            if found.better(best):
                best = found
        return best


def record_finals(session: Session, searches: list[Search], trials: Trials) -> None:
    """After a pool: which config each arm's finals retrained (so no later pool retrains it);
    the finals of an arm's earlier config are tagged superseded."""
    state = session.state
    for search in searches:
        best = trials.best(search.key)
        if best is None or not trials.final_runs(search.key):
            continue
        digest = config_digest(best.config)
        if state.finals.get(search.key) not in (None, digest):
            supersede_finals(session.client, session.exp_id, search.run_id,
                             state.finals[search.key])
        state.finals[search.key] = digest
    session.save()


def _pool_results(session: Session, trainable: Any, pools: list[Pool]) -> Trials:
    """The trials of pool experiments that have ended (read back from their folders)."""
    trials = Trials()
    for pool in pools:
        path = session.cfg.storage / "tune" / pool.name
        if Tuner.can_restore(str(path)):
            trials.add(Tuner.restore(str(path), trainable=trainable).get_results())
    return trials


def _work(session: Session, search: Search, pool: Pool, earlier: Trials
          ) -> tuple[int, int] | None:
    """(trials before `pool`, trials in it) for the search, or None when it has nothing to do
    there: no trials and no finals due (a best config from earlier pools not yet retrained)."""
    segments = session.state.segments.get(search.key, [])
    names = [s.name for s in segments]
    before = segments[:names.index(pool.name)] if pool.name in names else segments
    mine = sum(s.trials for s in segments if s.name == pool.name)
    best = earlier.best(search.key)
    finals_due = bool(session.cfg.final.seeds) and best is not None and (
        session.state.finals.get(search.key) != config_digest(best.config))
    return (sum(s.trials for s in before), mine) if mine or finals_due else None


def run_pool(session: Session, searches: list[Search], pool: Pool, trainable: Any,
             earlier: Trials, runs: dict[str, RunSettings]) -> ResultGrid:
    """One Tune experiment for every search with trials in `pool` (the state's segments say
    how many) and every arm whose finals are still to run."""
    cfg, state = session.cfg, session.state
    plans, mine_searches, offsets = [], {}, {}
    seeds = list(range(cfg.final.seeds))
    for search in searches:
        key = search.key
        work = _work(session, search, pool, earlier)
        if work is None:
            continue
        offsets[key], mine = work
        plans.append(SearchPlan(key, mine, search.task.label_fraction, len(seeds)))
        mine_searches[key] = search
    path = cfg.storage / "tune" / pool.name
    arm_runs = {s.key: s.run_id for s in searches}
    any_run = next(iter(runs.values()))
    tracker = PoolTracker(session.client, session.exp_id, arm_runs, cfg.search.max_t,
                          session.backlog(pool.name), offsets, run=any_run)
    best = {key: b for key in mine_searches if (b := earlier.best(key)) is not None}
    for key, b in best.items():  # earlier trials come first in the search's order
        best[key] = Best(b.value, b.order - offsets[key], b.config)

    def make() -> Tuner:
        # Only a new experiment builds its Optuna searches: building one enqueues the preset
        # in the Optuna study, which a restored experiment must not ask again.
        optunas = {key: _optuna(cfg, search, first=offsets[key] == 0)
                   for key, search in mine_searches.items()}
        searcher = PoolSearcher(optunas, plans, cfg.search.concurrency, session.slots,
                                cfg.search.sequential, seeds, best, dict(state.finals))
        totals = {p.key: p.trials for p in plans}
        return Tuner(trainable, tune_config=TuneConfig(
            search_alg=searcher, scheduler=PoolScheduler(functools.partial(_asha, cfg)),
            num_samples=-1, trial_dirname_creator=trial_dirname, reuse_actors=True,
            # Tune creates one pending trial at a time for a custom searcher unless a
            # concurrency limit says more may wait (the policy decides which, within it).
            max_concurrent_trials=session.slots),
            run_config=RunConfig(name=pool.name, storage_path=str(cfg.storage / "tune"),
                                 verbose=0, failure_config=FailureConfig(max_failures=1),
                                 callbacks=[tracker, PlacementGroupReaper(),
                                            InterruptWatch(path),
                                            TrialPrinter(totals, cfg.search.max_t)]))
    grid = _fit(path, make, trainable, session.emit)
    tracker.drain()
    storage = _optuna_storage(cfg)
    for key in mine_searches:
        fail_orphans(storage, f"{cfg.name}/{key}")
    return grid


def _wall(results: list[Any]) -> float:
    """From the first trial's start to the last trial's last report."""
    spans = [(r.metrics["timestamp"] - r.metrics.get("time_total_s", 0), r.metrics["timestamp"])
             for r in results if r.metrics and "timestamp" in r.metrics]
    return max(e for _, e in spans) - min(s for s, _ in spans) if spans else 0.0


def close_search(session: Session, search: Search, trials: Trials, tracker: PoolTracker,
                 runs: dict[str, RunSettings]) -> ArmOutcome:
    """Write what the search and its finals found to the arm's run: the search's totals, the
    finals' predictions."""
    cfg, client, state = session.cfg, session.client, session.state
    key = search.key
    results, failed = trials.search.get(key, []), trials.failed.get(key, 0)
    best = trials.best(key)
    if best is None:
        end_run(client, search.run_id, "FAILED", tags={Tag.ERROR: "every trial failed"})
        raise ArmFailed(f"{key}: all {failed} trial(s) failed while training; the study went "
                        f"on without this arm. The '{Tag.ERROR}' tag of each trial run says why")
    epochs = sum(int(r.metrics.get(Metric.EPOCH, 0)) for r in results)
    stopped = sum(1 for r in results if int(r.metrics.get(Metric.EPOCH, 0)) < cfg.search.max_t)
    best_result = results[best.order]
    outcome = ArmOutcome(search.arm.name, search.arm.kind, search.task.key, search.run_id,
                         best.config, best.value, len(results) + failed, stopped, failed,
                         epochs, _wall(results))
    for result in trials.final_runs(key):
        if result.metrics and Metric.TEST_AUROC in result.metrics:
            outcome.final_test.append(float(result.metrics[Metric.TEST_AUROC]))
            trial_id = result.metrics["trial_id"]
            tracker.log_artifact(trial_id, predictions_file(
                runs[search.task.key], trial_id, int(result.config[Param.SEED])),
                parent=search.run_id)
    full = state.done_trials(key) * cfg.search.max_t
    end_run(client, search.run_id, metrics={
        Metric.BEST_VAL_AUROC: outcome.best_val, Metric.EPOCHS_SPENT: epochs,
        Metric.EPOCHS_SAVED: full - epochs, Metric.TRIALS_STOPPED_EARLY: stopped,
        Metric.TRIALS_FAILED: failed, Metric.WALL_S: outcome.wall_s,
        Metric.TRAINABLE_PARAMS: float(best_result.metrics.get(Metric.TRAINABLE_PARAMS, 0)),
        Metric.TOTAL_PARAMS: float(best_result.metrics.get(Metric.TOTAL_PARAMS, 0))})
    return outcome


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
    slots = 1 if cfg.search.sequential else concurrency(cfg)
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
    session = Session(cfg, client, exp_id, parent, slots, state, emit)
    runs = {task.key: run_settings(cfg, task, data[task.key]) for task in cfg.tasks}
    trainable = study_trainable(runs)
    outcomes: list[ArmOutcome] = []
    failed: list[str] = []
    status = "FAILED"
    try:
        searches = [prepare_search(session, task, arm, data[task.key])
                    for task in cfg.tasks for arm in cfg.arms]
        trials = _pool_results(session, trainable, [p for p in state.pools if p.done])
        # A pool a killed or interrupted driver left goes on first, with its own plan.
        for pool in [p for p in state.pools if not p.done]:
            trials.add(run_pool(session, searches, pool, trainable, trials, runs))
            record_finals(session, searches, trials)
            pool.done = True
            session.save()
        pool = Pool(f"pool-{len(state.pools)}")
        for search in searches:
            left = state.planned(search.arm.name, search.arm.trials) - state.done_trials(
                search.key)
            if left > 0:
                state.segments.setdefault(search.key, []).append(Segment(pool.name, left))
            set_trial_count(client, search.run_id, state.done_trials(search.key))
        if any(_work(session, s, pool, trials) is not None for s in searches):
            state.pools.append(pool)
            session.save()
            trials.add(run_pool(session, searches, pool, trainable, trials, runs))
            record_finals(session, searches, trials)
            pool.done = True
            session.save()
        tracker = PoolTracker(client, exp_id, {s.key: s.run_id for s in searches},
                              cfg.search.max_t, session.backlog("artifacts"), background=False)
        for search in searches:
            try:
                outcomes.append(close_search(session, search, trials, tracker, runs))
            except ArmFailed as exc:
                emit(f"  {exc}")
                failed.append(search.key)
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
            elif orphans := end_open_runs(client, exp_id, parent, "KILLED"):
                # Every trial of a finished study has ended: a run still RUNNING was a trial an
                # earlier driver started before it was killed (a final its restored pool ran
                # again, say); the tables read finished runs only.
                emit(f"  closed {orphans} run(s) an earlier, killed driver left running")
            end_run(client, parent, status)
    if failed:
        raise StudyFailed(f"the study finished without {failed}: every trial of those failed "
                          f"while training (the other arms completed); the trial runs' "
                          f"'{Tag.ERROR}' tags say why. Fix the cause and retry under a new arm "
                          "name")
    return outcomes
