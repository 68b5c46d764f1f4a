"""Processes a checked process forks (``os.fork``, fork-started ``multiprocessing`` processes,
DataLoader workers, fork pools) stay checked.

A fork keeps its parent's session (its primitives, its dispatch mode) and gets a connection of its
own to the supervisor (:class:`~raceguard.process.workers.WorkerHub`), so that two processes
never interleave their lines: the sink's descriptor is swapped in the child, which then says
hello with its pid, labels its findings ``process PID``, streams its statistics every half
second (forked ``multiprocessing`` children end with ``os._exit``, which runs no ``atexit``) and
continues on a timeline of its own (:mod:`raceguard.multiprocess.clocks`).

Without the supervisor's socket (``--no-children``) forks stop reporting, as before.
"""

from __future__ import annotations

import _thread
import atexit
import json
import os
import socket
import time
from typing import Any, Callable

from ..multiprocess import state as mp_state
from .workers import ENV_VAR


def connect(path: str) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    fd = sock.detach()
    os.set_inheritable(fd, False)  # the process's own children connect for themselves
    return fd


def fork_label() -> str:
    return f"process {os.getpid()}"


class Labelled:
    """A sink that labels each finding's accesses with this process."""

    def __init__(self, sink: Any, label: Callable[[], str]) -> None:
        self.sink = sink
        self.label = label

    def __call__(self, event: dict) -> None:
        if event.get("type") == "finding":
            label = self.label()
            finding = event["finding"]
            event = {**event, "finding": {**finding, "accesses": [{**a, "process": a.get("process") or label} for a in finding["accesses"]]}}
        self.sink(event)


def _stats_heartbeat(session: Any, sink: Any) -> None:
    while not sink.broken:
        time.sleep(0.5)
        try:
            session.multiprocess.flush()  # a fork may end with os._exit at any time
            sink({"type": "stats", "stats": session.stats()})
        except Exception as exc:
            session.hook_failed("the heartbeat of a forked process", exc)


def socket_path(environ: Any = os.environ) -> str | None:
    raw = environ.get(ENV_VAR)
    if not raw:
        return None
    try:
        return json.loads(raw).get("socket")
    except ValueError:
        return None


def follow(session: Any, sink: Any, path: str | None, *, own_process: bool, label: Callable[[], str | None]) -> None:
    """Keep this process's forks checked, and model ``multiprocessing``'s hand-offs.

    ``sink`` writes to ``sink.fd``; ``own_process``: this is the process raceguard started, whose
    sink is the supervisor's pipe (its shared-storage accesses go on a connection of their own)."""
    if path is None:
        return
    if own_process:
        records = _RecordsChannel(path)
        send = records
    else:
        records = None
        send = sink
    try:
        mp = mp_state.install(session, send, label, os.path.dirname(path))
    except Exception as exc:  # forks detach and processes are checked one by one, as before
        session.hook_failed("modelling multiprocessing hand-offs", exc, ordering=True)
        session.shared_access = None
        return
    session.detach_on_fork = False
    # Registered after the worker's own end-of-session handler, so it runs before it.
    atexit.register(mp.flush)

    def in_parent() -> None:
        try:
            mp.after_fork_in_parent()
        except Exception as exc:
            session.hook_failed("recording a fork in the parent", exc, ordering=True)

    def in_child() -> None:
        try:
            old, sink.fd = sink.fd, connect(path)
            os.close(old)
            if records is not None:
                records.close()
            sink.broken = False
            session.sink = Labelled(sink, fork_label)
            sink({"type": "hello", "pid": os.getpid(), "process": fork_label()})
            mp.after_fork_in_child(sink)
            mp.shared.label = fork_label
            _thread.start_new_thread(_stats_heartbeat, (session, sink))
        except Exception:  # OSError: the supervisor is gone; anything else is raceguard's own
            sink.broken = True  # this fork runs unchecked, exactly as without raceguard
            session.shared_access = None

    os.register_at_fork(after_in_parent=in_parent, after_in_child=in_child)


class _RecordsChannel:
    """The target's own process: shared-storage accesses on a connection beside its pipe."""

    def __init__(self, path: str) -> None:
        self.fd: int | None = None
        self.path = path
        self.broken = False

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
        self.fd = None
        self.broken = True

    def __call__(self, event: dict) -> None:
        if self.broken:
            return
        try:
            if self.fd is None:
                self.fd = connect(self.path)
                self._write({"type": "hello", "pid": os.getpid(), "process": None, "records_only": True})
            self._write(event)
        except OSError:
            self.broken = True

    def _write(self, event: dict) -> None:
        data = (json.dumps(event, default=str) + "\n").encode()
        while data:
            data = data[os.write(self.fd, data):]
