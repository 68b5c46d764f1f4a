"""``target-failure`` findings: how one schedule of the target failed (raised, exited non-zero,
timed out, crashed). Pure Python, no torch.

The fingerprint is built like every other one (kind, resource, user frames), so the same
assertion failing at the same line under many schedules is one bug with one fingerprint, while
a different failure site is a different bug.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Iterable

from ..report.finding import Access, Finding, Frame, compute_fingerprint
from ..capture.stacks import render_site, site_of_frame, site_of_traceback

_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def format_traceback(exc: BaseException) -> str:
    """The traceback as the interpreter prints it, without raceguard's own frames on top."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_HERE):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def exception_failure(exc: BaseException, thread: str = "MainThread") -> Finding:
    """The target's main thread raised ``exc`` (an uncaught exception)."""
    exc_text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    stack = render_site(site_of_traceback(exc.__traceback__))
    access = Access(thread=thread, timeline=f"thread:{thread}", mode="raise", op=None, stack=stack)
    name = type(exc).__name__
    return Finding(
        kind="target-failure",
        resource=f"thread '{thread}'",
        resource_kind="thread",
        message=f"the target failed under this schedule: {exc_text}",
        accesses=[access],
        fingerprint=compute_fingerprint("target-failure", name, [access]),
        hint="an interleaving the program does not tolerate: replay the schedule, read the "
        "failing check, and find the shared state two threads touch without an order",
        details={"traceback": format_traceback(exc), "exception": exc_text},
    )


def exit_failure(code: int, exc: BaseException | None = None) -> Finding:
    """The target called ``sys.exit(code)`` with a non-zero code."""
    stack = render_site(site_of_traceback(exc.__traceback__)) if exc is not None else []
    access = Access(thread="MainThread", timeline="thread:MainThread", mode="raise", op=None, stack=stack)
    details: dict[str, Any] = {"exit_code": code}
    if exc is not None:
        details["traceback"] = format_traceback(exc)
    return Finding(
        kind="target-failure",
        resource="thread 'MainThread'",
        resource_kind="thread",
        message=f"the target exited with code {code} under this schedule",
        accesses=[access],
        fingerprint=compute_fingerprint("target-failure", f"exit {code}", [access]),
        hint="the program reported a failure under this interleaving: replay the schedule to see why",
        details=details,
    )


def timeout_failure(seconds: float, frames: Iterable[tuple[str, Any]] = ()) -> Finding:
    """The schedule ran longer than ``--timeout``; ``frames`` are (thread name, frame) pairs.

    Its fingerprint leaves the stacks out: they say where each thread happened to be when the
    time ran out, which differs from schedule to schedule, so the schedules that time out are one
    finding (``stress`` counts them), not one per schedule."""
    accesses = []
    for name, frame in frames:
        stack = render_site(site_of_frame(frame)) if frame is not None else []
        accesses.append(Access(thread=name, timeline=f"thread:{name}", mode="wait", op=None, stack=stack))
    return Finding(
        kind="target-failure",
        resource="schedule timeout",
        resource_kind="thread",
        message=f"the target did not finish within {seconds:g} s under this schedule",
        accesses=accesses,
        fingerprint=compute_fingerprint("target-failure", "timeout", []),
        hint="a livelock or a wait raceguard cannot see (I/O, a C extension): the stacks show "
        "where each thread was; raise --timeout if the program is just slow",
        details={"timeout_seconds": seconds},
    )


def is_timeout(finding: Finding) -> bool:
    """Whether ``finding`` is a schedule's timeout (:func:`timeout_failure`)."""
    return finding.kind == "target-failure" and "timeout_seconds" in finding.details


def crash_failure(signal_name: str | None, code: int | None, detail: str | None = None) -> Finding:
    """The schedule's process died without reporting (a signal, or os._exit)."""
    what = f"was killed by {signal_name}" if signal_name else f"exited abruptly with code {code}"
    details: dict[str, Any] = {}
    if detail:
        details["output"] = detail
    return Finding(
        kind="target-failure",
        resource="target process",
        resource_kind="thread",
        message=f"the target process {what} under this schedule",
        accesses=[],
        fingerprint=compute_fingerprint("target-failure", f"crash {signal_name or code}", []),
        hint="a native crash (two threads corrupting a tensor's memory can do this) or os._exit: "
        "replay the schedule under a debugger",
        details=details,
    )


def all_thread_frames(names: dict[int, str]) -> list[tuple[str, Any]]:
    """(name, innermost frame) of every thread whose ident is in ``names``, main thread first."""
    frames = sys._current_frames()
    out = []
    for ident, name in names.items():
        frame = frames.get(ident)
        if frame is not None:
            out.append((name, frame))
    return out


__all__ = [
    "Frame",
    "all_thread_frames",
    "crash_failure",
    "exception_failure",
    "exit_failure",
    "format_traceback",
    "is_timeout",
    "timeout_failure",
]


def generic_deadlock_failure(blocked: Iterable[Any]) -> Finding:
    """Every managed thread is blocked and the wait-for graph did not describe why (a wait on
    an object it does not model): report the blocked threads and what each waits on."""
    accesses = [
        Access(thread=t.name, timeline=f"thread:{t.name}", mode="wait", op=None, details={"waits_for": repr(t.key)})
        for t in blocked
    ]
    return Finding(
        kind="deadlock",
        resource="threads",
        resource_kind="thread",
        message="deadlock: every thread is blocked and nothing can wake them",
        accesses=accesses,
        fingerprint=compute_fingerprint("deadlock", "threads", accesses),
    )
