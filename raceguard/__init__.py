"""raceguard: a happens-before data-race and deadlock detector for PyTorch programs."""

from .version import __version__

from .schedule import hooks as _schedule_hooks  # noqa: E402 - light: no torch, no threading


def yield_point() -> None:
    """A scheduling point for ``raceguard stress`` / ``replay``: another thread may run here.

    Put it where a thread changes shared Python state that no tensor op or lock marks, so the
    controlled scheduler can interleave other threads there. A no-op (one global lookup) when no
    scheduler is running.
    """
    hook = _schedule_hooks.yield_hook
    if hook is not None:
        hook()


def benign(obj, reason: str):
    """Mark intentional races (Hogwild-style lock-free updates) on these tensors.

    ``obj`` is a tensor, a module (its parameters, buffers and their grads), or an iterable of
    them such as ``model.parameters()``. Races on them are still detected but reported as
    suppressed with ``reason``; they never fail a run. Returns ``obj``. Outside raceguard it does
    nothing, so the call can stay in production code.
    """
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("raceguard.benign() needs a reason, e.g. reason='hogwild'")
    import sys

    session_mod = sys.modules.get("raceguard.capture.session")
    session = getattr(session_mod, "ACTIVE", None) if session_mod is not None else None
    if session is not None:
        session.mark_benign(obj, reason.strip())
    return obj


__all__ = ["RaceError", "WatchSession", "__version__", "benign", "watch", "yield_point"]

_API = ("RaceError", "WatchSession", "watch")


def __getattr__(name: str):  # PEP 562: `import raceguard` stays light (the pytest plugin loads it in every run)
    if name in _API:
        from . import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_API))
