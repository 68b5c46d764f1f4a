"""``threading.Condition``, ``Semaphore`` / ``BoundedSemaphore``, ``Event`` and ``Barrier``: each
modelled by its semantics (a Condition through its lock, release → acquire for semaphores,
set() → a wait() that returns True, every arrival of a barrier generation → every departure of
it), with logical waits under the controlled scheduler.

A Condition that library code creates is a hand-off all the same: it exists to pass state between
threads, and that state is written and read under its lock, whether the receiver waits or finds
its predicate already true. So each release of it (``with`` exit, ``release()``, the release
inside ``wait()``) and each ``notify()`` orders everything the thread did before with every later
acquisition of it (``with``, ``acquire()``, ``wait()`` returning). Its lock stays an untracked
one: no lock-order graph, no scheduling points, as for a library's Lock or RLock, which order
nothing.
"""

from __future__ import annotations

import _thread
import collections
import sys
import threading
from typing import Any

from ..engine.hb import SyncVar
from ..capture.stacks import LIBRARY, classify_code, current_site
from ._common import _active, _blocking, _caller_is_user, _deadline, _logical_wait, _orig, _sync_point, _untracked, _var
from .locks import TrackedRLock


# -- condition, semaphores, events, barriers -------------------------------------------------
class _CondWaiter:
    """One logical Condition.wait() under the scheduler; the key its thread blocks on."""

    __slots__ = ("notified",)

    def __init__(self) -> None:
        self.notified = False


# Modules whose Conditions are the insides of primitives raceguard models by their semantics
# (Event, Semaphore, Barrier; queue.Queue; a Future): a hand-off through the inner Condition would
# be coarser than the model (a wait for one item would be ordered after every earlier put).
_MODELLED_INSIDES = frozenset({"threading", "queue", "concurrent.futures._base"})


def _created_by_library(depth: int) -> bool:
    """Whether the frame ``depth`` levels up (the Condition's creator) is a library's, outside
    the modelled primitives."""
    try:
        frame = sys._getframe(depth)
    except ValueError:
        return False
    return classify_code(frame.f_code) == LIBRARY and frame.f_globals.get("__name__") not in _MODELLED_INSIDES


class Condition(threading.Condition):
    def __init__(self, lock: Any = None) -> None:
        handoff = None
        try:
            self._rg_user = _caller_is_user()
            if lock is None and self._rg_user:
                lock = TrackedRLock(current_site(1))
                lock._rg_kind = "Condition"
            elif not self._rg_user and _created_by_library(2):
                handoff = SyncVar()
        except Exception as exc:  # raceguard's own failure: an untracked Condition, as library code gets
            self._rg_user = False
            _untracked("creating a tracked Condition", exc)
        if lock is None:
            lock = _orig["RLock"]()
        super().__init__(lock)
        self._rg_waiters: collections.deque = collections.deque()
        # A library's Condition: its releases and notify() publish into this, its acquisitions
        # receive from it.
        self._rg_handoff = handoff
        if handoff is not None:
            self.acquire = self._rg_handoff_acquire
            self.release = self._rg_handoff_release
            self._rg_inner_release_save = self._release_save
            self._release_save = self._rg_handoff_release_save

    def __enter__(self) -> bool:
        entered = self._lock.__enter__()
        if self._rg_handoff is not None:
            self._rg_received()
        return entered

    def __exit__(self, *exc: Any) -> None:
        if self._rg_handoff is not None:
            self._rg_published()
        return self._lock.__exit__(*exc)

    def _rg_handoff_acquire(self, *args: Any, **kwargs: Any) -> bool:
        ok = self._lock.acquire(*args, **kwargs)
        if ok:
            self._rg_received()
        return ok

    def _rg_handoff_release(self) -> None:
        if self._is_owned():
            self._rg_published()
        self._lock.release()  # raises like the original when not held

    def _rg_handoff_release_save(self) -> Any:
        if self._is_owned():
            self._rg_published()
        return self._rg_inner_release_save()

    def _rg_published(self) -> None:
        s = _active()
        if s is not None:
            s.release(self._rg_handoff)

    def _rg_received(self) -> None:
        var = self._rg_handoff
        if var.clock is not None:
            s = _active()
            if s is not None:
                s.acquire(var)

    def wait(self, timeout: float | None = None) -> bool:
        if not self._rg_user:  # Event, Queue, Semaphore, Barrier announce their own waits
            notified = super().wait(timeout)
            if self._rg_handoff is not None:
                self._rg_received()  # wait() returns holding the Condition again
            return notified
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
        super().notify(n)  # raises, as the original does, unless the caller holds the Condition
        if self._rg_handoff is not None:
            self._rg_published()  # also when notified under a lock the library took directly

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
        try:
            self._rg_user = _caller_is_user()
        except Exception as exc:
            self._rg_user = False
            _untracked("creating a tracked Semaphore", exc)
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
