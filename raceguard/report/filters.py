"""Suppressions and baselines: deciding which findings fail a run.

*Suppressions* are ThreadSanitizer-style lines ``KIND:PATTERN`` in a text file::

    # the metrics counter is racy on purpose
    data-race:*model.fc1.*
    lock-order-cycle:*io_lock*
    data-race:src/hogwild.py
    *:legacy_worker

``KIND`` is a finding kind or ``*``. ``PATTERN`` is an fnmatch-style glob (``*``, ``?``;
``[`` also matches literally, since resource names such as ``optimizer[Adam].state[...]`` contain
brackets) tried against the resource name, every lock name (in ``locks_held`` and in a
lock-order cycle), every frame's file (full path, or a path suffix on a ``/`` boundary:
``src/hogwild.py`` matches ``/repo/src/hogwild.py``) and function, and the fingerprint.

A *baseline* is a JSON file of known fingerprints (``--write-baseline``); with ``--baseline``
only new findings fail, and fingerprints no longer found are reported as fixed.

Filters never mutate the findings passed in: suppressed findings are returned as copies with
``suppressed`` set to the reason. Pure Python, no torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Iterable, Iterator

from raceguard.config import ConfigError
from raceguard.report.finding import KINDS, Finding

BASELINE_VERSION = 1
ANY_KIND = "*"
_FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")
# "ckpt_lock (train.py:12)" -> "ckpt_lock": lock names may carry where the lock was created.
_LOCK_SITE = re.compile(r"\s+\([^()]*\)$")


# --- suppressions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SuppressionRule:
    kind: str  # a finding kind, or "*"
    pattern: str
    origin: str  # "file:line", where the rule was written

    @property
    def text(self) -> str:
        return f"{self.kind}:{self.pattern}"

    def reason(self) -> str:
        return f"suppression '{self.text}' ({self.origin})"

    def matches(self, finding: Finding) -> bool:
        if self.kind != ANY_KIND and self.kind != finding.kind:
            return False
        return any(_glob(name, self.pattern) for name in _names(finding)) or any(
            _file_matches(path, self.pattern) for path in _files(finding)
        )


@dataclass
class Suppressions:
    rules: list[SuppressionRule] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str, source: str = "<suppressions>") -> "Suppressions":
        """Parse suppression lines; ConfigError names ``source:line`` for any bad line."""
        rules = []
        text = text.removeprefix("\ufeff")  # editors on Windows like to add a BOM
        for number, raw in enumerate(text.splitlines(), start=1):
            line = _strip_comment(raw)
            if not line:
                continue
            origin = f"{source}:{number}"
            kind, sep, pattern = line.partition(":")
            kind, pattern = kind.strip(), pattern.strip()
            if not sep or not kind or not pattern:
                raise ConfigError(f"{origin}: malformed suppression {raw.strip()!r}: expected KIND:PATTERN, e.g. data-race:*model.fc1.*")
            if kind != ANY_KIND and kind not in KINDS:
                raise ConfigError(f"{origin}: unknown finding kind {kind!r} in suppression (kinds: {', '.join(KINDS)}, or *)")
            rules.append(SuppressionRule(kind=kind, pattern=pattern, origin=origin))
        return cls(rules)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Suppressions":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConfigError(f"{path}: cannot read suppressions file: {reason}") from e
        return cls.parse(text, source=str(path))

    def match(self, finding: Finding) -> SuppressionRule | None:
        """The first rule that suppresses ``finding``, if any."""
        return next((rule for rule in self.rules if rule.matches(finding)), None)

    def apply(self, findings: Iterable[Finding]) -> tuple[list[Finding], list[Finding]]:
        """Split into (kept, suppressed); findings already marked suppressed (raceguard.benign) stay suppressed."""
        kept: list[Finding] = []
        suppressed: list[Finding] = []
        for finding in findings:
            if finding.suppressed:
                suppressed.append(finding)
                continue
            rule = self.match(finding)
            if rule is None:
                kept.append(finding)
            else:
                suppressed.append(dataclasses.replace(finding, suppressed=rule.reason()))
        return kept, suppressed


def _strip_comment(line: str) -> str:
    stripped = line.strip()
    if stripped.startswith("#"):
        return ""
    # Trailing comments need whitespace before '#', so a pattern may still contain '#'.
    match = re.search(r"\s#", stripped)
    return stripped[: match.start()].strip() if match else stripped


def _glob(name: str, pattern: str) -> bool:
    if fnmatchcase(name, pattern):
        return True
    # fnmatch reads "[Adam]" as a character class; resource names use brackets literally.
    return "[" in pattern and fnmatchcase(name, pattern.replace("[", "[[]"))


def _names(finding: Finding) -> Iterator[str]:
    yield finding.resource
    yield finding.fingerprint
    locks: list[str] = [lock for access in finding.accesses for lock in access.locks_held]
    cycle = finding.details.get("cycle")
    if isinstance(cycle, list):
        locks += [str(lock) for lock in cycle]
    locks += [str(a.details["lock"]) for a in finding.accesses if a.details.get("lock")]
    for lock in locks:
        yield lock
        bare = _LOCK_SITE.sub("", lock)
        if bare != lock:
            yield bare
    for access in finding.accesses:
        for frame in access.stack:
            yield frame.function


def _files(finding: Finding) -> Iterator[str]:
    for access in finding.accesses:
        for frame in access.stack:
            yield frame.file.replace("\\", "/")


def _file_matches(path: str, pattern: str) -> bool:
    pattern = pattern.replace("\\", "/")
    return _glob(path, pattern) or _glob(path, "*/" + pattern.lstrip("/"))


# --- baselines -------------------------------------------------------------------------------


@dataclass
class Baseline:
    # fingerprint -> {"fingerprint", "kind", "resource"}
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: str | None = None

    def __contains__(self, fingerprint: object) -> bool:
        return fingerprint in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def fingerprints(self) -> set[str]:
        return set(self.entries)


def baseline_document(findings: Iterable[Finding]) -> dict[str, Any]:
    entries = {f.fingerprint: {"fingerprint": f.fingerprint, "kind": f.kind, "resource": f.resource} for f in findings}
    return {"version": BASELINE_VERSION, "fingerprints": [entries[k] for k in sorted(entries)]}


def write_baseline(path: str | os.PathLike[str], findings: Iterable[Finding]) -> None:
    """Record the fingerprints of ``findings`` (deduplicated, sorted) atomically at ``path``."""
    from raceguard.report.document import write_atomic

    write_atomic(path, json.dumps(baseline_document(findings), indent=2) + "\n")


def load_baseline(path: str | os.PathLike[str]) -> Baseline:
    """Read a baseline file; ConfigError if it cannot be read or is not a version-1 baseline."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read baseline: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: baseline is not valid JSON: {e}") from e
    if not isinstance(document, dict) or document.get("version") != BASELINE_VERSION:
        raise ConfigError(f"{path}: not a raceguard baseline (expected {{\"version\": {BASELINE_VERSION}, \"fingerprints\": [...]}})")
    items = document.get("fingerprints")
    if not isinstance(items, list):
        raise ConfigError(f"{path}: baseline 'fingerprints' must be a list")
    entries: dict[str, dict[str, Any]] = {}
    for position, item in enumerate(items):
        # Plain strings are accepted too, for hand-written baselines.
        entry = {"fingerprint": item} if isinstance(item, str) else item
        fingerprint = entry.get("fingerprint") if isinstance(entry, dict) else None
        if not isinstance(fingerprint, str) or not _FINGERPRINT.match(fingerprint):
            raise ConfigError(f"{path}: baseline entry {position} has no valid fingerprint (16 lowercase hex digits)")
        entries[fingerprint] = dict(entry)
    return Baseline(entries=entries, path=str(path))


def apply_baseline(findings: Iterable[Finding], baseline: Baseline) -> tuple[list[Finding], list[Finding], list[str]]:
    """Split into (new, known, fixed_fingerprints).

    ``known`` are copies marked suppressed ("in baseline FILE"); ``fixed`` are baseline
    fingerprints none of ``findings`` has, sorted. Pass all findings, before suppressions, or
    a suppressed-but-still-present bug would be counted as fixed.
    """
    new: list[Finding] = []
    known: list[Finding] = []
    seen: set[str] = set()
    reason = f"in baseline {baseline.path}" if baseline.path else "in baseline"
    for finding in findings:
        seen.add(finding.fingerprint)
        if finding.fingerprint in baseline:
            known.append(finding if finding.suppressed else dataclasses.replace(finding, suppressed=reason))
        else:
            new.append(finding)
    fixed = sorted(baseline.fingerprints - seen)
    return new, known, fixed


@dataclass
class FilterResult:
    kept: list[Finding]
    suppressed: list[Finding]
    fixed: list[str]


def apply_filters(findings: Iterable[Finding], suppressions: Suppressions | None = None, baseline: Baseline | None = None) -> FilterResult:
    """Baseline, then suppressions and raceguard.benign marks, in the order that keeps ``fixed`` right."""
    remaining = list(findings)
    suppressed: list[Finding] = []
    fixed: list[str] = []
    if baseline is not None:
        remaining, known, fixed = apply_baseline(remaining, baseline)
        suppressed.extend(known)
    remaining, marked = (suppressions or Suppressions()).apply(remaining)
    suppressed.extend(marked)
    return FilterResult(kept=remaining, suppressed=suppressed, fixed=fixed)
