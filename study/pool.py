"""Which search of a study gets the next free slot: the pool's policy, with no Ray in it.

A study is one pool. Every task x arm search is a *unit* that may start trials (up to its
budget, at most `cap` at once, so its Optuna sampler keeps learning from finished trials); when
a search has started and seen the end of all its trials, its arm's *finals* become a unit too.
A free slot goes to the startable unit with the fewest trials running (nothing starves: a unit
with none running comes before every unit with one or more), ties to the heavier unit (more
expected work per trial: its long trials should not be the last to start), then to the study
file's order.

`sequential` gives one trial at a time in a fixed order: each task's searches in the study
file's order, then their finals. The sampler and ASHA then see every result in the same order
on every run, so a rerun prints the same table.

Ray Tune executes the decisions (`study.pool_tune`); `simulate` runs them on a model of a
study, so fairness, starvation and makespan are tested without Ray.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

SEARCH, FINAL = "search", "final"


def search_key(task: str, arm: str) -> str:
    """A search's key: its task's key and its arm's name."""
    return f"{task}/{arm}"


def task_of(key: str) -> str:
    """The task part of a search key."""
    return key.rsplit("/", 1)[0]


@dataclass
class Unit:
    """A search (or an arm's finals): how many trials it starts in all, how many at once."""

    key: str  # task/arm
    phase: str
    budget: int
    cap: int
    weight: float = 1.0  # expected work per trial, relative (only its order matters)
    order: int = 0
    started: int = 0
    running: int = 0
    ended: int = 0

    @property
    def spent(self) -> bool:
        return self.started >= self.budget

    @property
    def over(self) -> bool:
        return self.spent and self.running == 0


@dataclass(frozen=True)
class SearchPlan:
    """One search of the study as the policy sees it."""

    key: str
    trials: int  # still to start (a resumed or grown search: what is left)
    weight: float = 1.0
    finals: int = 0  # final seeds to run once the search is over (0: none)


@dataclass
class PoolPolicy:
    """The pool's state and its one decision: `next_unit`. Call `started` and `ended` as
    trials start and end (a trial that fails ends too)."""

    searches: list[SearchPlan]
    cap: int
    sequential: bool = False
    slots: int = 0  # most trials running at once in all (0: no limit besides the caps)
    # seeds to run once a search is over (default: its plan's `finals`); asked at that moment,
    # so a search that found no result, or whose best config was retrained before, runs none
    finals_for: Callable[[str], int] | None = None
    units: dict[tuple[str, str], Unit] = field(init=False)

    def __post_init__(self) -> None:
        if self.cap < 1:
            raise ValueError("cap must be >= 1")
        if self.sequential:
            self.cap = self.slots = 1
        self.units = {}
        for order, plan in enumerate(self.searches):
            self.units[(plan.key, SEARCH)] = Unit(plan.key, SEARCH, plan.trials, self.cap,
                                                  plan.weight, order)

    def _finals(self, plan: SearchPlan, order: int) -> Unit | None:
        """The arm's finals once its search is over (created then, so a search with no
        trials left starts them at once)."""
        unit = self.units.get((plan.key, FINAL))
        if unit is None and self.units[(plan.key, SEARCH)].over:
            seeds = self.finals_for(plan.key) if self.finals_for else plan.finals
            unit = self.units[(plan.key, FINAL)] = Unit(plan.key, FINAL, seeds, self.cap,
                                                        plan.weight, order)
        return unit

    def startable(self) -> list[Unit]:
        for order, plan in enumerate(self.searches):
            self._finals(plan, len(self.searches) + order)
        return [u for u in self.units.values() if not u.spent and u.running < u.cap]

    def next_unit(self) -> Unit | None:
        """The unit that gets the next free slot, or None when no unit may start a trial now
        (all running at their cap, or waiting for a search to end)."""
        if self.slots and self.running >= self.slots:
            return None
        ready = self.startable()
        if self.sequential:
            return min(ready, key=self._fixed_order) if ready else None
        return min(ready, key=lambda u: (u.running, -u.weight, u.order)) if ready else None

    def _fixed_order(self, unit: Unit) -> tuple:
        """Sequential order: per task (the key's task part, in the study's order), its
        searches, then its finals."""
        task = task_of(unit.key)
        tasks = list(dict.fromkeys(task_of(p.key) for p in self.searches))
        return (tasks.index(task), unit.phase != SEARCH, unit.order)

    def started(self, unit: Unit) -> None:
        if unit.spent:
            raise ValueError(f"{unit.key} {unit.phase}: its budget of {unit.budget} is spent")
        unit.started += 1
        unit.running += 1

    def ended(self, key: str, phase: str) -> None:
        unit = self.units[(key, phase)]
        unit.running -= 1
        unit.ended += 1

    @property
    def running(self) -> int:
        return sum(u.running for u in self.units.values())

    @property
    def finished(self) -> bool:
        """Every search over, and its finals decided and over."""
        self.startable()
        return len(self.units) == 2 * len(self.searches) and all(
            u.over for u in self.units.values())


# --- simulation: the policy on a model of a study, with async ASHA ---------------------------

@dataclass(frozen=True)
class SimSearch:
    key: str
    trials: int
    epoch_s: float  # one epoch of one trial on one slot
    finals: int = 0


@dataclass(frozen=True)
class Asha:
    max_t: int
    grace: int
    rf: int

    @property
    def rungs(self) -> list[int]:
        rungs, t = [], self.grace
        while t < self.max_t:
            rungs.append(t)
            t *= self.rf
        return rungs


@dataclass
class SimResult:
    makespan: float
    busy: float  # slot-seconds of trials
    slots: int
    trials: int
    stopped_early: int
    starts: list[tuple[float, str, str]]  # (time, key, phase) of every trial start
    ends: dict[tuple[str, str], float]  # when each unit's last trial ended

    @property
    def occupancy(self) -> float:
        return self.busy / (self.makespan * self.slots) if self.makespan else 0.0

    @property
    def lower_bound(self) -> float:
        """No schedule of this work beats total work / slots."""
        return self.busy / self.slots


def trial_quality(key: str, index: int, seed: int = 0) -> float:
    """A simulated trial's final validation score, fixed by its search and index."""
    return random.Random(f"{seed}|{key}|{index}").random()


def curve(quality: float, epoch: int) -> float:
    """Score after `epoch` epochs: rises towards `quality` (rankings hold across rungs)."""
    return quality * (1 - math.exp(-epoch / 5))


class _AshaState:
    """Async successive halving as Ray's ASHAScheduler decides it: at each rung a trial
    continues only if its score is at least the rung's (1 - 1/rf) quantile so far."""

    def __init__(self, asha: Asha) -> None:
        self.asha = asha
        self.recorded: dict[int, list[float]] = {r: [] for r in asha.rungs}

    def epochs_run(self, quality: float) -> Iterable[tuple[int, bool]]:
        """Yields (rung epoch, continue?) as the trial reaches each rung."""
        for rung in self.asha.rungs:
            score = curve(quality, rung)
            values = self.recorded[rung] + [score]
            values.sort()
            cutoff = _percentile(values, (1 - 1 / self.asha.rf) * 100)
            self.recorded[rung].append(score)
            yield rung, score >= cutoff


def _percentile(values: list[float], q: float) -> float:
    """numpy's default (linear) percentile of sorted values."""
    pos = (len(values) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (pos - low)


def simulate(searches: list[SimSearch], slots: int, asha: Asha, cap: int = 4,
             sequential: bool = False, seed: int = 0) -> SimResult:
    """Run the study on `slots` slots under the pool's policy: an event loop over trials,
    ASHA per search (its decisions fall in start order: a search's trials share one epoch
    time, so they reach each rung in the order they started), finals run to `max_t`."""
    plans = [SearchPlan(s.key, s.trials, s.epoch_s, s.finals) for s in searches]
    policy = PoolPolicy(plans, cap, sequential)
    epoch_s = {s.key: s.epoch_s for s in searches}
    ashas = {s.key: _AshaState(asha) for s in searches}
    now, busy, free, stopped, total = 0.0, 0.0, slots, 0, 0
    events: list[tuple[float, int, str, str]] = []
    starts: list[tuple[float, str, str]] = []
    ends: dict[tuple[str, str], float] = {}
    counter = 0
    while True:
        while free:
            unit = policy.next_unit()
            if unit is None:
                break
            index = unit.started
            policy.started(unit)
            free -= 1
            total += 1
            starts.append((now, unit.key, unit.phase))
            epochs = asha.max_t
            if unit.phase == SEARCH:
                for rung, go_on in ashas[unit.key].epochs_run(trial_quality(unit.key, index,
                                                                            seed)):
                    if not go_on:
                        epochs = rung
                        stopped += 1
                        break
            duration = epochs * epoch_s[unit.key]
            busy += duration
            counter += 1
            heapq.heappush(events, (now + duration, counter, unit.key, unit.phase))
        if not events:
            break
        now, _, key, phase = heapq.heappop(events)
        policy.ended(key, phase)
        ends[(key, phase)] = now
        free += 1
    if not policy.finished:
        raise RuntimeError("the simulated study stopped with work left: the policy starved it")
    return SimResult(now, busy, slots, total, stopped, starts, ends)


def paper_grid(trials: int = 20, finals: int = 3, arms: int = 9) -> list[SimSearch]:
    """The paper's methods grid: 2 foundations x 3 datasets x 3 label fractions x `arms`
    arms; an epoch's time follows the label fraction (100% labels: 1 unit)."""
    return [SimSearch(f"{fm}-{ds}-{frac:g}/arm{a}", trials, frac, finals)
            for fm in ("mrm", "cxr_mae") for ds in ("nih", "chexpert", "rsna")
            for frac in (0.01, 0.1, 1.0) for a in range(arms)]


def queue_order(searches: list[SimSearch], slots: int, asha: Asha, seed: int = 0) -> SimResult:
    """The study as a queue of Tuners (the code before the pool): per task, each arm's search
    on the whole cluster, one after another, then each arm's finals, one Tuner each."""
    now, busy, total, stopped = 0.0, 0.0, 0, 0
    starts: list[tuple[float, str, str]] = []
    ends: dict[tuple[str, str], float] = {}
    tasks = list(dict.fromkeys(task_of(s.key) for s in searches))
    for task in tasks:
        mine = [s for s in searches if task_of(s.key) == task]
        for phase, group in ((SEARCH, mine), (FINAL, [s for s in mine if s.finals])):
            for search in group:
                alone = SimSearch(search.key, search.trials if phase == SEARCH else 0,
                                  search.epoch_s, search.finals if phase == FINAL else 0)
                one = simulate([alone], slots, asha, cap=slots, seed=seed)
                busy += one.busy
                total += one.trials
                stopped += one.stopped_early
                starts += [(now + t, k, p) for t, k, p in one.starts]
                ends[(search.key, phase)] = now + one.makespan
                now += one.makespan
    return SimResult(now, busy, slots, total, stopped, starts, ends)
