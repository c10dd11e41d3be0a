"""The pool's policy, without Ray: who gets the next slot, finals only after their search,
nothing starved, and the study's makespan on the paper's methods grid by simulation."""

from __future__ import annotations

import pytest

from study.pool import (
    FINAL,
    SEARCH,
    Asha,
    PoolPolicy,
    SearchPlan,
    SimSearch,
    paper_grid,
    queue_order,
    simulate,
)

ASHA = Asha(max_t=50, grace=5, rf=3)


def _drain(policy: PoolPolicy, slots: int) -> list[tuple[str, str]]:
    """Fill `slots`, then end trials first-started-first-ended; the order of starts."""
    starts, running = [], []
    while not policy.finished:
        while len(running) < slots and (unit := policy.next_unit()) is not None:
            policy.started(unit)
            starts.append((unit.key, unit.phase))
            running.append((unit.key, unit.phase))
        assert running, "nothing runs and nothing may start: the pool is stuck"
        policy.ended(*running.pop(0))
    return starts


def test_a_free_slot_goes_to_the_search_with_fewest_running():
    policy = PoolPolicy([SearchPlan("t/a", 6), SearchPlan("t/b", 6), SearchPlan("t/c", 6)],
                        cap=4)
    picks = []
    for _ in range(6):
        unit = policy.next_unit()
        policy.started(unit)
        picks.append(unit.key)
    assert picks == ["t/a", "t/b", "t/c"] * 2
    policy.ended("t/b", SEARCH)
    assert policy.next_unit().key == "t/b"


def test_cap_limits_one_search_and_slots_limit_all():
    policy = PoolPolicy([SearchPlan("t/a", 10)], cap=3)
    for _ in range(3):
        policy.started(policy.next_unit())
    assert policy.next_unit() is None  # at its cap, though budget is left
    policy.ended("t/a", SEARCH)
    assert policy.next_unit().key == "t/a"
    both = PoolPolicy([SearchPlan("t/a", 10), SearchPlan("t/b", 10)], cap=4, slots=2)
    both.started(both.next_unit())
    both.started(both.next_unit())
    assert both.next_unit() is None


def test_heavier_search_first_on_ties_then_study_order():
    policy = PoolPolicy([SearchPlan("small/a", 2, weight=0.01),
                         SearchPlan("big/a", 2, weight=1.0),
                         SearchPlan("big/b", 2, weight=1.0)], cap=2)
    assert policy.next_unit().key == "big/a"


def test_finals_start_only_after_their_search_has_ended():
    policy = PoolPolicy([SearchPlan("t/a", 2, finals=3), SearchPlan("t/b", 8, finals=3)],
                        cap=2)
    starts = _drain(policy, slots=3)
    for key in ("t/a", "t/b"):
        last_search = max(i for i, s in enumerate(starts) if s == (key, SEARCH))
        finals = [i for i, s in enumerate(starts) if s == (key, FINAL)]
        assert len(finals) == 3 and min(finals) > last_search
    # a's finals did not wait for b's search
    assert min(i for i, s in enumerate(starts) if s == ("t/a", FINAL)) < max(
        i for i, s in enumerate(starts) if s == ("t/b", SEARCH))


def test_finals_for_decides_the_seeds_when_the_search_ends():
    asked = []
    policy = PoolPolicy([SearchPlan("t/a", 1, finals=3), SearchPlan("t/b", 1, finals=3)],
                        cap=1, finals_for=lambda key: asked.append(key) or (
                            0 if key == "t/a" else 2))
    starts = _drain(policy, slots=2)
    assert sorted(asked) == ["t/a", "t/b"]
    assert starts.count(("t/a", FINAL)) == 0 and starts.count(("t/b", FINAL)) == 2


def test_a_search_with_no_trials_left_runs_its_finals_at_once():
    policy = PoolPolicy([SearchPlan("t/a", 0, finals=2)], cap=4)
    assert _drain(policy, slots=4) == [("t/a", FINAL)] * 2


def test_sequential_is_one_at_a_time_per_task_searches_then_finals():
    plans = [SearchPlan(f"{task}/{arm}", 2, finals=1) for task in ("t1", "t2")
             for arm in ("lora", "fft")]
    policy = PoolPolicy(plans, cap=4, sequential=True)
    starts = _drain(policy, slots=8)
    assert starts == [("t1/lora", SEARCH)] * 2 + [("t1/fft", SEARCH)] * 2 + [
        ("t1/lora", FINAL), ("t1/fft", FINAL)] + [("t2/lora", SEARCH)] * 2 + [
        ("t2/fft", SEARCH)] * 2 + [("t2/lora", FINAL), ("t2/fft", FINAL)]


def test_no_unit_exceeds_its_budget():
    policy = PoolPolicy([SearchPlan("t/a", 1)], cap=2)
    unit = policy.next_unit()
    policy.started(unit)
    with pytest.raises(ValueError, match="budget"):
        policy.started(unit)


def test_no_search_starves_while_a_long_one_runs():
    """A long search keeps its cap; the others, started later in the file, still run."""
    plans = [SimSearch("big/a", 20, 10.0)] + [SimSearch(f"s{i}/a", 4, 0.1) for i in range(6)]
    result = simulate(plans, slots=8, asha=ASHA, cap=4)
    first = {key: min(t for t, k, _ in result.starts if k == key) for _, key, _ in
             result.starts}
    # every small search started in the first wave, beside the big one
    assert all(first[f"s{i}/a"] == 0 for i in range(6))


@pytest.mark.parametrize("slots", [8, 32, 64])
def test_paper_grid_makespan_against_the_lower_bound(slots):
    grid = paper_grid()
    pool = simulate(grid, slots, ASHA, cap=4)
    queue = queue_order(grid, slots, ASHA)
    assert pool.trials == queue.trials == 18 * 9 * 20 + 18 * 9 * 3
    assert pool.stopped_early == queue.stopped_early  # same trials, same early stops
    assert pool.busy == pytest.approx(queue.busy)
    bound = {8: 1.01, 32: 1.1, 64: 1.15}[slots]
    assert pool.makespan <= bound * pool.lower_bound
    assert queue.makespan >= 1.7 * pool.makespan  # the queue leaves slots idle
    for key, phase in pool.ends:  # finals start after their search ended
        if phase == FINAL:
            first_final = min(t for t, k, p in pool.starts if (k, p) == (key, FINAL))
            assert first_final >= pool.ends[(key, SEARCH)]
