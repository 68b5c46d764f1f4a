"""The native shadow memory (capture/native/shadow.h) against the Python engine (engine/hb.py).

Random streams of accesses (whole and partial byte ranges, reads and writes), fresh memory,
frees and synchronisation on a few timelines drive two engines side by side: the Python engine
alone (the oracle), and the native table in front of it as the drain uses it (an access it cannot
apply natively hands the storage to the Python engine, which then makes that access). Both must
report the same races, each naming the same earlier access, and end in the same shadow state.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raceguard.capture.native import build
from raceguard.engine.hb import AccessRecord, CreationRecord, HappensBefore, ShadowStorage, SyncVar

TIMELINES = 3
STORAGES = 3
SIZE = 16
BASE = 0x5EED0000  # synthetic storage addresses, far from any real one in this test
RANGES = [(0, SIZE), (0, SIZE), (0, SIZE), (0, 8), (8, SIZE), (4, 12), (0, 0)]
CTX = ((), None)  # (locks, origin) of every access here


@pytest.fixture(scope="module")
def native():
    result = build.ensure()
    if result.module is None:
        pytest.skip(f"native recorder unavailable: {result.reason}")
    return result.module


timeline = st.integers(0, TIMELINES - 1)
storage = st.integers(0, STORAGES - 1)
operation = st.one_of(
    st.tuples(st.just("access"), timeline, storage, st.sampled_from(RANGES), st.booleans()),
    st.tuples(st.just("release"), timeline, st.integers(0, 1)),
    st.tuples(st.just("acquire"), timeline, st.integers(0, 1)),
    st.tuples(st.just("create"), timeline, storage, st.sampled_from([SIZE, SIZE, 0])),
    st.tuples(st.just("free"), storage),
    st.tuples(st.just("give_back"), storage),
)


class PythonEngine:
    """The oracle: what Session.on_op / the drain's Python path do with these events."""

    def __init__(self) -> None:
        self.hb = HappensBefore()
        for _ in range(TIMELINES):
            self.hb.new_timeline()
        self.vars = [SyncVar(), SyncVar()]
        self.shadows: dict[int, ShadowStorage] = {}
        self.races: list = []

    def sync(self, kind: str, tid: int, var: int) -> None:
        getattr(self.hb, kind)(tid, self.vars[var])

    def access(self, tid: int, key: int, lo: int, hi: int, is_write: bool, site: tuple) -> None:
        sh = self.shadows.get(key)
        if sh is None:
            sh = self.shadows[key] = ShadowStorage(("seen", site))
        self.hb.access_range(sh, lo, hi, self.hb.record(tid, is_write, site), self.races)

    def create(self, tid: int, key: int, nbytes: int, site: tuple) -> None:
        self.shadows[key] = ShadowStorage(("made", site), self.hb.record_creation(tid, site), nbytes)

    def free(self, key: int) -> None:
        self.shadows.pop(key, None)

    def give_back(self, key: int) -> None:
        """Only the native table in front of the engine takes shadows back."""


class NativeInFront(PythonEngine):
    """The native table in front of the Python engine, as the fast drain uses it."""

    def __init__(self, module) -> None:
        super().__init__()
        self.module = module
        module.configure_fast(lambda key: None, self._adopt, self.shadows)
        self.native_accesses = 0

    def _adopt(self, cd, storage, dtype, shape, site, seen_only, state) -> None:
        assert storage is None  # synthetic entries have no storage behind them
        lo, hi, write, reads = state
        sh = ShadowStorage(("seen" if seen_only else "made", site))
        if lo is not None:
            if reads is None:
                kept = None
            elif type(reads) is list:
                kept = {r[0]: self._record(r) for r in reads}
            else:
                kept = self._record(reads)
            sh.restore(lo, hi, self._record(write) if write is not None else None, kept)
        dict.__setitem__(self.shadows, cd, sh)

    @staticmethod
    def _record(fields: tuple) -> AccessRecord:
        timeline, epoch, is_write, creates, site, plan, ctx = fields
        assert ctx == CTX and plan == 7
        return (CreationRecord if creates else AccessRecord)(timeline, epoch, is_write, site)

    def access(self, tid: int, key: int, lo: int, hi: int, is_write: bool, site: tuple) -> None:
        if key not in self.shadows:
            if self.module.shadow_access(key, lo, hi, is_write, tid, self.hb.clock(tid), site, 7, CTX):
                self.native_accesses += 1
                return
            self.module.take(key)
        super().access(tid, key, lo, hi, is_write, site)

    def create(self, tid: int, key: int, nbytes: int, site: tuple) -> None:
        if key in self.shadows:  # Python's memory: the drain sends such a record to Python
            super().create(tid, key, nbytes, site)
        else:
            self.module.shadow_create(key, nbytes, tid, self.hb.epoch(tid), site, 7, CTX)

    def free(self, key: int) -> None:
        super().free(key)
        self.module.shadow_drop(key)

    def give_back(self, key: int) -> None:
        """The Python engine hands a one-interval shadow back (as after a gradient accumulation)."""
        import torch

        sh = self.shadows.get(key)
        if sh is None or len(sh.starts) > 1:
            return
        state = (None, None, None, None)
        if sh.starts:
            cell = sh.cells[0]
            reads = cell.reads
            if type(reads) is dict:
                reads = [self._fields(r) for r in reads.values()]
            elif reads is not None:
                reads = self._fields(reads)
            state = (sh.starts[0], sh.ends[0], None if cell.write is None else self._fields(cell.write), reads)
        kind, site = sh.meta
        assert self.module.give(key, None, torch.float32, (), site, kind == "seen", state)
        del self.shadows[key]

    @staticmethod
    def _fields(rec: AccessRecord) -> tuple:
        return (rec.timeline, rec.epoch, rec.is_write, rec.creates, rec.info, 7, CTX)

    def everything_to_python(self) -> None:
        for s in range(STORAGES):
            self.module.take(BASE + s)


def run(engine: PythonEngine, ops: list) -> None:
    live = set()
    for n, op in enumerate(ops):
        site = ("op", n)
        kind = op[0]
        if kind == "access":
            _, tid, s, (lo, hi), is_write = op
            engine.access(tid, BASE + s, lo, hi, is_write, site)
            live.add(s)
        elif kind in ("release", "acquire"):
            engine.sync(kind, op[1], op[2])
        elif kind == "create":
            _, tid, s, nbytes = op
            if s not in live:  # new memory only where none is alive
                engine.create(tid, BASE + s, nbytes, site)
                live.add(s)
        elif kind == "give_back":
            engine.give_back(BASE + op[1])
        else:
            engine.free(BASE + op[1])
            live.discard(op[1])


def race_view(races: list) -> list:
    return [
        (r.earlier.timeline, r.earlier.epoch, r.earlier.is_write, r.earlier.info,
         r.later.timeline, r.later.epoch, r.later.is_write, r.later.info, r.lo, r.hi, r.seen_epoch)
        for r in races
    ]


def record_view(rec):
    if rec is None:
        return None
    return (type(rec).__name__, rec.timeline, rec.epoch, rec.is_write, rec.info)


def shadow_view(shadows: dict) -> dict:
    out = {}
    for key, sh in shadows.items():
        cells = []
        for cell in sh.cells:
            reads = cell.reads
            if type(reads) is dict:
                reads = [(tid, record_view(r)) for tid, r in reads.items()]
            else:
                reads = record_view(reads)
            cells.append((record_view(cell.write), reads))
        out[key] = (sh.meta, sh.intervals(), cells)
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(operation, max_size=40))
def test_native_table_in_front_of_the_python_engine_changes_nothing(native, ops) -> None:
    oracle, hybrid = PythonEngine(), NativeInFront(native)
    try:
        run(oracle, ops)
        run(hybrid, ops)
        assert race_view(hybrid.races) == race_view(oracle.races)
        hybrid.everything_to_python()
        assert shadow_view(hybrid.shadows) == shadow_view(oracle.shadows)
    finally:
        for s in range(STORAGES):
            native.shadow_drop(BASE + s)


def test_one_thread_on_whole_tensors_stays_native(native) -> None:
    hybrid = NativeInFront(native)
    try:
        ops = [("create", 0, 0, SIZE)]
        ops += [("access", 0, 0, (0, SIZE), n % 3 == 0) for n in range(50)]
        ops += [("access", 0, 1, (0, SIZE), False), ("access", 0, 1, (0, SIZE), True), ("release", 0, 0)]
        run(hybrid, ops)
        assert hybrid.native_accesses == 52 and hybrid.shadows == {}
        # Another timeline ordered after those accesses is still decided natively; one that is
        # not ordered races, and the Python engine reports it.
        run(hybrid, [("acquire", 1, 0), ("access", 1, 1, (0, SIZE), False)])
        assert hybrid.native_accesses == 53 and hybrid.shadows == {}
        run(hybrid, [("access", 2, 0, (0, SIZE), True)])
        assert {(r.earlier.timeline, r.later.timeline) for r in hybrid.races} == {(0, 2)}
        assert list(hybrid.shadows) == [BASE]
    finally:
        for s in range(STORAGES):
            native.shadow_drop(BASE + s)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 4), st.integers(-6, 6)), min_size=0, max_size=4),
    st.integers(0, 8),
)
def test_one_byte_range_exactly_where_byte_ranges_gives_one(native, dims, offset) -> None:
    import torch

    from raceguard.capture.torch_ops import byte_ranges

    sizes = [size for size, _ in dims]
    strides = [stride for _, stride in dims]
    lowest = offset + sum(st * (sz - 1) for sz, st in dims if st < 0)
    if lowest < 0:
        offset -= lowest
    base = torch.zeros(offset + sum(abs(st) * (sz - 1) for sz, st in dims) + 1)
    try:
        view = base.as_strided(sizes, strides, offset)
    except RuntimeError:  # torch refuses negative strides here: the view cannot be made
        return
    expected = byte_ranges(view)
    got = native.byte_range(view)
    if got is None:  # the Python engine makes such accesses: always sound
        assert len(expected) >= 1
    elif got[1] > got[0]:
        assert expected == [got]
    else:
        assert expected == []


def test_whole_tensors_and_their_transposes_are_one_range(native) -> None:
    import torch

    w = torch.zeros(64, 32)
    assert native.byte_range(w) == (0, 64 * 32 * 4)
    assert native.byte_range(w.t()) == (0, 64 * 32 * 4)
    assert native.byte_range(w[3]) == (3 * 32 * 4, 4 * 32 * 4)
    assert native.byte_range(w.expand(2, 64, 32)) == (0, 64 * 32 * 4)
    assert native.byte_range(w[:, :4]) is None  # 64 runs: the Python engine keeps them exact


mutex_op = st.tuples(timeline, st.integers(0, 1), st.sampled_from(["acquire", "release", "tick"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(mutex_op, max_size=40))
def test_gradient_mutexes_kept_natively_move_clocks_as_the_python_engine(native, ops) -> None:
    # grad_mutex() keeps the engine's per-parameter accumulation mutexes natively and acts on the
    # Python engine's own clock lists: the same clocks as HappensBefore.acquire/release with a
    # SyncVar per parameter. ("tick": a release of some other lock, which moves only the clock.)
    import torch

    params = [torch.zeros(1), torch.zeros(1)]  # live tensors: grad_mutex keys on their TensorImpl
    oracle = HappensBefore()
    mine = HappensBefore()
    for _ in range(TIMELINES):
        oracle.new_timeline()
        mine.new_timeline()
    vars_ = [SyncVar(), SyncVar()]
    other = SyncVar()
    for tid, param, kind in ops:
        if kind == "tick":
            oracle.release(tid, other)
            mine.release(tid, other)
            continue
        getattr(oracle, kind)(tid, vars_[param])
        native.grad_mutex(params[param]._cdata, mine.clock(tid), tid, kind == "release")
        for t in range(TIMELINES):
            want = oracle.clock(t)
            got = mine.clock(t)
            width = max(len(want), len(got))
            assert want + [0] * (width - len(want)) == got + [0] * (width - len(got))
