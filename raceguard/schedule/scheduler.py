"""The baton scheduler: exactly one target thread runs at a time.

Every thread the target starts is *managed*: it owns a gate (a raw ``_thread`` lock, locked
while the thread waits for its turn) and runs Python only while it holds the baton. At each
*scheduling point* — every tensor op, every operation on an instrumented primitive, thread start,
join and exit, ``time.sleep`` and ``raceguard.yield_point()`` — the holder asks the strategy which
runnable thread continues and, if it is another one, opens that thread's gate and waits on its
own. The OS never decides who runs next; the strategy does.

States of a managed thread
--------------------------
``RUNNABLE``
    wants to run; exactly one runnable thread (the *holder*) is running, the others wait on
    their gates. A thread registered at ``start()`` is runnable before it has arrived: if it is
    chosen, its gate is opened and it takes the baton when its bootstrap reaches the admission
    point (right after ``Thread._started.set()``, before ``run()``).
``BLOCKED``
    waits *logically* on a key (a lock, an event, a queue, a join, a condition waiter...). A
    primitive that would block never blocks in the OS: it registers with :meth:`Scheduler.block`,
    gives up the baton, and when the object changes (:meth:`Scheduler.wake`) becomes runnable
    again and *retries* the non-blocking variant when it is next scheduled. A timed wait has a
    deadline in virtual time.
``DETACHED``
    the watchdog took the baton away because the thread sat in an uninstrumented blocking call
    (I/O, a C extension, a raw library lock) for ~50 ms without reaching a scheduling point; it
    runs outside the baton until its next scheduling point, where it queues for the baton again.
    Only programs that block in uninstrumented ways lose strict determinism, and only there.
``FINISHED``
    returned from its bootstrap; joiners are woken.

Virtual time
------------
``time.sleep(d)`` does not sleep: it is a yield, and the sleeper's wake-up time ``now + d`` is
in virtual time. Virtual time advances when a sleeper resumes (to its wake-up time) and when no
thread is runnable (to the earliest deadline of a timed wait, which then times out). A timed wait
therefore times out when the program could not make progress otherwise or when a sleeping thread
has "waited long enough"; the result is deterministic.

Deadlocks
---------
When no thread is runnable, none is detached and no timed wait is pending, every live thread is
blocked for good: :attr:`on_deadlock` is called (the child reports the ``deadlock`` finding and
ends the schedule). Wait-for cycles between locks are already caught earlier by the session's
wait-for graph, the moment the closing wait begins.

Failures of the scheduler itself
--------------------------------
A failure at a scheduling point *before* anything changed hands (the strategy raised) is lost like
any hook's: the caller counts it and the thread keeps the baton (``_sync_point``, ``Session.on_op``,
the virtual ``time.sleep``). A failure *in* a hand-over (``block``, ``wake``, ``thread_exit``,
``current``, admission, ``register``, the watchdog's ``steal``, the switch of ``point``) cannot be
undone: the schedule is abandoned (:meth:`Scheduler._abandon`), as raceguard's own error, and no
exception of the scheduler's ever reaches the target's code.

Pure Python; no torch. The session integration lives in :mod:`raceguard.sync` (the
primitives) and :mod:`raceguard.capture.session` (tensor ops).
"""

from __future__ import annotations

import _thread
from typing import Any, Callable, Sequence

from .strategies import Strategy

RUNNABLE, BLOCKED, DETACHED, FINISHED = "runnable", "blocked", "detached", "finished"

# Wait keys of the scheduler's own waits.
SHUTDOWN = ("raceguard", "shutdown")

_get_ident = _thread.get_ident


class ScheduleDeadlocked(BaseException):
    """Raised in the thread that found the deadlock when the deadlock handler returns.

    A BaseException so that the target's ``except Exception`` does not swallow it.
    """

    def __init__(self, blocked: list) -> None:
        super().__init__(f"deadlock: {len(blocked)} thread(s) blocked forever")
        self.blocked = blocked


class ScheduleAborted(SystemExit):
    """Raised once in every managed thread when an in-process schedule is aborted (a deadlock,
    a timeout, the end of the run with threads still waiting for the baton).

    A SystemExit so that it unwinds the thread like interpreter exit does: ``except Exception``
    in the target does not swallow it, and ``threading`` ends a thread it escapes from silently
    (no thread-exception finding).
    """


class SchedulerError(RuntimeError):
    """raceguard's own failure, never the target's: the scheduler raised while handing control
    over between threads (``Scheduler.block``, ``wake``, ``thread_exit``, ``current``...).

    Halfway through a hand-over nothing can be undone (which thread holds the baton, who waits on
    what: the run's determinism, possibly its liveness), so the schedule is abandoned (see
    :meth:`Scheduler._abandon`). ``raceguard stress`` and ``replay`` report it in the report's
    ``incomplete`` section; the in-process front ends (the pytest marker, ``raceguard.hypothesis``)
    raise it, so that it cannot pass for the test's own failure. ``__cause__`` is the scheduler's
    exception, with its traceback.
    """

    def __init__(self, what: str, exc: BaseException) -> None:
        super().__init__(
            f"raceguard failed while {what}: {exc!r}; the schedule was abandoned "
            "(raceguard's own error, not the program's: please report it)"
        )
        self.what = what
        self.__cause__ = exc


class SchedThread:
    """A managed thread as the scheduler sees it."""

    __slots__ = (
        "id",
        "name",
        "gate",
        "status",
        "key",
        "deadline",
        "timed_out",
        "admitted",
        "ident",
        "native_id",
        "raw",
        "nest",
        "busy",
        "wake_at",
        "thread_ref",
        "daemon",
        "abort_raised",
    )

    def __init__(self, tid: int, name: str) -> None:
        self.id = tid
        self.name = name
        self.gate = _thread.allocate_lock()
        self.gate.acquire()
        self.status = RUNNABLE
        self.key: Any = None
        self.deadline: float | None = None
        self.timed_out = False
        self.admitted = False
        self.ident: int | None = None
        self.native_id: int | None = None
        # >0 while the thread runs code whose primitives must behave natively (Thread.start's
        # handshake with the new thread), 0 otherwise.
        self.raw = 0
        # >0 inside an instrumented primitive: nested primitive calls take no scheduling point.
        self.nest = 0
        # True while the thread runs scheduler code (a __del__ run by the GC in there must not
        # re-enter the scheduler).
        self.busy = False
        self.wake_at = 0.0
        self.thread_ref: Any = None
        self.daemon = False
        self.abort_raised = False

    def __repr__(self) -> str:
        return f"<SchedThread {self.id} {self.name!r} {self.status}>"


class Scheduler:
    """One schedule's baton, threads, waits and virtual clock."""

    def __init__(
        self,
        strategy: Strategy,
        *,
        on_deadlock: Callable[["Scheduler", list[SchedThread]], None] | None = None,
        max_steps: int | None = None,
        on_failure: Callable[["Scheduler", str, BaseException], None] | None = None,
    ) -> None:
        self.strategy = strategy
        self.mutex = _thread.RLock()
        self.threads: list[SchedThread] = []
        self.by_ident: dict[int, SchedThread] = {}
        self.pending: dict[int, SchedThread] = {}
        self.holder: SchedThread | None = None
        self.waiters: dict[Any, list[SchedThread]] = {}
        self.on_deadlock = on_deadlock
        # Told once, with (scheduler, what, exception), when the scheduler itself fails halfway
        # through a hand-over (see _abandon); ``failure`` keeps (what, exception).
        self.on_failure = on_failure
        self.failure: tuple[str, BaseException] | None = None
        self.max_steps = max_steps
        self.stopped = False
        # Set by abort(): every managed thread unwinds with ScheduleAborted at its next turn.
        self.aborted = False
        self.vnow = 0.0
        # Counters (reported in the schedule's statistics).
        self.steps = 0  # scheduling points
        self.choices = 0  # points where the strategy had a choice (>= 2 runnable)
        self.switches = 0  # baton hand-overs to another thread
        self.detached = 0
        self.watchdog_steals = 0
        self.timeouts = 0
        # Moves on every scheduler event: the watchdog's sign of progress.
        self.progress = 0
        self.live = 0
        # torch._C._current_graph_task_id when torch is there: -1 outside backward().
        self.graph_task_id: Callable[[], int] | None = None

    # -- threads ---------------------------------------------------------------------------
    def add_main(self, name: str = "MainThread") -> SchedThread:
        """The calling thread becomes thread 0 and holds the baton."""
        with self.mutex:
            t = self._new_thread(name)
            t.admitted = True
            t.ident = _get_ident()
            t.native_id = _native_id()
            self.by_ident[t.ident] = t
            self.holder = t
            return t

    def register(self, name: str, thread: Any = None, daemon: bool = False) -> SchedThread | None:
        """A thread is being started by the holder: it is runnable from now on."""
        try:
            with self.mutex:
                t = self._new_thread(name)
                t.thread_ref = thread
                t.daemon = daemon
                self.progress += 1
                return t
        except Exception as exc:
            self._abandon("register", exc)
            return None  # the schedule is over: the thread runs unmanaged

    def _new_thread(self, name: str) -> SchedThread:
        t = SchedThread(len(self.threads), name)
        self.threads.append(t)
        self.live += 1
        self.strategy.on_thread_created(t.id)
        return t

    def expect(self, t: SchedThread) -> None:
        """Called by the new OS thread at the very start of its bootstrap."""
        try:
            t.ident = _get_ident()
            t.native_id = _native_id()
            self.pending[t.ident] = t
        except Exception as exc:
            self._abandon("expect", exc)

    def maybe_admit(self, event: Any) -> None:
        """``Event.set()`` hook: a pending thread setting its own ``_started`` event is admitted."""
        try:
            t = self.pending.get(_get_ident())
            if t is None:
                return
            thread = t.thread_ref
            if thread is not None and getattr(thread, "_started", None) is not event:
                return
            self.admit(t)
        except Exception as exc:
            self._abandon("maybe_admit", exc)

    def admit(self, t: SchedThread) -> None:
        """The new thread waits for its first turn (its gate is opened when it is chosen)."""
        try:
            self.pending.pop(t.ident, None)
            with self.mutex:
                self.by_ident[t.ident] = t  # type: ignore[index]
                t.admitted = True
                self.progress += 1
            if self.stopped:
                return
            t.gate.acquire()
        except Exception as exc:
            self._abandon("admit", exc)

    def current(self) -> SchedThread | None:
        """The calling thread, if it is managed and may take scheduling decisions now.

        A detached thread queues for the baton first. Returns None for unmanaged threads, for a
        thread inside ``Thread.start``'s handshake, inside scheduler code, and once stopped.
        """
        try:
            t = self.by_ident.get(_get_ident())
            if t is None:
                if self.pending:
                    t = self._late_admission()
                if t is None:
                    return None
            if self.aborted:
                self._raise_abort(t)
            if t.raw or t.busy or self.stopped:
                return None
            if t.status is DETACHED:
                self._reattach(t)
            return t
        except Exception as exc:
            self._abandon("current", exc)
            return None

    def _late_admission(self) -> SchedThread | None:
        # A thread whose _started event is not instrumented: admit it at its first scheduling
        # point once start() has returned in its parent.
        t = self.pending.get(_get_ident())
        if t is None:
            return None
        thread = t.thread_ref
        started = getattr(thread, "_started", None)
        if started is not None and not getattr(started, "_flag", True):
            return None
        self.admit(t)
        return t

    # -- scheduling points -----------------------------------------------------------------
    def point(self, t: SchedThread) -> None:
        """A scheduling point of the holder ``t``: the strategy picks who continues."""
        if not t.busy:
            self.strategy.on_point(t.id)
        if self.live <= 1 or t.busy:
            self.steps += 1
            return
        failed = None
        t.busy = True
        try:
            with self.mutex:
                self.steps += 1
                self.progress += 1
                # A failure up to here (the strategy's) changed no hands: it reaches the caller,
                # which loses this point and goes on (a hook boundary).
                nxt = self._choose(t)
                if nxt is t or nxt is None:
                    return
                try:
                    self._handoff(nxt)
                except Exception as exc:  # the baton may be with two threads now
                    failed = exc
        finally:
            t.busy = False
        if failed is not None:
            self._abandon("point", failed)
            return
        t.gate.acquire()
        if self.aborted:
            self._raise_abort(t)

    def op_point(self) -> None:
        """Tensor-op hook (called from ``Session.on_op`` only while a scheduler is active).

        Ops the autograd engine runs during ``backward()`` take no scheduling point: the engine
        holds per-node C++ locks there (AccumulateGrad), and another thread scheduled in between
        would block on them in C++, out of the scheduler's sight. A backward pass is one step.
        """
        t = self.current()
        if t is not None and not t.nest:
            graph_task = self.graph_task_id
            if graph_task is not None and graph_task() != -1:
                return
            self.point(t)

    def yield_(self, t: SchedThread, delay: float = 0.0) -> None:
        """``time.sleep(delay)`` / ``yield_point()``: a point that hints "let others run"."""
        t.wake_at = self.vnow + max(delay, 0.0)
        self.strategy.on_yield(t.id)
        self.point(t)
        if t.wake_at > self.vnow:
            with self.mutex:
                if t.wake_at > self.vnow:
                    self.vnow = t.wake_at
                    self._expire_timers()

    def block(self, t: SchedThread, key: Any, timeout: float | None = None) -> bool:
        """``t`` cannot proceed until ``key`` changes: give up the baton. Returns True on timeout.

        On return ``t`` holds the baton again and retries (the change may not suit it: a woken
        lock waiter may find the lock taken again, and then blocks again).
        """
        try:
            deadlock = None
            t.busy = True
            try:
                with self.mutex:
                    self.steps += 1
                    self.progress += 1
                    t.status = BLOCKED
                    t.key = key
                    t.timed_out = False
                    t.deadline = None if timeout is None else self.vnow + max(float(timeout), 0.0)
                    self.waiters.setdefault(key, []).append(t)
                    nxt = self._choose(t)
                    if nxt is t:
                        return t.timed_out  # its own timeout fired: nothing else could run
                    if nxt is None:
                        if self.detached:
                            self.holder = None  # the baton idles until a detached thread returns
                        else:
                            deadlock = [x for x in self.threads if x.status is BLOCKED]
                    else:
                        self._handoff(nxt)
            finally:
                t.busy = False
            if deadlock is not None:
                self._deadlock(deadlock)
            t.gate.acquire()
            if self.aborted:
                self._raise_abort(t)
            return t.timed_out
        except Exception as exc:
            self._abandon("block", exc)
            return True  # only in a thread already unwinding: nothing waits any more

    def wake(self, key: Any) -> None:
        """``key`` changed: every thread blocked on it becomes runnable (and retries)."""
        try:
            if key not in self.waiters:
                return
            with self.mutex:
                waiting = self.waiters.pop(key, None)
                if not waiting:
                    return
                self.progress += 1
                for w in waiting:
                    if w.status is BLOCKED:
                        w.status = RUNNABLE
                        w.key = None
                        w.deadline = None
                if self.holder is None and not self.stopped:
                    # The baton was idle (its last holder detached): hand it over right away.
                    nxt = self._choose(None)
                    if nxt is not None:
                        self._handoff(nxt)
        except Exception as exc:
            self._abandon("wake", exc)

    def thread_exit(self, t: SchedThread) -> None:
        """``t`` has finished: wake its joiners and hand the baton on (without waiting)."""
        try:
            if t.status is DETACHED:
                self._reattach(t)
            deadlock = None
            with self.mutex:
                t.status = FINISHED
                t.key = None
                self.live -= 1
                self.progress += 1
                if t.ident is not None:
                    self.by_ident.pop(t.ident, None)
                    self.pending.pop(t.ident, None)
                for key in (("join", t.id), SHUTDOWN):
                    for w in self.waiters.pop(key, ()):
                        if w.status is BLOCKED:
                            w.status = RUNNABLE
                            w.key = None
                            w.deadline = None
                if self.stopped:
                    return  # no more decisions (an aborted thread unwinding, the end of a schedule)
                if self.holder is not t and self.holder is not None:
                    return  # never held the baton (not admitted): nothing to hand on
                nxt = self._choose(None)
                if nxt is None:
                    self.holder = None
                    blocked = [x for x in self.threads if x.status is BLOCKED]
                    if blocked and not self.detached and not self.stopped:
                        deadlock = blocked
                else:
                    self._handoff(nxt)
            if deadlock is not None:
                self._deadlock(deadlock)
        except Exception as exc:
            self._abandon("thread_exit", exc, unwind=False)  # the thread is ending: it just ends

    def wait_for_threads(self, t: SchedThread, on_block: Callable[[], Any] | None = None,
                         on_unblock: Callable[[Any], None] | None = None) -> None:
        """Interpreter shutdown: the main thread waits until every non-daemon thread finished."""
        while True:
            with self.mutex:
                alive = [x for x in self.threads if x is not t and x.status is not FINISHED and not _is_daemon(x)]
            if not alive:
                return
            token = on_block() if on_block is not None else None
            try:
                self.block(t, SHUTDOWN)
            finally:
                if on_unblock is not None:
                    on_unblock(token)

    # -- watchdog --------------------------------------------------------------------------
    def steal(self, marker: int) -> bool:
        """Called by the watchdog: the holder made no progress since ``marker``; detach it."""
        try:
            with self.mutex:
                h = self.holder
                if h is None or self.progress != marker or self.stopped or not h.admitted:
                    return False
                h.status = DETACHED
                self.detached += 1
                self.watchdog_steals += 1
                self.progress += 1
                nxt = self._choose(None)
                if nxt is None:
                    self.holder = None
                else:
                    self._handoff(nxt)
                return True
        except Exception as exc:  # in the watchdog's own thread
            self._abandon("steal", exc)
            return False

    def _reattach(self, t: SchedThread) -> None:
        with self.mutex:
            if t.status is not DETACHED:
                return
            self.detached -= 1
            t.status = RUNNABLE
            self.progress += 1
            if self.holder is None:
                self.holder = t
                return
        t.gate.acquire()
        if self.aborted:
            self._raise_abort(t)

    def stop(self) -> None:
        """The schedule is over (the child is about to exit): take no more decisions."""
        self.stopped = True

    def abort(self) -> None:
        """End the schedule in a process that goes on (in-process schedules): take no more
        decisions and let every managed thread that waits for its turn go; each one raises
        :class:`ScheduleAborted` once, at its next scheduling point or where it waited, and then
        runs with plain primitives while it unwinds."""
        with self.mutex:
            self.stopped = True
            self.aborted = True
            self.holder = None
            for t in self.threads:
                if t.status is not FINISHED and t.gate.locked():
                    t.gate.release()

    def _abandon(self, name: str, exc: BaseException, unwind: bool = True) -> None:
        """The scheduler itself raised ``exc`` in ``Scheduler.<name>``, halfway through handing
        control over between threads. Which thread holds the baton and who waits on what can no
        longer be trusted, and nothing of it can be undone: the schedule ends here, as
        raceguard's failure, and ``exc`` never reaches the target.

        ``on_failure`` is told once (the child of ``stress`` reports it and ends its process, so
        nothing more of the target runs; it does not return). Otherwise the schedule is aborted
        as an in-process deadlock is: every managed thread unwinds with :class:`ScheduleAborted`,
        the calling one right away (unless ``unwind`` is False: a finishing thread just ends; an
        unmanaged thread goes on, with plain primitives from now on).
        """
        if self.failure is None:
            what = f"handing control over between threads (Scheduler.{name})"  # report.text knows it
            self.failure = (what, exc)
            self.stopped = True  # no more decisions, in any thread
            if self.on_failure is not None:
                try:
                    self.on_failure(self, what, exc)
                except Exception:
                    pass  # the handler's own failure: the abort below still ends the schedule
        try:
            self.abort()
            t = self.by_ident.get(_get_ident()) if unwind else None
        except Exception:
            t = None  # what is left of the scheduler is beyond use: never raise into the target
        if t is not None:
            self._raise_abort(t)

    def _raise_abort(self, t: SchedThread) -> None:
        if t.abort_raised or t.busy:
            return
        t.abort_raised = True
        raise ScheduleAborted("raceguard: the schedule was aborted")

    # -- internals (mutex held) ------------------------------------------------------------
    def _choose(self, current: SchedThread | None) -> SchedThread | None:
        runnable = [x for x in self.threads if x.status is RUNNABLE]
        if not runnable:
            if not self._advance_to_next_deadline():
                return None
            runnable = [x for x in self.threads if x.status is RUNNABLE]
            if not runnable:
                return None
        if len(runnable) == 1:
            return runnable[0]
        self.choices += 1
        ids = [x.id for x in runnable]
        tid = self.strategy.choose(ids, self.steps, current.id if current is not None else None)
        return self.threads[tid]

    def _handoff(self, nxt: SchedThread) -> None:
        if nxt is not self.holder:
            self.switches += 1
        self.holder = nxt
        nxt.gate.release()

    def _advance_to_next_deadline(self) -> bool:
        timed = [x for x in self.threads if x.status is BLOCKED and x.deadline is not None]
        if not timed:
            return False
        first = min(timed, key=lambda x: (x.deadline, x.id))
        self.vnow = max(self.vnow, first.deadline)  # type: ignore[type-var]
        self._expire_timers()
        return True

    def _expire_timers(self) -> None:
        for x in self.threads:
            if x.status is BLOCKED and x.deadline is not None and x.deadline <= self.vnow:
                waiting = self.waiters.get(x.key)
                if waiting is not None:
                    try:
                        waiting.remove(x)
                    except ValueError:
                        pass
                    if not waiting:
                        self.waiters.pop(x.key, None)
                x.status = RUNNABLE
                x.key = None
                x.deadline = None
                x.timed_out = True
                self.timeouts += 1

    def _deadlock(self, blocked: list[SchedThread]) -> None:
        """Every live thread is blocked for good. The handler normally ends the process (the
        child reports the finding and exits); if it returns, the calling thread is unwound."""
        self.stopped = True
        if self.on_deadlock is not None:
            self.on_deadlock(self, blocked)
        if self.aborted:
            # The handler aborted the schedule: unwind like every other thread (a thread that has
            # just finished, found the deadlock in thread_exit, simply ends).
            t = self.by_ident.get(_get_ident())
            if t is not None:
                self._raise_abort(t)
            return
        raise ScheduleDeadlocked(blocked)

    # -- reporting -------------------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "scheduling_points": self.steps,
            "choices": self.choices,
            "switches": self.switches,
            "scheduled_threads": len(self.threads),
            "watchdog_interventions": self.watchdog_steals,
            "timeouts": self.timeouts,
            "virtual_seconds": round(self.vnow, 6),
        }


def _is_daemon(t: SchedThread) -> bool:
    thread = t.thread_ref
    if thread is not None:
        try:
            return bool(thread.daemon)
        except Exception:
            pass
    return t.daemon


def _native_id() -> int | None:
    try:
        return _thread.get_native_id()
    except Exception:  # pragma: no cover - platforms without native ids
        return None


def runnable_ids(threads: Sequence[SchedThread]) -> list[int]:
    return [t.id for t in threads if t.status is RUNNABLE]
