"""The baton scheduler with real OS threads, driven by hand (no torch, no capture session)."""

from __future__ import annotations

import _thread
import threading

import pytest

from raceguard.schedule.scheduler import BLOCKED, FINISHED, RUNNABLE, Scheduler, ScheduleDeadlocked
from raceguard.schedule.strategies import FirstStrategy, PCTStrategy, RandomStrategy, RecordingStrategy


class Harness:
    """Managed threads the way the capture layer wires them: register at start, admission on
    the new thread, thread_exit at the end; the main thread joins logically."""

    def __init__(self, strategy, on_deadlock=None):
        self.sched = Scheduler(strategy, on_deadlock=on_deadlock)
        self.main = self.sched.add_main()
        self.threads = []
        self.errors = []

    def start(self, body, name=None):
        st = self.sched.register(name or f"t{len(self.threads) + 1}")
        started = threading.Event()

        def bootstrap():
            self.sched.expect(st)
            started.set()
            self.sched.admit(st)
            try:
                body(st)
            except ScheduleDeadlocked:
                pass
            except BaseException as exc:  # pragma: no cover - surfaced by the test
                self.errors.append(exc)
            finally:
                self.sched.thread_exit(st)

        thread = threading.Thread(target=bootstrap, daemon=True)
        thread.start()
        started.wait()
        self.threads.append((st, thread))
        return st

    def join_all(self):
        for st, thread in self.threads:
            while st.status is not FINISHED:
                self.sched.block(self.main, ("join", st.id))
            thread.join(5)
        assert not self.errors, self.errors


def run_counter_program(strategy, workers=3, steps=5):
    """Each worker does read / point / write on a shared counter: lost updates depend on the
    interleaving. Returns the trace of (thread, step) and the final counter."""
    h = Harness(strategy)
    state = {"n": 0, "running": None}
    trace = []

    def body(st):
        for i in range(steps):
            assert state["running"] in (None, st.id), "two threads ran at once"
            state["running"] = st.id
            v = state["n"]
            trace.append((st.id, i))
            state["running"] = None
            h.sched.point(st)
            state["running"] = st.id
            state["n"] = v + 1
            state["running"] = None
            h.sched.point(st)

    for _ in range(workers):
        h.start(body)
    h.sched.point(h.main)
    h.join_all()
    return trace, state["n"], h.sched


@pytest.mark.parametrize("make", [lambda s: RandomStrategy(s), lambda s: PCTStrategy(s, 3, 30)])
def test_same_seed_same_interleaving_with_real_threads(make):
    for seed in (1, 2, 3):
        first = run_counter_program(make(seed))[:2]
        for _ in range(3):
            assert run_counter_program(make(seed))[:2] == first


def test_exactly_one_thread_runs_at_a_time_and_interleavings_vary():
    results = set()
    for seed in range(15):
        trace, n, sched = run_counter_program(RandomStrategy(seed))
        assert len(trace) == 15
        results.add(n)
        assert sched.switches > 0
    assert len(results) > 2 and min(results) < 15  # lost updates, how many depends on the schedule
    # Without preemption (PCT without change points) no update is lost.
    assert run_counter_program(PCTStrategy(1, 3, None))[1] == 15


def test_recorded_choices_are_the_strategy_decisions():
    recorder = RecordingStrategy(RandomStrategy(9))
    _, _, sched = run_counter_program(recorder)
    assert len(recorder.choices) == sched.choices > 0


def test_block_and_wake():
    h = Harness(FirstStrategy())
    log = []
    key = object()
    flag = {"set": False}

    def waiter(st):
        while not flag["set"]:
            log.append("block")
            h.sched.block(st, key)
        log.append("woken")

    def setter(st):
        h.sched.point(st)
        flag["set"] = True
        log.append("set")
        h.sched.wake(key)

    h.start(waiter)
    h.start(setter)
    h.join_all()
    assert log == ["block", "set", "woken"]


class LastStrategy(FirstStrategy):
    def choose(self, runnable, step, current):
        return runnable[-1]


def test_deadlock_is_reported_when_nothing_can_run():
    found = []

    def on_deadlock(sched, blocked):
        found.append(sorted(t.id for t in blocked))

    h = Harness(LastStrategy(), on_deadlock=on_deadlock)
    h.start(lambda st: h.sched.block(st, "never-1"))
    h.start(lambda st: h.sched.block(st, "never-2"))
    h.sched.point(h.main)  # both threads run and block for good
    with pytest.raises(ScheduleDeadlocked):
        h.sched.block(h.main, "never-main")  # the last thread to block finds the deadlock
    assert found == [[0, 1, 2]]
    assert h.sched.stopped


def test_timed_wait_times_out_in_virtual_time_when_nothing_else_can_run():
    h = Harness(FirstStrategy())
    outcome = {}

    def waiter(st):
        outcome["timed_out"] = h.sched.block(st, "nobody-sets-this", timeout=2.5)
        outcome["now"] = h.sched.vnow

    h.start(waiter)
    h.join_all()
    assert outcome == {"timed_out": True, "now": 2.5}


def test_a_sleeper_advances_virtual_time_and_expires_timed_waits():
    h = Harness(FirstStrategy())
    seen = {}

    def poller(st):
        for _ in range(5):
            h.sched.yield_(st, 1.0)
        seen["poller_done_at"] = h.sched.vnow

    def timed(st):
        seen["timed_out"] = h.sched.block(st, "event", timeout=3.0)
        seen["woke_at"] = h.sched.vnow

    h.start(timed)
    h.start(poller)
    h.join_all()
    assert seen["timed_out"] is True
    assert 3.0 <= seen["woke_at"] <= 5.0
    assert seen["poller_done_at"] == 5.0


def test_watchdog_steal_detaches_the_holder_and_it_rejoins_at_its_next_point():
    h = Harness(FirstStrategy())
    gate = _thread.allocate_lock()
    gate.acquire()
    order = []

    def stuck(st):
        order.append("stuck: before native wait")
        gate.acquire()  # an uninstrumented wait: only another managed thread can release it
        order.append("stuck: after native wait")
        h.sched.point(st)  # reattaches
        order.append("stuck: reattached")

    def helper(st):
        order.append("helper runs")
        gate.release()
        h.sched.point(st)

    h.start(stuck)
    h.start(helper)

    def watchdog():
        import time

        while h.sched.holder is None or h.sched.holder.id != 1 or not order:
            time.sleep(0.001)
        time.sleep(0.02)
        assert h.sched.steal(h.sched.progress)

    w = threading.Thread(target=watchdog, daemon=True)
    w.start()
    h.join_all()
    w.join(5)
    assert order[0] == "stuck: before native wait"
    assert order.index("helper runs") < order.index("stuck: after native wait")
    assert h.sched.watchdog_steals == 1


def test_thread_states_are_reported():
    sched = Scheduler(FirstStrategy())
    main = sched.add_main()
    other = sched.register("other")
    assert main.status is RUNNABLE and other.status is RUNNABLE
    assert sched.stats()["scheduled_threads"] == 2
    assert BLOCKED != RUNNABLE
