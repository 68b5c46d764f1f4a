"""What can be known about the target before its process is used: a missing script, a directory
or an unknown top-level module is answered at once (exit 2) instead of after the target's process
has imported torch (1-5 s). The messages are those of :mod:`raceguard.capture.runner`, which still
checks everything (syntax errors, a missing submodule) once the process runs.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def target_problem(script: str | None, module: str | None) -> str | None:
    """Why ``python SCRIPT`` / ``python -m MODULE`` cannot start, if this process can tell; None
    otherwise (the target's process then decides)."""
    if module:
        return _module_problem(module)
    if script is not None:
        return _script_problem(script)
    return None


def _script_problem(path: str) -> str | None:
    if not os.path.exists(path):
        return f"can't open file '{path}': No such file or directory"
    if os.path.isdir(path):
        return f"'{path}' is a directory, not a Python script"
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return f"can't open file '{path}': {exc.strerror}"
    return None


def _module_problem(name: str) -> str | None:
    """Only the top-level package is looked up: finding ``a.b`` imports ``a`` (its code would
    run here, in raceguard's process, and the target's process imports it again anyway)."""
    top = name.partition(".")[0]
    if not top or name.startswith(".") or top in sys.modules or top in sys.builtin_module_names:
        return None
    # python -m puts the working directory first on the target's sys.path.
    path = [os.getcwd(), *sys.path]
    saved, sys.path = sys.path, path
    try:
        found = importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return None  # something odd about it: the target's process gives python's own answer
    finally:
        sys.path = saved
    if found:
        return None
    if top == name:
        return f"No module named {name}"
    return f"Error while finding module specification for {name!r} (ModuleNotFoundError: No module named {top!r})"
