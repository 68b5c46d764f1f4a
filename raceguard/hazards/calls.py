"""Module calls: once a thread has started, ``nn.Module.__call__`` is wrapped so that every call
reads the module's call slots (``training``, ``forward``, the hook dicts) and any lazy parameter
it has, and checks the thread-local modes its work was started or submitted with.
"""

from __future__ import annotations

import _thread
import threading
from typing import Any

import torch
from torch import nn

from ..engine.hb import Race, ShadowStorage
from ..capture.identity import present_as
from . import _state
from ._state import _tls
from .locations import CALL_SLOTS, _locs, _module_loc, _record
from .modes import _UNSET, _check_modes
from .reporting import _internal_error, _report_races


def _module_call(self: Any, *args: Any, **kwargs: Any) -> Any:
    # The hot path: every module call of the target comes through here once a thread started.
    # Its frame is left out of the tracebacks the target process prints (runner.own_frames_removed).
    if _compiling():  # Dynamo tracing: trace the original only (capture/compiled.py records graphs)
        return _orig_call(self, *args, **kwargs)
    s = _state._session
    if s is not None and s.hb.timelines > 1:
        _on_module_call(s, self)
    return _orig_call(self, *args, **kwargs)


_orig_call: Any = None
# Constant True while Dynamo traces (it never traces a hook's bookkeeping), False in eager code.
_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


def watch_module_calls() -> None:
    """Start seeing module calls, at the first thread start: until then there is nothing to race
    with, and a program that never starts a thread keeps nn.Module.__call__ untouched (and its
    tracebacks exactly as they are). A wrapper, not a global forward pre-hook: with one of those
    torch calls forward() through an extra frame of its own, on every call."""
    global _orig_call
    if _state._installed and _orig_call is None:
        _orig_call = nn.Module.__call__
        present_as(_module_call, _orig_call)
        nn.Module.__call__ = _module_call  # type: ignore[method-assign]


def _on_module_call(s: Any, module: Any) -> None:
    if getattr(s, "closed", False):
        return
    try:
        state = s.states.get(_thread.get_ident()) or s.current()
        shadow = _locs.get(id(module))
        if shadow is None or shadow.meta.ref() is not module:
            shadow = _module_loc(module)
        lazy = shadow.meta.lazy
        races: list[Race] = []
        if lazy or not _call_read_covered(s, shadow, state.tid):
            ranges = [(0, CALL_SLOTS)]
            if lazy:
                ranges.extend((slot, slot + 1) for slot in lazy)
            races = _record(s, state, shadow, ranges, False, f"{type(module).__name__}.__call__")
        origin = getattr(_tls, "origin", _UNSET)
        if origin is _UNSET:
            origin = _tls.origin = getattr(threading.current_thread(), "_rg_hz_origin", None)
        if origin is not None and not origin.reported:
            _check_modes(s, state, origin, module)
    except Exception as exc:
        _internal_error(s, "recording a module call", exc)
        return
    if races:
        _report_races(s, races)


def _call_read_covered(s: Any, shadow: ShadowStorage, tid: int) -> bool:
    """The common case of :func:`_covered` without the session lock: the call slots are one
    interval that this thread already read in its current epoch. Sound without the lock: a
    write that lands after this check still sees that read and reports the race."""
    if len(shadow.cells) != 1 or shadow.starts[0] != 0 or shadow.ends[0] != CALL_SLOTS:
        return False
    r = shadow.cells[0].reads
    if r is None:
        return False
    if type(r) is dict:
        r = r.get(tid)
        if r is None:
            return False
    elif r.timeline != tid:
        return False
    return r.epoch == s.hb.epoch(tid)
