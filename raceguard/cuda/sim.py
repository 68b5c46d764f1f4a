"""CUDA on the CPU: the CUDA tracker fed by real tensor ops, with CPU memory as device memory.

CI has no GPU, and a tracker only ever driven by hand-made events breaks on the first real op
(``x * 2`` passes a Python ``int`` where the schema says ``Tensor``). This backend runs the
*real* op stream of a program through :class:`raceguard.cuda.tracker.CudaTracker`:

* device memory of a simulated ``cuda:0`` is CPU memory. Which storages are device memory
  depends on the mode: with ``RACEGUARD_SIMULATE_CUDA=1`` (raceguard's own tests) every CPU
  tensor that is not pinned is (:class:`SimBackend` with ``every_cpu_tensor``); under
  ``--simulate-cuda`` (:mod:`.program`) only the storages the program created on ``cuda``;
* every op on device memory is a kernel launch on the calling thread's current stream, recorded
  on that stream's timeline and, for launch order, on the host;
* the current stream is per thread, the default stream (handle 0) unless the thread entered
  :func:`stream`; :class:`Stream` and :class:`Event` behave like ``torch.cuda.Stream`` /
  ``torch.cuda.Event`` as far as raceguard can see (they fire the same
  ``torch.cuda._gpu_trace`` callbacks torch's C++ side fires on a GPU, and raceguard patches
  their methods exactly as it patches torch's);
* device addresses come from :class:`SimAllocator`, which hands blocks out as the caching
  allocator does (per-stream pools: a freed block is reused by the next allocation of its size
  on the stream it was allocated on); a storage's death fires the deallocation callback, from
  whatever stack the garbage collector runs on.

The target computes exactly as without the simulation: its tensors are ordinary CPU tensors.
"""

from __future__ import annotations

import contextlib
import _thread
import itertools
import threading
import time
import weakref
from typing import Any, Iterator

import torch
import torch.cuda._gpu_trace as gpu_trace

from . import tracker as cuda


# Per thread: .handle, the current stream (0: default); .target, set by the --simulate-cuda
# function mode around one call: what that call's new storages are (CUDA, HOST or PINNED).
_local = threading.local()
_stream_handles = itertools.count(0x5000, 16)
_event_handles = itertools.count(0x9000, 16)
_streams: dict[int, "Stream"] = {}
CUDA, HOST, PINNED = "cuda", "host", "pinned"


class Stream:
    """A simulated ``torch.cuda.Stream`` on ``cuda:0``."""

    def __init__(self, device: Any = None, priority: int = 0, *, handle: int | None = None, **_: Any) -> None:
        self.device_index = 0
        self.device = torch.device("cuda", 0)
        self.priority = priority
        if handle is None:
            handle = next(_stream_handles)
            gpu_trace.StreamCreationCallbacks.fire_callbacks(handle)
        self.cuda_stream = handle
        _streams[handle] = self

    def wait_event(self, event: "Event") -> None:
        event.wait(self)

    def wait_stream(self, stream: "Stream") -> None:
        self.wait_event(stream.record_event())

    def record_event(self, event: "Event | None" = None) -> "Event":
        event = event or Event()
        event.record(self)
        return event

    def synchronize(self) -> None:
        gpu_trace.StreamSynchronizationCallbacks.fire_callbacks(self.cuda_stream)

    def query(self) -> bool:
        return True  # the CPU ran every "kernel" at its launch

    def is_capturing(self) -> bool:
        return False  # no CUDA graphs on the simulated device

    def __enter__(self) -> "Stream":
        # ``with torch.cuda.Stream():`` is ``with torch.cuda.stream(s):`` in torch
        entered = stream(self)
        entered.__enter__()
        self.__dict__.setdefault("_entered", []).append(entered)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.__dict__["_entered"].pop().__exit__(*exc)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stream) and other.cuda_stream == self.cuda_stream

    def __hash__(self) -> int:
        return hash(("sim-stream", self.cuda_stream))

    def __repr__(self) -> str:
        return f"<torch.cuda.Stream device=cuda:0 cuda_stream={self.cuda_stream:#x} (simulated)>"


DEFAULT_STREAM = Stream(handle=0)


class Event:
    """A simulated ``torch.cuda.Event``: created lazily at its first record, as in torch.
    ``elapsed_time`` is the host time between the two records (every kernel ran at its launch)."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        self.cuda_event = 0
        self._recorded_at: float | None = None

    def record(self, stream: Stream | None = None) -> None:
        stream = stream or current_stream()
        if not self.cuda_event:
            self.cuda_event = next(_event_handles)
            gpu_trace.EventCreationCallbacks.fire_callbacks(self.cuda_event)
        self._recorded_at = time.perf_counter()
        gpu_trace.EventRecordCallbacks.fire_callbacks(self.cuda_event, stream.cuda_stream)

    def wait(self, stream: Stream | None = None) -> None:
        stream = stream or current_stream()
        if self.cuda_event:
            gpu_trace.EventWaitCallbacks.fire_callbacks(self.cuda_event, stream.cuda_stream)

    def synchronize(self) -> None:
        if self.cuda_event:
            gpu_trace.EventSynchronizationCallbacks.fire_callbacks(self.cuda_event)

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: "Event") -> float:
        if self._recorded_at is None or end_event._recorded_at is None:
            raise RuntimeError("Both events must be recorded before calculating elapsed time.")
        return (end_event._recorded_at - self._recorded_at) * 1000.0


def current_stream(device: Any = None) -> Stream:
    return _streams.get(getattr(_local, "handle", 0), DEFAULT_STREAM)


def default_stream(device: Any = None) -> Stream:
    return DEFAULT_STREAM


@contextlib.contextmanager
def stream(s: Stream | None) -> Iterator[Stream | None]:
    """``torch.cuda.stream(s)``: ``s`` is the calling thread's current stream inside."""
    if s is None:
        yield None
        return
    before = getattr(_local, "handle", 0)
    _local.handle = s.cuda_stream
    try:
        yield s
    finally:
        _local.handle = before


class _Cuda:
    """The functions of ``torch.cuda`` raceguard patches (``synchronize``, ``empty_cache``)."""

    Stream = Stream
    Event = Event
    current_stream = staticmethod(current_stream)
    stream = staticmethod(stream)

    @staticmethod
    def synchronize(device: Any = None) -> None:
        gpu_trace.DeviceSynchronizationCallbacks.fire_callbacks()

    @staticmethod
    def empty_cache() -> None:
        ALLOCATOR.empty_cache()


class _TensorApi:
    """``Tensor.record_stream`` for simulated device tensors: nothing to do on the CPU; the
    tracker's patch of this function (as of torch's) records the user stream."""

    @staticmethod
    def record_stream(tensor: Any, stream: Any) -> None:
        pass


simulated_cuda = _Cuda()


def record_stream(tensor: Any, s: Stream) -> None:
    """``tensor.record_stream(s)`` for the simulated device (a CPU tensor's own method refuses
    the simulated streams)."""
    _TensorApi.record_stream(tensor, s)

_pinned: set[int] = set()  # _cdata of storages that play pinned host memory


def pin(t: torch.Tensor) -> torch.Tensor:
    """Make ``t`` play pinned *host* memory (the only host memory of the every-tensor mode)."""
    st = t.untyped_storage()
    cd = st._cdata
    if cd not in _pinned:
        _pinned.add(cd)
        weakref.finalize(st, _pinned.discard, cd)
    return t


def is_pinned(t: Any) -> bool:
    return bool(_pinned) and t.untyped_storage()._cdata in _pinned


class SimAllocator:
    """Device addresses for the simulated device's storages, handed out as PyTorch's caching
    allocator does: sizes rounded up to 512 bytes; a freed block goes back to the pool of the
    stream it was *allocated* on and is handed to that stream's next allocation of its size
    (most recently freed first); only a fresh block gets a new address. ``record_stream`` does
    not hold the block back here: the tracker orders the reuse after the recorded streams, which
    is what the allocator's wait for their events amounts to. Frees fire the deallocation
    callback of ``torch.cuda._gpu_trace``, as the caching allocator's free does."""

    ROUND = 512
    FIRST_ADDRESS = 0x7F00_0000_0000

    def __init__(self) -> None:
        self._lock = _thread.RLock()  # a free can come from the garbage collector, in any thread
        self.live: dict[int, tuple[int, int, int]] = {}  # storage _cdata -> (address, size, stream)
        self.pools: dict[tuple[int, int], list[int]] = {}  # (stream, size) -> freed addresses
        self._next = self.FIRST_ADDRESS
        self.allocated = 0  # bytes in live blocks
        self.peak = 0
        self.reused = 0  # allocations served from a stream's pool

    def address(self, st: Any) -> int:
        """The device address of storage ``st``, allocated on the calling thread's current
        stream when the storage is new."""
        entry = self.live.get(st._cdata)
        if entry is not None:
            return entry[0]
        return self.allocate(st, getattr(_local, "handle", 0))

    def allocate(self, st: Any, stream_handle: int) -> int:
        cd = st._cdata
        size = -(-max(st.nbytes(), 1) // self.ROUND) * self.ROUND
        with self._lock:
            entry = self.live.get(cd)
            if entry is not None:
                return entry[0]
            pool = self.pools.get((stream_handle, size))
            if pool:
                address = pool.pop()
                self.reused += 1
            else:
                address = self._next
                self._next += size
            self.live[cd] = (address, size, stream_handle)
            self.allocated += size
            self.peak = max(self.peak, self.allocated)
        weakref.finalize(st, self._free, cd)
        return address

    def _free(self, cd: int) -> None:
        with self._lock:
            entry = self.live.pop(cd, None)
            if entry is None:
                return
            address, size, stream_handle = entry
            self.pools.setdefault((stream_handle, size), []).append(address)
            self.allocated -= size
        gpu_trace.MemoryDeallocationCallbacks.fire_callbacks(address)

    def reserved(self) -> int:
        with self._lock:
            return self.allocated + sum(size * len(p) for (_, size), p in self.pools.items())

    def empty_cache(self) -> None:
        """``torch.cuda.empty_cache()``: the pools go back to the driver; their addresses are
        never handed out again (a fresh block gets a new one)."""
        with self._lock:
            self.pools.clear()


ALLOCATOR = SimAllocator()


class SimBackend:
    """What :class:`~raceguard.cuda.tracker.CudaTracker` asks torch, answered for the simulation.

    ``every_cpu_tensor``: every CPU storage that is not pinned is device memory (raceguard's own
    tests run CPU programs as if all their tensors lived on a GPU); otherwise only the storages
    :meth:`claim_outputs` made device memory (``--simulate-cuda``: the program's own CUDA
    tensors)."""

    def __init__(self, every_cpu_tensor: bool = True) -> None:
        self.every_cpu_tensor = every_cpu_tensor
        self.notes: dict[str, str] = {}  # fidelity notes of the run, filled by .program
        if not every_cpu_tensor:
            self.is_device = self._is_claimed  # type: ignore[method-assign]
            self.is_device_storage = self._is_claimed_storage  # type: ignore[method-assign]

    @staticmethod
    def _is_claimed(t: Any, live: dict = ALLOCATOR.live) -> bool:
        try:
            return t.untyped_storage()._cdata in live
        except Exception:  # sparse, nested: no plain storage, never device memory here
            return False

    @staticmethod
    def _is_claimed_storage(st: Any, live: dict = ALLOCATOR.live) -> bool:
        return st._cdata in live

    def current_stream(self, device: int) -> tuple[int, int]:
        return 0, getattr(_local, "handle", 0)

    def current_device(self) -> int:
        return 0

    def stream_key(self, stream: Any) -> tuple[int, int]:
        if stream is None:
            return self.current_stream(0)
        return 0, int(stream.cuda_stream)

    def event_handle(self, event: Any) -> int:
        return int(getattr(event, "cuda_event", 0) or 0)

    def device_index(self, device: Any) -> int | None:
        return 0

    def is_pinned(self, t: Any) -> bool:
        return is_pinned(t)

    def is_device(self, t: Any) -> bool:
        if not t.is_cpu:
            return False
        return not _pinned or t.untyped_storage()._cdata not in _pinned

    def device_of(self, t: Any) -> int:
        return 0

    def is_device_storage(self, st: Any) -> bool:
        return st.device.type == "cpu" and st._cdata not in _pinned

    def storage_address(self, st: Any) -> int:
        return ALLOCATOR.address(st)

    def target_device(self, device: Any) -> int | None:
        """The device a ``_to_copy`` writes to: set by the function mode (the op's own
        ``device`` argument says cpu)."""
        return 0 if getattr(_local, "target", None) == CUDA else None

    def claim_outputs(self, outs: list, device_inputs: bool) -> None:
        """The new storages among an op's outputs are device memory when the op read device
        memory or its call asked for ``cuda`` (and pinned host memory when it asked for that)."""
        if self.every_cpu_tensor:
            return
        target = getattr(_local, "target", None)
        if target == PINNED:
            for o in outs:
                pin(o)
            return
        if target == HOST or not (device_inputs or target == CUDA):
            return
        live = ALLOCATOR.live
        for o in outs:
            try:
                st = o.untyped_storage()
            except Exception:  # sparse, nested: no plain storage
                continue
            if st._cdata not in live and st._cdata not in _pinned:
                ALLOCATOR.allocate(st, getattr(_local, "handle", 0))

    def stats(self) -> dict:
        if self.every_cpu_tensor:
            return {}
        out: dict[str, Any] = {"simulated_cuda": True}
        if self.notes:
            out["simulation_notes"] = list(self.notes.values())
        return out


def install(session: Any, every_cpu_tensor: bool = True) -> Any:
    """Track ``session``'s simulated device memory on simulated streams."""
    targets = {"Stream": Stream, "Event": Event, "cuda": simulated_cuda, "Tensor": _TensorApi}
    return cuda.install(
        session, backend=SimBackend(every_cpu_tensor), trace=gpu_trace, targets=targets, lazy=False
    )
