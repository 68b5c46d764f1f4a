"""Every fixture program through the public CLI: exact finding for races, zero findings for clean.

A race fixture declares ``# expect: data-race <resource>`` and marks its two racing lines with
``# RACE: A`` / ``# RACE: B``; the report must contain a data-race finding on that resource whose
two accesses have exactly those lines as their innermost user frames (in either order: which
thread comes first in real time varies). An access made entirely in library code run as a
submitted task (``pool.submit(torch.save, ...)``) has no user frame: its line is the submitting
one, its origin. ``# ORIGIN: A`` / ``# ORIGIN: B`` mark where the thread of that side was
started or its task submitted: the access's ``origin`` must name that line.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from raceguard.report.document import validate_report
from raceguard.report.finding import Finding
from raceguard.report.text import render_finding_text

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
# A backstop against raceguard itself hanging, not a time limit: the fixtures end in seconds, and
# those that could run on (deadlocks) get raceguard's own --timeout. Under load (two shared cores,
# pytest -n 2) one check can take minutes, so the guard is far above any expected run.
HANG_GUARD_SECONDS = 900


def _expectation(path: Path) -> tuple[str, str | None]:
    for line in path.read_text().splitlines():
        m = re.match(r"#\s*expect:\s*(\S+)(?:\s+(.*))?$", line)
        if m:
            return m.group(1), (m.group(2) or "").strip() or None
    raise AssertionError(f"{path} has no '# expect:' header")


def _markers(path: Path, label: str = "RACE") -> dict[str, int]:
    found = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        m = re.search(rf"#.*\b{label}:\s*([AB])\b", line)
        if m:
            found[m.group(1)] = number
    return found


def run_check(
    path: Path, tmp_path: Path, *extra: str, env: dict | None = None
) -> tuple[subprocess.CompletedProcess, dict]:
    """``raceguard check [EXTRA...] PATH``: EXTRA may end with a launcher script and its
    arguments (tests/data/on_default_device.py DEVICE), which then runs PATH."""
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "raceguard", "check", "--format", "json", "--output", str(out), *extra, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_SECONDS,
        env=env,
    )
    assert out.exists(), f"no report written; stderr:\n{proc.stderr}"
    report = json.loads(out.read_text())
    validate_report(report)
    return proc, report


def _user_line_of(stack_owner: dict, path: Path) -> int | None:
    """The innermost frame of ``path`` among the user frames of an access or an origin."""
    n_user = stack_owner.get("user_frames", len(stack_owner["stack"]))
    for frame in stack_owner["stack"][:n_user]:
        if Path(frame["file"]).name == path.name:
            return frame["line"]
    return None


def _innermost_user_line(access: dict, path: Path) -> int | None:
    if access.get("user_frames", len(access["stack"])) == 0 and access.get("origin"):
        return _user_line_of(access["origin"], path)  # all library code: the submitting line
    return _user_line_of(access, path)


def _origin_line(access: dict, path: Path) -> int | None:
    origin = access.get("origin")
    return _user_line_of(origin, path) if origin else None


RACE_FIXTURES = sorted((FIXTURES / "races").glob("*.py"))
CLEAN_FIXTURES = sorted((FIXTURES / "clean").glob("*.py"))


@pytest.mark.parametrize("path", RACE_FIXTURES, ids=lambda p: p.stem)
def test_race_fixture_reports_the_exact_race(path: Path, tmp_path: Path) -> None:
    kind, resource = _expectation(path)
    markers = _markers(path)
    assert set(markers) == {"A", "B"}, f"{path.name} must mark both racing lines"
    proc, report = run_check(path, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert report["status"] == "findings"
    assert report["target_exit_code"] == 0
    findings = report["findings"]
    assert all(f["kind"] == "data-race" for f in findings), [f["message"] for f in findings]
    expected_lines = {markers["A"], markers["B"]}
    matching = [
        f
        for f in findings
        if f["kind"] == kind
        and (f["resource"] == resource or resource in f.get("details", {}).get("also_on", []))
        and {_innermost_user_line(a, path) for a in f["accesses"]} == expected_lines
    ]
    assert matching, (
        f"expected {kind} on {resource} between lines {sorted(expected_lines)}; got:\n"
        + "\n".join(
            f"  {f['resource']} lines {[_innermost_user_line(a, path) for a in f['accesses']]} "
            f"also_on={f.get('details', {}).get('also_on')}"
            for f in findings
        )
    )
    finding = matching[0]
    for side, line in _markers(path, "ORIGIN").items():
        access = next(a for a in finding["accesses"] if _innermost_user_line(a, path) == markers[side])
        assert _origin_line(access, path) == line, (side, access.get("origin"))
        # The text report renders the same JSON: it says where (and which verb) too.
        text = render_finding_text(Finding.from_dict(finding))
        verb = {"thread-start": "thread started", "task-submit": "task submitted"}[access["origin"]["kind"]]
        assert f"{verb} at {path.relative_to(ROOT).as_posix()}:{line} " in text, text
    modes = {a["mode"] for a in finding["accesses"]}
    assert "write" in modes
    assert len({a["thread"] for a in finding["accesses"]}) == 2
    # Text report on stderr names the resource too (summary always printed).
    assert "finding" in proc.stderr


@pytest.mark.parametrize("path", CLEAN_FIXTURES, ids=lambda p: p.stem)
def test_clean_fixture_has_no_findings(path: Path, tmp_path: Path) -> None:
    kind, _ = _expectation(path)
    assert kind == "clean"
    proc, report = run_check(path, tmp_path)
    assert report["findings"] == [], "\n".join(f["message"] for f in report["findings"])
    assert report["status"] == "clean"
    assert proc.returncode == 0, proc.stderr
    assert report["stats"]["ops"] > 0
