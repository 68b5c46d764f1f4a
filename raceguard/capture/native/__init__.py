"""The native op-capture backend: tensor ops recorded by a C++ RecordFunction observer.

:func:`choose` picks the backend for a session where it is activated: the native recorder when
it loads and the run is one it records faithfully, else the Python dispatch mode
(:mod:`..torch_ops`), which stays the fallback and the oracle. ``RACEGUARD_BACKEND=python`` or
``native`` forces the choice. :func:`status` says which backend the process uses and why.
"""

from __future__ import annotations

import os
from typing import Any

ENV_VAR = "RACEGUARD_BACKEND"
# The native backend is used only when asked for (RACEGUARD_BACKEND=native) until it reports
# what the Python mode reports on every case the Python mode handles (see docs/native.md).
DEFAULT = "python"

_status: tuple[str, str] = ("python", "no session chose a backend yet")


_chosen = False


def status() -> tuple[str, str]:
    """(backend, reason): this process's choice once a session made one, else what a checked
    run would get here (without building anything)."""
    if _chosen:
        return _status
    if requested() == "python":
        return ("python", _python_reason())
    from .build import cached_library, supported

    why = supported()
    if why is not None:
        return ("python", why)
    path = cached_library()
    if path is None:
        return ("native", "not built yet: the first checked run builds it (about 20 s of CPU, once)")
    return ("native", f"cached build {path}")


def _python_reason() -> str:
    raw = os.environ.get(ENV_VAR, "").strip().lower()
    if raw == "python":
        return f"{ENV_VAR}=python"
    if raw and raw != "native":
        return f"{ENV_VAR}={raw!r} is not 'python' or 'native'"
    return f"the default (set {ENV_VAR}=native to use the native recorder)"


def requested() -> str:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    return value if value in ("python", "native") else DEFAULT


def choose(session: Any) -> tuple[str, str]:
    """Attach the native recorder to ``session`` (not yet activated) when it is requested and
    loads; otherwise leave the Python dispatch mode. Never raises."""
    global _status, _chosen
    try:
        _status = _choose(session)
    except Exception as exc:  # the check goes on with the Python mode
        _status = ("python", f"the native recorder failed to start: {exc!r}")
    _chosen = True
    if requested() == "native":  # asked for: the report says which backend ran, and why
        _announce(session, _status)
    return _status


def _cuda_available() -> bool:
    import sys

    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_available())
    except Exception:
        return False


def _announce(session: Any, status: tuple[str, str]) -> None:
    stats = session.stats
    text = "native" if status[0] == "native" else f"python (native recorder unavailable: {status[1]})"

    def stats_with_backend() -> dict:
        out = stats()
        out["capture_backend"] = text
        return out

    session.stats = stats_with_backend


def _choose(session: Any) -> tuple[str, str]:
    if requested() == "python":
        return ("python", _python_reason())
    if getattr(session, "sched", None) is not None:
        return ("python", "stress schedules put a scheduling point before every op, which the native recorder does not")
    if os.environ.get("RACEGUARD_SIMULATE_CUDA"):
        return ("python", "--simulate-cuda rewrites devices in the Python mode's op hook")
    if _cuda_available():
        return ("python", "the CUDA stream tracker takes its ops from the Python mode")
    from .build import ensure

    result = ensure()
    if result.module is None:
        return ("python", result.reason)
    from .backend import NativeBackend

    NativeBackend(result.module).attach(session)
    return ("native", result.reason)
