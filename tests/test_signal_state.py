"""The front ends that run inside the caller's process leave its signal state as they found it:
the calling thread's signal mask and the process's SIGINT/SIGTERM/SIGCHLD handlers, also when
the watched code raises. ``raceguard check`` runs the target in a process of its own; these run
in the caller's (a test runner's worker, a notebook), where a blocked or replaced SIGINT would
reach every later test and every process it starts.

The state set before each front end runs is one none of them would set by itself, so that a
front end that resets a signal to its default, as well as one that leaves its own, is caught."""

from __future__ import annotations

import signal
import threading

import pytest
import torch

import raceguard
import raceguard.hypothesis
from raceguard.process import prestart
from raceguard.schedule.inprocess import explore, run_schedule
from raceguard.schedule.strategies import RandomStrategy

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)


def _callers_handler(signum, frame):  # never called: only its identity matters
    pass


def signal_state() -> tuple[frozenset, dict]:
    return frozenset(signal.pthread_sigmask(signal.SIG_BLOCK, ())), {s: signal.getsignal(s) for s in HANDLED}


@pytest.fixture
def callers_state():
    """SIGUSR1 blocked, SIGINT handled by the caller, SIGTERM ignored; put back afterwards."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    before = {s: signal.getsignal(s) for s in HANDLED}
    signal.signal(signal.SIGINT, _callers_handler)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    state = signal_state()
    yield state
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    for signum, handler in before.items():
        signal.signal(signum, handler)
    raceguard.hypothesis._release_primitives()


def _threads_that_raise() -> None:
    shared = torch.zeros(4)
    lock = threading.Lock()

    def step():
        with lock:
            shared.add_(1)

    threads = [threading.Thread(target=step) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    raise ValueError("the caller's own error")


def test_watch_leaves_the_signal_state_as_it_found_it(callers_state) -> None:
    with pytest.raises(ValueError):
        with raceguard.watch():
            _threads_that_raise()
    assert signal_state() == callers_state

    @raceguard.watch
    def watched() -> None:
        _threads_that_raise()

    with pytest.raises(ValueError):
        watched()
    assert signal_state() == callers_state


def test_schedules_leave_the_signal_state_as_they_found_it(callers_state) -> None:
    assert run_schedule(_threads_that_raise, RandomStrategy(0)).failed
    assert signal_state() == callers_state
    assert explore(_threads_that_raise, schedules=2, base_seed=0).failure is not None
    assert signal_state() == callers_state
    with pytest.raises(ValueError):
        raceguard.hypothesis.replay().run(lambda: None, _threads_that_raise)
    assert signal_state() == callers_state


@pytest.mark.parametrize("sigint_blocked", [False, True])
def test_starting_the_targets_process_leaves_the_callers_mask(callers_state, sigint_blocked: bool) -> None:
    """The target's process starts with SIGINT blocked (see raceguard.process.prestart): only
    the new process, whatever the caller's mask was."""
    if sigint_blocked:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    expected = signal_state()
    pre = prestart.start()
    try:
        assert signal_state() == expected
    finally:
        prestart._discard(pre)
