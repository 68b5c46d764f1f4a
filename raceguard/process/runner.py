"""Run a script or a module as ``__main__`` exactly as ``python SCRIPT ARGS`` / ``python -m MODULE
ARGS`` would: ``sys.argv``, ``sys.path[0]``, ``__file__``, ``__spec__``, the exit code, and the
traceback printed for an uncaught exception.
"""

from __future__ import annotations

import builtins
import importlib.machinery
import os
import runpy
import sys
import threading
import types
from typing import Any

from ..capture.stacks import own_frames_removed


class UsageError(Exception):
    """The target cannot be started at all (missing file, syntax error, unknown module)."""


def prepare_script(path: str) -> Any:
    """Compile the script; a missing or unreadable file or a syntax error is a usage error."""
    if not os.path.exists(path):
        raise UsageError(f"can't open file '{path}': No such file or directory")
    if os.path.isdir(path):
        raise UsageError(f"'{path}' is a directory, not a Python script")
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError as exc:
        raise UsageError(f"can't open file '{path}': {exc.strerror}") from None
    try:
        return compile(source, os.path.abspath(path), "exec", dont_inherit=True)
    except SyntaxError as exc:
        where = f"{path}:{exc.lineno}" if exc.lineno else path
        raise UsageError(f"syntax error in {where}: {exc.msg}") from None
    except ValueError as exc:  # e.g. source with NUL bytes
        raise UsageError(f"cannot compile {path}: {exc}") from None


def check_module(name: str) -> None:
    try:
        runpy._get_module_details(name)  # type: ignore[attr-defined]
    except ImportError as exc:
        raise UsageError(str(exc) or f"No module named {name}") from None
    except SyntaxError as exc:
        raise UsageError(f"syntax error in {exc.filename}:{exc.lineno}: {exc.msg}") from None


def run_script(path: str, code: Any, args: tuple[str, ...]) -> None:
    abspath = os.path.abspath(path)
    module = types.ModuleType("__main__")
    module.__dict__.update(
        {
            "__file__": abspath,
            "__builtins__": builtins,
            "__spec__": None,
            "__cached__": None,
            "__package__": None,
            "__loader__": importlib.machinery.SourceFileLoader("__main__", abspath),
        }
    )
    sys.modules["__main__"] = module
    sys.argv = [path, *args]
    _set_orig_argv(path, *args)
    sys.path[0] = os.path.dirname(abspath)
    exec(code, module.__dict__)


def _set_orig_argv(*argv: str) -> None:
    """``sys.orig_argv`` as ``python ARGV...`` would give it (programs that restart themselves
    use it), not the command that started raceguard's process."""
    if hasattr(sys, "orig_argv"):  # CPython 3.10+
        sys.orig_argv = [sys.orig_argv[0] if sys.orig_argv else sys.executable, *argv]


def run_module(name: str, args: tuple[str, ...]) -> None:
    sys.argv = ["-m", *args]
    _set_orig_argv("-m", name, *args)
    sys.path[0] = os.getcwd()
    runpy._run_module_as_main(name, alter_argv=True)  # type: ignore[attr-defined]


def exit_code_of(exc: SystemExit) -> int:
    """What the interpreter would exit with for ``sys.exit(exc.code)``."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        sys.stderr.write(f"{code}\n")
    except Exception:
        pass
    return 1




def prepare_or_exit(config: dict, send: Any) -> Any:
    """The target of ``config`` checked before it runs: the script's code object (None for
    ``-m``). A usage error (missing script, syntax error, unknown module) is sent as a
    ``usage-error`` message and ends this process with exit code 2."""
    try:
        if config.get("module"):
            check_module(config["module"])
            return None
        return prepare_script(config["script"])
    except UsageError as exc:
        send({"type": "usage-error", "message": str(exc)})
        os._exit(2)


def print_uncaught(exc: BaseException) -> None:
    """Print an uncaught exception like the interpreter does, without raceguard's frames."""
    try:
        own_frames_removed(exc)
    except Exception as error:  # raceguard's own failure: printed with its frames rather than not at all
        from ..capture import session as session_mod

        if session_mod.ACTIVE is not None:
            session_mod.ACTIVE.hook_failed("taking raceguard's frames out of a traceback", error)
    sys.excepthook(type(exc), exc, exc.__traceback__)


def wait_for_threads() -> None:
    """Like interpreter shutdown: wait for every non-daemon thread before exiting."""
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
