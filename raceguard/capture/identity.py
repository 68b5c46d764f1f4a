"""Giving a replacement the identity of what it replaces, so that a target inspecting a patched
function or method (``repr()``, ``__name__`` / ``__qualname__``, pickling by reference,
``support.check__all__`` in CPython's own tests) sees what it would see without raceguard."""

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
