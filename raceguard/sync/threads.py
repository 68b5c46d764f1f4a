"""``threading.Thread``: ``start()`` → the thread's first line and thread end → ``join()``, the
thread's timeline and origin in the session, its registration with the controlled scheduler, and
the ``threading.excepthook`` that reports a thread's uncaught exception without raceguard's frames.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from ..engine.hb import SyncVar
from ..schedule.scheduler import ScheduleAborted
from .. import hazards
from . import pool
from ._common import _active, _deadline, _logical_wait, _orig, _sync_point


# -- threads ---------------------------------------------------------------------------------
def _thread_start(self: threading.Thread) -> None:
    s = _active()
    started = getattr(self, "_started", None)  # None: Thread.__init__ was never called
    if s is not None and started is not None and not started._flag:
        sch = s.sched
        t = sch.current() if sch is not None else None
        if t is not None:
            _sync_point(sch, t)
        self._rg_tid = s.fork()
        self._rg_end_var = SyncVar()
        self._rg_origin = s.capture_origin("thread-start")
        if not pool._pool_patched and "multiprocessing.pool" in sys.modules:
            try:  # before a pool's first task: its workers start in the pool's __init__
                pool._patch_pool()
            except Exception as exc:
                s.hook_failed("watching multiprocessing.pool", exc)
        hazards.on_thread_start(s, self)
        if t is not None and getattr(self, "_initialized", False):
            # A managed thread from now on: runnable, admitted when its bootstrap sets _started.
            st = self._rg_sched = sch.register(self.name, self, self.daemon)
            t.raw += 1  # the handshake with the new thread (_started.wait()) is a native wait
            try:
                return _orig["Thread.start"](self)
            except BaseException:
                sch.thread_exit(st)
                raise
            finally:
                t.raw -= 1
    return _orig["Thread.start"](self)


def _thread_bootstrap_inner(self: threading.Thread) -> None:
    s = _active()
    if s is None:
        return _orig["Thread._bootstrap_inner"](self)
    state = s.enter_thread(self, getattr(self, "_rg_tid", None))
    sch = s.sched
    st = getattr(self, "_rg_sched", None) if sch is not None else None
    if st is not None:
        sch.expect(st)
    try:
        return _orig["Thread._bootstrap_inner"](self)
    finally:
        s.leave_thread(state, getattr(self, "_rg_end_var", None))
        if st is not None:
            sch.thread_exit(st)  # the scheduler that managed it, even if detached since


def _thread_join(self: threading.Thread, timeout: float | None = None) -> None:
    if self is threading.current_thread():
        return _orig["Thread.join"](self, timeout)  # raises "cannot join current thread"
    s = _active()
    st = getattr(self, "_rg_sched", None)
    if s is not None and st is not None and s.sched is not None and self._started._flag:
        t = s.sched.current()
        if t is not None and t is not st:
            return _sched_join(self, s, t, st, timeout)
    tid = getattr(self, "_rg_tid", None)
    if s is not None and tid is not None and timeout is None and self._started.is_set() and self.is_alive():
        from ..engine.waitfor import ThreadJoin

        token = s.wait_begin(ThreadJoin(tid), True)
        try:
            _orig["Thread.join"](self, timeout)
        finally:
            s.wait_end(token)
    else:
        _orig["Thread.join"](self, timeout)
    var = getattr(self, "_rg_end_var", None)
    if s is not None and var is not None and not self.is_alive():
        s.acquire(var)


def _sched_join(thread: threading.Thread, s: Any, t: Any, st: Any, timeout: float | None) -> None:
    from ..engine.waitfor import ThreadJoin
    from ..schedule.scheduler import FINISHED

    sch = s.sched
    _sync_point(sch, t)
    deadline = _deadline(sch, timeout)
    t.nest += 1
    try:
        while st.status is not FINISHED:
            if _logical_wait(s, sch, t, ("join", st.id), deadline, ThreadJoin(thread._rg_tid)):
                if st.status is not FINISHED:
                    return  # timed out: the thread is still alive, as with the original
        # Finished logically; the OS thread is on its way out and needs no baton: a native join.
        t.raw += 1
        try:
            _orig["Thread.join"](thread, None)
        finally:
            t.raw -= 1
    finally:
        t.nest -= 1
    var = getattr(thread, "_rg_end_var", None)
    if var is not None:
        s.acquire(var)


def _excepthook(args: Any) -> None:
    if args.exc_type is not None and issubclass(args.exc_type, ScheduleAborted):
        return  # an aborted in-process schedule unwinding its threads: like SystemExit, silent
    s = _active()
    if s is not None and not issubclass(args.exc_type, SystemExit):
        s.thread_exception(args)
    if args.exc_value is not None and args.exc_traceback is not None:
        try:
            from ..capture.stacks import own_frames_removed

            exc = own_frames_removed(args.exc_value)
            args = threading.ExceptHookArgs([args.exc_type, exc, exc.__traceback__, args.thread])
        except Exception as exc:  # the traceback keeps raceguard's frames; it is still printed
            if s is not None:
                s.hook_failed("taking raceguard's frames out of a thread's traceback", exc)
    return _orig["excepthook"](args)
