"""The report document: one run's findings plus the facts around them.

:class:`Report` is what every front end builds and every writer consumes. ``to_dict`` produces
exactly the JSON object of the report-format contract (``raceguard/report-schema.json``);
``from_dict`` reads it back (``merge``, the pytest plugin). :func:`render` turns a report into
any of the output formats, and :func:`write_atomic` puts it on disk without ever leaving a
half-written file for a CI step to pick up.

Pure Python, no torch; jsonschema is optional at run time.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raceguard.report.finding import KINDS, MODES, RESOURCE_KINDS, SEVERITIES, Finding

REPORT_VERSION = 1
TOOL_NAME = "raceguard"
FORMATS = ("text", "json", "sarif", "junit")
# Where a machine-readable report goes without --output: a file in the working directory, never
# stdout, which belongs to the target (its own output and a report must not mix: `| jq` breaks).
DEFAULT_REPORT_FILES = {"json": "raceguard-report.json", "sarif": "raceguard-report.sarif", "junit": "raceguard-report.xml"}
STDOUT = "-"  # --output -: the report on stdout, for the commands that run no target (merge)
COMMANDS = ("check", "stress", "replay", "merge")
STATUSES = ("clean", "findings", "error")
OUTCOME_KINDS = ("exit", "signal", "timeout", "interrupted", "exception", "usage-error", "deadlock")
SCHEMA_RESOURCE = "report-schema.json"

# Exit codes of the contract.
EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_TARGET_FAILED = 3
EXIT_INTERNAL_ERROR = 4
# Ctrl-C (SIGTERM) before the target's first line ran: nothing was checked, and the shell's
# convention for a command ended by that signal, 128 + its number, says so.
EXIT_INTERRUPTED_BEFORE_START = {"SIGINT": 130, "SIGTERM": 143}
# target_outcome.detail of such a run (its kind is "interrupted").
NOT_STARTED = "interrupted before the target started"


def incomplete_analysis(
    count: int, errors: list[dict[str, Any]], not_captured: dict[str, int] | None = None
) -> dict[str, Any] | None:
    """The report's ``incomplete`` entry for ``count`` events lost to raceguard's own failures,
    with the first traceback of each distinct failure, and for the calls that ran without op
    capture (``not_captured``: calls per kind, e.g. TorchScript under the Python dispatch mode);
    None when nothing was lost."""
    if count <= 0 and not errors and not not_captured:
        return None
    unique: dict[str, dict[str, Any]] = {}
    for e in errors:
        message = str(e.get("message", "unknown error"))
        unique.setdefault(message, {"message": message, "traceback": str(e.get("traceback", ""))})
    incomplete: dict[str, Any] = {"internal_errors": max(count, len(unique)), "errors": list(unique.values())}
    if not_captured:
        incomplete["not_captured"] = [
            {"kind": kind, "calls": int(calls), "message": not_captured_message(kind, int(calls))}
            for kind, calls in sorted(not_captured.items())
        ]
    return incomplete


def not_captured_message(kind: str, calls: int) -> str:
    return (
        f"{kind}: {calls} call{'' if calls == 1 else 's'} ran without op capture under the Python "
        "dispatch mode; the native backend sees them"
    )


def default_stats() -> dict[str, Any]:
    return {"threads": 0, "ops": 0, "schedules_run": 1, "first_failure_at": None, "wall_seconds": 0.0}


def tool_version() -> str:
    from raceguard.version import __version__

    return __version__


@dataclass
class Report:
    command: str
    target: list[str]
    findings: list[Finding]
    target_exit_code: int | None = None
    # threads, ops, schedules_run, first_failure_at, wall_seconds; extra keys are kept
    # (e.g. "schedules": per-schedule results used by the JUnit writer).
    stats: dict[str, Any] = field(default_factory=default_stats)
    # Set when raceguard itself failed; makes the status "error" and the exit code 4.
    error: str | None = None
    # How the target ended: {"kind", "code", "signal", "detail"}; see OUTCOME_KINDS.
    target_outcome: dict[str, Any] | None = None
    # Findings filtered out (suppressions, baseline, raceguard.benign); never fail a run.
    suppressed: list[Finding] = field(default_factory=list)
    # Baseline fingerprints that this run did not find any more.
    fixed: list[str] = field(default_factory=list)
    # Events raceguard lost to its own failures inside the target (a hook raised; the target ran
    # unchanged): {"internal_errors": N, "errors": [{"message", "traceback"}, ...]}. The findings
    # are still true, but the run may have more: the status says so, the exit code does not change.
    incomplete: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # Callers often pass only the stats they know; the contract requires all five.
        self.stats = {**default_stats(), **(self.stats or {})}

    def status(self) -> str:
        if self.error:
            return "error"
        return "findings" if self.findings else "clean"

    def failing_findings(self, fail_on: str) -> list[Finding]:
        """Findings that fail the run: not suppressed and at or above ``fail_on``."""
        if fail_on not in SEVERITIES:
            raise ValueError(f"fail_on must be one of {', '.join(SEVERITIES)}, not {fail_on!r}")
        return [f for f in self.findings if not f.suppressed and f.at_least(fail_on)]

    def simulated_cuda(self) -> bool:
        """Whether the target's CUDA ran on raceguard's simulated device (``--simulate-cuda``)."""
        return bool(self.stats.get("simulated_cuda"))

    def target_failed(self) -> bool:
        """Whether the target ended other than by exiting 0 (no information counts as success)."""
        if self.target_outcome is not None:
            return not (self.target_outcome.get("kind") == "exit" and self.target_outcome.get("code") == 0)
        return self.target_exit_code not in (None, 0)

    def interrupted_before_start(self) -> bool:
        """Ctrl-C or SIGTERM ended the run before the target's first line: nothing was checked."""
        outcome = self.target_outcome or {}
        return outcome.get("kind") == "interrupted" and str(outcome.get("detail") or "").startswith(NOT_STARTED)

    def exit_code(self, fail_on: str) -> int:
        """The process exit code of the contract: 4 error, 1 findings, 3 target failed, else 0;
        130 (143 for SIGTERM) when interrupted before the target started."""
        if self.error:
            return EXIT_INTERNAL_ERROR
        if self.interrupted_before_start() and not self.findings:
            return EXIT_INTERRUPTED_BEFORE_START.get(str((self.target_outcome or {}).get("signal") or "SIGINT"), 130)
        if self.failing_findings(fail_on):
            return EXIT_FINDINGS
        if self.target_failed():
            return EXIT_TARGET_FAILED
        return EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "version": REPORT_VERSION,
            "tool": {"name": TOOL_NAME, "version": tool_version()},
            "command": self.command,
            "target": list(self.target),
            "status": self.status(),
            "target_exit_code": self.target_exit_code,
            "findings": [f.to_dict() for f in self.findings],
            "stats": dict(self.stats),
        }
        if self.error:
            d["error"] = self.error
        if self.target_outcome is not None:
            d["target_outcome"] = normalise_outcome(self.target_outcome)
        if self.suppressed:
            d["suppressed"] = [f.to_dict() for f in self.suppressed]
        if self.fixed:
            d["fixed"] = sorted(self.fixed)
        if self.incomplete:
            d["incomplete"] = self.incomplete
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        version = d.get("version")
        if version != REPORT_VERSION:
            raise ValueError(f"unsupported report version {version!r} (this raceguard reads version {REPORT_VERSION})")
        return cls(
            command=d["command"],
            target=list(d.get("target", [])),
            findings=[Finding.from_dict(f) for f in d.get("findings", [])],
            target_exit_code=d.get("target_exit_code"),
            stats=dict(d.get("stats") or {}),
            error=d.get("error"),
            target_outcome=dict(d["target_outcome"]) if d.get("target_outcome") is not None else None,
            suppressed=[Finding.from_dict(f) for f in d.get("suppressed", [])],
            fixed=list(d.get("fixed", [])),
            incomplete=dict(d["incomplete"]) if d.get("incomplete") else None,
        )


def normalise_outcome(outcome: dict[str, Any]) -> dict[str, Any]:
    """The outcome with all four contract keys present (missing ones are null)."""
    return {
        **outcome,
        "kind": outcome.get("kind"),
        "code": outcome.get("code"),
        "signal": outcome.get("signal"),
        "detail": outcome.get("detail"),
    }


# --- schema ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _schema_text() -> str:
    try:
        from importlib.resources import files

        return files("raceguard").joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8")
    except (ImportError, OSError, TypeError, ModuleNotFoundError):
        # Source checkouts without package metadata: the file sits next to the package.
        return (Path(__file__).resolve().parent.parent / SCHEMA_RESOURCE).read_text(encoding="utf-8")


def load_schema() -> dict[str, Any]:
    """The report JSON Schema (draft 2020-12) shipped as ``raceguard/report-schema.json``."""
    return json.loads(_schema_text())


def validate_report(d: dict[str, Any]) -> None:
    """Raise ValueError, with every problem listed, if ``d`` is not a valid report.

    Uses jsonschema when it is installed (a test dependency); otherwise a built-in check of the
    required fields, types and enums, so that the runtime has no dependency for this.
    """
    try:
        import jsonschema  # noqa: F401
    except ImportError:
        problems = _minimal_problems(d)
    else:
        problems = _jsonschema_problems(d)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"report does not match {SCHEMA_RESOURCE}:\n{listed}{more}")


def _jsonschema_problems(d: dict[str, Any]) -> list[str]:
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(d), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{_json_path(e.absolute_path)}: {e.message}" for e in errors]


def _json_path(parts: Any) -> str:
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)
    return "$" + text


_FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")


def _minimal_problems(d: Any) -> list[str]:
    """Fallback validation without jsonschema: required fields, their types and the enums."""
    problems: list[str] = []

    def need(obj: Any, path: str, keys: tuple[str, ...]) -> bool:
        if not isinstance(obj, dict):
            problems.append(f"{path}: expected an object")
            return False
        for k in keys:
            if k not in obj:
                problems.append(f"{path}: '{k}' is a required property")
        return True

    def check_type(value: Any, path: str, types: tuple[type, ...], nullable: bool = False) -> None:
        if value is None and nullable:
            return
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            problems.append(f"{path}: {value!r} has the wrong type")

    def check_enum(value: Any, path: str, allowed: tuple[Any, ...]) -> None:
        if value not in allowed:
            problems.append(f"{path}: {value!r} is not one of {list(allowed)}")

    def check_finding(f: Any, path: str) -> None:
        keys = ("kind", "severity", "fingerprint", "message", "resource", "resource_kind", "accesses", "reproduce")
        if not need(f, path, keys):
            return
        if "kind" in f:
            check_enum(f["kind"], f"{path}.kind", KINDS)
        if "severity" in f:
            check_enum(f["severity"], f"{path}.severity", SEVERITIES)
        if "resource_kind" in f:
            check_enum(f["resource_kind"], f"{path}.resource_kind", RESOURCE_KINDS)
        if "fingerprint" in f and not (isinstance(f["fingerprint"], str) and _FINGERPRINT.match(f["fingerprint"])):
            problems.append(f"{path}.fingerprint: {f['fingerprint']!r} is not 16 lowercase hex digits")
        for k in ("message", "resource"):
            if k in f:
                check_type(f[k], f"{path}.{k}", (str,))
        if "reproduce" in f:
            need(f["reproduce"], f"{path}.reproduce", ("seed", "schedule_index", "command"))
        accesses = f.get("accesses", [])
        if not isinstance(accesses, list):
            problems.append(f"{path}.accesses: expected an array")
            return
        for i, a in enumerate(accesses):
            apath = f"{path}.accesses[{i}]"
            if not need(a, apath, ("thread", "timeline", "mode", "op", "locks_held", "stack")):
                continue
            if "mode" in a:
                check_enum(a["mode"], f"{apath}.mode", MODES)
            for j, fr in enumerate(a.get("stack", []) if isinstance(a.get("stack"), list) else []):
                if need(fr, f"{apath}.stack[{j}]", ("file", "line", "function")) and "line" in fr:
                    check_type(fr["line"], f"{apath}.stack[{j}].line", (int,))

    if not need(d, "$", ("version", "tool", "command", "target", "status", "target_exit_code", "findings", "stats")):
        return problems
    if "version" in d and d["version"] != REPORT_VERSION:
        problems.append(f"$.version: {d['version']!r} is not {REPORT_VERSION}")
    if "tool" in d:
        need(d["tool"], "$.tool", ("name", "version"))
    if "command" in d:
        check_enum(d["command"], "$.command", COMMANDS)
    if "status" in d:
        check_enum(d["status"], "$.status", STATUSES)
    if "target" in d:
        check_type(d["target"], "$.target", (list,))
    if "target_exit_code" in d:
        check_type(d["target_exit_code"], "$.target_exit_code", (int,), nullable=True)
    if "stats" in d:
        need(d["stats"], "$.stats", ("threads", "ops", "schedules_run", "first_failure_at", "wall_seconds"))
    for key in ("findings", "suppressed"):
        items = d.get(key, [])
        if not isinstance(items, list):
            problems.append(f"$.{key}: expected an array")
            continue
        for i, f in enumerate(items):
            check_finding(f, f"$.{key}[{i}]")
    outcome = d.get("target_outcome")
    if outcome is not None and need(outcome, "$.target_outcome", ("kind", "code", "signal", "detail")):
        if "kind" in outcome:
            check_enum(outcome["kind"], "$.target_outcome.kind", OUTCOME_KINDS)
    return problems


# --- output ----------------------------------------------------------------------------------


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` so that readers see the old file or the new one, never a part.

    A temporary file in the same directory is written, fsynced and renamed over the target
    with os.replace (atomic on POSIX and Windows); on any failure the temporary file is removed.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    mode = _new_file_mode(target)
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as tmp:
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        # mkstemp creates 0600 files; a report should get the permissions a plain open() would.
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def _new_file_mode(target: Path) -> int:
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_current_umask()


def _current_umask() -> int:
    # os.umask() can only be read by setting it, which races with other threads creating files
    # (the target's threads may be running); Linux exposes it read-only in /proc.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible (nor needed) on every platform.
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def to_json(report: Report) -> str:
    # default=str: a non-JSON value in a free-form `details` must not lose the whole report.
    return json.dumps(report.to_dict(), indent=2, ensure_ascii=False, default=str) + "\n"
