"""Tests for the wait-for graph: one unit test per rule, then property tests against a brute force.

The oracle keeps the same plain state (owners with their reentrancy, one wait per timeline,
finished timelines) and recomputes every cycle from scratch by trying all orderings of all
subsets of blocked timelines.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Hashable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raceguard.engine.waitfor import Deadlock, ThreadJoin, Wait, WaitForGraph

# -- unit tests, one per rule -------------------------------------------------------------------


def test_two_lock_deadlock_is_reported_by_the_closing_wait():
    graph = WaitForGraph()
    graph.set_owner("A", 1)
    graph.set_owner("B", 2)
    assert graph.block(1, "B", "s1") is None  # 1 waits for 2, who is running
    deadlock = graph.block(2, "A", "s2")
    assert deadlock == Deadlock(
        waits=(Wait(1, "B", "s1"), Wait(2, "A", "s2")), cycle=True, holders=(2, 1)
    )
    assert graph.find_deadlock() == deadlock


def test_cycle_is_rotated_to_start_at_the_smallest_timeline():
    graph = WaitForGraph()
    for timeline, lock in [(5, "L5"), (3, "L3"), (9, "L9")]:
        graph.set_owner(lock, timeline)
    graph.block(9, "L5", "s9")
    graph.block(3, "L9", "s3")
    deadlock = graph.block(5, "L3", "s5")
    assert deadlock is not None and deadlock.cycle
    assert deadlock.timelines == (3, 9, 5)
    assert deadlock.holders == (9, 5, 3)
    # each wait's resource is owned by the next wait's timeline
    for wait, holder in zip(deadlock.waits, deadlock.holders):
        assert graph.owner(wait.resource) == holder


def test_non_reentrant_lock_reacquired_by_its_owner_is_a_self_deadlock():
    graph = WaitForGraph()
    graph.set_owner("L", 1)
    deadlock = graph.block(1, "L", "again")
    assert deadlock == Deadlock(waits=(Wait(1, "L", "again"),), cycle=True, holders=(1,))


def test_rlock_reacquired_by_its_owner_never_blocks():
    graph = WaitForGraph()
    graph.set_owner("R", 1, reentrant=True)
    assert graph.block(1, "R", "again") is None
    assert graph.waiting_on(1) is None  # not even recorded as a wait
    assert graph.all_blocked([1]) is None


def test_rlock_owned_by_another_timeline_is_a_normal_wait():
    graph = WaitForGraph()
    graph.set_owner("R", 1, reentrant=True)
    graph.set_owner("L", 2)
    assert graph.block(2, "R", "s2") is None
    assert graph.waiting_on(2) == Wait(2, "R", "s2")
    deadlock = graph.block(1, "L", "s1")
    assert deadlock is not None and deadlock.timelines == (1, 2)


def test_anonymous_waits_never_close_a_cycle():
    graph = WaitForGraph()
    graph.set_owner("A", 1)
    graph.block(1, "event", "e")
    assert graph.block(2, "A", "s") is None
    assert graph.find_deadlock() is None


def test_free_lock_is_not_a_cycle_until_someone_owns_it():
    graph = WaitForGraph()
    graph.set_owner("A", 1)
    graph.block(1, "B", "s1")  # B is free for a moment (its owner just released it)
    assert graph.block(2, "A", "s2") is None
    graph.set_owner("B", 2)  # 2 got B after all: now it is a deadlock
    deadlock = graph.find_deadlock()
    assert deadlock is not None and deadlock.timelines == (1, 2)


def test_unblock_breaks_the_chain():
    graph = WaitForGraph()
    graph.set_owner("A", 1)
    graph.set_owner("B", 2)
    graph.block(1, "B", "s1")
    graph.unblock(1)
    assert graph.block(2, "A", "s2") is None
    assert graph.find_deadlock() is None


def test_releasing_the_lock_breaks_the_chain():
    graph = WaitForGraph()
    graph.set_owner("A", 1)
    graph.set_owner("B", 2)
    graph.block(1, "B", "s1")
    graph.set_owner("A", None)
    assert graph.block(2, "A", "s2") is None


def test_a_new_wait_replaces_the_previous_one():
    graph = WaitForGraph()
    graph.set_owner("A", 1)
    graph.set_owner("B", 2)
    graph.block(1, "B", "first")
    graph.block(1, "event", "second")
    assert graph.waiting_on(1) == Wait(1, "event", "second")
    assert graph.block(2, "A", "s2") is None


def test_join_cycle_with_a_lock():
    # 1 holds A and joins 2; 2 waits for A
    graph = WaitForGraph()
    graph.set_owner("A", 1)
    assert graph.block_on_timeline(1, 2, "join") is None
    deadlock = graph.block(2, "A", "lock")
    assert deadlock == Deadlock(
        waits=(Wait(1, ThreadJoin(2), "join"), Wait(2, "A", "lock")), cycle=True, holders=(2, 1)
    )


def test_two_threads_joining_each_other():
    graph = WaitForGraph()
    graph.block_on_timeline(1, 2, "j1")
    deadlock = graph.block_on_timeline(2, 1, "j2")
    assert deadlock is not None and deadlock.timelines == (1, 2)


def test_joining_a_finished_thread_is_not_a_cycle():
    graph = WaitForGraph()
    graph.set_owner("A", 1)
    graph.timeline_finished(2)
    assert graph.owner(ThreadJoin(2)) is None
    graph.block_on_timeline(1, 2, "join")
    assert graph.block(2, "A", "late") is None


def test_finishing_clears_the_timelines_wait():
    graph = WaitForGraph()
    graph.block(2, "event", "e")
    graph.timeline_finished(2)
    assert graph.waiting_on(2) is None


def test_thread_join_ownership_cannot_be_set():
    with pytest.raises(ValueError):
        WaitForGraph().set_owner(ThreadJoin(1), 2)


def test_all_blocked_when_every_live_timeline_waits():
    graph = WaitForGraph()
    graph.set_owner("L", 3)  # 3 holds L and is gone (its wait does not matter)
    graph.block(1, "event", "e1")
    assert graph.all_blocked([1, 2]) is None  # 2 still runs
    graph.block(2, "L", "l2")
    stuck = graph.all_blocked({2, 1})
    assert stuck == Deadlock(
        waits=(Wait(1, "event", "e1"), Wait(2, "L", "l2")), cycle=False, holders=(None, 3)
    )
    assert graph.find_deadlock() is None  # nobody waits on anybody in a cycle
    graph.unblock(1)
    assert graph.all_blocked([1, 2]) is None


def test_all_blocked_with_no_live_timeline_is_none():
    assert WaitForGraph().all_blocked([]) is None


def test_deadlocks_lists_every_disjoint_cycle():
    graph = WaitForGraph()
    for timeline in (1, 2, 3, 4):
        graph.set_owner(f"L{timeline}", timeline)
    graph.block(4, "L3", "s4")
    graph.block(3, "L4", "s3")
    graph.block(2, "L1", "s2")
    graph.block(1, "L2", "s1")
    graph.block(5, "L1", "s5")  # waits on a cycle without being in one
    assert [d.timelines for d in graph.deadlocks()] == [(1, 2), (3, 4)]
    assert graph.find_deadlock().timelines == (1, 2)


def test_block_reports_only_a_cycle_through_the_blocking_timeline():
    graph = WaitForGraph()
    graph.set_owner("A", 1)
    graph.set_owner("B", 2)
    graph.block(1, "B", "s1")
    graph.block(2, "A", "s2")
    assert graph.block(3, "A", "s3") is None  # 3 is stuck behind the cycle but not in it


def test_concurrent_use_from_several_threads():
    graph = WaitForGraph()
    errors: list[BaseException] = []

    def worker(timeline: int) -> None:
        try:
            for i in range(500):
                resource = f"L{timeline}"
                graph.set_owner(resource, timeline)
                graph.block(timeline, f"L{(timeline + 1) % 4}", i)
                graph.find_deadlock()
                graph.unblock(timeline)
                graph.set_owner(resource, None)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert graph.find_deadlock() is None and graph.all_blocked(range(4)) is None


# -- oracle -------------------------------------------------------------------------------------


@dataclass
class OracleState:
    owners: dict[Hashable, tuple[int, bool]] = field(default_factory=dict)
    waits: dict[int, Wait] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)

    def owner(self, resource: Hashable) -> int | None:
        if isinstance(resource, ThreadJoin):
            return None if resource.timeline in self.finished else resource.timeline
        return self.owners[resource][0] if resource in self.owners else None

    def cycles(self) -> set[tuple[int, ...]]:
        """Every wait-for cycle, by brute force, as timeline tuples starting at the smallest."""
        blocked = sorted(self.waits)
        found = set()
        for size in range(1, len(blocked) + 1):
            for subset in itertools.combinations(blocked, size):
                for order in itertools.permutations(subset[1:]):
                    cycle = (subset[0], *order)
                    waited_owners = [self.owner(self.waits[t].resource) for t in cycle]
                    if waited_owners == [*cycle[1:], cycle[0]]:
                        found.add(cycle)
        return found


TIMELINES = (1, 2, 3, 4)
LOCKS = ("L0", "L1", "L2")
ANONYMOUS = ("event", "queue")

own = st.tuples(st.just("own"), st.sampled_from(LOCKS), st.sampled_from((None, *TIMELINES)), st.booleans())
block_on_lock = st.tuples(st.just("block"), st.sampled_from(TIMELINES), st.sampled_from(LOCKS))
# Weighted towards taking locks and waiting on them (what builds cycles); joins, anonymous waits,
# unblocks and finished threads are rarer so that multi-timeline cycles are common.
operations = st.one_of(
    own,
    own,
    block_on_lock,
    block_on_lock,
    st.tuples(st.just("block"), st.sampled_from(TIMELINES), st.sampled_from(ANONYMOUS)),
    st.tuples(st.just("join"), st.sampled_from(TIMELINES), st.sampled_from(TIMELINES)),
    st.tuples(st.sampled_from(("unblock", "finish")), st.sampled_from(TIMELINES)),
)


@st.composite
def programs(draw) -> list[tuple]:
    """Random operations around a planted ring (in random order), so longer cycles are common.

    The ring makes each of 2-4 timelines own something (a lock, or its own life for a join) and
    wait on the next one's; the surrounding noise may break it again or build other cycles.
    """
    ring = draw(st.permutations(TIMELINES))[: draw(st.integers(2, len(TIMELINES)))]
    planted: list[tuple] = []
    for i, timeline in enumerate(ring):
        nxt = ring[(i + 1) % len(ring)]
        if draw(st.booleans()):
            planted.append(("join", timeline, nxt))
        else:
            lock = f"R{nxt}"  # a lock only nxt takes in the ring
            planted += [("own", lock, nxt, False), ("block", timeline, lock)]
    before = draw(st.lists(operations, max_size=10))
    after = draw(st.lists(operations, max_size=10))
    return before + draw(st.permutations(planted)) + after


def check_cycle(deadlock: Deadlock, oracle: OracleState) -> None:
    assert deadlock.cycle
    assert deadlock.timelines in oracle.cycles()
    assert deadlock.waits == tuple(oracle.waits[t] for t in deadlock.timelines)
    assert deadlock.holders == deadlock.timelines[1:] + deadlock.timelines[:1]


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.lists(operations, max_size=30), programs()))
def test_matches_brute_force_oracle(ops):
    graph, oracle = WaitForGraph(), OracleState()
    for step, op in enumerate(ops):
        kind = op[0]
        if kind == "own":
            _, resource, timeline, reentrant = op
            graph.set_owner(resource, timeline, reentrant=reentrant)
            if timeline is None:
                oracle.owners.pop(resource, None)
            else:
                oracle.owners[resource] = (timeline, reentrant)
        elif kind in ("block", "join"):
            _, timeline, target = op
            resource = ThreadJoin(target) if kind == "join" else target
            result = graph.block(timeline, resource, step)
            oracle.waits.pop(timeline, None)
            if oracle.owners.get(resource) != (timeline, True):  # an RLock re-entry is no wait
                oracle.waits[timeline] = Wait(timeline, resource, step)
            through_me = {c for c in oracle.cycles() if timeline in c}
            if through_me:
                assert result is not None
                check_cycle(result, oracle)
                assert result.timelines in through_me
            else:
                assert result is None
        elif kind == "unblock":
            graph.unblock(op[1])
            oracle.waits.pop(op[1], None)
        else:
            graph.timeline_finished(op[1])
            oracle.waits.pop(op[1], None)
            oracle.finished.add(op[1])

        expected = oracle.cycles()
        listed = graph.deadlocks()
        assert {d.timelines for d in listed} == expected
        for deadlock in listed:
            check_cycle(deadlock, oracle)
        first = graph.find_deadlock()
        if expected:
            assert first is not None and first.timelines == min(expected, key=lambda c: c[0])
        else:
            assert first is None
        live = [t for t in TIMELINES if t not in oracle.finished]
        stuck = graph.all_blocked(live)
        if live and all(t in oracle.waits for t in live):
            assert stuck is not None and not stuck.cycle
            assert stuck.waits == tuple(oracle.waits[t] for t in live)
            assert stuck.holders == tuple(oracle.owner(w.resource) for w in stuck.waits)
        else:
            assert stuck is None
        for timeline in TIMELINES:
            assert graph.waiting_on(timeline) == oracle.waits.get(timeline)
