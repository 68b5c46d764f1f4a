"""One schedule: what a child forked from the fork server runs.

The child sets up a capture session exactly like ``raceguard check``'s child does, attaches a
:class:`~raceguard.schedule.scheduler.Scheduler` driven by the schedule's strategy, runs the
target as ``__main__`` and streams findings over its pipe as they are made (same messages as
:mod:`raceguard.process.child`). It always ends with ``os._exit``: the fork server's interpreter
state (atexit handlers, buffered output) must not run twice.

Determinism: besides the scheduler's choices, the child fixes what else the schedule could vary
on: Python's ``random``, ``torch``'s and (when imported) ``numpy``'s global generators are seeded
from the schedule's seed; ``PYTHONHASHSEED`` is fixed by the parent for the fork server; thread
ids are creation-order numbers. What stays outside: wall-clock reads, ``id()``-dependent
iteration, uninstrumented blocking (handled by the watchdog), threads started with
``_thread.start_new_thread``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, NoReturn

from ..process import child as child_mod
from .. import cuda as cuda_pkg
from ..cuda import tracker as cuda
from .. import hazards
from ..process import runner
from ..capture import session as session_mod
from ..process.child import PipeSink
from ..capture.session import Session
from . import hooks
from .failures import all_thread_frames, exception_failure, exit_failure, generic_deadlock_failure, timeout_failure
from .scheduler import Scheduler, ScheduleDeadlocked
from .strategies import make_strategy
from .watchdog import start_watchdog, virtual_sleep, yield_hook

_stalls: list[str] = []  # where the watchdog found stalled holders (see .watchdog)

# The exit status of a schedule's process that raceguard abandoned (its own failure); the parent
# reads the "schedule-abandoned" message, not this.
EXIT_ABANDONED = 70


class Target:
    """What to run, prepared once in the fork server."""

    def __init__(self, script: str | None, module: str | None, args: list[str], code: Any) -> None:
        self.script = script
        self.module = module
        self.args = list(args)
        self.code = code


def run_schedule(spec: dict, target: Target, fd: int) -> NoReturn:
    """Run the target once under the schedule ``spec``; never returns."""
    sink = PipeSink(fd)
    try:
        _run(spec, target, sink)
    except BaseException as exc:  # a bug in raceguard: say so, never hang the server
        sink({"type": "internal-error", "message": f"raceguard failed while running a schedule: {exc!r}",
              "traceback": traceback.format_exc()})
        _flush()
        os._exit(70)
    _flush()
    os._exit(0)


def _redirect_output(log: str | None) -> None:
    if log is None:
        return
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


def _seed_generators(seed: int) -> None:
    import random

    random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed & 0xFFFFFFFFFFFFFFFF)
    except Exception:
        pass
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        try:
            numpy.random.seed(seed & 0xFFFFFFFF)
        except Exception:
            pass


def _run(spec: dict, target: Target, sink: PipeSink) -> None:
    _redirect_output(spec.get("log"))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    seed = int(spec["seed"])
    _seed_generators(seed)

    session = Session(
        sink,
        main_globals=lambda: getattr(sys.modules.get("__main__"), "__dict__", None),
        max_reports=spec.get("max_reports"),
    )
    child_mod._track_constructions(session)
    strategy = make_strategy(spec["strategy"], seed, int(spec.get("depth") or 3), spec.get("steps"))
    outcome = {"kind": "exit"}

    def end(kind: str, code: int | None) -> NoReturn:
        sched.stop()
        try:
            session.report_lock_cycles()
        except Exception:
            pass
        sink({"type": "exit", "code": code, "outcome": kind, "stats": _stats(session, sched, strategy, started)})
        _flush()
        os._exit(1 if code is None else code)

    def on_deadlock(scheduler: Scheduler, blocked: list) -> None:
        deadlock = session.check_all_blocked()
        if deadlock is not None:
            session.report_deadlock(deadlock)  # calls session.on_deadlock: ends the process
        session.emit({"type": "finding", "finding": generic_deadlock_failure(blocked).to_dict()})
        end("deadlock", None)

    def on_failure(scheduler: Scheduler, what: str, exc: BaseException) -> NoReturn:
        # The scheduler failed halfway through a hand-over between threads (Scheduler._abandon):
        # the schedule ends here, in whichever thread found it, as raceguard's internal error.
        # Nothing reaches the target's code (no exception, no output), no finding comes from the
        # rest of this schedule (the lock cycles at its end included), and the run goes on with
        # the next schedule.
        try:
            sched.stop()
            session.internal_errors += 1  # in stats.internal_errors, like a contained hook failure
            sink({"type": "schedule-abandoned",
                  "message": f"raceguard failed while {what}: {exc!r}; the schedule was abandoned",
                  "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))})
            sink({"type": "exit", "code": None, "outcome": "abandoned",
                  "stats": _stats(session, sched, strategy, started)})
            _flush()
        finally:
            os._exit(EXIT_ABANDONED)

    sched = Scheduler(strategy, on_deadlock=on_deadlock, on_failure=on_failure)
    try:
        import torch

        sched.graph_task_id = torch._C._current_graph_task_id
    except Exception:
        pass
    session.sched = sched
    session.on_deadlock = lambda: end("deadlock", None)
    session_mod.ACTIVE = session
    hazards.install(session)
    main_state = session.enter_thread(threading.main_thread(), None)
    # CUDA streams as timelines, as under `check`: installed here, in the schedule's own process,
    # never in the fork server (it initialises nothing: the target's first CUDA call does, in
    # this child). With RACEGUARD_SIMULATE_CUDA, the CUDA-on-CPU backend.
    cuda_pkg.install_tracking(session)
    main_t = sched.add_main(threading.main_thread().name)
    hooks.yield_hook = yield_hook(sched)
    time.sleep = virtual_sleep(sched)  # type: ignore[assignment]
    started = time.monotonic()
    timeout = spec.get("timeout")

    def on_timeout() -> None:
        _report_timeout(sched, session, timeout)
        end("timeout", None)

    start_watchdog(sched, started=started, timeout=timeout, on_timeout=on_timeout, stalls=_stalls)
    if spec.get("preempt") == "lines":
        from .lines import install_line_preemption

        install_line_preemption(sched)

    exit_code = 0
    try:
        try:
            if target.module:
                runner.run_module(target.module, tuple(target.args))
            else:
                runner.run_script(target.script, target.code, tuple(target.args))
        except SystemExit as exc:
            exit_code = runner.exit_code_of(exc)
            if exit_code != 0:
                outcome = {"kind": "exit"}
                _emit(session, exit_failure(exit_code, exc))
        except ScheduleDeadlocked:
            end("deadlock", None)
        except BaseException as exc:  # the target's own uncaught exception
            runner.print_uncaught(exc)
            exit_code = 1
            outcome = {"kind": "exception"}
            sink({"type": "target-exception", "exception": f"{type(exc).__name__}: {exc}"})
            _emit(session, exception_failure(exc, threading.main_thread().name))
        _shutdown(session, sched, main_t)
    finally:
        sched.stop()
        session.report_lock_cycles()
        session.leave_thread(main_state, None)
        sink({"type": "exit", "code": exit_code, "outcome": outcome["kind"],
              "stats": _stats(session, sched, strategy, started)})
    _flush()
    os._exit(exit_code)


def _emit(session: Session, finding: Any) -> None:
    session.emit({"type": "finding", "finding": finding.to_dict()})


def _shutdown(session: Session, sched: Scheduler, main_t: Any) -> None:
    """Interpreter shutdown as threading._shutdown() does it, with logical waits: run the
    threading-level atexit callbacks (executors stop their workers there), then wait for every
    non-daemon thread."""
    threading._SHUTTING_DOWN = True  # type: ignore[attr-defined]
    callbacks = list(getattr(threading, "_threading_atexits", []))
    for call in reversed(callbacks):
        try:
            call()
        except Exception:
            pass
    if hasattr(threading, "_threading_atexits"):
        threading._threading_atexits.clear()  # type: ignore[attr-defined]
    resource = ("wait", "interpreter exit (waiting for non-daemon threads)", 0)
    sched.wait_for_threads(
        main_t,
        on_block=lambda: session.wait_begin(resource, True),
        on_unblock=session.wait_end,
    )


def _report_timeout(sched: Scheduler, session: Session, timeout: float) -> None:
    names = {}
    main = threading.main_thread()
    if main.ident is not None:
        names[main.ident] = main.name
    for t in sched.threads:
        thread = t.thread_ref
        if thread is not None and t.ident is not None:
            names[t.ident] = thread.name
    try:
        finding = timeout_failure(timeout, all_thread_frames(names))
        session.emit({"type": "finding", "finding": finding.to_dict()})
    except Exception as exc:
        session.emit({"type": "internal-error", "message": f"raceguard failed while reporting a timeout: {exc!r}"})


def _stats(session: Session, sched: Scheduler, strategy: Any, started: float) -> dict:
    stats = dict(session.stats())
    stats.update(sched.stats())
    stats["schedule_seconds"] = round(time.monotonic() - started, 6)
    if _stalls:
        stats["watchdog_sites"] = list(_stalls)
    steps = getattr(strategy, "choice_steps", None)
    if steps is not None:
        stats["pct_choice_steps"] = steps
    return stats


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
