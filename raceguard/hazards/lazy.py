"""Lazy modules: materialising an ``nn.Lazy*`` module's parameters and buffers is a write of
each (its bookkeeping writes are part of that one write), and every call of a lazy module reads
them (see :mod:`.calls`). ``_LAZY_TYPES`` is set by install().
"""

from __future__ import annotations

from typing import Any

from torch import nn

from . import _state
from ._state import _orig, _report_lock, _tls
from .locations import _module_loc, _record, _slot
from .reporting import _internal_error, _report_races


# -- lazy modules ------------------------------------------------------------------------------
_LAZY_TYPES: tuple = ()


def _mark_lazy(module: Any, name: str, value: Any) -> None:
    kind = "buffer" if isinstance(value, nn.parameter.UninitializedBuffer) else "parameter"
    s = _state._session
    lock = s.lock if s is not None else _report_lock
    with lock:
        _module_loc(module).meta.lazy[_slot(name)] = (name, kind)


def _infer_parameters(self: Any, module: Any, *args: Any, **kwargs: Any) -> Any:
    """``LazyModuleMixin._infer_parameters``: the forward pre-hook that materialises a lazy
    module. A write of every parameter/buffer it creates; the bookkeeping writes it makes
    (removing its own hooks, changing ``__class__``) are part of that one write."""
    s = _state._session
    if s is not None and s.hb.timelines > 1:
        try:
            lazy = [
                (name, "buffer" if isinstance(t, nn.parameter.UninitializedBuffer) else "parameter")
                for name, t in list(module._parameters.items()) + list(module._buffers.items())
                if t is not None and type(t) in _LAZY_TYPES
            ]
            if lazy:
                shadow = _module_loc(module)
                with s.lock:
                    for name, kind in lazy:
                        shadow.meta.lazy[_slot(name)] = (name, kind)
                ranges = [(_slot(n), _slot(n) + 1) for n, _ in lazy]
                races = _record(s, s.current(), shadow, ranges, True, f"{type(module).__name__}.initialize_parameters")
                if races:
                    _report_races(s, races)
        except Exception as exc:
            _internal_error(s, "recording a lazy module's initialisation", exc)
    _tls.quiet = getattr(_tls, "quiet", 0) + 1
    try:
        return _orig["LazyModuleMixin._infer_parameters"](self, module, *args, **kwargs)
    finally:
        _tls.quiet -= 1
