"""The ``queue`` family and ``SimpleQueue``: ``put(x)`` → the ``get()`` that returns ``x``,
``task_done()`` → ``join()``, reads of the queue's state as scheduling points, and, for the
SimpleQueue a ``multiprocessing.pool.ThreadPool`` takes its tasks from, which submission the task
a worker just took came from.
"""

from __future__ import annotations

import _queue
import collections
import queue
from typing import Any

from ..engine.hb import SyncVar
from ._common import _active, _blocking, _deadline, _logical_wait, _orig, _sync_point


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
    # A multiprocessing.pool.ThreadPool's inqueue: its pool's job -> result map (see pool._pool_submitted).
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


# The queue's side of multiprocessing.pool.ThreadPool origins (see pool.py): SimpleQueue.get
# calls it for a pool's inqueue.
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
