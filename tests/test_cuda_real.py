"""Real-CUDA programs through ``raceguard check``: run on a machine with a CUDA device, skip cleanly
otherwise.

Nothing in this file has run on real hardware yet (the development machine has no GPU; see
``docs/cuda.md``). The fixtures under ``fixtures/cuda/`` follow the conventions of
``fixtures/README.md``; a race fixture's expected finding must be in the report with the two
marked lines as the innermost user frames of its accesses, at least one of them on a CUDA stream
timeline. The last test is the opposite case and runs only *without* CUDA: a program that needs
CUDA fails on its own, and raceguard adds nothing but its summary line.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_cli_targets import raceguard_frames

ROOT = Path(__file__).resolve().parent.parent
CUDA_FIXTURES = ROOT / "fixtures" / "cuda"
HAS_CUDA = torch.cuda.is_available()

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")


def _header(path: Path, key: str) -> str | None:
    for line in path.read_text().splitlines():
        m = re.match(rf"#\s*{key}:\s*(.*)$", line)
        if m:
            return m.group(1).strip()
    return None


def _markers(path: Path) -> dict[str, int]:
    found = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        m = re.search(r"#\s*RACE:\s*([AB])\b", line)
        if m:
            found[m.group(1)] = number
    return found


def _innermost_user_line(access: dict, path: Path) -> int | None:
    n_user = access.get("user_frames", len(access["stack"]))
    for frame in access["stack"][:n_user]:
        if Path(frame["file"]).name == path.name:
            return frame["line"]
    return None


def run_check(path: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    from raceguard.report.document import validate_report

    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "raceguard", "check", "--format", "json", "--output", str(out), str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.exists(), f"no report written; stderr:\n{proc.stderr}"
    report = json.loads(out.read_text())
    validate_report(report)
    return proc, report


RACES = sorted((CUDA_FIXTURES / "races").glob("*.py"))
CLEAN = sorted((CUDA_FIXTURES / "clean").glob("*.py"))


@needs_cuda
@pytest.mark.parametrize("path", RACES, ids=lambda p: p.stem)
def test_cuda_race_fixture_reports_the_exact_race(path: Path, tmp_path: Path) -> None:
    expect = _header(path, "expect")
    kind, _, resource = expect.partition(" ")
    markers = _markers(path)
    assert set(markers) == {"A", "B"}
    proc, report = run_check(path, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert report["target_exit_code"] == 0
    findings = report["findings"]
    lines = {markers["A"], markers["B"]}
    matching = [
        f
        for f in findings
        if f["kind"] == kind
        and (f["resource"] == resource or resource in f.get("details", {}).get("also_on", []))
        and {_innermost_user_line(a, path) for a in f["accesses"]} == lines
    ]
    assert matching, json.dumps(findings, indent=1)
    finding = matching[0]
    assert any(a["timeline"].startswith("cuda:") for a in finding["accesses"])
    assert "write" in {a["mode"] for a in finding["accesses"]}
    timelines = _header(path, "expect-timelines")
    if timelines:
        seen = {a["timeline"] for f in findings for a in f["accesses"]}
        assert _split_timelines(timelines) <= seen, sorted(seen)


def _split_timelines(text: str) -> set[str]:
    """'cuda:0/stream 0 cuda:0/stream 1 thread:request' -> the three timeline names."""
    return set(re.findall(r"cuda:\d+/stream \d+|thread:\S+", text))


@needs_cuda
@pytest.mark.parametrize("path", CLEAN, ids=lambda p: p.stem)
def test_cuda_clean_fixture_has_no_findings(path: Path, tmp_path: Path) -> None:
    assert _header(path, "expect") == "clean"
    proc, report = run_check(path, tmp_path)
    assert report["findings"] == [], "\n".join(f["message"] for f in report["findings"])
    assert proc.returncode == 0, proc.stderr


def test_cuda_fixtures_are_well_formed() -> None:
    """Runs everywhere: headers and markers the GPU tests rely on, and valid Python."""
    assert RACES and CLEAN
    for path in RACES:
        kind, _, resource = (_header(path, "expect") or "").partition(" ")
        assert kind == "data-race" and resource, path
        assert set(_markers(path)) == {"A", "B"}, path
        compile(path.read_text(), str(path), "exec")
    for path in CLEAN + [CUDA_FIXTURES / "targets" / "needs_cuda.py"]:
        assert path.name == "needs_cuda.py" or _header(path, "expect") == "clean", path
        assert not _markers(path), path
        compile(path.read_text(), str(path), "exec")
    assert _split_timelines("cuda:0/stream 0 cuda:0/stream 1 thread:request") == {
        "cuda:0/stream 0",
        "cuda:0/stream 1",
        "thread:request",
    }


@needs_cuda
def test_install_activates_when_cuda_initialises() -> None:
    """In process: install() does not initialise CUDA; the first CUDA op activates the tracker,
    and torch's gpu trace callbacks reach it."""
    from raceguard.cuda import tracker as cuda
    from raceguard.capture.session import Session

    session = Session(lambda event: None)
    tracker = cuda.install(session)
    try:
        assert tracker is not None
        x = torch.ones(4, device="cuda")
        assert session.cuda is tracker
        side = torch.cuda.Stream()
        event = torch.cuda.Event()
        event.record(side)
        assert event.cuda_event in tracker.model.events
        x.record_stream(side)
        assert tracker.memory.blocks[x.untyped_storage().data_ptr()].users == [tracker._stream_of(side)]
    finally:
        cuda.uninstall(session)
    assert session.cuda is None


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour on a machine without CUDA")
def test_check_of_a_cuda_program_without_cuda_lets_the_target_fail_on_its_own(tmp_path: Path) -> None:
    path = CUDA_FIXTURES / "targets" / "needs_cuda.py"
    proc, report = run_check(path, tmp_path)
    assert proc.returncode == 3  # the target failed and no finding explains it
    assert report["status"] == "clean" and report["findings"] == []
    assert report["target_exit_code"] == 1
    outcome = report["target_outcome"]
    assert outcome["kind"] == "exception"
    assert "CUDA" in outcome["detail"] or "NVIDIA" in outcome["detail"]
    # stderr: exactly what plain python prints (torch warnings, the traceback), then raceguard's
    # one summary line; nothing else.
    plain = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert lines[:-1] == plain.stderr.strip().splitlines()
    assert f'File "{path}", line 4, in <module>' in proc.stderr
    assert lines[-1].startswith("raceguard: clean — no findings")
    assert f"target raised {outcome['detail']}" in lines[-1]
    assert "needs CUDA, which this machine does not have" in lines[-1]
    assert raceguard_frames(lines[:-1]) == []
    assert proc.stdout == ""
