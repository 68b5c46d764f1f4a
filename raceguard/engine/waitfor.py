"""Wait-for graph: real deadlocks, found the moment the wait that closes them begins.

Pure Python, no torch, no ``threading``: the capture layer tells this module who owns what and who
waits on what, and asks whether that is a deadlock.

Model
-----
* A *resource* is anything a timeline can wait on, identified by an opaque hashable key:

  - a lock, owned by at most one timeline at a time (:meth:`WaitForGraph.set_owner`); ownership is
    either non-reentrant (``Lock``: its owner blocking on it again deadlocks itself) or reentrant
    (``RLock``: its owner re-acquiring it never blocks, and stays owner until the last release);
  - a thread join, :class:`ThreadJoin` ``(t)``, owned by timeline ``t`` for as long as ``t`` runs
    (until :meth:`WaitForGraph.timeline_finished`); nobody sets its owner;
  - anything else (``Event.wait``, ``Condition.wait``, ``Queue.get``, ``Barrier.wait``...) is an
    *anonymous* wait: no owner, so it never closes a cycle, but it does count as blocked.

* Each timeline waits on at most one resource at a time (a thread blocks in one call), so the
  graph "timeline -> owner of the resource it waits on" has out-degree at most one: a cycle through
  a timeline is found by following a single chain, and cycles never share a timeline.
* :meth:`WaitForGraph.block` reports the cycle its new wait closes, if any, including the 1-cycle
  of a timeline blocking on a non-reentrant lock it already owns.
* :meth:`WaitForGraph.all_blocked` reports the global "blocked forever" state, when every live
  timeline is blocked on anything, owned or not; the capture layer asks after a grace period.

Thread-safe: every public method takes one ``_thread`` lock (never ``threading.Lock``, which the
capture layer patches).
"""

from __future__ import annotations

import _thread
from dataclasses import dataclass
from typing import Collection, Hashable, NamedTuple

TimelineId = int
Resource = Hashable
Site = object  # opaque: the capture layer stores a stack key here


@dataclass(frozen=True)
class ThreadJoin:
    """The resource a joining timeline waits on: the end of ``timeline``, owned by it while it runs."""

    timeline: TimelineId


class Wait(NamedTuple):
    """``timeline`` is blocked on ``resource``, at ``site``."""

    timeline: TimelineId
    resource: Resource
    site: Site


@dataclass(frozen=True)
class Deadlock:
    """Blocked timelines that will never be woken.

    With ``cycle=True``, ``waits`` is a wait-for cycle in order: ``waits[i].resource`` is owned by
    ``waits[i + 1].timeline`` (cyclically), rotated to start at the smallest timeline. With
    ``cycle=False`` (from :meth:`WaitForGraph.all_blocked`), ``waits`` is every live timeline's
    wait, sorted by timeline. ``holders[i]`` is who owned ``waits[i].resource`` when it was found
    (None for an anonymous wait).
    """

    waits: tuple[Wait, ...]
    cycle: bool
    holders: tuple[TimelineId | None, ...] = ()

    @property
    def timelines(self) -> tuple[TimelineId, ...]:
        return tuple(w.timeline for w in self.waits)


class WaitForGraph:
    """Who owns which resource and who waits on which, with cycle detection on every new wait."""

    def __init__(self) -> None:
        self._mutex = _thread.allocate_lock()
        # resource -> (owner, reentrant); absent when free
        self._owners: dict[Resource, tuple[TimelineId, bool]] = {}
        self._waits: dict[TimelineId, Wait] = {}
        # Timelines that have ended: their ThreadJoin resources are free from then on.
        self._finished: set[TimelineId] = set()

    # -- ownership --------------------------------------------------------------------------

    def set_owner(
        self, resource: Resource, timeline: TimelineId | None, *, reentrant: bool = False
    ) -> None:
        """``timeline`` now owns ``resource`` (None: it is free).

        Call on the acquire that takes ownership and on the release that gives it up; for an RLock
        that is the first acquire and the last release, with ``reentrant=True``.
        """
        if isinstance(resource, ThreadJoin):
            raise ValueError("a ThreadJoin is owned by its thread until timeline_finished(); do not set it")
        with self._mutex:
            if timeline is None:
                self._owners.pop(resource, None)
            else:
                self._owners[resource] = (timeline, reentrant)

    def owner(self, resource: Resource) -> TimelineId | None:
        with self._mutex:
            return self._owner_of(resource)

    def timeline_finished(self, timeline: TimelineId) -> None:
        """``timeline`` has ended: it waits on nothing any more and joining it no longer blocks.

        Locks it still owns stay owned (a Python lock left locked by a dead thread stays locked).
        """
        with self._mutex:
            self._waits.pop(timeline, None)
            self._finished.add(timeline)

    # -- waiting ----------------------------------------------------------------------------

    def block(self, timeline: TimelineId, resource: Resource, site: Site) -> Deadlock | None:
        """``timeline`` starts waiting on ``resource``; returns the deadlock this wait closes, if any.

        Replaces any earlier wait of ``timeline``. A reentrant resource already owned by ``timeline``
        is not a wait at all (an RLock re-acquire never blocks): nothing is recorded.
        """
        with self._mutex:
            self._waits.pop(timeline, None)
            if self._owners.get(resource) == (timeline, True):
                return None
            self._waits[timeline] = Wait(timeline, resource, site)
            return self._cycle_through(timeline)

    def block_on_timeline(self, timeline: TimelineId, target: TimelineId, site: Site) -> Deadlock | None:
        """``timeline`` joins ``target``: waits on ``ThreadJoin(target)`` until ``target`` finishes."""
        return self.block(timeline, ThreadJoin(target), site)

    def unblock(self, timeline: TimelineId) -> None:
        """``timeline`` stopped waiting (got the resource, was woken, timed out or raised)."""
        with self._mutex:
            self._waits.pop(timeline, None)

    def waiting_on(self, timeline: TimelineId) -> Wait | None:
        with self._mutex:
            return self._waits.get(timeline)

    # -- detection --------------------------------------------------------------------------

    def find_deadlock(self) -> Deadlock | None:
        """The wait-for cycle through the smallest timeline that is on one, or None."""
        with self._mutex:
            for timeline in sorted(self._waits):
                found = self._cycle_through(timeline)
                if found is not None:
                    return found
            return None

    def deadlocks(self) -> list[Deadlock]:
        """Every wait-for cycle (they are disjoint), ordered by their smallest timeline."""
        with self._mutex:
            cycles: list[Deadlock] = []
            seen: set[TimelineId] = set()
            for timeline in sorted(self._waits):
                if timeline in seen:
                    continue
                found = self._cycle_through(timeline)
                if found is not None:
                    cycles.append(found)
                    seen.update(found.timelines)
            return cycles

    def all_blocked(self, live_timelines: Collection[TimelineId]) -> Deadlock | None:
        """When every live timeline is blocked (on anything), all their waits; otherwise None."""
        live = sorted(set(live_timelines))
        with self._mutex:
            if not live or any(t not in self._waits for t in live):
                return None
            waits = tuple(self._waits[t] for t in live)
            return Deadlock(waits, cycle=False, holders=tuple(self._owner_of(w.resource) for w in waits))

    # -- internals (caller holds the mutex) -------------------------------------------------

    def _owner_of(self, resource: Resource) -> TimelineId | None:
        if isinstance(resource, ThreadJoin):
            return None if resource.timeline in self._finished else resource.timeline
        entry = self._owners.get(resource)
        return None if entry is None else entry[0]

    def _cycle_through(self, timeline: TimelineId) -> Deadlock | None:
        """Follow the single chain of waits from ``timeline``; a deadlock if it comes back to it."""
        chain: list[Wait] = []
        visited: set[TimelineId] = set()
        current = timeline
        while True:
            wait = self._waits.get(current)
            if wait is None:
                return None  # the chain ends at a running timeline
            chain.append(wait)
            visited.add(current)
            owner = self._owner_of(wait.resource)
            if owner is None:
                return None  # an anonymous wait or a free resource: someone else may wake it
            if owner == timeline:
                return _rotated_cycle(chain)
            if owner in visited:
                return None  # the chain runs into a cycle that does not include this timeline
            current = owner


def _rotated_cycle(chain: list[Wait]) -> Deadlock:
    first = min(range(len(chain)), key=lambda i: chain[i].timeline)
    waits = tuple(chain[first:] + chain[:first])
    holders = tuple(waits[(i + 1) % len(waits)].timeline for i in range(len(waits)))
    return Deadlock(waits, cycle=True, holders=holders)
