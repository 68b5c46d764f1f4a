"""Scheduling strategies: which runnable thread continues at a scheduling point.

Pure Python, no torch, no ``threading``: a strategy sees only small integer thread ids and is
unit-testable with a simulated program (see :func:`raceguard.schedule.simulate.simulate`).

Thread ids are deterministic: 0 is the main thread, then 1, 2, ... in the order the program
*starts* threads (``Thread.start()``), never OS thread ids, names or the ordering of a dict of
them. A strategy is a pure function of its constructor arguments and of the sequence of calls it
receives, so a schedule is fully determined by ``(strategy, seed, depth[, steps])``: the same
seed gives the same choices, hence the same interleaving and the same result.

The interface (Shuttle-style) has three calls:

* ``on_thread_created(tid)`` when a thread becomes known (the main thread at the start, then at
  each ``start()``);
* ``on_yield(tid)`` when a thread gives way voluntarily (``time.sleep``,
  ``raceguard.yield_point()``): a hint that it is waiting for someone else;
* ``on_point(tid)`` at every scheduling point the running thread ``tid`` takes, whether or not
  anyone else could run (so a strategy can count a thread's own points: the ``k``-th point of a
  thread is the same place in its code whatever the other threads do);
* ``choose(runnable, step, current)`` at a scheduling point with at least two runnable threads:
  ``runnable`` is sorted by id, ``step`` counts every scheduling point of the run so far and
  ``current`` is the thread that was running (it may be absent from ``runnable`` if it has just
  blocked or finished). Returns one id from ``runnable``.

A later Hypothesis-driven strategy plugs in by implementing ``choose`` with a draw from the
test's data (``data.draw(st.sampled_from(runnable))``); :class:`ReplayStrategy` shows the shape.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterable, Sequence

ThreadId = int

STRATEGIES = ("random", "pct")

# The seed of PCT's calibration run (the run that measures ``steps``), whatever the schedules'
# seeds: the estimate is then a function of the target alone, so a run that found seed S and a
# replay of seed S alone (``raceguard replay`` without ``--pct-steps``, the pytest marker's
# ``schedules=1, seed=S``) measure the same estimate and run the same schedule.
CALIBRATION_SEED = 0


class Strategy:
    """Base class: every hook is optional except :meth:`choose`."""

    name = "base"

    def on_thread_created(self, tid: ThreadId) -> None:
        pass

    def on_yield(self, tid: ThreadId) -> None:
        pass

    def on_point(self, tid: ThreadId) -> None:
        pass

    def choose(self, runnable: Sequence[ThreadId], step: int, current: ThreadId | None) -> ThreadId:
        raise NotImplementedError

    def describe(self) -> dict:
        """Parameters that identify the schedule (for reports and replay commands)."""
        return {"strategy": self.name}


class RandomStrategy(Strategy):
    """Uniform choice among the runnable threads at every scheduling point."""

    name = "random"

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._rng = random.Random(_mix(seed, "random"))

    def choose(self, runnable: Sequence[ThreadId], step: int, current: ThreadId | None) -> ThreadId:
        return runnable[self._rng.randrange(len(runnable))]

    def describe(self) -> dict:
        return {"strategy": self.name, "seed": self.seed}


class PCTStrategy(Strategy):
    """Probabilistic Concurrency Testing (Burckhardt, Kothari, Musuvathi, Nagarakatte, ASPLOS 2010).

    * Every thread gets a random priority when it is created; the main thread is created first,
      every later thread is inserted at a uniformly random rank among the existing ones (so the
      priorities of all threads form a uniformly random permutation, as in the paper, even though
      threads are created dynamically).
    * ``depth - 1`` priority change points are drawn uniformly, without repetition, from
      ``[1, steps]``, where ``steps`` estimates the number of *choice steps* of a run (scheduling
      points where at least two threads are runnable: points with a single runnable thread are
      not choices, and the paper inserts no change points during sequential execution).
    * At each choice step the highest-priority runnable thread runs. When the step count reaches
      a change point, the running thread's priority drops below every other thread's first.

    The change-point rule follows Coyote and Shuttle ("move to the lowest priority") rather than
    the paper's "priority i at the i-th change point": the two coincide for one change point, and
    moving to the bottom composes with yields. A thread that yields (``time.sleep``,
    ``yield_point()``) also drops to the bottom, so a polling loop never starves the thread it
    waits for (PCT is not fair otherwise).

    ``steps`` comes from a calibration run (see :mod:`raceguard.process.stress`): the step count of
    one run of the target under PCT without change points, with :data:`CALIBRATION_SEED`. It is
    part of the schedule's identity and appears in the replay command as ``--pct-steps``. Without an estimate (``steps=None``) the
    strategy places no change points: that is exactly the calibration run.
    """

    name = "pct"

    def __init__(self, seed: int, depth: int = 3, steps: int | None = None) -> None:
        if depth < 1:
            raise ValueError("PCT depth must be at least 1")
        self.seed = seed
        self.depth = depth
        self.steps = steps
        self._rng = random.Random(_mix(seed, "pct", depth))
        # Priority order, highest first: a list of thread ids.
        self._order: list[ThreadId] = []
        self._choice_steps = 0
        self.change_points: list[int] = []
        if steps is not None and steps > 1 and depth > 1:
            n = min(depth - 1, steps)
            self.change_points = sorted(self._rng.sample(range(1, steps + 1), n))
        self._pending = list(self.change_points)
        # (choice step, demoted thread) of every change point that fired, for tests and reports.
        self.fired: list[tuple[int, ThreadId]] = []

    def on_thread_created(self, tid: ThreadId) -> None:
        if tid in self._order:
            return
        rank = self._rng.randrange(len(self._order) + 1)
        self._order.insert(rank, tid)

    def on_yield(self, tid: ThreadId) -> None:
        self._demote(tid)

    def _demote(self, tid: ThreadId) -> None:
        try:
            self._order.remove(tid)
        except ValueError:
            return
        self._order.append(tid)

    def priority_order(self) -> list[ThreadId]:
        """Thread ids, highest priority first (a copy)."""
        return list(self._order)

    def choose(self, runnable: Sequence[ThreadId], step: int, current: ThreadId | None) -> ThreadId:
        self._choice_steps += 1
        while self._pending and self._pending[0] <= self._choice_steps:
            self._pending.pop(0)
            if current is not None:
                self._demote(current)
                self.fired.append((self._choice_steps, current))
        candidates = set(runnable)
        for tid in self._order:
            if tid in candidates:
                return tid
        # Threads the strategy was never told about: treat them as created now.
        for tid in runnable:
            self.on_thread_created(tid)
        return min(runnable, key=self._order.index)

    @property
    def choice_steps(self) -> int:
        return self._choice_steps

    def describe(self) -> dict:
        return {"strategy": self.name, "seed": self.seed, "depth": self.depth, "steps": self.steps}


class FirstStrategy(Strategy):
    """Always the lowest runnable id: a deterministic baseline (and the simplest for tests)."""

    name = "first"

    def choose(self, runnable: Sequence[ThreadId], step: int, current: ThreadId | None) -> ThreadId:
        return runnable[0]


class ReplayDivergence(Exception):
    """A recorded choice is not runnable at its step: the program did not behave the same."""


class ReplayStrategy(Strategy):
    """Replays a recorded list of choices (one per choice step, i.e. per call of :meth:`choose`).

    With ``strict=False`` a divergence (recorded thread not runnable, or choices exhausted) falls
    back to the lowest runnable id and is counted in :attr:`divergences`; with ``strict=True`` it
    raises :class:`ReplayDivergence`.
    """

    name = "replay"

    def __init__(self, choices: Iterable[ThreadId], *, strict: bool = False) -> None:
        self.choices = list(choices)
        self.strict = strict
        self._i = 0
        self.divergences = 0

    def choose(self, runnable: Sequence[ThreadId], step: int, current: ThreadId | None) -> ThreadId:
        if self._i < len(self.choices):
            tid = self.choices[self._i]
            self._i += 1
            if tid in runnable:
                return tid
            if self.strict:
                raise ReplayDivergence(f"choice {self._i - 1}: thread {tid} is not runnable (runnable: {list(runnable)})")
        elif self.strict:
            raise ReplayDivergence(f"choice {self._i}: the recorded schedule has only {len(self.choices)} choices")
        self.divergences += 1
        return runnable[0]

    def describe(self) -> dict:
        return {"strategy": self.name, "choices": len(self.choices)}


class DataStrategy(Strategy):
    """Choices drawn from a Hypothesis ``data`` object (``st.data()``), so Hypothesis explores,
    shrinks and replays interleavings like any other input.

    ``draw`` is any callable taking the number of runnable threads and returning an index; with
    Hypothesis: ``DataStrategy.from_hypothesis(data)``. Shrinking towards 0 means "the lowest
    runnable id", so minimal failing examples have few context switches.
    """

    name = "data"

    def __init__(self, draw: "Callable[[int], int]") -> None:
        self._draw = draw

    @classmethod
    def from_hypothesis(cls, data: Any) -> "DataStrategy":
        from hypothesis import strategies as st

        return cls(lambda n: data.draw(st.integers(0, n - 1), label="thread"))

    def choose(self, runnable: Sequence[ThreadId], step: int, current: ThreadId | None) -> ThreadId:
        # Prefer continuing the current thread at index 0 so shrinking removes switches.
        order = list(runnable)
        if current in order:
            order.remove(current)
            order.insert(0, current)
        return order[self._draw(len(order))]


class RecordingStrategy(Strategy):
    """Wraps another strategy and records every choice it makes (for :class:`ReplayStrategy`)."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self.name = inner.name
        self.choices: list[ThreadId] = []

    def on_thread_created(self, tid: ThreadId) -> None:
        self.inner.on_thread_created(tid)

    def on_yield(self, tid: ThreadId) -> None:
        self.inner.on_yield(tid)

    def on_point(self, tid: ThreadId) -> None:
        self.inner.on_point(tid)

    def choose(self, runnable: Sequence[ThreadId], step: int, current: ThreadId | None) -> ThreadId:
        tid = self.inner.choose(runnable, step, current)
        self.choices.append(tid)
        return tid

    def describe(self) -> dict:
        return self.inner.describe()


def make_strategy(name: str, seed: int, depth: int = 3, steps: int | None = None) -> Strategy:
    """The strategy a schedule is run with: ``random`` or ``pct`` (``first`` for tests)."""
    if name == "random":
        return RandomStrategy(seed)
    if name == "pct":
        return PCTStrategy(seed, depth, steps)
    if name == "first":
        return FirstStrategy()
    raise ValueError(f"unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")


def _mix(seed: int, *parts: object) -> int:
    """A seed for the strategy's own generator, independent of the one the target gets.

    ``random.Random`` accepts any int; mixing in the strategy name keeps ``random`` and ``pct``
    with the same seed from drawing the same stream.
    """
    h = seed & 0xFFFFFFFFFFFFFFFF
    for p in parts:
        for ch in str(p):
            h = (h * 1099511628211 + ord(ch)) & 0xFFFFFFFFFFFFFFFF
    return h


class PreemptionStrategy(Strategy):
    """Run the current thread until it blocks, except at a few *preemptions*.

    ``preemptions`` is a list of ``(thread, point, pick)`` triples: when thread ``thread`` (0 is
    the main thread, then 1, 2, ... in start order) takes its ``point``-th scheduling point
    (0-based, counting every point it takes, see :meth:`Strategy.on_point`) and another thread
    could run, it is switched out in favour of the ``pick``-th (modulo their number) of the other
    runnable threads, in id order. When the running thread blocks or finishes, the lowest
    runnable id continues (not a preemption). A triple naming a point the run never reaches, or
    one where no other thread could run, does nothing; of two triples naming the same point, the
    first counts.

    Positions are per thread on purpose: a thread's ``point``-th scheduling point is the same
    place in its code whatever the other threads did, so removing one preemption leaves the
    others where they were. This is the shape the Hypothesis front end draws
    (:mod:`raceguard.hypothesis`): every triple is one context switch the program did not ask
    for, so when Hypothesis shrinks the list it removes switches one by one, and a minimal
    failing example shows exactly the switches the bug needs (CHESS's observation: most
    concurrency bugs need one or two).
    """

    name = "preemptions"

    def __init__(self, preemptions: Iterable[tuple[int, int, int]] = ()) -> None:
        self.preemptions = [tuple(int(x) for x in p) for p in preemptions]
        self._at: dict[tuple[int, int], int] = {}
        for p in self.preemptions:
            if len(p) != 3 or min(p) < 0:
                raise ValueError(f"a preemption is a triple of non-negative integers (thread, point, pick), got {p!r}")
            self._at.setdefault((p[0], p[1]), p[2])
        self._points: dict[ThreadId, int] = {}
        # (thread, point, pick, chosen thread) of every preemption that took place, in order.
        self.fired: list[tuple[ThreadId, int, int, ThreadId]] = []

    def on_point(self, tid: ThreadId) -> None:
        self._points[tid] = self._points.get(tid, 0) + 1

    def choose(self, runnable: Sequence[ThreadId], step: int, current: ThreadId | None) -> ThreadId:
        if current is None or current not in runnable:
            return runnable[0]
        k = self._points.get(current, 0) - 1
        pick = self._at.pop((current, k), None)
        if pick is None:
            return current
        others = [tid for tid in runnable if tid != current]
        chosen = others[pick % len(others)]
        self.fired.append((current, k, pick, chosen))
        return chosen

    @property
    def used(self) -> list[tuple[int, int, int]]:
        """The preemptions that took place, in the order they did."""
        return [(tid, k, pick) for tid, k, pick, _ in self.fired]

    def describe(self) -> dict:
        return {"strategy": self.name, "preemptions": [list(p) for p in self.preemptions]}
