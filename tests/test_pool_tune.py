"""The pool's Tune side without a cluster: the searcher routes trials to their own Optuna
search, retrains each search's best config once the search is over, and comes back from its
saved state exactly where it was; the scheduler judges a trial only within its own search."""

from __future__ import annotations

import json

import optuna
import pytest
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher

from contract.schema import SEARCH_METRIC, SEARCH_MODE, Metric
from study.pool import SearchPlan
from study.pool_tune import PoolScheduler, PoolSearcher, ResumableOptunaSearch, index_in_search

KEYS = ("t/lora", "t/fft")


class _Space:
    """A picklable define-by-run space (OptunaSearch saves its space with itself)."""

    def __init__(self, key: str) -> None:
        self.task, self.arm = key.split("/")

    def __call__(self, trial: optuna.Trial) -> dict:
        return {"task": self.task, "arm": self.arm, "phase": "search", "seed": 0,
                "lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True)}


def _searcher(trials: int = 3, finals: int = 2, cap: int = 2, slots: int = 4,
              sequential: bool = False) -> PoolSearcher:
    optunas = {key: ResumableOptunaSearch(
        space=_Space(key), metric=SEARCH_METRIC, mode=SEARCH_MODE,
        sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2)) for key in KEYS}
    return PoolSearcher(optunas, [SearchPlan(k, trials, 1.0, finals) for k in KEYS], cap, slots,
                        sequential, list(range(finals)))


def _result(value: float) -> dict:
    return {SEARCH_METRIC: value, Metric.BEST_VAL_AUROC: value, "training_iteration": 1}


def _step(searcher: PoolSearcher, tid: str) -> dict | str | None:
    return searcher.suggest(tid)


def test_searches_are_routed_and_capped_and_finals_retrain_the_best():
    searcher = _searcher()
    first = [_step(searcher, f"a{i}") for i in range(5)]
    assert first[4] is None  # 2 searches x cap 2 = 4 running: no slot for a fifth
    assert [c["arm"] for c in first[:4]] == ["lora", "fft", "lora", "fft"]
    values = {"a0": 0.6, "a1": 0.5, "a2": 0.9, "a3": 0.7}
    for tid, value in values.items():
        searcher.on_trial_complete(tid, _result(value))
    more = [_step(searcher, f"b{i}") for i in range(2)]
    assert {c["arm"] for c in more} == {"lora", "fft"}  # each search's third trial
    assert _step(searcher, "b9") is None  # both searches have spent their budget
    searcher.on_trial_complete("b0", _result(0.1))
    finals = [_step(searcher, f"f{i}") for i in range(2)]  # lora's search is over: its finals
    assert [c["phase"] for c in finals] == ["final", "final"]
    assert [c["seed"] for c in finals] == [0, 1]
    assert all(c["lr"] == first[2]["lr"] and c["arm"] == "lora" for c in finals)  # a2 won
    searcher.on_trial_complete("b1", _result(0.2))
    for tid in ("f0", "f1"):
        searcher.on_trial_complete(tid, {Metric.TEST_AUROC: 0.8})
    fft = [_step(searcher, f"g{i}") for i in range(2)]
    assert all(c["arm"] == "fft" and c["lr"] == first[3]["lr"] for c in fft)
    for tid in ("g0", "g1"):
        searcher.on_trial_complete(tid, {Metric.TEST_AUROC: 0.8})
    assert _step(searcher, "z") == Searcher.FINISHED


def test_a_best_config_already_retrained_is_not_retrained_again():
    searcher = _searcher(trials=1, finals=2)
    searcher.done_finals = {}
    a, b = _step(searcher, "a"), _step(searcher, "b")
    from contract.config import config_digest
    searcher.done_finals = {"t/lora": config_digest(a)}
    searcher.on_trial_complete("a", _result(0.5))
    searcher.on_trial_complete("b", _result(0.5))
    finals = [_step(searcher, f"f{i}") for i in range(3)]
    assert [c["arm"] for c in finals if c] == ["fft", "fft"] and b["arm"] == "fft"


def test_restored_searcher_continues_exactly(tmp_path):
    """Saved midway and restored into a searcher built afresh (as Tune does on a resume), it
    suggests the same next configs as the one that never stopped."""
    going, fresh = _searcher(trials=4), _searcher(trials=4)
    for i in range(4):
        _step(going, f"a{i}")
    for i, value in enumerate((0.6, 0.5, 0.9)):
        going.on_trial_complete(f"a{i}", _result(value))
    path = tmp_path / "searcher-state-x.pkl"
    going.save(str(path))
    json.loads(path.read_text())  # the pool's own state is JSON
    fresh.restore(str(path))
    assert fresh.routes == going.routes and fresh.best == going.best
    assert {k: vars(u) for k, u in fresh.policy.units.items()} == {
        k: vars(u) for k, u in going.policy.units.items()}
    for tid in ("b0", "b1", "b2"):
        assert _step(fresh, tid) == _step(going, tid)
    fresh.on_trial_complete("a3", _result(0.4))  # a trial suggested before the save ends
    going.on_trial_complete("a3", _result(0.4))
    assert _step(fresh, "c0") == _step(going, "c0")


def test_an_ending_told_twice_counts_once():
    searcher = _searcher(trials=2, cap=1)
    _step(searcher, "a")
    searcher.on_trial_complete("a", _result(0.5))
    searcher.on_trial_complete("a", _result(0.5))
    assert searcher.policy.units[("t/lora", "search")].running == 0


class _Trial:
    def __init__(self, tid: str, task: str, arm: str, phase: str = "search") -> None:
        self.trial_id, self.config = tid, {"task": task, "arm": arm, "phase": phase}
        self.status = "RUNNING"

    def __repr__(self) -> str:
        return self.trial_id


def test_each_search_has_its_own_asha_and_finals_always_continue():
    scheduler = PoolScheduler(lambda: ASHAScheduler(time_attr="epoch", metric=SEARCH_METRIC,
                                                    mode=SEARCH_MODE, max_t=4, grace_period=1,
                                                    reduction_factor=2))
    good = [_Trial(f"l{i}", "t", "lora") for i in range(3)]
    weak = _Trial("f0", "t", "fft")
    final = _Trial("x", "t", "lora", "final")
    for trial in [*good, weak, final]:
        scheduler.on_trial_add(None, trial)
    decisions = {t.trial_id: scheduler.on_trial_result(None, t, {"epoch": 1, SEARCH_METRIC: v})
                 for t, v in zip(good, (0.9, 0.8, 0.7), strict=True)}
    # fft's only trial is alone in its search: the lora trials' higher values do not stop it
    assert scheduler.on_trial_result(None, weak, {"epoch": 1, SEARCH_METRIC: 0.1}) == "CONTINUE"
    assert decisions["l2"] == "STOP" and decisions["l0"] == "CONTINUE"
    assert scheduler.on_trial_result(None, final, {"epoch": 4, SEARCH_METRIC: 0.0}) == "CONTINUE"
    assert set(scheduler.ashas) == {"t/lora", "t/fft"}


def test_trial_index_counts_within_its_own_search():
    trials = [_Trial("a", "t", "lora"), _Trial("b", "t", "fft"), _Trial("c", "t", "lora"),
              _Trial("d", "t", "lora", "final")]
    assert [index_in_search(t, trials) for t in trials] == [1, 1, 2, 1]


@pytest.mark.parametrize("sequential", [True])
def test_sequential_runs_one_trial_at_a_time(sequential):
    searcher = _searcher(trials=2, sequential=sequential)
    assert _step(searcher, "a")["arm"] == "lora"
    assert _step(searcher, "b") is None
