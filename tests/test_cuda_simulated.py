"""CUDA streams as timelines, driven by a simulated GPU on the CPU (no CUDA device needed).

The feed is faithful to what torch does on a real GPU, as far as raceguard can see it:

* synchronisation and memory events go through the *real* registries of
  ``torch.cuda._gpu_trace`` (``EventRecordCallbacks.fire_callbacks(event, stream)``, ...), the
  ones torch's C++ side fires on a GPU, so the callbacks are called with exactly the signatures
  CUDA Sanitizer uses;
* ``FakeStream`` / ``FakeEvent`` / ``FakeCuda`` mirror ``torch.cuda.Stream``, ``torch.cuda.Event``
  and ``torch.cuda`` method by method (``wait_stream`` is ``wait_event(record_event())``, a
  record fires the event record callback, ``synchronize`` fires the synchronisation callback...),
  and are patched by the same code that patches torch's classes;
* tensor ops are fed to ``CudaTracker.before_op`` / ``after_op`` the way the session's dispatch
  mode will call them, with ``FakeCudaTensor``\\ s: CPU tensors seen through a fake device address.

Each scenario asserts the exact findings: kind, resource, and for each access its timeline,
launching thread, mode and line. ``api`` runs go through the patched Python API; ``trace`` runs
leave the fake classes unpatched, so only the trace callbacks carry the synchronisation.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
import weakref

import jsonschema
import pytest
import torch
import torch.cuda._gpu_trace as gpu_trace

from raceguard.cuda import tracker as cuda
from raceguard.capture.session import OpInfo, Session
from raceguard.capture import stacks
from raceguard.capture.stacks import current_site
from raceguard.capture.torch_ops import byte_ranges
from raceguard.engine.hb import HappensBefore
from raceguard.engine.streams import StreamModel
from raceguard.report.document import load_schema

aten = torch.ops.aten
THIS = __file__.rsplit("/", 1)[-1]


# -- the simulated GPU ------------------------------------------------------------------------------
class FakePlan:
    """What the tracker reads of the session's OpPlan."""

    def __init__(self, name: str, fresh_input: bool = False, alias_inputs: bool = False) -> None:
        self.name = name
        self.fresh_input = fresh_input
        self.alias_inputs = alias_inputs


class FakeStorage:
    """A device allocation: a fake address; ``_cdata`` of the CPU backing, so that the namer
    finds module parameters whose backing this is."""

    device = torch.device("cuda", 0)  # what the tracker asks to tell device memory from host

    def __init__(self, addr: int, nbytes: int, backing) -> None:
        self._addr = addr
        self._nbytes = nbytes
        self._cdata = backing._cdata

    def data_ptr(self) -> int:
        return self._addr

    def nbytes(self) -> int:
        return self._nbytes


class FakeCudaTensor:
    is_cuda = True

    def __init__(self, backing: torch.Tensor, storage: FakeStorage, device: int = 0) -> None:
        self._b = backing
        self._storage = storage
        self._device = device

    dtype = property(lambda self: self._b.dtype)
    shape = property(lambda self: self._b.shape)

    def element_size(self):
        return self._b.element_size()

    def numel(self):
        return self._b.numel()

    def storage_offset(self):
        return self._b.storage_offset()

    def is_contiguous(self):
        return self._b.is_contiguous()

    def stride(self):
        return self._b.stride()

    def get_device(self):
        return self._device

    def untyped_storage(self):
        return self._storage

    def __getitem__(self, index):
        return FakeCudaTensor(self._b[index], self._storage, self._device)

    def record_stream(self, stream) -> None:
        """Like torch: tells the allocator, fires no trace callback."""


class FakeBackend:
    """The tracker's view of torch: per-thread current stream, pinned host tensors."""

    def __init__(self) -> None:
        self.current: dict[tuple[int, int], tuple[int, int]] = {}
        self.pinned: set[int] = set()

    def current_stream(self, device: int) -> tuple[int, int]:
        return self.current.get((threading.get_ident(), device), (device, 0))

    def current_device(self) -> int:
        return 0

    def stream_key(self, stream) -> tuple[int, int]:
        if stream is None:
            return self.current_stream(0)
        return stream.device_index, stream.cuda_stream

    def event_handle(self, event) -> int:
        return event.cuda_event

    def device_index(self, device) -> int | None:
        return 0 if device is None else int(device)

    def is_pinned(self, t) -> bool:
        return t.untyped_storage()._cdata in self.pinned


class FakeEvent:
    _next = 0x1000

    def __init__(self) -> None:
        self.cuda_event = 0  # created lazily at the first record, as in torch
        self.done = False

    def record(self, stream=None):
        stream = stream or GPU.current_stream()
        if not self.cuda_event:
            FakeEvent._next += 16
            self.cuda_event = FakeEvent._next
            gpu_trace.EventCreationCallbacks.fire_callbacks(self.cuda_event)
        gpu_trace.EventRecordCallbacks.fire_callbacks(self.cuda_event, stream.cuda_stream)

    def wait(self, stream=None):
        stream = stream or GPU.current_stream()
        if self.cuda_event:
            gpu_trace.EventWaitCallbacks.fire_callbacks(self.cuda_event, stream.cuda_stream)

    def synchronize(self):
        if self.cuda_event:
            gpu_trace.EventSynchronizationCallbacks.fire_callbacks(self.cuda_event)

    def query(self):
        return self.done


class FakeStream:
    _next = 0x5000

    def __init__(self, device: int = 0, handle: int | None = None) -> None:
        if handle is None:
            FakeStream._next += 16
            handle = FakeStream._next
            gpu_trace.StreamCreationCallbacks.fire_callbacks(handle)
        self.device_index = device
        self.cuda_stream = handle
        self.idle = True

    def wait_event(self, event):
        event.wait(self)

    def wait_stream(self, stream):
        self.wait_event(stream.record_event())

    def record_event(self, event=None):
        event = event or FakeEvent()
        event.record(self)
        return event

    def synchronize(self):
        gpu_trace.StreamSynchronizationCallbacks.fire_callbacks(self.cuda_stream)

    def query(self):
        return self.idle


class FakeCuda:
    """The functions of ``torch.cuda`` raceguard patches."""

    @staticmethod
    def synchronize(device=None):
        gpu_trace.DeviceSynchronizationCallbacks.fire_callbacks()

    @staticmethod
    def empty_cache():
        pass


class FakeGpu:
    """Allocations, kernel launches and copies, fed to the tracker like the dispatch mode will."""

    def __init__(self, session: Session, tracker: cuda.CudaTracker, backend: FakeBackend) -> None:
        self.session = session
        self.tracker = tracker
        self.backend = backend
        self.default = FakeStream(0, 0)
        self._next_addr = 0x7F0000000000

    # streams
    def current_stream(self):
        dev, handle = self.backend.current_stream(0)
        return self.default if handle == 0 else self._streams[handle]

    @contextlib.contextmanager
    def stream(self, s: FakeStream):
        self._streams = getattr(self, "_streams", {})
        self._streams[s.cuda_stream] = s
        key = (threading.get_ident(), 0)
        before = self.backend.current.get(key)
        self.backend.current[key] = (0, s.cuda_stream)
        try:
            yield s
        finally:
            if before is None:
                del self.backend.current[key]
            else:
                self.backend.current[key] = before

    # memory
    def pin(self, t: torch.Tensor) -> torch.Tensor:
        self.backend.pinned.add(t.untyped_storage()._cdata)
        return t

    def wrap(self, backing: torch.Tensor) -> FakeCudaTensor:
        """A tensor already on the device before anything was watched (e.g. model.cuda())."""
        st = backing.untyped_storage()
        addr = self._new_addr(st.nbytes())
        return FakeCudaTensor(backing, FakeStorage(addr, st.nbytes(), st))

    def alloc(self, state, shape, at: int | None = None) -> FakeCudaTensor:
        """``torch.empty(shape, device="cuda")`` on the current stream."""
        backing = torch.empty(shape)
        st = backing.untyped_storage()
        addr = at if at is not None else self._new_addr(st.nbytes())
        t = FakeCudaTensor(backing, FakeStorage(addr, st.nbytes(), st))
        gpu_trace.MemoryAllocationCallbacks.fire_callbacks(addr)
        self.run(state, "aten::empty.memory_format", [], outs=[t])
        return t

    def free(self, t: FakeCudaTensor) -> None:
        """The last reference to a device tensor went away: the caching allocator's free."""
        gpu_trace.MemoryDeallocationCallbacks.fire_callbacks(t.untyped_storage().data_ptr())

    def _new_addr(self, nbytes: int) -> int:
        addr = self._next_addr
        self._next_addr += (nbytes + 511) // 512 * 512
        return addr

    # ops
    def run(self, state, name, accessed, outs=(), args=(), kwargs=None, fresh_input=False) -> int:
        """One op through the tracker and, for what it leaves, the session's host path."""
        session = self.session
        kwargs = kwargs or {}
        plan = FakePlan(name, fresh_input)
        info = OpInfo(current_site(1), name, state.locks)
        left = self.tracker.before_op(state, plan, list(accessed), args, kwargs, info) if accessed else []
        races = []
        with session.lock:
            for t, is_write in left:
                st = t.untyped_storage()
                sh = session.shadows.get(st._cdata)
                if sh is None or sh.meta.ref() is not st:
                    from raceguard.capture.naming import StorageMeta
                    from raceguard.engine.hb import ShadowStorage

                    sh = session.shadows[st._cdata] = ShadowStorage(
                        StorageMeta(weakref.ref(st), t.dtype, tuple(t.shape), info.site, seen_only=True)
                    )
                session.hb.access(sh, byte_ranges(t), session.hb.record(state.tid, is_write, info), races)
        if races:
            session.report_races(races)
        outs_left = self.tracker.after_op(state, plan, list(outs), args, kwargs, info)
        with session.lock:
            for o in outs_left:
                session._fresh(o, info, state.tid, set())
        return sys._getframe(1).f_lineno

    def kernel(self, state, name, reads=(), writes=(), out_shape=None):
        """A kernel on the current stream; returns (its line, its fresh output or None)."""
        line = sys._getframe(1).f_lineno
        out = None
        outs = []
        if out_shape is not None:
            backing = torch.empty(out_shape)
            st = backing.untyped_storage()
            out = FakeCudaTensor(backing, FakeStorage(self._new_addr(st.nbytes()), st.nbytes(), st))
            outs = [out]
        accessed = [(t, False) for t in reads] + [(t, True) for t in writes]
        self.run(state, name, accessed, outs=outs, args=tuple(t for t, _ in accessed))
        return line, out

    def copy_(self, state, dst, src, non_blocking=False) -> int:
        self.run(state, "aten::copy_", [(dst, True), (src, False)], outs=[dst], args=(dst, src, non_blocking))
        return sys._getframe(1).f_lineno

    def to_cpu(self, state, t, non_blocking=False):
        """``t.to("cpu", non_blocking=...)``: aten::_to_copy; a non_blocking result is pinned."""
        out = torch.empty(tuple(t.shape))
        if non_blocking:
            self.pin(out)
        kwargs = {"device": torch.device("cpu"), "non_blocking": non_blocking}
        self.run(state, "aten::_to_copy", [(t, False)], outs=[out], args=(t,), kwargs=kwargs)
        return sys._getframe(1).f_lineno, out

    def item(self, state, t) -> int:
        """``t.item()``: aten::_local_scalar_dense, which waits for the stream."""
        self.run(state, "aten::_local_scalar_dense", [(t, False)], args=(t,))
        return sys._getframe(1).f_lineno


GPU: FakeGpu  # the current test's simulated GPU (FakeEvent's default stream comes from it)

def _hide(code) -> None:
    """Helper frames are not the "user code" of a report: the innermost user frame is the test's
    line (the way raceguard hides its own frames)."""
    if hasattr(stacks, "hide_code"):
        stacks.hide_code(code)
    else:  # older stacks.py: keyed by code object
        stacks._code_class[code] = stacks.HIDDEN


for _cls in (FakeGpu, FakeEvent, FakeStream, FakeCuda, FakeCudaTensor, FakeBackend):
    for _name, _fn in list(vars(_cls).items()):
        _fn = getattr(_fn, "__func__", _fn)
        _fn = getattr(_fn, "__wrapped__", _fn)
        if inspect.isfunction(_fn):
            _hide(_fn.__code__)


def host_op(state, func, *args) -> int:
    """A host (CPU) tensor op of ``state``'s thread through the session's own path."""
    GPU.session.on_op(state, func, args, {})
    return sys._getframe(1).f_lineno


_hide(host_op.__code__)


# -- fixtures -------------------------------------------------------------------------------------------
class Sim:
    def __init__(self, mode: str) -> None:
        self.events: list[dict] = []
        self.session = Session(self.events.append, main_globals=lambda: None)
        # What the session patch does in report_races: CUDA races go to the tracker.
        original = self.session.report_races
        self.session.report_races = lambda races: original(
            self.session.cuda.take_races(races) if self.session.cuda is not None else races
        )
        self.main = self.session.adopt_thread(threading.current_thread(), None)
        self.backend = FakeBackend()
        targets = {"Stream": FakeStream, "Event": FakeEvent, "cuda": FakeCuda, "Tensor": FakeCudaTensor}
        self.tracker = cuda.install(
            self.session, backend=self.backend, trace=gpu_trace, targets=targets if mode == "api" else {}, lazy=False
        )
        self.gpu = FakeGpu(self.session, self.tracker, self.backend)
        self.mode = mode

    @property
    def findings(self) -> list[dict]:
        errors = [e for e in self.events if e["type"] in ("internal-error", "hook-error")]
        assert not errors, errors
        return [e["finding"] for e in self.events if e["type"] == "finding"]

    def summary(self) -> list[tuple]:
        """(kind, resource, [(timeline, thread, mode, line), ...]) per finding."""
        return [
            (f["kind"], f["resource"], [(a["timeline"], a["thread"], a["mode"], _line(a)) for a in f["accesses"]])
            for f in self.findings
        ]


def _line(access: dict) -> int | None:
    for frame in access["stack"]:
        if frame["file"].endswith(THIS):
            return frame["line"]
    return None


@pytest.fixture(params=["api", "trace"])
def sim(request, caplog):
    global GPU
    s = Sim(request.param)
    GPU = s.gpu
    caplog.set_level("ERROR", logger="torch._utils")
    yield s
    cuda.uninstall(s.session)
    # An exception in a callback is only logged by torch's CallbackRegistry: fail on it.
    assert not [r for r in caplog.records if "callback" in r.getMessage()], caplog.text


@pytest.fixture
def api_sim(caplog):
    global GPU
    s = Sim("api")
    GPU = s.gpu
    caplog.set_level("ERROR", logger="torch._utils")
    yield s
    cuda.uninstall(s.session)
    assert not [r for r in caplog.records if "callback" in r.getMessage()], caplog.text


S0, S1, S2 = "cuda:0/stream 0", "cuda:0/stream 1", "cuda:0/stream 2"
MAIN = "MainThread"


def _tensor(shape: str, line: int, verb: str = "allocated") -> str:
    return f"tensor float32[{shape}] {verb} at {THIS}:{line}"


# -- 1/2: wait_stream -----------------------------------------------------------------------------------
def test_missing_wait_stream_is_a_race_between_streams(sim):
    g, main = sim.gpu, sim.main
    alloc = sys._getframe().f_lineno + 1
    x = g.alloc(main, (4,))
    w, _ = g.kernel(main, "aten::mul_.Tensor", writes=[x])
    side = FakeStream()
    with g.stream(side):
        r, _ = g.kernel(main, "aten::sum", reads=[x], out_shape=())
    assert sim.summary() == [
        ("data-race", _tensor("4", alloc), [(S0, MAIN, "write", w), (S1, MAIN, "read", r)]),
    ]
    f = sim.findings[0]
    assert f["message"] == (
        f"data race on {_tensor('4', alloc)}: write on {S0} (launched by 'MainThread') vs "
        f"read on {S1} (launched by 'MainThread')"
    )
    assert "wait_stream" in f["hint"]
    _validate_finding(f)


def test_wait_stream_orders_the_side_stream_after_the_default_stream(sim):
    g, main = sim.gpu, sim.main
    x = g.alloc(main, (4,))
    g.kernel(main, "aten::mul_.Tensor", writes=[x])
    side = FakeStream()
    side.wait_stream(g.default)
    with g.stream(side):
        g.kernel(main, "aten::sum", reads=[x], out_shape=())
    # and back: the default stream writes x again after waiting for the side stream's read
    g.default.wait_stream(side)
    g.kernel(main, "aten::add_.Tensor", writes=[x])
    assert sim.findings == []


def test_wait_stream_covers_only_work_enqueued_before_it(sim):
    g, main = sim.gpu, sim.main
    x = g.alloc(main, (4,))
    side = FakeStream()
    side.wait_stream(g.default)
    w, _ = g.kernel(main, "aten::mul_.Tensor", writes=[x])  # enqueued after the wait
    with g.stream(side):
        r, _ = g.kernel(main, "aten::sum", reads=[x], out_shape=())
    assert [(a[0], a[2], a[3]) for a in sim.summary()[0][2]] == [(S0, "write", w), (S1, "read", r)]


# -- 3: events ------------------------------------------------------------------------------------------
def test_event_record_then_wait_is_clean(sim):
    g, main = sim.gpu, sim.main
    x = g.alloc(main, (4,))
    g.kernel(main, "aten::mul_.Tensor", writes=[x])
    done = FakeEvent()
    done.record(g.default)
    side = FakeStream()
    done.wait(side)
    with g.stream(side):
        g.kernel(main, "aten::sum", reads=[x], out_shape=())
    assert sim.findings == []


def test_event_record_without_wait_is_a_race(sim):
    g, main = sim.gpu, sim.main
    alloc = sys._getframe().f_lineno + 1
    x = g.alloc(main, (4,))
    w, _ = g.kernel(main, "aten::mul_.Tensor", writes=[x])
    done = FakeEvent()
    done.record(g.default)
    side = FakeStream()
    with g.stream(side):
        r, _ = g.kernel(main, "aten::sum", reads=[x], out_shape=())
    assert sim.summary() == [
        ("data-race", _tensor("4", alloc), [(S0, MAIN, "write", w), (S1, MAIN, "read", r)]),
    ]


def test_a_wait_sees_the_latest_record_of_an_event_only(sim):
    g, main = sim.gpu, sim.main
    x = g.alloc(main, (4,))
    w, _ = g.kernel(main, "aten::mul_.Tensor", writes=[x])
    ev = FakeEvent()
    ev.record(g.default)
    idle = FakeStream()
    ev.record(idle)  # re-recorded on a stream that never waited for the write
    side = FakeStream()
    ev.wait(side)
    with g.stream(side):
        r, _ = g.kernel(main, "aten::sum", reads=[x], out_shape=())
    assert [(a[0], a[2], a[3]) for a in sim.summary()[0][2]] == [(S0, "write", w), (S2, "read", r)]


def test_event_synchronize_orders_the_host(sim):
    g, main = sim.gpu, sim.main
    x = g.alloc(main, (4,))
    g.kernel(main, "aten::fill_.Scalar", writes=[x])
    _, out = g.to_cpu(main, x, non_blocking=True)
    ev = FakeEvent()
    ev.record(g.default)
    ev.synchronize()
    host_op(main, aten.sum.default, out)
    assert sim.findings == []


def test_event_query_true_orders_the_host_like_synchronize(api_sim):
    g, main = api_sim.gpu, api_sim.main
    x = g.alloc(main, (4,))
    g.kernel(main, "aten::fill_.Scalar", writes=[x])
    _, out = g.to_cpu(main, x, non_blocking=True)
    ev = FakeEvent()
    ev.record(g.default)
    ev.done = False
    assert not ev.query()  # not done yet: nothing learned
    ev.done = True
    while not ev.query():
        pass
    host_op(main, aten.sum.default, out)
    assert api_sim.findings == []


# -- 4: record_stream and reuse of freed memory ------------------------------------------------------------
def test_missing_record_stream_is_a_race_on_the_reused_memory(api_sim):
    g, main = api_sim.gpu, api_sim.main
    x_alloc = sys._getframe().f_lineno + 1
    x = g.alloc(main, (256,))
    g.kernel(main, "aten::fill_.Scalar", writes=[x])
    side = FakeStream()
    side.wait_stream(g.default)
    with g.stream(side):
        r, _ = g.kernel(main, "aten::sum", reads=[x], out_shape=())
    addr = x.untyped_storage().data_ptr()
    free_line = sys._getframe().f_lineno + 1
    g.free(x)
    del x
    y_alloc = sys._getframe().f_lineno + 1
    y = g.alloc(main, (256,), at=addr)  # the caching allocator hands the block out again
    old, new = _tensor("256", x_alloc), _tensor("256", y_alloc)
    assert api_sim.summary() == [
        ("data-race", f"memory of {old}, reused by {new}", [(S1, MAIN, "read", r), (S0, MAIN, "write", y_alloc)]),
    ]
    f = api_sim.findings[0]
    reuse = f["details"]["reuse"]
    assert reuse["freed_tensor"] == old and reuse["reused_by"] == new
    assert reuse["allocation_stack"][0]["line"] == x_alloc
    assert reuse["reused_allocation_stack"][0]["line"] == y_alloc
    assert reuse["freed_at"][0]["line"] == free_line
    assert reuse["record_stream"] == []
    assert f["accesses"][1]["details"]["allocation"] is True
    assert "record_stream" in f["hint"]
    assert f["message"].startswith(f"data race on reused CUDA memory: {old} was freed at {THIS}:{free_line}")
    _validate_finding(f)
    del y


def test_record_stream_orders_the_side_stream_before_the_reuse(api_sim):
    g, main = api_sim.gpu, api_sim.main
    x = g.alloc(main, (256,))
    g.kernel(main, "aten::fill_.Scalar", writes=[x])
    side = FakeStream()
    side.wait_stream(g.default)
    with g.stream(side):
        g.kernel(main, "aten::sum", reads=[x], out_shape=())
    x.record_stream(side)
    addr = x.untyped_storage().data_ptr()
    g.free(x)
    del x
    y = g.alloc(main, (256,), at=addr)
    g.kernel(main, "aten::fill_.Scalar", writes=[y])
    assert api_sim.findings == []


def test_record_stream_covers_only_work_enqueued_before_the_free(api_sim):
    g, main = api_sim.gpu, api_sim.main
    x = g.alloc(main, (256,))
    side = FakeStream()
    side.wait_stream(g.default)
    x.record_stream(side)
    addr = x.untyped_storage().data_ptr()
    view = x[0:128]
    g.free(x)
    with g.stream(side):  # use after free: enqueued after the allocator's event
        r, _ = g.kernel(main, "aten::sum", reads=[view], out_shape=())
    y_alloc = sys._getframe().f_lineno + 1
    y = g.alloc(main, (256,), at=addr)
    assert [(a[0], a[2], a[3]) for a in api_sim.summary()[0][2]] == [(S1, "read", r), (S0, "write", y_alloc)]
    del y


def test_reuse_on_the_same_stream_is_clean(sim):
    g, main = sim.gpu, sim.main
    x = g.alloc(main, (256,))
    g.kernel(main, "aten::fill_.Scalar", writes=[x])
    g.kernel(main, "aten::sum", reads=[x], out_shape=())
    addr = x.untyped_storage().data_ptr()
    g.free(x)
    del x
    y = g.alloc(main, (256,), at=addr)
    g.kernel(main, "aten::fill_.Scalar", writes=[y])
    assert sim.findings == []


def test_a_freed_blocks_own_stream_accesses_are_forgotten_and_other_streams_kept(sim):
    # The caching allocator reuses a block only on its own stream, which is ordered after that
    # stream's accesses: those are dropped at the free (the shadow does not grow with every
    # allocation); another stream's access is what a missing record_stream races with: kept.
    g, main = sim.gpu, sim.main
    memory = sim.tracker.memory

    def live_cells(lo: int, hi: int) -> list:
        sh = memory.shadow
        return [c for a, b, c in zip(sh.starts, sh.ends, sh.cells) if lo < b and a < hi and (c.write or c.reads)]

    x = g.alloc(main, (256,))
    g.kernel(main, "aten::fill_.Scalar", writes=[x])
    g.kernel(main, "aten::sum", reads=[x], out_shape=())
    lo = x.untyped_storage().data_ptr()
    hi = lo + x.untyped_storage().nbytes()
    assert live_cells(lo, hi)
    g.free(x)
    del x
    assert live_cells(lo, hi) == []

    z = g.alloc(main, (256,))
    side = FakeStream()
    side.wait_stream(g.default)
    with g.stream(side):
        g.kernel(main, "aten::sum", reads=[z], out_shape=())
    lo = z.untyped_storage().data_ptr()
    hi = lo + z.untyped_storage().nbytes()
    g.free(z)
    del z
    assert live_cells(lo, hi), "the side stream's read must outlive the free"
    assert sim.findings == []


def test_reuse_after_synchronizing_the_side_stream_is_clean(sim):
    g, main = sim.gpu, sim.main
    x = g.alloc(main, (256,))
    side = FakeStream()
    side.wait_stream(g.default)
    with g.stream(side):
        g.kernel(main, "aten::sum", reads=[x], out_shape=())
    side.synchronize()
    addr = x.untyped_storage().data_ptr()
    g.free(x)
    del x
    g.alloc(main, (256,), at=addr)
    assert sim.findings == []


def test_using_a_tensor_on_another_stream_than_its_allocation_needs_a_wait(sim):
    """The allocation is a write on the allocating stream (the allocator's contract: the block is
    free for work enqueued on that stream from now on), so another stream must wait for it."""
    g, main = sim.gpu, sim.main
    a = sys._getframe().f_lineno + 1
    out = g.alloc(main, (16,))
    side = FakeStream()
    with g.stream(side):
        w, _ = g.kernel(main, "aten::fill_.Scalar", writes=[out])
    assert sim.summary() == [("data-race", _tensor("16", a), [(S0, MAIN, "write", a), (S1, MAIN, "write", w)])]
    assert sim.findings[0]["accesses"][0]["op"] == "aten::empty.memory_format"
    assert sim.findings[0]["accesses"][0]["details"]["allocation"] is True
    out2 = g.alloc(main, (16,))
    side.wait_stream(g.default)
    with g.stream(side):
        g.kernel(main, "aten::fill_.Scalar", writes=[out2])
    assert len(sim.findings) == 1


# -- 5: non_blocking host -> device copy -------------------------------------------------------------------
def test_host_write_to_a_pinned_source_of_a_non_blocking_copy_races(sim):
    g, main = sim.gpu, sim.main
    src = g.pin(torch.ones(64))
    dst = g.alloc(main, (64,))
    c = g.copy_(main, dst, src, non_blocking=True)
    h = host_op(main, aten.add_.Tensor, src, src)
    assert sim.summary() == [
        ("data-race", _tensor("64", c, "first used"), [(S0, MAIN, "read", c), (f"thread:{MAIN}", MAIN, "write", h)]),
    ]
    f = sim.findings[0]
    assert f["message"] == (
        f"data race on {_tensor('64', c, 'first used')}: read on {S0} (launched by 'MainThread') "
        f"vs write by 'MainThread' on the host"
    )
    assert "synchronise" in f["hint"]
    _validate_finding(f)


@pytest.mark.parametrize("how", ["device", "stream", "event"])
def test_host_write_after_synchronize_is_clean(sim, how):
    g, main = sim.gpu, sim.main
    src = g.pin(torch.ones(64))
    dst = g.alloc(main, (64,))
    g.copy_(main, dst, src, non_blocking=True)
    if how == "device":
        FakeCuda.synchronize()
    elif how == "stream":
        g.default.synchronize()
    else:
        g.default.record_event().synchronize()
    host_op(main, aten.add_.Tensor, src, src)
    assert sim.findings == []


def test_host_writes_before_the_launch_are_ordered_before_the_copy(sim):
    g, main = sim.gpu, sim.main
    src = g.pin(torch.ones(64))
    dst = g.alloc(main, (64,))
    host_op(main, aten.mul_.Tensor, src, src)  # fill the staging buffer, then launch the copy
    g.copy_(main, dst, src, non_blocking=True)
    g.kernel(main, "aten::sum", reads=[dst], out_shape=())
    assert sim.findings == []


def test_blocking_copy_from_pageable_memory_is_clean(sim):
    g, main = sim.gpu, sim.main
    src = torch.ones(64)  # not pinned: even non_blocking=True stages it before returning
    dst = g.alloc(main, (64,))
    g.copy_(main, dst, src, non_blocking=True)
    host_op(main, aten.add_.Tensor, src, src)
    g.copy_(main, dst, src, non_blocking=False)
    host_op(main, aten.add_.Tensor, src, src)
    assert sim.findings == []


# -- 6: device -> host results ------------------------------------------------------------------------------
def test_reading_a_non_blocking_device_to_host_result_before_synchronizing_races(sim):
    g, main = sim.gpu, sim.main
    x = g.alloc(main, (8,))
    g.kernel(main, "aten::fill_.Scalar", writes=[x])
    c, out = g.to_cpu(main, x, non_blocking=True)
    h = host_op(main, aten.sum.default, out)
    assert sim.summary() == [
        ("data-race", _tensor("8", c), [(S0, MAIN, "write", c), (f"thread:{MAIN}", MAIN, "read", h)]),
    ]


def test_reading_a_device_to_host_result_after_synchronize_is_clean(sim):
    g, main = sim.gpu, sim.main
    x = g.alloc(main, (8,))
    g.kernel(main, "aten::fill_.Scalar", writes=[x])
    _, out = g.to_cpu(main, x, non_blocking=True)
    g.default.synchronize()
    host_op(main, aten.sum.default, out)
    assert sim.findings == []


@pytest.mark.parametrize("blocking_op", ["item", "cpu"])
def test_host_blocking_ops_synchronize_host_with_the_stream(sim, blocking_op):
    g, main = sim.gpu, sim.main
    x = g.alloc(main, (8,))
    g.kernel(main, "aten::fill_.Scalar", writes=[x])
    _, out = g.to_cpu(main, x, non_blocking=True)
    if blocking_op == "item":
        g.item(main, x[0])  # .item(), float(t), t.tolist() elements: the host waits
    else:
        g.to_cpu(main, x, non_blocking=False)  # .cpu(): a blocking copy
    host_op(main, aten.sum.default, out)
    assert sim.findings == []


def test_a_synchronize_orders_only_the_thread_that_called_it(sim):
    g, main = sim.gpu, sim.main
    x = g.alloc(main, (8,))
    g.kernel(main, "aten::fill_.Scalar", writes=[x])
    c, out = g.to_cpu(main, x, non_blocking=True)
    session = sim.session
    tid = session.fork()
    go, done = threading.Event(), threading.Event()
    lines = {}

    def reader():
        state = session.adopt_thread(threading.current_thread(), tid)
        go.wait()
        lines["h"] = host_op(state, aten.sum.default, out)
        done.set()

    t = threading.Thread(target=reader, name="reader")
    t.start()
    g.default.synchronize()  # the main thread waits; the reader thread learns nothing of it
    go.set()
    done.wait()
    t.join()
    assert [(a[0], a[1], a[2]) for a in sim.summary()[0][2]] == [(S0, MAIN, "write"), ("thread:reader", "reader", "read")]


# -- 7: a request thread, its side stream and the trainer's default stream ---------------------------------
def test_request_thread_side_stream_and_default_stream_in_one_report(sim):
    g, main = sim.gpu, sim.main
    session = sim.session
    model = torch.nn.Linear(4, 4, bias=False)
    weight = g.wrap(model.weight.detach())  # model.cuda() happened before the run
    tid = session.fork()  # the request thread starts here: ordered after everything above
    go, done = threading.Event(), threading.Event()
    lines = {}

    def request():
        state = session.adopt_thread(threading.current_thread(), tid)
        go.wait()
        side = FakeStream()
        with g.stream(side):
            lines["r"], y = g.kernel(state, "aten::mv", reads=[weight], out_shape=(4,))
            lines["c"], out = g.to_cpu(state, y, non_blocking=True)
        lines["h"] = host_op(state, aten.sum.default, out)  # no synchronize
        done.set()

    t = threading.Thread(target=request, name="request")
    t.start()
    w, _ = g.kernel(main, "aten::add_.Tensor", writes=[weight])  # the trainer's optimizer step
    go.set()
    done.wait()
    t.join()
    result = _tensor("4", lines["c"])
    assert sim.summary() == [
        ("data-race", "model.weight", [(S0, MAIN, "write", w), (S1, "request", "read", lines["r"])]),
        ("data-race", result, [(S1, "request", "write", lines["c"]), ("thread:request", "request", "read", lines["h"])]),
    ]
    timelines = {a["timeline"] for f in sim.findings for a in f["accesses"]}
    assert timelines == {S0, S1, "thread:request"}
    for f in sim.findings:
        _validate_finding(f)


# -- plumbing ---------------------------------------------------------------------------------------------
def test_the_tracker_handles_every_gpu_trace_callback_with_its_signature():
    registered = {n for n in dir(gpu_trace) if n.startswith("register_callback_for_")}
    assert {c[0] for c in cuda.CudaTracker.CALLBACKS} == registered
    arity = {"EventRecordCallbacks": 2, "EventWaitCallbacks": 2, "DeviceSynchronizationCallbacks": 0}
    for register, registry, method in cuda.CudaTracker.CALLBACKS:
        assert isinstance(getattr(gpu_trace, registry), type(gpu_trace.EventCreationCallbacks))
        params = list(inspect.signature(getattr(cuda.CudaTracker, method)).parameters)[1:]
        assert len(params) == arity.get(registry, 1), method


@pytest.mark.skipif(torch.cuda._is_compiled(), reason="documents a CPU-only torch build")
def test_install_without_cuda_is_a_silent_no_op(capsys):
    session = Session(lambda e: None)
    before = torch.cuda.Stream.__dict__.get("wait_stream"), torch.Tensor.__dict__.get("record_stream")
    assert cuda.install(session) is None
    assert session.cuda is None
    assert cuda.LAST_NOTE == cuda.NOTE_NO_CUDA_BUILD
    assert cuda.describe(session) == cuda.NOTE_NO_CUDA_BUILD
    assert (torch.cuda.Stream.__dict__.get("wait_stream"), torch.Tensor.__dict__.get("record_stream")) == before
    assert not any(gpu_trace.EventRecordCallbacks.callback_list)
    assert capsys.readouterr() == ("", "")
    cuda.uninstall(session)


def test_uninstall_restores_the_patched_classes_and_callbacks():
    originals = {name: FakeStream.__dict__[name] for name in ("wait_stream", "synchronize", "query")}
    session = Session(lambda e: None)
    session.adopt_thread(threading.current_thread(), None)
    targets = {"Stream": FakeStream, "Event": FakeEvent, "cuda": FakeCuda, "Tensor": FakeCudaTensor}
    tracker = cuda.install(session, backend=FakeBackend(), trace=gpu_trace, targets=targets, lazy=False)
    assert session.cuda is tracker
    assert cuda.describe(session) == "CUDA streams tracked as timelines: 0 stream(s), 0 launches"
    assert FakeStream.__dict__["wait_stream"].__wrapped__ is originals["wait_stream"]
    assert tracker.on_event_record in gpu_trace.EventRecordCallbacks.callback_list
    cuda.uninstall(session)
    assert session.cuda is None
    assert {name: FakeStream.__dict__[name] for name in originals} == originals
    assert tracker.on_event_record not in gpu_trace.EventRecordCallbacks.callback_list
    cuda.uninstall(session)  # idempotent


def test_stream_labels_follow_first_use_per_device():
    hb = HappensBefore()
    model = StreamModel(hb)
    assert model.stream(0, 0).label == "cuda:0/stream 0"
    assert model.stream(0, 0xAB).label == "cuda:0/stream 1"
    assert model.stream(1, 0xCD).label == "cuda:1/stream 1"
    assert model.stream(1, 0).label == "cuda:1/stream 0"
    assert model.stream(0, 0xEF).label == "cuda:0/stream 2"
    assert model.stream(0, 0xAB) is model.stream(0, 0xAB)


# -- helpers -------------------------------------------------------------------------------------------------
def _validate_finding(finding: dict) -> None:
    schema = load_schema()
    validator = jsonschema.Draft202012Validator({"$defs": schema["$defs"], "$ref": "#/$defs/finding"})
    validator.validate(finding)


def test_a_failing_install_is_undone_and_never_raises():
    session = Session(lambda e: None)

    class Broken:
        EventCreationCallbacks = gpu_trace.EventCreationCallbacks

        @staticmethod
        def register_callback_for_event_creation(fn):
            gpu_trace.EventCreationCallbacks.add_callback(fn)

        def __getattr__(self, name):
            raise RuntimeError("no such trace hook")

    trace = Broken()
    before = list(gpu_trace.EventCreationCallbacks.callback_list)
    assert cuda.install(session, backend=FakeBackend(), trace=trace, lazy=False) is None
    assert session.cuda is None
    assert "installing raceguard's CUDA hooks failed" in cuda.LAST_NOTE
    assert gpu_trace.EventCreationCallbacks.callback_list == before
