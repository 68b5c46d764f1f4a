"""CUDA streams as timelines: kernel launches, events, synchronisation and the caching allocator.

Every CUDA stream is one more timeline of the session's happens-before engine (see
:mod:`raceguard.engine.streams` for the model), so one report can name a request thread, the
side stream it launched on and the trainer's default stream together. What feeds the model:

* **tensor ops** (through the session's dispatch mode): :meth:`CudaTracker.before_op` /
  :meth:`CudaTracker.after_op`. An op touching a CUDA tensor is a launch on the current stream
  of the launching thread (``torch.cuda.current_stream()``, thread-local in torch): the thread's
  clock flows into the stream, and the op's CUDA accesses are recorded on the stream's timeline,
  in a shadow of the device address space that outlives ``free`` (see *memory* below).
  ``non_blocking`` copies between a **pinned** host tensor and the device record the host
  tensor's access on the stream too, in the session's host shadow, so a host access before
  synchronisation races with it. Blocking copies, ``.item()``, ``.tolist()``, ``.cpu()`` and the
  other ops that wait for the device (:data:`HOST_SYNC_OPS`) synchronise host ← stream.
* **torch.cuda._gpu_trace callbacks** (the ones CUDA Sanitizer uses, with the same signatures):
  event creation/deletion/record/wait/synchronisation, stream creation/synchronisation, device
  synchronisation, memory allocation/deallocation. They also see what torch does in C++ (the
  autograd engine's stream syncs, ``memcpy_and_sync``).
* **Python API patches**: ``torch.cuda.Stream.wait_stream/wait_event/synchronize/query``,
  ``torch.cuda.Event.record/wait/synchronize/query``, ``torch.cuda.synchronize``,
  ``torch.cuda.empty_cache`` and ``torch.Tensor.record_stream``. Inside a patched call the
  trace's synchronisation callbacks are ignored (the patch applies the same edge, knowing the
  Python objects); ``record_stream`` and a ``query()`` that returned True exist only here.

Memory: the caching allocator hands a freed block to the next allocation *on the same stream*
without waiting for other streams that used it. The shadow of device memory is kept across the
free, and the new tensor's allocation is recorded as a write on its stream, so an access by
another stream that is not ordered before it is reported as a ``data-race`` on the reused memory,
with the allocation stacks of both tensors (CUDA Sanitizer forgets a pointer's accesses at free
and misses this). ``record_stream(s)`` orders ``s``'s accesses before the reuse, as the allocator
does (it polls an event recorded on ``s`` at free time before handing the block out again).

Wiring (done by the session, see ``docs/cuda.md``): :func:`install` once per session; the session
calls ``session.cuda.before_op`` / ``after_op`` around each op while ``session.cuda`` is set
(only once CUDA is initialised: a CPU-only run never pays for it), and hands races involving a
stream timeline to ``session.cuda.take_races``.
"""

from __future__ import annotations

import _thread
import functools
import weakref
from typing import Any, Callable, Iterable

from ..engine.hb import AccessRecord, Race, ShadowStorage
from ..engine.streams import DEFAULT_STREAM, DeviceBlock, DeviceMemory, StreamModel, StreamTimeline
from ..report.finding import Access, Finding, compute_fingerprint
from .naming import Resource, StorageMeta, describe_tensor, shape_of
from .stacks import current_site, first_user_location, op_site_function, render_site, user_key
from .torch_ops import byte_ranges

# Site capture for the trace callbacks: torch's C++ stack capture when it has one (a few µs, not
# a Python walk of the whole stack); raceguard's own frames are hidden when rendered.
_site = op_site_function()
# The tracker the patched torch.cuda APIs report to (one session at a time, like session.ACTIVE).
_ACTIVE: "CudaTracker | None" = None
# Why the last install() did nothing / what it did: one line for a verbose log or the stats.
LAST_NOTE: str | None = None

NOTE_NO_CUDA_BUILD = "CUDA streams not tracked: this torch build has no CUDA support"
NOTE_TRACKING = "CUDA streams tracked as timelines once CUDA is initialised"

# Ops that make the host wait for the stream they run on (they read a device value on the host).
HOST_SYNC_OPS = frozenset(
    {
        "aten::_local_scalar_dense",  # .item(), float(t), bool(t), t.tolist() element reads
        "aten::equal",
        "aten::is_nonzero",
        "aten::allclose",
        "aten::nonzero",  # output size comes from the device
        "aten::masked_select",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
        "aten::unique_dim_consecutive",
        "aten::bincount",
        "aten::repeat_interleave",
    }
)
# Copies: (dst argument index, src argument index); non_blocking is argument 2 or a keyword.
_COPY_OPS = {"aten::copy_": (0, 1), "aten::copy": (0, 1), "aten::_copy_from": (1, 0)}
_TO_COPY = "aten::_to_copy"

_NORMAL, _COPY, _TOCOPY, _HOSTSYNC = 0, 1, 2, 3

_tls = _thread._local()  # depth of patched torch.cuda API calls in this thread


def _in_api() -> bool:
    return getattr(_tls, "depth", 0) > 0


class StreamOpInfo:
    """Payload of an access recorded on a stream timeline."""

    __slots__ = ("site", "op", "locks", "host", "block", "alloc")

    def __init__(self, site: tuple, op: str, host: int | None, block: DeviceBlock | None, alloc: bool = False) -> None:
        self.site = site
        self.op = op
        self.locks = ()  # a host lock does not protect a kernel that runs later on the device
        self.host = host  # timeline of the host thread that launched it
        self.block = block  # the allocation it touched (None for host memory)
        self.alloc = alloc  # the record is the allocation of ``block`` itself


# -- torch access (replaced by a fake in the simulated tests) ------------------------------------
class TorchBackend:
    """What the tracker asks torch: current streams, the current device, pinned-ness."""

    def __init__(self) -> None:
        import torch

        self._torch = torch
        self._get_stream = torch._C._cuda_getCurrentStream
        self._handles: dict[tuple[int, int], int] = {}

    def current_stream(self, device: int) -> tuple[int, int]:
        """(device, cudaStream_t handle) of the calling thread's current stream on ``device``."""
        stream_id, index, device_type = self._get_stream(device)
        key = (index, stream_id)
        handle = self._handles.get(key)
        if handle is None:
            s = self._torch.cuda.Stream(stream_id=stream_id, device_index=index, device_type=device_type)
            handle = self._handles[key] = int(s.cuda_stream)
        return index, handle

    def current_device(self) -> int:
        return int(self._torch.cuda.current_device())

    def stream_key(self, stream: Any) -> tuple[int, int]:
        """(device, handle) of a torch.cuda.Stream or torch.Stream."""
        if stream is None:
            return self.current_stream(self.current_device())
        handle = getattr(stream, "cuda_stream", None)
        if handle is None:  # a generic torch.Stream
            s = self._torch.cuda.Stream(
                stream_id=stream.stream_id, device_index=stream.device_index, device_type=stream.device_type
            )
            handle = s.cuda_stream
        return int(stream.device_index), int(handle)

    def event_handle(self, event: Any) -> int:
        return int(getattr(event, "cuda_event", 0) or 0)

    def device_index(self, device: Any) -> int | None:
        if device is None:
            return self.current_device()
        return int(self._torch.cuda._get_device_index(device, optional=True))

    def is_pinned(self, t: Any) -> bool:
        try:
            return bool(t.is_pinned())
        except Exception:
            return False

    @staticmethod
    def is_device(t: Any) -> bool:
        """Whether tensor ``t`` lives in device memory (the tracker's, not the host's)."""
        return t.is_cuda

    @staticmethod
    def device_of(t: Any) -> int:
        return t.get_device()

    @staticmethod
    def is_device_storage(st: Any) -> bool:
        return st.device.type == "cuda"


def _tensorlike(v: Any) -> bool:
    """A tensor argument (torch passes Python numbers where a schema says Tensor)."""
    return hasattr(v, "untyped_storage")


def _is_cuda(t: Any) -> bool:
    return bool(getattr(t, "is_cuda", False))


def _get_device(t: Any) -> int:
    return t.get_device()


def _storage_is_cuda(st: Any) -> bool:
    device = getattr(st, "device", None)
    return getattr(device, "type", None) == "cuda"


def _contained(what: str, ordering: bool = True) -> Callable[[Callable], Callable]:
    """A hook boundary for a trace callback: torch calls it from C++ (a kernel launch, a free
    during garbage collection), and whatever raceguard raises there must reach neither torch,
    which would log it on every event, nor the target. The event is lost and counted."""

    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def callback(self: "CudaTracker", *args: Any) -> None:
            try:
                method(self, *args)
            except Exception as exc:
                _hook_failed(self.session, what, exc, ordering)

        return callback

    return wrap


def _hook_failed(session: Any, what: str, exc: BaseException, ordering: bool = False) -> None:
    report = getattr(session, "hook_failed", None)
    if report is not None:
        report(what, exc, ordering)


def _target_device(backend: Any, device: Any) -> int | None:
    """The CUDA device index a ``device=`` keyword names, or None when it is not a CUDA device."""
    if device is None:
        return None
    dtype = getattr(device, "type", None)
    if dtype is None:
        text = str(device)
        if not text.startswith("cuda"):
            return None
        index = text.partition(":")[2]
        return int(index) if index else backend.current_device()
    if dtype != "cuda":
        return None
    return device.index if device.index is not None else backend.current_device()


# -- the tracker ---------------------------------------------------------------------------------
class CudaTracker:
    """The CUDA side of one session: stream timelines, events, device memory, CUDA race reports."""

    def __init__(self, session: Any, backend: Any) -> None:
        self.session = session
        self.backend = backend
        self.hb = session.hb
        self.model = StreamModel(session.hb)
        self.memory = DeviceMemory(self.model)
        self.active = False
        self._kinds: dict[int, tuple[Any, int]] = {}
        self._seen_streams: dict[tuple[int, int], StreamTimeline] = {}
        self._op_ctx: dict[int, tuple[Any, StreamTimeline]] = {}  # host tid -> (info, stream)
        self._alloc_sites: dict[int, tuple] = {}  # base address -> site of the allocation callback
        self._handle_device: dict[int, int] = {}
        self._groups: dict[tuple, dict] = {}
        # How the backend tells device tensors from host ones (the CPU simulation of
        # raceguard.capture.cudasim calls every CPU tensor device memory).
        self._is_device = getattr(backend, "is_device", None) or _is_cuda
        self._device_of = getattr(backend, "device_of", None) or _get_device
        self._is_device_storage = getattr(backend, "is_device_storage", None) or _storage_is_cuda
        self._track_lifetime = getattr(backend, "track_lifetime", None)

    # -- activation ----------------------------------------------------------------------------
    def activate(self) -> None:
        """CUDA is initialised: from now on the session routes ops through this tracker."""
        if self.active or getattr(self.session, "closed", False):
            return
        self.active = True
        self.session.cuda = self

    # -- helpers -------------------------------------------------------------------------------
    def _kind(self, plan: Any) -> int:
        # By id: plans are frozen dataclasses, whose hash walks every field (per op, twice). The
        # entry keeps the plan alive, so its id cannot be reused by another plan.
        entry = self._kinds.get(id(plan))
        if entry is not None and entry[0] is plan:
            return entry[1]
        if True:
            name = plan.name
            base = name.split(".", 1)[0]
            if base in _COPY_OPS:
                kind = _COPY
            elif base == _TO_COPY:
                kind = _TOCOPY
            elif base in HOST_SYNC_OPS:
                kind = _HOSTSYNC
            else:
                kind = _NORMAL
            self._kinds[id(plan)] = (plan, kind)
        return kind

    def _current(self, device: int) -> StreamTimeline:
        key = self.backend.current_stream(device)  # (device, handle): per op, so kept cheap
        s = self._seen_streams.get(key)
        if s is None:
            dev, handle = key
            self._handle_device.setdefault(handle, dev)
            s = self._seen_streams[key] = self.model.stream(dev, handle)
        return s

    def _stream_of_handle(self, handle: int) -> StreamTimeline:
        """A stream named only by its handle (trace callbacks): its device from earlier sightings,
        else the current device (the default stream's handle 0 exists once per device)."""
        handle = int(handle)
        dev = None if handle == DEFAULT_STREAM else self._handle_device.get(handle)
        if dev is None:
            dev = self.backend.current_device()
        return self.model.stream(dev, handle)

    def _stream_of(self, stream: Any) -> StreamTimeline:
        dev, handle = self.backend.stream_key(stream)
        self._handle_device.setdefault(handle, dev)
        return self.model.stream(dev, handle)

    def _host(self) -> int | None:
        """Timeline of the calling host thread, None for a thread the session does not watch
        (torch's own C++ threads, e.g. the autograd engine's device threads)."""
        state = self.session.states.get(_thread.get_ident())
        return state.tid if state is not None else None

    # -- tensor ops (called by Session.on_op) -----------------------------------------------------
    def before_op(self, state: Any, plan: Any, accessed: list, args: tuple, kwargs: dict, info: Any) -> list:
        """Record the CUDA side of an op about to run; return the accesses the host path keeps.

        ``accessed`` is the session's ``[(tensor, is_write), ...]``. CUDA tensors are recorded on
        the current stream of the launching thread; so is a pinned host tensor of a
        ``non_blocking`` copy, which the host path then skips. CUDA tensors are returned too: the
        *launch* is checked on the host like any access (see "host order" in
        :mod:`raceguard.engine.streams`), so two host threads launching on one stream with
        nothing ordering their launches race although the stream runs their kernels in order.
        """
        device = None
        is_device = self._is_device
        for t, _ in accessed:
            if is_device(t):
                device = self._device_of(t)
                break
        kind = self._kind(plan)
        non_blocking = False
        async_host: Any = None  # the pinned host tensor a non_blocking copy reads or writes
        if kind == _COPY or kind == _TOCOPY:
            non_blocking = _non_blocking(kind, args, kwargs)
            if kind == _TOCOPY and device is None:
                device = _target_device(self.backend, kwargs.get("device"))  # host -> device
            if device is not None and non_blocking:
                async_host = self._async_host_tensor(kind, plan, args)
        if device is None:
            return accessed  # not a CUDA op
        races: list[Race] = []
        left = []
        host = state.tid
        with self.session.lock:
            stream = self._current(device)
            self.model.launch(host, stream)
            info.stream = stream
            self._op_ctx[host] = (info, stream)
            for t, is_write in accessed:
                if is_device(t):
                    if plan.fresh_input:  # torch.tensor(..., device="cuda"): a fresh allocation
                        self._allocate(t, stream, host, info, races)
                    else:
                        self._device_access(t, is_write, stream, host, info, races)
                    left.append((t, is_write))
                elif async_host is not None and t is async_host:
                    self._host_on_stream(t, is_write, stream, host, info, races)
                else:
                    left.append((t, is_write))
        if races:
            self.report_races(races)
        return left

    def after_op(self, state: Any, plan: Any, outs: list, args: tuple, kwargs: dict, info: Any) -> list:
        """Register the op's outputs and host synchronisation; return the outputs the host path
        keeps: all of them (device ones for the launch-order check), except the pinned result of a
        ``non_blocking`` device→host copy, which the stream writes."""
        host = state.tid
        ctx = self._op_ctx.pop(host, None)
        stream = ctx[1] if ctx is not None and ctx[0] is info else None
        is_device = self._is_device
        cuda_outs = [o for o in outs if is_device(o)]
        if stream is None and not cuda_outs:
            return outs  # not a CUDA op
        kind = self._kind(plan)
        left = list(outs)
        host_sync = kind == _HOSTSYNC
        async_out = None
        if kind == _COPY or kind == _TOCOPY:
            host_outs = [o for o in outs if not is_device(o)] if cuda_outs else left
            host_sync, async_out = self._copy_sync(kind, plan, args, kwargs, host_outs)
        races: list[Race] = []
        with self.session.lock:
            fresh = self._new_outputs(cuda_outs, args, kwargs) if cuda_outs else ()
            if stream is None:
                if not fresh:
                    return left  # a view (no input access recorded): no kernel, no launch
                # a factory op (no tensor input): launched on the current stream
                stream = self._current(self._device_of(fresh[0]))
                self.model.launch(host, stream)
                info.stream = stream
            for o in fresh:
                self._allocate(o, stream, host, info, races)
            if async_out is not None:
                self._host_on_stream(async_out, True, stream, host, info, races, fresh=True)
                left = [o for o in left if o is not async_out]
            if host_sync:
                self.model.sync_stream(host, stream)
        if races:
            self.report_races(races)
        return left

    def _async_host_tensor(self, kind: int, plan: Any, args: tuple) -> Any:
        """The pinned host tensor of a non_blocking copy whose host side is an *input*."""
        if kind == _TOCOPY:
            src = args[0] if args else None
            if src is not None and not self._is_device(src) and self.backend.is_pinned(src):
                return src  # host -> device: the stream reads the pinned source later
            return None
        dst_i, src_i = _COPY_OPS[plan.name.split(".", 1)[0]]
        if len(args) <= max(dst_i, src_i):
            return None
        dst, src = args[dst_i], args[src_i]
        if not (_tensorlike(dst) and _tensorlike(src)):
            return None
        dst_dev, src_dev = self._is_device(dst), self._is_device(src)
        if dst_dev and not src_dev and self.backend.is_pinned(src):
            return src
        if src_dev and not dst_dev and self.backend.is_pinned(dst):
            return dst
        return None

    def _copy_sync(self, kind: int, plan: Any, args: tuple, kwargs: dict, host_outs: list) -> tuple[bool, Any]:
        """(whether the host waits for the stream, the pinned output written asynchronously)."""
        non_blocking = _non_blocking(kind, args, kwargs)
        if kind == _TOCOPY:
            src = args[0] if args else None
            if not _tensorlike(src):
                return False, None
            src_dev = self._is_device(src)
            if src_dev and host_outs:  # device -> host
                out = host_outs[0]
                if non_blocking and self.backend.is_pinned(out):
                    return False, out
                return True, None
            if not src_dev:  # host -> device: a blocking copy waits for the stream
                return not non_blocking, None
            return False, None
        dst_i, src_i = _COPY_OPS[plan.name.split(".", 1)[0]]
        if len(args) <= max(dst_i, src_i):
            return False, None
        dst, src = args[dst_i], args[src_i]
        if not (_tensorlike(dst) and _tensorlike(src)):
            return False, None
        dst_dev = self._is_device(dst)
        if dst_dev == self._is_device(src):
            return False, None
        if dst_dev:  # host -> device: from pageable memory the host buffer is staged at once
            return not non_blocking, None
        # device -> host: asynchronous only into pinned memory (recorded before the op)
        return not (non_blocking and self.backend.is_pinned(dst)), None

    # -- memory --------------------------------------------------------------------------------
    def _block(self, st: Any, base: int, nbytes: int, t: Any, site: tuple, host: int, stream: Any) -> DeviceBlock:
        """The live allocation ``st`` is, registered (as first seen) if new."""
        blocks = self.memory.blocks
        block = blocks.get(base)
        if block is not None and block.meta.ref() is st:
            return block
        if block is not None:  # the old tensor's free was not seen (no trace): free it now
            self.memory.free(block, host)
        alloc_site = self._alloc_sites.pop(base, None)
        meta = StorageMeta(weakref.ref(st), t.dtype, shape_of(t), alloc_site or site, seen_only=alloc_site is None)
        block = DeviceBlock(base, base + nbytes, meta, stream, host)
        blocks[base] = block
        if self._track_lifetime is not None:
            self._track_lifetime(st, block, blocks)
        return block

    def _allocate(self, t: Any, stream: StreamTimeline, host: int, info: Any, races: list) -> DeviceBlock | None:
        """A fresh CUDA tensor: its allocation is a write of the whole block on ``stream``."""
        st = t.untyped_storage()
        base = st.data_ptr()
        nbytes = st.nbytes()
        if not base or nbytes <= 0:
            return None
        blocks = self.memory.blocks
        old = blocks.get(base)
        if old is not None and old.meta.ref() is st:
            return old
        if old is not None:
            self.memory.free(old, host)
        alloc_site = self._alloc_sites.pop(base, None)
        meta = StorageMeta(weakref.ref(st), t.dtype, shape_of(t), info.site if info.site else alloc_site)
        block = DeviceBlock(base, base + nbytes, meta, stream, host)
        blocks[base] = block
        if self._track_lifetime is not None:
            self._track_lifetime(st, block, blocks)
        if self.memory.pending_frees:
            self.memory.reallocated(base, base + nbytes, host)
            self.model.launch(host, stream)  # what the host learned flows into the allocation
        rec = self.hb.record(stream.tid, True, StreamOpInfo(info.site, info.op, host, block, alloc=True))
        self.hb.access(self.memory.shadow, [(base, base + nbytes)], rec, races)
        return block

    def _device_access(self, t: Any, is_write: bool, stream: StreamTimeline, host: int, info: Any, races: list) -> None:
        try:
            st = t.untyped_storage()
        except Exception:  # sparse, nested: no plain storage to track
            return
        base = st.data_ptr()
        nbytes = st.nbytes()
        if not base or nbytes <= 0:
            return
        block = self._block(st, base, nbytes, t, info.site, host, stream)
        rec = self.hb.record(stream.tid, is_write, StreamOpInfo(info.site, info.op, host, block))
        if t.is_contiguous():  # one byte range, without building a list (as the host path does)
            es = t.element_size()
            lo = base + t.storage_offset() * es
            self.hb.access_range(self.memory.shadow, lo, lo + t.numel() * es, rec, races)
            return
        ranges = [(base + lo, base + hi) for lo, hi in byte_ranges(t)]
        self.hb.access(self.memory.shadow, ranges, rec, races)

    def _new_outputs(self, cuda_outs: list, args: tuple, kwargs: dict) -> list:
        """The outputs in memory that no input had: fresh allocations. A view of an input, an
        in-place or ``out=`` result is recorded as an input. Known blocks are checked first, so
        the input addresses are collected only for an op that has a new output."""
        blocks = self.memory.blocks
        inputs = None
        fresh = []
        for o in cuda_outs:
            try:
                st = o.untyped_storage()
            except Exception:
                continue
            base = st.data_ptr()
            block = blocks.get(base)
            if block is not None and block.meta.ref() is st:
                continue
            if inputs is None:
                inputs = _arg_bases(args, kwargs, self._is_device)
            if base not in inputs:
                fresh.append(o)
        return fresh

    def _host_on_stream(
        self, t: Any, is_write: bool, stream: StreamTimeline, host: int, info: Any, races: list, fresh: bool = False
    ) -> None:
        """A pinned host tensor read or written by the stream (a non_blocking copy), recorded in
        the session's host shadow so that the host's own accesses are checked against it."""
        st = t.untyped_storage()
        cd = st._cdata
        shadows = self.session.shadows
        rec = self.hb.record(stream.tid, is_write, StreamOpInfo(info.site, info.op, host, None))
        if fresh:
            sh = ShadowStorage(StorageMeta(weakref.ref(st), t.dtype, shape_of(t), info.site))
            sh.reset(rec, 0, st.nbytes())
            shadows[cd] = sh
            return
        sh = shadows.get(cd)
        if sh is None or sh.meta.ref() is not st:
            sh = shadows[cd] = ShadowStorage(
                StorageMeta(weakref.ref(st), t.dtype, shape_of(t), info.site, seen_only=True)
            )
        self.hb.access(sh, byte_ranges(t), rec, races)

    # -- torch.cuda._gpu_trace callbacks (same signatures) ---------------------------------------
    def _seen_cuda(self) -> None:
        """A trace callback fired: CUDA is in use even if torch.cuda's Python lazy init (which
        activates the tracker) has not run, e.g. when C++ initialised CUDA by itself."""
        if not self.active and _ACTIVE is self:
            self.activate()

    @_contained("following a CUDA event creation", ordering=False)
    def on_event_creation(self, event: int) -> None:
        self._seen_cuda()
        with self.session.lock:
            self.model.event_created(int(event))

    @_contained("following a CUDA event deletion")
    def on_event_deletion(self, event: int) -> None:
        with self.session.lock:
            self.model.event_deleted(int(event))

    @_contained("following a CUDA event record")
    def on_event_record(self, event: int, stream: int) -> None:
        if _in_api():
            return
        host = self._host()
        with self.session.lock:
            self.model.record(host, int(event), self._stream_of_handle(stream))

    @_contained("following a CUDA event wait")
    def on_event_wait(self, event: int, stream: int) -> None:
        if _in_api():
            return
        host = self._host()
        with self.session.lock:
            self.model.wait(host, int(event), self._stream_of_handle(stream))

    # The two memory callbacks fire for every tensor (several per op): they take no lock and
    # capture no stack unless they have to (a dict store or pop is atomic under the GIL).
    @_contained("following a CUDA allocation", ordering=False)
    def on_memory_allocation(self, data_ptr: int) -> None:
        if not self.active:
            self._seen_cuda()
        if _thread.get_ident() in self.session.states:
            # A watched thread allocates inside an op, whose after_op registers the output with
            # the op's own site; a workspace is never seen as a tensor. Nothing to remember.
            return
        sites = self._alloc_sites
        if len(sites) > 65536:  # allocations never seen as tensors (workspaces, temporaries)
            sites.clear()
        sites[int(data_ptr)] = _site()  # e.g. the autograd engine's device threads

    @_contained("following a CUDA free")
    def on_memory_deallocation(self, data_ptr: int) -> None:
        ptr = int(data_ptr)
        if self._alloc_sites:
            self._alloc_sites.pop(ptr, None)
        if ptr not in self.memory.blocks:
            return  # memory no tensor op saw (a workspace): nothing recorded to free
        site = _site()  # for "freed at" in a reuse report
        host = self._host()
        with self.session.lock:
            block = self.memory.blocks.get(ptr)
            if block is not None:
                self.memory.free(block, host, site)

    @_contained("following a CUDA stream creation", ordering=False)
    def on_stream_creation(self, stream: int) -> None:
        self._seen_cuda()
        with self.session.lock:
            s = self._stream_of_handle(stream)
            self._handle_device.setdefault(int(stream), s.device)

    @_contained("following a device synchronisation")
    def on_device_synchronization(self) -> None:
        if _in_api():
            return
        host = self._host()
        if host is None:
            return
        with self.session.lock:
            self.model.sync_device(host, self.backend.current_device())

    @_contained("following a stream synchronisation")
    def on_stream_synchronization(self, stream: int) -> None:
        if _in_api():
            return
        host = self._host()
        if host is None:
            return
        with self.session.lock:
            self.model.sync_stream(host, self._stream_of_handle(stream))

    @_contained("following an event synchronisation")
    def on_event_synchronization(self, event: int) -> None:
        if _in_api():
            return
        host = self._host()
        if host is None:
            return
        with self.session.lock:
            self.model.sync_event(host, int(event))

    CALLBACKS = (
        ("register_callback_for_event_creation", "EventCreationCallbacks", "on_event_creation"),
        ("register_callback_for_event_deletion", "EventDeletionCallbacks", "on_event_deletion"),
        ("register_callback_for_event_record", "EventRecordCallbacks", "on_event_record"),
        ("register_callback_for_event_wait", "EventWaitCallbacks", "on_event_wait"),
        ("register_callback_for_memory_allocation", "MemoryAllocationCallbacks", "on_memory_allocation"),
        ("register_callback_for_memory_deallocation", "MemoryDeallocationCallbacks", "on_memory_deallocation"),
        ("register_callback_for_stream_creation", "StreamCreationCallbacks", "on_stream_creation"),
        ("register_callback_for_device_synchronization", "DeviceSynchronizationCallbacks", "on_device_synchronization"),
        ("register_callback_for_stream_synchronization", "StreamSynchronizationCallbacks", "on_stream_synchronization"),
        ("register_callback_for_event_synchronization", "EventSynchronizationCallbacks", "on_event_synchronization"),
    )

    # -- the Python API (called by the patches) --------------------------------------------------
    def api_wait_stream(self, waiting: Any, waited: Any) -> None:
        host = self._host()
        with self.session.lock:
            self.model.wait_stream(host, self._stream_of(waiting), self._stream_of(waited))

    def api_event_record(self, event: Any, stream: Any) -> None:
        host = self._host()
        handle = self.backend.event_handle(event)
        if not handle:
            return
        with self.session.lock:
            self.model.record(host, handle, self._stream_of(stream))

    def api_event_wait(self, event: Any, stream: Any) -> None:
        host = self._host()
        handle = self.backend.event_handle(event)
        if not handle:
            return
        with self.session.lock:
            self.model.wait(host, handle, self._stream_of(stream))

    def api_event_synchronize(self, event: Any) -> None:
        host = self._host()
        handle = self.backend.event_handle(event)
        if host is None or not handle:
            return
        with self.session.lock:
            self.model.sync_event(host, handle)

    def api_stream_synchronize(self, stream: Any) -> None:
        host = self._host()
        if host is None:
            return
        with self.session.lock:
            self.model.sync_stream(host, self._stream_of(stream))

    def api_device_synchronize(self, device: Any) -> None:
        host = self._host()
        if host is None:
            return
        index = self.backend.device_index(device)
        with self.session.lock:
            self.model.sync_device(host, index)

    def api_empty_cache(self) -> None:
        """Cached blocks went back to the driver (cudaFree synchronises the device): the old
        accesses of freed memory can no longer race with a later allocation at that address."""
        with self.session.lock:
            self._forget_freed()

    def api_record_stream(self, tensor: Any, stream: Any) -> None:
        if not _tensorlike(tensor) or not self._is_device(tensor):
            return
        host = self._host()
        with self.session.lock:
            s = self._stream_of(stream)
            st = tensor.untyped_storage()
            base, nbytes = st.data_ptr(), st.nbytes()
            if not base or nbytes <= 0:
                return
            block = self._block(st, base, nbytes, tensor, current_site(3), host, None)
            self.memory.add_user(block, s)

    def _forget_freed(self) -> None:
        sh = self.memory.shadow
        keep = [k for k, cell in enumerate(sh.cells) if _cell_has_live(cell)]
        sh.starts = [sh.starts[k] for k in keep]
        sh.ends = [sh.ends[k] for k in keep]
        sh.cells = [sh.cells[k] for k in keep]
        self.memory.pending_frees = []

    # -- reports ---------------------------------------------------------------------------------
    def owns(self, race: Race) -> bool:
        """A race this tracker names: one involving a stream timeline, or a launch-order race
        (two host timelines) on device memory."""
        by_tid = self.model.by_tid
        if race.earlier.timeline in by_tid or race.later.timeline in by_tid:
            return True
        return self._launch_race_storage(race) is not None

    def _launch_race_storage(self, race: Race) -> Any:
        """The device storage of a race found by the host path (launch order), else None."""
        if race.shadow is self.memory.shadow:
            return None
        ref = getattr(race.shadow.meta, "ref", None)
        storage = ref() if ref is not None else None
        if storage is None or not self._is_device_storage(storage):
            return None
        return storage

    def take_races(self, races: list[Race]) -> list[Race]:
        """Report the races that involve a stream timeline; return the others (host-only) for
        the session's own reporting."""
        mine = [r for r in races if self.owns(r)]
        if not mine:
            return races
        self.report_races(mine)
        return [r for r in races if not self.owns(r)]

    def report_races(self, races: Iterable[Race]) -> None:
        for race in races:
            try:
                self._report_race(race)
            except Exception as exc:  # never let reporting break the target
                internal = getattr(self.session, "_internal_error", None)
                if internal is not None:
                    internal("naming a CUDA data race", exc)

    def _access(self, rec: AccessRecord, launch: bool = False) -> Access:
        """The report's view of one access; ``launch``: a host record of a kernel launch (its
        timeline is the stream it was launched on, its locks those held at the launch)."""
        stream = self.model.by_tid.get(rec.timeline)
        mode = "write" if rec.is_write else "read"
        if stream is not None:
            info = rec.info
            thread = self.session.thread_name(info.host) if info.host is not None else "<torch thread>"
            details = {"cuda_stream": hex(stream.handle)}
            if info.alloc:
                details["allocation"] = True
            return Access(
                thread=thread,
                timeline=stream.label,
                mode=mode,
                op=info.op,
                locks_held=[],
                stack=render_site(info.site),
                details=details,
                origin=self.session.origin_of(None, info.host),  # the launching thread's start
            )
        name = self.session.thread_name(rec.timeline)
        launched_on = getattr(rec.info, "stream", None) if launch else None
        return Access(
            thread=name,
            timeline=launched_on.label if launched_on is not None else f"thread:{name}",
            mode=mode,
            op=rec.info.op,
            locks_held=[self.session.lock_name(lk) for lk in rec.info.locks],
            stack=render_site(rec.info.site),
            details={"cuda_stream": hex(launched_on.handle), "launch_order": True} if launched_on is not None else {},
            origin=self.session.origin_of(rec.info, rec.timeline),
        )

    def _report_race(self, race: Race) -> None:
        e, l = race.earlier, race.later
        reuse = None
        offset = 0
        launch = False
        storage = None
        if race.shadow is self.memory.shadow:
            eb, lb = e.info.block, l.info.block
            block = lb or eb
            offset = block.lo
            if eb is not None and lb is not None and eb is not lb:
                reuse = (eb, lb)
                old_desc, new_desc = describe_tensor(eb.meta), describe_tensor(lb.meta)
                resource = Resource(f"memory of {old_desc}, reused by {new_desc}", "tensor", old_desc)
            else:
                storage = block.meta.ref()
                if storage is not None:
                    resource = self.session.namer.name_storage(
                        storage, race.lo - block.lo, race.hi - block.lo, block.meta
                    )
                else:
                    desc = describe_tensor(block.meta)
                    resource = Resource(desc, "tensor", desc)
        else:
            storage = race.shadow.meta.ref()
            if storage is None:
                return
            launch = not (e.timeline in self.model.by_tid or l.timeline in self.model.by_tid)
            resource = self.session.namer.name_storage(storage, race.lo, race.hi, race.shadow.meta)
        benign = None
        if storage is not None and getattr(self.session, "benign_marks", None):
            benign = self.session._benign_reason(storage)
        pair = tuple(sorted([(user_key(e.info.site), e.is_write), (user_key(l.info.site), l.is_write)]))
        # A launch-order race and a stream race on the same two accesses are one finding.
        key = ("reuse" if reuse else "race", pair, benign)
        with self.session.lock:
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = {"resources": set(), "fingerprint": None}
            if resource.name in group["resources"]:
                return
            group["resources"].add(resource.name)
            first_time = group["fingerprint"] is None
            if first_time:
                group["fingerprint"] = "pending"
        if not first_time:
            fp = group["fingerprint"]
            if fp != "pending":
                self.session.emit({"type": "also_on", "fingerprint": fp, "resource": resource.name})
            return
        finding = self._finding(race, resource, reuse, offset, launch)
        if benign is not None:
            finding.suppressed = f"raceguard.benign: {benign}"
        group["fingerprint"] = finding.fingerprint
        room = getattr(self.session, "_room_for_report", None)
        if room is None or room():
            self.session.emit({"type": "finding", "finding": finding.to_dict()})

    def _finding(self, race: Race, resource: Resource, reuse: tuple | None, offset: int, launch: bool = False) -> Finding:
        first, second = self._access(race.earlier, launch), self._access(race.later, launch)

        def who(a: Access) -> str:
            if a.timeline.startswith("thread:"):
                return f"{a.mode} by '{a.thread}' on the host"
            return f"{a.mode} on {a.timeline} (launched by '{a.thread}')"

        kind_word = resource.kind.replace("-", " ")
        what = resource.name if resource.kind == "tensor" else f"{kind_word} {resource.name}"
        details: dict[str, Any] = {}
        if reuse is not None:
            old, new = reuse
            old_desc, new_desc = describe_tensor(old.meta), describe_tensor(new.meta)
            freed_at = first_user_location(old.freed_site) if old.freed_site else None
            message = (
                f"data race on reused CUDA memory: {old_desc} was freed"
                + (f" at {freed_at}" if freed_at else "")
                + f" while its {who(first)} was not ordered before the free, and the memory was "
                f"handed to {new_desc} ({who(second)})"
            )
            why = (
                f"the caching allocator reuses a freed block for the next allocation on "
                f"{second.timeline} without waiting for other streams; {first.timeline} used the "
                f"old tensor and nothing ordered that use before the reuse (no record_stream, "
                f"wait_stream, event wait or synchronize)"
            )
            hint = (
                f"call tensor.record_stream(<{first.timeline} stream>) on the tensor allocated at "
                f"{first_user_location(old.meta.site) or 'its allocation'} after using it there, or "
                f"make the allocating stream wait for that stream (wait_stream / event) before "
                f"freeing it"
            )
            details["reuse"] = {
                "freed_tensor": old_desc,
                "allocation_stack": [f.to_dict() for f in render_site(old.meta.site)],
                "freed_at": [f.to_dict() for f in render_site(old.freed_site)] if old.freed_site else [],
                "reused_by": new_desc,
                "reused_allocation_stack": [f.to_dict() for f in render_site(new.meta.site)],
                "record_stream": [s.label for s in old.users],
            }
        elif launch:
            message = f"data race on {what}: {who(first)} vs {who(second)}"
            why = _launch_why(first, second, race)
            hint = _launch_hint(first, second, resource)
        else:
            message = f"data race on {what}: {who(first)} vs {who(second)}"
            why = (
                f"'{second.timeline}' had seen '{first.timeline}' only up to its epoch "
                f"{race.seen_epoch}, but the {first.mode} happened in epoch {race.earlier.epoch}: "
                f"no wait_stream, event record/wait or synchronize orders the two accesses"
            )
            hint = _hint(first, second)
        details["why"] = why
        details["bytes"] = [race.lo - offset, race.hi - offset]
        fingerprint = compute_fingerprint("data-race", resource.root, [first, second])
        return Finding(
            kind="data-race",
            resource=resource.name,
            resource_kind=resource.kind,
            message=message,
            accesses=[first, second],
            fingerprint=fingerprint,
            hint=hint,
            details=details,
        )

    def stats(self) -> dict:
        return {
            "cuda_streams": len(self.model.streams),
            "cuda_launches": self.model.launches,
            "cuda_freed_blocks": self.memory.freed_blocks,
        }


def _launch_why(first: Access, second: Access, race: Race) -> str:
    """Why two kernels launched by unordered host threads race, even on one stream."""
    order = (
        f"'{second.thread}' had synchronised with '{first.thread}' only up to that thread's epoch "
        f"{race.seen_epoch}, and the {first.mode} was launched in epoch {race.earlier.epoch} (no lock, "
        f"join, event, queue, barrier or future in between)"
    )
    if first.timeline == second.timeline and not first.timeline.startswith("thread:"):
        return (
            f"both kernels ran on {first.timeline} in launch order, but nothing on the host fixed "
            f"that order: {order}, so in another run the other thread launches first"
        )
    return f"nothing on the host orders the two launches: {order}"


def _launch_hint(first: Access, second: Access, resource: Resource) -> str:
    from .session import _race_hint

    return _race_hint(first, second, resource) + (
        " (a CUDA stream orders kernels only in the order the host launched them)"
    )


def _hint(first: Access, second: Access) -> str:
    first_host = first.timeline.startswith("thread:")
    second_host = second.timeline.startswith("thread:")
    if second_host and not first_host:
        return (
            f"the {first.op or 'copy'} on {first.timeline} runs asynchronously: synchronise before "
            f"the host touches this memory (stream.synchronize(), event.synchronize() or "
            f"torch.cuda.synchronize()), or use a blocking copy"
        )
    if first_host and not second_host:
        return (
            f"order the host access before the launch on {second.timeline}: do it in the launching "
            f"thread before the launch, or hand over through a lock/queue/event the launcher waits on"
        )
    return (
        f"make {second.timeline} wait for {first.timeline} before it touches this memory: "
        f"<stream>.wait_stream(<other stream>) or an event recorded after the {first.mode} and "
        f"waited on with event.wait(<stream>)"
    )


def _cell_has_live(cell: Any) -> bool:
    recs = []
    if cell.write is not None:
        recs.append(cell.write)
    reads = cell.reads
    if reads is not None:
        recs.extend(reads.values() if type(reads) is dict else [reads])
    for r in recs:
        block = getattr(r.info, "block", None)
        if block is None or not block.freed:
            return True
    return False


def _non_blocking(kind: int, args: tuple, kwargs: dict) -> bool:
    if kind == _TOCOPY:
        return bool(kwargs.get("non_blocking", False))
    if len(args) > 2:
        return bool(args[2])
    return bool(kwargs.get("non_blocking", False))


def _arg_bases(args: tuple, kwargs: dict, is_device: Callable[[Any], bool]) -> set:
    """Base addresses of the CUDA storages of an op's tensor arguments (views included)."""
    out = set()

    def add(v: Any) -> None:
        if _tensorlike(v) and is_device(v):
            try:
                out.add(v.untyped_storage().data_ptr())
            except Exception:
                pass

    for v in list(args) + list(kwargs.values()):
        if isinstance(v, (list, tuple)):
            for x in v:
                add(x)
        else:
            add(v)
    return out


# -- installation --------------------------------------------------------------------------------------
_MISSING = object()


class _Patches:
    """Monkeypatches applied by one install(), undone exactly (never clobbering a later patch)."""

    def __init__(self) -> None:
        self.applied: list[tuple[Any, str, Any, Any]] = []

    def wrap(self, owner: Any, attr: str, make: Callable[[Callable], Callable]) -> None:
        current = getattr(owner, attr, None)
        if current is None:
            return
        original = owner.__dict__.get(attr, _MISSING) if hasattr(owner, "__dict__") else _MISSING
        wrapper = make(current)
        wrapper.__wrapped__ = current  # type: ignore[attr-defined]
        wrapper.__name__ = getattr(current, "__name__", attr)
        wrapper.__doc__ = getattr(current, "__doc__", None)
        setattr(owner, attr, wrapper)
        self.applied.append((owner, attr, original, wrapper))

    def undo(self) -> None:
        for owner, attr, original, wrapper in reversed(self.applied):
            if getattr(owner, "__dict__", {}).get(attr) is wrapper:
                if original is _MISSING:
                    delattr(owner, attr)
                else:
                    setattr(owner, attr, original)
        self.applied = []


def _api(method: Callable, after: Callable[..., None]) -> Callable:
    """A patched API: run ``method`` with the trace's sync callbacks muted, then tell the active
    tracker ``after(tracker, result, *args, **kwargs)``. Outside a session: the plain method."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tracker = _ACTIVE
        if tracker is None or not tracker.active or _in_api():
            return method(*args, **kwargs)
        sched = tracker.session.sched
        if sched is not None:
            # Under stress/replay a stream or event call is a scheduling point, like a tensor op:
            # which host thread records or waits first is what the schedule decides.
            try:
                sched.op_point()
            except Exception as exc:  # ScheduleAborted is a SystemExit: it passes
                _hook_failed(tracker.session, "a scheduling point before a CUDA API call", exc)
        _tls.depth = getattr(_tls, "depth", 0) + 1
        try:
            result = method(*args, **kwargs)
        finally:
            _tls.depth -= 1
        try:
            after(tracker, result, *args, **kwargs)
        except Exception as exc:  # the synchronisation is lost, the target's call stands
            _hook_failed(tracker.session, f"following {getattr(method, '__qualname__', method)}", exc, True)
        return result

    return wrapper


def _patch_apis(patches: _Patches, targets: dict) -> None:
    stream_cls = targets.get("Stream")
    event_cls = targets.get("Event")
    cuda_mod = targets.get("cuda")
    tensor_cls = targets.get("Tensor")
    if stream_cls is not None:
        patches.wrap(
            stream_cls, "wait_stream", lambda m: _api(m, lambda t, r, this, stream: t.api_wait_stream(this, stream))
        )
        patches.wrap(
            stream_cls, "wait_event", lambda m: _api(m, lambda t, r, this, event: t.api_event_wait(event, this))
        )
        patches.wrap(stream_cls, "synchronize", lambda m: _api(m, lambda t, r, this: t.api_stream_synchronize(this)))
        patches.wrap(
            stream_cls, "query", lambda m: _api(m, lambda t, r, this: t.api_stream_synchronize(this) if r else None)
        )
    if event_cls is not None:
        patches.wrap(
            event_cls,
            "record",
            lambda m: _api(m, lambda t, r, e, stream=None: t.api_event_record(e, stream)),
        )
        patches.wrap(
            event_cls, "wait", lambda m: _api(m, lambda t, r, e, stream=None: t.api_event_wait(e, stream))
        )
        patches.wrap(event_cls, "synchronize", lambda m: _api(m, lambda t, r, e: t.api_event_synchronize(e)))
        patches.wrap(event_cls, "query", lambda m: _api(m, lambda t, r, e: t.api_event_synchronize(e) if r else None))
    if cuda_mod is not None:
        patches.wrap(
            cuda_mod, "synchronize", lambda m: _api(m, lambda t, r, device=None: t.api_device_synchronize(device))
        )
        patches.wrap(cuda_mod, "empty_cache", lambda m: _api(m, lambda t, r: t.api_empty_cache()))
    if tensor_cls is not None:
        patches.wrap(
            tensor_cls, "record_stream", lambda m: _api(m, lambda t, r, this, stream: t.api_record_stream(this, stream))
        )


def _torch_targets() -> dict:
    import torch

    return {"Stream": torch.cuda.Stream, "Event": torch.cuda.Event, "cuda": torch.cuda, "Tensor": torch.Tensor}


class _Installed:
    __slots__ = ("tracker", "patches", "trace", "callbacks")

    def __init__(self, tracker: CudaTracker, patches: _Patches, trace: Any, callbacks: list) -> None:
        self.tracker = tracker
        self.patches = patches
        self.trace = trace
        self.callbacks = callbacks


_installed: _Installed | None = None


def install(
    session: Any,
    *,
    backend: Any = None,
    trace: Any = None,
    targets: dict | None = None,
    lazy: bool | None = None,
) -> CudaTracker | None:
    """Track CUDA streams for ``session``; returns the tracker, or None when there is no CUDA.

    With a torch built without CUDA this is a no-op: ``session.cuda`` stays None and
    :data:`LAST_NOTE` says why (one line, for a verbose log; nothing is printed, since a target
    that uses CUDA on such a machine fails on its own). Otherwise it registers the
    ``torch.cuda._gpu_trace`` callbacks, activates the trace and patches the Python APIs, and
    sets ``session.cuda`` only once CUDA is initialised (``torch.cuda._lazy_call``), so a run
    that never touches CUDA keeps the CPU-only hot path. Never initialises CUDA itself.

    ``backend``, ``trace``, ``targets`` and ``lazy=False`` replace torch for the simulated tests:
    a fake backend (current streams, pinned-ness), a module with the ``register_callback_for_*``
    functions of ``torch.cuda._gpu_trace``, and the classes to patch.
    """
    global LAST_NOTE
    try:
        return _install(session, backend, trace, targets, lazy)
    except Exception as exc:  # never let the CUDA hooks break a run: go on without them
        if _installed is not None and _installed.tracker.session is session:
            uninstall(session)
        session.cuda = None
        LAST_NOTE = f"CUDA streams not tracked: installing raceguard's CUDA hooks failed ({exc!r})"
        return None


SIMULATE_ENV = "RACEGUARD_SIMULATE_CUDA"


def install_tracking(session: Any) -> CudaTracker | None:
    """What every front end calls (``check``'s child, ``watch()``, each ``stress`` schedule):
    the real tracker, or with ``RACEGUARD_SIMULATE_CUDA`` set (not "0") the CUDA-on-CPU backend
    of :mod:`.cudasim` (CPU tensors as device memory, raceguard's own GPU tests)."""
    import os

    if os.environ.get(SIMULATE_ENV, "") not in ("", "0"):
        from . import cudasim

        return cudasim.install(session)
    return install(session)


def _install(session: Any, backend: Any, trace: Any, targets: dict | None, lazy: bool | None) -> CudaTracker | None:
    global _ACTIVE, _installed, LAST_NOTE
    if getattr(session, "cuda", None) is None:
        session.cuda = None
    simulated = backend is not None
    if not simulated:
        try:
            import torch
        except Exception:  # pragma: no cover - torch is a dependency
            LAST_NOTE = NOTE_NO_CUDA_BUILD
            return None
        if not torch.cuda._is_compiled():
            LAST_NOTE = NOTE_NO_CUDA_BUILD
            return None
        backend = TorchBackend()
    if _installed is not None:
        uninstall(_installed.tracker.session)
    tracker = CudaTracker(session, backend)
    if trace is None and not simulated:
        import torch.cuda._gpu_trace as trace  # noqa: F811
    # Registered first, so that a failure half-way is undone by uninstall().
    inst = _installed = _Installed(tracker, _Patches(), trace, [])
    if trace is not None:
        for register, registry, method in CudaTracker.CALLBACKS:
            fn = getattr(tracker, method)
            getattr(trace, register)(fn)
            inst.callbacks.append((registry, fn))
    if not simulated:
        import torch

        torch._C._activate_gpu_trace()
    _patch_apis(inst.patches, targets if targets is not None else ({} if simulated else _torch_targets()))
    _ACTIVE = tracker
    LAST_NOTE = NOTE_TRACKING
    if lazy is None:
        lazy = not simulated
    if lazy:
        import torch

        torch.cuda._lazy_call(_activate_if_current(tracker))
    else:
        tracker.activate()
    return tracker


def _activate_if_current(tracker: CudaTracker) -> Callable[[], None]:
    def activate() -> None:
        try:
            if _ACTIVE is tracker:
                tracker.activate()
        except Exception:
            pass  # a queued call that raises would fail torch.cuda's lazy init: never

    return activate


def uninstall(session: Any) -> None:
    """Undo :func:`install` for ``session``: patches, callbacks, ``session.cuda``. Idempotent.

    The trace itself stays activated (torch offers no way back); with no callback registered it
    costs a few Python calls per CUDA event.
    """
    global _ACTIVE, _installed
    inst = _installed
    if inst is None or inst.tracker.session is not session:
        if getattr(session, "cuda", None) is not None:
            session.cuda = None
        return
    inst.tracker.active = False
    session.cuda = None
    inst.patches.undo()
    for registry, fn in inst.callbacks:
        try:
            getattr(inst.trace, registry).callback_list.remove(fn)
        except Exception:
            pass
    _installed = None
    if _ACTIVE is inst.tracker:
        _ACTIVE = None


def describe(session: Any) -> str:
    """One line on the CUDA support of this run, for a verbose log or the text report footer."""
    tracker = getattr(session, "cuda", None)
    if tracker is None:
        if _installed is not None and _installed.tracker.session is session:
            return "CUDA streams not tracked: the target did not initialise CUDA"
        return LAST_NOTE or NOTE_NO_CUDA_BUILD
    s = tracker.stats()
    return f"CUDA streams tracked as timelines: {s['cuda_streams']} stream(s), {s['cuda_launches']} launches"
