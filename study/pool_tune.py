"""Ray Tune executes the pool: one Tune experiment serves every search and final of a study.

- `PoolSearcher` (a Tune `Searcher`) holds one `OptunaSearch` per task x arm search and asks
  `study.pool.PoolPolicy` which one may start the next trial; it routes each trial's results
  back to its own search. When a search is over, it suggests that arm's final trials: the
  best config (best validation AUROC, earliest trial on ties) with each final seed.
- `PoolScheduler` keeps one `ASHAScheduler` per search, so a trial is judged only against
  trials of its own search; finals always run to the end.
- `PoolCallback` hands every Tune callback to the callback of the trial's own search or final
  (MLflow trackers and printers are per search, as their runs are).

A trial's search is read from its config (`task` and `arm`, both contract fields), so nothing
but the contract rides in the config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from contract.config import config_digest
from contract.schema import SEARCH_METRIC, SEARCH_MODE, Metric, Param, Phase
from study.pool import FINAL, SEARCH, PoolPolicy, SearchPlan, Unit
from study.pool import search_key as key_of


def search_key(config: dict[str, Any]) -> str:
    """The search a trial belongs to: its task and arm."""
    return key_of(config[Param.TASK], config[Param.ARM])


def phase_of(config: dict[str, Any]) -> str:
    return FINAL if config.get(Param.PHASE) == Phase.FINAL else SEARCH


@dataclass
class Best:
    """An arm's best search trial so far: its value, its place in the search, its config."""

    value: float
    order: int
    config: dict[str, Any]

    def better(self, other: Best | None) -> bool:
        return other is None or (self.value, -self.order) > (other.value, -other.order)


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


class PoolSearcher(Searcher):
    """Every search of the pool behind one Tune searcher (see the module's docstring).

    `searches` maps a search key to its OptunaSearch; `plans` are the policy's view (trials
    left, final seeds); `best` holds each search's best from earlier experiments of the study;
    `done_finals` the config digest whose finals already ran (a grown search that keeps its
    best config does not retrain it).
    """

    def __init__(self, searches: dict[str, OptunaSearch], plans: list[SearchPlan], cap: int,
                 slots: int, sequential: bool, final_seeds: list[int],
                 best: dict[str, Best] | None = None,
                 done_finals: dict[str, str] | None = None) -> None:
        super().__init__(metric=SEARCH_METRIC, mode=SEARCH_MODE)
        self.searches = searches
        self.final_seeds = final_seeds
        self.best: dict[str, Best] = dict(best or {})
        self.done_finals = dict(done_finals or {})
        self.policy = PoolPolicy(plans, cap, sequential, slots=slots,
                                 finals_for=self._finals_for)
        self.routes: dict[str, tuple[str, str]] = {}  # trial id -> (search key, phase)
        self.index: dict[str, int] = {}  # trial id -> its place among its search's trials
        self.configs: dict[str, dict[str, Any]] = {}
        self.ended: set[str] = set()

    def _finals_for(self, key: str) -> int:
        """Seeds to retrain once the search is over: none if it has no result or its best
        config's finals already ran."""
        best = self.best.get(key)
        if best is None or self.done_finals.get(key) == config_digest(best.config):
            return 0
        return len(self.final_seeds)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.policy.finished:
            return Searcher.FINISHED
        unit = self.policy.next_unit()
        if unit is None:
            return None
        if unit.phase == SEARCH:
            config = self.searches[unit.key].suggest(trial_id)
        else:
            best = self.best[unit.key].config
            config = {**best, Param.PHASE: Phase.FINAL,
                      Param.SEED: self.final_seeds[unit.started]}
            if unit.started == 0:
                print(f"  {unit.key.replace('/', ' ')}: final evaluation, {unit.budget} "
                      "seed(s)", flush=True)
        self.index[trial_id] = unit.started
        self.policy.started(unit)
        self.routes[trial_id] = (unit.key, unit.phase)
        self.configs[trial_id] = dict(config)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        key, phase = self.routes[trial_id]
        if phase == SEARCH:
            self.searches[key].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id in self.ended:  # a restored experiment may tell an ending twice
            return
        self.ended.add(trial_id)
        key, phase = self.routes[trial_id]
        if phase == SEARCH:
            self.searches[key].on_trial_complete(trial_id, result, error)
            if result and Metric.BEST_VAL_AUROC in result and not error:
                found = Best(float(result[Metric.BEST_VAL_AUROC]), self.index[trial_id],
                             self.configs[trial_id])
                if found.better(self.best.get(key)):
                    self.best[key] = found
        self.policy.ended(key, phase)

    # -- Tune saves the searcher with the experiment and restores it on a resume ----------
    # This searcher's own state is JSON; each OptunaSearch saves itself in Ray's own format
    # beside it (its sampler's random state and its Tune-to-Optuna trial map).
    def _optuna_file(self, checkpoint_path: str, index: int) -> Path:
        return Path(checkpoint_path).parent / f"pool-optuna-{index}.pkl"

    def save(self, checkpoint_path: str) -> None:
        for index, key in enumerate(sorted(self.searches)):
            final = self._optuna_file(checkpoint_path, index)
            tmp = final.with_name(f".{final.name}.tmp")
            self.searches[key].save(str(tmp))
            os.replace(tmp, final)
        policy = self.policy
        state = {"searches": [dataclasses.asdict(p) for p in policy.searches],
                 "cap": policy.cap, "slots": policy.slots, "sequential": policy.sequential,
                 "units": [dataclasses.asdict(u) for u in policy.units.values()],
                 "routes": self.routes, "index": self.index, "configs": self.configs,
                 "ended": sorted(self.ended),
                 "best": {k: dataclasses.asdict(b) for k, b in self.best.items()},
                 "done_finals": self.done_finals, "final_seeds": self.final_seeds}
        Path(checkpoint_path).write_text(json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        for index, key in enumerate(sorted(self.searches)):
            self.searches[key].restore(str(self._optuna_file(checkpoint_path, index)))
        self.policy = PoolPolicy([SearchPlan(**p) for p in state["searches"]], state["cap"],
                                 state["sequential"], state["slots"], self._finals_for)
        self.policy.units = {(u["key"], u["phase"]): Unit(**u) for u in state["units"]}
        self.routes = {t: (k, p) for t, (k, p) in state["routes"].items()}
        self.index = state["index"]
        self.configs, self.ended = state["configs"], set(state["ended"])
        self.best = {k: Best(**b) for k, b in state["best"].items()}
        self.done_finals, self.final_seeds = state["done_finals"], state["final_seeds"]


class PoolScheduler(FIFOScheduler):
    """One ASHA per search (`make_asha()` builds each on first use); finals run to the end."""

    def __init__(self, make_asha: Callable[[], ASHAScheduler]) -> None:
        super().__init__()
        self.make_asha = make_asha
        self.ashas: dict[str, ASHAScheduler] = {}

    def _asha(self, trial) -> ASHAScheduler | None:
        if phase_of(trial.config) != SEARCH:
            return None
        key = search_key(trial.config)
        if key not in self.ashas:
            self.ashas[key] = self.make_asha()
        return self.ashas[key]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # each ASHA has the study's objective already

    def on_trial_add(self, tune_controller, trial) -> None:
        if asha := self._asha(trial):
            asha.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result) -> str:
        asha = self._asha(trial)
        return asha.on_trial_result(tune_controller, trial, result) if asha else (
            TrialScheduler.CONTINUE)

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        if asha := self._asha(trial):
            asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        if asha := self._asha(trial):
            asha.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"PoolScheduler: {len(self.ashas)} ASHA scheduler(s)"


class PoolCallback(Callback):
    """Hands each trial callback to the callback of the trial's own search or finals, which
    `make(key, phase, config)` builds on first use (an MLflow tracker, a printer)."""

    def __init__(self, make: Callable[[str, str, dict[str, Any]], Callback | None]) -> None:
        self.make = make
        self.routes: dict[tuple[str, str, str], Callback | None] = {}

    def target(self, trial) -> Callback | None:
        phase = phase_of(trial.config)
        digest = config_digest(trial.config) if phase == FINAL else ""
        route = (search_key(trial.config), phase, digest)
        if route not in self.routes:
            self.routes[route] = self.make(route[0], phase, dict(trial.config))
        return self.routes[route]

    def callbacks(self) -> list[Callback]:
        return [c for c in self.routes.values() if c is not None]

    def _forward(self, name: str, trial, **kwargs) -> None:
        if (callback := self.target(trial)) is not None:
            getattr(callback, name)(trial=trial, **kwargs)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._forward("on_trial_start", trial, iteration=iteration, trials=trials, **info)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._forward("on_trial_result", trial, iteration=iteration, trials=trials,
                      result=result, **info)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._forward("on_trial_complete", trial, iteration=iteration, trials=trials, **info)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._forward("on_trial_error", trial, iteration=iteration, trials=trials, **info)


def index_in_search(trial, trials: list) -> int:
    """1-based place of a trial among its own search's (or finals') trials of this experiment,
    in the order Tune created them (stable across a restore: Tune keeps that order)."""
    route = (search_key(trial.config), phase_of(trial.config))
    mine = [t.trial_id for t in trials
            if (search_key(t.config), phase_of(t.config)) == route]
    return mine.index(trial.trial_id) + 1 if trial.trial_id in mine else len(mine) + 1
