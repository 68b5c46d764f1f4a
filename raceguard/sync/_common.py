"""What every instrumented primitive shares: the originals they wrap (``_orig``, filled by
:func:`raceguard.sync.install`), the active session, the glue to the controlled scheduler
(scheduling points, virtual deadlines, logical waits), telling the target's own calls from a
library's, announcing native blocking calls for deadlock detection, the per-object sync variable,
and giving a replacement the identity of what it replaces.
"""

from __future__ import annotations

import sys
from typing import Any

from ..engine.hb import SyncVar
from ..capture import session as session_mod
from ..capture.identity import present_as as _present_as  # noqa: F401 - the primitives' identity
from ..capture.stacks import HIDDEN, USER, classify_code


_orig: dict[str, Any] = {}


def _active():
    return session_mod.ACTIVE


# -- the controlled scheduler (raceguard stress / replay) -------------------------------------
# While a scheduler is attached to the session (``session.sched``), every primitive of this package
# takes a scheduling point before its operation (when called from the target's own code) and blocks
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
    # A hook boundary, like Session.on_op's op_point: a scheduler failure loses this point (the
    # thread keeps the baton, the primitive runs), never reaches the target. ScheduleAborted, a
    # SystemExit meant to unwind the thread, passes.
    try:
        if not t.nest and _user_call():
            sch.point(t)
    except Exception as exc:
        s = _active()
        if s is not None:
            s.hook_failed("taking a scheduling point before a synchronisation", exc)


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


def _untracked(what: str, exc: BaseException) -> None:
    """raceguard failed while making the target's primitive a tracked one, which it hands out
    untracked instead (as library code gets it): the order it creates is lost (see
    ``Session.hook_failed``)."""
    s = _active()
    if s is not None:
        s.hook_failed(what, exc, ordering=True)


def _caller_is_user(depth: int = 2) -> bool:
    try:
        return classify_code(sys._getframe(depth).f_code) == USER
    except ValueError:
        return False


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


def _var(obj: Any, attr: str = "_rg_var") -> SyncVar:
    var = obj.__dict__.get(attr)
    if var is None:
        var = obj.__dict__.setdefault(attr, SyncVar())
    return var
