"""Processes of one run in one happens-before, through the public CLI: Hogwild (fork and spawn),
an A3C shared Adam, a DataLoader worker writing shared memory, and their clean twins (a
multiprocessing Lock around every step, a parameter server over queues, the ordinary DataLoader,
queue and process-pool hand-offs). Each race names the resource, both lines and both processes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from raceguard.report.document import validate_report

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "multiprocess"


def _check(tmp_path: Path, fixture: Path, timeout: float = 240) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "raceguard", "check", "--format", "json", "--output", str(out), str(fixture)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.exists(), f"no report written; stderr:\n{proc.stderr}"
    report = json.loads(out.read_text())
    validate_report(report)
    return proc, report


def _expected(fixture: Path) -> str:
    return re.search(r"^# expect: (.*)$", fixture.read_text(), re.M).group(1).strip()


def _markers(fixture: Path) -> set[int]:
    return {n for n, line in enumerate(fixture.read_text().splitlines(), 1) if re.search(r"#\s*RACE:\s*[AB]\b", line)}


def _fixtures(kind: str) -> list[str]:
    return sorted(p.name for p in FIXTURES.glob("*.py") if _expected(p).startswith(kind))


@pytest.mark.parametrize("name", _fixtures("data-race"))
def test_race_across_processes_names_both_lines_and_both_processes(tmp_path, name):
    fixture = FIXTURES / name
    resource = _expected(fixture).removeprefix("data-race ").strip()
    proc, report = _check(tmp_path, fixture)
    assert proc.returncode == 1, proc.stderr
    races = [f for f in report["findings"] if f["kind"] == "data-race" and f["resource"] == resource]
    assert races, [f["resource"] for f in report["findings"]]
    wanted = _markers(fixture)

    def lines(race: dict) -> set[int]:
        return {a["stack"][0]["line"] for a in race["accesses"] if a["stack"][0]["file"].endswith(name)}

    race = next((r for r in races if lines(r) == wanted), None)
    assert race is not None, [r["accesses"] for r in races]
    processes = [a.get("process") or "main process" for a in race["accesses"]]
    assert len(set(processes)) == 2, processes  # two processes, each named
    assert "across processes" in race["message"]
    assert "mp.Lock" in race["hint"] and "raceguard.benign" in race["hint"]


@pytest.mark.parametrize("name", _fixtures("clean"))
def test_ordered_hand_offs_between_processes_are_clean(tmp_path, name):
    proc, report = _check(tmp_path, FIXTURES / name)
    assert report["findings"] == [], [f["message"] for f in report["findings"]]
    assert proc.returncode == 0, proc.stderr


def test_forked_children_count_in_the_statistics(tmp_path):
    # Two fork-started workers end with os._exit: their statistics arrive before it.
    proc, report = _check(tmp_path, FIXTURES / "hogwild_fork_locked.py")
    stats = report["stats"]
    assert stats["processes"] == 3, stats
    assert stats["threads"] >= 3, stats
    # Each worker runs 3 steps of forward (addmm), a sum, a multiply and sub_: more than the
    # parent's own ops alone.
    _, alone = _check(tmp_path, FIXTURES / "queue_same_process.py")
    assert stats["ops"] > alone["stats"]["ops"] + 2 * 3 * 3, (stats, alone["stats"])
