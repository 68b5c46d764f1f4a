"""Runs the target in a child process and collects what it streams back.

The race raceguard reports may kill the process it happens in (two threads corrupting the heap
through ``zero_grad``/``backward`` segfault a few percent of runs), so the target never runs in
this process: a child runs it (:mod:`raceguard.process.child`) and streams findings over a pipe
as they are made. This process imports neither torch nor the target; it only waits, enforces the
timeout, turns Ctrl-C into "stop and report what was found", and says how the target ended.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import prestart
from .workers import FLUSH_REQUEST
from ..report.document import NOT_STARTED
from ..report.finding import Finding

# Grace periods: after Ctrl-C the child gets this long to unwind before it is interrupted again,
# then killed; after a timeout, SIGTERM is followed by SIGKILL.
INTERRUPT_GRACE = 2.0
KILL_GRACE = 3.0
# After the target's process ended, how long its Python children may go on streaming findings
# before the report is written without the rest (torchrun and spawn wait for theirs anyway).
WORKER_GRACE = 5.0
# Before a timeout or raceguard's own SIGTERM ends the tree, every checked process is asked to
# report the lock-order cycles it has seen (its heartbeat thread looks for the request every
# 0.1 s, see raceguard.process.child) and gets this long to answer. No signal handler in the
# target does it: one runs only when the main thread runs Python code, so a target blocked in
# C++ (a collective, a future's wait) would no longer die of SIGTERM as under plain python.
FLUSH_WAIT = 1.0


@dataclass
class RunResult:
    findings: list[Finding] = field(default_factory=list)
    target_exit_code: int | None = None
    # {"kind": exit|signal|timeout|interrupted|exception|usage-error, "code", "signal", "detail"}
    outcome: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    usage_error: str | None = None
    internal_errors: list[str] = field(default_factory=list)
    # Failures of raceguard's hooks inside the target, contained there: {"message", "traceback"}.
    hook_errors: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0


class _Collector:
    """Parses the child's JSON lines as they arrive."""

    def __init__(self, on_finding: Callable[[Finding], None] | None) -> None:
        self.result = RunResult()
        self.by_fingerprint: dict[str, Finding] = {}
        self.exit_message: dict | None = None
        self.target_exception: str | None = None
        self.target_started = False  # the child is about to run the target's first line
        self.cycles_flushed = False  # the target's process answered the flush request
        self.on_finding = on_finding
        # The target's process and its Python children (raceguard.workers) report concurrently.
        self.lock = threading.Lock()

    def handle(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "finding":
            finding = Finding.from_dict(event["finding"])
            if finding.fingerprint in self.by_fingerprint:
                return
            self.by_fingerprint[finding.fingerprint] = finding
            self.result.findings.append(finding)
            if self.on_finding is not None:
                self.on_finding(finding)
        elif kind == "also_on":
            finding = self.by_fingerprint.get(event["fingerprint"])
            if finding is not None:
                also = finding.details.setdefault("also_on", [])
                if event["resource"] not in also and event["resource"] != finding.resource:
                    also.append(event["resource"])
        elif kind == "stats":
            self.result.stats.update(event["stats"])
        elif kind == "exit":
            self.exit_message = event
            self.result.stats.update(event.get("stats", {}))
        elif kind == "usage-error":
            self.result.usage_error = event["message"]
        elif kind == "internal-error":
            self.result.internal_errors.append(event.get("message", "unknown error"))
        elif kind == "hook-error":
            self.result.hook_errors.append(event)
        elif kind == "target-exception":
            self.target_exception = event.get("exception")
        elif kind == "target-started":
            self.target_started = True
        elif kind == "cycles-flushed":
            self.cycles_flushed = True

    def read(self, fd: int) -> None:
        from .workers import for_each_json_line

        def handle(event: dict) -> None:
            with self.lock:
                self.handle(event)

        def bad(exc: Exception) -> None:
            self.result.internal_errors.append(f"unreadable message from the target process: {exc}")

        with os.fdopen(fd, "rb", buffering=0) as stream:
            for_each_json_line(lambda: stream.read(65536), handle, bad)


def run_target(
    *,
    script: str | None = None,
    module: str | None = None,
    args: tuple[str, ...] = (),
    timeout: float | None = None,
    max_reports: int | None = None,
    on_finding: Callable[[Finding], None] | None = None,
    python: str | None = None,
    on_started: Callable[[], None] | None = None,
    children: bool = True,
    simulate_cuda: bool = False,
) -> RunResult:
    """Run ``python SCRIPT ARGS`` (or ``-m MODULE``) under instrumentation and collect findings.

    ``on_started`` runs once the child is started, while it imports torch: the place for work
    this process needs only afterwards (importing the report layer), off the critical path.
    ``children``: check the Python processes the target starts too (:mod:`raceguard.workers`).
    ``simulate_cuda``: the target's CUDA runs on a simulated device in CPU memory.
    """
    crash = tempfile.NamedTemporaryFile(prefix="raceguard-crash-", suffix=".log", delete=False)
    crash.close()
    config = {
        "script": script,
        "module": module,
        "args": list(args),
        "max_reports": max_reports,
        "crash_log": crash.name,
        "children": children,
        "simulate_cuda": simulate_cuda,
    }
    collector = _Collector(on_finding)
    started = time.monotonic()
    # Started by the entry point, importing torch since (see raceguard.prestart), or now.
    child = prestart.take(python) or prestart.start(python)
    proc, read_fd = child.proc, child.read_fd
    hub = None
    if child.listener is not None:
        if children:
            from .workers import WorkerHub

            hub = WorkerHub(child.listener, collector.handle, collector.lock, collector.by_fingerprint)
        else:
            child.listener.close()

    def signal_tree(sig: int) -> None:
        _signal(proc, sig)
        if hub is not None:
            hub.signal_all(sig)

    # Where the flush request goes: the workers look in their socket's directory.
    flush_path = os.path.join(hub.listener.dir, FLUSH_REQUEST) if hub is not None else crash.name + ".flush"
    config["flush_request"] = flush_path
    try:
        child.send(config)
    except OSError:
        pass  # the child is already gone: its exit status says why
    reader = threading.Thread(target=collector.read, args=(read_fd,), name="raceguard-reader", daemon=True)
    reader.start()

    interrupted = {"at": None}
    terminated = {"at": None}  # SIGTERM to raceguard itself (CI cancelling, `timeout`, `kill`)

    def on_sigint(signum: int, frame: Any) -> None:
        if interrupted["at"] is None:
            interrupted["at"] = time.monotonic()

    def on_sigterm(signum: int, frame: Any) -> None:
        if terminated["at"] is None:
            terminated["at"] = time.monotonic()

    # Held until every worker is accounted for: a second Ctrl-C while the workers unwind must
    # not kill this process and leave them running without a report.
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, on_sigint)
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_sigterm)
    # Ctrl-C or SIGTERM while the command line got ready (raceguard.prestart noted it).
    early = prestart.early_signal()
    if early == "SIGINT":
        on_sigint(signal.SIGINT, None)
    elif early == "SIGTERM":
        on_sigterm(signal.SIGTERM, None)
    # Ending the tree on --timeout or our own SIGTERM: a flush request, answered or FLUSH_WAIT
    # passed, then SIGTERM, then SIGKILL after KILL_GRACE.
    timed_out = terminating = False
    flush_until = None
    forwarded = killed = False
    kill_at = killed_at = 0.0
    if on_started is not None:
        try:
            on_started()
        except Exception:  # a warm-up only: whatever it needs is imported again later
            pass
    exited = _exit_waiter(proc)
    target_done = False
    workers_until = 0.0
    try:
        deadline = started + timeout if timeout else None
        while True:
            if not target_done and exited(0.05):
                target_done = True
                workers_until = time.monotonic() + WORKER_GRACE
            now = time.monotonic()
            ending = terminating or interrupted["at"] is not None
            if target_done:
                # Its Python children may still stream findings. A run that is being ended
                # (timeout, Ctrl-C, SIGTERM) ends them too, with the same escalation as the
                # target's; otherwise they get WORKER_GRACE and are left to themselves.
                if hub is None or not hub.running():
                    break
                if not ending and now > workers_until:
                    break
                time.sleep(0.05)
                now = time.monotonic()
            if killed and now > killed_at + KILL_GRACE:
                break  # still there after SIGKILL (stuck in the kernel): report without them
            if interrupted["at"] is not None:
                # A terminal Ctrl-C reaches the child too; forward one only if it did not end.
                if not forwarded and now - interrupted["at"] > INTERRUPT_GRACE:
                    signal_tree(signal.SIGINT)
                    forwarded = True
                elif forwarded and not killed and now - interrupted["at"] > INTERRUPT_GRACE + KILL_GRACE:
                    signal_tree(signal.SIGKILL)
                    killed, killed_at = True, now
            if deadline is not None and now > deadline and not target_done and not terminating:
                timed_out = True
            if (timed_out or terminated["at"] is not None) and not terminating:
                if flush_until is None:
                    flush_until = now + FLUSH_WAIT
                    _touch(flush_path)
                answered = (collector.cycles_flushed or target_done or not collector.target_started) and (
                    hub is None or not hub.unflushed()
                )
                if answered or now > flush_until:
                    terminating = True
                    signal_tree(signal.SIGTERM)
                    kill_at = now + KILL_GRACE
            if terminating and not killed and now > kill_at:
                signal_tree(signal.SIGKILL)
                killed, killed_at = True, now
        reader.join(timeout=5.0)
        if hub is not None:
            if terminating or killed:
                hub.signal_all(signal.SIGKILL)  # what the target's process left behind ends with it
            # The wait above is over: only connections accepted last are still to be drained.
            _add_worker_stats(collector, hub.finish(max(0.5, workers_until - time.monotonic())))
    finally:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)
    result = collector.result
    result.wall_seconds = time.monotonic() - started
    rc = proc.returncode
    crash_text = _read_and_remove(crash.name)
    if hub is None:
        _read_and_remove(flush_path)

    if result.usage_error is not None:
        result.outcome = {"kind": "usage-error", "code": 2, "signal": None, "detail": result.usage_error}
        return result
    exit_message = collector.exit_message
    if (terminated["at"] is not None or interrupted["at"] is not None) and not collector.target_started:
        # Still importing torch or waiting for its configuration: none of the target ran, so
        # there is nothing to report as clean, and the child kept quiet (raceguard.process.child).
        sent = "SIGTERM" if terminated["at"] is not None else None
        result.outcome = {"kind": "interrupted", "code": None, "signal": sent, "detail": NOT_STARTED}
    elif terminated["at"] is not None:
        result.target_exit_code = exit_message["code"] if exit_message else None
        result.outcome = {
            "kind": "interrupted",
            "code": result.target_exit_code,
            "signal": "SIGTERM",
            "detail": "raceguard received SIGTERM: the target and its workers were ended",
        }
    elif timed_out:
        result.outcome = {"kind": "timeout", "code": None, "signal": None, "detail": f"timed out after {timeout:g} s"}
    elif interrupted["at"] is not None or (exit_message and exit_message.get("outcome") == "interrupted"):
        result.target_exit_code = exit_message["code"] if exit_message else None
        result.outcome = {"kind": "interrupted", "code": result.target_exit_code, "signal": None, "detail": "interrupted (Ctrl-C)"}
    elif exit_message is not None and exit_message.get("outcome") == "deadlock":
        result.outcome = {"kind": "deadlock", "code": None, "signal": None, "detail": "deadlocked; stopped by raceguard"}
    elif rc is not None and rc < 0:
        name = _signal_name(-rc)
        detail = f"killed by {name}"
        if crash_text.strip():
            detail += "\n" + crash_text.strip()[:8000]
        result.outcome = {"kind": "signal", "code": None, "signal": name, "detail": detail}
    elif exit_message is None:
        result.target_exit_code = rc
        result.outcome = {
            "kind": "exit",
            "code": rc,
            "signal": None,
            "detail": f"exited abruptly with code {rc} (os._exit or a native abort) before Python shut down",
        }
    else:
        result.target_exit_code = exit_message["code"]
        kind = "exception" if exit_message.get("outcome") == "exception" else "exit"
        detail = collector.target_exception if kind == "exception" else None
        result.outcome = {"kind": kind, "code": exit_message["code"], "signal": None, "detail": detail}
    return result


def _add_worker_stats(collector: _Collector, totals: dict) -> None:
    """The workers' threads and ops count in the report's totals, once the target's are in."""
    if not totals["workers"]:
        return
    with collector.lock:
        stats = collector.result.stats
        for key in ("threads", "ops", "internal_errors", "dropped_reports"):
            if totals[key]:
                stats[key] = int(stats.get(key, 0) or 0) + totals[key]
        stats["processes"] = 1 + totals["workers"]


def _exit_waiter(proc: subprocess.Popen) -> Callable[[float], bool]:
    """``exited(seconds)``: wait up to that long for the child to end, reaping it. Through a
    pidfd where the platform has one, so the end is seen at once: ``Popen.wait(timeout)`` polls
    with sleeps of up to 50 ms, all of it wall time added to every run."""
    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError:
            pidfd = None
    if pidfd is None:

        def exited(seconds: float) -> bool:
            try:
                proc.wait(timeout=seconds)
                return True
            except subprocess.TimeoutExpired:
                return False

        return exited

    def exited_fd(seconds: float) -> bool:
        nonlocal pidfd
        if pidfd is None:
            return proc.wait() is not None
        try:
            select.select([pidfd], [], [], seconds)
        except (OSError, ValueError):
            time.sleep(seconds)
        if proc.poll() is None:
            return False
        os.close(pidfd)
        pidfd = None
        return True

    return exited_fd


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except (ProcessLookupError, OSError):
        pass


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _touch(path: str) -> None:
    try:
        with open(path, "w"):
            pass
    except OSError:  # the processes then get FLUSH_WAIT and end without answering
        pass


def _read_and_remove(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
