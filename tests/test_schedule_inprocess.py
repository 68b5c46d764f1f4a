"""In-process controlled schedules: the preemption strategy, ``run_schedule`` and the
``raceguard.hypothesis`` API, in this process (no pytester).

The strategy is checked on simulated programs against a brute-force reading of its trace; the
runner on real threads: deadlocks, time limits and leftover threads must end the run and leave
the process as it was (no thread left behind, ``time.sleep`` and the generators restored).
"""

from __future__ import annotations

import queue
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import raceguard
import raceguard.hypothesis
from raceguard.hypothesis import DeadlockError, Schedule, ScheduleTimeout, interleavings, replay
from raceguard.schedule import hooks
from raceguard.schedule.inprocess import NestedScheduleError, explore, run_schedule
from raceguard.schedule.simulate import simulate
from raceguard.schedule.strategies import PreemptionStrategy, RandomStrategy

@pytest.fixture(autouse=True)
def _restore_primitives():
    # interleavings() and replay() install raceguard's primitives for the rest of the process;
    # other tests in this worker (the faithfulness suite) need the originals back.
    yield
    raceguard.hypothesis._release_primitives()


# -- the strategy, on simulated programs ----------------------------------------------------------


def worker(n: int):
    def program():
        for _ in range(n):
            yield ("step",)

    return program


programs = st.lists(st.integers(1, 6), min_size=2, max_size=4)
preemption_lists = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 7), st.integers(0, 3)), max_size=4)


def points_and_preemptions(trace: list, sizes: list[int]) -> list:
    """Brute force over a trace: before every action the running thread takes a scheduling
    point (its ``k``-th, counting all of its own) if it still has work; the point is a
    preemption when the next action is another thread's."""
    left = list(sizes)
    count = [0] * len(sizes)
    current = 0
    preempted = []
    for tid, _ in trace:
        if left[current] > 0:
            if tid != current:
                preempted.append((current, count[current], tid))
            count[current] += 1
        left[tid] -= 1
        current = tid
    return preempted


@given(programs)
def test_no_preemptions_run_each_thread_to_its_end(sizes):
    result = simulate(PreemptionStrategy([]), [worker(n) for n in sizes])
    order = [tid for tid, _ in result.trace]
    assert order == sorted(order)  # thread 0 to its end, then 1, then 2...


@given(programs, preemption_lists)
def test_preemptions_fire_exactly_where_they_are_listed(sizes, preemptions):
    strategy = PreemptionStrategy(preemptions)
    result = simulate(strategy, [worker(n) for n in sizes])
    preempted = points_and_preemptions(result.trace, sizes)
    # Every switch away from a thread that could continue is one of the listed preemptions, in
    # the order they fired; nothing else switches.
    assert [(t, k) for t, k, _ in preempted] == [(t, k) for t, k, _ in strategy.used]
    assert set(strategy.used) <= set(preemptions)
    for (t, k, pick), (_, _, to) in zip(strategy.used, preempted):
        assert to != t
    # The first triple naming a point wins; no point fires twice.
    assert len({(t, k) for t, k, _ in strategy.used}) == len(strategy.used)


@given(programs, preemption_lists)
def test_a_preemption_that_never_fired_changes_nothing(sizes, preemptions):
    strategy = PreemptionStrategy(preemptions)
    trace = simulate(strategy, [worker(n) for n in sizes]).trace
    unused = [p for p in preemptions if p not in strategy.used]
    for p in unused:
        rest = list(preemptions)
        rest.remove(p)
        assert simulate(PreemptionStrategy(rest), [worker(n) for n in sizes]).trace == trace


def test_interleavings_without_hypothesis_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # import hypothesis -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'torch-raceguard\[hypothesis\]'"):
        interleavings()


def test_preemption_triples_are_validated():
    with pytest.raises(ValueError, match="triple of non-negative integers"):
        PreemptionStrategy([(0, -1, 0)])
    with pytest.raises(ValueError, match="triple of non-negative integers"):
        PreemptionStrategy([(0, 1)])
    with pytest.raises(ValueError, match=r"\(callable, step, pick\)"):
        Schedule([(0, 1)])
    with pytest.raises(ValueError, match=r"\(callable, step, pick\)"):
        Schedule([(0, 1, True)])
    with pytest.raises(ValueError, match="races must be one of raise, ignore"):
        Schedule([], races="warn")
    with pytest.raises(ValueError, match="max_step must be a non-negative integer"):
        interleavings(max_step=-1)


# -- real threads ---------------------------------------------------------------------------------


def baseline_threads() -> int:
    return threading.active_count()


def check_then_act():
    lock = threading.Lock()
    cache: dict = {}
    created = []

    def get():
        with lock:
            present = "k" in cache
        if not present:
            created.append(1)
            with lock:
                cache["k"] = 1

    threads = [threading.Thread(target=get) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(created) == 1, created


def test_the_same_seed_gives_the_same_schedule():
    outcomes = {}
    for seed in range(12):
        runs = [run_schedule(check_then_act, RandomStrategy(seed)) for _ in range(2)]
        a, b = (r.failed for r in runs)
        assert a == b and runs[0].stats["switches"] == runs[1].stats["switches"]
        outcomes[seed] = a
    assert any(outcomes.values()) and not all(outcomes.values())  # some seeds find the bug, some do not


def test_explore_stops_at_the_first_failing_seed_and_that_seed_replays():
    found = explore(check_then_act, schedules=30, base_seed=100, strategy="pct")
    assert found.failure is not None and isinstance(found.failure.error, AssertionError)
    assert found.pct_steps and found.seed == 100 + found.index and found.ran == found.index + 2  # + calibration
    again = explore(check_then_act, schedules=1, base_seed=found.seed, strategy="pct")
    assert again.failure is not None and again.index == 0 and again.pct_steps == found.pct_steps


def crossing_locks(pause: float = 0.0):
    """Two functions taking two locks in opposite orders (a deadlock under some schedules)."""
    a, b = threading.Lock(), threading.Lock()

    def one():
        with a:
            time.sleep(pause)
            with b:
                pass

    def two():
        with b:
            time.sleep(pause)
            with a:
                pass

    return one, two


def deadlocking():
    one, two = crossing_locks(0.01)
    threads = [threading.Thread(target=one, name="one"), threading.Thread(target=two, name="two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_a_deadlock_ends_the_run_and_every_thread_unwinds():
    before = baseline_threads()
    runs = [run_schedule(deadlocking, RandomStrategy(seed)) for seed in range(6)]
    dead = [r for r in runs if r.deadlock is not None]
    assert dead, [r.describe_failure() for r in runs]
    for r in dead:
        assert r.failed and r.left_behind == 0 and r.error is None
        assert any(d.startswith("one waits on b") for d in r.deadlock), r.deadlock
        assert [f.kind for f in r.findings if f.kind == "deadlock"] == ["deadlock"]
    assert baseline_threads() == before
    # The process goes on: a clean run afterwards passes.
    assert not run_schedule(lambda: None, RandomStrategy(0)).failed


def test_the_time_limit_aborts_a_run_that_never_ends():
    stop = []

    def spinner():
        while not stop:
            time.sleep(0.01)  # a yield in virtual time: the run never ends on its own

    def body():
        t = threading.Thread(target=spinner)
        t.start()
        t.join()

    started = time.monotonic()
    r = run_schedule(body, RandomStrategy(0), timeout=0.5)
    assert r.timed_out and r.failed and r.left_behind == 0
    assert time.monotonic() - started < 10


def test_daemon_threads_and_idle_executor_workers_do_not_fail_the_run():
    before = baseline_threads()

    def body():
        ev = threading.Event()
        threading.Thread(target=ev.wait, daemon=True).start()  # waits forever
        pool = ThreadPoolExecutor(2)  # never shut down: its workers wait for work forever
        assert pool.submit(lambda: 41 + 1).result() == 42

    r = run_schedule(body, RandomStrategy(1))
    assert not r.failed, r.describe_failure()
    assert r.left_behind == 0 and baseline_threads() == before


def test_schedules_cannot_nest_and_the_process_is_restored():
    saved_sleep, saved_hook = time.sleep, hooks.yield_hook

    def body():
        with pytest.raises(NestedScheduleError):
            run_schedule(lambda: None, RandomStrategy(0))

    r = run_schedule(body, RandomStrategy(0))
    assert not r.failed, r.describe_failure()
    assert time.sleep is saved_sleep and hooks.yield_hook is saved_hook


def test_generators_are_seeded_per_schedule_and_restored():
    random.seed(5)
    torch.manual_seed(5)
    expected_py, expected_torch = random.random(), torch.rand(1)
    random.seed(5)
    torch.manual_seed(5)
    drawn = []
    for _ in range(2):
        run_schedule(lambda: drawn.append((random.random(), float(torch.rand(1)))), RandomStrategy(0), seed=9)
    assert drawn[0] == drawn[1]  # the same seed draws the same numbers
    assert random.random() == expected_py and torch.equal(torch.rand(1), expected_torch)


# -- raceguard.hypothesis.Schedule ----------------------------------------------------------------


def test_run_returns_results_in_argument_order_and_reraises_a_callables_exception():
    assert replay().run(lambda: 1, lambda: 2, lambda: 3) == [1, 2, 3]

    def boom():
        raise KeyError("x")

    with pytest.raises(KeyError) as info:
        replay().run(lambda: None, boom)
    assert any("raised by callable 2 (test_run_returns_results" in n for n in getattr(info.value, "__notes__", [])) or not hasattr(info.value, "add_note")
    with pytest.raises(TypeError, match="needs at least one callable"):
        replay().run()
    with pytest.raises(TypeError, match="takes callables"):
        replay().run(3)


def test_data_races_raise_by_default_and_can_be_ignored():
    def racy():
        t = torch.zeros(3)

        def add():
            t.add_(1)

        def mul():
            t.mul_(2)

        return add, mul

    with pytest.raises(raceguard.RaceError, match="data race on tensor float32"):
        replay().run(*racy())
    schedule = replay(races="ignore")
    assert schedule.run(*racy()) == [None, None]
    assert [f.kind for f in schedule.last_run.findings] == ["data-race"]


def test_a_deadlock_raises_deadlock_error_and_a_time_limit_schedule_timeout():
    schedule = replay([(0, 1, 0)], races="ignore")  # first: the locks below are then instrumented ones
    one, two = crossing_locks()
    with pytest.raises(DeadlockError, match=r"deadlock under replay\(\[\(0, 1, 0\)\]"):
        schedule.run(one, two)

    stop = []

    def spin():
        while not stop:
            raceguard.yield_point()

    with pytest.raises(ScheduleTimeout, match="did not finish within 0.3 s"):
        replay(timeout=0.3).run(spin)


def test_a_scheduler_failure_in_a_hand_over_raises_raceguards_error_not_the_tests(monkeypatch):
    """Scheduler.wake raises halfway through a hand-over: the schedule is abandoned (every thread
    unwinds, none is left behind), the session counts it, and Schedule.run raises raceguard's
    SchedulerError, never something that could pass for the callables' failure."""
    from raceguard.schedule import inprocess
    from raceguard.schedule.scheduler import Scheduler, SchedulerError

    class WakeFails(dict):
        def pop(self, key, *default):  # Scheduler.wake takes the waiters with pop(key, None)
            if default == (None,):
                raise RuntimeError("scheduler bug")
            return super().pop(key, *default)

    class BrokenScheduler(Scheduler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.waiters = WakeFails()

    schedule = replay(races="ignore")  # first: the queue below is then an instrumented one
    items = queue.Queue(maxsize=1)

    def produce():
        for i in range(5):
            items.put(i)

    def consume():
        for _ in range(5):
            items.get()

    monkeypatch.setattr(inprocess, "Scheduler", BrokenScheduler)
    sleep = time.sleep
    with pytest.raises(SchedulerError, match=r"\(Scheduler\.wake\): RuntimeError\('scheduler bug'\)") as info:
        schedule.run(produce, consume)
    assert not isinstance(info.value, AssertionError)
    assert isinstance(info.value.__cause__, RuntimeError) and "under raceguard replay([]" in str(info.value.__notes__)
    run = info.value.run
    assert run.left_behind == 0 and run.error is None and run.deadlock is None and not run.timed_out
    assert run.report.incomplete["internal_errors"] == 1 and run.report.findings == []
    assert time.sleep is sleep and hooks.yield_hook is None

    items = queue.Queue(maxsize=1)  # a fresh one for produce() and consume()

    def body():  # the pytest marker's way: explore() says which schedule broke
        threads = [threading.Thread(target=f) for f in (produce, consume)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    with pytest.raises(SchedulerError) as info:
        explore(body, schedules=2, base_seed=1)
    assert info.value.__notes__ == ["raceguard: in schedule 1 of 2 (strategy random, seed 1)"]


def test_repr_is_the_replay_call():
    assert repr(replay([(1, 2, 0)])) == "replay([(1, 2, 0)])"
    assert repr(replay([], races="ignore", timeout=5)) == "replay([], races='ignore', timeout=5)"
    assert replay([(1, 2, 0)]) == Schedule([[1, 2, 0]])


TORN = []


class Weights:
    def __init__(self):
        self.lock = threading.Lock()
        self.w = torch.zeros(2)
        self.b = torch.zeros(2)
        self.seen = []

    def reload(self):
        with self.lock:
            self.w.fill_(1)
        with self.lock:
            self.b.fill_(1)

    def read(self):
        with self.lock:
            self.seen.append((float(self.w.sum()), float(self.b.sum())))


def test_hypothesis_finds_the_torn_reload_and_shrinks_it_to_one_preemption():
    @settings(max_examples=100, deadline=None, database=None, derandomize=True)
    @given(schedule=interleavings())
    def inner_torn_reload(schedule):
        weights = Weights()
        schedule.run(weights.reload, weights.read)
        TORN.append(schedule)
        assert all(a == b for a, b in weights.seen), weights.seen

    TORN.clear()
    with pytest.raises(AssertionError, match=r"\(2.0, 0.0\)"):
        inner_torn_reload()
    final = TORN[-1]  # Hypothesis replays the shrunk example last
    assert len(final.preemptions) == 1 and final.used == final.preemptions
    assert final.preemptions[0][0] % 2 == 0  # the reload thread is the one preempted
    weights = Weights()
    replay(final.preemptions).run(weights.reload, weights.read)
    assert (2.0, 0.0) in weights.seen
