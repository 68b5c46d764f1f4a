"""Tests for the lock-order graph: one unit test per rule, then property tests against a brute force.

The oracle records *every* edge instance of a trace (no first-occurrence or gate-minimality
pruning), enumerates every simple cycle by trying all orderings of all lock subsets, and checks
feasibility by trying every combination of one instance per edge: pairwise distinct timelines and
pairwise disjoint held sets (gates plus the edge's source lock).
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from typing import Hashable, Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raceguard.engine.lockgraph import HeldLock, LockCycle, LockEdge, LockGraph

# One trace step: (timeline, is_acquire, lock). A release of a lock not held releases the innermost.
Step = tuple[int, bool, Hashable]
# An edge instance as the oracle sees it: (src, dst, timeline, gates).
Fact = tuple[Hashable, Hashable, int, frozenset]


def nested(graph: LockGraph, timeline: int, *locks: Hashable, outer: Sequence[Hashable] = ()) -> None:
    """Acquire ``locks`` one inside the other (like nested ``with`` blocks), after holding ``outer``."""
    held = [HeldLock(lock, f"t{timeline}:{lock}") for lock in outer]
    for lock in locks:
        graph.on_acquire(timeline, lock, tuple(held), f"t{timeline}:{lock}")
        held.append(HeldLock(lock, f"t{timeline}:{lock}"))


def lock_tuples(cycles: list[LockCycle]) -> list[tuple[Hashable, ...]]:
    return [c.locks for c in cycles]


# -- unit tests, one per rule -------------------------------------------------------------------


def test_two_lock_inversion_across_two_timelines_is_one_cycle():
    graph = LockGraph()
    nested(graph, 1, "A", "B")
    nested(graph, 2, "B", "A")
    cycles = graph.cycles()
    assert lock_tuples(cycles) == [("A", "B")]
    (cycle,) = cycles
    assert cycle.edges == (
        LockEdge("A", "B", 1, site="t1:B", src_site="t1:A", gates=frozenset()),
        LockEdge("B", "A", 2, site="t2:A", src_site="t2:B", gates=frozenset()),
    )
    assert cycle.timelines == (1, 2)


def test_three_lock_cycle_across_three_timelines():
    graph = LockGraph()
    nested(graph, 1, 1, 2)
    nested(graph, 2, 2, 3)
    nested(graph, 3, 3, 1)
    (cycle,) = graph.cycles()
    assert cycle.locks == (1, 2, 3)
    assert [(e.src, e.dst, e.timeline) for e in cycle.edges] == [(1, 2, 1), (2, 3, 2), (3, 1, 3)]


def test_inversion_by_one_timeline_only_is_not_a_cycle():
    graph = LockGraph()
    nested(graph, 1, "A", "B")
    nested(graph, 1, "B", "A")
    assert graph.cycles() == []


def test_common_gate_lock_prevents_the_cycle():
    graph = LockGraph()
    nested(graph, 1, "A", "B", outer=["G"])
    nested(graph, 2, "B", "A", outer=["G"])
    assert graph.cycles() == []


def test_different_gate_locks_do_not_prevent_the_cycle():
    graph = LockGraph()
    nested(graph, 1, "A", "B", outer=["G1"])
    nested(graph, 2, "B", "A", outer=["G2"])
    assert lock_tuples(graph.cycles()) == [("A", "B")]
    (cycle,) = graph.cycles()
    assert [e.gates for e in cycle.edges] == [frozenset({"G1"}), frozenset({"G2"})]


def test_gated_first_then_ungated_occurrence_is_still_found():
    # The first A->B of timeline 1 was under G, a later one was not: keeping only the first
    # occurrence would miss the deadlock, so the smaller gate set replaces it.
    graph = LockGraph()
    nested(graph, 1, "A", "B", outer=["G"])
    nested(graph, 2, "B", "A", outer=["G"])
    assert graph.cycles() == []
    nested(graph, 1, "A", "B")
    (cycle,) = graph.cycles()
    assert cycle.edges[0].gates == frozenset()
    assert len([e for e in graph.edges() if (e.src, e.dst, e.timeline) == ("A", "B", 1)]) == 1


def test_larger_gate_set_than_recorded_adds_nothing():
    graph = LockGraph()
    nested(graph, 1, "A", "B")
    nested(graph, 1, "A", "B", outer=["G"])
    ab = [e for e in graph.edges() if (e.src, e.dst) == ("A", "B")]
    assert len(ab) == 1 and ab[0].gates == frozenset()


def test_rlock_reentry_adds_no_edge_and_no_self_loop():
    graph = LockGraph()
    graph.on_acquire(1, "A", (), "s0")
    graph.on_acquire(1, "B", (HeldLock("A", "s0"),), "s1")
    before = graph.edges()
    # re-enter A while holding A and B: neither B->A nor A->A
    graph.on_acquire(1, "A", (HeldLock("A", "s0"), HeldLock("B", "s1")), "s2")
    assert graph.edges() == before
    nested(graph, 2, "B", "A")  # a real inversion by another thread is still a cycle
    assert lock_tuples(graph.cycles()) == [("A", "B")]


def test_rlock_held_twice_counts_once():
    graph = LockGraph()
    held = (HeldLock("R", "outer"), HeldLock("R", "inner"))
    graph.on_acquire(1, "X", held, "x")
    (edge,) = graph.edges()
    assert edge == LockEdge("R", "X", 1, site="x", src_site="outer", gates=frozenset())


def test_consistent_order_is_not_a_cycle():
    graph = LockGraph()
    for timeline in range(1, 5):
        nested(graph, timeline, "A", "B", "C", "D")
    assert graph.cycles() == []


def test_cycle_found_regardless_of_which_edge_came_first():
    first = LockGraph()
    nested(first, 1, "A", "B")
    nested(first, 2, "B", "A")
    second = LockGraph()
    nested(second, 2, "B", "A")
    nested(second, 1, "A", "B")
    assert lock_tuples(first.cycles()) == lock_tuples(second.cycles()) == [("A", "B")]


def test_rotation_is_deterministic_from_the_smallest_lock():
    graph = LockGraph()
    nested(graph, 7, 30, 10)
    nested(graph, 8, 10, 20)
    nested(graph, 9, 20, 30)
    (cycle,) = graph.cycles()
    assert cycle.locks == (10, 20, 30)
    assert [(e.src, e.dst) for e in cycle.edges] == [(10, 20), (20, 30), (30, 10)]


def test_three_cycle_with_two_edges_from_one_timeline_is_not_feasible():
    graph = LockGraph()
    nested(graph, 1, "A", "B")
    nested(graph, 1, "B", "C")  # same thread, separately
    nested(graph, 2, "C", "A")
    assert graph.cycles() == []
    nested(graph, 3, "B", "C")  # now a third thread provides B->C
    (cycle,) = graph.cycles()
    assert cycle.locks == ("A", "B", "C") and cycle.timelines == (1, 3, 2)


def test_timeline_choice_is_a_matching_not_a_greedy_pick():
    # A->B by t1 or t2, B->C by t1 only, C->A by t2 or t3: only A->B=t2, B->C=t1, C->A=t3 works,
    # and a greedy first pick (t1 for A->B) would miss it.
    graph = LockGraph()
    nested(graph, 1, "A", "B")
    nested(graph, 2, "A", "B")
    nested(graph, 1, "B", "C")
    nested(graph, 2, "C", "A")
    nested(graph, 3, "C", "A")
    (cycle,) = graph.cycles()
    assert cycle.timelines == (2, 1, 3)


def test_gate_that_is_another_edges_source_makes_the_longer_cycle_infeasible():
    # t1 holds C and A while taking B; t3 holds C while taking A: they cannot both hold C, so
    # A->B->C->A cannot deadlock. The real deadlock is the 2-cycle B->C->B (t1 holds C, wants B;
    # t2 holds B, wants C).
    graph = LockGraph()
    nested(graph, 1, "C", "A", "B")
    nested(graph, 2, "B", "C")
    nested(graph, 3, "C", "A")
    assert lock_tuples(graph.cycles()) == [("B", "C")]


def test_two_cycles_sharing_locks_are_reported_separately_and_sorted():
    graph = LockGraph()
    nested(graph, 1, 1, 2)
    nested(graph, 2, 2, 1)
    nested(graph, 3, 2, 3)
    nested(graph, 4, 3, 1)
    nested(graph, 5, 3, 2)
    assert lock_tuples(graph.cycles()) == [(1, 2), (2, 3), (1, 2, 3)]


def test_max_cycle_length_bounds_the_search():
    graph = LockGraph(max_cycle_length=3)
    for timeline, (a, b) in enumerate(zip(range(4), [1, 2, 3, 0])):
        nested(graph, timeline, a, b)
    assert graph.cycles() == []
    assert lock_tuples(graph.cycles(max_length=4)) == [(0, 1, 2, 3)]


def test_unorderable_lock_keys_still_give_a_deterministic_rotation():
    graph = LockGraph()
    nested(graph, 1, "B", 2)
    nested(graph, 2, 2, "B")
    (cycle,) = graph.cycles()
    assert cycle.locks == (2, "B")  # mixed key types fall back to (type name, repr) order


def test_cycles_are_recomputed_after_new_edges():
    graph = LockGraph()
    nested(graph, 1, "A", "B")
    assert graph.cycles() == []
    nested(graph, 2, "B", "A")
    assert lock_tuples(graph.cycles()) == [("A", "B")]


def test_concurrent_recording_from_several_threads():
    graph = LockGraph()
    errors: list[BaseException] = []

    def worker(timeline: int) -> None:
        try:
            for i in range(300):
                a, b = (timeline + i) % 6, (timeline + i + 1) % 6
                nested(graph, timeline, a, b)
                if i % 50 == 0:
                    graph.cycles()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    # every consecutive pair (i, i+1 mod 6) was taken by several threads: the 6-ring is a cycle
    assert (0, 1, 2, 3, 4, 5) in lock_tuples(graph.cycles())


def test_hundreds_of_locks_search_quickly():
    rng = random.Random(1234)
    graph = LockGraph()
    n_locks, n_timelines = 400, 40
    for _ in range(600):
        timeline = rng.randrange(n_timelines)
        depth = rng.randint(2, 3)
        nested(graph, timeline, *rng.sample(range(n_locks), depth))
    started = time.perf_counter()
    cycles = graph.cycles()
    elapsed = time.perf_counter() - started
    assert cycles, "a random graph this dense has inversions"
    assert elapsed < 5.0
    for cycle in cycles:
        assert_valid_cycle(cycle, facts=None)


def test_long_orderly_chains_with_one_back_edge():
    # Deep SCC (a 300-lock ring split among many timelines) exercises the iterative SCC code and
    # the distance-to-start pruning: only rings of at most max_cycle_length locks may be reported.
    graph = LockGraph()
    for lock in range(300):
        nested(graph, lock, lock, (lock + 1) % 300)
    nested(graph, 1000, 5, 0)  # a short cycle 0->1->...->5->0
    started = time.perf_counter()
    assert lock_tuples(graph.cycles()) == [(0, 1, 2, 3, 4, 5)]
    assert time.perf_counter() - started < 2.0


# -- oracle -------------------------------------------------------------------------------------


def run_trace(graph: LockGraph, steps: Sequence[Step]) -> set[Fact]:
    """Feed a trace to ``graph`` and return every edge instance it contains (the oracle's facts)."""
    held: dict[int, list[HeldLock]] = {}
    facts: set[Fact] = set()
    for index, (timeline, is_acquire, lock) in enumerate(steps):
        stack = held.setdefault(timeline, [])
        if is_acquire:
            site = (timeline, index)
            graph.on_acquire(timeline, lock, tuple(stack), site)
            held_locks = {h.lock for h in stack}
            if lock not in held_locks:
                for src in held_locks:
                    facts.add((src, lock, timeline, frozenset(held_locks - {src})))
            stack.append(HeldLock(lock, site))
        elif stack:
            # release the lock's innermost entry if held, else the innermost lock (out-of-order
            # releases are legal in Python and must leave ``held`` in acquisition order)
            positions = [i for i, h in enumerate(stack) if h.lock == lock]
            del stack[positions[-1] if positions else -1]
    return facts


def brute_force_cycles(facts: set[Fact], max_length: int) -> set[tuple[Hashable, ...]]:
    by_edge: dict[tuple[Hashable, Hashable], list[Fact]] = {}
    for fact in facts:
        by_edge.setdefault((fact[0], fact[1]), []).append(fact)
    locks = sorted({fact[0] for fact in facts} | {fact[1] for fact in facts})
    feasible = set()
    for size in range(2, min(len(locks), max_length) + 1):
        for subset in itertools.combinations(locks, size):
            first, rest = subset[0], subset[1:]  # rotation: start at the smallest lock
            for order in itertools.permutations(rest):
                cycle = (first, *order)
                options = [by_edge.get((cycle[i], cycle[(i + 1) % size]), []) for i in range(size)]
                if all(options) and any(feasible_choice(choice) for choice in itertools.product(*options)):
                    feasible.add(cycle)
    return feasible


def feasible_choice(choice: Sequence[Fact]) -> bool:
    timelines = [fact[2] for fact in choice]
    if len(set(timelines)) != len(timelines):
        return False
    helds = [fact[3] | {fact[0]} for fact in choice]
    return all(a.isdisjoint(b) for a, b in itertools.combinations(helds, 2))


def assert_valid_cycle(cycle: LockCycle, facts: set[Fact] | None) -> None:
    size = len(cycle.locks)
    assert size >= 2 and len(cycle.edges) == size and len(set(cycle.locks)) == size
    assert cycle.locks[0] == min(cycle.locks)
    for i, edge in enumerate(cycle.edges):
        assert (edge.src, edge.dst) == (cycle.locks[i], cycle.locks[(i + 1) % size])
        if facts is not None:
            assert (edge.src, edge.dst, edge.timeline, edge.gates) in facts
    assert feasible_choice([(e.src, e.dst, e.timeline, e.gates) for e in cycle.edges])


@st.composite
def traces(
    draw, max_timelines: int = 4, max_locks: int = 5, max_blocks: int = 16, release_all: bool = False
) -> list[Step]:
    """Random programs: each block is one timeline nesting 1-3 acquires, then releasing some of them.

    Locks left held by a block become gates (or re-entries) for that timeline's next blocks, and
    releases are sometimes out of order, so gates, RLock re-entry and inversions all show up.
    With ``release_all`` every block releases everything it took: no gates, so longer cycles.
    """
    n_timelines = draw(st.integers(2, max_timelines))
    n_locks = draw(st.integers(2, max_locks))
    lock = st.integers(0, n_locks - 1)
    block = st.tuples(
        st.integers(100, 100 + n_timelines - 1),  # timeline ids distinct from lock ids on purpose
        st.lists(lock, min_size=1, max_size=3),
        st.integers(0, 3),  # how many of the block's acquires to release afterwards
        st.booleans(),  # release them innermost first (nested) or outermost first
    )
    steps: list[Step] = []
    for timeline, acquired, n_released, innermost_first in draw(st.lists(block, max_size=max_blocks)):
        if release_all:
            n_released = len(acquired)
        steps.extend((timeline, True, each) for each in acquired)
        released = acquired[::-1] if innermost_first else acquired
        steps.extend((timeline, False, each) for each in released[:n_released])
    return steps


ORACLE_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@ORACLE_SETTINGS
@given(traces())
def test_cycles_match_brute_force_oracle(steps):
    graph = LockGraph()
    facts = run_trace(graph, steps)
    cycles = graph.cycles()
    assert {c.locks for c in cycles} == brute_force_cycles(facts, max_length=8)
    assert len(cycles) == len({c.locks for c in cycles})  # each cycle once
    for cycle in cycles:
        assert_valid_cycle(cycle, facts)


@ORACLE_SETTINGS
@given(traces(max_timelines=5, max_locks=5, release_all=True))
def test_ungated_cycles_match_brute_force_oracle(steps):
    graph = LockGraph()
    facts = run_trace(graph, steps)
    cycles = graph.cycles()
    assert {c.locks for c in cycles} == brute_force_cycles(facts, max_length=8)
    for cycle in cycles:
        assert_valid_cycle(cycle, facts)


@ORACLE_SETTINGS
@given(traces(max_timelines=5, max_locks=5), st.integers(2, 4))
def test_length_bound_matches_brute_force_oracle(steps, max_length):
    graph = LockGraph(max_cycle_length=max_length)
    facts = run_trace(graph, steps)
    assert {c.locks for c in graph.cycles()} == brute_force_cycles(facts, max_length)


@settings(max_examples=150, deadline=None)
@given(traces())
def test_cycles_do_not_depend_on_interleaving(steps):
    # Grouping the steps by timeline keeps every thread's own order, so it is another possible
    # interleaving of the same program: the potential deadlocks must be the same.
    interleaved, grouped = LockGraph(), LockGraph()
    run_trace(interleaved, steps)
    run_trace(grouped, sorted(steps, key=lambda s: s[0]))
    assert lock_tuples(interleaved.cycles()) == lock_tuples(grouped.cycles())


@settings(max_examples=100, deadline=None)
@given(traces(max_locks=4))
def test_string_keys_match_oracle_too(steps):
    renamed = [(t, acquire, f"lock{lock}") for t, acquire, lock in steps]
    graph = LockGraph()
    facts = run_trace(graph, renamed)
    assert {c.locks for c in graph.cycles()} == brute_force_cycles(facts, max_length=8)
