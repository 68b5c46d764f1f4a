"""Asynchronous collectives as timelines of the happens-before engine. Pure Python, no torch.

A collective or point-to-point op launched with ``async_op=True`` reads and writes its tensors
in the background, from the launch until some host thread learns that it completed. Each such
op runs on a *lane*: a timeline of :class:`~raceguard.engine.hb.HappensBefore`, like a CUDA
stream in :mod:`.streams`. The capture layer (``raceguard.distributed.tracker``) records the
op's tensor accesses on the lane, so a host access before the wait is unordered with them:

=====================================  ==========================================================
what happened                          edge
=====================================  ==========================================================
host ``h`` launches op ``o`` on lane l  ``h → l`` (everything ``h`` did so far happens before the
                                       op; ``h`` starts a new epoch, so its next access is *not*)
op's accesses recorded on ``l``         then ``l → o.var`` (the op's completion clock)
``work.wait()``, ``is_completed()``    ``o.var → h'`` for the thread ``h'`` that learnt it;
is True, a future of the op waited     the lane is free for the next op
``dist.barrier(group)``                ``o.var → h`` for every op of the group still pending
=====================================  ==========================================================

Lanes: a process group runs its ops in the background on its own threads (gloo, several) or one
communicator stream per device (NCCL). An op waited on says nothing about an op of the same group
launched before it and not waited on, so ops pending at the same time run on different lanes; a
lane is reused only after its op was waited on, when that op has really finished, so program
order on the lane is true. On GPU, NCCL's lane is its communicator stream (see docs/distributed.md).

Not thread-safe: callers hold the session lock, as for :class:`HappensBefore`.
"""

from __future__ import annotations

from typing import Any

from .hb import HappensBefore, SyncVar, TimelineId


class Lane:
    """One background timeline of a process group."""

    __slots__ = ("tid", "group", "index", "label", "busy")

    def __init__(self, tid: TimelineId, group: str, index: int) -> None:
        self.tid = tid
        self.group = group
        self.index = index
        # "collective:default" for the first lane of a group, then "collective:default#2", ...
        self.label = f"collective:{group}" + (f"#{index + 1}" if index else "")
        self.busy: "Pending | None" = None


class Pending:
    """One launched op: its lane, the clock of its completion, what it was (for reports)."""

    __slots__ = ("lane", "var", "op", "covers", "done")

    def __init__(self, lane: Lane | None, op: Any) -> None:
        self.lane = lane
        self.var = SyncVar()
        self.op = op  # opaque for the engine: the capture layer's description of the launch
        # An asynchronous barrier completes only after every op pending on its group at launch.
        self.covers: list[Pending] = []
        self.done = False


class CollectiveModel:
    def __init__(self, hb: HappensBefore) -> None:
        self.hb = hb
        self.lanes: dict[str, list[Lane]] = {}
        self.by_tid: dict[TimelineId, Lane] = {}
        self.pending: dict[str, list[Pending]] = {}
        self._scratch = SyncVar()
        self.launches = 0

    def is_lane(self, tid: TimelineId) -> bool:
        return tid in self.by_tid

    def _free_lane(self, group: str) -> Lane:
        lanes = self.lanes.setdefault(group, [])
        for lane in lanes:
            if lane.busy is None:
                return lane
        lane = Lane(self.hb.new_timeline(None), group, len(lanes))
        lanes.append(lane)
        self.by_tid[lane.tid] = lane
        return lane

    def launch(self, host: TimelineId, group: str, op: Any) -> Pending:
        """``host`` launches an op on ``group``; record its accesses on ``pending.lane.tid``,
        then call :meth:`launched`."""
        self.launches += 1
        lane = self._free_lane(group)
        pending = Pending(lane, op)
        lane.busy = pending
        var = self._scratch
        var.clock = None
        self.hb.release(host, var)
        self.hb.acquire(lane.tid, var)
        self.pending.setdefault(group, []).append(pending)
        return pending

    def launched(self, pending: Pending) -> None:
        """The op's accesses are recorded: its completion stands for them."""
        self.hb.release(pending.lane.tid, pending.var)

    def barrier(self, group: str, op: Any) -> Pending:
        """An asynchronous barrier: completes after every op pending on ``group`` now."""
        pending = Pending(None, op)
        pending.covers = [p for p in self.pending.get(group, ()) if not p.done]
        return pending

    def complete(self, host: TimelineId, pending: Pending) -> None:
        """Thread ``host`` learnt that ``pending`` finished (a wait, a poll that said done)."""
        for p in pending.covers:
            self.complete(host, p)
        # A pending without a lane (a barrier, the end of a future's callback) carries only what
        # was released into its variable.
        self.hb.acquire(host, pending.var)
        if pending.lane is None:
            return
        if not pending.done:
            pending.done = True
            if pending.lane.busy is pending:
                pending.lane.busy = None
            ops = self.pending.get(pending.lane.group)
            if ops is not None:
                try:
                    ops.remove(pending)
                except ValueError:
                    pass

    def complete_group(self, host: TimelineId, group: str) -> None:
        """A blocking ``barrier`` on ``group`` returned in ``host``."""
        for p in list(self.pending.get(group, ())):
            self.complete(host, p)
