"""A worker process of a checked multi-process job: its session, streaming to the supervisor.

Started by ``raceguard/process/bootstrap/sitecustomize.py`` in every Python the target starts
with ``sys.executable`` (see :mod:`raceguard.workers`), before the worker's ``__main__``. It sets up
what :mod:`raceguard.process.child` sets up for the target's own process (instrumented
primitives, the dispatch mode in the main thread, the heartbeat with its deadlock watchdog and
lock-order cycles when the supervisor asks), with two differences: the worker's own interpreter runs its
``__main__`` (nothing to run here), and every finding's accesses carry the process they
happened in (``rank 1``, else ``process PID``), so that one report can say where.

If the supervisor cannot be reached the worker runs unchecked, exactly as without raceguard.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys

from . import child, forks
from .child import PipeSink, mark_checked

# Processes that never run the target's code: not worth torch's import.
SKIP_COMMANDS = ("from multiprocessing.resource_tracker import main",)


def process_label(known: list) -> str:
    """``rank N`` once torch.distributed is initialised in this process (remembered after it is
    destroyed: a report at exit still names the rank), else ``process PID``."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            known[:] = [dist.get_rank()]
    except Exception:
        pass
    return f"rank {known[0]}" if known else f"process {os.getpid()}"


class ProcessSink(PipeSink):
    """A :class:`~raceguard.process.child.PipeSink` on the worker's socket that labels each
    finding's accesses with this process."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.rank: list = []

    def __call__(self, event: dict) -> None:
        if event.get("type") == "finding":
            label = process_label(self.rank)
            finding = event["finding"]
            event = {**event, "finding": {**finding, "accesses": [{**a, "process": label} for a in finding["accesses"]]}}
        super().__call__(event)


def _connect(path: str) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    fd = sock.detach()
    os.set_inheritable(fd, False)  # the worker's own children connect for themselves
    return fd


def start(config: dict) -> None:
    orig_argv = getattr(sys, "orig_argv", [])
    if any(part.startswith(SKIP_COMMANDS) for part in orig_argv):
        return
    try:
        fd = _connect(config["socket"])
    except OSError:
        return  # the supervisor is gone (or child checking is off): run unchecked
    mark_checked()
    sink = ProcessSink(fd)
    sink({"type": "hello", "pid": os.getpid(), "process": process_label(sink.rank), "argv": orig_argv})
    try:
        _activate(sink, config)
    except Exception as exc:  # the worker runs unchecked, exactly as without raceguard
        sink({"type": "internal-error", "message": f"could not check worker process {os.getpid()}: {exc!r}"})


def _activate(sink: ProcessSink, config: dict) -> None:
    own_modules = set(sys.modules)
    session, state = child.start_session(sink, config, own_modules, child.import_torch_quietly())
    # A fork of a worker (a forkserver's pool workers) stays checked: it reconnects to the
    # supervisor with a socket of its own, so its lines never interleave with this one's.
    forks.follow(session, sink, config["socket"], own_process=False, label=lambda: process_label(sink.rank))

    def at_exit() -> None:
        # Registered first, so it runs last: after the worker's own atexit handlers. Contained:
        # an escape would print "Exception ignored in atexit callback" on the worker's stderr.
        child.wait_for_ended_threads(session)
        try:
            session.report_lock_cycles()
            session.leave_thread(state, None)
            stats = session.stats()
        except Exception as exc:
            session.hook_failed("ending the worker's session", exc)
            stats = {}
        try:
            sink({"type": "exit", "code": None, "outcome": "exit", "stats": stats})
        except Exception:  # the supervisor is gone: nothing left to tell
            pass

    atexit.register(at_exit)
