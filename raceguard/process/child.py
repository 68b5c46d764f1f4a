"""Entry point of the process that runs the target under instrumentation.

The supervising ``raceguard`` process starts ``python -c`` with this module's :func:`main`, a pipe
and a JSON configuration in ``RACEGUARD_CHILD``. Findings are streamed over the pipe the moment
they are made, one JSON object per line, so a target that segfaults, aborts or calls
``os._exit`` loses none of them. The target's stdin/stdout/stderr are the child's own, untouched.

Messages: ``finding``, ``also_on``, ``internal-error``, ``usage-error``, ``stats`` (a heartbeat),
``target-started`` (the target's first line is next: a Ctrl-C before it is "interrupted before the
target started"), ``exit`` (the target's exit code and final statistics).
"""

from __future__ import annotations

import _thread
import faulthandler
import json
import os
import signal
import sys
import time
from typing import Any

from ..capture.identity import present_as
from .thread_exits import wait_until_gone
from .workers import FLUSH_REQUEST

ENV_VAR = "RACEGUARD_CHILD"


# The pid of the process raceguard checks, in the environment every interpreter of the process
# shares: a subinterpreter (the target's or a worker's) imports sitecustomize again, and must not
# start a second session or import torch, which supports one interpreter per process.
CHECKED_PID = "RACEGUARD_CHECKED_PID"


def mark_checked() -> None:
    """This process is checked (and so is each of its forks, which keep the session)."""

    def mark() -> None:
        os.environ[CHECKED_PID] = str(os.getpid())

    mark()
    os.register_at_fork(after_in_child=mark)


class PipeSink:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.broken = False

    def __call__(self, event: dict) -> None:
        if self.broken:
            return
        data = (json.dumps(event, default=str) + "\n").encode()
        try:
            while data:
                n = os.write(self.fd, data)
                data = data[n:]
        except OSError:
            self.broken = True  # the supervisor is gone; keep the target running unchanged


# A state where every thread is blocked must persist this long, with no progress, to be reported.
BLOCKED_GRACE = 2.0


class AllBlocked:
    """Decides when "every thread is blocked" is a deadlock: the state must persist for
    :data:`BLOCKED_GRACE` seconds without any tensor op or synchronisation in between (a thread
    blocked in an uninstrumented call, or one just about to wake up, is not stuck for good).
    Shared by this process's heartbeat and by ``raceguard.watch()``."""

    def __init__(self, session: Any, grace: float = BLOCKED_GRACE) -> None:
        self.session = session
        self.grace = grace
        self.since: float | None = None
        self.progress: Any = None

    def poll(self) -> Any:
        """The session's deadlock once it has lasted ``grace`` seconds, else None."""
        session = self.session
        deadlock = session.check_all_blocked()
        now = time.monotonic()
        marker = (session.sync_events, session.ops)
        if deadlock is None or marker != self.progress:
            self.since = now if deadlock is not None else None
            self.progress = marker
            return None
        if self.since is not None and now - self.since >= self.grace:
            return deadlock
        return None


# How often the heartbeat looks for the supervisor's flush request (a file's existence).
FLUSH_POLL = 0.1


def _heartbeat(session: Any, sink: PipeSink, period: float, flush_path: str | None = None) -> None:
    """Statistics for the supervisor, the watchdog for "every thread blocked forever", and the
    lock-order cycles seen so far once the supervisor asks (``flush_path`` exists: it is about to
    end the tree). This thread answers even while the main thread is blocked in C++, where a
    signal handler would never run."""
    blocked = AllBlocked(session)
    next_stats = time.monotonic() + period
    while not sink.broken:
        time.sleep(FLUSH_POLL if flush_path is not None else period)
        if flush_path is not None and os.path.exists(flush_path):
            flush_path = None  # once
            try:
                session.report_lock_cycles()
            except Exception as exc:
                session.hook_failed("reporting lock-order cycles before the process is ended", exc)
            sink({"type": "cycles-flushed"})
        if time.monotonic() < next_stats:
            continue
        next_stats = time.monotonic() + period
        try:
            sink({"type": "stats", "stats": session.stats()})
            deadlock = blocked.poll()
            if deadlock is not None:
                session.report_deadlock(deadlock)
                return
        except Exception as exc:  # a raw thread: an escape would print on the target's stderr
            session.hook_failed("the heartbeat (statistics, deadlock watchdog)", exc)


def _end_run_after_deadlock(session: Any, sink: PipeSink) -> None:
    """A deadlocked target never finishes: report, then end the process with exit code 1."""
    sink({"type": "exit", "code": None, "outcome": "deadlock", "stats": session.stats()})
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    _real_os_exit(1)  # the report is complete: not through the target's os._exit below


_real_os_exit = os._exit


# How long the target's os._exit waits for its report. The calling thread may hold one of
# raceguard's own locks (a signal handler of the target's that calls os._exit can run inside
# raceguard's code): the report, made on a thread of its own, then waits for that lock, and the
# process exits without it after this long instead of never.
OS_EXIT_REPORT_WAIT_S = 2.0


def _report_before_os_exit(session: Any) -> None:
    """``os._exit`` runs no ``finally`` and no ``atexit``: a target that ends with it would lose
    what :func:`main` sends when the target returns (the final statistics, the lock-order cycles
    seen so far), and the report would say 0 threads, 0 ops. The target's ``os._exit`` sends them
    first, then exits exactly as the original does (same status, same errors for bad
    arguments, no frame of raceguard's in their traceback). A fork of this process sends its own
    statistics; its cycles are its parent's to report."""
    # Imported once main() has noted its own modules: hidden from the target, as the rest.
    from ..capture.stacks import own_frames_removed

    own_pid = os.getpid()

    def report(done: Any) -> None:
        try:
            if os.getpid() == own_pid:
                session.report_lock_cycles()
            session.emit({"type": "stats", "stats": session.stats()})
        except Exception as exc:  # the target exits all the same
            session.hook_failed("sending the statistics before os._exit", exc)
        finally:
            done.release()

    def _exit(*args: Any, **kwargs: Any) -> Any:
        done = _thread.allocate_lock()
        done.acquire()
        try:
            _thread.start_new_thread(report, (done,))
            done.acquire(timeout=OS_EXIT_REPORT_WAIT_S)
        except Exception:  # no thread to report from (the interpreter is shutting down)
            pass
        try:
            return _real_os_exit(*args, **kwargs)
        except BaseException as exc:
            own_frames_removed(exc)
            raise

    os._exit = present_as(_exit, _real_os_exit)


def _track_constructions(session: Any) -> None:
    """Kept for callers outside the package (benchmarks); see :func:`.install.track_constructions`."""
    from .install import track_constructions

    track_constructions(session)


def _hide_crash_dump() -> None:
    """The fault handler that writes the crash log for the report is raceguard's: the program
    sees ``faulthandler.is_enabled()`` as under plain python (False) until it enables or
    disables the handler itself, which replaces raceguard's as it would any earlier one."""
    real_is_enabled, real_enable, real_disable = faulthandler.is_enabled, faulthandler.enable, faulthandler.disable
    ours = [True]

    def is_enabled() -> bool:
        return False if ours[0] else real_is_enabled()

    def enable(*args: Any, **kwargs: Any) -> None:
        ours[0] = False
        return real_enable(*args, **kwargs)

    def disable() -> None:
        ours[0] = False
        return real_disable()

    faulthandler.is_enabled = present_as(is_enabled, real_is_enabled)
    faulthandler.enable = present_as(enable, real_enable)
    faulthandler.disable = present_as(disable, real_disable)


def _hide_bootstrap_frames() -> None:
    """The ``python -c`` line that called us is raceguard's, not the target's: never report it."""
    from ..capture.stacks import hide_code

    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_filename == "<string>":
            hide_code(f.f_code)
        f = f.f_back


def _read_config(fd: int) -> dict:
    """The configuration the supervisor sends once; it closes the pipe without one when it does
    not need this process after all (``--help``, a usage error): then end quietly."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except InterruptedError:
            continue
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    if not chunks:
        os._exit(0)
    return json.loads(b"".join(chunks))


def import_torch_quietly() -> tuple[list, list]:
    """Import torch, holding back what its import prints and sets: (the warnings it raised, the
    warning filters it added). Warnings torch prints on import (e.g. "Failed to initialize
    NumPy") are shown only when the target imports torch: a usage error stays one line, a
    program without torch never sees them."""
    import warnings

    with warnings.catch_warnings(record=True) as import_warnings:
        filters = list(warnings.filters)
        import torch  # noqa: F401 - the dispatch mode needs it before the target's first line

        # Leaving catch_warnings() drops the filters torch adds on import; put back with torch.
        torch_filters = [f for f in warnings.filters if f not in filters]
    return import_warnings, torch_filters


def _flush_path(config: dict) -> str | None:
    """Where the supervisor's flush request appears: the target's process is told, a worker
    looks in its socket's directory (raceguard.process.workers.FLUSH_REQUEST)."""
    if config.get("flush_request"):
        return config["flush_request"]
    if config.get("socket"):
        return os.path.join(os.path.dirname(config["socket"]), FLUSH_REQUEST)
    return None


def start_session(sink: Any, config: dict, own_modules: set, held: tuple[list, list]) -> tuple[Any, Any]:
    """The session of a checked process (the target's, or a worker's), active in its main thread:
    deadlocks end the run, a heartbeat streams statistics (and lock-order cycles when asked), and
    torch with what came with it stays out of sys.modules until the program imports it (then
    its held-back warnings and filters arrive, as under plain python). (session, main state)."""
    import threading
    import warnings

    from . import hidden
    from .install import activate
    from ..capture.session import Session

    session = Session(
        sink,
        main_globals=lambda: getattr(sys.modules.get("__main__"), "__dict__", None),
        max_reports=config.get("max_reports"),
    )
    from ..capture import native

    native.choose(session)  # the native op recorder when asked for and built, else the dispatch mode
    # Never deactivated: the program runs instrumented until the process ends (atexit included).
    main_state = activate(session, thread=threading.main_thread()).state
    session.on_deadlock = lambda: _end_run_after_deadlock(session, sink)
    _report_before_os_exit(session)
    _thread.start_new_thread(_heartbeat, (session, sink, 0.5, _flush_path(config)))
    import_warnings, torch_filters = held

    def torch_imported() -> None:
        warnings.filters[:0] = torch_filters
        warnings._filters_mutated()  # type: ignore[attr-defined]
        for message in import_warnings:
            warnings._showwarnmsg(message)  # type: ignore[attr-defined]

    hidden.hide(hidden.new_modules(own_modules), "torch", torch_imported)
    return session, main_state


def wait_for_ended_threads(session: Any) -> None:
    """Let threads that ended finish their C++ thread-local destructors before finalization
    (see raceguard.process.thread_exits); a failure here costs nothing but that wait."""
    try:
        wait_until_gone(list(session.ended_threads))
    except Exception as exc:
        session.hook_failed("waiting for ended threads to leave the process", exc)


def main() -> None:
    own_modules = set(sys.modules)  # what the child imports beyond these is hidden from the target
    config = json.loads(os.environ.pop(ENV_VAR))
    try:
        if config.pop("unblock_sigint", False):
            # The supervisor started this process with SIGINT blocked (raceguard.prestart): a
            # Ctrl-C that came meanwhile arrives here, as the KeyboardInterrupt below.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        sink, code, session, main_state = _prepare(config, own_modules)
    except KeyboardInterrupt:
        # Ctrl-C (from the terminal, or forwarded by the supervisor) while torch was imported or
        # the configuration awaited: none of the target ran, so end quietly, with no traceback
        # of raceguard's; the supervisor says "interrupted before the target started".
        os._exit(130)
    from . import runner  # imported by _prepare already

    sink({"type": "target-started"})

    exit_code = 0
    outcome = "exit"
    try:
        try:
            if config.get("module"):
                runner.run_module(config["module"], tuple(config["args"]))
            else:
                runner.run_script(config["script"], code, tuple(config["args"]))
        except SystemExit as exc:
            exit_code = runner.exit_code_of(exc)
        except KeyboardInterrupt as exc:
            runner.print_uncaught(exc)
            exit_code, outcome = 130, "interrupted"
        except BaseException as exc:  # the target's own uncaught exception
            runner.print_uncaught(exc)
            exit_code, outcome = 1, "exception"
            sink({"type": "target-exception", "exception": f"{type(exc).__name__}: {exc}"})
        # Like interpreter shutdown, wait for non-daemon threads; the main thread counts as
        # blocked meanwhile, so threads that wait for each other forever are reported.
        token = session.wait_begin(("wait", "interpreter exit (waiting for non-daemon threads)", 0), True)
        try:
            runner.wait_for_threads()
        except KeyboardInterrupt:
            exit_code, outcome = 130, "interrupted"
        finally:
            session.wait_end(token)
    finally:
        wait_for_ended_threads(session)
        session.report_lock_cycles()
        session.leave_thread(main_state, None)
        sink({"type": "exit", "code": exit_code, "outcome": outcome, "stats": session.stats()})
    try:
        sys.stdout.flush()
    except Exception:
        pass
    sys.exit(exit_code)


def _prepare(config: dict, own_modules: set) -> tuple[PipeSink, Any, Any, Any]:
    """Everything before the target's first line: (sink, compiled code, session, main state);
    ``config`` gets what the supervisor sends. Started before the supervisor had parsed its
    arguments (raceguard.prestart), it imports what takes long meanwhile, then waits for what
    to run."""
    mark_checked()  # the target's own subinterpreters must not start a worker session
    _hide_bootstrap_frames()
    bootstrap_path = config.get("bootstrap_path")
    if bootstrap_path and sys.path and sys.path[0] == bootstrap_path:
        del sys.path[0]
    # Not inherited by the target's own subprocesses, so the supervisor sees EOF when we end.
    os.set_inheritable(config["fd"], False)
    sink = PipeSink(config["fd"])

    held = import_torch_quietly()

    from . import runner

    config.update(_read_config(config.pop("config_fd")))
    if config.get("simulate_cuda"):  # sent, since a pre-started process has the old environment
        from ..cuda import SIMULATE_ENV, SIMULATE_PROGRAM

        os.environ[SIMULATE_ENV] = SIMULATE_PROGRAM  # this session, and the target's children
    from .workers import forget_bootstrap  # the target's Python children (--no-children: not)

    forget_bootstrap(config.get("children", True))

    code = runner.prepare_or_exit(config, sink)

    crash_log = config.get("crash_log")
    if crash_log:
        try:
            faulthandler.enable(file=open(crash_log, "w"), all_threads=True)
            _hide_crash_dump()
        except OSError:
            pass

    session, main_state = start_session(sink, config, own_modules, held)
    from .forks import follow, socket_path  # forks stay checked; multiprocessing hand-offs

    follow(session, sink, socket_path(), own_process=True, label=lambda: None)
    return sink, code, session, main_state
