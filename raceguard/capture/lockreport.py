"""Findings for lock-order cycles and real deadlocks, built from the engines' answers.

Names are resolved here, at report time: a lock is ``model_lock (server.py:12)`` — the variable
or attribute holding it, and where it was created.
"""

from __future__ import annotations

from typing import Any

from ..engine.lockgraph import LockCycle
from ..engine.waitfor import Deadlock, ThreadJoin
from ..report.finding import Access, Finding, compute_fingerprint
from .stacks import render_site


def _lock_label(session: Any, key: Any) -> str:
    lock = session.lock_by_key(key)
    return session.lock_name(lock) if lock is not None else f"lock #{key}"


def cycle_finding(session: Any, cycle: LockCycle) -> Finding:
    names = [_lock_label(session, k) for k in cycle.locks]
    accesses = []
    for edge in cycle.edges:
        held = _lock_label(session, edge.src)
        taken = _lock_label(session, edge.dst)
        thread = session.thread_name(edge.timeline)
        held_at = render_site(edge.src_site) if edge.src_site else []
        access = Access(
            thread=thread,
            timeline=f"thread:{thread}",
            mode="acquire",
            op=None,
            locks_held=[held] + [_lock_label(session, g) for g in sorted(edge.gates, key=repr)],
            stack=render_site(edge.site),
            # The thread's start: the edge does not remember which pool task it was taken in.
            origin=session.origin_of(None, edge.timeline),
            details={
                "lock": taken,
                "while_holding": held,
                "held_since": [f.to_dict() for f in held_at if f.user][:3],
            },
        )
        accesses.append(access)
    short = [n.split(" (")[0] for n in names]
    picture = " → ".join(short + [short[0]])
    threads = sorted({a.thread for a in accesses})
    return Finding(
        kind="lock-order-cycle",
        resource=names[0],
        resource_kind="lock",
        message=f"lock-order cycle (potential deadlock): {picture} across threads {', '.join(repr(t) for t in threads)}",
        accesses=accesses,
        fingerprint=compute_fingerprint("lock-order-cycle", "|".join(sorted(short)), accesses),
        hint=f"take these locks in one global order everywhere (e.g. always {short[0]} before {short[1]}), "
        "or merge them into one lock",
        details={"cycle": short, "locks": names, "why": "each thread holds one lock of the cycle while taking the next; "
                 "if they run at the same moment every thread waits for the next forever"},
    )


def _resource_label(session: Any, resource: Any) -> str:
    if isinstance(resource, ThreadJoin):
        return f"join of thread '{session.thread_name(resource.timeline)}'"
    if isinstance(resource, tuple) and resource and resource[0] == "wait":
        return resource[1]
    return _lock_label(session, resource)


def deadlock_finding(session: Any, deadlock: Deadlock) -> Finding:
    accesses = []
    for i, wait in enumerate(deadlock.waits):
        state = session.timelines[wait.timeline] if wait.timeline < len(session.timelines) else None
        thread = session.thread_name(wait.timeline)
        waits_for = _resource_label(session, wait.resource)
        holder = deadlock.holders[i] if i < len(deadlock.holders) else None
        details: dict[str, Any] = {"waits_for": waits_for}
        if holder is not None and not isinstance(wait.resource, ThreadJoin):
            details["held_by"] = session.thread_name(holder)
        accesses.append(
            Access(
                thread=thread,
                timeline=f"thread:{thread}",
                mode="wait",
                op=None,
                locks_held=[session.lock_name(lk) for lk in (state.held if state is not None else ())],
                stack=render_site(wait.site),
                details=details,
                # Blocked now, so the thread is still in the work it was given.
                origin=session.render_origin(state.origin) if state is not None else None,
            )
        )
    first = accesses[0]
    if deadlock.cycle and len(accesses) == 1 and first.details.get("held_by") == first.thread:
        message = f"deadlock: thread '{first.thread}' waits for {first.details['waits_for']}, which it already holds"
        hint = "a threading.Lock is not reentrant: use threading.RLock, or do not take the lock again"
    elif deadlock.cycle:
        chain = "; ".join(
            f"'{a.thread}' waits for {a.details['waits_for']}"
            + (f" held by '{a.details['held_by']}'" if "held_by" in a.details else "")
            for a in accesses
        )
        message = f"deadlock: {chain}"
        hint = "take locks in one global order, and never join a thread while holding a lock it needs"
    else:
        chain = "; ".join(f"'{a.thread}' waits for {a.details['waits_for']}" for a in accesses)
        message = f"deadlock: every thread is blocked and nothing can wake them: {chain}"
        hint = "a wait with nobody left to signal it: check that every get() has a put(), every wait() a set()/notify()"
    resource = first.details["waits_for"]
    return Finding(
        kind="deadlock",
        resource=resource,
        resource_kind="thread" if resource.startswith("join of") else "lock",
        message=message,
        accesses=accesses,
        fingerprint=compute_fingerprint("deadlock", "|".join(sorted(a.details["waits_for"].split(" (")[0] for a in accesses)), accesses),
        hint=hint,
        details={"wait_cycle": deadlock.cycle},
    )
