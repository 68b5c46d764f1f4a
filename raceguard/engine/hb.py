"""Happens-before race detection: vector clocks with FastTrack epochs over interval shadow memory.

Pure Python, no torch: the capture layer turns tensor accesses into byte ranges of a
:class:`ShadowStorage` and synchronisation into :meth:`HappensBefore.release` /
:meth:`HappensBefore.acquire` on :class:`SyncVar` objects it owns, and this module answers which
earlier accesses the new one races with.

Model (FastTrack, Flanagan & Freund 2009), with *timelines* instead of threads so that CUDA
streams can be added as timelines later:

* every timeline ``t`` has a vector clock ``C[t]``; ``C[t][t]`` is its current epoch;
* a release into a sync variable joins ``C[t]`` into it and starts a new epoch of ``t``;
  an acquire joins the variable's clock into ``C[t]``;
* each byte range of a storage remembers its last write (an epoch) and its reads since then
  (one epoch while they are totally ordered, a per-timeline map once they are concurrent);
* an access races with a remembered one of another timeline whose epoch is not covered by the
  accessing timeline's clock.

Not thread-safe by itself: the caller serialises every call with :attr:`HappensBefore.lock`
(one lock for the whole engine, held only for the bookkeeping, never while a tensor op runs).
"""

from __future__ import annotations

import _thread
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

TimelineId = int
VectorClock = list  # list[int], indexed by TimelineId; missing entries are 0
ByteRange = tuple  # (lo, hi): half-open byte range [lo, hi)


class SyncVar:
    """The clock carried by one synchronisation object (a lock, an event, a queue item...)."""

    __slots__ = ("clock", "__weakref__")

    def __init__(self) -> None:
        self.clock: VectorClock | None = None


class AccessRecord:
    """One recorded access: who, at which epoch, and an opaque payload for the report."""

    __slots__ = ("timeline", "epoch", "is_write", "info")
    creates = False  # see CreationRecord

    def __init__(self, timeline: TimelineId, epoch: int, is_write: bool, info: Any) -> None:
        self.timeline = timeline
        self.epoch = epoch
        self.is_write = is_write
        self.info = info

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        mode = "W" if self.is_write else "R"
        return f"<{mode} t{self.timeline}@{self.epoch} {self.info!r}>"


class CreationRecord(AccessRecord):
    """The write that created fresh memory (the op that returned a new tensor). It happens
    before every access by another timeline: nothing can reach memory before the op that creates
    it returns, and whatever hands it over afterwards (a Python reference in a global, a cache,
    a list) comes later still, on the creating timeline. So the common publication idioms (a
    lazily built table behind a check, ``functools.lru_cache``, a result returned through a
    shared dict) never race with the creation itself; a write made *after* creation gets no such
    pass, since the memory may already have been handed over by then."""

    __slots__ = ()
    creates = True


class _Cell:
    """Shadow state of one byte interval: last write and reads since it."""

    __slots__ = ("write", "reads")

    def __init__(self, write: AccessRecord | None = None, reads: Any = None) -> None:
        self.write = write
        # None, one AccessRecord (reads totally ordered), or dict[TimelineId, AccessRecord].
        self.reads = reads

    def copy(self) -> "_Cell":
        reads = self.reads
        return _Cell(self.write, dict(reads) if type(reads) is dict else reads)


@dataclass(frozen=True)
class Race:
    """Two unordered accesses to overlapping bytes, at least one a write."""

    earlier: AccessRecord
    later: AccessRecord
    lo: int
    hi: int
    # What the later timeline had seen of the earlier one: C[later][earlier.timeline].
    seen_epoch: int
    shadow: "ShadowStorage"


class ShadowStorage:
    """Shadow memory of one storage: sorted, disjoint byte intervals, each with a :class:`_Cell`.

    Intervals that no access touched are simply absent. Whole-storage accesses, by far the most
    common, keep a single interval, so the usual cost is one comparison.
    """

    __slots__ = ("starts", "ends", "cells", "meta", "__weakref__")

    def __init__(self, meta: Any = None, write: AccessRecord | None = None, hi: int = 0) -> None:
        # Owned by the capture layer (allocation site, dtype, shape, a weakref to the storage).
        self.meta = meta
        if write is None or hi <= 0:
            self.starts: list[int] = []
            self.ends: list[int] = []
            self.cells: list[_Cell] = []
        else:  # new memory [0, hi), written by ``write``: reset(write, 0, hi) without a second call
            self.starts, self.ends, self.cells = [0], [hi], [_Cell(write)]

    def reset(self, write: AccessRecord | None = None, lo: int = 0, hi: int = 0) -> None:
        """Forget everything: the memory is new. Optionally record the allocating write."""
        if write is None or hi <= lo:
            self.starts, self.ends, self.cells = [], [], []
        else:
            self.starts, self.ends, self.cells = [lo], [hi], [_Cell(write)]

    def restore(self, lo: int, hi: int, write: AccessRecord | None, reads: Any) -> None:
        """The one interval [lo, hi) with its last write and reads since (None, one record, or a
        dict by timeline): a shadow kept elsewhere until now (the native drain) taken over."""
        self.starts, self.ends, self.cells = [lo], [hi], [_Cell(write, reads)]

    def intervals(self) -> list[tuple[int, int]]:
        return list(zip(self.starts, self.ends))

    def _split_covering(self, lo: int, hi: int) -> tuple[int, int]:
        """Split/insert intervals so that [lo, hi) is exactly covered by cells[i:j]; return (i, j)."""
        starts, ends, cells = self.starts, self.ends, self.cells
        i = bisect_right(ends, lo)  # first interval ending after lo
        # Split the interval straddling lo.
        if i < len(starts) and starts[i] < lo:
            starts.insert(i + 1, lo)
            ends.insert(i + 1, ends[i])
            cells.insert(i + 1, cells[i].copy())
            ends[i] = lo
            i += 1
        pos = lo
        j = i
        # Walk the intervals that start before hi, filling gaps with empty cells.
        while pos < hi:
            if j < len(starts) and starts[j] <= pos:
                if ends[j] > hi:  # split the interval straddling hi
                    starts.insert(j + 1, hi)
                    ends.insert(j + 1, ends[j])
                    cells.insert(j + 1, cells[j].copy())
                    ends[j] = hi
                pos = ends[j]
                j += 1
            else:
                gap_end = min(hi, starts[j]) if j < len(starts) else hi
                starts.insert(j, pos)
                ends.insert(j, gap_end)
                cells.insert(j, _Cell())
                pos = gap_end
                j += 1
        return i, j


class HappensBefore:
    """Vector clocks per timeline plus race checks against :class:`ShadowStorage`."""

    def __init__(self) -> None:
        self.lock = _thread.allocate_lock()
        self._clocks: list[VectorClock] = []

    # -- timelines -------------------------------------------------------------------------
    def new_timeline(self, parent: TimelineId | None = None) -> TimelineId:
        """A new timeline; with a parent, everything the parent did so far happens before it."""
        tid = len(self._clocks)
        clock = list(self._clocks[parent]) if parent is not None else []
        _ensure(clock, tid)
        clock[tid] = 1
        self._clocks.append(clock)
        if parent is not None:
            self._tick(parent)
        return tid

    def clock(self, tid: TimelineId) -> VectorClock:
        return self._clocks[tid]

    def epoch(self, tid: TimelineId) -> int:
        return self._clocks[tid][tid]

    @property
    def timelines(self) -> int:
        return len(self._clocks)

    # -- synchronisation -------------------------------------------------------------------
    def release(self, tid: TimelineId, var: SyncVar) -> None:
        """Everything ``tid`` did so far happens before any later :meth:`acquire` of ``var``."""
        mine = self._clocks[tid]
        if var.clock is None:
            var.clock = list(mine)
        else:
            _join_into(var.clock, mine)
        self._tick(tid)

    def acquire(self, tid: TimelineId, var: SyncVar) -> None:
        if var.clock is not None:
            _join_into(self._clocks[tid], var.clock)

    def _tick(self, tid: TimelineId) -> None:
        self._clocks[tid][tid] += 1

    # -- accesses --------------------------------------------------------------------------
    def record(self, tid: TimelineId, is_write: bool, info: Any) -> AccessRecord:
        return AccessRecord(tid, self._clocks[tid][tid], is_write, info)

    def record_creation(self, tid: TimelineId, info: Any) -> CreationRecord:
        """The write of ``tid`` that created fresh memory (see :class:`CreationRecord`)."""
        return CreationRecord(tid, self._clocks[tid][tid], True, info)

    def access(
        self, shadow: ShadowStorage, ranges: Sequence[ByteRange], rec: AccessRecord, races: list[Race]
    ) -> None:
        """Check ``rec`` against ``shadow`` over ``ranges`` and remember it; append races found."""
        for lo, hi in ranges:
            self.access_range(shadow, lo, hi, rec, races)

    def access_range(self, shadow: ShadowStorage, lo: int, hi: int, rec: AccessRecord, races: list[Race]) -> None:
        """:meth:`access` for one byte range ``[lo, hi)`` (a contiguous tensor: the common case)."""
        if hi <= lo:
            return
        starts = shadow.starts
        # Fast path: the access covers exactly the one interval the storage has.
        if len(starts) == 1 and starts[0] == lo and shadow.ends[0] == hi:
            cell = shadow.cells[0]
            if _only_timeline(cell, rec.timeline):
                # Every access remembered here is this timeline's own, ordered before this one by
                # program order: nothing can race. Remember it as _check_write / _read would.
                if rec.is_write:
                    cell.write = rec
                    cell.reads = None
                elif cell.reads is None or cell.reads.epoch != rec.epoch:
                    cell.reads = rec
                return
            i, j = 0, 1
        else:
            i, j = shadow._split_covering(lo, hi)
        clock = self._clocks[rec.timeline]
        cells = shadow.cells
        if rec.is_write:
            for k in range(i, j):
                _check_write(cells[k], rec, clock, shadow, k, races)
            if j - i == 1:
                cell = cells[i]
                cell.write = rec
                cell.reads = None
            else:  # a write makes the whole range one interval again
                shadow.starts[i:j] = [lo]
                shadow.ends[i:j] = [hi]
                cells[i:j] = [_Cell(rec)]
        else:
            for k in range(i, j):
                _read(cells[k], rec, clock, shadow, k, races)


def _only_timeline(cell: _Cell, tid: int) -> bool:
    """Whether every access remembered in ``cell`` was made by timeline ``tid``."""
    w = cell.write
    if w is not None and w.timeline != tid:
        return False
    r = cell.reads
    return r is None or (type(r) is not dict and r.timeline == tid)


def _check_write(
    cell: _Cell, rec: AccessRecord, clock: VectorClock, shadow: ShadowStorage, k: int, races: list[Race]
) -> None:
    tid = rec.timeline
    n = len(clock)
    w = cell.write
    if w is not None and w.timeline != tid and not w.creates:
        seen = clock[w.timeline] if w.timeline < n else 0
        if w.epoch > seen:
            races.append(Race(w, rec, shadow.starts[k], shadow.ends[k], seen, shadow))
    reads = cell.reads
    if reads is None:
        return
    if type(reads) is dict:
        for r in reads.values():
            if r.timeline != tid:
                seen = clock[r.timeline] if r.timeline < n else 0
                if r.epoch > seen:
                    races.append(Race(r, rec, shadow.starts[k], shadow.ends[k], seen, shadow))
    elif reads.timeline != tid:
        seen = clock[reads.timeline] if reads.timeline < n else 0
        if reads.epoch > seen:
            races.append(Race(reads, rec, shadow.starts[k], shadow.ends[k], seen, shadow))


def _read(
    cell: _Cell, rec: AccessRecord, clock: VectorClock, shadow: ShadowStorage, k: int, races: list[Race]
) -> None:
    tid = rec.timeline
    reads = cell.reads
    # Same epoch of the same timeline already recorded: nothing new to learn (FastTrack).
    if reads is not None and type(reads) is not dict and reads.timeline == tid and reads.epoch == rec.epoch:
        return
    n = len(clock)
    w = cell.write
    if w is not None and w.timeline != tid and not w.creates:
        seen = clock[w.timeline] if w.timeline < n else 0
        if w.epoch > seen:
            races.append(Race(w, rec, shadow.starts[k], shadow.ends[k], seen, shadow))
    if reads is None:
        cell.reads = rec
    elif type(reads) is dict:
        reads[tid] = rec
    else:
        prev = reads.timeline
        if prev == tid or reads.epoch <= (clock[prev] if prev < n else 0):
            cell.reads = rec  # the earlier read happens before this one: one epoch suffices
        else:
            cell.reads = {prev: reads, tid: rec}


def _ensure(clock: VectorClock, index: int) -> None:
    if len(clock) <= index:
        clock.extend([0] * (index + 1 - len(clock)))


def _join_into(target: VectorClock, source: Iterable[int]) -> None:
    source = list(source) if not isinstance(source, list) else source
    if len(target) < len(source):
        target.extend([0] * (len(source) - len(target)))
    for i, v in enumerate(source):
        if v > target[i]:
            target[i] = v
