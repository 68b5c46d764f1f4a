"""SARIF 2.1.0 output, shaped for GitHub code scanning.

One rule per finding kind; one result per finding, located at the first access's user-code
frame (a repository-relative uri under ``%SRCROOT%``), the other accesses as related locations,
and every access's stack as a thread flow so the code-scanning UI can show both sides of a race.
Where each access's thread was started or its task submitted is a related location too; for an
access made entirely in library code (``pool.submit(torch.save, ...)``) that line stands for the
access itself, so a result is never placed in torch's files when the user's line is known.
``partialFingerprints`` carries raceguard's own fingerprint, which is stable across runs and
machines, so GitHub tracks an alert across commits. Suppressed findings are kept as results
with an external suppression, which GitHub shows as dismissed rather than dropping silently.

Pure Python, no torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from raceguard.report.finding import KINDS, Access, Finding, Frame
from raceguard.report.text import access_line, origin_line

if TYPE_CHECKING:
    from raceguard.report.document import Report

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA_URI = "https://json.schemastore.org/sarif-2.1.0.json"
INFORMATION_URI = "https://github.com/raceguard/raceguard"
SRCROOT = "%SRCROOT%"
FINGERPRINT_KEY = "raceguardFingerprint/v1"


# id -> (name, short description, full description, help markdown, default level)
RULES: dict[str, tuple[str, str, str, str, str]] = {
    "data-race": (
        "DataRace",
        "Unsynchronised accesses to the same tensor memory",
        "Two threads (or streams) accessed overlapping elements of the same memory, at least one "
        "of them writing, with no happens-before order between them (no lock, queue, event or join "
        "orders them). The result depends on timing and can silently corrupt weights, gradients or "
        "optimizer state.",
        "Order the two accesses: hold one lock around both (e.g. the optimizer step and the "
        "checkpoint copy), hand the tensor over through a `queue.Queue`, or work on a copy taken "
        "under the lock (`state_dict()` values `.clone()`d while holding it).",
        "error",
    ),
    "lock-order-cycle": (
        "LockOrderCycle",
        "Locks acquired in a cyclic order (potential deadlock)",
        "Threads acquired the same locks in different orders, so a cycle exists in the lock-order "
        "graph. Under an unlucky interleaving every thread of the cycle waits for the next one "
        "forever. Reported even when this run did not deadlock.",
        "Pick one global order for these locks and always acquire them in that order, or merge "
        "them into one lock.",
        "error",
    ),
    "deadlock": (
        "Deadlock",
        "Threads blocked on each other",
        "The run deadlocked: every involved thread was blocked waiting for a lock, event, queue "
        "or join that another blocked thread would have released.",
        "Break the wait cycle: acquire locks in one global order, never block on a queue or join "
        "while holding a lock the other side needs, and use timeouts for cross-thread waits.",
        "error",
    ),
    "thread-exception": (
        "ThreadException",
        "Exception escaped a worker thread",
        "An exception escaped a thread other than the main thread. Python only prints it and the "
        "program carries on, so the failure (a dead data loader, a checkpointer that stopped) is "
        "silent.",
        "Catch the exception in the thread and hand it to the main thread (e.g. through a queue "
        "or `concurrent.futures`), or install `threading.excepthook` to fail loudly.",
        "error",
    ),
    "target-failure": (
        "TargetFailure",
        "Target failed under a particular schedule",
        "With this thread schedule the target raised in its main thread, exited with a non-zero "
        "code or timed out. The schedule's seed replays it exactly.",
        "Replay the schedule with the `reproduce` command shown in the report and debug the "
        "failure; it usually points to a missing synchronisation.",
        "error",
    ),
    "shared-rng": (
        "SharedRandomGenerator",
        "Global random generator shared by threads without ordering",
        "Several threads drew from (or reseeded) one global random generator with no order "
        "between them, so results are not reproducible even with a fixed seed.",
        "Give each thread its own `torch.Generator` (seeded from the main seed) and pass it "
        "explicitly to random ops.",
        "warning",
    ),
    "thread-local-mode": (
        "ThreadLocalModeMismatch",
        "Thread-local mode differs from the starting thread",
        "Model code ran in a thread where a thread-local mode (grad mode, inference mode, "
        "autocast) differs from the mode active in the thread that started it. These modes do "
        "not propagate to new threads.",
        "Enter the mode inside the thread (e.g. wrap the thread's function in "
        "`torch.no_grad()` / `torch.autocast(...)`).",
        "warning",
    ),
}


def sarif_rules() -> list[dict[str, Any]]:
    """``tool.driver.rules``: one per finding kind, in KINDS order (ruleIndex = KINDS.index)."""
    rules = []
    for kind in KINDS:
        name, short, full, help_markdown, level = RULES[kind]
        rules.append(
            {
                "id": kind,
                "name": name,
                "shortDescription": {"text": short},
                "fullDescription": {"text": full},
                "help": {"text": f"{full}\n\nHow to fix: {_plain(help_markdown)}", "markdown": f"{full}\n\n**How to fix:** {help_markdown}"},
                "helpUri": f"{INFORMATION_URI}#{kind}",
                "defaultConfiguration": {"level": level},
                "properties": {"tags": ["concurrency", "reliability"], "precision": "high"},
            }
        )
    return rules


def to_sarif(report: "Report", base_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The report as a SARIF 2.1.0 log; paths under ``base_dir`` (default: cwd) become relative uris."""
    from raceguard.report.document import tool_version

    locator = _Locator(Path(base_dir) if base_dir is not None else Path.cwd())
    results = [_result(f, report, locator) for f in report.findings]
    results += [_result(f, report, locator, suppressed=True) for f in report.suppressed]
    invocation: dict[str, Any] = {"executionSuccessful": not report.error}
    notifications = []
    if report.error:
        notifications.append({"level": "error", "message": {"text": report.error}})
    if report.incomplete:
        for e in report.incomplete.get("errors") or []:
            notifications.append({"level": "warning", "message": {"text": f"analysis incomplete: {e.get('message')}"}})
    if notifications:
        invocation["toolExecutionNotifications"] = notifications
    version = tool_version()
    run: dict[str, Any] = {
        "tool": {
            "driver": {
                "name": "raceguard",
                "version": version,
                "semanticVersion": version,
                "informationUri": INFORMATION_URI,
                "rules": sarif_rules(),
            }
        },
        "originalUriBaseIds": {SRCROOT: {"uri": locator.base_uri}},
        "invocations": [invocation],
        "results": results,
        "properties": {"command": report.command, "target": list(report.target), "status": report.status(), "stats": dict(report.stats)},
    }
    return {"$schema": SARIF_SCHEMA_URI, "version": SARIF_VERSION, "runs": [run]}


class _Locator:
    """Turns frame files into SARIF artifact locations relative to the repository root."""

    def __init__(self, base_dir: Path) -> None:
        self.base = os.path.realpath(base_dir)
        self.base_uri = Path(self.base).as_uri().rstrip("/") + "/"

    def artifact(self, file: str) -> dict[str, Any] | None:
        # "<string>", "<stdin>", "<frozen importlib._bootstrap>": no file to point at.
        if not file or file.startswith("<"):
            return None
        absolute = os.path.realpath(file)  # relative paths are relative to the cwd of the run
        relative = os.path.relpath(absolute, self.base) if _same_drive(absolute, self.base) else None
        if relative is not None and not relative.startswith(os.pardir):
            return {"uri": quote(Path(relative).as_posix(), safe="/"), "uriBaseId": SRCROOT}
        return {"uri": Path(absolute).as_uri()}

    def location(self, frame: Frame | None, message: str | None = None, location_id: int | None = None) -> dict[str, Any]:
        loc: dict[str, Any] = {}
        if location_id is not None:
            loc["id"] = location_id
        if frame is not None:
            artifact = self.artifact(frame.file)
            if artifact is not None:
                physical: dict[str, Any] = {"artifactLocation": artifact}
                if frame.line >= 1:
                    physical["region"] = {"startLine": frame.line}
                loc["physicalLocation"] = physical
            loc["logicalLocations"] = [{"name": frame.function, "kind": "function"}]
        if message:
            loc["message"] = {"text": message}
        return loc

    def has_file(self, frame: Frame | None) -> bool:
        return frame is not None and self.artifact(frame.file) is not None


def _same_drive(a: str, b: str) -> bool:
    # os.path.relpath raises on Windows across drives.
    return os.path.splitdrive(a)[0].lower() == os.path.splitdrive(b)[0].lower()


def _access_frame(access: Access) -> Frame | None:
    """Where an access is shown: its innermost user frame; when every frame is library code,
    the user frame that started its thread or submitted its task; else its innermost frame."""
    for frame in access.stack:
        if frame.user:
            return frame
    if access.origin is not None:
        frame = access.origin.user_frame
        if frame is not None and frame.user:
            return frame
    return access.stack[0] if access.stack else None


def _access_message(access: Access) -> str:
    frame = _access_frame(access)
    if access.origin is not None and frame is not None and frame not in access.stack:
        return f"{access_line(access)}, in library code; {origin_line(access.origin)}"
    return access_line(access)


def _primary(finding: Finding, report: "Report", locator: _Locator) -> tuple[Frame | None, Access | None]:
    """Where the result is shown: the first access's user frame (or its origin's, see
    _access_frame), else the first real file anywhere."""
    for access in finding.accesses:
        if locator.has_file(_access_frame(access)):
            return _access_frame(access), access
    for access in finding.accesses:
        for frame in access.stack:
            if locator.has_file(frame):
                return frame, access
    # No stack at all (e.g. a target that timed out): point at the script that was run.
    script = next((arg for arg in report.target if arg.endswith(".py")), None)
    if script is not None:
        return Frame(file=script, line=1, function="<module>"), None
    return None, None


def _result(finding: Finding, report: "Report", locator: _Locator, suppressed: bool = False) -> dict[str, Any]:
    text = finding.message + (f"\nHint: {finding.hint}" if finding.hint else "")
    result: dict[str, Any] = {
        "ruleId": finding.kind,
        "ruleIndex": KINDS.index(finding.kind),
        "level": "error" if finding.severity == "error" else "warning",
        "message": {"text": text},
    }
    primary_frame, primary_access = _primary(finding, report, locator)
    if primary_frame is not None:
        message = _access_message(primary_access) if primary_access is not None else None
        result["locations"] = [locator.location(primary_frame, message)]
    related = [
        locator.location(_access_frame(access), _access_message(access), location_id=index)
        for index, access in enumerate(finding.accesses)
        if access is not primary_access and _access_frame(access) is not None
    ]
    # Origins after the accesses (ids continue after theirs), each naming the access it is for.
    for index, access in enumerate(finding.accesses):
        origin = access.origin
        frame = origin.user_frame if origin is not None else None
        if frame is None or frame is _access_frame(access):
            continue  # no stack, or already the access's own location
        related.append(
            locator.location(
                frame,
                f"{origin_line(origin)} (for the {access.mode} by thread {access.thread!r})",
                location_id=len(finding.accesses) + index,
            )
        )
    if related:
        result["relatedLocations"] = related
    if finding.accesses:
        result["codeFlows"] = [{"threadFlows": [_thread_flow(access, locator) for access in finding.accesses]}]
    result["partialFingerprints"] = {FINGERPRINT_KEY: finding.fingerprint}
    properties: dict[str, Any] = {"resource": finding.resource, "resourceKind": finding.resource_kind}
    if finding.reproduce.command:
        properties["reproduce"] = finding.reproduce.command
    result["properties"] = properties
    if suppressed or finding.suppressed:
        result["suppressions"] = [{"kind": "external", "justification": finding.suppressed or "suppressed"}]
    return result


def _thread_flow(access: Access, locator: _Locator) -> dict[str, Any]:
    """One access as a thread flow, in execution order (outermost call first).

    The contract orders a stack innermost first with user frames before library frames, so
    execution order is the user frames reversed, then the library frames reversed; the user
    frame where the access happened is the "essential" step.
    """
    message = access_line(access)
    if not access.stack:
        locations = [{"location": {"message": {"text": message}}}]
    else:
        access_frame = access.user_frame
        user = [f for f in access.stack if f.user]
        library = [f for f in access.stack if not f.user]
        locations = []
        for nesting, frame in enumerate([*reversed(user), *reversed(library)]):
            is_access = frame is access_frame
            locations.append(
                {
                    "location": locator.location(frame, message if is_access else None),
                    "nestingLevel": nesting,
                    "importance": "essential" if is_access else ("important" if frame.user else "unimportant"),
                }
            )
    return {"id": access.timeline or access.thread, "message": {"text": message}, "locations": locations}


def _plain(markdown: str) -> str:
    return markdown.replace("`", "").replace("**", "")
