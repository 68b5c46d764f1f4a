"""Lock-order graph: potential deadlocks from the order in which locks are taken (lockdep / Goodlock).

Pure Python, no torch, no ``threading``: the capture layer calls :meth:`LockGraph.on_acquire` after
every successful acquire of an instrumented lock, and :meth:`LockGraph.cycles` when it reports.

Model
-----
* Nodes are locks, identified by opaque hashable keys (the capture layer passes an int per lock).
* Acquiring ``B`` while holding ``A`` records an *edge instance* ``A -> B`` that remembers the
  timeline that took it, the site of the acquisition of ``B`` (``site``) and of ``A``
  (``src_site``), and its *gate set*: the other locks held at that moment (every held lock but
  ``A``). Sites are opaque to this module; they are stored, never interpreted.
* Re-acquiring a lock the timeline already holds (``RLock`` re-entry) never blocks, so it records
  nothing at all.
* A cycle ``L0 -> L1 -> ... -> L0`` is a *feasible* potential deadlock when one recorded instance
  can be chosen per edge such that

  - the instances come from pairwise distinct timelines: at a deadlock every involved thread is
    blocked on exactly one lock, so one thread cannot provide two edges of the cycle;
  - their *held sets* (gate set plus the edge's source lock) are pairwise disjoint: at a deadlock
    thread ``i`` holds all of its held set at once, and two threads never hold the same lock.
    This includes the Goodlock gate rule (edges all taken under one common gate lock cannot
    deadlock) and also rejects a cycle in which one thread's gate is another edge's source lock
    (that cycle is infeasible; the shorter cycle through the gate lock is reported instead).

Memory is bounded per ``(A, B, timeline)``: an instance whose gate set contains the gate set of an
instance already recorded for the same key adds nothing (any feasible choice using it is still
feasible with the smaller one), so only the inclusion-minimal gate sets are kept, at most
``max_gate_variants`` of them. In practice that is the first occurrence of each key. Different
timelines' instances are kept separately because feasibility depends on who took each edge.

Search: cycles only live inside strongly connected components; each elementary cycle is
enumerated once, from its smallest lock, by a depth-first search bounded in length that visits only
larger locks of the same component which can still get back to the start in the remaining length.
The choice of instances is made during the search, so paths that cannot be made feasible (one
thread's inversions, common gates) are cut early: held sets are checked incrementally and distinct
timelines are kept as a bipartite matching between edges and timelines, extended by one augmenting
path per new edge.

Thread-safe: every public method takes one ``_thread`` lock (never ``threading.Lock``, which the
capture layer patches). :meth:`cycles` searches on a snapshot, outside that lock.
"""

from __future__ import annotations

import _thread
from collections import deque
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping, Sequence

TimelineId = int
LockKey = Hashable
Site = object  # opaque: the capture layer stores a stack key here
LockSet = frozenset  # frozenset[LockKey]

DEFAULT_MAX_CYCLE_LENGTH = 8
DEFAULT_MAX_GATE_VARIANTS = 8


@dataclass(frozen=True)
class HeldLock:
    """One lock a timeline holds, with the site where it was acquired."""

    lock: LockKey
    site: Site


@dataclass(frozen=True)
class LockEdge:
    """One recorded instance of the edge ``src -> dst``: ``dst`` was acquired while ``src`` was held."""

    src: LockKey
    dst: LockKey
    timeline: TimelineId
    site: Site  # where dst was acquired
    src_site: Site  # where src (still held) had been acquired
    gates: LockSet  # the other locks held at that moment (never src, never dst)

    @property
    def held(self) -> LockSet:
        """Every lock the timeline held when it took this edge."""
        return self.gates | {self.src}


@dataclass(frozen=True)
class LockCycle:
    """A feasible lock-order cycle: ``edges[i]`` goes from ``locks[i]`` to ``locks[i + 1]`` (cyclically)."""

    locks: tuple[LockKey, ...]
    edges: tuple[LockEdge, ...]

    @property
    def timelines(self) -> tuple[TimelineId, ...]:
        return tuple(e.timeline for e in self.edges)


# Recorded instances of one edge (src, dst): gate set -> timeline -> instance.
_EdgeInstances = dict[LockSet, dict[TimelineId, LockEdge]]
# The snapshot the search works on: per edge, a list of (held set, timeline -> instance) groups.
_HeldGroups = list[tuple[LockSet, Mapping[TimelineId, LockEdge]]]


class LockGraph:
    """Lock acquisition-order graph with feasible-cycle search."""

    def __init__(
        self,
        max_cycle_length: int = DEFAULT_MAX_CYCLE_LENGTH,
        max_gate_variants: int = DEFAULT_MAX_GATE_VARIANTS,
    ) -> None:
        if max_cycle_length < 2:
            raise ValueError("max_cycle_length must be at least 2")
        if max_gate_variants < 1:
            raise ValueError("max_gate_variants must be at least 1")
        self.max_cycle_length = max_cycle_length
        self.max_gate_variants = max_gate_variants
        self._mutex = _thread.allocate_lock()
        self._edges: dict[tuple[LockKey, LockKey], _EdgeInstances] = {}
        # Successors in first-seen order (a dict used as an ordered set) so searches are deterministic.
        self._successors: dict[LockKey, dict[LockKey, None]] = {}
        # Bumped on every recorded instance; lets cycles() reuse its last answer.
        self._version = 0
        self._cached: tuple[tuple[int, int], list[LockCycle]] | None = None

    # -- recording --------------------------------------------------------------------------

    def on_acquire(self, timeline: TimelineId, lock: LockKey, held: Sequence[HeldLock], site: Site) -> None:
        """Record that ``timeline`` took ``lock`` at ``site`` while holding ``held`` (outermost first)."""
        if not held:
            return
        # Distinct held locks with the site of their outermost acquisition (an RLock held twice
        # may appear twice in ``held``).
        held_sites: dict[LockKey, Site] = {}
        for entry in held:
            if entry.lock == lock:
                return  # re-entry never blocks, so it orders nothing
            held_sites.setdefault(entry.lock, entry.site)
        held_locks = frozenset(held_sites)
        with self._mutex:
            for src, src_site in held_sites.items():
                self._record(src, lock, timeline, site, src_site, held_locks - {src})

    def _record(
        self, src: LockKey, dst: LockKey, timeline: TimelineId, site: Site, src_site: Site, gates: LockSet
    ) -> None:
        key = (src, dst)
        instances = self._edges.get(key)
        if instances is None:
            instances = self._edges[key] = {}
            self._successors.setdefault(src, {})[dst] = None
        else:
            same_gates = instances.get(gates)
            if same_gates is not None and timeline in same_gates:
                return  # the common case: this thread took this edge like this before
            superseded: list[LockSet] = []
            variants = 0
            for recorded_gates, by_timeline in instances.items():
                if timeline not in by_timeline:
                    continue
                if recorded_gates <= gates:
                    return  # an instance with fewer gates already covers this one
                if gates < recorded_gates:
                    superseded.append(recorded_gates)
                else:
                    variants += 1
            if not superseded and variants >= self.max_gate_variants:
                return
            for recorded_gates in superseded:
                by_timeline = instances[recorded_gates]
                del by_timeline[timeline]
                if not by_timeline:
                    del instances[recorded_gates]
        instances.setdefault(gates, {})[timeline] = LockEdge(src, dst, timeline, site, src_site, gates)
        self._version += 1

    # -- queries ----------------------------------------------------------------------------

    def edges(self) -> list[LockEdge]:
        """Every recorded edge instance (first-seen order)."""
        with self._mutex:
            return [
                edge
                for instances in self._edges.values()
                for by_timeline in instances.values()
                for edge in by_timeline.values()
            ]

    def cycles(self, max_length: int | None = None) -> list[LockCycle]:
        """Every feasible elementary cycle of at most ``max_length`` locks (default: the graph's bound).

        Each cycle appears once, rotated to start at its smallest lock; cycles are sorted by length,
        then by their locks.
        """
        limit = self.max_cycle_length if max_length is None else max_length
        with self._mutex:
            state = (self._version, limit)
            if self._cached is not None and self._cached[0] == state:
                return list(self._cached[1])
            snapshot: dict[tuple[LockKey, LockKey], _HeldGroups] = {
                (src, dst): [(gates | {src}, dict(by_timeline)) for gates, by_timeline in instances.items()]
                for (src, dst), instances in self._edges.items()
            }
            successors = {src: tuple(dsts) for src, dsts in self._successors.items()}
        found = _feasible_cycles(snapshot, successors, limit)
        with self._mutex:
            self._cached = (state, found)
        return list(found)


# -- search ---------------------------------------------------------------------------------


def _feasible_cycles(
    groups: Mapping[tuple[LockKey, LockKey], _HeldGroups],
    successors: Mapping[LockKey, tuple[LockKey, ...]],
    max_length: int,
) -> list[LockCycle]:
    nodes: dict[LockKey, None] = {}
    for src, dsts in successors.items():
        nodes[src] = None
        for dst in dsts:
            nodes[dst] = None
    rank = _ranks(nodes)
    predecessors: dict[LockKey, list[LockKey]] = {}
    for src, dsts in successors.items():
        for dst in dsts:
            predecessors.setdefault(dst, []).append(src)

    found: dict[tuple[LockKey, ...], LockCycle] = {}
    for component in _strongly_connected_components(nodes, successors):
        if len(component) < 2:
            continue  # there are no self-loops, so a single lock is never a cycle
        members = sorted(component, key=rank.__getitem__)
        for position, start in enumerate(members):
            if position == len(members) - 1:
                break  # the largest lock of a component starts no cycle of its own
            larger = set(members[position + 1 :])
            _search_from(start, larger, groups, successors, predecessors, max_length, found)
    return sorted(found.values(), key=lambda c: (len(c.locks), [rank[lock] for lock in c.locks]))


def _search_from(
    start: LockKey,
    allowed: set[LockKey],
    groups: Mapping[tuple[LockKey, LockKey], _HeldGroups],
    successors: Mapping[LockKey, tuple[LockKey, ...]],
    predecessors: Mapping[LockKey, list[LockKey]],
    max_length: int,
    found: dict[tuple[LockKey, ...], LockCycle],
) -> None:
    """Find every feasible cycle whose smallest lock is ``start`` (all other locks in ``allowed``)."""
    # steps_home[v]: fewest edges from v back to start through allowed locks, so the DFS never
    # enters a lock from which the cycle could not close within max_length.
    steps_home: dict[LockKey, int] = {start: 0}
    frontier = deque([start])
    while frontier:
        node = frontier.popleft()
        distance = steps_home[node] + 1
        if distance >= max_length:
            continue
        for pred in predecessors.get(node, ()):
            if pred in allowed and pred not in steps_home:
                steps_home[pred] = distance
                frontier.append(pred)

    path: list[LockKey] = [start]
    on_path: set[LockKey] = {start}
    # picks[i]: the instances (timeline -> LockEdge) of the held group chosen for edge path[i] -> path[i+1]
    picks: list[Mapping[TimelineId, LockEdge]] = []

    def extend(used_locks: LockSet, matching: dict[TimelineId, int]) -> None:
        node = path[-1]
        for nxt in successors.get(node, ()):
            if nxt == start:
                key = tuple(path)  # at least 2 locks: re-entry records no self-loop
                if key in found:
                    continue
                for held, by_timeline in groups[(node, nxt)]:
                    if not held.isdisjoint(used_locks):
                        continue
                    closed = _add_edge(matching, picks, by_timeline)
                    if closed is not None:
                        edge_timeline = {edge_index: t for t, edge_index in closed.items()}
                        chosen = [*picks, by_timeline]
                        edges = tuple(chosen[i][edge_timeline[i]] for i in range(len(chosen)))
                        found[key] = LockCycle(locks=key, edges=edges)
                        break
            elif nxt in steps_home and nxt not in on_path and len(path) + steps_home[nxt] <= max_length:
                for held, by_timeline in groups[(node, nxt)]:
                    if not held.isdisjoint(used_locks):
                        continue
                    extended = _add_edge(matching, picks, by_timeline)
                    if extended is None:
                        continue
                    path.append(nxt)
                    on_path.add(nxt)
                    picks.append(by_timeline)
                    extend(used_locks | held, extended)
                    picks.pop()
                    on_path.discard(nxt)
                    path.pop()

    extend(frozenset(), {})


def _add_edge(
    matching: Mapping[TimelineId, int],
    picks: Sequence[Mapping[TimelineId, LockEdge]],
    new_options: Mapping[TimelineId, LockEdge],
) -> dict[TimelineId, int] | None:
    """Give the new edge (index ``len(picks)``) its own timeline, re-assigning earlier edges if needed.

    ``matching`` maps timeline -> edge index for edges 0..len(picks)-1, each edge matched to one of
    its instances' timelines. Returns the extended matching (a copy), or None when no assignment of
    pairwise distinct timelines exists (Kuhn's augmenting path).
    """
    options = [*picks, new_options]
    result = dict(matching)

    def assign(edge_index: int, visited: set[TimelineId]) -> bool:
        for timeline in options[edge_index]:
            if timeline in visited:
                continue
            visited.add(timeline)
            holder = result.get(timeline)
            if holder is None or assign(holder, visited):
                result[timeline] = edge_index
                return True
        return False

    return result if assign(len(picks), set()) else None


def _strongly_connected_components(
    nodes: Iterable[LockKey], successors: Mapping[LockKey, tuple[LockKey, ...]]
) -> list[list[LockKey]]:
    """Tarjan's algorithm, iterative (lock graphs can be deeper than Python's recursion limit)."""
    index: dict[LockKey, int] = {}
    lowlink: dict[LockKey, int] = {}
    stack: list[LockKey] = []
    on_stack: set[LockKey] = set()
    components: list[list[LockKey]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        index[root] = lowlink[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(successors.get(root, ())))]
        while work:
            node, children = work[-1]
            descended = False
            for child in children:
                if child not in index:
                    index[child] = lowlink[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(successors.get(child, ()))))
                    descended = True
                    break
                if child in on_stack:
                    lowlink[node] = min(lowlink[node], index[child])
            if descended:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                lowlink[parent] = min(lowlink[parent], lowlink[node])
            if lowlink[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(component)
    return components


def _ranks(locks: Iterable[LockKey]) -> dict[LockKey, int]:
    """A total order on lock keys: their natural order, or (type name, repr) for mixed key types."""
    keys = list(locks)
    try:
        ordered = sorted(keys)
    except TypeError:
        ordered = sorted(keys, key=lambda k: (type(k).__name__, repr(k)))
    return {key: position for position, key in enumerate(ordered)}
