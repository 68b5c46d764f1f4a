"""Controlled schedules in the current process (the pytest marker and the Hypothesis front end).

``raceguard stress`` runs every schedule in a fresh child forked from a fork server, so a schedule
can end the process whatever it does. Inside a test suite the schedule must run in the test's own
process, on the test's own objects, and leave the process as it found it: :func:`run_schedule`
attaches a :class:`~raceguard.schedule.scheduler.Scheduler` to the active capture session (or
to a session of its own), runs ``body`` in the calling thread as thread 0 — every thread started
inside it is managed — waits for the non-daemon threads it left running, and detaches.

Ending a schedule that cannot finish
    A deadlock (every managed thread blocked for good), the time limit, or threads still waiting
    for their turn when the run ends (daemon threads) cannot end the process here. The scheduler
    is *aborted* instead: every managed thread unwinds with
    :class:`~raceguard.schedule.scheduler.ScheduleAborted` (a ``SystemExit``: ``except
    Exception`` does not catch it, and ``threading`` ends a thread it escapes silently) at its
    next scheduling point, and runs with plain primitives while it unwinds. A thread that never
    reaches a scheduling point again (stuck in an uninstrumented call) is left behind; the run
    notes how many.

raceguard's own failure
    When the scheduler itself fails halfway through handing control over between threads, the
    schedule is aborted the same way, the session counts the failure (``incomplete`` in its
    report), and :func:`run_schedule` raises
    :class:`~raceguard.schedule.scheduler.SchedulerError` once the run is cleaned up: never an
    exception that could pass for the test's own, nor a deadlock or timeout of the test's.

Determinism
    The schedule is fixed by the strategy. With ``seed`` given, Python's ``random`` and torch's
    default generator are seeded from it for the run and restored afterwards, so a test that
    draws random numbers draws the same ones when the schedule is replayed.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..capture import session as session_mod
from ..report.finding import Finding
from . import hooks
from .failures import generic_deadlock_failure
from .scheduler import ScheduleAborted, Scheduler, SchedulerError
from .strategies import CALIBRATION_SEED, Strategy
from .watchdog import start_watchdog, virtual_sleep, yield_hook

DEFAULT_TIMEOUT = 60.0
# How long the end of a run waits for aborted threads to unwind before leaving them behind.
UNWIND_SECONDS = 2.0


class NestedScheduleError(RuntimeError):
    """A controlled schedule was started inside another one."""


@dataclass
class ScheduledRun:
    """What one in-process schedule did."""

    value: Any = None
    # The body's own exception (never ScheduleAborted), re-raised by the front ends.
    error: BaseException | None = None
    # Blocked threads and what each waited on, when the run ended in a deadlock.
    deadlock: list[str] | None = None
    timed_out: bool = False
    # Findings at or above the session's fail_on that this run added (data races, deadlocks,
    # exceptions escaping threads). Empty when the session is not raceguard's own in-process one.
    findings: list[Finding] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    # Threads that were still alive after the run had ended and unwound (not joinable).
    left_behind: int = 0
    # The report of the run's own session (None when it attached to an active session).
    report: Any = None
    # raceguard's scheduler failed in a hand-over and the schedule was abandoned: raised by
    # run_schedule (never the body's failure, whatever the body raised while it unwound).
    internal_error: SchedulerError | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None or self.deadlock is not None or self.timed_out or bool(self.findings)

    def describe_failure(self) -> str:
        """One line: why this run failed."""
        if self.deadlock is not None:
            return "deadlock: " + "; ".join(self.deadlock)
        if self.timed_out:
            return "the schedule did not finish within its time limit"
        if self.error is not None:
            text = f"{type(self.error).__name__}: {self.error}".strip()
            return text.splitlines()[0] if text else type(self.error).__name__
        if self.findings:
            f = self.findings[0]
            more = f" (+{len(self.findings) - 1} more)" if len(self.findings) > 1 else ""
            return f"{f.kind} on {f.resource}{more}"
        return "passed"


def run_schedule(
    body: Callable[[], Any],
    strategy: Strategy,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    seed: int | None = None,
    label: str = "<schedule>",
    main_globals: dict | None = None,
) -> ScheduledRun:
    """Run ``body()`` in the calling thread under ``strategy``; never raises for the body's
    failures (they are in the result), only for KeyboardInterrupt, misuse, and raceguard's own
    failure: :class:`~raceguard.schedule.scheduler.SchedulerError` when its scheduler broke
    halfway through a hand-over between threads (the schedule was abandoned).

    Capture: when a raceguard session is active in this process (a test under the pytest
    plugin, a ``watch()`` block, a program under ``raceguard check``), the schedule attaches to
    it and its findings go there. Otherwise the run gets a session of its own for its duration,
    and ``ScheduledRun.findings`` lists what it found.
    """
    active = session_mod.ACTIVE
    own = None
    if active is not None:
        if active.sched is not None:
            raise NestedScheduleError("raceguard: a controlled schedule is already running; schedules cannot nest")
        capture = active
    else:
        from ..api import WatchSession

        own = WatchSession(label=label, main_globals=lambda: main_globals, owner=f"a raceguard schedule ({label})")
        own._start()
        capture = own._capture
    watcher = getattr(capture, "owner", None)
    before = {f.fingerprint for f in watcher.findings} if watcher is not None and hasattr(watcher, "findings") else None
    run = ScheduledRun()
    saved_rngs = _seed_generators(seed) if seed is not None else None
    try:
        _run_attached(capture, body, strategy, timeout, run)
    finally:
        if saved_rngs is not None:
            _restore_generators(saved_rngs)
        if own is not None:
            own._stop(run.error)
            run.report = own.report()
    if watcher is not None and before is not None:
        run.findings = [f for f in watcher.failing_findings() if f.fingerprint not in before]
    if isinstance(run.error, KeyboardInterrupt):
        raise run.error
    if run.internal_error is not None:
        run.internal_error.run = run  # type: ignore[attr-defined]
        raise run.internal_error
    return run


def _run_attached(capture: Any, body: Callable[[], Any], strategy: Strategy, timeout: float | None, run: ScheduledRun) -> None:
    draining = False
    stalls: list[str] = []

    def on_deadlock(sched: Scheduler, blocked: list) -> None:
        if not draining:
            run.deadlock = [f"{t.name} waits on {_describe_key(capture, t.key)}" for t in blocked]
            try:
                deadlock = capture.check_all_blocked()
                if deadlock is not None:
                    capture.report_deadlock(deadlock)
                else:
                    capture.emit({"type": "finding", "finding": generic_deadlock_failure(blocked).to_dict()})
            except Exception as exc:  # never leave the threads stuck because reporting failed
                capture._internal_error("reporting a deadlock under a schedule", exc)
        sched.abort()

    def on_timeout() -> None:
        run.timed_out = True
        sched.abort()

    def on_failure(sched: Scheduler, what: str, exc: BaseException) -> None:
        # The scheduler broke in a hand-over: counted on the session like a contained hook
        # failure; the scheduler then aborts the schedule, and run_schedule raises the error.
        run.internal_error = SchedulerError(what, exc)
        capture.hook_failed(f"{what}, abandoning the schedule", exc)

    sched = Scheduler(strategy, on_deadlock=on_deadlock, on_failure=on_failure)
    torch = sys.modules.get("torch")
    if torch is not None:
        sched.graph_task_id = torch._C._current_graph_task_id
    capture.current()  # the calling thread has its timeline before the first managed thread forks
    main_t = sched.add_main(threading.current_thread().name)
    saved_hook, saved_sleep = hooks.yield_hook, time.sleep
    capture.sched = sched
    hooks.yield_hook = yield_hook(sched)
    time.sleep = virtual_sleep(sched)  # type: ignore[assignment]
    started = time.monotonic()
    start_watchdog(sched, started=started, timeout=timeout, on_timeout=on_timeout, stalls=stalls)
    try:
        try:
            run.value = body()
        except ScheduleAborted:
            pass
        except BaseException as exc:  # the body's own failure, judged by the front end
            run.error = exc
        if not sched.aborted:
            # Like interpreter exit: the non-daemon threads the body left running finish first.
            # Threads that can never finish (an idle executor's workers) are not a deadlock of
            # the body's: they are aborted below.
            draining = True
            try:
                sched.wait_for_threads(main_t)
            except ScheduleAborted:
                pass
    finally:
        main_t.abort_raised = True  # the calling thread is past its body: it must not unwind
        sched.abort()
        # Unwind before restoring: a thread that was running when the run was aborted raises at
        # its next scheduling point, which may be a virtual sleep or a yield_point().
        run.left_behind = _join_managed(sched, main_t)
        capture.sched = None
        hooks.yield_hook = saved_hook
        time.sleep = saved_sleep  # type: ignore[assignment]
        run.stats = dict(sched.stats())
        run.stats["schedule_seconds"] = round(time.monotonic() - started, 6)
        run.stats["strategy"] = strategy.describe()
        if stalls:
            run.stats["watchdog_sites"] = stalls


def _join_managed(sched: Scheduler, main_t: Any) -> int:
    """Join the threads the run started (they are finished or unwinding); count the ones that
    are still alive after :data:`UNWIND_SECONDS`."""
    deadline = time.monotonic() + UNWIND_SECONDS
    left = 0
    for t in sched.threads:
        thread = t.thread_ref
        if t is main_t or thread is None or thread is threading.current_thread():
            continue
        try:
            thread.join(max(deadline - time.monotonic(), 0.0))
        except RuntimeError:  # never started
            continue
        if thread.is_alive():
            left += 1
    return left


def _describe_key(capture: Any, key: Any) -> str:
    if isinstance(key, tuple) and key and key[0] == "join":
        return f"the end of thread {key[1]}"
    if getattr(key, "_rg_kind", None) is not None:
        try:
            return capture.lock_name(key)
        except Exception:
            pass
    return f"{type(key).__name__} at 0x{id(key):x}"


def _seed_generators(seed: int) -> tuple[Any, Any]:
    state = random.getstate()
    random.seed(seed)
    torch_state = None
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            torch_state = torch.random.get_rng_state()
            torch.manual_seed(seed & 0xFFFFFFFFFFFFFFFF)
        except Exception:
            torch_state = None
    return state, torch_state


def _restore_generators(saved: tuple[Any, Any]) -> None:
    state, torch_state = saved
    random.setstate(state)
    if torch_state is not None:
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.random.set_rng_state(torch_state)


# -- many schedules of one body (the pytest marker) --------------------------------------------
# PCT's step estimate comes from a calibration run with a fixed seed (strategies.CALIBRATION_SEED,
# the CLI's too), not the schedule's: so ``schedules=1, seed=S`` calibrates exactly like the run
# that found seed S, and replays it.


@dataclass
class Exploration:
    """The outcome of :func:`explore`: the first failing run, if any."""

    strategy: str
    base_seed: int
    ran: int = 0
    failure: ScheduledRun | None = None
    # Which schedule failed: its index (0-based) and seed; index None for the calibration run.
    index: int | None = None
    seed: int | None = None
    pct_steps: int | None = None


def explore(
    body: Callable[[], Any],
    *,
    schedules: int,
    base_seed: int,
    strategy: str = "random",
    depth: int = 3,
    timeout: float | None = DEFAULT_TIMEOUT,
    label: str = "<schedule>",
    main_globals: dict | None = None,
) -> Exploration:
    """Run ``body`` under ``schedules`` schedules (seeds ``base_seed``, ``base_seed + 1``, ...)
    of ``strategy`` ("random" or "pct"), stopping at the first that fails."""
    from .strategies import PCTStrategy, make_strategy

    result = Exploration(strategy=strategy, base_seed=base_seed)
    kwargs = {"timeout": timeout, "label": label, "main_globals": main_globals}
    steps = None
    which = "the PCT calibration schedule"
    try:
        if strategy == "pct":
            calibration = PCTStrategy(CALIBRATION_SEED, depth, None)
            run = run_schedule(body, calibration, seed=CALIBRATION_SEED, **kwargs)
            result.ran += 1
            if run.failed:
                result.failure, result.seed = run, base_seed
                return result
            steps = result.pct_steps = max(calibration.choice_steps, 1)
        for index in range(schedules):
            seed = base_seed + index
            which = f"schedule {index + 1} of {schedules} (strategy {strategy}, seed {seed})"
            run = run_schedule(body, make_strategy(strategy, seed, depth, steps), seed=seed, **kwargs)
            result.ran += 1
            if run.failed:
                result.failure, result.index, result.seed = run, index, seed
                return result
    except SchedulerError as exc:
        add_note = getattr(exc, "add_note", None)  # Python 3.11+
        if add_note is not None:
            add_note(f"raceguard: in {which}")
        raise
    return result
