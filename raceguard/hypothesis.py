"""Hypothesis interleavings: let Hypothesis search, shrink and remember thread schedules.

::

    from hypothesis import given
    from raceguard.hypothesis import interleavings

    @given(schedule=interleavings())
    def test_reload_is_atomic(schedule):
        server = Server()
        schedule.run(server.reload, server.handle, server.handle)  # each callable in its own thread
        assert server.consistent()

A drawn :class:`Schedule` is a *value*: a short list of preemptions ``(callable, step, pick)``.
Under it, :meth:`Schedule.run` starts each callable in its own thread, all of them before any
runs, and raceguard's scheduler lets exactly one thread run at a time. The running thread keeps
running until it blocks or finishes (then the lowest-numbered runnable one continues), except at
the listed preemptions: when the thread of callable number ``callable`` (0-based, in argument
order, modulo their number) takes its ``step``-th scheduling point (0-based, counting every one
it takes: tensor ops, lock/queue/event operations, ``time.sleep``,
:func:`raceguard.yield_point`) and another thread could run, it is switched out for the
``pick``-th other runnable thread. So

* Hypothesis explores interleavings like any other input and keeps failing ones in its example
  database;
* shrinking the list shrinks the number of context switches: positions are per thread, so
  dropping one preemption leaves the others where they were, and the falsifying example shows
  the fewest preemptions that still fail (usually one or two), at the earliest points;
* the falsifying example prints as ``schedule=replay([(0, 3, 0)])``, and
  ``raceguard.hypothesis.replay([(0, 3, 0)]).run(...)`` replays exactly that interleaving anywhere
  (a plain test, a debugger), as long as the program is deterministic given the schedule.

Data races found during the run are reported too: with ``races="raise"`` (the default) a run
that raced raises :exc:`raceguard.RaceError` (its message is the text report); ``races="ignore"``
leaves them out, e.g. to look for the atomicity bug itself in code that is knowingly racy. Under
the pytest plugin (``--raceguard``, the marker or the ``raceguard`` fixture) the run attaches to
the test's session instead: its races are reported with the test's, as the plugin reports them.

Instrumented primitives: the scheduler sees the locks, events, queues... created with raceguard's
primitives installed. :func:`interleavings` and :func:`replay` install them (for the rest of the
process; without an active session they behave exactly like the originals), so objects the test
builds are seen. An object created *before* that (at import time of a module imported earlier)
is a plain one: a thread blocking on it blocks in the OS, which the scheduler notices after 50 ms
and then lets the others run, at the cost of determinism around that wait.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable, Iterable, Sequence

from .schedule.inprocess import DEFAULT_TIMEOUT, ScheduledRun, run_schedule
from .schedule.scheduler import ScheduleAborted, SchedulerError
from .schedule.strategies import PreemptionStrategy

__all__ = ["DeadlockError", "Schedule", "ScheduleTimeout", "SchedulerError", "interleavings", "replay"]

RACES = ("raise", "ignore")
DEFAULT_MAX_PREEMPTIONS = 4
# Preemptions land within the first DEFAULT_MAX_STEP scheduling points of a callable's thread.
# A wider range reaches deeper into long threads but lands less often on the few points where a
# short thread's atomicity bug sits: on the torn reload of examples/schedules_example, 100
# examples found it in 19 of 20 Hypothesis seeds with 16, in 15 of 20 with 32.
DEFAULT_MAX_STEP = 16
# Callable indices are drawn from [0, CALLABLES) and taken modulo the number of callables:
# uniform for 1, 2, 3, 4 or 6 callables.
CALLABLES = 12
# How many other runnable threads a preemption's ``pick`` distinguishes before wrapping around.
PICKS = 4


class DeadlockError(AssertionError):
    """Every thread of the run was blocked for good under this schedule."""


class ScheduleTimeout(AssertionError):
    """The run did not finish within its time limit under this schedule."""


class Schedule:
    """One interleaving, as a list of preemptions; run callables under it with :meth:`run`.

    Built by :func:`interleavings` (drawn by Hypothesis) or :func:`replay`. After a run,
    :attr:`used` lists the preemptions that took place, :attr:`switches` counts every hand-over
    between threads (preemptions plus the switches the program forced by blocking or
    finishing), and :attr:`last_run` has the details.
    """

    def __init__(
        self,
        preemptions: Iterable[Sequence[int]] = (),
        *,
        races: str = "raise",
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        if races not in RACES:
            raise ValueError(f"races must be one of {', '.join(RACES)}, not {races!r}")
        self.preemptions: list[tuple[int, int, int]] = [_triple(p) for p in preemptions]
        self.races = races
        self.timeout = timeout
        self.used: list[tuple[int, int, int]] = []
        self.switches: int | None = None
        self.last_run: ScheduledRun | None = None

    def __repr__(self) -> str:
        extra = "" if self.races == "raise" else f", races={self.races!r}"
        extra += "" if self.timeout == DEFAULT_TIMEOUT else f", timeout={self.timeout!r}"
        return f"replay({self.preemptions!r}{extra})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return (self.preemptions, self.races, self.timeout) == (other.preemptions, other.races, other.timeout)

    __hash__ = None  # type: ignore[assignment]

    def run(self, *callables: Callable[[], Any], races: str | None = None, timeout: float | None = ...) -> list[Any]:  # type: ignore[assignment]
        """Run each callable in its own thread under this schedule; return their results.

        Threads are started in argument order, all before the first one runs, and all joined
        before this returns. Threads that the callables start themselves are scheduled too
        (they run when the others block or finish) but are never preempted. Raises the first exception a callable raised
        (in argument order), :exc:`DeadlockError` if the threads deadlocked,
        :exc:`ScheduleTimeout` past ``timeout`` seconds, and — with ``races="raise"`` —
        :exc:`raceguard.RaceError` if the run had data races (or other error findings), and
        :exc:`SchedulerError` if raceguard's own scheduler failed (never the callables' failure).
        ``races`` and ``timeout`` override the schedule's own for this call.
        """
        __tracebackhide__ = True  # pytest: show the test's line, not this one
        if not callables:
            raise TypeError("Schedule.run() needs at least one callable")
        for fn in callables:
            if not callable(fn):
                raise TypeError(f"Schedule.run() takes callables, got {fn!r}")
        races = self.races if races is None else races
        if races not in RACES:
            raise ValueError(f"races must be one of {', '.join(RACES)}, not {races!r}")
        timeout = self.timeout if timeout is ... else timeout
        results: list[Any] = [None] * len(callables)
        errors: list[BaseException | None] = [None] * len(callables)

        def body() -> None:
            threads = []
            for i, fn in enumerate(callables):
                thread = threading.Thread(
                    target=_call_into, args=(fn, results, errors, i), name=f"callable-{i + 1} ({_name(fn)})", daemon=True
                )
                threads.append(thread)
                thread.start()
            for thread in threads:
                thread.join()

        frame = sys._getframe(1)
        label = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        main_globals = frame.f_globals
        del frame
        # Callable i runs in thread i + 1 (the calling thread, thread 0, only starts and joins
        # them: it is never preempted, so all callables are started before the first one runs).
        n = len(callables)
        strategy = PreemptionStrategy([(c % n + 1, step, pick) for c, step, pick in self.preemptions])
        try:
            run = run_schedule(body, strategy, timeout=timeout, label=label, main_globals=main_globals)
        except SchedulerError as exc:  # raceguard's own failure, never the callables'
            _add_note(exc, f"under raceguard {self!r}")
            raise
        self.last_run = run
        self.used = [(tid - 1, step, pick) for tid, step, pick in strategy.used]
        self.switches = int(run.stats.get("switches", 0))
        self._note()
        if run.deadlock is not None:
            raise DeadlockError(f"deadlock under {self!r}: " + "; ".join(run.deadlock))
        if run.timed_out:
            raise ScheduleTimeout(f"the run did not finish within {timeout} s under {self!r}")
        if run.error is not None:
            raise run.error
        for i, error in enumerate(errors):
            if error is not None:
                _add_note(error, f"raised by callable {i + 1} ({_name(callables[i])}) under raceguard {self!r}")
                raise error
        if races == "raise" and run.report is not None and run.findings:
            from .api import RaceError

            raise RaceError(run.report, "error", note=f"under raceguard {self!r}")
        return results

    def _note(self) -> None:
        """Tell Hypothesis how to replay this run (printed with a falsifying example only)."""
        if "hypothesis" not in sys.modules:
            return
        try:
            from hypothesis import note
            from hypothesis.control import _current_build_context

            if _current_build_context.value is None:
                return
            note(
                f"raceguard: {len(self.used)} preemption(s), {self.switches} switch(es); "
                f"replay with raceguard.hypothesis.{self!r}.run(...)"
            )
        except Exception:
            pass


def _call_into(fn: Callable[[], Any], results: list[Any], errors: list[BaseException | None], i: int) -> None:
    try:
        results[i] = fn()
    except ScheduleAborted:
        raise
    except BaseException as exc:  # re-raised by Schedule.run in the calling thread
        errors[i] = exc


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def _add_note(exc: BaseException, text: str) -> None:
    add = getattr(exc, "add_note", None)  # Python 3.11+
    if add is not None:
        add(text)


def _triple(p: Any) -> tuple[int, int, int]:
    problem = f"a preemption is a triple (callable, step, pick) of non-negative integers, got {p!r}"
    try:
        index, step, pick = p
    except (TypeError, ValueError):
        raise ValueError(problem) from None
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (index, step, pick)):
        raise ValueError(problem)
    return index, step, pick


_held = False


def _hold_primitives() -> None:
    """Install raceguard's primitives for the rest of the process (once)."""
    global _held
    if _held:
        return
    from .process import install

    install.hold_primitives()
    _held = True


def _release_primitives() -> None:
    """Undo :func:`_hold_primitives` (for test suites that check the process is left untouched)."""
    global _held
    if not _held:
        return
    from .process import install

    install.release_primitives()
    _held = False


def replay(preemptions: Iterable[Sequence[int]] = (), *, races: str = "raise", timeout: float | None = DEFAULT_TIMEOUT) -> Schedule:
    """The schedule a falsifying example printed as ``replay([...])``: run it again with
    ``.run(...)``. ``replay()`` (no preemptions) runs the callables one after the other."""
    _hold_primitives()
    return Schedule(preemptions, races=races, timeout=timeout)


def interleavings(
    *,
    max_preemptions: int = DEFAULT_MAX_PREEMPTIONS,
    max_step: int = DEFAULT_MAX_STEP,
    races: str = "raise",
    timeout: float | None = DEFAULT_TIMEOUT,
) -> Any:
    """A Hypothesis strategy of :class:`Schedule` values.

    ``max_preemptions`` bounds the number of context switches a schedule forces (CHESS's
    preemption bound: most bugs need one or two); ``max_step`` bounds the scheduling point of its
    callable's thread a preemption happens at (raise it for threads that do many tensor ops
    before the interesting point); ``races`` and ``timeout`` are passed to every
    :meth:`Schedule.run`.
    """
    try:
        from hypothesis import strategies as st
    except ImportError:
        raise ImportError(
            "raceguard.hypothesis.interleavings() needs Hypothesis: pip install 'torch-raceguard[hypothesis]'"
        ) from None

    if races not in RACES:
        raise ValueError(f"races must be one of {', '.join(RACES)}, not {races!r}")
    for name, value in (("max_preemptions", max_preemptions), ("max_step", max_step)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"interleavings(): {name} must be a non-negative integer, not {value!r}")
    _hold_primitives()
    preemption = st.tuples(st.integers(0, CALLABLES - 1), st.integers(0, max_step), st.integers(0, PICKS - 1))
    return st.lists(preemption, max_size=max_preemptions).map(
        lambda ps: Schedule(ps, races=races, timeout=timeout)
    )
