"""The Python API: watch a block of code for data races, in the current process.

::

    import raceguard

    with raceguard.watch() as session:      # instruments this thread and threads started inside
        run_my_server_for_a_bit()
    session.findings                        # list of raceguard.report.Finding (fields of the JSON)
    session.assert_clean()                  # raises raceguard.RaceError with the text report

    @raceguard.watch(fail_on="error")       # decorator: raises RaceError when the call returns
    def test_reload():
        ...

What is watched
    The thread that enters the block, and every thread started inside it (including an
    executor's worker threads, if the executor starts them inside the block). Threads started
    *before* the block are not instrumented: their tensor ops are not seen. Locks, events,
    queues, semaphores, barriers, conditions and futures created inside the block are the
    instrumented ones; one created *before* the block is a plain object whose ordering raceguard
    cannot see, so a race it prevents is still reported (:exc:`RaceError` adds a note naming
    such objects when it finds them in the watched code's module globals). Create them inside
    the block, or, under pytest, run with ``--raceguard``, which instruments them from the start.

Leaving the block
    Restores every patched primitive and constructor and exits the calling thread's dispatch
    mode, also when the block raises. Lock-order cycles seen during the block are reported at
    that point. Primitives created inside the block keep working afterwards; they just stop
    reporting. Threads still running after the block stop being recorded (join them inside the
    block to have all their work checked).

Names
    Parameters, buffers, gradients and optimizer state are named like ``raceguard check`` names
    them (``model.fc1.weight``, ``optimizer[Adam].state[model.fc1.weight].exp_avg``), from the
    module globals of the code that entered the block (of the decorated function), the local
    variables of every live frame, and every ``nn.Module`` / ``Optimizer`` built inside the block.

Deadlocks
    A lock-order deadlock is reported the moment the wait that closes the cycle begins; a state
    where every watched thread is blocked for good (a join while holding a lock, a get on a queue
    nobody fills) after it has lasted 2 s. The ``deadlock`` finding's text goes to stderr at once,
    because the block then hangs as it would without raceguard.

One at a time
    Only one ``watch()`` block can be active in a process. Nesting one inside another, or
    entering one in a second thread while another thread's block is active, raises
    :exc:`RuntimeError` naming the active block; so does ``watch()`` inside a test the pytest
    plugin already watches (use the ``raceguard`` fixture there) or inside a program run by
    ``raceguard check``.
"""

from __future__ import annotations

import _thread
import dataclasses
import functools
import inspect
import os
import sys
import threading
import time
from typing import Any, Callable, Iterable, TypeVar

from .report.document import Report, incomplete_analysis
from .report.filters import Suppressions
from .report.finding import SEVERITIES, Finding

__all__ = ["RaceError", "WatchSession", "watch"]

F = TypeVar("F", bound=Callable[..., Any])


class RaceError(AssertionError):
    """Findings at or above the ``fail_on`` severity. ``str(error)`` is the text report.

    An :class:`AssertionError`, so that test runners report it as a failure of the test.

    Attributes: ``report`` (the :class:`~raceguard.report.document.Report`), ``findings`` (the
    findings that failed, at or above ``fail_on``), ``fail_on``.
    """

    def __init__(self, report: Report, fail_on: str = "error", note: str | None = None) -> None:
        from .report.text import render_text

        self.report = report
        self.fail_on = fail_on
        self.note = note
        self.findings = report.failing_findings(fail_on)
        text = render_text(report).rstrip("\n")
        if note:
            text += "\n" + note
        super().__init__(text)

    def __reduce__(self) -> Any:
        # Picklable (multiprocessing, pytest plugins that ship exceptions between processes).
        return (_race_error, (self.report.to_dict(), self.fail_on, self.note))


def _race_error(report: dict, fail_on: str, note: str | None) -> RaceError:
    return RaceError(Report.from_dict(report), fail_on, note)


class WatchSession:
    """The findings of one watched block (or one test, under the pytest plugin).

    Returned by ``with raceguard.watch() as session`` and by the ``raceguard`` pytest fixture;
    not meant to be constructed directly. Every method can be called while the block runs
    (findings so far) and after it, from any thread.
    """

    def __init__(
        self,
        *,
        fail_on: str = "error",
        suppressions: Suppressions | None = None,
        max_reports: int | None = None,
        label: str = "<watch>",
        main_globals: Callable[[], dict | None] = lambda: None,
        owner: str = "raceguard.watch()",
        on_finding: Callable[[Finding], None] | None = None,
        simulate_cuda: bool = False,
    ) -> None:
        self.fail_on = fail_on
        self.simulate_cuda = simulate_cuda  # CUDA on a simulated device in CPU memory
        self.suppressions = suppressions
        self.max_reports = max_reports
        # What the report names as its target: "file.py:12" for a with block, the test id under pytest.
        self.label = label
        self._main_globals = main_globals
        # Who opened the session, for the "already active" error of a second watch().
        self.owner = owner
        self._on_finding = on_finding
        self._lock = _thread.allocate_lock()  # never an instrumented lock
        self._kept: list[Finding] = []
        self._suppressed: list[Finding] = []
        self._cleared: list[Finding] = []
        self._by_fingerprint: dict[str, Finding] = {}
        self._errors: list[str] = []
        self._hook_errors: list[dict[str, Any]] = []  # contained failures of raceguard's hooks
        self._capture: Any = None
        self._handle: Any = None
        self._thread_name: str | None = None
        self._started: float | None = None
        self._ended: float | None = None
        self._outcome: dict[str, Any] | None = None
        self._final_stats: dict[str, Any] | None = None
        # Set by the pytest plugin when the marker ran the test under controlled schedules.
        self._schedules_run = 1

    # -- results -----------------------------------------------------------------------------
    @property
    def findings(self) -> list[Finding]:
        """Findings so far that no suppression matched, in the order they were found."""
        with self._lock:
            return list(self._kept)

    @property
    def suppressed(self) -> list[Finding]:
        """Findings a suppression matched (each with ``suppressed`` set to the rule); never fail."""
        with self._lock:
            return list(self._suppressed)

    @property
    def errors(self) -> list[str]:
        """Internal raceguard errors (a bug in raceguard; the program itself was not affected),
        including failures of its hooks, which were contained and only lost events."""
        with self._lock:
            return list(self._errors) + [str(e.get("message", "unknown error")) for e in self._hook_errors]

    @property
    def active(self) -> bool:
        """Whether the block is still being watched."""
        return self._handle is not None and self._ended is None

    def failing_findings(self) -> list[Finding]:
        """The findings at or above ``fail_on``: what :meth:`assert_clean` fails on."""
        return [f for f in self.findings if f.at_least(self.fail_on)]

    def clear(self) -> list[Finding]:
        """Forget the findings so far and return them: for a test that expects a race and has
        checked it, so that it does not fail the test. They are left out of :meth:`report`."""
        with self._lock:
            taken, self._kept = self._kept, []
            self._cleared.extend(taken)
            return taken

    def report(self) -> Report:
        """The findings as a :class:`~raceguard.report.document.Report` (``command`` "check",
        ``target`` the block's location), the same document ``raceguard check`` writes."""
        with self._lock:
            kept = list(self._kept)
            suppressed = list(self._suppressed)
            errors = list(dict.fromkeys(self._errors))
            hook_errors = list(self._hook_errors)
        stats = self._stats()
        outcome = self._outcome
        incomplete = incomplete_analysis(int(stats.get("internal_errors", 0)), hook_errors, stats.pop("not_captured", None))
        if incomplete and incomplete["internal_errors"]:
            stats["internal_errors"] = incomplete["internal_errors"]
        return Report(
            command="check",
            target=[self.label],
            findings=kept,
            target_exit_code=None if outcome is None else outcome["code"],
            stats=stats,
            error="; ".join(errors) or None,
            target_outcome=outcome,
            suppressed=suppressed,
            incomplete=incomplete,
        )

    def assert_clean(self) -> None:
        """Raise :exc:`RaceError`, whose message is the text report, if any finding is at or
        above ``fail_on``. Also works while the block is still running (findings so far)."""
        if self.failing_findings():
            report = self.report()
            raise RaceError(report, self.fail_on, note=self.untracked_note(report))

    def untracked_note(self, report: Report | None = None) -> str | None:
        """A note naming synchronisation objects the watched code's module created before
        watching started (plain, uninstrumented), when there are data races they may explain."""
        findings = (report.findings if report is not None else self.findings)
        if not any(f.kind == "data-race" for f in findings):
            return None
        try:
            names = untracked_sync_objects(self._main_globals() or {})
        except Exception:
            return None
        if not names:
            return None
        listed = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
        one = len(names) == 1
        return (
            f"note: {listed} {'was' if one else 'were'} created before raceguard started watching: "
            f"raceguard cannot see the ordering {'it provides' if one else 'they provide'}, so races "
            f"{'it prevents' if one else 'they prevent'} are still reported. Create "
            f"{'it' if one else 'them'} inside the watched code, or under pytest run with --raceguard, "
            "which instruments such objects from the start of the run."
        )

    def __repr__(self) -> str:
        state = "active" if self.active else "finished" if self._ended is not None else "not started"
        return f"<raceguard.WatchSession {self.label} {state}, {len(self.findings)} finding(s)>"

    # -- lifecycle (used by watch() and the pytest plugin) ---------------------------------------
    def _start(self) -> "WatchSession":
        from .process import install

        # The block's duration includes raceguard's set-up, as a check's includes importing torch.
        started = time.monotonic()
        capture = install.ScopedSession(self._sink, main_globals=self._main_globals, max_reports=self.max_reports)
        capture.owner = self
        self._thread_name = threading.current_thread().name
        try:
            handle = install.activate(capture, simulate_cuda=self.simulate_cuda)
        except install.AlreadyActiveError as exc:
            raise RuntimeError(_already_active_message(exc.active, self)) from None
        self._capture = capture
        self._handle = handle
        self._started = started
        self._stopping = _thread.allocate_lock()  # released by _stop(): ends the deadlock watch
        self._stopping.acquire()
        _thread.start_new_thread(_watch_for_deadlock, (self, capture, self._stopping))
        return self

    def _stop(self, exc: BaseException | None = None) -> None:
        """Stop watching: report lock-order cycles, restore everything. Idempotent."""
        from .process import install

        if self._handle is None or self._ended is not None:
            return
        capture = self._capture
        try:
            capture.report_lock_cycles()
        finally:
            self._stopping.release()
            capture.closed = True
            self._ended = time.monotonic()
            self._final_stats = self._stats()
            if exc is None:
                self._outcome = {"kind": "exit", "code": 0, "signal": None, "detail": None}
            else:
                detail = f"{type(exc).__name__}: {exc}".rstrip(": ")
                self._outcome = {"kind": "exception", "code": 1, "signal": None, "detail": detail}
            install.deactivate(self._handle)

    def _stats(self) -> dict[str, Any]:
        if self._final_stats is not None:
            return dict(self._final_stats)
        capture = self._capture
        raw = capture.stats() if capture is not None else {}
        end = self._ended if self._ended is not None else time.monotonic()
        wall = end - self._started if self._started is not None else 0.0
        stats: dict[str, Any] = {
            "threads": int(raw.get("threads", 0)),
            "ops": int(raw.get("ops", 0)),
            "schedules_run": self._schedules_run,
            "first_failure_at": None,
            "wall_seconds": round(max(wall, 0.0), 3),
        }
        if raw.get("dropped_reports"):
            stats["dropped_reports"] = raw["dropped_reports"]
        if raw.get("internal_errors"):
            stats["internal_errors"] = raw["internal_errors"]
        if raw.get("not_captured"):  # moved to the report's incomplete
            stats["not_captured"] = dict(raw["not_captured"])
        if raw.get("simulated_cuda"):
            stats["simulated_cuda"] = True
            if raw.get("simulation_notes"):
                stats["simulation_notes"] = list(raw["simulation_notes"])
        return stats

    def _sink(self, event: dict) -> None:
        """Receives the capture session's events (serialised by its emit lock)."""
        kind = event.get("type")
        if kind == "finding":
            finding = Finding.from_dict(event["finding"])
            rule = self.suppressions.match(finding) if self.suppressions is not None else None
            if rule is not None:
                finding = dataclasses.replace(finding, suppressed=rule.reason())
            with self._lock:
                if finding.fingerprint in self._by_fingerprint:
                    return
                self._by_fingerprint[finding.fingerprint] = finding
                (self._suppressed if rule is not None else self._kept).append(finding)
            if finding.kind == "deadlock" and rule is None and getattr(self._capture, "sched", None) is None:
                self._announce_deadlock(finding)
            if self._on_finding is not None:
                self._on_finding(finding)
        elif kind == "also_on":
            with self._lock:
                finding = self._by_fingerprint.get(event.get("fingerprint", ""))
                resource = event.get("resource")
                if finding is not None and resource and resource != finding.resource:
                    also = finding.details.setdefault("also_on", [])
                    if resource not in also:
                        also.append(resource)
        elif kind == "internal-error":
            with self._lock:
                self._errors.append(str(event.get("message", "unknown error")))
        elif kind == "hook-error":
            with self._lock:
                self._hook_errors.append(event)


    def _announce_deadlock(self, finding: Finding) -> None:
        """A deadlock in watched code hangs it, as it would without raceguard (threads blocked in
        the OS cannot be woken from here): say why on stderr now, not at the end that never
        comes. Under pytest's output capture it shows with the test's captured output."""
        from .report.text import render_text

        try:
            text = render_text(Report(command="check", target=[self.label], findings=[finding])).rstrip("\n")
            stream = sys.__stderr__ or sys.stderr
            stream.write(
                f"raceguard: deadlock in {self.label}; the watched code will hang here, as it would "
                f"without raceguard:\n{text}\n"
            )
            stream.flush()
        except Exception:  # the finding is recorded either way
            pass


# How often the "every thread blocked" watch looks (the state must last BLOCKED_GRACE to count).
DEADLOCK_POLL = 0.5


def _watch_for_deadlock(session: WatchSession, capture: Any, stopping: Any) -> None:
    """A raw thread per watched block: reports "every thread blocked forever" (a join while
    holding a lock, a get on a queue nobody fills) like ``raceguard check`` does. Lock-order
    deadlocks are reported by the wait-for graph the moment they close."""
    from .process.child import AllBlocked

    blocked = AllBlocked(capture)
    while not stopping.acquire(True, DEADLOCK_POLL):
        if capture.sched is not None:  # a controlled schedule finds and ends its own deadlocks
            blocked = AllBlocked(capture)
            continue
        try:
            deadlock = blocked.poll()
            if deadlock is not None and session._ended is None:
                capture.report_deadlock(deadlock)
                return
        except Exception as exc:
            capture._internal_error("watching for deadlocks", exc)
            return


class watch:  # noqa: N801 - used like a function: raceguard.watch()
    """Watch a block of code (``with``) or every call of a function (decorator) for data races.

    ``fail_on``
        Lowest severity that :meth:`WatchSession.assert_clean` (and the decorator) fails on:
        ``"error"`` (default) or ``"warning"``.
    ``suppressions``
        Findings to ignore: a :class:`~raceguard.report.filters.Suppressions`, the path of a
        suppressions file, or an iterable of ``KIND:PATTERN`` lines (the format of
        ``raceguard check --suppressions``). Suppressed findings are in ``session.suppressed``.
    ``max_reports``
        Report at most this many findings (default: no limit); the rest are only counted
        (``report().stats["dropped_reports"]``).
    ``simulate_cuda``
        Run the block's CUDA code on a simulated device in CPU memory, as ``raceguard check
        --simulate-cuda`` does (for a CPU-only torch; see ``docs/cuda.md``).

    As a context manager, ``with watch() as session`` gives a new :class:`WatchSession` each
    time and never raises because of findings: call ``session.assert_clean()`` (or inspect
    ``session.findings``). As a decorator, ``@watch()`` or ``@watch``, each call of the function
    is watched and raises :exc:`RaceError` after it returns if there are findings at or above
    ``fail_on``; the call's session is kept in ``wrapper.last_session``.

    See :mod:`raceguard.api` for what is watched, names, and the one-at-a-time rule.
    """

    def __new__(cls, fail_on: Any = "error", *args: Any, **kwargs: Any) -> Any:
        if callable(fail_on) and not args and not kwargs:  # @raceguard.watch without parentheses
            return cls()(fail_on)
        return super().__new__(cls)

    def __init__(
        self,
        fail_on: str = "error",
        suppressions: Suppressions | str | os.PathLike[str] | Iterable[str] | None = None,
        max_reports: int | None = None,
        simulate_cuda: bool = False,
    ) -> None:
        if fail_on not in SEVERITIES:
            raise ValueError(f"raceguard.watch(): fail_on must be one of {', '.join(SEVERITIES)}, not {fail_on!r}")
        if max_reports is not None and (isinstance(max_reports, bool) or not isinstance(max_reports, int) or max_reports <= 0):
            raise ValueError(f"raceguard.watch(): max_reports must be a positive integer or None, not {max_reports!r}")
        self.fail_on = fail_on
        self.suppressions = load_suppressions(suppressions)
        self.max_reports = max_reports
        self.simulate_cuda = bool(simulate_cuda)
        self._sessions: list[WatchSession] = []

    def _new_session(self, label: str, main_globals: dict | None) -> WatchSession:
        return WatchSession(
            fail_on=self.fail_on,
            suppressions=self.suppressions,
            max_reports=self.max_reports,
            label=label,
            main_globals=lambda: main_globals,
            simulate_cuda=self.simulate_cuda,
        )

    def __enter__(self) -> WatchSession:
        frame = _caller_frame()
        if frame is not None:
            label = f"{_display_path(frame.f_code.co_filename)}:{frame.f_lineno}"
            main_globals = frame.f_globals
        else:
            label, main_globals = "<watch>", None
        del frame
        session = self._new_session(label, main_globals)
        session.owner = f"raceguard.watch() entered at {label}"
        session._start()
        self._sessions.append(session)
        return session

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        session = self._sessions.pop()
        session._stop(exc)

    def __call__(self, func: F) -> F:
        if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError("raceguard.watch() cannot decorate async functions: their code runs in the event loop, after the call returns")
        if inspect.isgeneratorfunction(func):
            raise TypeError("raceguard.watch() cannot decorate generator functions: their code runs after the call returns")
        label = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', getattr(func, '__name__', '?'))}"
        main_globals = getattr(func, "__globals__", None)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            session = self._new_session(label, main_globals)
            session.owner = f"@raceguard.watch() on {label}"
            wrapper.last_session = session  # type: ignore[attr-defined]
            session._start()
            try:
                result = func(*args, **kwargs)
            except BaseException as exc:
                session._stop(exc)
                raise
            session._stop()
            session.assert_clean()
            return result

        wrapper.last_session = None  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"raceguard.watch(fail_on={self.fail_on!r})"


def load_suppressions(value: Any) -> Suppressions | None:
    """A Suppressions from what ``watch(suppressions=...)`` accepts (see :class:`watch`)."""
    if value is None or isinstance(value, Suppressions):
        return value
    if isinstance(value, (str, os.PathLike)):
        return Suppressions.load(value)
    try:
        lines = [str(line) for line in value]
    except TypeError:
        raise TypeError(
            f"raceguard.watch(): suppressions must be a Suppressions, a file path or KIND:PATTERN lines, not {type(value).__name__}"
        ) from None
    return Suppressions.parse("\n".join(lines), source="suppressions=")


def active_session() -> WatchSession | None:
    """The watch session active in this process, if a watch() block or the pytest plugin opened it."""
    from .capture import session as session_mod

    capture = session_mod.ACTIVE
    owner = getattr(capture, "owner", None)
    return owner if isinstance(owner, WatchSession) else None


def untracked_sync_objects(namespace: dict) -> list[str]:
    """Names in ``namespace`` bound to uninstrumented locks, events, conditions, semaphores,
    barriers or queues (and attributes of instances of user-defined classes bound to them)."""
    plain = _plain_sync_types()
    names: list[str] = []
    for key, value in list(namespace.items()):
        if key.startswith("__"):
            continue
        if type(value) in plain:
            names.append(key)
        elif _is_user_instance(value):
            try:
                attrs = vars(value)
            except TypeError:
                continue
            names.extend(f"{key}.{attr}" for attr, inner in list(attrs.items()) if type(inner) in plain)
    return names


def _is_user_instance(value: Any) -> bool:
    """An instance of a class defined in the program's own code (not a library, not a type)."""
    from .capture.stacks import USER, classify_filename

    if isinstance(value, type):
        return False
    module = sys.modules.get(getattr(type(value), "__module__", "") or "")
    filename = getattr(module, "__file__", None)
    return bool(filename) and classify_filename(filename) == USER


def _plain_sync_types() -> set:
    """The original (uninstrumented) primitive types; instrumented ones are raceguard subclasses."""
    import _thread
    import queue

    from . import sync

    originals = getattr(sync, "_orig", {})
    plain: set = {_thread.LockType, _thread.RLock}
    for owner, names in ((threading, ("Condition", "Semaphore", "BoundedSemaphore", "Event", "Barrier")),
                         (queue, ("Queue", "LifoQueue", "PriorityQueue", "SimpleQueue"))):
        for name in names:
            cls = originals.get(f"{owner.__name__}.{name}", getattr(owner, name))
            if isinstance(cls, type) and not cls.__module__.startswith("raceguard"):
                plain.add(cls)
    return plain


def _already_active_message(active: Any, new: WatchSession) -> str:
    owner = getattr(active, "owner", None)
    if isinstance(owner, WatchSession):
        thread = owner._thread_name or "?"
        text = f"raceguard.watch() is already active in thread {thread!r} ({owner.owner})"
        if owner.owner.startswith("the pytest plugin"):
            text += "; use the `raceguard` fixture to get that test's session instead of a watch() block"
        else:
            text += (
                "; nested or concurrent watch() blocks are not supported: use one block around "
                "everything you want to check, or run the blocks one after the other"
            )
        return text
    return (
        "raceguard is already instrumenting this process (it runs under `raceguard check`); "
        "a watch() block cannot be opened inside it"
    )


def _caller_frame() -> Any:
    """The innermost frame outside raceguard, contextlib and the standard library."""
    from .capture.stacks import USER, classify_code

    f = sys._getframe(2)
    first = f
    while f is not None:
        if classify_code(f.f_code) == USER:
            return f
        f = f.f_back
    return first


def _display_path(filename: str) -> str:
    from .capture.stacks import display_path

    return display_path(filename)
