"""``threading.Lock()`` / ``RLock()`` as the target sees them: the factories hand the target's own
code a :class:`TrackedLock` / :class:`TrackedRLock` (release → next successful acquire, the
session's lock graph, logical waits under the scheduler) and library code the original, untracked
lock.
"""

from __future__ import annotations

import _thread
import itertools
from typing import Any

from ..engine.hb import SyncVar
from ..capture.stacks import current_site
from ._common import _active, _caller_is_user, _deadline, _logical_wait, _orig, _sync_point, _untracked


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
        try:
            return any(h is self for h in s.current().held)
        except Exception as exc:  # only names the wait (deadlock detection): never the target's
            s.hook_failed("recording a blocking wait", exc)
            return False

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


def Lock() -> Any:  # noqa: N802 - replaces threading.Lock
    try:
        if _caller_is_user():
            return TrackedLock(current_site(1))
    except Exception as exc:  # raceguard's own failure: an untracked lock, as library code gets
        _untracked("creating a tracked Lock", exc)
    return _orig["allocate_lock"]()


def RLock(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - replaces threading.RLock
    try:
        if _caller_is_user():
            return TrackedRLock(current_site(1))
    except Exception as exc:
        _untracked("creating a tracked RLock", exc)
    return _orig["RLock"](*args, **kwargs)

