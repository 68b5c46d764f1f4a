"""A tiny simulated program to exercise strategies without threads or torch.

Each simulated thread is a generator that yields *actions*; before each action the simulator
takes a scheduling point exactly like the real scheduler does (the strategy chooses among the
runnable threads when there are at least two). Actions:

``("step",)``
    a visible operation (what a tensor op is for the real scheduler);
``("acquire", name)`` / ``("release", name)``
    a non-reentrant lock: an acquire of a held lock blocks the thread until it is released;
``("yield",)``
    ``time.sleep`` / ``raceguard.yield_point()``: a point that calls ``strategy.on_yield``;
``("spawn", generator)``
    start a thread (it gets the next id, like ``Thread.start()``).

The generators share whatever state they close over; the simulator returns the trace of
``(thread id, action)`` pairs and whether the run deadlocked, so tests can assert properties of
strategies (determinism, PCT's guarantees) and a later Hypothesis-driven strategy can be tried
on the same programs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterable

from .strategies import Strategy

Program = Generator[tuple, None, None]


@dataclass
class SimResult:
    trace: list[tuple[int, tuple]] = field(default_factory=list)
    deadlocked: bool = False
    steps: int = 0
    choices: int = 0


def simulate(strategy: Strategy, threads: Iterable[Program | Callable[[], Program]], max_steps: int = 100_000) -> SimResult:
    """Run the simulated threads to completion (or deadlock) under ``strategy``."""
    progs: list[Program] = []
    pending: list[tuple | None] = []  # the next action of each thread (None: not fetched yet)
    finished: list[bool] = []
    blocked_on: list[str | None] = []
    holders: dict[str, int] = {}
    result = SimResult()

    def add(p: Any) -> int:
        gen = p() if callable(p) else p
        tid = len(progs)
        progs.append(gen)
        pending.append(None)
        finished.append(False)
        blocked_on.append(None)
        strategy.on_thread_created(tid)
        return tid

    for p in threads:
        add(p)

    def fetch(tid: int) -> None:
        if pending[tid] is None and not finished[tid]:
            try:
                pending[tid] = next(progs[tid])
            except StopIteration:
                finished[tid] = True

    current: int | None = 0 if progs else None
    for tid in range(len(progs)):
        fetch(tid)
    while result.steps < max_steps:
        runnable = [t for t in range(len(progs)) if not finished[t] and blocked_on[t] is None]
        if not runnable:
            result.deadlocked = any(not f for f in finished)
            break
        result.steps += 1
        if current is not None and current in runnable:
            strategy.on_point(current)  # the point before the running thread's next action
        if len(runnable) == 1:
            tid = runnable[0]
        else:
            result.choices += 1
            tid = strategy.choose(runnable, result.steps, current)
        current = tid
        action = pending[tid]
        pending[tid] = None
        assert action is not None
        kind = action[0]
        result.trace.append((tid, action if kind != "spawn" else ("spawn",)))
        if kind == "acquire":
            name = action[1]
            if name in holders:
                blocked_on[tid] = name
                pending[tid] = action  # retried when woken
                result.trace.pop()
                continue
            holders[name] = tid
        elif kind == "release":
            holders.pop(action[1], None)
            for t in range(len(progs)):
                if blocked_on[t] == action[1]:
                    blocked_on[t] = None
        elif kind == "yield":
            strategy.on_yield(tid)
        elif kind == "spawn":
            new = add(action[1])
            fetch(new)
        fetch(tid)
    return result
