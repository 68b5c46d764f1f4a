"""``multiprocessing.pool.ThreadPool`` origins: the result object ``apply_async`` / ``map`` /
``imap`` create in the submitting thread remembers where the task was submitted, so a pool worker's
accesses name that submission. Patched lazily, at the first thread start after
``multiprocessing.pool`` is imported (or at install if it already is).
"""

from __future__ import annotations

import sys
from typing import Any

from ._common import _active, _orig, _present_as
from .queues import SimpleQueue


# -- multiprocessing.pool.ThreadPool: where each task was submitted ----------------------------
# A pool task is a (job, i, func, args, kwds) tuple its worker takes from the pool's inqueue (one
# of the SimpleQueues of queues.py); the job's result object, created by apply_async/map/imap in the
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
