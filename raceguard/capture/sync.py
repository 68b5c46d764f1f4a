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
import concurrent.futures
import concurrent.futures._base as futures_base
import concurrent.futures.thread as futures_thread
import queue
import sys
import threading
from typing import Any

from ..engine.hb import SyncVar
from . import session as session_mod
from .stacks import USER, classify_code, current_site

_orig: dict[str, Any] = {}
_installed = False


def _active():
    return session_mod.ACTIVE


def _caller_is_user(depth: int = 2) -> bool:
    try:
        return classify_code(sys._getframe(depth).f_code) == USER
    except ValueError:
        return False


# -- locks -----------------------------------------------------------------------------------
_lock_keys = itertools.count(1)


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
        # Uncontended fast path; a contended wait is announced first, for deadlock detection.
        ok = self._lock.acquire(False)
        if not ok and blocking:
            token = s.wait_begin(self._rg_key, _forever(blocking, timeout))
            try:
                ok = self._lock.acquire(blocking, timeout)
            finally:
                s.wait_end(token)
        if ok:
            s.lock_acquired(self)
        return ok

    acquire_lock = acquire

    def __enter__(self) -> bool:
        return self.acquire()

    def release(self) -> None:
        s = _active()
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
        raise TypeError("cannot pickle '_thread.lock' object")


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
        if self._depth == 1 and self._lock._is_owned():
            s = _active()
            if s is not None:
                s.lock_released(self)
        self._lock.release()  # raises like the original when not owned
        self._depth -= 1

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # Condition.wait() on an RLock releases every level at once and restores them after.
    def _release_save(self) -> Any:
        s = _active()
        if s is not None and self._lock._is_owned():
            s.lock_released(self)
        state = self._lock._release_save()
        depth, self._depth = self._depth, 0
        return (state, depth)

    def _acquire_restore(self, saved: Any) -> None:
        state, depth = saved
        s = _active()
        if s is None:
            self._lock._acquire_restore(state)
            self._depth = depth
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
        raise TypeError("cannot pickle '_thread.RLock' object")


if hasattr(_thread.RLock, "locked"):  # Python 3.14+

    def _rlock_locked(self: TrackedRLock) -> bool:
        return self._lock.locked()

    TrackedRLock.locked = _rlock_locked  # type: ignore[attr-defined]


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

    def wait(self, timeout: float | None = None) -> bool:
        if not self._rg_user:  # Event, Queue, Semaphore, Barrier announce their own waits
            return super().wait(timeout)
        return _blocking("Condition.wait()", self, timeout is None, super().wait, timeout)


class _SemaphoreEdges:
    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        ok = _blocking(
            "Semaphore.acquire()", self, bool(blocking) and timeout is None, super().acquire, blocking, timeout  # type: ignore[misc]
        )
        if ok:
            s = _active()
            if s is not None:
                s.acquire(_var(self))
        return ok

    __enter__ = acquire

    def release(self, n: int = 1) -> None:
        s = _active()
        if s is not None:
            s.release(_var(self))
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
            s.release(_var(self))
        super().set()

    def is_set(self) -> bool:
        flag = super().is_set()
        if flag:
            s = _active()
            if s is not None:
                s.acquire(_var(self))
        return flag

    isSet = is_set

    def wait(self, timeout: float | None = None) -> bool:
        flag = _blocking("Event.wait()", self, timeout is None, super().wait, timeout)
        if flag:
            s = _active()
            if s is not None:
                s.acquire(_var(self))
        return flag


class Barrier(threading.Barrier):
    def __init__(self, parties: int, action: Any = None, timeout: float | None = None) -> None:
        super().__init__(parties, action, timeout)
        self._rg_guard = _orig["allocate_lock"]()
        self._rg_arrivals = 0
        self._rg_generations: dict[int, SyncVar] = {}

    def wait(self, timeout: float | None = None) -> int:
        s = _active()
        with self._rg_guard:
            generation = self._rg_arrivals // self._parties
            self._rg_arrivals += 1
            var = self._rg_generations.get(generation)
            if var is None:
                var = self._rg_generations[generation] = SyncVar()
                self._rg_generations.pop(generation - 3, None)
        if s is not None:
            s.release(var)
        effective = self._timeout if timeout is None else timeout
        index = _blocking("Barrier.wait()", self, effective is None, super().wait, timeout)
        if s is not None:
            s.acquire(var)
        return index

    def reset(self) -> None:
        with self._rg_guard:
            # Start a fresh generation: waiters of the broken one never depart normally.
            self._rg_arrivals = -(-self._rg_arrivals // self._parties) * self._parties
        super().reset()


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

    def _rg_after_get(self, item: Any) -> None:
        with self._rg_guard:
            pending = self._rg_pending.get(id(item))
            var = None
            if pending:
                var = pending.popleft()
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
        var = self._rg_before_put(item)
        try:
            _blocking("Queue.put()", self, bool(block) and timeout is None and self.maxsize > 0, super().put, item, block, timeout)
        except BaseException:
            self._rg_put_failed(item, var)
            raise

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        item = _blocking("Queue.get()", self, bool(block) and timeout is None, super().get, block, timeout)
        self._rg_after_get(item)
        return item

    def task_done(self) -> None:
        s = _active()
        if s is not None:
            s.release(self._rg_join_var)
        super().task_done()

    def join(self) -> None:
        _blocking("Queue.join()", self, True, super().join)
        s = _active()
        if s is not None:
            s.acquire(self._rg_join_var)


class LifoQueue(Queue, queue.LifoQueue):
    pass


class PriorityQueue(Queue, queue.PriorityQueue):
    pass


class SimpleQueue(_ItemEdges, _queue.SimpleQueue):
    def __init__(self) -> None:
        super().__init__()
        self._rg_init()

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        var = self._rg_before_put(item)
        super().put(item, block, timeout)

    def put_nowait(self, item: Any) -> None:
        self.put(item, False)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        item = _blocking("SimpleQueue.get()", self, bool(block) and timeout is None, super().get, block, timeout)
        self._rg_after_get(item)
        return item

    def get_nowait(self) -> Any:
        return self.get(False)


# -- threads ---------------------------------------------------------------------------------
def _thread_start(self: threading.Thread) -> None:
    s = _active()
    if s is not None and not self._started.is_set():
        self._rg_tid = s.fork()
        self._rg_end_var = SyncVar()
    return _orig["Thread.start"](self)


def _thread_bootstrap_inner(self: threading.Thread) -> None:
    s = _active()
    if s is None:
        return _orig["Thread._bootstrap_inner"](self)
    state = s.enter_thread(self, getattr(self, "_rg_tid", None))
    try:
        return _orig["Thread._bootstrap_inner"](self)
    finally:
        s.leave_thread(state, getattr(self, "_rg_end_var", None))


def _thread_join(self: threading.Thread, timeout: float | None = None) -> None:
    s = _active()
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


def _excepthook(args: Any) -> None:
    s = _active()
    if s is not None and not issubclass(args.exc_type, SystemExit):
        s.thread_exception(args)
    return _orig["excepthook"](args)


# -- futures ---------------------------------------------------------------------------------
def _future_set_result(self: Any, result: Any) -> None:
    s = _active()
    if s is not None:
        s.release(_var(self))
    return _orig["Future.set_result"](self, result)


def _future_set_exception(self: Any, exception: Any) -> None:
    s = _active()
    if s is not None:
        s.release(_var(self))
    return _orig["Future.set_exception"](self, exception)


def _acquire_future(fut: Any) -> None:
    s = _active()
    if s is not None and fut.done() and "_rg_var" in fut.__dict__:
        s.acquire(fut.__dict__["_rg_var"])


def _future_result(self: Any, timeout: float | None = None) -> Any:
    try:
        return _blocking("Future.result()", self, timeout is None and not self.done(), _orig["Future.result"], self, timeout)
    finally:
        _acquire_future(self)


def _future_exception(self: Any, timeout: float | None = None) -> Any:
    try:
        return _blocking("Future.exception()", self, timeout is None and not self.done(), _orig["Future.exception"], self, timeout)
    finally:
        _acquire_future(self)


def _futures_wait(fs: Any, timeout: float | None = None, return_when: str = futures_base.ALL_COMPLETED) -> Any:
    result = _blocking("concurrent.futures.wait()", fs, timeout is None, _orig["wait"], fs, timeout, return_when)
    for f in result.done:
        _acquire_future(f)
    return result


def _futures_as_completed(fs: Any, timeout: float | None = None) -> Any:
    for f in _orig["as_completed"](fs, timeout):
        _acquire_future(f)
        yield f


def _work_item_init(self: Any, *args: Any, **kwargs: Any) -> None:
    _orig["_WorkItem.__init__"](self, *args, **kwargs)
    s = _active()
    if s is not None:
        self._rg_submit = SyncVar()
        s.release(self._rg_submit)


def _work_item_run(self: Any, *args: Any, **kwargs: Any) -> Any:
    s = _active()
    var = getattr(self, "_rg_submit", None)
    if s is not None and var is not None:
        s.acquire(var)
    return _orig["_WorkItem.run"](self, *args, **kwargs)


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
    (futures_base.Future, "result", _future_result),
    (futures_base.Future, "exception", _future_exception),
    (futures_thread._WorkItem, "__init__", _work_item_init),
    (futures_thread._WorkItem, "run", _work_item_run),
]


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
    _installed = True


def uninstall() -> None:
    global _installed
    if not _installed:
        return
    for owner, attr, _ in _MODULE_PATCHES:
        setattr(owner, attr, _orig[f"{owner.__name__}.{attr}"])
    for cls, attr, _ in _METHOD_PATCHES:
        setattr(cls, attr, _orig[f"{cls.__name__}.{attr}"])
    _installed = False
