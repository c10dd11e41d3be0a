"""What the driver plugs into Ray Tune: trial callbacks (placement-group reaper, progress
printer, interrupt watch) and short trial folders."""

from __future__ import annotations

import time
from pathlib import Path

import ray
from ray.tune import Callback
from ray.util.placement_group import PlacementGroup, remove_placement_group

from contract.schema import Metric
from study.pool import SEARCH
from study.pool_tune import phase_of, search_key
from study.summary import config_text
from trainables.ray_train import WORKER_PG


class PlacementGroupReaper(Callback):
    """Removes a finished trial's Train worker placement group if Ray Train left it behind.

    Ray Train's own cleaner races when Tune ends a trial from outside (ASHA), and a leaked group
    keeps its CPU reserved forever, so the next trial waits for a worker that never comes.
    """

    def __init__(self) -> None:
        self.groups: dict[str, str] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get(WORKER_PG):
            self.groups[trial.trial_id] = result[WORKER_PG]

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
    """One line per finished search trial, with its search's running count and an estimate of
    the time that search has left (`totals`: trials per search key in this experiment)."""

    def __init__(self, totals: dict[str, int], max_t: int) -> None:
        self.totals, self.max_t = totals, max_t
        self.done: dict[str, int] = {}
        self.start: dict[str, float] = {}  # search key -> when its first trial started
        self.last: dict[str, dict] = {}

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.start.setdefault(search_key(trial.config), time.monotonic())

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.last[trial.trial_id] = result

    def _line(self, trial, status: str) -> None:
        if phase_of(trial.config) != SEARCH:
            return
        key = search_key(trial.config)
        done = self.done[key] = self.done.get(key, 0) + 1
        total = self.totals.get(key, done)
        res = self.last.get(trial.trial_id) or trial.last_result or {}
        began = self.start.setdefault(key, time.monotonic())
        eta = (time.monotonic() - began) / done * max(0, total - done)
        epochs = int(res.get(Metric.EPOCH, 0))
        if status == "done" and epochs < self.max_t:
            status = "stopped early"
        print(f"  [{done}/{total}] {key.replace('/', ' ')} {config_text(trial.config)} "
              f"val_auroc={res.get(Metric.BEST_VAL_AUROC, float('nan')):.4f} epochs={epochs} "
              f"{status} (about {eta:.0f}s left)", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._line(trial, "done")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trial, "FAILED")


def trial_dirname(trial) -> str:
    """Short trial folders (Tune's default spells out the whole config in the name)."""
    return f"trial_{trial.trial_id}"


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
