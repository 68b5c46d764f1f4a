"""The supervisor's check of shared storages across processes. Pure Python, no torch.

Every checked process streams its accesses to storages in shared memory (:mod:`.shared`): the
storage's identity, a byte range, read or write, the global name of its timeline (``PID:N``), the
epoch, and the timeline's clock at that moment. Two accesses of different processes to
overlapping bytes, one a write, race unless one happens before the other: ``a`` before ``b`` when
``b``'s clock has reached ``a``'s epoch on ``a``'s timeline. Arrival order at the supervisor says
nothing about the order in the program (each process streams on its own connection), so both
directions are checked, and the check runs once every process has finished streaming.

Accesses of one timeline in one epoch to the same bytes from the same line are sent once, so a
Hogwild loop without synchronisation sends a handful of records per line, and a loop that takes a
lock every step sends one per step.
"""

from __future__ import annotations

from typing import Any, Callable

# Pairs of accesses compared per storage before giving up on that storage (a report names the
# races found until then, and says the check was cut short).
MAX_PAIRS_PER_STORAGE = 2_000_000


class _Record:
    __slots__ = ("conn", "lo", "hi", "write", "timeline", "epoch", "clock", "site", "resource")

    def __init__(self, conn: int, event: dict, clock: dict, site: dict, resource: dict) -> None:
        self.conn = conn
        self.lo = int(event["lo"])
        self.hi = int(event["hi"])
        self.write = bool(event["w"])
        self.timeline = event["t"]
        self.epoch = int(event["e"])
        self.clock = clock
        self.site = site
        self.resource = resource


def _before(a: _Record, b: _Record) -> bool:
    return b.clock.get(a.timeline, 0) >= a.epoch


class CrossProcessCheck:
    """Collects what the processes stream (under the hub's lock) and finds the races between them."""

    def __init__(self) -> None:
        self.clocks: dict[tuple, dict] = {}
        self.sites: dict[tuple, dict] = {}
        self.resources: dict[tuple, dict] = {}
        self.by_storage: dict[str, list[_Record]] = {}
        self.pids: dict[int, int | None] = {}
        self.truncated = False

    def add(self, conn: int, pid: int | None, event: dict) -> None:
        kind = event["type"]
        self.pids[conn] = pid
        if kind == "mp-clock":
            self.clocks[(conn, event["id"])] = event["clock"]
        elif kind == "mp-site":
            self.sites[(conn, event["id"])] = event["access"]
        elif kind == "mp-resource":
            self.resources[(conn, event["id"])] = event
        elif kind == "mp-access":
            record = _Record(
                conn,
                event,
                self.clocks[(conn, event["c"])],
                self.sites[(conn, event["s"])],
                self.resources[(conn, event["r"])],
            )
            self.by_storage.setdefault(event["k"], []).append(record)

    def races(self) -> list[tuple[_Record, _Record]]:
        """One (earlier-arrived, later-arrived) pair per pair of lines that race."""
        found: dict[tuple, tuple[_Record, _Record]] = {}
        for records in self.by_storage.values():
            budget = MAX_PAIRS_PER_STORAGE
            for j, b in enumerate(records):
                for a in records[:j]:
                    budget -= 1
                    if budget < 0:
                        self.truncated = True
                        break
                    if a.conn == b.conn or not (a.write or b.write) or a.hi <= b.lo or b.hi <= a.lo:
                        continue
                    if self.pids.get(a.conn) == self.pids.get(b.conn):
                        continue  # one process (a fork's records before it reconnected): its own engine's
                    key = tuple(sorted((_line_key(a), _line_key(b))))
                    if key in found or _before(a, b) or _before(b, a):
                        continue
                    found[key] = (a, b)
                if budget < 0:
                    break
        return list(found.values())

    def findings(self, build: Callable[[_Record, _Record], Any]) -> list:
        return [build(a, b) for a, b in self.races()]


def _line_key(r: _Record) -> tuple:
    frames = [f for f in r.site.get("stack", []) if f.get("user", True)] or r.site.get("stack", [])[:1]
    return (r.write, tuple((f["file"], f["line"]) for f in frames))
