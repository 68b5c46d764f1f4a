"""Origins beyond data races, through the public CLI: the access of a thread-exception, of each
lock-order-cycle edge and of each deadlocked wait names the Thread.start() line of its thread.
(Data-race origins, for threads, Timers, executors, asyncio.to_thread and ThreadPool, are
checked by tests/test_cli_fixtures.py through the fixtures' ``# ORIGIN:`` markers.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raceguard.report.document import validate_report
from test_cli_fixtures import HANG_GUARD_SECONDS

ROOT = Path(__file__).resolve().parent.parent


def _report(fixture: str, tmp_path: Path) -> tuple[dict, str]:
    out = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "raceguard", "check", "--format", "json", "--output", str(out), fixture],
        cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_SECONDS,
    )
    report = json.loads(out.read_text())
    validate_report(report)
    text = subprocess.run(
        [sys.executable, "-m", "raceguard", "check", fixture], cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_SECONDS
    ).stderr
    return report, text


def _start_line(fixture: str) -> int:
    lines = (ROOT / fixture).read_text().splitlines()
    return next(i for i, line in enumerate(lines, start=1) if line.strip() == "t.start()")


@pytest.mark.parametrize(
    "fixture, kind",
    [
        ("fixtures/targets/thread_exception.py", "thread-exception"),
        ("fixtures/locks/inversion.py", "lock-order-cycle"),
        ("fixtures/locks/real_deadlock.py", "deadlock"),
    ],
)
def test_every_access_names_its_threads_start(fixture: str, kind: str, tmp_path: Path) -> None:
    report, text = _report(fixture, tmp_path)
    findings = [f for f in report["findings"] if f["kind"] == kind]
    assert findings, [f["kind"] for f in report["findings"]]
    line = _start_line(fixture)
    for access in findings[0]["accesses"]:
        origin = access["origin"]
        assert origin["kind"] == "thread-start"
        assert origin["thread"] == "MainThread"
        assert (origin["stack"][0]["file"], origin["stack"][0]["line"]) == (fixture, line)
    assert f"thread started at {fixture}:{line} in " in text
