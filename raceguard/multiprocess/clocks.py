"""Vector clocks that travel between processes.

Inside a process the happens-before engine numbers its timelines 0, 1, ...; across processes a
timeline is named ``PID:N``. What a process learns of another process's timeline becomes a
*phantom* timeline of its own engine (never accessed, only carried in clocks), so everything the
engine already does with clocks (locks, queues, thread starts, joins) carries cross-process
knowledge too. A fork renames the parent's timelines in the child to phantoms and gives the
forking thread a new timeline there, so parent and child go on as two timelines that both know
what happened before the fork.
"""

from __future__ import annotations

import os
from typing import Any

GlobalClock = dict  # {"PID:N": epoch}


class ProcessClocks:
    """The mapping between one process's timelines and the names other processes know them by."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.pid = os.getpid()
        self.name_of: dict[int, str] = {}  # phantom timeline -> its global name
        self.local_of: dict[str, int] = {}  # global name of a phantom -> its timeline

    def global_name(self, tid: int) -> str:
        return self.name_of.get(tid) or f"{self.pid}:{tid}"

    def export(self, tid: int) -> GlobalClock:
        """What timeline ``tid`` knows, by global names (call under the session lock)."""
        clock = self.session.hb.clock(tid)
        name_of, pid = self.name_of, self.pid
        return {name_of.get(i) or f"{pid}:{i}": v for i, v in enumerate(clock) if v}

    def release(self, tid: int) -> GlobalClock:
        """A hand-off leaves timeline ``tid``: its clock, then a new epoch (as a release)."""
        out = self.export(tid)
        self.session.hb._tick(tid)
        return out

    def acquire(self, tid: int, clock: GlobalClock) -> None:
        """Timeline ``tid`` receives a hand-off carrying ``clock`` (call under the session lock)."""
        hb = self.session.hb
        mine = hb.clock(tid)
        prefix = f"{self.pid}:"
        for name, value in clock.items():
            if name.startswith(prefix):
                index = int(name[len(prefix):])
                if index in self.name_of:  # a number reused after a fork: never ours
                    continue
            else:
                index = self.local_of.get(name)
                if index is None:
                    index = hb.new_timeline(None)
                    self.name_of[index] = name
                    self.local_of[name] = index
                    mine = hb.clock(tid)
            if len(mine) <= index:
                mine.extend([0] * (index + 1 - len(mine)))
            if value > mine[index]:
                mine[index] = value

    def after_fork_in_child(self, state: Any) -> None:
        """Every timeline so far was the parent's; ``state`` (the forking thread) continues on a
        new timeline that knows all the parent's thread knew at the fork."""
        session = self.session
        parent = self.pid
        self.pid = os.getpid()
        hb = session.hb
        for tid in range(hb.timelines):
            if tid not in self.name_of:
                name = f"{parent}:{tid}"
                self.name_of[tid] = name
                self.local_of[name] = tid
        old = state.tid
        state.tid = hb.new_timeline(old)
        timelines = session.timelines
        for i in range(len(timelines)):
            timelines[i] = None  # the parent's threads: not this process's
        while len(timelines) <= state.tid:
            timelines.append(None)
        timelines[state.tid] = state
