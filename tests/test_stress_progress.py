"""`raceguard stress` on long runs: progress lines when stderr is not a terminal, the --max-time
budget, and schedules that time out reported as one finding with their count."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from raceguard.report.document import validate_report
from raceguard.report.finding import Finding
from raceguard.process.stress import ScheduleResult, StressOptions, _build_report
from raceguard.schedule import failures

ROOT = Path(__file__).resolve().parent.parent
RACEGUARD = [sys.executable, "-m", "raceguard"]
PROGRESS = re.compile(r"^raceguard: stress: (\d+)/(\d+) schedules, (\d+) findings?")


def raceguard(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*RACEGUARD, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def load(path: Path) -> dict:
    data = json.loads(path.read_text())
    validate_report(data)
    return data


def progress_lines(stderr: str) -> list[tuple[int, int, int]]:
    return [tuple(map(int, m.groups())) for m in map(PROGRESS.match, stderr.splitlines()) if m]  # type: ignore[misc]


def test_progress_lines_without_a_terminal_count_schedules_and_findings() -> None:
    proc = raceguard("stress", "--seed", "1", "--schedules", "20", "-j", "2", "--strategy", "random",
                     "fixtures/stress/step_counter.py")
    assert proc.returncode == 1, proc.stderr
    lines = progress_lines(proc.stderr)
    # A line every tenth of the run (or every 30 s while schedules are slow), not one per schedule.
    assert lines and lines[-1][:2] == (20, 20), proc.stderr
    assert len(lines) <= 15, proc.stderr  # 10, and one more per 30 s without a tenth done (a loaded machine)
    assert all(total == 20 for _, total, _ in lines)
    assert [done for done, _, _ in lines] == sorted({done for done, _, _ in lines})
    assert lines[-1][2] >= 1  # the race on the counter was found along the way
    assert re.search(r"^raceguard: stress: 20/20 schedules, \d+ findings? \(\d+ failing schedules?\), "
                     r"[0-9msh ]+ elapsed$", proc.stderr, re.M), proc.stderr
    assert re.match(r"raceguard: \d+ findings? ", proc.stderr.splitlines()[-1]), proc.stderr  # the summary stays last


def test_quiet_prints_no_progress() -> None:
    proc = raceguard("stress", "-q", "--seed", "1", "--schedules", "3", "--strategy", "random",
                     "fixtures/stress/step_counter_locked.py")
    assert proc.returncode == 0, proc.stderr
    assert progress_lines(proc.stderr) == [] and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_max_time_stops_starting_schedules_and_says_so(tmp_path: Path) -> None:
    # A budget spent before the first schedule could start (the fork server alone takes longer):
    # no schedule runs, the report and the summary say why, and that alone fails nothing.
    out = tmp_path / "report.json"
    proc = raceguard("stress", "--seed", "1", "--schedules", "50", "--strategy", "random", "--max-time", "0.001",
                     "--format", "json", "-o", str(out), "fixtures/stress/step_counter.py")
    assert proc.returncode == 0, proc.stderr
    stats = load(out)["stats"]
    assert stats["time_budget_spent"] is True
    assert stats["max_time_seconds"] == 0.001
    assert (stats["schedules_run"], stats["schedules_planned"]) == (0, 50)
    assert "time budget 0.001 s" in proc.stderr.splitlines()[0], proc.stderr  # the header
    assert proc.stderr.rstrip().endswith("; time budget of 0.001 s spent: 0 of 50 schedules run"), proc.stderr


def test_a_run_within_its_budget_says_it_was_not_spent(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = raceguard("stress", "--seed", "1", "--schedules", "3", "--strategy", "random", "--max-time", "10m",
                     "--format", "json", "-o", str(out), "fixtures/stress/step_counter_locked.py")
    assert proc.returncode == 0, proc.stderr
    stats = load(out)["stats"]
    assert (stats["time_budget_spent"], stats["max_time_seconds"], stats["schedules_run"]) == (False, 600, 3)
    assert "time budget" not in proc.stderr.splitlines()[-1]


def test_bad_max_time_is_a_usage_error() -> None:
    proc = raceguard("stress", "--max-time", "soon", "fixtures/stress/step_counter.py", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "soon" in proc.stderr


HANG = """
import os, threading

def spin():
    n = 0
    while True:  # no tensor op, no sync: the scheduler never gets the baton back
        n += 1
        n -= 1
        n += 2
        n -= 2

def spin_elsewhere():
    m = 0
    while True:
        m += 1
        m -= 1

t = threading.Thread(target=spin if os.getpid() % 2 else spin_elsewhere, name="spinner")
t.start()
t.join()
"""


def test_schedules_that_time_out_are_one_finding_with_their_count(tmp_path: Path) -> None:
    target = tmp_path / "spin.py"
    target.write_text(HANG)
    out = tmp_path / "report.json"
    proc = raceguard("stress", "--seed", "1", "--schedules", "4", "-j", "4", "--strategy", "random", "--timeout", "2",
                     "--format", "json", "-o", str(out), str(target))
    assert proc.returncode == 1, proc.stderr
    report = load(out)
    assert [f["kind"] for f in report["findings"]] == ["target-failure"], report["findings"]
    (timeout,) = report["findings"]
    assert timeout["details"]["timed_out_schedules"] == 4
    assert sorted(timeout["details"]["timed_out_seeds"]) == [1, 2, 3, 4]
    assert "did not finish within 2 s in 4 schedules" in timeout["message"]
    assert timeout["reproduce"]["schedule_index"] == 0
    assert {tuple(s["fingerprints"]) for s in report["stats"]["schedules"]} == {(timeout["fingerprint"],)}


def _frame_here():  # two different places a schedule can be stuck at
    return sys._getframe()


def _frame_there():
    return sys._getframe()


def test_the_timeout_fingerprint_does_not_depend_on_where_the_threads_were() -> None:
    here = failures.timeout_failure(60.0, [("MainThread", _frame_here())])
    there = failures.timeout_failure(60.0, [("MainThread", _frame_there()), ("worker", _frame_here())])
    killed = failures.timeout_failure(60.0)  # ended from outside, no stacks
    assert here.fingerprint == there.fingerprint == killed.fingerprint
    assert failures.is_timeout(here) and not failures.is_timeout(failures.crash_failure("SIGSEGV", None))


def _result(index: int, finding: Finding) -> ScheduleResult:
    return ScheduleResult(index=index, seed=100 + index, findings=[finding],
                          outcome={"kind": "timeout", "code": None, "signal": None, "detail": "timed out after 60 s"},
                          exit_code=None, stats={}, internal_errors=[], seconds=60.0)


def test_report_counts_timed_out_schedules_once() -> None:
    options = StressOptions(script="train.py", schedules=10, strategy="random")
    results = {i: _result(i, failures.timeout_failure(60.0, [("MainThread", f())]))
               for i, f in ((2, _frame_here), (5, _frame_there), (7, _frame_here))}
    report = _build_report("stress", options, results, 100, None, 0.0, planned=10)
    (finding,) = report.findings
    assert finding.reproduce.schedule_index == 2
    assert finding.details["timed_out_schedules"] == 3 and finding.details["timed_out_seeds"] == [102, 105, 107]
    assert finding.message.startswith("the target did not finish within 60 s in 3 schedules")


def test_merged_shards_add_up_their_timeouts() -> None:
    from raceguard.process.stress import merge_reports

    shards = []
    for shard, indices in ((1, (0, 2)), (2, (1,))):
        options = StressOptions(script="train.py", schedules=3, strategy="random", shard=(shard, 2))
        results = {i: _result(i, failures.timeout_failure(60.0, [("MainThread", _frame_here())])) for i in indices}
        shards.append(_build_report("stress", options, results, 100, None, 0.0, planned=len(indices)))
    (finding,) = merge_reports(shards).findings
    assert finding.details["timed_out_schedules"] == 3 and finding.details["timed_out_seeds"] == [100, 101, 102]
    assert finding.message == "the target did not finish within 60 s in 3 schedules (the stacks are those of the first, schedule #0)"
