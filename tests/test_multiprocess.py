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
    # Every fixture says what it expects; the glob below covers all of them.
    return sorted(p.name for p in FIXTURES.glob("*.py") if _expected(p).startswith(kind))


@pytest.mark.parametrize("name", _fixtures("data-race"))
def test_race_across_processes_names_both_lines_and_both_processes(tmp_path, name):
    fixture = FIXTURES / name
    resource = _expected(fixture).removeprefix("data-race ").strip()
    proc, report = _check(tmp_path, fixture)
    assert proc.returncode == 1, proc.stderr
    # Named after the first resource the two lines race on, the others listed in also_on.
    races = [
        f
        for f in report["findings"]
        if f["kind"] == "data-race" and resource in [f["resource"], *f["details"].get("also_on", [])]
    ]
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


def test_failing_cross_process_hooks_leave_the_target_unchanged(tmp_path):
    target = ROOT / "fixtures" / "faults" / "multiprocess_inject.py"
    plain = subprocess.run([sys.executable, str(target)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    proc, report = _check(tmp_path, target)
    assert proc.stdout == plain.stdout
    assert proc.returncode == 0, proc.stderr
    assert report["findings"] == [], [f["message"] for f in report["findings"]]
    # The lock's order was lost: what the supervisor found across processes is kept, suppressed.
    assert report.get("suppressed") and all("unreliable" in f["suppressed"] for f in report["suppressed"]), report
    lost = report["incomplete"]
    assert lost["internal_errors"] >= 2
    assert any("InjectedFault" in e["message"] for e in lost["errors"])
    assert 'File "' not in "\n".join(l for l in proc.stderr.splitlines() if not l.startswith("raceguard"))


def _record(conn, timeline, epoch, clock, write, line, lo=0, hi=16):
    from raceguard.multiprocess.crosscheck import _Record

    site = {
        "thread": "MainThread",
        "timeline": "thread:MainThread",
        "mode": "write" if write else "read",
        "op": "aten::add_",
        "locks_held": [],
        "stack": [{"file": "t.py", "line": line, "function": "f"}],
    }
    event = {"lo": lo, "hi": hi, "w": write, "t": timeline, "e": epoch, "c": epoch}
    return _Record(conn, event, clock, site, {"name": "w", "kind": "tensor", "root": "w"})


def _races(*records):
    from raceguard.multiprocess.crosscheck import CrossProcessCheck

    check = CrossProcessCheck()
    for r in records:
        check.pids[r.conn] = 100 + r.conn
        check.by_storage.setdefault("fd:1:2", []).append(r)
    return check.races()


def test_cross_check_orders_by_clocks_in_both_directions_whatever_the_arrival_order():
    # Process 1 writes at epoch 1, releases (its clock reaches process 2 at epoch 2), then
    # process 2 reads: ordered, whichever record arrived first at the supervisor.
    write = _record(1, "101:0", 1, {"101:0": 1}, True, 10)
    read = _record(2, "102:0", 2, {"101:0": 1, "102:0": 2}, False, 20)
    assert _races(write, read) == [] and _races(read, write) == []
    # Without the hand-off, the same two accesses race, in either order.
    unordered = _record(2, "102:0", 2, {"102:0": 2}, False, 20)
    assert len(_races(write, unordered)) == 1 and len(_races(unordered, write)) == 1
    # Reads never race with reads; disjoint bytes never race.
    other_read = _record(1, "101:0", 1, {"101:0": 1}, False, 11)
    assert _races(other_read, unordered) == []
    disjoint = _record(2, "102:0", 2, {"102:0": 2}, True, 21, lo=16, hi=32)
    assert _races(write, disjoint) == []


def test_cross_check_finds_the_racing_range_among_ordered_records():
    # Process 1 writes at epochs 1..5; process 2 had seen up to epoch 3 when it read, and process
    # 1's records from epoch 5 on had seen that read: epoch 4 is the race.
    writes = [_record(1, "101:0", e, {"101:0": e, "102:0": 7 if e >= 5 else 0}, True, 10 + e) for e in range(1, 6)]
    read = _record(2, "102:0", 7, {"101:0": 3, "102:0": 7}, False, 30)
    races = _races(*writes, read)
    assert [(a.epoch, b.epoch) for a, b, _ in races] in ([(7, 4)], [(4, 7)]), [(a.epoch, b.epoch) for a, b, _ in races]


def test_hogwild_races_are_accepted_with_a_baseline(tmp_path):
    # Fingerprints leave pids out: the races of one run match those of the next.
    fixture = str(FIXTURES / "hogwild_spawn.py")
    baseline = tmp_path / "baseline.json"
    first = subprocess.run(
        [sys.executable, "-m", "raceguard", "check", "--write-baseline", str(baseline), fixture],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert first.returncode == 0 and baseline.exists(), first.stderr
    again = subprocess.run(
        [sys.executable, "-m", "raceguard", "check", "--baseline", str(baseline), fixture],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert again.returncode == 0, again.stderr
    assert "suppressed" in again.stderr.splitlines()[-1], again.stderr
