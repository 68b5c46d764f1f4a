"""What runs beside a schedule: the watchdog and ``time.sleep`` in virtual time.

Shared by both places a schedule runs: a child forked by ``raceguard stress`` / ``replay``
(:mod:`.runchild`) and an in-process schedule (:mod:`.inprocess`, behind the pytest marker and
the Hypothesis front end).

The watchdog is a raw ``_thread`` thread (never managed, never instrumented). It

* takes the baton away from a holder that reached no scheduling point for :data:`IDLE_STALL`
  while the process was idle (the thread sleeps in the OS: I/O, a raw lock, a C extension's
  wait), or for :data:`BUSY_STALL` while it burns CPU (a spin loop without scheduling points):
  :meth:`Scheduler.steal`;
* ends the schedule when its time limit passes (``on_timeout``).
"""

from __future__ import annotations

import _thread
import os
import sys
import time
from typing import Any, Callable

from .scheduler import Scheduler

IDLE_STALL = 0.05
BUSY_STALL = 2.0
WATCHDOG_PERIOD = 0.01

# time.sleep as it was when raceguard was imported: the watchdog's own sleep.
_orig_sleep = time.sleep


def start_watchdog(
    sched: Scheduler,
    *,
    started: float,
    timeout: float | None,
    on_timeout: Callable[[], None],
    stalls: list[str],
) -> None:
    """Start the watchdog thread; it ends when ``sched.stopped`` is set. ``stalls`` receives
    where it found stalled holders (at most 10): the places where the schedule stopped being
    strictly deterministic, for the schedule's statistics."""
    _thread.start_new_thread(_watchdog, (sched, started, timeout, on_timeout, stalls))


def _watchdog(sched: Scheduler, started: float, timeout: float | None, on_timeout: Callable[[], None], stalls: list[str]) -> None:
    own = _thread.get_native_id()
    marker = sched.progress
    since = time.monotonic()
    cpu_since = time.process_time()
    while not sched.stopped:
        _orig_sleep(WATCHDOG_PERIOD)
        now = time.monotonic()
        if timeout is not None and now - started >= timeout:
            if not sched.stopped:
                on_timeout()
            return
        progress = sched.progress
        holder = sched.holder
        # A holder inside a known, short native wait (Thread.start's handshake, the final
        # native join of a thread that has logically finished) is not stalled.
        if progress != marker or holder is None or not holder.admitted or holder.raw:
            marker = progress
            since = now
            cpu_since = time.process_time()
            continue
        stalled = now - since
        if stalled < IDLE_STALL:
            continue
        cpu = (time.process_time() - cpu_since) / stalled
        idle = cpu < 0.25 and not _any_thread_running(own)
        if idle or stalled >= BUSY_STALL:
            where = _where(holder.ident)
            if sched.steal(marker):
                marker = sched.progress
                if len(stalls) < 10:
                    stalls.append(where)
            since = now
            cpu_since = time.process_time()


def virtual_sleep(sched: Scheduler) -> Any:
    """A ``time.sleep`` replacement: a yield in virtual time for managed threads, the real
    sleep for every other thread."""

    def sleep(secs: float) -> None:
        """time.sleep under raceguard's scheduler: a yield in virtual time (see raceguard.schedule)."""
        if not isinstance(secs, (int, float)):
            return _orig_sleep(secs)  # raises the original TypeError
        if secs < 0:
            raise ValueError("sleep length must be non-negative")
        try:
            t = sched.current()
            if t is not None:
                sched.yield_(t, float(secs))
                return None
        except Exception as exc:  # the scheduler's failure: this yield is lost, the sleep returns
            _point_failed("taking a scheduling point in time.sleep", exc)
            return None
        return _orig_sleep(secs)

    sleep.__wrapped__ = _orig_sleep  # type: ignore[attr-defined]
    sleep.__module__, sleep.__qualname__ = _orig_sleep.__module__, _orig_sleep.__qualname__
    return sleep


def yield_hook(sched: Scheduler) -> Callable[[], None]:
    """What ``raceguard.yield_point()`` calls while ``sched`` runs."""

    def hook() -> None:
        try:
            t = sched.current()
            if t is not None:
                sched.yield_(t)
        except Exception as exc:
            _point_failed("taking a scheduling point in raceguard.yield_point()", exc)

    return hook


def _point_failed(what: str, exc: BaseException) -> None:
    """A scheduling point the target's own call took failed inside the scheduler: counted as the
    session's internal error (``Session.hook_failed``), never raised into the target.
    ScheduleAborted / ScheduleDeadlocked are BaseExceptions and pass, as they must."""
    from ..capture import session as session_mod

    s = session_mod.ACTIVE
    if s is not None:
        s.hook_failed(what, exc)


def _where(ident: int | None) -> str:
    frame = sys._current_frames().get(ident) if ident is not None else None
    parts = []
    while frame is not None and len(parts) < 4:
        code = frame.f_code
        parts.append(f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return " < ".join(parts) or "unknown"


def _any_thread_running(own: int) -> bool:
    """Whether a thread of this process other than the watchdog is running or waiting for a CPU
    (the holder computing, or intra-op worker threads it waits for on a loaded machine)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return False
    for task in tasks:
        if task.isdigit() and int(task) != own and thread_state(int(task)) == "R":
            return True
    return False


def thread_state(native_id: int | None) -> str | None:
    """The kernel's state letter of a thread (R running, S sleeping, D disk wait...), if known."""
    if native_id is None:
        return None
    try:
        with open(f"/proc/self/task/{native_id}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:][:1].decode()
    except (OSError, ValueError):
        return None
