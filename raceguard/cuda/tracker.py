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

from ..engine.hb import Race, ShadowStorage
from ..engine.streams import DEFAULT_STREAM, DeviceBlock, DeviceMemory, StreamModel, StreamTimeline
from ..capture.naming import StorageMeta, shape_of
from ..capture.stacks import current_site, op_site_function
from ..capture.torch_ops import byte_ranges
from .backend import TorchBackend, get_device, is_cuda, storage_is_cuda, target_device, tensorlike
from .patches import Patches, hook_failed, in_api, patch_apis, torch_targets
from .report import CudaReporter

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
                hook_failed(self.session, what, exc, ordering)

        return callback

    return wrap


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
        # host tid -> (info, stream, base addresses of the device inputs or None), before_op to after_op
        self._op_ctx: dict[int, tuple[Any, StreamTimeline, set | None]] = {}
        self._alloc_sites: dict[int, tuple] = {}  # base address -> site of the allocation callback
        self._handle_device: dict[int, int] = {}
        self.reporter = CudaReporter(self)
        # How the backend tells device tensors from host ones (the CPU simulation of
        # raceguard.cuda.sim calls every CPU tensor device memory).
        self._is_device = getattr(backend, "is_device", None) or is_cuda
        self._device_of = getattr(backend, "device_of", None) or get_device
        self._is_device_storage = getattr(backend, "is_device_storage", None) or storage_is_cuda
        self._track_lifetime = getattr(backend, "track_lifetime", None)
        # Device addresses: the storage's own pointer on a GPU; the simulation's allocator model.
        self._address = getattr(backend, "storage_address", None) or _data_ptr
        # The simulation decides which new storages are device memory (None on a GPU).
        self._claim_outputs = getattr(backend, "claim_outputs", None)

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
                device = self._target_device(kwargs.get("device"))  # host -> device
            if device is not None and non_blocking:
                async_host = self._async_host_tensor(kind, plan, args)
        if device is None:
            return accessed  # not a CUDA op
        races: list[Race] = []
        left = []
        host = state.tid
        # Base addresses of the op's device inputs, for after_op to tell fresh outputs from
        # in-place or out= results without walking the arguments again; only complete when no
        # argument is a view source that tensor_args leaves out.
        bases: set | None = None if plan.alias_inputs else set()
        with self.session.lock:
            stream = self._current(device)
            self.model.launch(host, stream)
            info.stream = stream
            for t, is_write in accessed:
                if is_device(t):
                    if plan.fresh_input:  # torch.tensor(..., device="cuda"): a fresh allocation
                        self._allocate(t, stream, host, info, races)
                        bases = None
                    else:
                        base = self._device_access(t, is_write, stream, host, info, races)
                        if bases is not None:
                            if base is None:  # no plain storage: let after_op look again
                                bases = None
                            else:
                                bases.add(base)
                    left.append((t, is_write))
                elif async_host is not None and t is async_host:
                    self._host_on_stream(t, is_write, stream, host, info, races)
                else:
                    left.append((t, is_write))
            self._op_ctx[host] = (info, stream, bases)
        if races:
            self.report_races(races)
        return left

    def after_op(self, state: Any, plan: Any, outs: list, args: tuple, kwargs: dict, info: Any) -> list:
        """Register the op's outputs and host synchronisation; return the outputs the host path
        keeps: all of them (device ones for the launch-order check), except the pinned result of a
        ``non_blocking`` device→host copy, which the stream writes."""
        host = state.tid
        ctx = self._op_ctx.pop(host, None)
        stream = bases = None
        if ctx is not None and ctx[0] is info:
            _, stream, bases = ctx
        if self._claim_outputs is not None:
            self._claim_outputs(outs, stream is not None)
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
            fresh = self._new_outputs(cuda_outs, args, kwargs, bases) if cuda_outs else ()
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
        if not (tensorlike(dst) and tensorlike(src)):
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
            if not tensorlike(src):
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
        if not (tensorlike(dst) and tensorlike(src)):
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
        base = self._address(st)
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

    def _device_access(
        self, t: Any, is_write: bool, stream: StreamTimeline, host: int, info: Any, races: list
    ) -> int | None:
        """Record ``t``'s bytes as accessed on ``stream``; return its storage's base address
        (None when it has no plain storage)."""
        try:
            st = t.untyped_storage()
        except Exception:  # sparse, nested: no plain storage to track
            return None
        base = self._address(st)
        nbytes = st.nbytes()
        if not base or nbytes <= 0:
            return base
        block = self._block(st, base, nbytes, t, info.site, host, stream)
        rec = self.hb.record(stream.tid, is_write, StreamOpInfo(info.site, info.op, host, block))
        if t.is_contiguous():  # one byte range, without building a list (as the host path does)
            es = t.element_size()
            lo = base + t.storage_offset() * es
            self.hb.access_range(self.memory.shadow, lo, lo + t.numel() * es, rec, races)
            return base
        ranges = [(base + lo, base + hi) for lo, hi in byte_ranges(t)]
        self.hb.access(self.memory.shadow, ranges, rec, races)
        return base

    def _new_outputs(self, cuda_outs: list, args: tuple, kwargs: dict, inputs: set | None = None) -> list:
        """The outputs in memory that no input had: fresh allocations. A view of an input, an
        in-place or ``out=`` result is recorded as an input. Known blocks are checked first, so
        the input addresses (``inputs`` when before_op collected them all) are collected only
        for an op that has a new output."""
        blocks = self.memory.blocks
        fresh = []
        for o in cuda_outs:
            try:
                st = o.untyped_storage()
            except Exception:
                continue
            base = self._address(st)
            block = blocks.get(base)
            if block is not None and block.meta.ref() is st:
                continue
            if inputs is None:
                inputs = _arg_bases(args, kwargs, self._is_device, self._address)
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
        if in_api():
            return
        host = self._host()
        with self.session.lock:
            self.model.record(host, int(event), self._stream_of_handle(stream))

    @_contained("following a CUDA event wait")
    def on_event_wait(self, event: int, stream: int) -> None:
        if in_api():
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
        if in_api():
            return
        host = self._host()
        if host is None:
            return
        with self.session.lock:
            self.model.sync_device(host, self.backend.current_device())

    @_contained("following a stream synchronisation")
    def on_stream_synchronization(self, stream: int) -> None:
        if in_api():
            return
        host = self._host()
        if host is None:
            return
        with self.session.lock:
            self.model.sync_stream(host, self._stream_of_handle(stream))

    @_contained("following an event synchronisation")
    def on_event_synchronization(self, event: int) -> None:
        if in_api():
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
        if not tensorlike(tensor) or not self._is_device(tensor):
            return
        host = self._host()
        with self.session.lock:
            s = self._stream_of(stream)
            st = tensor.untyped_storage()
            base, nbytes = self._address(st), st.nbytes()
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
                self.reporter.report(race)
            except Exception as exc:  # never let reporting break the target
                internal = getattr(self.session, "_internal_error", None)
                if internal is not None:
                    internal("naming a CUDA data race", exc)

    def _target_device(self, device: Any) -> int | None:
        choose = getattr(self.backend, "target_device", None)
        if choose is not None:
            return choose(device)
        return target_device(self.backend, device)

    def stats(self) -> dict:
        stats = {
            "cuda_streams": len(self.model.streams),
            "cuda_launches": self.model.launches,
            "cuda_freed_blocks": self.memory.freed_blocks,
        }
        backend_stats = getattr(self.backend, "stats", None)
        if backend_stats is not None:
            stats.update(backend_stats())
        return stats


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


def _data_ptr(st: Any) -> int:
    return st.data_ptr()


def _arg_bases(args: tuple, kwargs: dict, is_device: Callable[[Any], bool], address: Callable[[Any], int]) -> set:
    """Base addresses of the CUDA storages of an op's tensor arguments (views included)."""
    out = set()

    def add(v: Any) -> None:
        if tensorlike(v) and is_device(v):
            try:
                out.add(address(v.untyped_storage()))
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
class _Installed:
    __slots__ = ("tracker", "patches", "trace", "callbacks")

    def __init__(self, tracker: CudaTracker, patches: Patches, trace: Any, callbacks: list) -> None:
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
    inst = _installed = _Installed(tracker, Patches(), trace, [])
    if trace is not None:
        for register, registry, method in CudaTracker.CALLBACKS:
            fn = getattr(tracker, method)
            getattr(trace, register)(fn)
            inst.callbacks.append((registry, fn))
    if not simulated:
        import torch

        torch._C._activate_gpu_trace()
    patch_apis(
        inst.patches, targets if targets is not None else ({} if simulated else torch_targets()), lambda: _ACTIVE
    )
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
        except Exception as exc:  # a queued call that raises would fail torch.cuda's lazy init: never
            hook_failed(tracker.session, "starting to track CUDA streams", exc, True)

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
