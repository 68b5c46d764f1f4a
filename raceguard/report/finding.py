"""Findings: the one data type that flows from the engines to every reporter.

Pure data, no torch. A finding serialises to exactly the JSON object described in the report
format contract (``report-schema.json``), and is rebuilt from it with :meth:`Finding.from_dict`,
so the supervising process, ``merge`` and the reporters all speak the same type.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable

KINDS = (
    "data-race",
    "lock-order-cycle",
    "deadlock",
    "thread-exception",
    "target-failure",
    "shared-rng",
    "thread-local-mode",
)
SEVERITIES = ("error", "warning")
SEVERITY_RANK = {"warning": 1, "error": 2}
# "raise" marks where an exception escaped a thread (thread-exception, target-failure).
MODES = ("read", "write", "acquire", "wait", "raise")
RESOURCE_KINDS = (
    "parameter",
    "buffer",
    "grad",
    "optimizer-state",
    "tensor",
    "module-attribute",
    "lock",
    "rng",
    "thread",
)


@dataclass(frozen=True)
class Frame:
    file: str
    line: int
    function: str
    # Whether the frame is the target's own code (as opposed to torch or another library).
    # Not part of the JSON contract; kept so reporters can highlight user frames.
    user: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "function": self.function}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Frame":
        return cls(file=d["file"], line=int(d["line"]), function=d["function"], user=d.get("user", True))

    def __str__(self) -> str:
        return f"{self.file}:{self.line} in {self.function}"


# Where an access's work came from: the Thread.start() that started its thread, or the
# executor/pool submission of the task it ran in.
ORIGIN_KINDS = ("thread-start", "task-submit")


# A stack as the contract writes it (accesses and origins alike): frames innermost first, user
# frames first, and "user_frames" saying how many lead when not all do.
def _first_user_frame(stack: list[Frame]) -> Frame | None:
    for f in stack:
        if f.user:
            return f
    return stack[0] if stack else None


def _put_stack(d: dict[str, Any], stack: list[Frame]) -> None:
    d["stack"] = [f.to_dict() for f in stack]
    user_flags = [f.user for f in stack]
    if not all(user_flags):
        d["user_frames"] = sum(user_flags)


def _get_stack(d: dict[str, Any]) -> list[Frame]:
    stack = [Frame.from_dict(f) for f in d.get("stack", [])]
    n_user = d.get("user_frames")
    if n_user is not None:
        stack = [dataclasses.replace(f, user=i < n_user) for i, f in enumerate(stack)]
    return stack


@dataclass
class Origin:
    """Where the thread of an access was started, or where its task was submitted: the stack
    of that call in the starting/submitting thread (innermost first, user frames first)."""

    kind: str
    stack: list[Frame] = field(default_factory=list)
    # The thread that made the call (None when unknown).
    thread: str | None = None

    @property
    def user_frame(self) -> Frame | None:
        return _first_user_frame(self.stack)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        _put_stack(d, self.stack)
        if self.thread is not None:
            d["thread"] = self.thread
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Origin":
        return cls(kind=d["kind"], stack=_get_stack(d), thread=d.get("thread"))


@dataclass
class Access:
    thread: str
    timeline: str
    mode: str
    op: str | None = None
    locks_held: list[str] = field(default_factory=list)
    stack: list[Frame] = field(default_factory=list)
    # Free-form extras (e.g. "waits_for" for deadlocks, "lock" for lock-order edges).
    details: dict[str, Any] = field(default_factory=dict)
    # In a multi-process job, the process the access happened in ("rank 1", "process 4242");
    # None for the process raceguard started. Never part of the fingerprint.
    process: str | None = None
    # Where this access's thread was started or its task submitted; None for the main thread.
    # Never part of the fingerprint: one bug reached from two call sites is one finding.
    origin: Origin | None = None

    @property
    def user_frame(self) -> Frame | None:
        """The innermost frame of the target's own code, where a person would look first."""
        return _first_user_frame(self.stack)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "thread": self.thread,
            "timeline": self.timeline,
            "mode": self.mode,
            "op": self.op,
            "locks_held": list(self.locks_held),
        }
        _put_stack(d, self.stack)
        if self.details:
            d["details"] = dict(self.details)
        if self.process is not None:
            d["process"] = self.process
        if self.origin is not None:
            d["origin"] = self.origin.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Access":
        return cls(
            thread=d["thread"],
            timeline=d["timeline"],
            mode=d["mode"],
            op=d.get("op"),
            locks_held=list(d.get("locks_held", [])),
            stack=_get_stack(d),
            details=dict(d.get("details", {})),
            process=d.get("process"),
            origin=Origin.from_dict(d["origin"]) if d.get("origin") else None,
        )


@dataclass
class Reproduce:
    seed: int | None = None
    schedule_index: int | None = None
    command: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "schedule_index": self.schedule_index, "command": self.command}


@dataclass
class Finding:
    kind: str
    resource: str
    resource_kind: str
    message: str
    accesses: list[Access]
    severity: str = "error"
    fingerprint: str = ""
    reproduce: Reproduce = field(default_factory=Reproduce)
    # One line telling the user how to fix it.
    hint: str | None = None
    # Why the accesses are unordered, a traceback, a cycle picture...: kind-specific extras.
    details: dict[str, Any] = field(default_factory=dict)
    # Set by filters (suppressions, baselines, raceguard.benign): the reason it is not failing.
    suppressed: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown finding kind {self.kind!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}")
        if not self.fingerprint:
            self.fingerprint = compute_fingerprint(self.kind, self.resource, self.accesses)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": self.kind,
            "severity": self.severity,
            "fingerprint": self.fingerprint,
            "message": self.message,
            "resource": self.resource,
            "resource_kind": self.resource_kind,
            "accesses": [a.to_dict() for a in self.accesses],
            "reproduce": self.reproduce.to_dict(),
        }
        if self.hint:
            d["hint"] = self.hint
        if self.details:
            d["details"] = self.details
        if self.suppressed:
            d["suppressed"] = self.suppressed
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Finding":
        rep = d.get("reproduce") or {}
        return cls(
            kind=d["kind"],
            severity=d.get("severity", "error"),
            fingerprint=d.get("fingerprint", ""),
            message=d["message"],
            resource=d["resource"],
            resource_kind=d["resource_kind"],
            accesses=[Access.from_dict(a) for a in d.get("accesses", [])],
            reproduce=Reproduce(rep.get("seed"), rep.get("schedule_index"), rep.get("command")),
            hint=d.get("hint"),
            details=dict(d.get("details", {})),
            suppressed=d.get("suppressed"),
        )

    def at_least(self, severity: str) -> bool:
        return SEVERITY_RANK[self.severity] >= SEVERITY_RANK[severity]


def compute_fingerprint(kind: str, resource: str, accesses: Iterable[Access]) -> str:
    """A 16-hex-digit hash of what identifies the bug, not the run.

    Built from the kind, the resource name and, per access, the mode and the user-code frames
    (file base name, function and line). Addresses, thread names/ids and timings never enter,
    and accesses are sorted so that which thread happened to come first does not matter.
    """
    parts = []
    for a in accesses:
        frames = [f for f in a.stack if f.user] or a.stack[:1]
        key = a.mode + "|" + ";".join(f"{_basename(f.file)}:{f.function}:{f.line}" for f in frames)
        parts.append(key)
    h = hashlib.sha256()
    h.update(kind.encode())
    h.update(b"\0")
    h.update(resource.encode())
    for p in sorted(parts):
        h.update(b"\0")
        h.update(p.encode())
    return h.hexdigest()[:16]


def _basename(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1]
