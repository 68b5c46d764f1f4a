"""Start the target's process before the command line interface is even imported.

``raceguard check`` runs the target in a child process that must import torch (1.5 s or more)
before the target's first line. The supervising process itself needs ~50–100 ms to import click,
the CLI and the configuration, parse the arguments and read ``pyproject.toml``; done before the
child starts, that time adds to every run. So the entry point (``raceguard.__main__``, through
:func:`start_for`) starts the child
first, when the command is ``check``: the child imports torch and raceguard's capture layer while
the supervisor gets ready, then waits for its configuration (what to run, with which limits) on
a pipe. Nothing of the target runs before the configuration arrives, and what the child imported
for itself (torch and its dependencies) stays out of the target's ``sys.modules`` until the target
imports it (:mod:`raceguard.process.hidden`): a program that never imports torch does not see it.

If the supervisor ends without using the child (``--help``, a usage error, or a caller of
``supervisor.run_target`` asking for another interpreter), the child is killed at exit; it never
ran any of the target's code. Set
``RACEGUARD_NO_PRESTART=1`` to start the child only once the arguments are parsed.

This module imports only what starting a process needs (no click, no torch, no raceguard
modules beyond it and :mod:`raceguard.workers`, the standard-library socket the target's Python
children report to).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
from typing import Any

CHILD_ENV = "RACEGUARD_CHILD"  # the same variable as raceguard.process.child.ENV_VAR


class Prestarted:
    """A child that imports torch and waits for its configuration."""

    def __init__(self, proc: Any, read_fd: int, config_fd: int) -> None:
        self.proc = proc
        self.read_fd = read_fd  # the child's messages (findings, exit) arrive here
        self.config_fd = config_fd  # the configuration goes here, once
        self.listener: Any = None  # raceguard.workers.Listener: the target's Python children

    def send(self, config: dict) -> None:
        data = (json.dumps(config) + "\n").encode()
        try:
            while data:
                data = data[os.write(self.config_fd, data):]
        finally:
            os.close(self.config_fd)
            self.config_fd = -1


_pending: Prestarted | None = None


def bootstrap_code(package_parent: str) -> str:
    """The ``python -c`` program of the child; binds no name in the target's ``__main__``."""
    return (
        f"__import__('sys').path.insert(0, {package_parent!r}); "
        "__import__('raceguard.process.child', fromlist=['main']).main()"
    )


def package_parent() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start(python: str | None = None) -> Prestarted:
    """Start a child that waits for its configuration on a pipe."""
    import subprocess

    parent = package_parent()
    read_fd, write_fd = os.pipe()
    config_read, config_write = os.pipe()
    # The child starts with SIGINT blocked (the mask is inherited): a Ctrl-C during its
    # interpreter's own start-up would print Python's "Fatal Python error: init_import_site".
    # Blocked, it stays pending until raceguard.process.child unblocks it, where it ends the
    # child quietly; the target's first line runs with the mask raceguard was given.
    sigint_blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, ())
    env = dict(os.environ)
    env[CHILD_ENV] = json.dumps({"fd": write_fd, "config_fd": config_read, "bootstrap_path": parent,
                                 "unblock_sigint": not sigint_blocked})
    listener = _workers_listener(parent, env)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        proc = subprocess.Popen(
            [python or sys.executable, "-c", bootstrap_code(parent)],
            pass_fds=(write_fd, config_read),
            env=env,
        )
    except BaseException:
        for fd in (read_fd, config_write):
            os.close(fd)
        if listener is not None:
            listener.close()
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(write_fd)
        os.close(config_read)
    pre = Prestarted(proc, read_fd, config_write)
    pre.listener = listener
    return pre


def _workers_listener(parent: str, env: dict) -> Any:
    """The socket the target's Python children report to (raceguard.workers), its variables put
    in ``env``; None where it cannot be made (the children then run unchecked)."""
    try:
        from .workers import Listener

        listener = Listener()
    except Exception:
        return None
    env.update(listener.env(parent, env))
    return listener


def take(python: str | None = None) -> Prestarted | None:
    """The child started by :func:`main`, if there is one for this interpreter (once)."""
    global _pending
    pre, _pending = _pending, None
    if pre is None:
        return None
    if python is not None and os.path.realpath(python) != os.path.realpath(sys.executable):
        _discard(pre)
        return None
    return pre


def _discard(pre: Prestarted | None) -> None:
    if pre is None:
        return
    try:
        pre.proc.kill()
        pre.proc.wait()
    except Exception:
        pass
    if pre.listener is not None:
        pre.listener.close()
    for fd in (pre.read_fd, pre.config_fd):
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def _discard_unused() -> None:
    global _pending
    pre, _pending = _pending, None
    _discard(pre)


# Ctrl-C or SIGTERM that reached raceguard while its command line got ready: noted, not raised
# (a KeyboardInterrupt there is a traceback, or click's "Aborted!"), so that the supervisor or
# stress's Interrupt, which take the note over, end the run with one line and its report.
_early_signals: list[str] = []


def _note_signal(signum: int, frame: Any) -> None:
    _early_signals.append(signal.Signals(signum).name)


def early_signal() -> str | None:
    """The first of SIGINT/SIGTERM that arrived before the supervisor waited for the target."""
    return _early_signals[0] if _early_signals else None


def start_for(args: list[str]) -> None:
    """Pre-start the target's process when the command line asks for ``check`` (the console
    script calls this before it imports the CLI); on any failure the CLI starts it the usual way.
    For the commands that run a target, Ctrl-C and SIGTERM are noted from now on (see
    :func:`early_signal`)."""
    global _pending
    if args[:1] == ["check"] and not os.environ.get("RACEGUARD_NO_PRESTART"):
        try:
            _pending = start()
            atexit.register(_discard_unused)
        except Exception:
            _pending = None
    if args[:1] in (["check"], ["stress"], ["replay"]):
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _note_signal)
