"""Faithfulness of the instrumented primitives (:mod:`raceguard.sync`).

The promise: with ``sync.install()`` and an active session, ``threading`` / ``queue`` /
``concurrent.futures`` behave exactly like the originals, and on top of that carry the
happens-before edges the detector needs.

Most tests are *differential*: one scenario function is run twice, first against the original
primitives (nothing installed), then against the instrumented ones (installed, with an active
:class:`Session` whose sink collects events in a list), and everything observable is compared:
return values, exception types and messages, orderings, repr formats (addresses masked),
timeout-bounded behaviour. Scenarios look primitives up at call time (``threading.Lock()``), so the
same code exercises both. This file is user code for :mod:`raceguard.capture.stacks`, so
``threading.Lock()`` here returns the tracked wrapper while installed.

The last part checks that the edges are really there: two threads ``add_`` on one tensor race
without synchronisation and do not race with it, for every primitive.

Every discrepancy this file found (argument checks, pickling messages, repr modules, RLock depth
under contention, Barrier actions, LifoQueue pairing, fork safety, executor-internal semaphores,
self-joins, a Lock released by another thread) has a test here that now passes.
"""

from __future__ import annotations

import concurrent.futures as cf
import concurrent.futures._base as futures_base
import concurrent.futures.thread as futures_thread
import contextlib
import copy
import io
import json
import os
import pickle
import queue
import re
import select
import sys
import sysconfig
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

from raceguard.capture import session as session_mod
from raceguard import sync
from raceguard.capture.session import Session

# -- the pristine interpreter ----------------------------------------------------------------------

_MODULE_ATTRS = [
    (threading, "Lock"), (threading, "RLock"), (threading, "Condition"), (threading, "Semaphore"),
    (threading, "BoundedSemaphore"), (threading, "Event"), (threading, "Barrier"),
    (threading, "excepthook"), (queue, "Queue"), (queue, "LifoQueue"), (queue, "PriorityQueue"),
    (queue, "SimpleQueue"), (cf, "wait"), (cf, "as_completed"), (futures_base, "wait"),
    (futures_base, "as_completed"),
]
_CLASS_ATTRS = [
    (threading.Thread, "start"), (threading.Thread, "_bootstrap_inner"), (threading.Thread, "join"),
    (futures_base.Future, "set_result"), (futures_base.Future, "set_exception"),
    (futures_base.Future, "result"), (futures_base.Future, "exception"),
    (futures_thread._WorkItem, "__init__"), (futures_thread._WorkItem, "run"),
]
# ...and whatever else the sync package patches today
_MODULE_ATTRS += [(m, a) for m, a, _ in sync._MODULE_PATCHES if (m, a) not in _MODULE_ATTRS]
_CLASS_ATTRS += [(c, a) for c, a, _ in sync._METHOD_PATCHES if (c, a) not in _CLASS_ATTRS]
assert not sync._installed, "sync.install() is already active at import time"
PRISTINE = {(m.__name__, a): getattr(m, a) for m, a in _MODULE_ATTRS}
PRISTINE.update({(c.__name__, a): c.__dict__[a] for c, a in _CLASS_ATTRS})
ORIG = {a: getattr(m, a) for m, a in _MODULE_ATTRS}  # e.g. ORIG["Queue"] is the real queue.Queue


def _current_patchable() -> dict:
    cur = {(m.__name__, a): getattr(m, a) for m, a in _MODULE_ATTRS}
    cur.update({(c.__name__, a): c.__dict__[a] for c, a in _CLASS_ATTRS})
    return cur


def assert_pristine() -> None:
    # threading.excepthook: pytest installs its own; some tests swap in the interpreter's default
    changed = [
        k
        for k, v in _current_patchable().items()
        if (PRISTINE[k] is not v if k != ("threading", "excepthook") else v is sync._excepthook)
    ]
    assert not changed, f"interpreter left patched: {changed}"
    assert session_mod.ACTIVE is None, "a session was left active"


@pytest.fixture(autouse=True)
def _pristine_around_each_test():
    assert_pristine()
    interval = sys.getswitchinterval()
    yield
    sys.setswitchinterval(interval)
    assert_pristine()


# -- instrumentation with an active session ---------------------------------------------------------


@dataclass
class Capture:
    session: Session
    events: list = field(default_factory=list)

    def findings(self, kind: str | None = None) -> list[dict]:
        out = [e["finding"] for e in self.events if e["type"] == "finding"]
        return [f for f in out if kind is None or f["kind"] == kind]

    def internal_errors(self) -> list[dict]:
        return [e for e in self.events if e["type"] in ("internal-error", "hook-error")]


@contextlib.contextmanager
def instrumented():
    """``sync.install()`` + an active Session (sink: a list) entered on the main thread."""
    assert_pristine()
    events: list = []
    sync.install()
    session = Session(sink=events.append)
    session_mod.ACTIVE = session
    state = None
    try:
        state = session.enter_thread(threading.main_thread(), None)
        assert threading.Lock is sync.Lock and queue.Queue is sync.Queue
        yield Capture(session, events)
    finally:
        try:
            if state is not None:
                session.leave_thread(state, None)
        finally:
            session_mod.ACTIVE = None
            sync.uninstall()
    assert_pristine()


@pytest.fixture
def capture():
    with instrumented() as cap:
        yield cap


def differential(scenario: Callable, *args: Any, allow_findings: tuple = ()) -> tuple[Any, Any, Capture]:
    """Run ``scenario(*args)`` on the originals, then instrumented; return both observations."""
    expected = scenario(*args)
    with instrumented() as cap:
        actual = scenario(*args)
    unexpected = [f for f in cap.findings() if f["kind"] not in allow_findings]
    assert not unexpected, f"instrumented run reported {[f['message'] for f in unexpected]}"
    assert not cap.internal_errors(), cap.internal_errors()
    return expected, actual, cap


def check(scenario: Callable, *args: Any, **kwargs: Any) -> Capture:
    expected, actual, cap = differential(scenario, *args, **kwargs)
    assert actual == expected
    return cap


# -- observation helpers -----------------------------------------------------------------------------


def mask(text: str) -> str:
    text = re.sub(r"0x[0-9a-fA-F]+", "0x?", text)
    text = re.sub(r"owner=\d+", "owner=?", text)
    return re.sub(r"((?:started|stopped)(?: daemon)?) \d+", r"\1 ?", text)


def outcome(fn: Callable, *args: Any, **kwargs: Any) -> tuple:
    """("ok", value) or ("raise", exception type, message)."""
    try:
        return ("ok", fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - the point is to compare them
        return ("raise", f"{type(exc).__module__}.{type(exc).__qualname__}", mask(str(exc)))


SHORT = 0.05


def timed(fn: Callable, *args: Any, **kwargs: Any) -> tuple:
    """outcome plus "did it wait for roughly the timeout" (never compare raw durations)."""
    t0 = time.monotonic()
    res = outcome(fn, *args, **kwargs)
    dt = time.monotonic() - t0
    return res, dt >= SHORT * 0.8, dt < 2.0


def spawn(target: Callable, *args: Any, name: str | None = None, daemon: bool | None = None) -> threading.Thread:
    th = threading.Thread(target=target, args=args, name=name, daemon=daemon)
    th.start()
    return th


def join_all(threads: list[threading.Thread], timeout: float = 10.0) -> None:
    for th in threads:
        th.join(timeout)
    alive = [th.name for th in threads if th.is_alive()]
    assert not alive, f"threads still running: {alive}"


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return predicate()


# ==================================================================================================
# Lock / RLock
# ==================================================================================================

LOCK_KINDS = ["Lock", "RLock"]


def new_lock(kind: str) -> Any:
    return getattr(threading, kind)()


def scenario_lock_single_thread(kind: str) -> list:
    lk = new_lock(kind)
    obs: list = [mask(repr(lk))]
    obs.append(outcome(lk.acquire))
    obs.append(mask(repr(lk)))
    if kind == "Lock":
        obs.append(lk.locked())
    obs.append(outcome(lk.acquire, False))  # Lock: False, RLock: True (reentrant)
    obs.append(mask(repr(lk)))
    obs.append(timed(lk.acquire, timeout=SHORT))  # Lock: False after the timeout, RLock: True at once
    if kind == "RLock":
        obs.append((lk._is_owned(), lk._recursion_count()))
        obs.append([outcome(lk.release) for _ in range(3)])
    else:
        obs.append(outcome(lk.release))
    obs.append(outcome(lk.release))  # un-acquired: RuntimeError with the original message
    if kind == "Lock":
        obs.append(lk.locked())
    with lk as entered:
        obs.append(entered)
        obs.append(mask(repr(lk)))
    obs.append(lk.__enter__())
    obs.append(lk.__exit__(None, None, None))
    obs.append(mask(repr(lk)))
    obs.append(weakref.ref(lk)() is lk)
    # _at_fork_reinit: a held lock becomes free again.
    lk.acquire()
    lk._at_fork_reinit()
    obs.append(mask(repr(lk)))
    obs.append(outcome(lk.acquire, False))
    obs.append(outcome(lk.release))
    if kind == "RLock":
        obs.append(outcome(lk.release))
    return obs


@pytest.mark.parametrize("kind", LOCK_KINDS)
def test_lock_single_thread(kind):
    check(scenario_lock_single_thread, kind)


def scenario_lock_pickling(kind: str, protocols: range) -> list:
    lk = new_lock(kind)
    obs = [outcome(pickle.dumps, lk, protocol=p) for p in protocols]
    obs.append(outcome(copy.copy, lk))
    obs.append(outcome(copy.deepcopy, lk))
    obs.append(outcome(copy.deepcopy, {"nested": [lk]}))
    return obs


@pytest.mark.parametrize("kind", LOCK_KINDS)
def test_lock_pickling_errors(kind):
    check(scenario_lock_pickling, kind, range(2, pickle.HIGHEST_PROTOCOL + 1))


@pytest.mark.parametrize("kind", LOCK_KINDS)
def test_lock_pickling_errors_old_protocols(kind):
    check(scenario_lock_pickling, kind, range(0, 2))


ACQUIRE_ARGS = [
    pytest.param((), {}, id="default"),
    pytest.param((True, -1), {}, id="blocking-minus-one"),
    pytest.param((True, -1.0), {}, id="float-minus-one"),
    pytest.param((1,), {}, id="int-blocking"),
    pytest.param((False,), {}, id="nonblocking"),
    pytest.param((True, 0.05), {}, id="timed"),
    pytest.param((), {"timeout": 0}, id="timeout-zero"),
    pytest.param((False, 1), {}, id="nonblocking-with-timeout"),
    pytest.param((), {"blocking": False, "timeout": 0}, id="nonblocking-timeout-zero"),
    pytest.param((True, -5), {}, id="negative-timeout"),
    pytest.param((), {"timeout": None}, id="timeout-none"),
    pytest.param((1.5,), {}, id="float-blocking"),
    pytest.param(("x",), {}, id="str-blocking"),
]


def scenario_acquire_args(kind: str, args: tuple, kwargs: dict) -> list:
    lk = new_lock(kind)
    obs = [outcome(lk.acquire, *args, **kwargs), outcome(lk.release)]
    # and the same call while another thread holds the lock
    held, done = threading.Event(), threading.Event()

    def holder():
        with lk:
            held.set()
            done.wait(5)

    th = spawn(holder)
    held.wait(5)
    t0 = time.monotonic()
    if args[:1] in ((True,), (1,), ()) and kwargs.get("timeout", args[1] if len(args) > 1 else -1) in (-1, -1.0):
        obs.append("would block forever: skipped")
    else:
        obs.append(outcome(lk.acquire, *args, **kwargs))
    obs.append(time.monotonic() - t0 < 2)
    done.set()
    join_all([th])
    return obs


@pytest.mark.parametrize("kind", LOCK_KINDS)
@pytest.mark.parametrize("args,kwargs", ACQUIRE_ARGS)
def test_lock_acquire_arguments(kind, args, kwargs):
    check(scenario_acquire_args, kind, args, kwargs)


def scenario_lock_cross_thread(kind: str) -> list:
    lk = new_lock(kind)
    held, go = threading.Event(), threading.Event()
    obs: list = []

    def holder():
        lk.acquire()
        held.set()
        go.wait(5)
        if kind == "RLock" or lk.locked():
            obs.append(("holder release", outcome(lk.release)))

    th = spawn(holder, name="holder")
    assert held.wait(5)
    obs.append(("nonblocking", outcome(lk.acquire, False)))
    obs.append(("timed", timed(lk.acquire, True, SHORT)))
    obs.append(("repr", mask(repr(lk))))
    if kind == "RLock":
        obs.append(("non-owner release", outcome(lk.release)))
        obs.append(("owned here", lk._is_owned()))
    go.set()
    obs.append(("after release", outcome(lk.acquire, timeout=5)))
    obs.append(("release", outcome(lk.release)))
    join_all([th])
    if kind == "Lock":
        # A Lock may be released by a thread that does not own it.
        lk.acquire()
        other = spawn(lambda: obs.append(("foreign release", outcome(lk.release))))
        join_all([other])
        obs.append(("free again", lk.acquire(False)))
        lk.release()
    return obs


@pytest.mark.parametrize("kind", LOCK_KINDS)
def test_lock_cross_thread(kind):
    check(scenario_lock_cross_thread, kind)


def scenario_lock_contention(kind: str) -> tuple:
    lk = new_lock(kind)
    state = {"count": 0, "inside": 0, "max_inside": 0}

    def worker():
        for i in range(200):
            with lk:
                if kind == "RLock":
                    lk.acquire()  # nested level
                state["inside"] += 1
                state["max_inside"] = max(state["max_inside"], state["inside"])
                c = state["count"]
                if i % 20 == 0:
                    time.sleep(0.0005)  # hand the GIL over while holding the lock
                state["count"] = c + 1
                state["inside"] -= 1
                if kind == "RLock":
                    lk.release()

    join_all([spawn(worker) for _ in range(4)])
    return state["count"], state["max_inside"], outcome(lk.acquire, False)


@pytest.mark.parametrize("kind", LOCK_KINDS)
def test_lock_contention_is_mutual_exclusion(kind):
    assert check(scenario_lock_contention, kind) is not None


# ==================================================================================================
# Condition
# ==================================================================================================

COND_LOCKS = ["default", "Lock", "RLock"]


def new_condition(lock_kind: str) -> Any:
    if lock_kind == "default":
        return threading.Condition()
    return threading.Condition(new_lock(lock_kind))


def scenario_condition_basics(lock_kind: str) -> list:
    c = new_condition(lock_kind)
    obs: list = [mask(repr(c))]
    obs.append(outcome(c.wait, 0.01))  # not owned
    obs.append(outcome(c.notify))
    obs.append(outcome(c.notify_all))
    obs.append(c._is_owned())
    with c:
        obs.append(c._is_owned())
        obs.append(mask(repr(c)))
        obs.append(timed(c.wait, SHORT))
        obs.append(timed(c.wait_for, lambda: False, SHORT))
        obs.append(outcome(c.wait_for, lambda: 42))
        obs.append(outcome(c.notify, 3))
        obs.append(c._is_owned())
    obs.append(c._is_owned())
    obs.append(outcome(c.acquire, False))
    obs.append(outcome(c.release))
    return obs


@pytest.mark.parametrize("lock_kind", COND_LOCKS)
def test_condition_basics(lock_kind):
    check(scenario_condition_basics, lock_kind)


def scenario_condition_notify_counts(lock_kind: str) -> list:
    c = new_condition(lock_kind)
    woken: list = []
    ready = [0]

    def waiter(i):
        with c:
            ready[0] += 1
            woken.append((i, c.wait(5)))

    threads = [spawn(waiter, i, name=f"waiter-{i}") for i in range(4)]
    assert wait_until(lambda: ready[0] == 4 and len(c._waiters) == 4)
    obs: list = []
    with c:
        c.notify(2)
    wait_until(lambda: len(woken) >= 2)
    time.sleep(0.05)
    obs.append(("after notify(2)", len(woken), len(c._waiters)))
    with c:
        c.notify_all()
    join_all(threads)
    obs.append(("after notify_all", len(woken), all(ok for _, ok in woken)))
    return obs


@pytest.mark.parametrize("lock_kind", COND_LOCKS)
def test_condition_notify_wakes_exactly_n(lock_kind):
    check(scenario_condition_notify_counts, lock_kind)


def scenario_condition_producer_consumer(lock_kind: str) -> list:
    c = new_condition(lock_kind)
    items: list = []
    got: dict = {i: [] for i in range(3)}
    done = [False]

    def consumer(i):
        while True:
            with c:
                c.wait_for(lambda: items or done[0], timeout=5)
                if items:
                    got[i].append(items.pop(0))
                elif done[0]:
                    return

    def producer(base):
        for k in range(50):
            with c:
                items.append(base + k)
                c.notify()
            if k % 10 == 0:
                time.sleep(0.001)

    consumers = [spawn(consumer, i) for i in range(3)]
    producers = [spawn(producer, 1000 * p) for p in range(2)]
    join_all(producers)
    with c:
        done[0] = True
        c.notify_all()
    join_all(consumers)
    everything = sorted(x for v in got.values() for x in v)
    # each consumer sees each producer's items in order
    in_order = all(
        [x for x in v if x // 1000 == p] == sorted(x for x in v if x // 1000 == p) for v in got.values() for p in (0, 1)
    )
    return [everything == sorted([k for k in range(50)] + [1000 + k for k in range(50)]), in_order]


@pytest.mark.parametrize("lock_kind", COND_LOCKS)
def test_condition_producer_consumer(lock_kind):
    check(scenario_condition_producer_consumer, lock_kind)


def scenario_condition_wait_under_nested_rlock() -> list:
    """wait() must release every level of an RLock held twice, and restore both levels."""
    r = threading.RLock()
    c = threading.Condition(r)
    obs: list = []
    flag = [False]

    def notifier():
        assert wait_until(lambda: len(c._waiters) == 1)
        obs.append(("other thread acquires during wait", r.acquire(timeout=2)))
        obs.append(("other thread depth", r._recursion_count()))
        flag[0] = True
        c.notify()
        r.release()

    r.acquire()
    with r:
        with c:  # third level
            obs.append(("depth before wait", r._recursion_count(), c._is_owned()))
            th = spawn(notifier, name="notifier")
            obs.append(("wait_for", c.wait_for(lambda: flag[0], timeout=5)))
            obs.append(("depth after wait", r._recursion_count(), c._is_owned(), r._is_owned()))
        obs.append(("depth after with c", r._recursion_count()))
    obs.append(("release last level", outcome(r.release)))
    obs.append(("one too many", outcome(r.release)))
    join_all([th])
    # _release_save / _acquire_restore / _is_owned directly, as Condition uses them
    r.acquire()
    r.acquire()
    saved = r._release_save()
    obs.append(("after _release_save", r._is_owned(), outcome(r.release)))
    r._acquire_restore(saved)
    obs.append(("after _acquire_restore", r._is_owned(), r._recursion_count()))
    r.release()
    r.release()
    obs.append(("_release_save unowned", outcome(r._release_save)))
    return obs


def test_condition_wait_under_nested_rlock():
    check(scenario_condition_wait_under_nested_rlock)


# ==================================================================================================
# Semaphore / BoundedSemaphore
# ==================================================================================================

SEMAPHORES = ["Semaphore", "BoundedSemaphore"]


def scenario_semaphore_basics(kind: str) -> list:
    cls = getattr(threading, kind)
    obs: list = [outcome(cls, -1)]
    s = cls(2)
    obs.append(s._value)
    obs.append(outcome(s.acquire))
    obs.append(outcome(s.acquire, True, None))
    obs.append(outcome(s.acquire, False))
    obs.append(timed(s.acquire, timeout=SHORT))
    obs.append(outcome(s.acquire, False, 1))  # ValueError: timeout with non-blocking
    obs.append(outcome(s.release, 0))  # ValueError: n must be one or more
    obs.append(outcome(s.release, 2))
    obs.append(s._value)
    obs.append(outcome(s.release))  # bounded: over-release -> ValueError
    obs.append(s._value)
    with s as entered:
        obs.append((entered, s._value))
    obs.append(s._value)
    b = cls(1)
    obs.append(outcome(b.release))
    obs.append(outcome(b.release, 3))
    obs.append(b._value)
    return obs


@pytest.mark.parametrize("kind", SEMAPHORES)
def test_semaphore_basics(kind):
    check(scenario_semaphore_basics, kind)


def scenario_semaphore_contention(kind: str) -> list:
    s = getattr(threading, kind)(2)
    inside = [0, 0]  # now, max
    guard = threading.Lock()

    def worker():
        for _ in range(10):
            with s:
                with guard:
                    inside[0] += 1
                    inside[1] = max(inside[1], inside[0])
                time.sleep(0.002)
                with guard:
                    inside[0] -= 1

    join_all([spawn(worker) for _ in range(5)])
    # a blocked acquire is woken by a release in another thread
    s0 = getattr(threading, kind)(1)
    s0.acquire()
    res: list = []
    th = spawn(lambda: res.append(s0.acquire(timeout=5)))
    time.sleep(0.02)
    s0.release()
    join_all([th])
    return [inside, s._value, res]


@pytest.mark.parametrize("kind", SEMAPHORES)
def test_semaphore_contention(kind):
    check(scenario_semaphore_contention, kind)


# ==================================================================================================
# Event
# ==================================================================================================


def scenario_event() -> list:
    e = threading.Event()
    obs: list = [e.is_set(), timed(e.wait, SHORT), outcome(e.wait, 0)]
    e.set()
    obs += [e.is_set(), outcome(e.wait), outcome(e.wait, 0), outcome(e.wait, SHORT)]
    e.clear()
    obs += [e.is_set(), timed(e.wait, SHORT)]
    # several waiters, released by a set() from another thread
    results: list = []
    waiters = [spawn(lambda: results.append(e.wait(5))) for _ in range(3)]
    time.sleep(0.02)
    setter = spawn(e.set)
    join_all(waiters + [setter])
    obs.append(results)
    e._at_fork_reinit()
    obs.append(e.is_set())
    return obs


def test_event():
    check(scenario_event)


def scenario_event_isset_alias() -> list:
    e = threading.Event()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flag = e.isSet()
    return [flag, [(w.category.__name__, str(w.message)) for w in caught]]


def test_event_isset_deprecation_warning():
    check(scenario_event_isset_alias)


# ==================================================================================================
# Barrier
# ==================================================================================================


def scenario_barrier_generations() -> list:
    actions: list = []
    b = threading.Barrier(3, action=lambda: actions.append(threading.current_thread().name))
    obs: list = [b.parties, b.n_waiting, b.broken, outcome(lambda: type(threading.Barrier(1)).__mro__[-2].__name__)]
    for generation in range(3):
        indices: list = []
        threads = [spawn(lambda: indices.append(b.wait(5))) for _ in range(2)]
        assert wait_until(lambda: b.n_waiting == 2)
        obs.append(("waiting", b.n_waiting))
        indices.append(b.wait(5))
        join_all(threads)
        obs.append((generation, sorted(indices), len(actions), b.n_waiting, b.broken))
    return obs


def test_barrier_generations():
    check(scenario_barrier_generations)


def scenario_barrier_timeout_reset_abort() -> list:
    obs: list = []
    b = threading.Barrier(2)
    obs.append(("timeout", timed(b.wait, SHORT), b.broken))
    obs.append(("broken wait", outcome(b.wait, 1)))
    b.reset()
    obs.append(("after reset", b.broken, b.n_waiting))
    results: list = []
    th = spawn(lambda: results.append(outcome(b.wait, 5)))
    obs.append(("pair", outcome(b.wait, 5)))
    join_all([th])
    obs.append(("other", results))
    # abort() breaks a waiting thread
    results.clear()
    th = spawn(lambda: results.append(outcome(b.wait, 5)))
    assert wait_until(lambda: b.n_waiting == 1)
    b.abort()
    join_all([th])
    obs.append(("abort", results, b.broken))
    b.reset()
    # reset() while a thread waits breaks it too
    results.clear()
    th = spawn(lambda: results.append(outcome(b.wait, 5)))
    assert wait_until(lambda: b.n_waiting == 1)
    b.reset()
    join_all([th])
    obs.append(("reset while waiting", results, b.broken))
    # the default timeout given to the constructor
    bt = threading.Barrier(2, timeout=SHORT)
    obs.append(("default timeout", timed(bt.wait), bt.broken))
    # an action that raises: its thread gets the exception, the others BrokenBarrierError
    ba = threading.Barrier(2, action=lambda: 1 / 0)
    results.clear()
    th = spawn(lambda: results.append(outcome(ba.wait, 5)))
    results.append(outcome(ba.wait, 5))
    join_all([th])
    obs.append(("raising action", sorted(map(str, results)), ba.broken))
    return obs


def test_barrier_timeout_reset_abort():
    check(scenario_barrier_timeout_reset_abort)


# ==================================================================================================
# Queue / LifoQueue / PriorityQueue / SimpleQueue
# ==================================================================================================

QUEUES = ["Queue", "LifoQueue", "PriorityQueue"]


def scenario_queue_basics(kind: str) -> list:
    cls = getattr(queue, kind)
    q = cls()
    obs: list = [q.qsize(), q.empty(), q.full(), q.maxsize]
    for x in [3, 1, 4, 1, 5, 9, 2, 6]:
        q.put(x)
    obs.append((q.qsize(), q.empty(), q.full(), type(q.queue).__name__))
    obs.append([q.get() for _ in range(8)])
    obs.append(outcome(q.get, block=False))
    obs.append(outcome(q.get_nowait))
    obs.append(timed(q.get, timeout=SHORT))
    obs.append(outcome(q.get, True, -1))  # ValueError: 'timeout' must be a non-negative number
    # bounded
    b = cls(maxsize=2)
    obs.append(outcome(b.put, 5))
    obs.append(outcome(b.put_nowait, 7))
    obs.append((b.qsize(), b.full(), b.empty()))
    obs.append(outcome(b.put, 8, block=False))
    obs.append(outcome(b.put_nowait, 8))
    obs.append(timed(b.put, 8, timeout=SHORT))
    obs.append(outcome(b.put, 8, True, -1))
    obs.append([b.get_nowait(), b.get(timeout=1)])
    obs.append(outcome(b.task_done))
    obs.append(outcome(b.task_done))
    obs.append(outcome(b.task_done))  # too many
    obs.append(b.unfinished_tasks)
    if kind == "PriorityQueue":
        obs.append(outcome(q.put, object()))
        obs.append(outcome(q.put, object()))  # two objects cannot be compared
        obs.append(q.qsize())
    return obs


@pytest.mark.parametrize("kind", QUEUES)
def test_queue_basics(kind):
    check(scenario_queue_basics, kind)


def scenario_queue_blocking_and_join(kind: str) -> list:
    q = getattr(queue, kind)(maxsize=1)
    obs: list = []
    log: list = []

    def producer():
        for i in range(3):
            q.put(i)  # blocks while the queue is full
            log.append(("put", i))

    th = spawn(producer, name="producer")
    time.sleep(0.05)
    obs.append(("blocked producer", list(log), q.full()))
    got = [q.get(timeout=5) for _ in range(3)]
    join_all([th])
    obs.append(("got", got))
    # task_done / join with a worker
    done: list = []
    w = getattr(queue, kind)()

    def worker():
        while True:
            item = w.get()
            if item is None or item == (99, None):
                w.task_done()
                return
            time.sleep(0.001)
            done.append(item)
            w.task_done()

    workers = [spawn(worker) for _ in range(2)]
    for i in range(20):
        w.put((i, "job") if kind == "PriorityQueue" else i)
    w.join()
    obs.append(("joined after", len(done), w.unfinished_tasks))
    for _ in workers:
        w.put((99, None) if kind == "PriorityQueue" else None)
    w.join()
    join_all(workers)
    return obs


@pytest.mark.parametrize("kind", QUEUES)
def test_queue_blocking_and_join(kind):
    check(scenario_queue_blocking_and_join, kind)


def scenario_queue_contention(kind: str) -> list:
    q = getattr(queue, kind)(maxsize=4)
    received: dict = {c: [] for c in range(2)}
    stop = (10**9, -1)

    def producer(p):
        for i in range(100):
            q.put((p, i))

    def consumer(c):
        while True:
            item = q.get(timeout=5)
            q.task_done()
            if item == stop:
                return
            received[c].append(item)

    consumers = [spawn(consumer, c) for c in range(2)]
    producers = [spawn(producer, p) for p in range(3)]
    join_all(producers)
    q.join()  # every item consumed before the stop markers go in
    for _ in consumers:
        q.put(stop)
    join_all(consumers)
    everything = sorted(x for v in received.values() for x in v)
    obs = [everything == sorted((p, i) for p in range(3) for i in range(100)), q.empty()]
    if kind == "Queue":  # FIFO: each consumer sees each producer's items in order
        obs.append(all([i for (pp, i) in v if pp == p] == sorted(i for (pp, i) in v if pp == p) for v in received.values() for p in range(3)))
    return obs


@pytest.mark.parametrize("kind", QUEUES + ["SimpleQueue"])
def test_queue_contention(kind):
    if kind == "SimpleQueue":
        check(scenario_simple_queue_contention)
    else:
        check(scenario_queue_contention, kind)


def scenario_simple_queue() -> list:
    q = queue.SimpleQueue()
    obs: list = [q.qsize(), q.empty()]
    for x in [3, 1, 2]:
        q.put(x)
    q.put_nowait(7)
    q.put(8, block=False, timeout=3)
    obs.append((q.qsize(), q.empty()))
    obs.append([q.get(), q.get_nowait(), q.get(block=False), q.get(timeout=1), q.get(True, None)])
    obs.append(outcome(q.get, block=False))
    obs.append(outcome(q.get_nowait))
    obs.append(timed(q.get, timeout=SHORT))
    obs.append(outcome(q.get, True, -1))
    res: list = []
    th = spawn(lambda: res.append(q.get(timeout=5)))
    time.sleep(0.02)
    q.put("late")
    join_all([th])
    obs.append(res)
    return obs


def test_simple_queue():
    check(scenario_simple_queue)


def scenario_simple_queue_contention() -> list:
    q = queue.SimpleQueue()
    received: dict = {c: [] for c in range(2)}

    def producer(p):
        for i in range(100):
            q.put((p, i))

    def consumer(c):
        while True:
            item = q.get(timeout=5)
            if item is None:
                return
            received[c].append(item)

    consumers = [spawn(consumer, c) for c in range(2)]
    join_all([spawn(producer, p) for p in range(3)])
    for _ in consumers:
        q.put(None)
    join_all(consumers)
    everything = sorted(x for v in received.values() for x in v)
    in_order = all(
        [i for (pp, i) in v if pp == p] == sorted(i for (pp, i) in v if pp == p) for v in received.values() for p in range(3)
    )
    return [everything == sorted((p, i) for p in range(3) for i in range(100)), in_order, q.empty()]


# ==================================================================================================
# repr, pickling, isinstance
# ==================================================================================================

FACTORIES: dict[str, Callable[[], Any]] = {
    "Lock": lambda: threading.Lock(),
    "RLock": lambda: threading.RLock(),
    "Condition": lambda: threading.Condition(),
    "Condition(Lock)": lambda: threading.Condition(threading.Lock()),
    "Semaphore": lambda: threading.Semaphore(2),
    "BoundedSemaphore": lambda: threading.BoundedSemaphore(2),
    "Event": lambda: threading.Event(),
    "Barrier": lambda: threading.Barrier(2),
    "Queue": lambda: queue.Queue(),
    "LifoQueue": lambda: queue.LifoQueue(),
    "PriorityQueue": lambda: queue.PriorityQueue(),
    "SimpleQueue": lambda: queue.SimpleQueue(),
}


def scenario_repr(name: str) -> list:
    obj = FACTORIES[name]()
    obs = [mask(repr(obj))]
    if name not in ("Lock", "RLock"):  # the lock wrappers are TrackedLock/TrackedRLock by design
        obs += [type(obj).__name__, type(obj).__qualname__]
    if name in ("Lock", "RLock"):
        obj.acquire()
        obs.append(mask(repr(obj)))
    return obs


@pytest.mark.parametrize("name", list(FACTORIES))
def test_repr_format(name):
    check(scenario_repr, name)


def scenario_pickling(name: str) -> list:
    obj = FACTORIES[name]()
    obs = [outcome(pickle.dumps, obj), outcome(pickle.dumps, obj, protocol=2), outcome(copy.deepcopy, obj)]
    shallow = outcome(copy.copy, obj)
    obs.append(shallow if shallow[0] == "raise" else ("ok", type(shallow[1]).__name__))
    return obs


@pytest.mark.parametrize("name", list(FACTORIES))
def test_pickling_errors(name):
    check(scenario_pickling, name)


def scenario_isinstance() -> list:
    objs = {
        "BoundedSemaphore": threading.BoundedSemaphore(),
        "Semaphore": threading.Semaphore(),
        "Event": threading.Event(),
        "Barrier": threading.Barrier(1),
        "Condition": threading.Condition(),
        "Queue": queue.Queue(),
        "LifoQueue": queue.LifoQueue(),
        "PriorityQueue": queue.PriorityQueue(),
        "SimpleQueue": queue.SimpleQueue(),
    }
    current = {n: getattr(threading, n, None) or getattr(queue, n) for n in objs}
    obs = []
    for oname, obj in objs.items():
        for cname in objs:
            # against the classes as the target sees them now, and against the real originals
            obs.append((oname, cname, isinstance(obj, current[cname]), isinstance(obj, ORIG[cname])))
    obs.append(issubclass(current["LifoQueue"], current["Queue"]))
    obs.append(issubclass(current["BoundedSemaphore"], current["Semaphore"]))
    obs.append(isinstance(queue.SimpleQueue(), __import__("_queue").SimpleQueue))
    obs.append(type(queue.Queue[int]).__name__)
    return obs


def test_isinstance_relationships():
    check(scenario_isinstance)


def scenario_subclassing() -> list:
    """Target code subclasses the primitives (classes as they are at that moment)."""

    class CountingQueue(queue.Queue):
        def __init__(self):
            super().__init__(maxsize=3)
            self.puts = 0

        def put(self, item, block=True, timeout=None):
            self.puts += 1
            super().put(item, block, timeout)

    class OnceEvent(threading.Event):
        def set(self):
            if not self.is_set():
                super().set()

    class Job(threading.Thread):
        def __init__(self, n):
            super().__init__(name=f"job-{n}")
            self.n = n
            self.result = None

        def run(self):
            self.result = self.n * 2

    q = CountingQueue()
    q.put(1)
    q.put_nowait(2)
    e = OnceEvent()
    e.set()
    e.set()
    jobs = [Job(n) for n in range(3)]
    for j in jobs:
        j.start()
    join_all(jobs)
    return [q.puts, [q.get(), q.get()], e.is_set(), [j.result for j in jobs], mask(repr(jobs[0]))]


def test_subclassing():
    check(scenario_subclassing)


# ==================================================================================================
# concurrent.futures
# ==================================================================================================


def _boom():
    raise ValueError("boom")


def scenario_futures() -> list:
    obs: list = []
    gate = threading.Event()
    with cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="pool") as ex:
        f = ex.submit(pow, 2, 5)
        obs.append(("result", f.result(timeout=5), f.done(), f.exception()))
        fe = ex.submit(_boom)
        obs.append(("exception", repr(fe.exception(timeout=5)), outcome(fe.result)))
        blocked = ex.submit(gate.wait, 5)
        obs.append(("result timeout", timed(blocked.result, timeout=SHORT)))
        obs.append(("exception timeout", timed(blocked.exception, timeout=SHORT)))
        quick = ex.submit(pow, 3, 2)
        done, not_done = cf.wait([quick, blocked], timeout=5, return_when=cf.FIRST_COMPLETED)
        obs.append(("wait first", [d.result() for d in done], len(not_done)))
        done, not_done = cf.wait([quick, blocked], timeout=SHORT)
        obs.append(("wait timeout", len(done), len(not_done)))
        obs.append(("as_completed timeout", outcome(lambda: [x.result() for x in cf.as_completed([quick, blocked], timeout=SHORT)])))
        obs.append(("map timeout", outcome(lambda: list(ex.map(gate.wait, [5], timeout=SHORT)))))
        gate.set()
        obs.append(("blocked done", blocked.result(timeout=5)))
        fs = [ex.submit(pow, 2, k) for k in range(6)]
        obs.append(("as_completed", sorted(x.result() for x in cf.as_completed(fs, timeout=5))))
        obs.append(("wait all", len(cf.wait(fs, timeout=5).done)))
        obs.append(("map", list(ex.map(pow, [2, 3, 4], [2, 2, 2], timeout=5))))
        obs.append(("map exception", outcome(lambda: list(ex.map(lambda x: 1 / x, [1, 0])))))
        obs.append(("repr", mask(repr(f))))
    obs.append(("after shutdown", outcome(ex.submit, pow, 2, 2)))
    return obs


def test_futures():
    check(scenario_futures)


def scenario_futures_cancel_and_callbacks() -> list:
    obs: list = []
    gate = threading.Event()
    called: list = []
    ex = cf.ThreadPoolExecutor(max_workers=1)
    running = ex.submit(gate.wait, 5)
    pending = ex.submit(pow, 2, 2)
    pending.add_done_callback(lambda fut: called.append(("cb", fut.cancelled())))
    assert wait_until(running.running)
    obs.append(("cancel running", running.cancel()))
    obs.append(("cancel pending", pending.cancel(), pending.cancelled(), pending.done()))
    obs.append(("cancelled result", outcome(pending.result)))
    obs.append(("cancelled exception", outcome(pending.exception)))
    obs.append(("callback", list(called)))
    gate.set()
    ex.shutdown(wait=True)
    obs.append(("shutdown waited", running.done(), running.result()))
    # shutdown(cancel_futures=True)
    gate2 = threading.Event()
    ex2 = cf.ThreadPoolExecutor(max_workers=1)
    first = ex2.submit(gate2.wait, 5)
    rest = [ex2.submit(pow, 2, k) for k in range(3)]
    assert wait_until(first.running)
    threading.Timer(0.02, gate2.set).start()
    ex2.shutdown(wait=True, cancel_futures=True)
    obs.append(("cancel_futures", first.result(), [r.cancelled() for r in rest]))
    # a bare Future
    fut = cf.Future()
    obs.append(("bare", mask(repr(fut)), timed(fut.result, SHORT)))
    fut.set_result(3)
    obs.append(("set twice", outcome(fut.set_result, 4), outcome(fut.set_exception, ValueError())))
    obs.append(("bare result", fut.result(), mask(repr(fut))))
    fx = cf.Future()
    fx.set_exception(KeyError("k"))
    obs.append(("bare exception", outcome(fx.result), repr(fx.exception())))
    return obs


def test_futures_cancel_and_callbacks():
    check(scenario_futures_cancel_and_callbacks)


# ==================================================================================================
# Thread
# ==================================================================================================


def scenario_thread_lifecycle() -> list:
    obs: list = []
    gate = threading.Event()
    th = threading.Thread(target=gate.wait, args=(5,), name="lifecycle")
    obs.append(("before start", th.is_alive(), th.daemon, th.ident is None, mask(repr(th))))
    obs.append(("join before start", outcome(th.join)))
    th.start()
    obs.append(("started", th.is_alive(), th.ident is not None, th.native_id is not None, mask(repr(th))))
    obs.append(("start twice", outcome(th.start)))
    obs.append(("daemon after start", outcome(setattr, th, "daemon", True)))
    obs.append(("join timeout", timed(th.join, SHORT), th.is_alive()))
    obs.append(("in enumerate", th in threading.enumerate()))
    gate.set()
    th.join(5)
    obs.append(("joined", th.is_alive(), mask(repr(th)), outcome(th.start)))
    d = threading.Thread(target=lambda: None, daemon=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        obs.append(("daemon", d.daemon, d.isDaemon(), [str(w.message) for w in caught]))
    d.start()
    d.join(5)
    seen: list = []
    t2 = spawn(lambda: seen.append((threading.current_thread().name, threading.get_ident())), name="me")
    join_all([t2])
    obs.append(("current_thread", seen[0][0], seen[0][1] == t2.ident))
    fired: list = []
    timer = threading.Timer(0.01, fired.append, args=("fired",))
    timer.start()
    timer.join(5)
    cancelled = threading.Timer(5, fired.append, args=("cancelled",))
    cancelled.start()
    cancelled.cancel()
    cancelled.join(5)
    obs.append(("timers", fired, cancelled.is_alive()))
    return obs


def test_thread_lifecycle():
    check(scenario_thread_lifecycle)


def scenario_thread_exceptions() -> list:
    buf = io.StringIO()
    old = sys.stderr
    sys.stderr = buf
    try:

        def fail():
            raise ValueError("boom in thread")

        def exit_quietly():
            raise SystemExit(3)

        for target, name in [(fail, "failing-worker"), (exit_quietly, "exiting-worker")]:
            th = threading.Thread(target=target, name=name)
            th.start()
            th.join(5)
        # a hook installed by the target still receives the exception
        seen: list = []
        prev = threading.excepthook
        threading.excepthook = lambda args: seen.append((args.exc_type.__name__, str(args.exc_value), args.thread.name))
        try:
            th = threading.Thread(target=fail, name="hooked")
            th.start()
            th.join(5)
        finally:
            threading.excepthook = prev
    finally:
        sys.stderr = old
    return [buf.getvalue(), seen]


def test_thread_exceptions_print_the_same_text(monkeypatch):
    # pytest replaces threading.excepthook to collect thread exceptions; use Python's own, which
    # is what install() wraps in a real run.
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    expected, actual, cap = differential(scenario_thread_exceptions, allow_findings=("thread-exception",))
    assert "Exception in thread failing-worker" in expected[0]
    assert actual == expected
    # and the session saw the uncaught one (only that one: SystemExit and the target's hook don't count)
    found = cap.findings("thread-exception")
    assert [f["resource"] for f in found] == ["thread 'failing-worker'"], found


def scenario_thread_not_initialised() -> list:
    class Lazy(threading.Thread):
        def __init__(self):  # forgets super().__init__()
            pass

    return [outcome(Lazy().start), outcome(Lazy().join), outcome(lambda: Lazy().is_alive())]


def test_thread_subclass_without_init():
    check(scenario_thread_not_initialised)


def scenario_self_join() -> list:
    out: list = []

    def body():
        out.append(outcome(threading.current_thread().join))
        out.append(outcome(threading.current_thread().join, 0.01))

    th = spawn(body, name="self-joiner")
    join_all([th])
    out.append(outcome(threading.main_thread().join, 0.01))
    return out


def test_self_join_raises_and_is_no_deadlock():
    check(scenario_self_join)


def scenario_lock_as_binary_semaphore() -> list:
    """A Lock acquired by one thread and released by another: a classic signalling idiom."""
    lk = threading.Lock()
    lk.acquire()
    th = spawn(lambda: (time.sleep(0.05), lk.release()), name="releaser")
    ok = lk.acquire()  # blocks until the other thread releases
    join_all([th])
    lk.release()
    return [ok, lk.locked()]


def test_lock_released_by_another_thread_is_no_deadlock():
    check(scenario_lock_as_binary_semaphore)


# ==================================================================================================
# os.fork()
# ==================================================================================================


def _fork_and_collect(child: Callable[[], Any], timeout: float = 5.0) -> Any:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            os.close(r)
            data = json.dumps(child(), default=str)
        except BaseException as exc:  # noqa: BLE001
            data = json.dumps(["child raised", repr(exc)])
            code = 1
        try:
            os.write(w, data.encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, 9)
                return "child hung"
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return json.loads(b"".join(chunks) or b"null")


def scenario_fork() -> list:
    lk, rl = threading.Lock(), threading.RLock()
    free_lock = threading.Lock()
    ev, q = threading.Event(), queue.Queue()
    held, release = threading.Event(), threading.Event()

    def holder():
        with lk, rl:
            held.set()
            release.wait(10)

    th = spawn(holder, name="holder")
    assert held.wait(5)

    def child() -> list:
        out: list = [lk.locked(), rl._is_owned(), rl.acquire(False)]
        lk._at_fork_reinit()
        rl._at_fork_reinit()
        out += [lk.locked(), lk.acquire(timeout=1), rl.acquire(timeout=1), rl.acquire(False), rl._recursion_count()]
        lk.release()
        rl.release()
        rl.release()
        with free_lock:
            out.append(free_lock.locked())
        ev.set()
        out.append(ev.wait(1))
        q.put("x")
        out.append(q.get(timeout=1))
        c = threading.Condition()
        with c:
            out.append(c.wait(0.01))
        sub = threading.Thread(target=lambda: out.append("thread in child"))
        sub.start()
        sub.join(2)
        return [mask(repr(lk)), *out]

    result = _fork_and_collect(child)
    release.set()
    join_all([th])
    return [result, lk.locked(), lk.acquire(False)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_child_can_use_instrumented_locks():
    check(scenario_fork)


def scenario_fork_while_busy() -> list:
    """Fork while another thread keeps using instrumented locks: the child must not hang."""
    lk = threading.Lock()
    busy_lock = threading.Lock()
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            with busy_lock:
                pass

    th = spawn(busy, name="busy")
    results = []
    for _ in range(6):
        results.append(_fork_and_collect(lambda: [lk.acquire(timeout=1), lk.release(), "ok"][2], timeout=2))
        if results[-1] != "ok":
            break
    stop.set()
    join_all([th])
    return results[-1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_while_another_thread_uses_locks():
    check(scenario_fork_while_busy)


# ==================================================================================================
# library code gets the original primitives
# ==================================================================================================

_LIBRARY_SOURCE = """
import threading
made = {
    "Lock": threading.Lock(),
    "RLock": threading.RLock(),
    "Condition": threading.Condition(),
}
"""


def _made_in_library(filename: str) -> dict:
    ns: dict = {}
    exec(compile(_LIBRARY_SOURCE, filename, "exec"), ns)
    return ns["made"]


@pytest.mark.parametrize(
    "filename",
    [
        os.path.join(sysconfig.get_paths()["stdlib"], "_raceguard_pretend_stdlib.py"),
        os.path.join(sysconfig.get_paths()["purelib"], "pretend_pkg", "mod.py"),
        "/opt/somewhere/site-packages/pretend_pkg/mod.py",
    ],
    ids=["stdlib", "purelib", "any-site-packages"],
)
def test_library_code_gets_original_locks(capture, filename):
    made = _made_in_library(filename)
    assert type(made["Lock"]) is type(sync._orig["allocate_lock"]())
    assert type(made["Lock"]).__module__ == "_thread" and type(made["Lock"]).__name__ == "lock"
    assert type(made["RLock"]).__name__ == "RLock" and type(made["RLock"]).__module__ == "_thread"
    assert type(made["Condition"]._lock).__module__ == "_thread"
    # real library objects
    assert type(queue.Queue().mutex).__module__ == "_thread"
    import logging

    assert type(logging.Handler().lock).__module__ == "_thread"
    assert type(cf.Future()._condition._lock).__module__ == "_thread"
    # ...while this file (user code) gets the tracked ones
    assert isinstance(threading.Lock(), sync.TrackedLock)
    assert isinstance(threading.RLock(), sync.TrackedRLock)
    assert isinstance(threading.Condition()._lock, sync.TrackedRLock)


def test_uninstalled_lock_is_the_builtin():
    assert threading.Lock is PRISTINE[("threading", "Lock")]
    assert type(threading.Lock()).__module__ == "_thread"
    with instrumented():
        pass
    assert type(threading.Lock()).__module__ == "_thread"
    assert threading.excepthook is PRISTINE[("threading", "excepthook")]


# ==================================================================================================
# The edges are real: a race without synchronisation, none with it
# ==================================================================================================


def _two_threads(first: Callable, second: Callable) -> None:
    join_all([spawn(first, name="first"), spawn(second, name="second")])


def edge_none(t):
    _two_threads(lambda: t.add_(1), lambda: t.add_(1))


def edge_sleep_only(t):
    _two_threads(lambda: t.add_(1), lambda: (time.sleep(0.05), t.add_(1)))


def edge_different_locks(t):
    a, b = threading.Lock(), threading.Lock()

    def one(lk):
        with lk:
            t.add_(1)

    _two_threads(lambda: one(a), lambda: one(b))


def edge_lock(t, kind="Lock"):
    lk = new_lock(kind)

    def body():
        for _ in range(20):
            with lk:
                if kind == "RLock":
                    with lk:
                        t.add_(1)
                else:
                    t.add_(1)

    _two_threads(body, body)


def edge_lock_timed_and_nonblocking(t):
    lk = threading.Lock()

    def timed_body():
        for _ in range(20):
            if lk.acquire(timeout=5):
                t.add_(1)
                lk.release()

    def polling_body():
        n = 0
        while n < 20:
            if lk.acquire(False):
                t.add_(1)
                lk.release()
                n += 1
            else:
                time.sleep(0)

    _two_threads(timed_body, polling_body)


def edge_condition(t, lock_kind="default"):
    c = new_condition(lock_kind)
    flag = [False]

    def producer():
        t.add_(1)
        with c:
            flag[0] = True
            c.notify()

    def consumer():
        with c:
            c.wait_for(lambda: flag[0], timeout=5)
        t.add_(1)

    _two_threads(consumer, producer)


def edge_semaphore(t, kind="Semaphore"):
    s = getattr(threading, kind)(1)
    s.acquire()

    def first():
        t.add_(1)
        s.release()

    def second():
        s.acquire(timeout=5)
        t.add_(1)

    _two_threads(second, first)


def edge_event(t, how="wait"):
    e = threading.Event()

    def first():
        t.add_(1)
        e.set()

    def second():
        if how == "wait":
            e.wait(5)
        else:
            assert wait_until(e.is_set)
        t.add_(1)

    _two_threads(second, first)


def edge_barrier(t):
    b = threading.Barrier(2)

    def first():
        t.add_(1)
        b.wait(5)

    def second():
        b.wait(5)
        t.add_(1)

    _two_threads(second, first)


def edge_queue(t, kind="Queue"):
    q = getattr(queue, kind)()

    def first():
        t.add_(1)
        q.put(1)

    def second():
        q.get(timeout=5)
        t.add_(1)

    _two_threads(second, first)


def edge_queue_join(t):
    q = queue.Queue()

    def worker():
        q.get(timeout=5)
        t.add_(1)
        q.task_done()

    th = spawn(worker)
    q.put("job")
    q.join()
    t.add_(1)
    join_all([th])


def edge_thread_join(t):
    th = spawn(lambda: t.add_(1))
    th.join()
    t.add_(1)


def edge_thread_start(t):
    t.add_(1)
    join_all([spawn(lambda: t.add_(1))])


def edge_future(t, how):
    ex = cf.ThreadPoolExecutor(max_workers=2)
    try:
        f = ex.submit(t.add_, 1)
        if how == "result":
            f.result()
        elif how == "exception":
            f.exception()
        elif how == "wait":
            cf.wait([f])
        elif how == "as_completed":
            list(cf.as_completed([f]))
        elif how == "shutdown":
            ex.shutdown(wait=True)
        t.add_(1)
    finally:
        ex.shutdown(wait=True)


def edge_future_map(t):
    with cf.ThreadPoolExecutor(max_workers=2) as ex:
        list(ex.map(lambda k: t[k].add_(1), range(2)))
        t.add_(1)


def edge_future_submit(t):
    t.add_(1)
    with cf.ThreadPoolExecutor(max_workers=1) as ex:
        ex.submit(t.add_, 1)


EDGES = {
    # expected to race
    "no-sync": (edge_none, True),
    "sleep-only": (edge_sleep_only, True),
    "different-locks": (edge_different_locks, True),
    # expected to be ordered
    "Lock": (edge_lock, False),
    "RLock": (lambda t: edge_lock(t, "RLock"), False),
    "Lock-timed-and-nonblocking": (edge_lock_timed_and_nonblocking, False),
    "Condition": (edge_condition, False),
    "Condition(Lock)": (lambda t: edge_condition(t, "Lock"), False),
    "Condition(RLock)": (lambda t: edge_condition(t, "RLock"), False),
    "Semaphore": (edge_semaphore, False),
    "BoundedSemaphore": (lambda t: edge_semaphore(t, "BoundedSemaphore"), False),
    "Event.wait": (edge_event, False),
    "Event.is_set": (lambda t: edge_event(t, "is_set"), False),
    "Barrier": (edge_barrier, False),
    "Queue": (edge_queue, False),
    "LifoQueue": (lambda t: edge_queue(t, "LifoQueue"), False),
    "PriorityQueue": (lambda t: edge_queue(t, "PriorityQueue"), False),
    "SimpleQueue": (lambda t: edge_queue(t, "SimpleQueue"), False),
    "Queue.join": (edge_queue_join, False),
    "Thread.join": (edge_thread_join, False),
    "Thread.start": (edge_thread_start, False),
    "Future.result": (lambda t: edge_future(t, "result"), False),
    "Future.exception": (lambda t: edge_future(t, "exception"), False),
    "futures.wait": (lambda t: edge_future(t, "wait"), False),
    "as_completed": (lambda t: edge_future(t, "as_completed"), False),
    "shutdown": (lambda t: edge_future(t, "shutdown"), False),
    "Executor.map": (edge_future_map, False),
    "submit": (edge_future_submit, False),
}


@pytest.mark.parametrize("name", list(EDGES))
def test_happens_before_edges(capture, name):
    scenario, races = EDGES[name]
    t = torch.zeros(8)
    scenario(t)
    found = capture.findings("data-race")
    assert capture.session.ops > 0
    if races:
        assert found, f"{name}: unsynchronised add_ from two threads was not reported"
        assert all(f["resource_kind"] == "tensor" for f in found)
    else:
        assert not found, f"{name}: spurious race: {[f['message'] for f in found]}"
    assert not capture.findings("deadlock")
    assert not capture.internal_errors()


def test_race_finding_names_both_threads(capture):
    t = torch.zeros(8)
    edge_none(t)
    (finding,) = capture.findings("data-race")
    assert {a["thread"] for a in finding["accesses"]} == {"first", "second"}
    assert all(a["mode"] == "write" for a in finding["accesses"])


# -- edge bugs -------------------------------------------------------------------------------------


def _stall_after(c_method: str, until: Callable[[], bool]) -> Callable:
    """A profile hook for one thread: right after a C call ``<RLock>.<c_method>()`` returns, stall
    (polling, no synchronisation) until ``until()``. This opens, deterministically, the window
    between "the real RLock is free" and "the wrapper updated its bookkeeping"."""

    def hook(frame, event, arg):
        if (
            event == "c_return"
            and getattr(arg, "__name__", None) == c_method
            and type(getattr(arg, "__self__", None)).__name__ == "RLock"
        ):
            sys.setprofile(None)
            hook.stalled = True
            wait_until(until, 2.0)

    hook.stalled = False
    return hook


@pytest.mark.parametrize("via", ["release", "_release_save"], ids=["release", "Condition.wait"])
def test_rlock_taken_right_after_release_keeps_the_edge(capture, via):
    t = torch.zeros(4)
    r = threading.RLock()
    c = threading.Condition(r)
    second_done = [False]
    hook = _stall_after(via, lambda: second_done[0])

    def first():
        r.acquire()
        t.add_(1)
        sys.setprofile(hook)
        try:
            if via == "release":
                r.release()
            else:
                c.wait(0.05)  # releases r through _release_save, takes it back after the timeout
                r.release()
        finally:
            sys.setprofile(None)

    def second():
        assert wait_until(lambda: hook.stalled)  # polling: no happens-before edge from `first`
        with r:
            t.add_(1)
        second_done[0] = True

    join_all([spawn(first, name="first"), spawn(second, name="second")])
    assert hook.stalled
    assert not capture.findings("data-race"), [f["message"] for f in capture.findings("data-race")]


def test_barrier_action_happens_before_every_departure(capture):
    t = torch.zeros(4)
    b = threading.Barrier(2, action=lambda: t.add_(1))

    def party():
        b.wait(5)
        t.sum()  # the docs: the action "will have been called prior to being released"

    join_all([spawn(party, name="p0"), spawn(party, name="p1")])
    assert not capture.findings("data-race"), [f["message"] for f in capture.findings("data-race")]


def test_lifo_queue_same_object_pairs_get_with_latest_put(capture):
    a, b = torch.zeros(4), torch.zeros(4)
    q = queue.LifoQueue()
    token = object()  # both threads hand over the same sentinel object

    def first():
        a.add_(1)
        q.put(token)

    def second():
        time.sleep(0.1)
        b.add_(1)
        q.put(token)

    threads = [spawn(first), spawn(second)]
    time.sleep(0.3)
    q.get()  # LIFO: the second thread's put
    b.add_(1)  # ordered after the second thread's write by that put/get
    q.get()
    a.add_(1)
    join_all(threads)
    assert not capture.findings("data-race"), [f["message"] for f in capture.findings("data-race")]


def test_executor_internal_semaphore_hides_no_race(capture):
    t = torch.zeros(4)
    ex = cf.ThreadPoolExecutor(max_workers=1)
    try:
        ex.submit(t.add_, 1)
        time.sleep(0.2)  # the task is done, but nothing the program does orders it before us
        ex.submit(pow, 2, 2)  # no result(): only the pool's own bookkeeping could order us
        t.add_(1)  # races with the first task's add_
    finally:
        ex.shutdown()
    assert capture.findings("data-race")
