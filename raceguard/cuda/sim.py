"""CUDA on the CPU: the CUDA tracker fed by real tensor ops, with CPU memory as device memory.

CI has no GPU, and a tracker only ever driven by hand-made events breaks on the first real op
(``x * 2`` passes a Python ``int`` where the schema says ``Tensor``). This backend runs the
*real* op stream of a CPU program through :class:`raceguard.cuda.tracker.CudaTracker`:

* every CPU tensor is device memory of a simulated ``cuda:0`` (``is_device``), so every op is a
  kernel launch on the calling thread's current stream, recorded on that stream's timeline and,
  for launch order, on the host;
* the current stream is per thread, the default stream (handle 0) unless the thread entered
  :func:`stream`; :class:`Stream` and :class:`Event` behave like ``torch.cuda.Stream`` /
  ``torch.cuda.Event`` as far as raceguard can see (they fire the same
  ``torch.cuda._gpu_trace`` callbacks torch's C++ side fires on a GPU, and raceguard patches
  their methods exactly as it patches torch's);
* the allocator's callbacks come from real tensor lifetimes: a free fires the deallocation
  callback when the storage dies (from whatever stack the garbage collector runs on), and the
  CPU allocator reuses addresses much like the caching allocator does.

``RACEGUARD_SIMULATE_CUDA=1`` in the environment makes every session (``raceguard check``,
``watch()``, the pytest plugin) install this backend instead of the real one, so the CPU fixture
suite runs as if every tensor lived on one GPU with all threads on the default stream. It is a
test of raceguard, not of the target: the target computes exactly as without it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import weakref
from typing import Any, Iterator

import torch
import torch.cuda._gpu_trace as gpu_trace

from . import tracker as cuda


_local = threading.local()  # .handle: the calling thread's current stream (0: default)
_stream_handles = itertools.count(0x5000, 16)
_event_handles = itertools.count(0x9000, 16)
_streams: dict[int, "Stream"] = {}


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "") not in ("", "0")


class Stream:
    """A simulated ``torch.cuda.Stream`` on ``cuda:0``."""

    def __init__(self, device: Any = None, priority: int = 0, *, handle: int | None = None) -> None:
        self.device_index = 0
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

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stream) and other.cuda_stream == self.cuda_stream

    def __hash__(self) -> int:
        return hash(("sim-stream", self.cuda_stream))

    def __repr__(self) -> str:
        return f"<simulated cuda stream {self.cuda_stream:#x}>"


DEFAULT_STREAM = Stream(handle=0)


class Event:
    """A simulated ``torch.cuda.Event``: created lazily at its first record, as in torch."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        self.cuda_event = 0

    def record(self, stream: Stream | None = None) -> None:
        stream = stream or current_stream()
        if not self.cuda_event:
            self.cuda_event = next(_event_handles)
            gpu_trace.EventCreationCallbacks.fire_callbacks(self.cuda_event)
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


def current_stream(device: Any = None) -> Stream:
    return _streams.get(getattr(_local, "handle", 0), DEFAULT_STREAM)


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
        pass


simulated_cuda = _Cuda()
_pinned: set[int] = set()  # _cdata of storages that play pinned host memory


def pin(t: torch.Tensor) -> torch.Tensor:
    """Make ``t`` play pinned *host* memory (the only host memory of the simulation)."""
    _pinned.add(t.untyped_storage()._cdata)
    return t


class SimBackend:
    """What :class:`~raceguard.cuda.tracker.CudaTracker` asks torch, answered for the simulation."""

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
        return bool(_pinned) and t.untyped_storage()._cdata in _pinned

    def is_device(self, t: Any) -> bool:
        if not t.is_cpu:
            return False
        return not _pinned or t.untyped_storage()._cdata not in _pinned

    def device_of(self, t: Any) -> int:
        return 0

    def is_device_storage(self, st: Any) -> bool:
        return st.device.type == "cpu" and st._cdata not in _pinned

    def track_lifetime(self, st: Any, block: Any, blocks: dict) -> None:
        """Fire the deallocation callback when the storage dies, as the caching allocator does
        when the last tensor of a block goes (unless the block was already replaced)."""
        weakref.finalize(st, _free, block.lo, weakref.ref(block), blocks)


def _free(address: int, block_ref: Any, blocks: dict) -> None:
    block = block_ref()
    if block is not None and blocks.get(address) is block:
        gpu_trace.MemoryDeallocationCallbacks.fire_callbacks(address)


def install(session: Any) -> Any:
    """Track ``session``'s CPU tensors as device memory on simulated streams."""
    # torch.Tensor.record_stream is left alone: a CPU target never calls it with these streams.
    targets = {"Stream": Stream, "Event": Event, "cuda": simulated_cuda}
    return cuda.install(session, backend=SimBackend(), trace=gpu_trace, targets=targets, lazy=False)
