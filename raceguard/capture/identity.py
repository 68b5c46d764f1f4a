"""How raceguard's replacements appear to the target and to torch: a replacement takes the
identity of what it replaces (:func:`present_as`), so that a target inspecting a patched function
or method (``repr()``, ``__name__`` / ``__qualname__``, pickling by reference,
``support.check__all__`` in CPython's own tests) sees what it would see without raceguard; and
Dynamo never traces raceguard's own code (:func:`shield`)."""

from __future__ import annotations

from typing import Any


def present_as(new: Any, original: Any) -> Any:
    """Copy ``__module__``, ``__name__``, ``__qualname__`` and ``__doc__`` of ``original`` onto
    ``new`` (those it has); returns ``new``."""
    for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
        try:
            setattr(new, attr, getattr(original, attr))
        except (AttributeError, TypeError):
            pass
    return new


def shield(code: Any) -> bool:
    """Dynamo skips frames of ``code`` and every frame called from them; False when this torch
    has no per-code frame strategy (older than 2.6)."""
    try:
        from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy, set_code_exec_strategy

        set_code_exec_strategy(code, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.SKIP))
        return True
    except Exception:
        return False
