"""The native op-capture backend: tensor ops recorded by a C++ RecordFunction observer.

:func:`choose` picks the backend for a checked process's session: the native recorder (the
default) when it builds and loads and the run is one it records faithfully, else the Python
dispatch mode (:mod:`..torch_ops`), which stays the fallback and the oracle.
``RACEGUARD_BACKEND=python`` forces the Python mode (``native``, the default, is accepted too).
The report's ``stats.capture_backend`` always says which backend ran and why; a build that
failed or cannot happen here also gets one line on stderr. :func:`status` says which backend
this process uses, or a run would use, and why.

In-process sessions (``raceguard.watch()``, the pytest plugin, Hypothesis) and stress schedules
never call :func:`choose`: they keep the Python mode.
"""

from __future__ import annotations

import os
import sys
from typing import Any

ENV_VAR = "RACEGUARD_BACKEND"
DEFAULT = "native"

_status: tuple[str, str] = ("python", "no session chose a backend yet")
_chosen = False


def status() -> tuple[str, str]:
    """(backend, reason): this process's choice once a session made one, else what a checked
    run would get here (without building anything)."""
    if _chosen:
        return _status
    needed = _python_mode_needed(None)
    if needed is not None:
        return ("python", needed)
    from .build import probe

    backend, reason = probe()
    invalid = _invalid_value()
    return (backend, f"{reason}; {invalid}" if invalid else reason)


def _python_reason() -> str:
    return f"{ENV_VAR}=python"


def _invalid_value() -> str | None:
    raw = os.environ.get(ENV_VAR, "").strip().lower()
    if raw and raw not in ("python", "native"):
        return f"{ENV_VAR}={raw!r} is not 'python' or 'native'; the default ({DEFAULT}) applies"
    return None


def requested() -> str:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    return value if value in ("python", "native") else DEFAULT


def choose(session: Any) -> tuple[str, str]:
    """Attach the native recorder to ``session`` (not yet activated) unless the Python mode is
    asked for or needed; the report's statistics say which backend ran and why. Never raises."""
    global _status, _chosen
    unavailable = False
    try:
        _status, unavailable = _choose(session)
    except Exception as exc:  # the check goes on with the Python mode
        _status, unavailable = ("python", f"the native recorder failed to start: {exc!r}"), True
    _chosen = True
    _announce(session, _status, unavailable)
    return _status


def _cuda_available() -> bool:
    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_available())
    except Exception:
        return False


def _announce(session: Any, status: tuple[str, str], unavailable: bool) -> None:
    backend, reason = status
    text = f"python (native recorder unavailable: {reason})" if unavailable else f"{backend} ({reason})"
    stats = session.stats

    def stats_with_backend() -> dict:
        out = stats()
        out["capture_backend"] = text
        return out

    session.stats = stats_with_backend
    invalid = _invalid_value()
    if _main_checked_process() and (unavailable or invalid):
        # Once per run: the target's own process says it; its Python children get the same
        # answer from the same cache and stay quiet.
        line = f"raceguard: {invalid}" if invalid else None
        if unavailable:
            line = f"raceguard: checking with the Python dispatch mode: native recorder unavailable: {reason}"
        _say(line)


def _main_checked_process() -> bool:
    """False in a checked worker (a Python the target started), which the worker bootstrap
    enters through raceguard.process.child_worker."""
    return "raceguard.process.child_worker" not in sys.modules


def _say(line: str | None) -> None:
    if not line:
        return
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except Exception:  # a closed stderr: the report still says it
        pass


def _python_mode_needed(session: Any) -> str | None:
    """Why this run takes the Python mode whatever the recorder's state, or None."""
    if requested() == "python":
        return _python_reason()
    if getattr(session, "sched", None) is not None:
        return "stress schedules put a scheduling point before every op, which the native recorder does not"
    if os.environ.get("RACEGUARD_SIMULATE_CUDA"):
        return "--simulate-cuda rewrites devices in the Python mode's op hook"
    if _cuda_available():
        return "the CUDA stream tracker takes its ops from the Python mode"
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        return (
            "a worker torchrun started: its process group's C++ threads run collectives' copies, "
            "which the native recorder sees without the ordering that waiting for the collective gives"
        )
    if _started_by_multiprocessing():
        return (
            "a process that multiprocessing started names shared tensors from the live frames of the "
            "thread that accesses them, which the native recorder's later application does not have"
        )
    return None


# How multiprocessing's spawn and forkserver start methods start a Python (CPython 3.11).
_MULTIPROCESSING_COMMANDS = ("from multiprocessing.spawn import spawn_main", "from multiprocessing.forkserver import main")


def _started_by_multiprocessing() -> bool:
    """A checked worker started by multiprocessing's spawn or forkserver. Its model usually
    arrives as an argument, so only the accessing frames' locals name it (``model.fc.weight``):
    under the native recorder it would be named after the allocation site instead."""
    return any(arg.startswith(_MULTIPROCESSING_COMMANDS) for arg in getattr(sys, "orig_argv", ()))


def _choose(session: Any) -> tuple[tuple[str, str], bool]:
    """(backend, reason), and whether the native recorder was wanted but is unavailable."""
    needed = _python_mode_needed(session)
    if needed is not None:
        return ("python", needed), False
    from .build import ensure

    result = ensure()
    if result.module is None:
        return ("python", result.reason), True
    from .backend import NativeBackend

    NativeBackend(result.module).attach(session)
    return ("native", result.reason), False
