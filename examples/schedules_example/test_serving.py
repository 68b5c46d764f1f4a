"""Controlled thread schedules in a test suite: the pytest marker and Hypothesis interleavings.

Two bugs a data-race detector cannot see, because every access is under a lock:

* ``ModelCache.get`` checks for a model under the lock, loads it outside the lock, and stores
  it under the lock again (check-then-act): two threads asking for the same model can both
  load it. ``@pytest.mark.raceguard(schedules=..., strategy="pct")`` runs the test body under
  controlled schedules and fails with the marker that replays the failing one.
* ``Server.reload`` swaps weight and bias under two separate lock regions: a request served in
  between sees the new weight with the old bias. ``interleavings()`` lets Hypothesis search the
  thread interleavings and shrink a failing one to the single preemption that matters.

Plain ``pytest`` runs the threads as the OS schedules them and usually passes all four tests::

    pytest examples/schedules_example     # the two buggy tests fail, the fixed ones pass
"""

import threading

import pytest
import torch
from hypothesis import given, settings

from raceguard.hypothesis import interleavings


class ModelCache:
    """Loads each named model once (``fixed=True``), or so it hopes (``fixed=False``)."""

    def __init__(self, fixed: bool) -> None:
        self.fixed = fixed
        self.lock = threading.Lock()
        self.models: dict[str, torch.nn.Module] = {}
        self.loads = 0

    def get(self, name: str) -> torch.nn.Module:
        if self.fixed:
            with self.lock:
                if name not in self.models:
                    self.models[name] = self._load()
                return self.models[name]
        with self.lock:
            model = self.models.get(name)
        if model is None:  # BUG: another thread may be loading it right now
            model = self._load()
            with self.lock:
                self.models[name] = model
        return model

    def _load(self) -> torch.nn.Module:
        self.loads += 1
        return torch.nn.Linear(4, 4)


def two_threads_get(cache: ModelCache) -> list:
    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get("m"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


@pytest.mark.raceguard(schedules=20, seed=0, strategy="pct")
def test_cache_loads_once_buggy():
    cache = ModelCache(fixed=False)
    got = two_threads_get(cache)
    assert cache.loads == 1 and got[0] is got[1]


@pytest.mark.raceguard(schedules=20, seed=0, strategy="pct")
def test_cache_loads_once_fixed():
    cache = ModelCache(fixed=True)
    got = two_threads_get(cache)
    assert cache.loads == 1 and got[0] is got[1]


class Server:
    """Serves a linear model; ``reload()`` installs new weights (all ones)."""

    def __init__(self, fixed: bool) -> None:
        self.fixed = fixed
        self.lock = threading.Lock()
        self.model = torch.nn.Linear(4, 4)
        with torch.no_grad():
            self.model.weight.zero_()
            self.model.bias.zero_()
        self.answers: list[tuple[float, float]] = []

    def reload(self) -> None:
        with torch.no_grad():
            if self.fixed:
                with self.lock:
                    self.model.weight.fill_(1.0)
                    self.model.bias.fill_(1.0)
                return
            with self.lock:
                self.model.weight.fill_(1.0)
            with self.lock:  # BUG: a request can run between the two halves of the reload
                self.model.bias.fill_(1.0)

    def handle(self) -> None:
        with torch.no_grad(), self.lock:
            self.answers.append((float(self.model.weight.sum()), float(self.model.bias.sum())))

    def consistent(self) -> bool:
        """Every request saw the old model (all zeros) or the new one (all ones)."""
        return all(answer in {(0.0, 0.0), (16.0, 4.0)} for answer in self.answers)


@settings(max_examples=100, deadline=None)
@given(schedule=interleavings())
def test_reload_is_atomic_buggy(schedule):
    server = Server(fixed=False)
    schedule.run(server.reload, server.handle, server.handle)
    assert server.consistent(), server.answers


@settings(max_examples=100, deadline=None)
@given(schedule=interleavings())
def test_reload_is_atomic_fixed(schedule):
    server = Server(fixed=True)
    schedule.run(server.reload, server.handle, server.handle)
    assert server.consistent(), server.answers
