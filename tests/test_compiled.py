"""torch.compile'd programs under raceguard (fixtures/compiled/): they run compiled and finish,
Dynamo never traces raceguard's own code, and compiled graph calls are recorded as accesses.

Compiling costs seconds of CPU (Inductor writes and builds C++), so each program runs once per
test and the fixtures are two-layer models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli_fixtures import FIXTURES, ROOT, _expectation, _innermost_user_line, _markers

from raceguard.report.document import validate_report

COMPILED = FIXTURES / "compiled"
RACES = sorted(p for p in COMPILED.glob("*.py") if _expectation(p)[0] == "data-race")
CLEAN = sorted(p for p in COMPILED.glob("*.py") if _expectation(p)[0] == "clean")
# A cold compile of the training fixture takes ~25 s on two busy cores; the hang this guards
# against never ends.
TIMEOUT = 300


def _check(path: Path, tmp_path: Path, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "raceguard", "check", "--format", "json", "--output", str(out), str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,  # a hang fails here instead of stalling the suite
        env={**os.environ, **(env or {})},
    )
    assert out.exists(), f"no report written; stderr:\n{proc.stderr}"
    report = json.loads(out.read_text())
    validate_report(report)
    return proc, report


def test_fixtures_present() -> None:
    assert RACES and CLEAN


@pytest.mark.parametrize("path", RACES, ids=lambda p: p.stem)
def test_compiled_race_is_reported_with_both_user_lines(path: Path, tmp_path: Path) -> None:
    _, resource = _expectation(path)
    markers = _markers(path)
    proc, report = _check(path, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert report["target_exit_code"] == 0
    expected = {markers["A"], markers["B"]}
    matching = [
        f
        for f in report["findings"]
        if f["kind"] == "data-race"
        and (f["resource"] == resource or resource in f.get("details", {}).get("also_on", []))
        and {_innermost_user_line(a, path) for a in f["accesses"]} == expected
    ]
    assert matching, [(f["resource"], [_innermost_user_line(a, path) for a in f["accesses"]]) for f in report["findings"]]
    assert {a["mode"] for a in matching[0]["accesses"]} >= {"write"}
    assert len({a["thread"] for a in matching[0]["accesses"]}) == 2


@pytest.mark.parametrize("path", CLEAN, ids=lambda p: p.stem)
def test_compiled_training_with_a_lock_is_clean_and_raceguard_is_not_traced(path: Path, tmp_path: Path) -> None:
    # TORCH_LOGS=graph_breaks makes Dynamo log every graph break with the file it broke in.
    proc, report = _check(path, tmp_path, env={"TORCH_LOGS": "graph_breaks"})
    assert report["findings"] == [], [f["message"] for f in report["findings"]]
    assert proc.returncode == 0, proc.stderr
    assert report["target_exit_code"] == 0
    raceguard_dir = str(ROOT / "raceguard")
    # A graph break's log names the file it broke in ("Graph break ... in user code at FILE");
    # its stack trace may also list raceguard's thread bootstrap, which Dynamo never traced.
    traced = [
        line
        for line in proc.stderr.splitlines()
        if ("Graph break" in line and raceguard_dir in line) or "Dynamo does not know how to trace" in line
    ]
    assert not traced, "Dynamo traced raceguard's own code:\n" + "\n".join(traced[:10])


def test_compiled_graph_call_is_recorded_under_watch(tmp_path: Path) -> None:
    """raceguard.watch() around a compiled server racing an eager trainer (in a fresh process:
    compiled graphs and Dynamo's caches outlive a test)."""
    script = tmp_path / "watched.py"
    source = (COMPILED / "compiled_served_while_training.py").read_text()
    imports, body = source.split("torch.manual_seed(0)", 1)
    script.write_text(
        imports
        + "import raceguard\n"
        + "with raceguard.watch() as w:\n"
        + "    torch.manual_seed(0)\n"
        + "".join(f"    {line}\n" if line else "\n" for line in body.splitlines())
        + "print(sorted({r for f in w.findings for r in [f.resource, *f.details.get('also_on', [])]}))\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr
    assert "model.fc1.weight" in proc.stdout.splitlines()[-1], proc.stdout + proc.stderr
