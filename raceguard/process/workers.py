"""Python processes the target starts, checked too and reported in the same report.

torchrun's workers, ``multiprocessing`` with ``spawn`` or ``forkserver``,
``torch.multiprocessing.spawn`` and ``subprocess`` running ``sys.executable`` all start a *new*
Python, which inherits the environment. The supervisor listens on a unix socket and puts two
variables in the target's environment:

* ``RACEGUARD_WORKERS``: where to connect, and where raceguard itself is;
* ``PYTHONPATH``, with ``raceguard/process/bootstrap`` first: its ``sitecustomize.py`` runs in
  every such Python before its ``__main__``, takes its directory back out of ``sys.path``, runs
  the environment's own ``sitecustomize`` if there is one, then connects and starts a session
  exactly like the target's (:mod:`raceguard.process.child_worker`): instrumented primitives, the
  dispatch mode, findings streamed as JSON lines the moment they are made.

Each worker labels its accesses with its process (``rank 1`` once torch.distributed is
initialised there, else ``process PID``); :class:`WorkerHub` merges their findings into the
supervisor's collector, one finding per fingerprint listing every process it was seen in
(``details.processes``). A worker that crashes loses nothing already streamed; a timeout or a
Ctrl-C ends every worker that said hello too.

Forked children keep their parent's session and connect for themselves
(:mod:`raceguard.process.forks`). Storages in shared memory are checked across processes here:
every process streams its accesses to them, and :meth:`WorkerHub.finish` runs
:class:`~raceguard.multiprocess.crosscheck.CrossProcessCheck` once all have finished.

Left out: Pythons started with ``-I``, ``-E`` or ``-S`` or with an environment of their own
(they ignore or lack ``PYTHONPATH``), and multiprocessing's resource tracker (it never runs
target code).

This module is imported by :mod:`raceguard.prestart`: standard library only, no torch.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from typing import Any, Callable


ENV_VAR = "RACEGUARD_WORKERS"
# In the workers' socket directory: created by the supervisor to ask every checked process to
# report the lock-order cycles it has seen, before it ends the tree (a timeout, its own SIGTERM).
FLUSH_REQUEST = "flush-request"
BOOTSTRAP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bootstrap")


def for_each_json_line(recv: Callable[[], bytes], handle: Callable[[dict], None], bad: Callable[[Exception], None]) -> None:
    """Read JSON lines from ``recv`` (b"" at the end) into ``handle`` until the end; a line that
    does not parse, or that ``handle`` cannot take, goes to ``bad``. A partial last line means
    the writer died mid-write: it carries nothing complete and is dropped."""
    buffer = b""
    while True:
        chunk = recv()
        if not chunk:
            return
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                try:
                    handle(json.loads(line))
                except (ValueError, KeyError, TypeError) as exc:
                    bad(exc)


class Listener:
    """The socket workers connect to, bound before the target's process starts."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="raceguard-")
        self.path = os.path.join(self.dir, "workers.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(64)
        os.set_inheritable(self.sock.fileno(), False)

    def env(self, package_parent: str, environ: dict[str, str]) -> dict[str, str]:
        """What to add to the target's environment."""
        previous = environ.get("PYTHONPATH")
        config = {"socket": self.path, "package": package_parent, "pythonpath": previous}
        return {
            ENV_VAR: json.dumps(config),
            "PYTHONPATH": BOOTSTRAP_DIR + (os.pathsep + previous if previous else ""),
        }

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def forget_bootstrap(children: bool, environ: Any = os.environ) -> None:
    """In the target's own process, before its first line: the bootstrap ``sitecustomize`` ran
    there too (it only chained to the environment's own); leave no trace of it. With child
    checking off, also take the variables back out, so the target's children start as they
    would without raceguard."""
    import sys

    module = sys.modules.get("sitecustomize")
    if module is not None and os.path.dirname(os.path.abspath(getattr(module, "__file__", None) or "/")) == BOOTSTRAP_DIR:
        del sys.modules["sitecustomize"]
    if not children:
        scrub_environment(environ)


def scrub_environment(environ: Any = os.environ) -> None:
    """Take the variables :meth:`Listener.env` added back out of ``environ``."""
    raw = environ.pop(ENV_VAR, None)
    if raw is None:
        return
    try:
        previous = json.loads(raw).get("pythonpath")
    except ValueError:
        previous = None
    if previous is None:
        environ.pop("PYTHONPATH", None)
    else:
        environ["PYTHONPATH"] = previous


class _Worker:
    __slots__ = ("pid", "label", "stats", "exited", "done", "conn", "records_only", "index", "flushed")

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.pid: int | None = None
        self.label: str | None = None
        self.stats: dict = {}
        self.exited = False
        self.done = False  # its connection ended: the process is gone (or closed it)
        self.records_only = False  # the target's own process: shared-storage accesses only
        self.index = 0
        self.flushed = False  # it reported its lock-order cycles when asked (FLUSH_REQUEST)


class WorkerHub:
    """Accepts workers and feeds what they stream into the supervisor's collector.

    ``handle(event)`` is the collector's (called under ``lock``); findings from workers are
    merged here first: the same fingerprint from another process adds that process to
    ``details.processes`` instead of a second finding.
    """

    def __init__(self, listener: Listener, handle: Callable[[dict], None], lock: Any, by_fingerprint: dict) -> None:
        self.listener = listener
        self.handle = handle
        self.lock = lock
        self.by_fingerprint = by_fingerprint
        self.workers: list[_Worker] = []
        self.readers: list[threading.Thread] = []
        self._closing = False
        # Imported here, not at the top: the listener is made before the target's process starts
        # (raceguard.process.prestart), and this import (~18 ms) would delay that start.
        from ..multiprocess.crosscheck import CrossProcessCheck

        self.cross = CrossProcessCheck()
        self._accepter = threading.Thread(target=self._accept, name="raceguard-workers", daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        sock = self.listener.sock
        sock.settimeout(0.1)  # to notice finish(), after taking every connection already made
        while True:
            try:
                conn, _ = sock.accept()
            except socket.timeout:
                if self._closing:
                    return
                continue
            except OSError:
                return
            conn.settimeout(None)
            worker = _Worker(conn)
            reader = threading.Thread(target=self._read, args=(worker,), name="raceguard-worker-reader", daemon=True)
            with self.lock:
                worker.index = len(self.workers)
                self.workers.append(worker)
                self.readers.append(reader)
            reader.start()

    def _read(self, worker: _Worker) -> None:
        def recv() -> bytes:
            try:
                return worker.conn.recv(65536)
            except OSError:
                return b""

        def handle(event: dict) -> None:
            with self.lock:
                self._event(worker, event)

        try:
            with worker.conn:
                # An unreadable line: a worker killed mid-write, nothing complete in it.
                for_each_json_line(recv, handle, lambda exc: None)
        finally:
            with self.lock:
                worker.done = True

    def _event(self, worker: _Worker, event: dict) -> None:
        kind = event.get("type")
        if kind == "hello":
            worker.pid = event.get("pid")
            worker.label = event.get("process")
            worker.records_only = bool(event.get("records_only"))
        elif kind.startswith("mp-"):
            self.cross.add(worker.index, worker.pid, event)
        elif kind == "finding":
            finding = event["finding"]
            labels = [a.get("process") for a in finding.get("accesses", []) if a.get("process")]
            label = labels[0] if labels else worker.label
            known = self.by_fingerprint.get(finding.get("fingerprint"))
            if known is not None:
                seen = known.details.setdefault("processes", _processes_of(known))
                if label and label not in seen:
                    seen.append(label)
                    seen.sort(key=_label_order)
                return
            if label:
                finding.setdefault("details", {})["processes"] = [label]
            self.handle(event)
        elif kind in ("stats", "exit"):
            worker.stats = dict(event.get("stats") or {})
            if kind == "exit":
                worker.exited = True
        elif kind in ("also_on", "hook-error", "internal-error"):
            self.handle(event)
        elif kind == "cycles-flushed":
            worker.flushed = True
        # usage-error and target-exception describe the target's own process only

    def pids(self) -> list[int]:
        """Workers still connected: one that said "exit" may still hang in its shutdown; one
        whose connection ended is gone (and its pid may be another process's by now)."""
        with self.lock:
            return [w.pid for w in self.workers if w.pid and not w.done]

    def running(self) -> bool:
        """Whether a worker is still connected (still alive, or still being read)."""
        with self.lock:
            return any(not w.done for w in self.workers)

    def unflushed(self) -> int:
        """Workers still connected that have not yet answered a flush request."""
        with self.lock:
            return sum(1 for w in self.workers if not (w.done or w.flushed or w.records_only))

    def signal_all(self, sig: int) -> None:
        """End the tree: the target's own process is signalled by the supervisor."""
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def finish(self, grace: float) -> dict:
        """Wait up to ``grace`` seconds for workers still streaming, stop listening, and return
        their totals for the report's statistics."""
        deadline = time.monotonic() + grace
        self._closing = True
        self._accepter.join(timeout=1.0)
        self.listener.close()
        with self.lock:
            readers = list(self.readers)
        for reader in readers:
            reader.join(timeout=max(0.0, deadline - time.monotonic()))
        with self.lock:
            self._report_cross_process_races()
            workers = [w for w in self.workers if not w.records_only]
            totals = {"workers": len(workers), "threads": 0, "ops": 0, "internal_errors": 0, "dropped_reports": 0}
            for w in workers:
                for key in ("threads", "ops", "internal_errors", "dropped_reports"):
                    totals[key] += int(w.stats.get(key, 0) or 0)
        return totals


    def _report_cross_process_races(self) -> None:
        try:
            for event in self.cross.findings(cross_process_finding):
                self._event(self._nobody, event)
        except Exception as exc:  # raceguard's own failure: reported, never a traceback
            self.handle({"type": "internal-error", "message": f"checking shared storages across processes failed: {exc!r}"})

    @property
    def _nobody(self) -> "_Worker":
        worker = _Worker.__new__(_Worker)
        worker.label = None
        return worker


ORDERING_LOST_REASON = (
    "unreliable: one of these processes lost a synchronisation event to raceguard's own internal "
    "error, so the order seen across processes may be incomplete (see the report's 'incomplete')"
)

CROSS_PROCESS_HINT = (
    "these processes share the storage (shared memory) and nothing orders the two accesses: take one "
    "multiprocessing Lock (mp.Lock, created before the processes start) around every update and "
    "every read, or hand the tensor over through a queue or pipe; a Hogwild run that races on "
    "purpose: mark the parameters with raceguard.benign(model.parameters(), reason=\"hogwild\") "
    "in each process, or record the finding with --write-baseline and check with --baseline"
)


def cross_process_finding(a: Any, b: Any, unreliable: bool = False, also_on: list | None = None) -> dict:
    """A ``data-race`` finding (as the event a process would stream) for two records of
    :class:`~raceguard.multiprocess.crosscheck.CrossProcessCheck`."""
    from ..report.finding import Access, compute_fingerprint

    first, second = (a, b) if a.write else (b, a)
    accesses = [{k: v for k, v in x.site.items() if k != "_line_key"} for x in (first, second)]
    resource = first.resource

    def who(access: dict) -> str:
        return f"'{access['thread']}' ({access.get('process') or 'main process'})"

    message = (
        f"data race on {resource['name']} across processes: {accesses[0]['mode']} by {who(accesses[0])} "
        f"vs {accesses[1]['mode']} by {who(accesses[1])}"
    )
    why = (
        f"the storage is shared memory, and nothing orders these accesses across processes: no "
        f"Process.start/join, multiprocessing lock, queue, pipe or pool hand-off passes from "
        f"{who(accesses[0])} to {who(accesses[1])} or back between them"
    )
    fingerprint = compute_fingerprint("data-race", resource["root"], [Access.from_dict(x) for x in accesses])
    return {
        "type": "finding",
        "finding": {
            "kind": "data-race",
            "resource": resource["name"],
            "resource_kind": resource["kind"],
            "message": message,
            "accesses": accesses,
            "fingerprint": fingerprint,
            "hint": CROSS_PROCESS_HINT,
            "details": {
                "why": why,
                "bytes": [max(a.lo, b.lo), min(a.hi, b.hi)],
                "across_processes": True,
                **({"also_on": also_on} if also_on else {}),
            },
            **_suppressed(first, second, unreliable),
        },
    }


def _suppressed(a: Any, b: Any, unreliable: bool) -> dict:
    if unreliable:
        return {"suppressed": ORDERING_LOST_REASON}
    benign = a.resource.get("benign") or b.resource.get("benign")
    return {"suppressed": f"raceguard.benign: {benign}"} if benign else {}


def _processes_of(finding: Any) -> list[str]:
    labels = []
    for access in finding.accesses:
        label = access.process or "main process"
        if label not in labels:
            labels.append(label)
    return labels[:1]


def _label_order(label: str) -> tuple:
    """``rank 2`` before ``rank 10``; ranks before pids; the target's own process first."""
    kind, _, number = label.partition(" ")
    order = {"main": 0, "rank": 1}.get(kind, 2)
    return (order, int(number) if number.isdigit() else 0, label)
