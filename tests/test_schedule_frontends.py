"""The marker's controlled schedules and Hypothesis interleavings, through real pytest runs.

The documented example (``examples/schedules_example/test_serving.py``) is the inner suite,
with a few more scenarios (a deadlock, a data race, bad arguments). A first run must find both
bugs and print how to reproduce them; a second run takes those printed lines as they are and
must reproduce both failures, while the empty schedule (no preemption) passes.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from test_pytest_plugin import outcomes, plugin_args, section

pytest_plugins = ["pytester"]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "schedules_example" / "test_serving.py"

EXTRA = '''
import threading
import time

import pytest
import torch

from raceguard.hypothesis import interleavings, replay, DeadlockError


@pytest.mark.raceguard(schedules=10, seed=3, strategy="random")
def test_marker_deadlock():
    a, b = threading.Lock(), threading.Lock()

    def one():
        with a:
            time.sleep(0.01)
            with b:  # LINE_WAIT_ONE
                pass

    def two():
        with b:
            time.sleep(0.01)
            with a:  # LINE_WAIT_TWO
                pass

    threads = [threading.Thread(target=one, name="one"), threading.Thread(target=two, name="two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.mark.raceguard(schedules=5, seed=0)
def test_marker_data_race():
    t = torch.zeros(3)

    def add():
        t.add_(1)  # LINE_ADD

    def mul():
        t.mul_(2)  # LINE_MUL

    writers = [threading.Thread(target=add), threading.Thread(target=mul)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()


@pytest.mark.raceguard(schedules=0)
def test_marker_bad_schedules():
    pass


@pytest.mark.raceguard(schedules=3, seed=0)
def test_marker_body_skips():
    pytest.skip("the body skips itself")


def test_hypothesis_deadlock_is_an_error():
    a, b = threading.Lock(), threading.Lock()

    def one():
        with a:
            with b:
                pass

    def two():
        with b:
            with a:
                pass

    # Run one after the other (no preemption), the two never deadlock; preempted between its two
    # acquisitions, they do.
    assert replay(races="ignore").run(one, two) == [None, None]
    deadlocks = []
    for step in range(4):
        try:
            replay([(0, step, 0)], races="ignore").run(one, two)
        except DeadlockError as exc:
            deadlocks.append(str(exc))
    assert deadlocks and all(d.startswith("deadlock under replay([(0, ") for d in deadlocks), deadlocks
    assert threading.active_count() == 1  # every aborted thread has unwound
'''


def extra_line(marker: str) -> int:
    return next(i for i, text in enumerate(EXTRA.strip().splitlines(), 1) if marker in text)


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    for var in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID", "PYTEST_ADDOPTS"):
        monkeypatch.delenv(var, raising=False)
    pytester.makepyfile(test_serving=EXAMPLE.read_text(), test_extra=EXTRA)
    return pytester


def test_schedules_find_and_reproduce_both_bugs(inner: pytest.Pytester):
    # A fixed Hypothesis seed keeps this run the same on every machine (the search itself finds
    # the torn reload for most seeds: see DEFAULT_MAX_STEP in raceguard/hypothesis.py).
    result = inner.runpytest_subprocess(*plugin_args(), "-rA", "-p", "no:cacheprovider", "--hypothesis-seed=0", timeout=300)
    got = outcomes(result)
    expected = {
        "test_cache_loads_once_buggy": "FAILED",
        "test_cache_loads_once_fixed": "PASSED",
        "test_reload_is_atomic_buggy": "FAILED",
        "test_reload_is_atomic_fixed": "PASSED",
        "test_marker_deadlock": "FAILED",
        "test_marker_data_race": "FAILED",
        "test_marker_bad_schedules": "FAILED",
        "test_hypothesis_deadlock_is_an_error": "PASSED",
    }
    out = result.stdout.str()
    assert {k: got.get(k) for k in expected} == expected, out

    # The marker: the failing schedule, why, and the marker that replays it.
    cache = section(out, "test_cache_loads_once_buggy")
    assert "assert (2 == 1)" in cache
    m = re.search(r"raceguard: schedule (\d+) of 20 failed \(strategy pct, seed (\d+), \d+ switches\): AssertionError", cache)
    assert m, cache
    seed = int(m.group(2))
    assert int(m.group(1)) == seed + 1  # seeds 0, 1, ... in order, stopping at the first failure
    reproduce = f'@pytest.mark.raceguard(schedules=1, seed={seed}, strategy="pct")'
    assert f"reproduce it with {reproduce}" in cache

    deadlock = section(out, "test_marker_deadlock")
    assert re.search(r"raceguard: schedule \d+ of 10 failed \(strategy random, seed \d+, \d+ switches\): deadlock: ", deadlock), deadlock
    assert "raceguard: deadlock: threads 'one' and 'two' are blocked on each other" in deadlock
    assert f"wait by thread 'one' for b (test_extra.py:{extra_line('a, b =')})" in deadlock
    assert f"#0 one test_extra.py:{extra_line('LINE_WAIT_ONE')}" in deadlock
    assert f"#0 two test_extra.py:{extra_line('LINE_WAIT_TWO')}" in deadlock

    race = section(out, "test_marker_data_race")
    # No strategy given: [tool.raceguard.stress]'s default, PCT, whose calibration run already races.
    assert "raceguard: the PCT calibration schedule failed (strategy pct, seed 0" in race
    assert 'reproduce it with @pytest.mark.raceguard(schedules=1, seed=0, strategy="pct")' in race
    assert f"data race on tensor float32[3] allocated at test_extra.py:{extra_line('torch.zeros(3)')}" in race
    assert f"test_extra.py:{extra_line('LINE_ADD')}" in race and f"test_extra.py:{extra_line('LINE_MUL')}" in race
    assert "schedules must be a positive integer (got 0)" in section(out, "test_marker_bad_schedules")
    assert re.search(r"^SKIPPED \[1\] test_extra.py:\d+: the body skips itself$", out, re.M), out

    # Hypothesis: shrunk to exactly the one preemption the torn reload needs, printed as replay([...]).
    torn = section(out, "test_reload_is_atomic_buggy")
    m = re.search(r"schedule=(replay\((\[.*?\])\)),", torn)
    assert m, torn
    preemptions = ast.literal_eval(m.group(2))
    assert len(preemptions) == 1, preemptions
    assert "raceguard: 1 preemption(s)" in torn
    assert f"replay with raceguard.hypothesis.{m.group(1)}.run(...)" in torn
    # The bug needs one preemption between the two halves of reload(): a request sees the new
    # weight with the old bias, never the other way round.
    assert "(16.0, 0.0)" in torn and "(0.0, 4.0)" not in torn

    # -- the printed lines reproduce both failures ---------------------------------------------
    example = EXAMPLE.read_text()
    buggy = '@pytest.mark.raceguard(schedules=20, seed=0, strategy="pct")\ndef test_cache_loads_once_buggy'
    assert buggy in example
    replayed = example.replace(buggy, f"{reproduce}\ndef test_cache_loads_once_buggy")
    replayed += f'''

def test_printed_replay_reproduces_the_torn_reload():
    from raceguard.hypothesis import replay

    server = Server(fixed=False)
    {m.group(1)}.run(server.reload, server.handle, server.handle)
    assert not server.consistent()


def test_no_preemption_is_consistent():
    from raceguard.hypothesis import replay

    server = Server(fixed=False)
    schedule = replay()
    schedule.run(server.reload, server.handle, server.handle)
    assert server.consistent() and schedule.used == []
'''
    inner.makepyfile(test_serving=replayed)
    result = inner.runpytest_subprocess(*plugin_args(), "-rA", "-p", "no:cacheprovider", "test_serving.py",
                                        "-k", "cache_loads_once_buggy or printed_replay or no_preemption", timeout=300)
    got = outcomes(result)
    out = result.stdout.str()
    assert got == {
        "test_cache_loads_once_buggy": "FAILED",
        "test_printed_replay_reproduces_the_torn_reload": "PASSED",
        "test_no_preemption_is_consistent": "PASSED",
    }, out
    again = section(out, "test_cache_loads_once_buggy")
    assert f"raceguard: schedule 1 of 1 failed (strategy pct, seed {seed}," in again


def test_schedules_under_the_flag_attach_to_the_tests_session(inner: pytest.Pytester):
    # With --raceguard every test already has a session: Hypothesis runs attach to it (no nested
    # session), and the results are the same.
    result = inner.runpytest_subprocess(*plugin_args(), "-rA", "-p", "no:cacheprovider", "--hypothesis-seed=0",
                                        "--raceguard", "test_serving.py", timeout=300)
    out = result.stdout.str()
    assert outcomes(result) == {
        "test_cache_loads_once_buggy": "FAILED",
        "test_cache_loads_once_fixed": "PASSED",
        "test_reload_is_atomic_buggy": "FAILED",
        "test_reload_is_atomic_fixed": "PASSED",
    }, out
    assert re.search(r"schedule=replay\(\[\(\d+, \d+, \d+\)\]\)", section(out, "test_reload_is_atomic_buggy"))
    assert "raceguard: 4 tests watched" in out
