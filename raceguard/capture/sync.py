"""Instrumented ``threading`` / ``queue`` / ``concurrent.futures`` primitives.

Each primitive behaves exactly like the original (blocking, timeouts, non-blocking acquire,
``locked()``, reentrancy, ``_at_fork_reinit``, repr, pickling errors) and, while a session is
active, tells it about the happens-before edges it creates:

=========================  ====================================================================
primitive                  edge
=========================  ====================================================================
Thread                     ``start()`` → first line of the thread; thread end → ``join()``
Lock / RLock               ``release()`` → the next successful ``acquire()`` (also ``with``,
                           non-blocking and timed acquires that succeed)
Condition                  through its lock (``wait()`` releases and re-acquires it)
Semaphore                  ``release()`` → a successful ``acquire()``
Event                      ``set()`` → ``wait()`` / ``is_set()`` that return True
Barrier                    every arrival of a generation → every departure of it
Queue family, SimpleQueue  ``put(x)`` → the ``get()`` that returns ``x``;
                           ``task_done()`` → ``join()``
futures                    ``submit()`` → task start; task end → ``result()``, ``exception()``,
                           ``wait()``, ``as_completed()``, ``map()``, ``shutdown(wait=True)``
=========================  ====================================================================

Only synchronisation the target itself creates counts: ``threading.Lock()`` / ``RLock()`` called
from library code (the standard library, torch, site-packages) return the original, untracked
primitive, so a logging handler's lock or torch's internal locks never hide a race. The higher
level primitives above are modelled by their semantics, not by their internal locks.
"""

from __future__ import annotations

import _queue
import _thread
import collections
import itertools
import os
import concurrent.futures
import concurrent.futures._base as futures_base
import concurrent.futures.thread as futures_thread
import queue
import sys
import threading
from typing import Any

from ..schedule.scheduler import ScheduleAborted
from ..engine.hb import SyncVar
from . import hazards
from . import session as session_mod
from .stacks import HIDDEN, USER, classify_code, current_site

_orig: dict[str, Any] = {}
_installed = False


def _active():
    return session_mod.ACTIVE


# -- the controlled scheduler (raceguard stress / replay) -------------------------------------
# While a scheduler is attached to the session (``session.sched``), every primitive below takes
# a scheduling point before its operation (when called from the target's own code) and blocks
# *logically*: it tries the non-blocking variant, and if that fails gives up the baton with
# ``sched.block(thread, key, timeout)`` until the object changes (``sched.wake(key)``), then
# retries. Without a scheduler none of this runs: one ``s.sched`` check per operation.


def _user_call() -> bool:
    """Whether the primitive was called from the target's own code (not a library's).

    Library-internal operations (an executor's work queue, Thread.start's handshake) take no
    scheduling point: library code may hold raw locks of its own there, and switching threads
    while one is held would make the next thread block in the OS, outside the scheduler's control.
    """
    f = sys._getframe(2)
    while f is not None:
        kind = classify_code(f.f_code)  # cached per code object
        if kind != HIDDEN:
            return kind == USER
        f = f.f_back
    return False


def _sync_point(sch: Any, t: Any) -> None:
    if not t.nest and _user_call():
        sch.point(t)


def _remaining(sch: Any, deadline: float | None) -> float | None:
    return None if deadline is None else deadline - sch.vnow


def _deadline(sch: Any, timeout: float | None) -> float | None:
    return None if timeout is None else sch.vnow + max(float(timeout), 0.0)


def _logical_wait(s: Any, sch: Any, t: Any, key: Any, deadline: float | None, resource: Any) -> bool:
    """Block logically on ``key`` until woken or ``deadline`` (virtual time); True if timed out.

    ``resource`` is what the session's wait-for graph sees (a lock key, a ThreadJoin, or an
    anonymous ("wait", kind, id) key); only waits without a deadline can be part of a deadlock.
    """
    remaining = _remaining(sch, deadline)
    if remaining is not None and remaining <= 0:
        return True
    token = s.wait_begin(resource, deadline is None)
    try:
        return sch.block(t, key, remaining)
    finally:
        s.wait_end(token)


def _caller_is_user(depth: int = 2) -> bool:
    try:
        return classify_code(sys._getframe(depth).f_code) == USER
    except ValueError:
        return False


# -- locks -----------------------------------------------------------------------------------
_lock_keys = itertools.count(1)


def _check_acquire_args(blocking: Any, timeout: Any) -> None:
    """Raise exactly what the original raises for these arguments (a fresh lock never blocks)."""
    if not (blocking is True and type(timeout) is int and timeout == -1):
        probe = _orig["allocate_lock"]()
        if probe.acquire(blocking, timeout):
            probe.release()


def _forever(blocking: bool, timeout: float | None) -> bool:
    return bool(blocking) and (timeout is None or timeout < 0)


class TrackedLock:
    """``threading.Lock()`` as seen by the target."""

    __slots__ = ("_lock", "_rg_var", "_rg_site", "_rg_kind", "_rg_key", "__weakref__")
    _rg_reentrant = False

    def __init__(self, site: tuple | None = None) -> None:
        self._lock = _orig["allocate_lock"]()
        self._rg_var = SyncVar()
        self._rg_site = site
        self._rg_kind = "Lock"
        self._rg_key = next(_lock_keys)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        s = _active()
        if s is None:
            return self._lock.acquire(blocking, timeout)
        _check_acquire_args(blocking, timeout)
        if s.sched is not None:
            t = s.sched.current()
            if t is not None:
                ok = _sched_lock_acquire(self, s, t, blocking, timeout)
                if ok:
                    s.lock_acquired(self)
                return ok
        # Uncontended fast path; a contended wait is announced first, for deadlock detection.
        ok = self._lock.acquire(False)
        if not ok and blocking:
            # Any thread may release a Lock: its owner waiting for that is no self-deadlock (the
            # all-blocked watchdog still reports it if nobody ever does).
            key = ("wait", "Lock.acquire()", id(self)) if self._rg_held_by_caller(s) else self._rg_key
            token = s.wait_begin(key, _forever(blocking, timeout))
            try:
                ok = self._lock.acquire(blocking, timeout)
            finally:
                s.wait_end(token)
        if ok:
            s.lock_acquired(self)
        return ok

    acquire_lock = acquire

    def _rg_held_by_caller(self, s: Any) -> bool:
        return any(h is self for h in s.current().held)

    def __enter__(self) -> bool:
        return self.acquire()

    def release(self) -> None:
        s = _active()
        if s is not None and s.sched is not None:
            t = s.sched.current()
            if t is not None:
                _sync_point(s.sched, t)
            if self._lock.locked():
                s.lock_released(self)
            self._lock.release()
            s.sched.wake(self)
            return
        if s is not None and self._lock.locked():
            s.lock_released(self)
        self._lock.release()

    release_lock = release

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def locked(self) -> bool:
        return self._lock.locked()

    locked_lock = locked

    def _at_fork_reinit(self) -> None:
        self._lock._at_fork_reinit()

    def __repr__(self) -> str:
        return _rewrite_address(repr(self._lock), self)

    def __reduce_ex__(self, protocol: int) -> Any:
        return self._lock.__reduce_ex__(protocol)  # raises what the original raises


class TrackedRLock:
    """``threading.RLock()`` as seen by the target. Edges only on the outermost acquire/release."""

    __slots__ = ("_lock", "_rg_var", "_rg_site", "_rg_kind", "_rg_key", "_depth", "__weakref__")
    _rg_reentrant = True

    def __init__(self, site: tuple | None = None) -> None:
        self._lock = _orig["RLock_cls"]()
        self._rg_var = SyncVar()
        self._rg_site = site
        self._rg_kind = "RLock"
        self._rg_key = next(_lock_keys)
        self._depth = 0  # only touched by the owner while it holds the lock

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        s = _active()
        if s is None:
            ok = self._lock.acquire(blocking, timeout)
            if ok:
                self._depth += 1
            return ok
        _check_acquire_args(blocking, timeout)
        if s.sched is not None:
            t = s.sched.current()
            if t is not None:
                ok = _sched_lock_acquire(self, s, t, blocking, timeout)
                if ok:
                    self._depth += 1
                    if self._depth == 1:
                        s.lock_acquired(self)
                return ok
        ok = self._lock.acquire(False)
        if not ok and blocking:
            token = s.wait_begin(self._rg_key, _forever(blocking, timeout))
            try:
                ok = self._lock.acquire(blocking, timeout)
            finally:
                s.wait_end(token)
        if ok:
            self._depth += 1
            if self._depth == 1:
                s.lock_acquired(self)
        return ok

    __enter__ = acquire

    def release(self) -> None:
        s = _active()
        sch = s.sched if s is not None else None
        if sch is not None:
            t = sch.current()
            if t is not None:
                _sync_point(sch, t)
        last = False
        if self._lock._is_owned():
            last = self._depth == 1
            if last and s is not None:
                s.lock_released(self)
            # Before the real release: afterwards _depth belongs to the next owner.
            self._depth -= 1
        self._lock.release()  # raises like the original when not owned
        if sch is not None and last:
            sch.wake(self)

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # Condition.wait() on an RLock releases every level at once and restores them after.
    def _release_save(self) -> Any:
        if not self._lock._is_owned():
            return self._lock._release_save()  # raises like the original
        s = _active()
        if s is not None:
            s.lock_released(self)
        depth, self._depth = self._depth, 0  # before the real release, as in release()
        state = self._lock._release_save()
        if s is not None and s.sched is not None:
            s.sched.wake(self)
        return (state, depth)

    def _acquire_restore(self, saved: Any) -> None:
        state, depth = saved
        s = _active()
        if s is None:
            self._lock._acquire_restore(state)
            self._depth = depth
            return
        if s.sched is not None:
            t = s.sched.current()
            if t is not None:
                _sched_lock_acquire(self, s, t, True, -1)
                # Acquired once: restore the saved recursion level and owner in one go.
                self._lock.release()
                self._lock._acquire_restore(state)
                self._depth = depth
                s.lock_acquired(self)
                return
        token = s.wait_begin(self._rg_key, True)
        try:
            self._lock._acquire_restore(state)
        finally:
            s.wait_end(token)
        self._depth = depth
        s.lock_acquired(self)

    def _is_owned(self) -> bool:
        return self._lock._is_owned()

    def _recursion_count(self) -> int:
        return self._lock._recursion_count()

    def _at_fork_reinit(self) -> None:
        self._lock._at_fork_reinit()
        self._depth = 0

    def __repr__(self) -> str:
        return _rewrite_address(repr(self._lock), self)

    def __reduce_ex__(self, protocol: int) -> Any:
        return self._lock.__reduce_ex__(protocol)  # raises what the original raises


if hasattr(_thread.RLock, "locked"):  # Python 3.14+

    def _rlock_locked(self: TrackedRLock) -> bool:
        return self._lock.locked()

    TrackedRLock.locked = _rlock_locked  # type: ignore[attr-defined]


def _sched_lock_acquire(lock: Any, s: Any, t: Any, blocking: bool, timeout: float) -> bool:
    """Acquire ``lock._lock`` under the scheduler: try, and wait logically while it is taken."""
    sch = s.sched
    _sync_point(sch, t)
    if blocking and timeout is not None and timeout < 0 and timeout != -1:
        raise ValueError("timeout value must be a non-negative number")
    forever = _forever(blocking, timeout)
    if not blocking and timeout != -1:
        raise ValueError("can't specify a timeout for a non-blocking call")
    deadline = None if forever else _deadline(sch, timeout if blocking else 0.0)
    t.nest += 1
    try:
        while True:
            if lock._lock.acquire(False):
                return True
            if not blocking:
                return False
            if _logical_wait(s, sch, t, lock, deadline, lock._rg_key):
                return lock._lock.acquire(False)
    finally:
        t.nest -= 1


def _rewrite_address(text: str, obj: Any) -> str:
    head, sep, _ = text.rpartition(" at 0x")
    return f"{head} at {id(obj):#x}>" if sep else text


def _blocking(kind: str, obj: Any, forever: bool, call: Any, *args: Any) -> Any:
    """Run a blocking call, announced as an anonymous wait so "everyone blocked" is detected."""
    s = _active()
    if s is None or not forever:
        return call(*args)
    token = s.wait_begin(("wait", kind, id(obj)), True)
    try:
        return call(*args)
    finally:
        s.wait_end(token)


def Lock() -> Any:  # noqa: N802 - replaces threading.Lock
    if _caller_is_user():
        return TrackedLock(current_site(1))
    return _orig["allocate_lock"]()


def RLock(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - replaces threading.RLock
    if _caller_is_user():
        return TrackedRLock(current_site(1))
    return _orig["RLock"](*args, **kwargs)


# -- condition, semaphores, events, barriers -------------------------------------------------
class _CondWaiter:
    """One logical Condition.wait() under the scheduler; the key its thread blocks on."""

    __slots__ = ("notified",)

    def __init__(self) -> None:
        self.notified = False


class Condition(threading.Condition):
    def __init__(self, lock: Any = None) -> None:
        self._rg_user = _caller_is_user()
        if lock is None:
            if self._rg_user:
                lock = TrackedRLock(current_site(1))
                lock._rg_kind = "Condition"
            else:
                lock = _orig["RLock"]()
        super().__init__(lock)
        self._rg_waiters: collections.deque = collections.deque()

    def wait(self, timeout: float | None = None) -> bool:
        if not self._rg_user:  # Event, Queue, Semaphore, Barrier announce their own waits
            return super().wait(timeout)
        s = _active()
        if s is not None and s.sched is not None:
            t = s.sched.current()
            if t is not None:
                return self._rg_sched_wait(s, t, timeout)
        return _blocking("Condition.wait()", self, timeout is None, super().wait, timeout)

    def _rg_sched_wait(self, s: Any, t: Any, timeout: float | None) -> bool:
        sch = s.sched
        _sync_point(sch, t)
        t.nest += 1
        try:
            if not self._is_owned():
                raise RuntimeError("cannot wait on un-acquired lock")
            waiter = _CondWaiter()
            self._rg_waiters.append(waiter)
            saved = self._release_save()
            try:
                deadline = _deadline(sch, timeout)
                while not waiter.notified:
                    if _logical_wait(s, sch, t, waiter, deadline, ("wait", "Condition.wait()", id(self))):
                        break
            finally:
                if not waiter.notified:
                    try:
                        self._rg_waiters.remove(waiter)
                    except ValueError:
                        pass
                self._acquire_restore(saved)
            return waiter.notified
        finally:
            t.nest -= 1

    def wait_for(self, predicate: Any, timeout: float | None = None) -> Any:
        s = _active()
        sch = s.sched if s is not None and self._rg_user else None
        if sch is None or sch.current() is None:
            return super().wait_for(predicate, timeout)
        # threading's version measures the timeout in real time; under the scheduler time is virtual.
        endtime = None
        waittime = timeout
        result = predicate()
        while not result:
            if waittime is not None:
                if endtime is None:
                    endtime = sch.vnow + waittime
                else:
                    waittime = endtime - sch.vnow
                    if waittime <= 0:
                        break
            self.wait(waittime)
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        if self._rg_user:
            s = _active()
            if s is not None and s.sched is not None:
                t = s.sched.current()
                if t is not None:
                    _sync_point(s.sched, t)
                    t.nest += 1
                    try:
                        if not self._is_owned():
                            raise RuntimeError("cannot notify on un-acquired lock")
                    finally:
                        t.nest -= 1
                    woken = 0
                    while self._rg_waiters and woken < n:
                        waiter = self._rg_waiters.popleft()
                        waiter.notified = True
                        s.sched.wake(waiter)
                        woken += 1
                    if woken < n and self._waiters:  # threads waiting natively (unmanaged)
                        super().notify(n - woken)
                    return
        super().notify(n)

    def notify_all(self) -> None:
        if self._rg_user:
            s = _active()
            if s is not None and s.sched is not None and s.sched.current() is not None:
                self.notify(len(self._rg_waiters) + len(self._waiters))
                return
        super().notify_all()

    # No ``notifyAll = notify_all``: the inherited notifyAll() warns DeprecationWarning, then
    # calls notify_all() (this one), exactly as CPython's does.


_ORIG_SEMAPHORE_INIT = threading.Semaphore.__init__


class _SemaphoreEdges:
    def __init__(self, value: int = 1) -> None:
        if "_rg_user" in self.__dict__:
            # threading.BoundedSemaphore.__init__ calls the module's Semaphore.__init__, i.e. us.
            _ORIG_SEMAPHORE_INIT(self, value)
            return
        self._rg_user = _caller_is_user()
        super().__init__(value)  # type: ignore[call-arg]

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        s = _active()
        if s is not None and s.sched is not None:
            t = s.sched.current()
            if t is not None:
                return self._rg_sched_acquire(s, t, blocking, timeout)
        ok = _blocking(
            "Semaphore.acquire()", self, bool(blocking) and timeout is None, super().acquire, blocking, timeout  # type: ignore[misc]
        )
        if ok and self.__dict__.get("_rg_user", True):
            s = _active()
            if s is not None:
                s.acquire(_var(self))
        return ok

    __enter__ = acquire

    def _rg_sched_acquire(self, s: Any, t: Any, blocking: bool, timeout: float | None) -> bool:
        sch = s.sched
        _sync_point(sch, t)
        if not blocking and timeout is not None:
            raise ValueError("can't specify timeout for non-blocking acquire")
        deadline = _deadline(sch, timeout)
        t.nest += 1
        try:
            while True:
                if super().acquire(False):  # type: ignore[misc]
                    if self.__dict__.get("_rg_user", True):
                        s.acquire(_var(self))
                    return True
                if not blocking:
                    return False
                if _logical_wait(s, sch, t, self, deadline, ("wait", "Semaphore.acquire()", id(self))):
                    return False
        finally:
            t.nest -= 1

    def release(self, n: int = 1) -> None:
        s = _active()
        if s is not None:
            sch = s.sched
            if sch is not None:
                t = sch.current()
                if t is not None:
                    _sync_point(sch, t)
            if self.__dict__.get("_rg_user", True):
                s.release(_var(self))
            super().release(n)  # type: ignore[misc]
            if sch is not None:
                sch.wake(self)
            return
        super().release(n)  # type: ignore[misc]


def _var(obj: Any, attr: str = "_rg_var") -> SyncVar:
    var = obj.__dict__.get(attr)
    if var is None:
        var = obj.__dict__.setdefault(attr, SyncVar())
    return var


class Semaphore(_SemaphoreEdges, threading.Semaphore):
    pass


class BoundedSemaphore(Semaphore, threading.BoundedSemaphore):
    pass


class Event(threading.Event):
    def set(self) -> None:
        s = _active()
        if s is not None:
            sch = s.sched
            if sch is not None:
                t = sch.current()
                if t is not None:
                    _sync_point(sch, t)
                s.release(_var(self))
                super().set()
                sch.wake(self)
                if sch.pending:  # a new thread setting its own _started: admission point
                    sch.maybe_admit(self)
                return
            s.release(_var(self))
        super().set()

    def clear(self) -> None:
        s = _active()
        if s is not None and s.sched is not None:
            t = s.sched.current()
            if t is not None:
                _sync_point(s.sched, t)
        super().clear()

    def is_set(self) -> bool:
        s = _active()
        if s is not None and s.sched is not None:
            t = s.sched.current()
            if t is not None:
                _sync_point(s.sched, t)
        flag = super().is_set()
        if flag:
            if s is not None:
                s.acquire(_var(self))
        return flag


    def wait(self, timeout: float | None = None) -> bool:
        s = _active()
        if s is not None and s.sched is not None:
            t = s.sched.current()
            if t is not None:
                return self._rg_sched_wait(s, t, timeout)
        flag = _blocking("Event.wait()", self, timeout is None, super().wait, timeout)
        if flag:
            s = _active()
            if s is not None:
                s.acquire(_var(self))
        return flag

    def _rg_sched_wait(self, s: Any, t: Any, timeout: float | None) -> bool:
        sch = s.sched
        _sync_point(sch, t)
        deadline = _deadline(sch, timeout)
        t.nest += 1
        try:
            while not self._flag:
                if _logical_wait(s, sch, t, self, deadline, ("wait", "Event.wait()", id(self))):
                    break
        finally:
            t.nest -= 1
        flag = self._flag
        if flag:
            s.acquire(_var(self))
        return flag


class Barrier(threading.Barrier):
    def __init__(self, parties: int, action: Any = None, timeout: float | None = None) -> None:
        if action is not None:
            user_action = action

            def action() -> None:
                # The action runs in the last arriving thread before anyone departs: its writes
                # join the generation's clock so every departure is ordered after them.
                user_action()
                s = _active()
                var = getattr(self._rg_local, "var", None)
                if s is not None and var is not None:
                    s.release(var)

        super().__init__(parties, action, timeout)
        self._rg_local = _thread._local()
        self._rg_guard = _orig["allocate_lock"]()
        self._rg_arrivals = 0
        self._rg_generations: dict[int, SyncVar] = {}
        # Under the scheduler: the current generation and the generations broken by reset().
        self._rg_sgen = 0
        self._rg_reset: set[int] = set()

    def wait(self, timeout: float | None = None) -> int:
        s = _active()
        if s is not None and s.sched is not None:
            t = s.sched.current()
            if t is not None:
                return self._rg_sched_wait(s, t, timeout)
        with self._rg_guard:
            generation = self._rg_arrivals // self._parties
            self._rg_arrivals += 1
            var = self._rg_generations.get(generation)
            if var is None:
                var = self._rg_generations[generation] = SyncVar()
                self._rg_generations.pop(generation - 3, None)
        self._rg_local.var = var
        if s is not None:
            s.release(var)
        effective = self._timeout if timeout is None else timeout
        index = _blocking("Barrier.wait()", self, effective is None, super().wait, timeout)
        if s is not None:
            s.acquire(var)
        return index

    def _rg_sched_wait(self, s: Any, t: Any, timeout: float | None) -> int:
        """threading.Barrier's protocol, with logical waits (and the same state fields, so
        ``n_waiting`` and ``broken`` read right)."""
        sch = s.sched
        _sync_point(sch, t)
        if timeout is None:
            timeout = self._timeout
        t.nest += 1
        try:
            if self._state == -2:
                raise threading.BrokenBarrierError
            gen = self._rg_sgen
            var = self._rg_generations.get(gen)
            if var is None:
                var = self._rg_generations[gen] = SyncVar()
                self._rg_generations.pop(gen - 3, None)
            s.release(var)
            self._rg_local.var = var  # the action (run below by the last arrival) releases into it
            index = self._count
            self._count += 1
            if self._count == self._parties:
                try:
                    if self._action:
                        self._action()
                except BaseException:
                    self._state = -2
                    self._count = 0
                    sch.wake(self)
                    raise
                self._count = 0
                self._rg_sgen += 1
                sch.wake(self)
            else:
                deadline = _deadline(sch, timeout)
                while self._rg_sgen == gen and self._state != -2:
                    if _logical_wait(s, sch, t, self, deadline, ("wait", "Barrier.wait()", id(self))):
                        if self._rg_sgen == gen and self._state != -2:
                            self._state = -2  # a timeout breaks the barrier for everyone
                            self._count = 0
                            sch.wake(self)
                if self._rg_sgen == gen or gen in self._rg_reset:
                    raise threading.BrokenBarrierError
            s.acquire(var)
            return index
        finally:
            t.nest -= 1

    def reset(self) -> None:
        s = _active()
        if s is not None and s.sched is not None and s.sched.current() is not None:
            if self._count > 0 or self._state == -2:
                self._rg_reset.add(self._rg_sgen)
                self._rg_sgen += 1
            self._count = 0
            self._state = 0
            s.sched.wake(self)
            return
        with self._rg_guard:
            # Start a fresh generation: waiters of the broken one never depart normally.
            self._rg_arrivals = -(-self._rg_arrivals // self._parties) * self._parties
        super().reset()

    def abort(self) -> None:
        s = _active()
        if s is not None and s.sched is not None and s.sched.current() is not None:
            self._state = -2
            s.sched.wake(self)
            return
        super().abort()


# -- queues ----------------------------------------------------------------------------------
class _ItemEdges:
    """put(x) → the get() returning x, keyed by the item's identity while it is queued."""

    def _rg_init(self) -> None:
        self._rg_guard = _orig["allocate_lock"]()
        self._rg_pending: dict[int, collections.deque] = {}
        self._rg_join_var = SyncVar()

    def _rg_before_put(self, item: Any) -> SyncVar | None:
        s = _active()
        if s is None:
            return None
        var = SyncVar()
        s.release(var)
        with self._rg_guard:
            self._rg_pending.setdefault(id(item), collections.deque()).append(var)
        return var

    def _rg_put_failed(self, item: Any, var: SyncVar | None) -> None:
        if var is None:
            return
        with self._rg_guard:
            pending = self._rg_pending.get(id(item))
            if pending is not None:
                try:
                    pending.remove(var)
                except ValueError:
                    pass
                if not pending:
                    del self._rg_pending[id(item)]

    def _rg_sched_take(self, s: Any, t: Any, block: bool, timeout: float | None, get: Any, kind: str) -> Any:
        """get() under the scheduler: take without blocking, else wait logically for a put."""
        sch = s.sched
        _sync_point(sch, t)
        if block and timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")
        deadline = _deadline(sch, timeout if block else 0.0)
        t.nest += 1
        try:
            while True:
                try:
                    item = get(False)
                    break
                except queue.Empty:
                    if not block or _logical_wait(s, sch, t, (self, "get"), deadline, ("wait", kind, id(self))):
                        raise
        finally:
            t.nest -= 1
        self._rg_after_get(item)
        return item

    def _rg_after_get(self, item: Any) -> None:
        with self._rg_guard:
            pending = self._rg_pending.get(id(item))
            var = None
            if pending:
                var = pending.pop() if isinstance(self, queue.LifoQueue) else pending.popleft()
                if not pending:
                    del self._rg_pending[id(item)]
        s = _active()
        if s is not None and var is not None:
            s.acquire(var)


class Queue(_ItemEdges, queue.Queue):
    def __init__(self, maxsize: int = 0) -> None:
        self._rg_init()
        super().__init__(maxsize)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        s = _active()
        if s is not None and s.sched is not None:
            t = s.sched.current()
            if t is not None:
                return self._rg_sched_put(s, t, item, block, timeout)
        var = self._rg_before_put(item)
        try:
            _blocking("Queue.put()", self, bool(block) and timeout is None and self.maxsize > 0, super().put, item, block, timeout)
        except BaseException:
            self._rg_put_failed(item, var)
            raise

    def _rg_sched_put(self, s: Any, t: Any, item: Any, block: bool, timeout: float | None) -> None:
        sch = s.sched
        _sync_point(sch, t)
        if block and timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")
        var = self._rg_before_put(item)
        deadline = _deadline(sch, timeout if block else 0.0)
        t.nest += 1
        try:
            while True:
                try:
                    super().put(item, False)
                    break
                except queue.Full:
                    if not block or _logical_wait(s, sch, t, (self, "put"), deadline, ("wait", "Queue.put()", id(self))):
                        raise
        except BaseException:
            self._rg_put_failed(item, var)
            raise
        finally:
            t.nest -= 1
        sch.wake((self, "get"))

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        s = _active()
        if s is not None and s.sched is not None:
            t = s.sched.current()
            if t is not None:
                return self._rg_sched_get(s, t, block, timeout)
        item = _blocking("Queue.get()", self, bool(block) and timeout is None, super().get, block, timeout)
        self._rg_after_get(item)
        return item

    def _rg_sched_get(self, s: Any, t: Any, block: bool, timeout: float | None) -> Any:
        item = self._rg_sched_take(s, t, block, timeout, super().get, "Queue.get()")
        s.sched.wake((self, "put"))
        return item

    def task_done(self) -> None:
        s = _active()
        sch = s.sched if s is not None else None
        if sch is not None:
            t = sch.current()
            if t is not None:
                _sync_point(sch, t)
        if s is not None:
            s.release(self._rg_join_var)
        super().task_done()
        if sch is not None and not self.unfinished_tasks:
            sch.wake((self, "join"))

    def join(self) -> None:
        s = _active()
        if s is not None and s.sched is not None:
            t = s.sched.current()
            if t is not None:
                sch = s.sched
                _sync_point(sch, t)
                t.nest += 1
                try:
                    while self.unfinished_tasks:
                        _logical_wait(s, sch, t, (self, "join"), None, ("wait", "Queue.join()", id(self)))
                finally:
                    t.nest -= 1
                s.acquire(self._rg_join_var)
                return
        _blocking("Queue.join()", self, True, super().join)
        s = _active()
        if s is not None:
            s.acquire(self._rg_join_var)

    # Reads of the queue's state: scheduling points under the scheduler (check-then-act).
    def qsize(self) -> int:
        _read_point()
        return super().qsize()

    def empty(self) -> bool:
        _read_point()
        return super().empty()

    def full(self) -> bool:
        _read_point()
        return super().full()


def _read_point() -> None:
    s = _active()
    if s is not None and s.sched is not None:
        t = s.sched.current()
        if t is not None:
            _sync_point(s.sched, t)


class LifoQueue(Queue, queue.LifoQueue):
    pass


class PriorityQueue(Queue, queue.PriorityQueue):
    pass


class SimpleQueue(_ItemEdges, _queue.SimpleQueue):
    # A multiprocessing.pool.ThreadPool's inqueue: its pool's job -> result map (see _pool_submitted).
    _rg_pool_cache: Any = None

    def __init__(self) -> None:
        super().__init__()
        self._rg_init()

    def __reduce_ex__(self, protocol: int) -> Any:
        name = "_queue.SimpleQueue" if type(self) is SimpleQueue else type(self).__name__
        raise TypeError(f"cannot pickle {name!r} object")

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        s = _active()
        sch = s.sched if s is not None else None
        if sch is not None:
            t = sch.current()
            if t is not None:
                _sync_point(sch, t)
        self._rg_before_put(item)  # SimpleQueue.put never fails: nothing to undo
        super().put(item, block, timeout)
        if sch is not None:
            sch.wake((self, "get"))

    def put_nowait(self, item: Any) -> None:
        self.put(item, False)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        s = _active()
        if s is not None and s.sched is not None:
            t = s.sched.current()
            if t is not None:
                item = self._rg_sched_take(s, t, block, timeout, super().get, "SimpleQueue.get()")
                if self._rg_pool_cache is not None:
                    _pool_task_taken(self, item)
                return item
        item = _blocking("SimpleQueue.get()", self, bool(block) and timeout is None, super().get, block, timeout)
        self._rg_after_get(item)
        if self._rg_pool_cache is not None:
            _pool_task_taken(self, item)
        return item

    def get_nowait(self) -> Any:
        return self.get(False)

    def empty(self) -> bool:
        _read_point()
        return super().empty()

    def qsize(self) -> int:
        _read_point()
        return super().qsize()


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
        if not _pool_patched and "multiprocessing.pool" in sys.modules:
            try:  # before a pool's first task: its workers start in the pool's __init__
                _patch_pool()
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
        from .runner import own_frames_removed

        exc = own_frames_removed(args.exc_value)
        args = threading.ExceptHookArgs([args.exc_type, exc, exc.__traceback__, args.thread])
    return _orig["excepthook"](args)


# -- futures ---------------------------------------------------------------------------------
# Key every logical concurrent.futures.wait() / as_completed() waits on: any future completing.
_FUTURES_ANY = ("raceguard", "any future")


def _future_changed(s: Any, fut: Any) -> None:
    sch = s.sched
    if sch is not None:
        sch.wake(fut)
        sch.wake(_FUTURES_ANY)


def _future_point(s: Any) -> None:
    sch = s.sched
    if sch is not None:
        t = sch.current()
        if t is not None:
            _sync_point(sch, t)


def _future_set_result(self: Any, result: Any) -> None:
    s = _active()
    if s is not None:
        _future_point(s)
        s.release(_var(self))
    out = _orig["Future.set_result"](self, result)
    if s is not None:
        _future_changed(s, self)
    return out


def _future_set_exception(self: Any, exception: Any) -> None:
    s = _active()
    if s is not None:
        _future_point(s)
        s.release(_var(self))
    out = _orig["Future.set_exception"](self, exception)
    if s is not None:
        _future_changed(s, self)
    return out


def _future_cancel(self: Any) -> bool:
    s = _active()
    if s is not None:
        _future_point(s)
    out = _orig["Future.cancel"](self)
    if s is not None:
        _future_changed(s, self)
    return out


def _acquire_future(fut: Any) -> None:
    s = _active()
    if s is not None and fut.done() and "_rg_var" in fut.__dict__:
        s.acquire(fut.__dict__["_rg_var"])


def _sched_future_wait(fut: Any, s: Any, t: Any, timeout: float | None, kind: str) -> None:
    """Wait logically until ``fut`` is done or the (virtual) timeout passes."""
    sch = s.sched
    _sync_point(sch, t)
    deadline = _deadline(sch, timeout)
    t.nest += 1
    try:
        while not fut.done():
            if _logical_wait(s, sch, t, fut, deadline, ("wait", kind, id(fut))):
                break
    finally:
        t.nest -= 1


def _future_result(self: Any, timeout: float | None = None) -> Any:
    s = _active()
    if s is not None and s.sched is not None:
        t = s.sched.current()
        if t is not None:
            _sched_future_wait(self, s, t, timeout, "Future.result()")
            try:
                return _orig["Future.result"](self, 0)
            finally:
                _acquire_future(self)
    try:
        return _blocking("Future.result()", self, timeout is None and not self.done(), _orig["Future.result"], self, timeout)
    finally:
        _acquire_future(self)


def _future_exception(self: Any, timeout: float | None = None) -> Any:
    s = _active()
    if s is not None and s.sched is not None:
        t = s.sched.current()
        if t is not None:
            _sched_future_wait(self, s, t, timeout, "Future.exception()")
            try:
                return _orig["Future.exception"](self, 0)
            finally:
                _acquire_future(self)
    try:
        return _blocking("Future.exception()", self, timeout is None and not self.done(), _orig["Future.exception"], self, timeout)
    finally:
        _acquire_future(self)


def _wait_satisfied(result: Any, return_when: str) -> bool:
    if not result.not_done:
        return True
    if return_when == futures_base.FIRST_COMPLETED:
        return bool(result.done)
    if return_when == futures_base.FIRST_EXCEPTION:
        return any(not f.cancelled() and f._exception is not None for f in result.done)
    return False


def _futures_wait(fs: Any, timeout: float | None = None, return_when: str = futures_base.ALL_COMPLETED) -> Any:
    s = _active()
    if s is not None and s.sched is not None:
        t = s.sched.current()
        if t is not None:
            sch = s.sched
            _sync_point(sch, t)
            fs = set(fs)
            deadline = _deadline(sch, timeout)
            t.nest += 1
            try:
                while True:
                    result = _orig["wait"](fs, 0, return_when)
                    if _wait_satisfied(result, return_when):
                        break
                    if _logical_wait(s, sch, t, _FUTURES_ANY, deadline, ("wait", "concurrent.futures.wait()", id(fs))):
                        result = _orig["wait"](fs, 0, return_when)
                        break
            finally:
                t.nest -= 1
            for f in result.done:
                _acquire_future(f)
            return result
    result = _blocking("concurrent.futures.wait()", fs, timeout is None, _orig["wait"], fs, timeout, return_when)
    for f in result.done:
        _acquire_future(f)
    return result


def _futures_as_completed(fs: Any, timeout: float | None = None) -> Any:
    s = _active()
    if s is not None and s.sched is not None and s.sched.current() is not None:
        yield from _sched_as_completed(s, fs, timeout)
        return
    for f in _orig["as_completed"](fs, timeout):
        _acquire_future(f)
        yield f


def _sched_as_completed(s: Any, fs: Any, timeout: float | None) -> Any:
    """as_completed() with logical waits; finished futures come in the order they were given
    (the original yields already-finished ones in set order, which is not reproducible)."""
    sch = s.sched
    pending = list(dict.fromkeys(fs))
    total = len(pending)
    deadline = _deadline(sch, timeout)
    while pending:
        done = [f for f in pending if f.done()]
        if done:
            # The caller runs between yields (and other threads with it): look again before
            # blocking, a future may have finished meanwhile.
            for f in done:
                pending.remove(f)
                _acquire_future(f)
                yield f
            continue
        t = sch.current()
        if t is None:  # consumed outside the scheduler's control: fall back to the original
            for f in _orig["as_completed"](pending, _remaining(sch, deadline)):
                _acquire_future(f)
                yield f
            return
        t.nest += 1
        try:
            timed_out = _logical_wait(s, sch, t, _FUTURES_ANY, deadline, ("wait", "concurrent.futures.as_completed()", id(fs)))
        finally:
            t.nest -= 1
        if timed_out and not any(f.done() for f in pending):
            raise futures_base.TimeoutError(f"{len(pending)} (of {total}) futures unfinished")


def _work_item_init(self: Any, *args: Any, **kwargs: Any) -> None:
    _orig["_WorkItem.__init__"](self, *args, **kwargs)
    s = _active()
    if s is not None:
        self._rg_submit = SyncVar()
        s.release(self._rg_submit)
        self._rg_origin = s.capture_origin("task-submit")
        hazards.on_submit(s, self)


def _work_item_run(self: Any, *args: Any, **kwargs: Any) -> Any:
    s = _active()
    var = getattr(self, "_rg_submit", None)
    if s is None or var is None:
        return _orig["_WorkItem.run"](self, *args, **kwargs)
    s.acquire(var)
    token = s.task_begin(getattr(self, "_rg_origin", None))
    try:
        return _orig["_WorkItem.run"](self, *args, **kwargs)
    finally:
        s.task_end(token)


# -- multiprocessing.pool.ThreadPool: where each task was submitted ----------------------------
# A pool task is a (job, i, func, args, kwds) tuple its worker takes from the pool's inqueue (one
# of the SimpleQueues below); the job's result object, created by apply_async/map/imap in the
# submitting thread, is where that submission is remembered. Patched lazily: importing
# multiprocessing.pool here would put it in every target's sys.modules.
_pool_patched = False


def _pool_result_init(self: Any, *args: Any, **kwargs: Any) -> None:
    _orig["ApplyResult.__init__"](self, *args, **kwargs)
    _pool_submitted(self)


def _pool_imap_init(self: Any, *args: Any, **kwargs: Any) -> None:
    _orig["IMapIterator.__init__"](self, *args, **kwargs)
    _pool_submitted(self)


def _pool_submitted(result: Any) -> None:
    s = _active()
    if s is None:
        return
    result._rg_origin = s.capture_origin("task-submit")
    try:
        inqueue = getattr(result._pool, "_inqueue", None)
        if isinstance(inqueue, SimpleQueue) and inqueue._rg_pool_cache is None:
            inqueue._rg_pool_cache = result._cache  # job -> result, while the job is unfinished
    except Exception as exc:
        s.hook_failed("finding a thread pool's task queue", exc)


def _pool_task_taken(q: "SimpleQueue", item: Any) -> None:
    """A pool worker took ``item`` from its inqueue: a task (its accesses name its submission
    until the worker takes the next item) or the sentinel that stops the worker."""
    s = _active()
    if s is None:
        return
    try:
        state = s.current()
        result = q._rg_pool_cache.get(item[0]) if type(item) is tuple and len(item) == 5 else None
        state.origin = getattr(result, "_rg_origin", None) or state.start_origin
    except Exception as exc:
        s.hook_failed("entering a thread pool task", exc)


def _patch_pool() -> None:
    global _pool_patched
    _pool_patched = True
    pool_mod = sys.modules["multiprocessing.pool"]
    for cls, new in ((pool_mod.ApplyResult, _pool_result_init), (pool_mod.IMapIterator, _pool_imap_init)):
        _orig[f"{cls.__name__}.__init__"] = cls.__dict__["__init__"]
        _present_as(new, cls.__dict__["__init__"])
        cls.__init__ = new


def _unpatch_pool() -> None:
    global _pool_patched
    if _pool_patched:
        pool_mod = sys.modules["multiprocessing.pool"]
        pool_mod.ApplyResult.__init__ = _orig["ApplyResult.__init__"]
        pool_mod.IMapIterator.__init__ = _orig["IMapIterator.__init__"]
        _pool_patched = False


# -- install / uninstall ---------------------------------------------------------------------
_MODULE_PATCHES = [
    (threading, "Lock", Lock),
    (threading, "RLock", RLock),
    (threading, "Condition", Condition),
    (threading, "Semaphore", Semaphore),
    (threading, "BoundedSemaphore", BoundedSemaphore),
    (threading, "Event", Event),
    (threading, "Barrier", Barrier),
    (threading, "excepthook", _excepthook),
    (queue, "Queue", Queue),
    (queue, "LifoQueue", LifoQueue),
    (queue, "PriorityQueue", PriorityQueue),
    (queue, "SimpleQueue", SimpleQueue),
    (concurrent.futures, "wait", _futures_wait),
    (concurrent.futures, "as_completed", _futures_as_completed),
    (futures_base, "wait", _futures_wait),
    (futures_base, "as_completed", _futures_as_completed),
]
_METHOD_PATCHES = [
    (threading.Thread, "start", _thread_start),
    (threading.Thread, "_bootstrap_inner", _thread_bootstrap_inner),
    (threading.Thread, "join", _thread_join),
    (futures_base.Future, "set_result", _future_set_result),
    (futures_base.Future, "set_exception", _future_set_exception),
    (futures_base.Future, "cancel", _future_cancel),
    (futures_base.Future, "result", _future_result),
    (futures_base.Future, "exception", _future_exception),
    (futures_thread._WorkItem, "__init__", _work_item_init),
    (futures_thread._WorkItem, "run", _work_item_run),
]


def _present_as(new: Any, original: Any) -> None:
    """Give a replacement the original's identity: repr() and pickling name the module the
    original lives in, and ``support.check__all__`` (CPython's own tests) sees ``threading.Lock``
    defined by ``_thread``."""
    for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
        try:
            setattr(new, attr, getattr(original, attr))
        except (AttributeError, TypeError):
            pass


for _owner, _attr, _new in _MODULE_PATCHES:
    _present_as(_new, getattr(_owner, _attr))
for _owner, _attr, _new in _METHOD_PATCHES:
    _present_as(_new, _owner.__dict__[_attr])


def _before_fork() -> None:
    # Hold the session's locks across fork() so the child never inherits them mid-update.
    s = _active()
    if s is not None:
        s.lock.acquire()
        s._emit_lock.acquire()


def _after_fork_in_parent() -> None:
    s = _active()
    if s is not None:
        s._emit_lock.release()
        s.lock.release()


def _after_fork_in_child() -> None:
    s = _active()
    if s is not None:
        s._emit_lock._at_fork_reinit()
        s.lock._at_fork_reinit()
        me = _thread.get_ident()
        for ident in [i for i in s.states if i != me]:
            del s.states[ident]  # only the forking thread exists in the child
        if getattr(s, "detach_on_fork", True):
            # The target forked (multiprocessing, DataLoader workers): the child is another
            # process, not another timeline of this run. It stops reporting (its findings would
            # interleave with ours on the supervisor's pipe) and its primitives behave plainly.
            s.sink = _discard
            session_mod.ACTIVE = None


def _discard(event: dict) -> None:
    pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


def install() -> None:
    """Patch the factories and methods; idempotent. Call before the target's first line."""
    global _installed
    if _installed:
        return
    _orig["allocate_lock"] = _thread.allocate_lock
    _orig["RLock_cls"] = _thread.RLock
    _orig["RLock"] = threading.RLock
    _orig["excepthook"] = threading.excepthook
    _orig["wait"] = futures_base.wait
    _orig["as_completed"] = futures_base.as_completed
    for owner, attr, _ in _MODULE_PATCHES:
        _orig.setdefault(f"{owner.__name__}.{attr}", getattr(owner, attr))
    for cls, attr, _ in _METHOD_PATCHES:
        _orig[f"{cls.__name__}.{attr}"] = cls.__dict__[attr]
    for owner, attr, new in _MODULE_PATCHES:
        setattr(owner, attr, new)
    for cls, attr, new in _METHOD_PATCHES:
        setattr(cls, attr, new)
    if "multiprocessing.pool" in sys.modules:
        _patch_pool()
    _installed = True


def uninstall() -> None:
    global _installed
    if not _installed:
        return
    for owner, attr, _ in _MODULE_PATCHES:
        setattr(owner, attr, _orig[f"{owner.__name__}.{attr}"])
    for cls, attr, _ in _METHOD_PATCHES:
        setattr(cls, attr, _orig[f"{cls.__name__}.{attr}"])
    _unpatch_pool()
    _installed = False
