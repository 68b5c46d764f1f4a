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
Condition                  through its lock (``wait()`` releases and re-acquires it); one
                           library code creates: each release or ``notify()`` → every later
                           acquisition (``with``, ``acquire()``, ``wait()`` returning)
Semaphore                  ``release()`` → a successful ``acquire()``
Event                      ``set()`` → ``wait()`` / ``is_set()`` that return True
Barrier                    every arrival of a generation → every departure of it
Queue family, SimpleQueue  ``put(x)`` → the ``get()`` that returns ``x``;
                           ``task_done()`` → ``join()``
futures                    ``submit()`` → task start; task end → ``result()``, ``exception()``,
                           ``wait()``, ``as_completed()``, ``map()``, ``shutdown(wait=True)``
=========================  ====================================================================

Locks count only when the target itself creates them: ``threading.Lock()`` / ``RLock()`` called
from library code (the standard library, torch, site-packages) return the original, untracked
primitive, and a library's Semaphore creates no edge, so a logging handler's lock or torch's
internal locks never hide a race. The hand-off primitives order whoever creates them; the higher
level ones are modelled by their semantics, not by their internal locks (see ``conditions`` for a
library's Condition).

This package installs and uninstalls them; each family lives in its own module: ``locks``,
``conditions`` (Condition, semaphores, Event, Barrier), ``queues``, ``threads``, ``futures``,
``pool`` (``multiprocessing.pool.ThreadPool`` origins), and ``_common`` for what they share (the
originals, the scheduler glue). The names the rest of raceguard uses are re-exported here.
"""

from __future__ import annotations

import _thread
import concurrent.futures
import concurrent.futures._base as futures_base
import concurrent.futures.thread as futures_thread
import os
import queue
import sys
import threading

from ..capture import session as session_mod
from ._common import _active, _orig, _present_as
from .conditions import Barrier, BoundedSemaphore, Condition, Event, Semaphore
from .futures import (
    _future_cancel,
    _future_exception,
    _future_result,
    _future_set_exception,
    _future_set_result,
    _futures_as_completed,
    _futures_wait,
    _work_item_init,
    _work_item_run,
)
from .locks import Lock, RLock, TrackedLock, TrackedRLock  # noqa: F401 - the Tracked classes: re-exported
from .pool import _patch_pool, _unpatch_pool
from .queues import LifoQueue, PriorityQueue, Queue, SimpleQueue
from .threads import _excepthook, _thread_bootstrap_inner, _thread_join, _thread_start

_installed = False


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
