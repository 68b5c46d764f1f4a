"""Origins of a thread's work: at ``Thread.start()`` and ``executor.submit()`` (called from the
sync package) the starting thread's thread-local modes are kept with the thread or the work item
when they differ from a new thread's, for the check at the worker's module calls.
"""

from __future__ import annotations

import concurrent.futures.thread as futures_thread
import threading
from typing import Any

from ..capture.stacks import current_site
from ._state import _tls
from .calls import watch_module_calls
from .modes import _MODES, _UNSET, _Origin
from .reporting import _internal_error


def _capture_origin(s: Any, how: str) -> _Origin | None:
    modes = []
    for i, (_, _, get, default) in enumerate(_MODES):
        value = bool(get())
        if value != default:
            modes.append((i, value))
    if not modes:
        return None
    state = s.current()
    return _Origin(modes, current_site(1), state.name, state.locks, how)


def on_thread_start(s: Any, thread: threading.Thread) -> None:
    """``Thread.start()`` is starting ``thread`` (called in the parent). Remembers the parent's
    thread-local modes when they differ from a new thread's, for the check at module calls."""
    try:
        watch_module_calls()
        if getattr(thread, "_target", None) is futures_thread._worker:
            return  # executor workers: each work item carries its submitter's modes instead
        origin = _capture_origin(s, "start")
        if origin is not None:
            thread._rg_hz_origin = origin  # type: ignore[attr-defined]
    except Exception as exc:
        _internal_error(s, "capturing thread-local modes", exc)


def on_submit(s: Any, work_item: Any) -> None:
    """``executor.submit()`` built ``work_item`` (called in the submitting thread, after
    ``_WorkItem.__init__``). The work runs with the submitter's modes attached."""
    try:
        origin = _capture_origin(s, "submit")
        if origin is None:
            return  # nothing to compare with: the worker starts with the same modes
        fn = work_item.fn

        def run_with_origin(*args: Any, **kwargs: Any) -> Any:
            previous = getattr(_tls, "origin", _UNSET)
            previous_explicit = getattr(_tls, "explicit", None)
            _tls.origin = origin
            _tls.explicit = set()
            try:
                return fn(*args, **kwargs)
            finally:
                _tls.explicit = previous_explicit
                if previous is _UNSET:
                    del _tls.origin
                else:
                    _tls.origin = previous

        run_with_origin.__wrapped__ = fn  # type: ignore[attr-defined]
        work_item.fn = run_with_origin
    except Exception as exc:
        _internal_error(s, "capturing thread-local modes", exc)
