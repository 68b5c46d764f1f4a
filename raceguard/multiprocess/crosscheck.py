"""The supervisor's check of shared storages across processes. Pure Python, no torch.

Every checked process streams its accesses to storages in shared memory (:mod:`.shared`): the
storage's identity, a byte range, read or write, the global name of its timeline (``PID:N``), the
epoch, and the timeline's clock at that moment. Two accesses of different processes to
overlapping bytes, one a write, race unless one happens before the other: ``a`` before ``b`` when
``b``'s clock has reached ``a``'s epoch on ``a``'s timeline. Arrival order at the supervisor says
nothing about the order in the program (each process streams on its own connection), so both
directions are checked, and the check runs once every process has finished streaming.

A process sends, per timeline, bytes, mode and Python stack, one access for each state of what
the timeline knows of other processes, with the latest epoch it was made in (a later epoch is
seen by fewer processes, so it races whenever an earlier one does): a Hogwild loop without
synchronisation sends a handful of records per line, and a loop that takes an ``mp.Lock`` every
step one per step.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Any, Callable

from ..report.finding import Access

# Records of one racing range looked at for each access (see CrossProcessCheck.races): a pair
# of lines that races only beyond it, with the same access, is not reported.
SCAN_PER_RANGE = 256


class _Record:
    __slots__ = ("conn", "lo", "hi", "write", "timeline", "epoch", "order", "clock", "site", "resource")

    def __init__(self, conn: int, event: dict, clock: dict, site: dict, resource: dict) -> None:
        self.conn = conn
        self.lo = int(event["lo"])
        self.hi = int(event["hi"])
        self.write = bool(event["w"])
        self.timeline = event["t"]
        self.epoch = int(event["e"])
        self.order = int(event.get("c", 0))  # the clock's number: grows with what it knows
        self.clock = clock
        self.site = site
        self.resource = resource


class CrossProcessCheck:
    """Collects what the processes stream (under the hub's lock) and finds the races between them."""

    def __init__(self) -> None:
        self.clocks: dict[tuple, dict] = {}
        self.sites: dict[tuple, dict] = {}
        self.resources: dict[tuple, dict] = {}
        self.by_storage: dict[str, list[_Record]] = {}
        self.pids: dict[int, int | None] = {}
        # Provisional identities of storages sent before they moved into shared memory.
        self.aliases: dict[str, str] = {}
        # Connections whose process lost a synchronisation event to raceguard's own failure.
        self.ordering_lost: set[int] = set()

    def add(self, conn: int, pid: int | None, event: dict) -> None:
        kind = event["type"]
        self.pids[conn] = pid
        if kind == "mp-clock":
            self.clocks[(conn, event["id"])] = event["clock"]
            if event.get("lost"):
                self.ordering_lost.add(conn)
        elif kind == "mp-site":
            self.sites[(conn, event["id"])] = event["access"]
        elif kind == "mp-resource":
            self.resources[(conn, event["id"])] = event
        elif kind == "mp-alias":
            self.aliases[event["from"]] = event["to"]
        elif kind == "mp-access":
            record = _Record(
                conn,
                event,
                self.clocks[(conn, event["c"])],
                self.sites[(conn, event["s"])],
                self.resources[(conn, event["r"])],
            )
            self.by_storage.setdefault(event["k"], []).append(record)

    def races(self) -> list[tuple[_Record, _Record, list[str]]]:
        """One pair of records per pair of lines that race on one owner (a model, an optimizer,
        an allocation site), on the resource whose accesses arrived first, with the other
        resources the same lines race on (the fingerprint is the owner's, not the resource's).

        Per storage, the records of each timeline sorted by epoch (then by their clock's number,
        which grows with what the timeline knows) are in program order: their epochs and their
        clocks never decrease. For a record ``b`` and another process's timeline ``T``, the
        records of ``T`` that ``b`` has not seen (epoch above ``b``'s clock of ``T``) are a
        suffix, and those that have not seen ``b`` (their clock of ``b``'s timeline below ``b``'s
        epoch) a prefix: the racing ones are the range between, found by bisection. Within it,
        at most :data:`SCAN_PER_RANGE` records are looked at for overlapping bytes and a write."""
        found: dict[tuple, dict[str, tuple[_Record, _Record]]] = {}
        storages: dict[str, list[_Record]] = {}
        for key, records in self.by_storage.items():
            storages.setdefault(self.aliases.get(key, key), []).extend(records)
        for records in storages.values():
            by_timeline: dict[str, list[_Record]] = {}
            for r in records:
                by_timeline.setdefault(r.timeline, []).append(r)
            for rs in by_timeline.values():
                rs.sort(key=_program_order)
            epochs = {t: [r.epoch for r in rs] for t, rs in by_timeline.items()}
            seen_of: dict[tuple[str, str], list[int]] = {}  # (T, t): clock of t in T's records
            pid_of = {t: self.pids.get(rs[0].conn) for t, rs in by_timeline.items()}
            for t_b, rs_b in by_timeline.items():
                for b in rs_b:
                    for t_a, rs_a in by_timeline.items():
                        if t_a == t_b or pid_of[t_a] == pid_of[t_b]:
                            continue  # one process: its own engine checked it
                        lo = bisect_right(epochs[t_a], b.clock.get(t_a, 0))
                        seen = seen_of.get((t_a, t_b))
                        if seen is None:
                            seen = seen_of[(t_a, t_b)] = [r.clock.get(t_b, 0) for r in rs_a]
                        hi = bisect_left(seen, b.epoch, lo)
                        for a in rs_a[lo : min(hi, lo + SCAN_PER_RANGE)]:
                            if not (a.write or b.write) or a.hi <= b.lo or b.hi <= a.lo:
                                continue
                            key = (b.resource["root"], tuple(sorted((_line_key(a), _line_key(b)))))
                            on = found.setdefault(key, {})
                            if b.resource["name"] not in on:
                                on[b.resource["name"]] = (a, b)
        out = []
        for on in found.values():
            # Named after the first name in sorted order, not the storage whose accesses reached
            # the supervisor first: a finding's resource (and so its fingerprint) must not
            # depend on timing.
            names = sorted(on)
            a, b = on[names[0]]
            out.append((a, b, names[1:]))
        return out

    def findings(self, build: Callable[[_Record, _Record, bool, list[str]], Any]) -> list:
        """``build(a, b, unreliable, also_on)`` for each race; ``unreliable``: one of the two
        processes lost a synchronisation event, so the order seen may be incomplete."""
        lost = self.ordering_lost
        return [build(a, b, a.conn in lost or b.conn in lost, also) for a, b, also in self.races()]


def _program_order(r: _Record) -> tuple:
    return (r.epoch, r.order)


def _line_key(r: _Record) -> tuple:
    """The access's mode and user frames: what its fingerprint is made of."""
    key = r.site.get("_line_key")
    if key is None:
        stack = Access.from_dict(r.site).stack
        frames = [f for f in stack if f.user] or stack[:1]
        key = r.site["_line_key"] = (r.write, tuple((f.file, f.function, f.line) for f in frames))
    return key
