"""CUDA streams and events as timelines of the happens-before engine. Pure Python, no torch.

A CUDA stream is one more timeline of :class:`~raceguard.engine.hb.HappensBefore`, next to the
host threads. Its vector clock stands for the work *enqueued* on it so far: a kernel runs after
everything enqueued before it on the same stream (program order of the timeline) and after
whatever the stream was made to wait for. The capture layer (``raceguard.cuda.tracker``) maps
torch's callbacks and Python APIs onto the operations below; every one of them is a
release/acquire pair on the engine, so host threads and streams share one model:

=====================================  ==========================================================
what happened                          edge
=====================================  ==========================================================
host ``h`` enqueues work on stream s   ``h → s`` (the launch: everything ``h`` did so far
                                       happens before the kernel; ``h`` starts a new epoch, so
                                       what it does next is *not* before the kernel)
``event.record(s)``                    launch, then the event's clock := ``s``'s clock (a
                                       re-record *replaces* the clock: a wait sees the latest
                                       record only, as in CUDA)
``event.wait(s)``                      launch, then ``s`` acquires the event's clock
``a.wait_stream(b)``                   ``record`` of a fresh event on ``b``, ``wait`` on ``a``
``stream.synchronize()`` / a blocking  ``s → h``: the host acquires everything enqueued on ``s``
copy / ``.item()`` / ``.tolist()``     (and ``s`` starts a new epoch)
``event.synchronize()``                ``h`` acquires the event's clock
``torch.cuda.synchronize(device)``     ``s → h`` for every stream of the device
=====================================  ==========================================================

Only the host thread that synchronised learns anything: other threads, and other streams, are
ordered after the synchronisation only through their own edges with that thread (CSAN, which
has no host threads, lets every stream wait for a device synchronisation instead).

Device memory is one address space (CUDA's unified virtual addressing), so :class:`DeviceMemory`
keeps a single shadow over absolute addresses. It survives ``free`` and re-allocation on
purpose: when the caching allocator hands a freed block to a new tensor, the new tensor's first
write (its allocation, on the allocating stream) is checked against the last accesses of the
old tensor, from every stream. An access on another stream that is not ordered before the
re-allocation is a data race on the reused memory, the bug ``Tensor.record_stream`` exists for.
``record_stream(s)`` makes the allocator record an event on ``s`` when the block is freed and
hand the block out again only after that event completed (the host polls it), so a free with
recorded streams releases their clocks into a variable the re-allocating host thread acquires.

Not thread-safe: callers hold the same lock as for :class:`HappensBefore` (the session lock).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Any, Iterable

from .hb import HappensBefore, ShadowStorage, SyncVar, TimelineId, _join_into, _only_timeline

DEFAULT_STREAM = 0  # the handle of the legacy default stream (cudaStreamLegacy / NULL)


class StreamTimeline:
    """One CUDA stream: its timeline id and the name reports use (``cuda:0/stream 1``)."""

    __slots__ = ("tid", "device", "handle", "index", "label", "__weakref__")

    def __init__(self, tid: TimelineId, device: int, handle: int, index: int) -> None:
        self.tid = tid
        self.device = device
        self.handle = handle
        self.index = index  # 0 for the default stream, then 1, 2, ... in order of first use
        self.label = f"cuda:{device}/stream {index}"

    @property
    def is_default(self) -> bool:
        return self.handle == DEFAULT_STREAM

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"<StreamTimeline {self.label} t{self.tid} handle={self.handle:#x}>"


class StreamModel:
    """Stream timelines, event clocks and the edges between them and host timelines."""

    def __init__(self, hb: HappensBefore) -> None:
        self.hb = hb
        self.streams: dict[tuple[int, int], StreamTimeline] = {}
        self.by_tid: dict[TimelineId, StreamTimeline] = {}
        # Event handle -> the clock of its latest record (None until recorded).
        self.events: dict[int, SyncVar] = {}
        self._next_index: dict[int, int] = {}
        self.launches = 0

    # -- streams ---------------------------------------------------------------------------
    def stream(self, device: int, handle: int) -> StreamTimeline:
        """The timeline of stream ``handle`` on ``device``, created on first use."""
        key = (device, handle)
        s = self.streams.get(key)
        if s is None:
            if handle == DEFAULT_STREAM:
                index = 0
            else:
                index = self._next_index.get(device, 1)
                self._next_index[device] = index + 1
            s = StreamTimeline(self.hb.new_timeline(None), device, handle, index)
            self.streams[key] = s
            self.by_tid[s.tid] = s
        return s

    def streams_of(self, device: int | None) -> list[StreamTimeline]:
        return [s for s in self.streams.values() if device is None or s.device == device]

    def is_stream(self, tid: TimelineId) -> bool:
        return tid in self.by_tid

    # -- edges -----------------------------------------------------------------------------
    def _flow(self, src: TimelineId | None, dst: TimelineId | None) -> None:
        """Everything ``src`` did so far happens before what ``dst`` does from now on. A side
        that is None (a thread nobody watches, e.g. torch's own C++ threads) carries nothing."""
        if src is None or dst is None:
            return
        # release(src) then acquire(dst) through a scratch variable, without copying the clock.
        hb = self.hb
        _join_into(hb.clock(dst), hb.clock(src))
        hb._tick(src)

    def launch(self, host: TimelineId, stream: StreamTimeline) -> None:
        """``host`` enqueues work on ``stream``."""
        self.launches += 1
        self._flow(host, stream.tid)

    def event(self, handle: int) -> SyncVar:
        var = self.events.get(handle)
        if var is None:
            var = self.events[handle] = SyncVar()
        return var

    def event_created(self, handle: int) -> None:
        self.events[handle] = SyncVar()

    def event_deleted(self, handle: int) -> None:
        self.events.pop(handle, None)

    def record(self, host: TimelineId, handle: int, stream: StreamTimeline) -> None:
        """``event.record(stream)``: the event now stands for everything enqueued on ``stream``."""
        self.launch(host, stream)
        var = self.event(handle)
        var.clock = None  # a re-record replaces what the event stood for
        self.hb.release(stream.tid, var)

    def wait(self, host: TimelineId, handle: int, stream: StreamTimeline) -> None:
        """``event.wait(stream)`` / ``stream.wait_event(event)``."""
        self.launch(host, stream)
        var = self.events.get(handle)
        if var is not None:  # waiting on a never-recorded event is a no-op in CUDA
            self.hb.acquire(stream.tid, var)

    def wait_stream(self, host: TimelineId, waiting: StreamTimeline, waited: StreamTimeline) -> None:
        """``waiting.wait_stream(waited)``: record a fresh event on ``waited``, wait on ``waiting``."""
        if waiting is waited:
            return
        self.launch(host, waited)
        var = SyncVar()
        self.hb.release(waited.tid, var)
        self.launch(host, waiting)
        self.hb.acquire(waiting.tid, var)

    def sync_stream(self, host: TimelineId, stream: StreamTimeline) -> None:
        """The host waited for everything enqueued on ``stream`` (or observed it done)."""
        self._flow(stream.tid, host)

    def sync_event(self, host: TimelineId, handle: int) -> None:
        var = self.events.get(handle)
        if var is not None:
            self.hb.acquire(host, var)

    def sync_device(self, host: TimelineId, device: int | None) -> None:
        """``torch.cuda.synchronize(device)``; ``device=None``: every device."""
        for s in self.streams_of(device):
            self._flow(s.tid, host)

    def snapshot(self, streams: Iterable[StreamTimeline], host: TimelineId | None = None) -> SyncVar:
        """A variable holding the joined clocks of ``streams`` now (each after a launch from
        ``host`` when given: an event record the host enqueues on each)."""
        var = SyncVar()
        for s in streams:
            if host is not None:
                self.launch(host, s)
            self.hb.release(s.tid, var)
        return var


class DeviceBlock:
    """One allocation of device memory (one generation of an address range).

    ``meta`` is owned by the capture layer (what the tensor was, where it was allocated);
    ``stream`` is the stream it was allocated on; ``users`` the streams that were named with
    ``record_stream``.
    """

    __slots__ = ("lo", "hi", "meta", "stream", "users", "host", "freed", "freed_site", "__weakref__")

    def __init__(self, lo: int, hi: int, meta: Any, stream: StreamTimeline | None, host: TimelineId | None) -> None:
        self.lo = lo
        self.hi = hi
        self.meta = meta
        self.stream = stream
        self.users: list[StreamTimeline] = []
        self.host = host
        self.freed = False
        self.freed_site: Any = None

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"<DeviceBlock [{self.lo:#x}, {self.hi:#x}) freed={self.freed}>"


class DeviceMemory:
    """Shadow memory of the device address space, live blocks, and frees still being waited on."""

    # Frees with record_stream whose memory was not handed out again yet; the oldest are
    # forgotten beyond this many (forgetting one can only add a report, never hide one).
    MAX_PENDING_FREES = 4096

    def __init__(self, model: StreamModel) -> None:
        self.model = model
        self.shadow = ShadowStorage(meta="cuda device memory")
        self.blocks: dict[int, DeviceBlock] = {}  # base address -> live block
        self.pending_frees: list[tuple[int, int, SyncVar]] = []
        self.freed_blocks = 0
        self._empty_cells = 0  # cells emptied by frees since the last compaction

    def add_user(self, block: DeviceBlock, stream: StreamTimeline) -> None:
        """``tensor.record_stream(stream)``."""
        if stream is not block.stream and stream not in block.users:
            block.users.append(stream)

    def free(self, block: DeviceBlock, host: TimelineId | None, site: Any = None) -> None:
        """The block went back to the allocator (the host freed the tensor)."""
        if block.freed:
            return
        block.freed = True
        block.freed_site = site
        self.freed_blocks += 1
        if self.blocks.get(block.lo) is block:
            del self.blocks[block.lo]
        if block.users:
            var = self.model.snapshot(block.users, host)
            self.pending_frees.append((block.lo, block.hi, var))
            if len(self.pending_frees) > self.MAX_PENDING_FREES:
                del self.pending_frees[0]
        elif block.stream is not None:
            self._forget_own_accesses(block)

    def _forget_own_accesses(self, block: DeviceBlock) -> None:
        """Forget the accesses of a freed block that only its own stream made. The caching
        allocator hands a freed block out again only on the stream it was allocated on (its
        pool), whose order follows those accesses: they can never race with the next user, and
        keeping them would grow the shadow (and the garbage collector's work) with every
        allocation. Accesses by other streams stay: they are what a missing record_stream
        races with. The cells are emptied in place (a later allocation at the same address,
        the usual case, finds its intervals ready) and compacted away once they are half of all."""
        sh = self.shadow
        starts, ends, cells = sh.starts, sh.ends, sh.cells
        lo, hi, own = block.lo, block.hi, block.stream.tid
        i = bisect_right(ends, lo)  # the first interval ending after lo
        j = bisect_left(starts, hi, i)  # the first interval starting at or after hi
        for k in range(i, j):
            cell = cells[k]
            if lo <= starts[k] and ends[k] <= hi and (cell.write is not None or cell.reads is not None):
                if _only_timeline(cell, own):
                    cell.write = cell.reads = None
                    self._empty_cells += 1
        if self._empty_cells > max(1024, len(cells) // 2):
            keep = [k for k, c in enumerate(cells) if c.write is not None or c.reads is not None]
            sh.starts = [starts[k] for k in keep]
            sh.ends = [ends[k] for k in keep]
            sh.cells = [cells[k] for k in keep]
            self._empty_cells = 0

    def reallocated(self, lo: int, hi: int, host: TimelineId) -> None:
        """``[lo, hi)`` is handed to a new tensor by ``host``'s allocation: the allocator saw the
        record_stream events of earlier frees of that memory complete, so ``host`` acquires them."""
        if not self.pending_frees:
            return
        keep = []
        for flo, fhi, var in self.pending_frees:
            if flo < hi and lo < fhi:
                self.model.hb.acquire(host, var)
                if lo <= flo and fhi <= hi:
                    continue  # entirely handed out again: nothing more to wait for
            keep.append((flo, fhi, var))
        self.pending_frees = keep
