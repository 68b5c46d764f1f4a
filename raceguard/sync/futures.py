"""``concurrent.futures``: ``submit()`` → the task's start (the executor's work item), the task's
end → ``result()``, ``exception()``, ``wait()``, ``as_completed()`` (and so ``map()`` and
``shutdown(wait=True)``), with logical waits on futures under the controlled scheduler.
"""

from __future__ import annotations

import concurrent.futures._base as futures_base
from typing import Any

from ..engine.hb import SyncVar
from .. import hazards
from ._common import _active, _blocking, _deadline, _logical_wait, _orig, _remaining, _sync_point, _var


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
