"""Tests for the happens-before engine: unit tests per rule, then a property test against an oracle.

The oracle knows nothing about epochs or shadow memory: it builds the happens-before graph of the
whole trace (program order, fork edges, and an edge from every release of a variable to every
later acquire of it, since the engine's variables accumulate) and decides whether two accesses are
ordered by plain reachability. FastTrack keeps only the last write and the reads since it, so it
reports a subset of the racy pairs; the property test checks what it does guarantee:

* every reported race is a truly racy pair, with the records, bytes and ``seen_epoch`` right;
* the earlier access of a report is the last write to those bytes or a read since that write;
* an access that races with the last write to a byte (or, being a write, with a read since it)
  gets a report on that byte, the one FastTrack exception being a repeated read in the same epoch
  (the first read of that epoch was checked and reported already);
* hence the first race on every byte of every allocation is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from raceguard.engine.hb import AccessRecord, HappensBefore, Race, ShadowStorage, SyncVar

# -- helpers ------------------------------------------------------------------------------------


def _do(hb: HappensBefore, shadow: ShadowStorage, tid: int, is_write: bool, lo: int, hi: int, info=None):
    """One access of ``[lo, hi)``; returns (record, races found)."""
    rec = hb.record(tid, is_write, info)
    races: list[Race] = []
    hb.access(shadow, [(lo, hi)], rec, races)
    return rec, races


def _write(hb, shadow, tid, lo=0, hi=16, info=None):
    return _do(hb, shadow, tid, True, lo, hi, info)


def _read(hb, shadow, tid, lo=0, hi=16, info=None):
    return _do(hb, shadow, tid, False, lo, hi, info)


def _assert_well_formed(shadow: ShadowStorage) -> None:
    starts, ends, cells = shadow.starts, shadow.ends, shadow.cells
    assert len(starts) == len(ends) == len(cells)
    for k, (lo, hi) in enumerate(zip(starts, ends)):
        assert lo < hi, (k, shadow.intervals())
        if k:
            assert ends[k - 1] <= lo, shadow.intervals()
    # No two intervals share a cell object (splits must copy).
    assert len({id(c) for c in cells}) == len(cells)


# -- races between unsynchronised timelines -----------------------------------------------------


def test_the_write_that_creates_memory_is_ordered_before_other_timelines():
    # A creates fresh memory and B reaches it later through a Python reference the engine never
    # sees: the creation cannot race, a later write by A can (it may follow the hand-over).
    hb = HappensBefore()
    a = hb.new_timeline()
    b = hb.new_timeline()
    created = hb.record_creation(a, "created")
    assert created.creates and created.is_write
    shadow = ShadowStorage("fresh", created, 16)
    assert _read(hb, shadow, b)[1] == []  # B reads what A created: no race
    assert _write(hb, shadow, b, 0, 8)[1] == []  # ... nor does B writing into it
    rec, races = _write(hb, shadow, a, 8, 16)  # A writes again afterwards: races with B's read
    assert [(r.earlier.timeline, r.later.timeline, r.lo, r.hi) for r in races] == [(b, a, 8, 16)]
    _, races = _read(hb, shadow, b, 8, 16)  # and B reading A's later write races too
    assert [(r.earlier, r.later.timeline) for r in races] == [(rec, b)]


def test_a_creation_record_still_races_when_it_is_the_later_access():
    # Creation exempts only what comes after it: a creation that lands on memory another
    # timeline accessed before (the device shadow's reused addresses) is checked as a write.
    hb = HappensBefore()
    a = hb.new_timeline()
    b = hb.new_timeline()
    shadow = ShadowStorage("reused")
    _read(hb, shadow, b)
    races: list[Race] = []
    hb.access(shadow, [(0, 16)], hb.record_creation(a, "created"), races)
    assert [(r.earlier.timeline, r.later.timeline) for r in races] == [(b, a)]



def test_write_write_race_between_unsynchronised_timelines():
    hb = HappensBefore()
    a, b = hb.new_timeline(), hb.new_timeline()
    s = ShadowStorage()
    wa, races = _write(hb, s, a, 0, 8, "wa")
    assert races == []
    wb, races = _write(hb, s, b, 0, 8, "wb")
    assert races == [Race(wa, wb, 0, 8, 0, s)]
    assert races[0].earlier is wa and races[0].later is wb
    assert (wa.timeline, wa.epoch, wa.is_write, wa.info) == (a, 1, True, "wa")


def test_read_write_race():
    hb = HappensBefore()
    a, b = hb.new_timeline(), hb.new_timeline()
    s = ShadowStorage()
    ra, races = _read(hb, s, a)
    assert races == []
    wb, races = _write(hb, s, b)
    assert races == [Race(ra, wb, 0, 16, 0, s)]
    assert not races[0].earlier.is_write and races[0].later.is_write


def test_write_read_race():
    hb = HappensBefore()
    a, b = hb.new_timeline(), hb.new_timeline()
    s = ShadowStorage()
    wa, _ = _write(hb, s, a)
    rb, races = _read(hb, s, b)
    assert races == [Race(wa, rb, 0, 16, 0, s)]


def test_concurrent_reads_do_not_race():
    hb = HappensBefore()
    a, b = hb.new_timeline(), hb.new_timeline()
    s = ShadowStorage()
    assert _read(hb, s, a)[1] == []
    assert _read(hb, s, b)[1] == []


def test_same_timeline_never_races():
    hb = HappensBefore()
    a = hb.new_timeline()
    other = hb.new_timeline()
    s = ShadowStorage()
    var = SyncVar()
    for is_write in (True, False, False, True, True, False):
        assert _do(hb, s, a, is_write, 0, 16)[1] == []
        hb.release(a, var)  # new epochs of the same timeline stay ordered
        assert _do(hb, s, a, is_write, 2, 9)[1] == []
    assert hb.epoch(a) == 7 and hb.epoch(other) == 1


def test_disjoint_byte_ranges_never_race():
    hb = HappensBefore()
    a, b = hb.new_timeline(), hb.new_timeline()
    s = ShadowStorage()
    assert _write(hb, s, a, 0, 4)[1] == []
    assert _write(hb, s, b, 4, 8)[1] == []
    assert _read(hb, s, b, 8, 16)[1] == []
    assert _write(hb, s, a, 8, 16)[1] != []  # the same bytes do race
    other = ShadowStorage()  # another storage is other memory altogether
    assert _write(hb, other, b, 0, 4)[1] == []
    assert _write(hb, other, a, 4, 8)[1] == []


def test_empty_ranges_are_ignored():
    hb = HappensBefore()
    a, b = hb.new_timeline(), hb.new_timeline()
    s = ShadowStorage()
    _write(hb, s, a, 0, 16)
    assert _write(hb, s, b, 4, 4)[1] == []
    assert _write(hb, s, b, 8, 2)[1] == []
    assert s.intervals() == [(0, 16)]


def test_partial_overlap_races_only_on_the_overlapping_bytes():
    hb = HappensBefore()
    a, b = hb.new_timeline(), hb.new_timeline()
    s = ShadowStorage()
    wa, _ = _write(hb, s, a, 0, 8)
    wb, races = _write(hb, s, b, 4, 12)
    assert [(r.earlier, r.later, r.lo, r.hi) for r in races] == [(wa, wb, 4, 8)]
    assert s.intervals() == [(0, 4), (4, 12)]
    assert s.cells[0].write is wa and s.cells[1].write is wb
    # A read straddling both writes races with both, each on its own bytes.
    c = hb.new_timeline()
    rc, races = _read(hb, s, c, 2, 6)
    assert sorted((r.earlier.info, r.lo, r.hi) for r in races) == [(None, 2, 4), (None, 4, 6)]
    assert {r.earlier for r in races} == {wa, wb}
    assert next(r for r in races if r.earlier is wa).hi == 4
    assert s.intervals() == [(0, 2), (2, 4), (4, 6), (6, 12)]
    _assert_well_formed(s)


def test_multi_range_access_races_on_each_range():
    hb = HappensBefore()
    a, b = hb.new_timeline(), hb.new_timeline()
    s = ShadowStorage()
    wa, _ = _write(hb, s, a, 0, 16)
    rec = hb.record(b, False, "strided")
    races: list[Race] = []
    hb.access(s, [(0, 2), (4, 6), (8, 10)], rec, races)
    assert [(r.earlier, r.later, r.lo, r.hi) for r in races] == [(wa, rec, 0, 2), (wa, rec, 4, 6), (wa, rec, 8, 10)]
    _assert_well_formed(s)


# -- synchronisation ----------------------------------------------------------------------------


def test_no_race_after_fork():
    hb = HappensBefore()
    parent = hb.new_timeline()
    s = ShadowStorage()
    _write(hb, s, parent)
    child = hb.new_timeline(parent)
    assert hb.clock(child)[parent] == 1 and hb.epoch(parent) == 2
    assert _read(hb, s, child)[1] == []
    assert _write(hb, s, child, 0, 4)[1] == []


def test_parent_accesses_after_fork_race_with_the_child():
    hb = HappensBefore()
    parent = hb.new_timeline()
    s = ShadowStorage()
    child = hb.new_timeline(parent)
    wp, _ = _write(hb, s, parent)
    rc, races = _read(hb, s, child)
    assert races == [Race(wp, rc, 0, 16, 1, s)]
    assert wp.epoch == 2


def test_grandchild_inherits_the_fork_order():
    hb = HappensBefore()
    root = hb.new_timeline()
    s = ShadowStorage()
    _write(hb, s, root)
    child = hb.new_timeline(root)
    grandchild = hb.new_timeline(child)
    assert _write(hb, s, grandchild)[1] == []


def test_no_race_after_join():
    hb = HappensBefore()
    parent = hb.new_timeline()
    s = ShadowStorage()
    child = hb.new_timeline(parent)
    done = SyncVar()
    _write(hb, s, child)
    hb.release(child, done)  # the child's end
    hb.acquire(parent, done)  # join()
    assert _write(hb, s, parent)[1] == []


def test_join_without_acquire_races():
    hb = HappensBefore()
    parent = hb.new_timeline()
    s = ShadowStorage()
    child = hb.new_timeline(parent)
    done = SyncVar()
    wc, _ = _write(hb, s, child)
    hb.release(child, done)
    assert len(_write(hb, s, parent)[1]) == 1


def test_acquire_of_a_never_released_var_orders_nothing():
    hb = HappensBefore()
    a, b = hb.new_timeline(), hb.new_timeline()
    s = ShadowStorage()
    _write(hb, s, a)
    hb.acquire(b, SyncVar())
    assert len(_write(hb, s, b)[1]) == 1


def test_lock_chain_orders_accesses():
    hb = HappensBefore()
    a, b, c = hb.new_timeline(), hb.new_timeline(), hb.new_timeline()
    s = ShadowStorage()
    lock = SyncVar()
    _write(hb, s, a)
    hb.release(a, lock)
    hb.acquire(b, lock)
    wb, races = _write(hb, s, b)
    assert races == []
    hb.release(b, lock)
    # C never acquires the lock: it races with B, the last writer.
    wc, races = _write(hb, s, c)
    assert [(r.earlier, r.later) for r in races] == [(wb, wc)]


def test_release_acquire_chains_are_transitive():
    hb = HappensBefore()
    a, b, c = hb.new_timeline(), hb.new_timeline(), hb.new_timeline()
    s = ShadowStorage()
    l1, l2 = SyncVar(), SyncVar()
    _write(hb, s, a, 0, 8)
    hb.release(a, l1)
    hb.acquire(b, l1)
    _read(hb, s, b, 8, 16)  # b touches other bytes only
    hb.release(b, l2)
    hb.acquire(c, l2)
    assert _write(hb, s, c)[1] == []


def test_accesses_after_the_release_are_not_covered():
    hb = HappensBefore()
    a, b = hb.new_timeline(), hb.new_timeline()
    s = ShadowStorage()
    lock = SyncVar()
    hb.release(a, lock)
    wa, _ = _write(hb, s, a)  # after the release: not published
    hb.acquire(b, lock)
    rb, races = _read(hb, s, b)
    assert races == [Race(wa, rb, 0, 16, 1, s)]


def test_sync_vars_accumulate_releases():
    hb = HappensBefore()
    a, b, c = hb.new_timeline(), hb.new_timeline(), hb.new_timeline()
    s1, s2 = ShadowStorage(), ShadowStorage()
    var = SyncVar()
    _write(hb, s1, a)
    hb.release(a, var)
    _write(hb, s2, b)
    hb.release(b, var)  # joins, does not overwrite a's release
    hb.acquire(c, var)
    assert _write(hb, s1, c)[1] == []
    assert _write(hb, s2, c)[1] == []


def test_seen_epoch_is_what_the_later_timeline_saw_of_the_earlier_one():
    hb = HappensBefore()
    a, b = hb.new_timeline(), hb.new_timeline()
    s = ShadowStorage()
    lock = SyncVar()
    _write(hb, s, a)  # epoch 1
    hb.release(a, lock)  # a is now at epoch 2
    hb.acquire(b, lock)  # b has seen a up to epoch 1
    hb.release(a, SyncVar())  # a at epoch 3
    wa, _ = _write(hb, s, a, 0, 8)
    assert wa.epoch == 3
    rb, races = _read(hb, s, b)
    assert [(r.earlier, r.later, r.lo, r.hi, r.seen_epoch) for r in races] == [(wa, rb, 0, 8, 1)]
    assert races[0].seen_epoch == hb.clock(b)[a] < wa.epoch
    # A timeline that never heard of ``a`` at all has seen epoch 0 (its clock may be shorter).
    c = hb.new_timeline()
    d = hb.new_timeline()
    wd, _ = _write(hb, s, d, 8, 16)
    assert len(hb.clock(c)) <= d
    rc, races = _read(hb, s, c, 8, 16)
    assert [(r.earlier, r.seen_epoch) for r in races] == [(wd, 0)]


# -- read-shared state --------------------------------------------------------------------------


def test_concurrent_readers_then_writer_races_with_both():
    hb = HappensBefore()
    r1, r2, w = hb.new_timeline(), hb.new_timeline(), hb.new_timeline()
    s = ShadowStorage()
    rec1, _ = _read(hb, s, r1)
    rec2, _ = _read(hb, s, r2)
    assert s.cells[0].reads == {r1: rec1, r2: rec2}
    wrec, races = _write(hb, s, w)
    assert len(races) == 2
    assert {r.earlier for r in races} == {rec1, rec2}
    assert all(r.later is wrec and (r.lo, r.hi) == (0, 16) for r in races)
    assert s.cells[0].reads is None and s.cells[0].write is wrec


def test_ordered_reads_keep_one_epoch():
    hb = HappensBefore()
    a, b = hb.new_timeline(), hb.new_timeline()
    s = ShadowStorage()
    lock = SyncVar()
    _read(hb, s, a)
    hb.release(a, lock)
    hb.acquire(b, lock)
    rb, _ = _read(hb, s, b)
    assert s.cells[0].reads is rb


def test_writer_ordered_after_all_shared_readers_does_not_race():
    hb = HappensBefore()
    r1, r2, w = hb.new_timeline(), hb.new_timeline(), hb.new_timeline()
    s = ShadowStorage()
    var = SyncVar()
    for t in (r1, r2):
        _read(hb, s, t)
        hb.release(t, var)
    hb.acquire(w, var)
    assert _write(hb, s, w)[1] == []


def test_writer_ordered_after_one_shared_reader_races_with_the_other():
    hb = HappensBefore()
    r1, r2, w = hb.new_timeline(), hb.new_timeline(), hb.new_timeline()
    s = ShadowStorage()
    var = SyncVar()
    _read(hb, s, r1)
    hb.release(r1, var)
    rec2, _ = _read(hb, s, r2)
    hb.acquire(w, var)
    assert [r.earlier for r in _write(hb, s, w)[1]] == [rec2]


def test_repeated_read_in_the_same_epoch_is_reported_once():
    hb = HappensBefore()
    a, b = hb.new_timeline(), hb.new_timeline()
    s = ShadowStorage()
    _write(hb, s, a)
    assert len(_read(hb, s, b)[1]) == 1
    assert _read(hb, s, b)[1] == []  # same epoch of b, nothing new


# -- interval shadow memory ---------------------------------------------------------------------


def test_interval_splitting_and_merging_keeps_intervals_sorted_and_disjoint():
    hb = HappensBefore()
    a = hb.new_timeline()
    s = ShadowStorage()
    _read(hb, s, a, 4, 8)
    assert s.intervals() == [(4, 8)]
    _read(hb, s, a, 12, 14)
    assert s.intervals() == [(4, 8), (12, 14)]
    _read(hb, s, a, 6, 13)  # splits both, fills the gap
    assert s.intervals() == [(4, 6), (6, 8), (8, 12), (12, 13), (13, 14)]
    _assert_well_formed(s)
    _read(hb, s, a, 0, 16)  # fills both ends
    assert s.intervals() == [(0, 4), (4, 6), (6, 8), (8, 12), (12, 13), (13, 14), (14, 16)]
    _assert_well_formed(s)
    w, _ = _write(hb, s, a, 5, 13)  # a write makes its range one interval again
    assert s.intervals() == [(0, 4), (4, 5), (5, 13), (13, 14), (14, 16)]
    assert s.cells[2].write is w and s.cells[2].reads is None
    _assert_well_formed(s)
    w2, _ = _write(hb, s, a, 0, 16)
    assert s.intervals() == [(0, 16)] and s.cells[0].write is w2
    _read(hb, s, a, 7, 9)  # one interval split in three, cells copied
    assert s.intervals() == [(0, 7), (7, 9), (9, 16)]
    assert [c.write for c in s.cells] == [w2, w2, w2]
    assert s.cells[0].reads is None and s.cells[1].reads is not None and s.cells[2].reads is None
    _assert_well_formed(s)


def test_split_covering_returns_the_exact_cover():
    s = ShadowStorage()
    s.starts, s.ends = [2, 6, 10], [4, 8, 12]
    from raceguard.engine.hb import _Cell

    s.cells = [_Cell(), _Cell(), _Cell()]
    i, j = s._split_covering(3, 11)
    assert s.intervals()[i:j] == [(3, 4), (4, 6), (6, 8), (8, 10), (10, 11)]
    assert s.intervals() == [(2, 3), (3, 4), (4, 6), (6, 8), (8, 10), (10, 11), (11, 12)]
    _assert_well_formed(s)
    i, j = s._split_covering(13, 15)  # past the end
    assert s.intervals()[i:j] == [(13, 15)]
    i, j = s._split_covering(0, 1)  # before the start
    assert s.intervals()[i:j] == [(0, 1)]
    _assert_well_formed(s)


def test_split_cells_are_independent_copies():
    hb = HappensBefore()
    a, b, c = hb.new_timeline(), hb.new_timeline(), hb.new_timeline()
    s = ShadowStorage()
    _read(hb, s, a)
    _read(hb, s, b)  # read-shared dict over [0, 16)
    rc, _ = _read(hb, s, c, 0, 4)  # must not leak into [4, 16)
    assert set(s.cells[0].reads) == {a, b, c}
    assert set(s.cells[1].reads) == {a, b}


# -- reset: memory reuse ------------------------------------------------------------------------


def test_reset_forgets_history():
    hb = HappensBefore()
    a, b = hb.new_timeline(), hb.new_timeline()
    s = ShadowStorage()
    _write(hb, s, a)
    _read(hb, s, a, 0, 4)
    s.reset()  # freed and reallocated: the new memory has no history
    assert s.intervals() == []
    assert _write(hb, s, b)[1] == []
    assert _read(hb, s, b, 2, 6)[1] == []


def test_reset_with_an_allocating_write():
    hb = HappensBefore()
    a, b = hb.new_timeline(), hb.new_timeline()
    s = ShadowStorage()
    _write(hb, s, b)
    alloc = hb.record(a, True, "alloc")
    s.reset(alloc, 0, 16)
    assert s.intervals() == [(0, 16)] and s.cells[0].write is alloc
    rb, races = _read(hb, s, b, 4, 8)  # the old write of b is forgotten, the allocation is not
    assert [(r.earlier, r.lo, r.hi) for r in races] == [(alloc, 4, 8)]
    s.reset(hb.record(a, True, "empty"), 4, 4)  # an empty allocation records nothing
    assert s.intervals() == []


# -- property test against a brute-force happens-before oracle ----------------------------------

N_STORAGES = 2
N_VARS = 3
SIZE = 16
MAX_TIMELINES = 4

_byte_range = st.one_of(
    st.just((0, SIZE)),  # the whole storage, the common case
    st.integers(0, 3).map(lambda k: (4 * k, 4 * k + 4)),  # aligned chunks
    st.tuples(st.integers(0, SIZE - 1), st.integers(1, SIZE)).map(
        lambda p: (min(p), max(p)) if min(p) < max(p) else (p[0], p[0] + 1)
    ),
)
_timeline = st.integers(0, MAX_TIMELINES - 1)  # taken modulo the timelines existing at the event
_var = st.integers(0, N_VARS - 1)
_storage = st.integers(0, N_STORAGES - 1)


@st.composite
def _events(draw):
    """One event, or a release and an acquire of the same variable (a hand-off, to get ordered
    accesses often); accesses weigh the most, resets and forks the least."""
    kind = draw(st.integers(0, 19))
    if kind < 10:
        ranges = tuple(draw(st.lists(_byte_range, min_size=1, max_size=2)))
        return [("access", draw(_timeline), draw(_storage), ranges, draw(st.booleans()))]
    if kind < 12:
        return [("release", draw(_timeline), draw(_var))]
    if kind < 14:
        return [("acquire", draw(_timeline), draw(_var))]
    if kind < 18:
        var = draw(_var)
        return [("release", draw(_timeline), var), ("acquire", draw(_timeline), var)]
    if kind < 19:
        return [("reset", draw(_storage))]
    return [("fork", draw(_timeline))]


_program = st.tuples(
    # Timelines made at the start: None for a root, else the parent (modulo those made before).
    st.lists(st.one_of(st.none(), _timeline), min_size=2, max_size=MAX_TIMELINES),
    st.lists(_events(), min_size=6, max_size=30).map(lambda chunks: [e for c in chunks for e in c]),
)


@dataclass(eq=False)
class _Access:
    index: int  # node of the trace
    timeline: int
    storage: int
    generation: int  # bumped by every reset of the storage
    ranges: tuple
    nbytes: frozenset
    is_write: bool
    rec: AccessRecord | None = None
    clock: list = field(default_factory=list)  # the engine clock of the timeline at the access
    races: list = field(default_factory=list)

    def __repr__(self) -> str:
        mode = "W" if self.is_write else "R"
        epoch = self.rec.epoch if self.rec is not None else "?"
        return f"#{self.index} {mode} t{self.timeline}@{epoch} s{self.storage}.{self.generation} {list(self.ranges)}"


class _Oracle:
    """Happens-before as reachability in the event graph of the trace; no clocks, no epochs."""

    def __init__(self) -> None:
        self.ancestors: list[int] = []  # bitmask of the nodes that happen before node i (and i)
        self.last: list[int | None] = []  # last node of each timeline
        self.releases: dict[int, list[int]] = {}

    def node(self, timeline: int, extra_preds=()) -> int:
        i = len(self.ancestors)
        mask = 1 << i
        if self.last[timeline] is not None:
            mask |= self.ancestors[self.last[timeline]]
        for p in extra_preds:
            mask |= self.ancestors[p]
        self.ancestors.append(mask)
        self.last[timeline] = i
        return i

    def new_timeline(self, parent: int | None) -> int:
        if parent is None:
            self.last.append(None)
        else:
            fork = self.node(parent)  # the fork is an event of the parent
            self.last.append(fork)  # ... that precedes everything the child does
        return len(self.last) - 1

    def release(self, timeline: int, var: int) -> None:
        self.releases.setdefault(var, []).append(self.node(timeline))

    def acquire(self, timeline: int, var: int) -> None:
        # Every earlier release of the variable, not just the last one: variables accumulate.
        self.node(timeline, self.releases.get(var, ()))

    def hb(self, earlier: int, later: int) -> bool:
        return bool(self.ancestors[later] >> earlier & 1)


def _races(a1: _Access, a2: _Access, oracle: _Oracle) -> bool:
    """Whether ``a1`` (earlier in the trace) and ``a2`` are a racy pair (overlap checked apart)."""
    return (
        a1.storage == a2.storage
        and a1.generation == a2.generation
        and a1.timeline != a2.timeline
        and (a1.is_write or a2.is_write)
        and not oracle.hb(a1.index, a2.index)
    )


def _run(program):
    initial, events = program
    hb = HappensBefore()
    oracle = _Oracle()
    tids: list[int] = []  # oracle timeline -> engine timeline

    def new_timeline(parent):
        tid = hb.new_timeline(None if parent is None else tids[parent])
        t = oracle.new_timeline(parent)
        assert t == len(tids)
        tids.append(tid)

    for spec in initial:
        new_timeline(None if spec is None or not tids else spec % len(tids))
    shadows = [ShadowStorage(meta=s) for s in range(N_STORAGES)]
    generation = [0] * N_STORAGES
    sync = [SyncVar() for _ in range(N_VARS)]
    accesses: list[_Access] = []

    for ev in events:
        kind = ev[0]
        if kind == "fork":
            if len(tids) < MAX_TIMELINES:
                new_timeline(ev[1] % len(tids))
        elif kind == "reset":
            shadows[ev[1]].reset()
            generation[ev[1]] += 1
        elif kind == "release":
            t = ev[1] % len(tids)
            hb.release(tids[t], sync[ev[2]])
            oracle.release(t, ev[2])
        elif kind == "acquire":
            t = ev[1] % len(tids)
            hb.acquire(tids[t], sync[ev[2]])
            oracle.acquire(t, ev[2])
        else:
            _, t, s, ranges, is_write = ev
            t %= len(tids)
            a = _Access(
                index=oracle.node(t),
                timeline=t,
                storage=s,
                generation=generation[s],
                ranges=ranges,
                nbytes=frozenset(b for lo, hi in ranges for b in range(lo, hi)),
                is_write=is_write,
            )
            a.rec = hb.record(tids[t], is_write, a)  # the payload is the access itself
            assert (a.rec.timeline, a.rec.is_write, a.rec.info) == (tids[t], is_write, a)
            assert a.rec.epoch == hb.epoch(tids[t])
            a.clock = list(hb.clock(tids[t]))
            hb.access(shadows[s], list(ranges), a.rec, a.races)
            accesses.append(a)
    for shadow in shadows:
        _assert_well_formed(shadow)
    return hb, oracle, tids, shadows, accesses


@settings(max_examples=300, deadline=None)
@given(_program)
def test_engine_matches_happens_before_oracle(program):
    hb, oracle, tids, shadows, accesses = _run(program)
    by_rec = {id(a.rec): a for a in accesses}
    reported: dict[int, set[int]] = {}  # access index -> bytes with a report there

    # (a) Every report is a truly racy pair, with the right records, bytes and seen epoch.
    for a2 in accesses:
        got = reported.setdefault(a2.index, set())
        for race in a2.races:
            assert race.later is a2.rec
            assert race.shadow is shadows[a2.storage]
            a1 = by_rec.get(id(race.earlier))
            assert a1 is not None and race.earlier is a1.rec, "the earlier record is one we made"
            assert race.earlier.info is a1
            assert (race.earlier.timeline, race.earlier.is_write) == (tids[a1.timeline], a1.is_write)
            assert a1.index < a2.index
            assert race.lo < race.hi
            span = set(range(race.lo, race.hi))
            assert span <= a1.nbytes & a2.nbytes, "reported bytes are touched by both accesses"
            assert _races(a1, a2, oracle), f"false alarm: {a1} vs {a2}"
            t1 = race.earlier.timeline
            seen = a2.clock[t1] if t1 < len(a2.clock) else 0
            assert race.seen_epoch == seen < race.earlier.epoch
            # FastTrack keeps only the last write and the reads since it.
            for b in span:
                earlier_same = [
                    x for x in accesses
                    if x.index < a2.index and x.storage == a2.storage
                    and x.generation == a2.generation and b in x.nbytes
                ]
                writes = [x for x in earlier_same if x.is_write]
                last_write = writes[-1] if writes else None
                if a1.is_write:
                    assert a1 is last_write
                else:
                    assert last_write is None or a1.index > last_write.index
            got |= span

    # (b) For every byte of every allocation, the first racy access (in trace order) is reported,
    # and (c) so is every race with the last write / with a read since it, except for a repeated
    # read in one epoch, whose first read of that epoch carries the report.
    first_race: dict[tuple[int, int, int], int] = {}
    for pos, a2 in enumerate(accesses):
        for b in sorted(a2.nbytes):
            earlier = [
                x for x in accesses[:pos]
                if x.storage == a2.storage and x.generation == a2.generation and b in x.nbytes
            ]
            key = (a2.storage, a2.generation, b)
            if key not in first_race and any(_races(x, a2, oracle) for x in earlier):
                first_race[key] = a2.index
                assert b in reported[a2.index], f"first race on byte {b} of {key} not reported at {a2}"
            last_w = max((i for i, x in enumerate(earlier) if x.is_write), default=-1)
            must = last_w >= 0 and _races(earlier[last_w], a2, oracle)
            if a2.is_write:
                must = must or any(_races(x, a2, oracle) for x in earlier[last_w + 1:])
            if not must or b in reported[a2.index]:
                continue
            assert not a2.is_write, f"write {a2} not reported on byte {b}"
            same_epoch = [
                x for x in earlier[last_w + 1:]
                if not x.is_write and x.timeline == a2.timeline and x.rec.epoch == a2.rec.epoch
            ]
            assert same_epoch, f"read {a2} not reported on byte {b}"
            assert b in reported[same_epoch[0].index], f"read {a2}: no report on byte {b} in its epoch"
