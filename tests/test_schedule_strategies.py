"""Scheduling strategies, tested on simulated programs (no threads, no torch)."""

from __future__ import annotations

import collections

import pytest

from raceguard.schedule.simulate import simulate
from raceguard.schedule.strategies import (
    DataStrategy,
    FirstStrategy,
    PCTStrategy,
    RandomStrategy,
    RecordingStrategy,
    ReplayDivergence,
    ReplayStrategy,
    make_strategy,
)


def steps(n, tag):
    def prog():
        for i in range(n):
            yield ("step", f"{tag}{i}")

    return prog


def three_workers():
    return [steps(6, "a"), steps(6, "b"), steps(6, "c")]


def order(result):
    return [tid for tid, _ in result.trace]


# -- determinism ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["random", "pct"])
def test_same_seed_same_interleaving(name):
    runs = [order(simulate(make_strategy(name, 1234, 3, 18), three_workers())) for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize("name", ["random", "pct"])
def test_different_seeds_explore_different_interleavings(name):
    seen = {tuple(order(simulate(make_strategy(name, seed, 3, 18), three_workers()))) for seed in range(40)}
    assert len(seen) > 10


def test_strategies_with_the_same_seed_draw_independent_streams():
    a = order(simulate(RandomStrategy(5), three_workers()))
    b = order(simulate(PCTStrategy(5, 3, 18), three_workers()))
    assert a != b


def test_make_strategy_rejects_unknown_names_and_bad_depth():
    with pytest.raises(ValueError):
        make_strategy("dfs", 1)
    with pytest.raises(ValueError):
        PCTStrategy(1, depth=0)


# -- random -----------------------------------------------------------------------------------
def test_random_choice_is_uniform_among_runnable_threads():
    counts = collections.Counter()
    strategy = RandomStrategy(7)
    for step in range(30000):
        counts[strategy.choose([3, 5, 8], step, 3)] += 1
    for tid in (3, 5, 8):
        assert abs(counts[tid] / 30000 - 1 / 3) < 0.02


def test_random_only_ever_returns_a_runnable_thread():
    strategy = RandomStrategy(1)
    for step in range(1000):
        runnable = [i for i in range(step % 5 + 1)]
        assert strategy.choose(runnable, step, None) in runnable


# -- PCT --------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth,steps_estimate", [(1, 50), (2, 50), (3, 50), (5, 3), (3, 1)])
def test_pct_change_points_are_distinct_sorted_and_within_the_estimate(depth, steps_estimate):
    for seed in range(50):
        pct = PCTStrategy(seed, depth, steps_estimate)
        points = pct.change_points
        expected = min(depth - 1, steps_estimate) if steps_estimate > 1 else 0
        assert len(points) == expected
        assert points == sorted(set(points))
        assert all(1 <= p <= steps_estimate for p in points)


def test_pct_change_points_are_uniform_over_the_estimate():
    counts = collections.Counter()
    for seed in range(4000):
        (point,) = PCTStrategy(seed, 2, 10).change_points
        counts[point] += 1
    assert set(counts) == set(range(1, 11))
    assert max(counts.values()) / min(counts.values()) < 1.5


def test_pct_without_an_estimate_has_no_change_points_and_runs_threads_to_completion():
    """Calibration mode: highest priority first, no preemption of a runnable thread."""
    for seed in range(20):
        pct = PCTStrategy(seed, 3, None)
        assert pct.change_points == []
        trace = order(simulate(pct, three_workers()))
        # Each thread runs in one contiguous segment.
        segments = [tid for i, tid in enumerate(trace) if i == 0 or trace[i - 1] != tid]
        assert len(segments) == 3 and sorted(segments) == [0, 1, 2]


def test_pct_preempts_at_most_depth_minus_one_times():
    for seed in range(200):
        pct = PCTStrategy(seed, 3, 18)
        trace = order(simulate(pct, three_workers()))
        # A preemption: the thread that ran last step is still runnable but another one runs.
        remaining = collections.Counter(trace)
        preemptions = 0
        for i in range(1, len(trace)):
            remaining[trace[i - 1]] -= 1
            if trace[i] != trace[i - 1] and remaining[trace[i - 1]] > 0:
                preemptions += 1
        assert preemptions <= 2
        assert len(pct.fired) <= 2


def test_pct_initial_priorities_are_a_uniform_permutation():
    firsts = collections.Counter()
    for seed in range(3000):
        pct = PCTStrategy(seed, 1, None)
        firsts[order(simulate(pct, three_workers()))[0]] += 1
    for tid in range(3):
        assert abs(firsts[tid] / 3000 - 1 / 3) < 0.04


def test_pct_dynamically_created_threads_get_a_random_rank():
    """A thread started later still ends up first with probability 1/n."""
    def parent():
        yield ("spawn", steps(3, "child"))
        yield ("step", "p1")
        yield ("step", "p2")

    child_first = 0
    for seed in range(2000):
        trace = simulate(PCTStrategy(seed, 1, None), [parent]).trace
        # After the spawn, who runs next: the child (id 1) or the parent (id 0)?
        after = [tid for tid, action in trace[1:]]
        child_first += after[0] == 1
    assert abs(child_first / 2000 - 0.5) < 0.05


def test_pct_yield_demotes_the_yielding_thread():
    def spinner():
        for _ in range(5):
            yield ("yield",)

    def worker():
        for i in range(5):
            yield ("step", i)

    spinner_first = 0
    for seed in range(50):
        trace = simulate(PCTStrategy(seed, 1, None), [spinner, worker]).trace
        if trace[0][0] != 0:
            continue  # the worker had the higher priority and ran first anyway
        spinner_first += 1
        # After the spinner's first yield, the worker runs to completion before it spins again.
        after = [tid for tid, _ in trace[1:]]
        assert after[:5] == [1] * 5
    assert spinner_first > 10


def _finds(strategy_factory, program_factory, bug, runs):
    return sum(bug(simulate(strategy_factory(seed), program_factory())) for seed in range(runs))


def test_pct_finds_an_ordering_bug_of_depth_one_with_probability_at_least_one_over_n():
    """Depth 1: the bug needs thread 2's first step before thread 0's (no preemption needed)."""
    def bug(result):
        trace = order(result)
        return trace.index(2) < trace.index(0)

    n, runs = 3, 600
    found = _finds(lambda s: PCTStrategy(s, 1, 18), three_workers, bug, runs)
    assert found / runs >= 1 / n - 0.05


def test_pct_finds_an_atomicity_violation_of_depth_two_with_its_guarantee():
    """Depth 2: thread 1 must run between thread 0's two steps (one preemption in thread 0).

    PCT's guarantee for d = 2 is at least 1/(n * k) per run with n threads and k steps.
    """
    def a():
        yield ("step", "read")
        yield ("step", "write")

    def b():
        yield ("step", "other")

    def bug(result):
        trace = [(tid, action[1]) for tid, action in result.trace]
        return trace.index((0, "read")) < trace.index((1, "other")) < trace.index((0, "write"))

    n, k, runs = 2, 3, 1200
    found = _finds(lambda s: PCTStrategy(s, 2, k), lambda: [a, b], bug, runs)
    assert found / runs >= 1 / (n * k)


def test_random_also_finds_the_atomicity_violation():
    def a():
        yield ("step", "read")
        yield ("step", "write")

    def b():
        yield ("step", "other")

    def bug(result):
        trace = [(tid, action[1]) for tid, action in result.trace]
        return trace.index((0, "read")) < trace.index((1, "other")) < trace.index((0, "write"))

    found = _finds(RandomStrategy, lambda: [a, b], bug, 400)
    assert 0.15 < found / 400 < 0.45


# -- blocking and deadlocks in the simulator ----------------------------------------------------
def test_simulated_lock_blocks_and_inversion_can_deadlock():
    def first():
        yield ("acquire", "A")
        yield ("step", "x")
        yield ("acquire", "B")
        yield ("release", "B")
        yield ("release", "A")

    def second():
        yield ("acquire", "B")
        yield ("step", "y")
        yield ("acquire", "A")
        yield ("release", "A")
        yield ("release", "B")

    outcomes = collections.Counter(simulate(RandomStrategy(s), [first, second]).deadlocked for s in range(200))
    assert outcomes[True] > 10 and outcomes[False] > 10


# -- replay -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["random", "pct"])
def test_recorded_choices_replay_the_same_interleaving(name):
    for seed in range(20):
        recorder = RecordingStrategy(make_strategy(name, seed, 3, 18))
        original = simulate(recorder, three_workers())
        replayed = simulate(ReplayStrategy(recorder.choices, strict=True), three_workers())
        assert replayed.trace == original.trace


def test_replay_divergence_is_detected_or_tolerated():
    with pytest.raises(ReplayDivergence):
        simulate(ReplayStrategy([2, 2, 2, 2, 2, 2, 2, 2], strict=True), [steps(2, "a"), steps(2, "b")])
    lenient = ReplayStrategy([7], strict=False)
    simulate(lenient, [steps(2, "a"), steps(2, "b")])
    assert lenient.divergences >= 1


def test_first_strategy_is_a_deterministic_baseline():
    trace = order(simulate(FirstStrategy(), three_workers()))
    assert trace == [0] * 6 + [1] * 6 + [2] * 6


# -- a Hypothesis-driven strategy plugs into the same interface --------------------------------
def test_hypothesis_data_strategy_finds_and_shrinks_an_atomicity_violation():
    from hypothesis import HealthCheck, find, settings
    from hypothesis import strategies as st

    def a():
        yield ("step", "read")
        yield ("step", "compute")
        yield ("step", "write")

    def b():
        yield ("step", "other")

    def violates(data):
        result = simulate(DataStrategy.from_hypothesis(data), [a, b])
        trace = [(tid, action[1]) for tid, action in result.trace]
        return trace.index((0, "read")) < trace.index((1, "other")) < trace.index((0, "write"))

    found = find(st.data(), violates, settings=settings(max_examples=200, database=None,
                                                         suppress_health_check=list(HealthCheck)))
    assert found is not None
