"""raceguard: a happens-before data-race and deadlock detector for PyTorch programs."""

__version__ = "0.1.0"

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


__all__ = ["RaceError", "WatchSession", "__version__", "watch", "yield_point"]

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
