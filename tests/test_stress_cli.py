"""`raceguard stress`, `replay` and `merge` through the public CLI (subprocesses).

Each stress run starts one fork server (one `import torch`, ~2-4 s here) and then forks a child
per schedule, so the tests keep the number of runs small: the bug shapes are searched with
`--stop-on-first` (data races suppressed, so the run stops at the first schedule where the bug
actually *manifests* as a target failure, not at the data race the happens-before engine reports
in every schedule), and the locked counterparts run 30 schedules each (the benchmark and the
README's table run 100).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raceguard.report.document import validate_report

from proc_members import live_members

ROOT = Path(__file__).resolve().parent.parent
STRESS = ROOT / "fixtures" / "stress"
RACEGUARD = [sys.executable, "-m", "raceguard"]
BUG_SHAPES = ["lazy_init", "hotswap_consistency", "step_counter", "publish_before_load"]


def raceguard(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*RACEGUARD, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def load(path: Path) -> dict:
    data = json.loads(path.read_text())
    validate_report(data)
    return data


def kinds(report: dict) -> set[str]:
    return {f["kind"] for f in report["findings"]}


_searches: dict[str, tuple[subprocess.CompletedProcess, dict]] = {}


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory):
    """One `stress --stop-on-first` search per bug shape, shared by the tests that need it."""
    def run(shape: str) -> tuple[subprocess.CompletedProcess, dict]:
        if shape not in _searches:
            d = tmp_path_factory.mktemp(shape)
            supp = d / "suppressions.txt"
            supp.write_text("# let the run stop where the bug manifests\ndata-race:*\n")
            out = d / "report.json"
            proc = raceguard(
                "stress", "--seed", "1", "--stop-on-first", "--suppressions", str(supp),
                "--format", "json", "--output", str(out), f"fixtures/stress/{shape}.py",
            )
            _searches[shape] = (proc, load(out) if out.exists() else {})
        return _searches[shape]

    return run


# -- the bug shapes are found and replayed ------------------------------------------------------
@pytest.mark.parametrize("shape", BUG_SHAPES)
def test_bug_shape_found_within_100_schedules_with_defaults(shape: str, search) -> None:
    proc, report = search(shape)
    assert proc.returncode == 1, proc.stderr
    assert report["command"] == "stress"
    assert "target-failure" in kinds(report), report["findings"]
    first = report["stats"]["first_failure_at"]
    assert first is not None and first < 100
    assert report["stats"]["schedules_run"] <= 100
    failure = next(f for f in report["findings"] if f["kind"] == "target-failure")
    assert failure["reproduce"]["schedule_index"] == first
    assert failure["reproduce"]["seed"] == 1 + first
    command = failure["reproduce"]["command"]
    assert command.startswith(f"raceguard replay --seed {1 + first} --strategy pct --depth 3 --pct-steps ")
    assert command.endswith(f"fixtures/stress/{shape}.py")
    assert "AssertionError" in failure["details"]["traceback"]
    assert "raceguard: stress: seed 1" in proc.stderr


@pytest.mark.parametrize("shape", ["hotswap_consistency", "publish_before_load"])
def test_replay_of_the_reported_seed_fails_the_same_way(shape: str, tmp_path: Path, search) -> None:
    _, report = search(shape)
    failure = next(f for f in report["findings"] if f["kind"] == "target-failure")
    argv = failure["reproduce"]["command"].split()
    assert argv[:2] == ["raceguard", "replay"]
    for attempt in range(2):
        rout = tmp_path / f"replay-{attempt}.json"
        proc = raceguard(*argv[1:-1], "--format", "json", "--output", str(rout), argv[-1])
        assert proc.returncode == 1, proc.stderr
        replayed = load(rout)
        assert replayed["command"] == "replay"
        again = [f for f in replayed["findings"] if f["kind"] == "target-failure"]
        assert [f["fingerprint"] for f in again] == [failure["fingerprint"]]
        assert again[0]["message"] == failure["message"]
        assert again[0]["reproduce"]["command"] == failure["reproduce"]["command"]
        assert replayed["target_outcome"]["kind"] == "exception"
        # The target's own output (its traceback) reaches the terminal under replay.
        assert "AssertionError" in proc.stderr


# Two threads add to a shared tensor without a lock: some schedules lose updates, and the
# assertion's message says how many were counted (so it names the schedule, not just the bug).
# The target prints one line on each stream, which a replay must show once, from its schedule.
LOST_UPDATE = """\
import sys, threading
import torch

total = torch.zeros(1)

def add():
    for _ in range(3):
        seen = total.item()
        total.fill_(seen + 1)

threads = [threading.Thread(target=add) for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("lost-update target ran", flush=True)
print("lost-update target stderr", file=sys.stderr, flush=True)
assert total.item() == 6, f"lost update: {total.item()} counted for 6 additions"
"""


def test_replay_without_pct_steps_shows_the_output_once_and_replays_the_schedule(tmp_path: Path) -> None:
    # `replay` without --pct-steps measures the step estimate with a calibration run first. That
    # run's output is not the target's output under the replayed schedule: the user sees the
    # target run once. And it calibrates like the stress run did (not with the replayed seed),
    # so --seed alone replays the very schedule stress found.
    script = tmp_path / "lost_update.py"
    script.write_text(LOST_UPDATE)
    supp = tmp_path / "suppressions.txt"
    supp.write_text("data-race:*\n")
    found_json, replay_json = tmp_path / "stress.json", tmp_path / "replay.json"
    proc = raceguard("stress", "--seed", "1", "--schedules", "20", "--stop-on-first", "-j", "1",
                     "--suppressions", str(supp), "--format", "json", "-o", str(found_json), str(script))
    assert proc.returncode == 1, proc.stderr
    assert "lost-update target" not in proc.stdout + proc.stderr  # stress keeps the output to itself
    found = load(found_json)
    failure = next(f for f in found["findings"] if f["kind"] == "target-failure")
    assert failure["reproduce"]["seed"] != 1  # a calibration seeded like the schedule would differ
    proc = raceguard("replay", "--seed", str(failure["reproduce"]["seed"]), "--suppressions", str(supp),
                     "--format", "json", "-o", str(replay_json), str(script))
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.count("lost-update target ran") == 1, proc.stdout
    assert proc.stderr.count("lost-update target stderr") == 1, proc.stderr
    assert proc.stderr.count("Traceback (most recent call last)") == 1, proc.stderr  # the replayed schedule's
    replayed = load(replay_json)
    assert replayed["stats"]["pct_steps"] == found["stats"]["pct_steps"]
    again = [f for f in replayed["findings"] if f["kind"] == "target-failure"]
    assert [f["fingerprint"] for f in again] == [failure["fingerprint"]]
    assert again[0]["message"] == failure["message"]  # the same count lost: the same schedule
    assert again[0]["reproduce"]["command"] == failure["reproduce"]["command"]


@pytest.mark.parametrize("shape", BUG_SHAPES)
def test_locked_counterpart_is_clean(shape: str, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = raceguard("stress", "--seed", "3", "--schedules", "30", "--format", "json", "--output", str(out),
                     f"fixtures/stress/{shape}_locked.py")
    assert proc.returncode == 0, proc.stderr
    report = load(out)
    assert report["status"] == "clean" and report["findings"] == []
    assert report["stats"]["schedules_run"] == 30
    assert report["stats"]["first_failure_at"] is None
    assert report["stats"]["watchdog_interventions"] == 0


def test_deadlock_is_reported_not_hung(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    started = time.monotonic()
    proc = raceguard("stress", "--seed", "1", "--schedules", "20", "--stop-on-first", "--strategy", "random",
                     "--format", "json", "--output", str(out), "fixtures/stress/lock_inversion_deadlock.py")
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - started < 120
    report = load(out)
    deadlocks = [f for f in report["findings"] if f["kind"] == "deadlock"]
    assert deadlocks, report["findings"]
    assert {a["thread"] for a in deadlocks[0]["accesses"]} == {"checkpointer", "exporter"}
    assert report["target_outcome"]["kind"] == "deadlock"
    assert deadlocks[0]["reproduce"]["command"].startswith("raceguard replay --seed ")


def test_a_scheduler_failure_in_a_hand_over_abandons_the_schedule_as_raceguards_error(tmp_path: Path) -> None:
    # fixtures/faults/scheduler_handover.py makes Scheduler.block raise halfway through a
    # hand-over (the waiter is marked blocked, no thread chosen yet) in the schedules with an
    # even seed, 10 and 12 here. Those schedules end as raceguard's internal error (incomplete,
    # with the traceback, and a stderr line each), never as the target's failure, deadlock or
    # timeout; the other two run to their end; the program is correct, so the run is clean, exit 0.
    out = tmp_path / "report.json"
    target = "fixtures/faults/scheduler_handover.py"
    proc = raceguard("stress", "--seed", "10", "--schedules", "4", "--strategy", "random", "-j", "2", "--timeout", "20",
                     "--format", "json", "--output", str(out), target, "block", timeout=120)
    report = load(out)
    assert proc.returncode == 0, proc.stderr
    assert report["status"] == "clean" and "error" not in report, report.get("error")
    assert report["findings"] == [] and not report.get("suppressed"), [f["message"] for f in report["findings"]]
    assert report["target_outcome"]["kind"] == "exit" and report["target_exit_code"] == 0
    assert report["stats"]["schedules_run"] == 4
    schedules = report["stats"]["schedules"]
    assert [(s["seed"], s.get("abandoned", False)) for s in schedules] == [(10, True), (11, False), (12, True), (13, False)]
    assert all(s["scheduling_points"] > 40 for s in schedules if not s.get("abandoned"))  # ran to their end
    lost = report["incomplete"]
    assert lost["internal_errors"] == report["stats"]["internal_errors"] == 2
    [error] = lost["errors"]
    assert "(Scheduler.block): InjectedFault(" in error["message"] and "schedule was abandoned" in error["message"]
    assert "in block" in error["traceback"] and "InjectedFault: injected into the scheduler" in error["traceback"]
    lines = proc.stderr.splitlines()
    for index, seed in ((0, 10), (2, 12)):
        assert any(line.startswith(f"raceguard: stress: schedule {index} (seed {seed}) abandoned, raceguard's own error")
                   for line in lines), proc.stderr
    assert len([line for line in lines if line.startswith("raceguard: internal error")]) == 1, proc.stderr
    assert "analysis incomplete" in proc.stderr and "Traceback" not in proc.stderr

    # Every schedule abandoned: nothing was tested, and a clean exit would let CI pass on it.
    proc = raceguard("stress", "--seed", "10", "--schedules", "1", "--strategy", "random", "--timeout", "20",
                     "--format", "json", "--output", str(out), target, "block", timeout=120)
    report = load(out)
    assert proc.returncode == 4, proc.stderr
    assert report["status"] == "error" and "nothing was tested" in report["error"]
    assert report["findings"] == []


def test_line_preemption_finds_a_lost_update_on_plain_python_state(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = raceguard("stress", "--seed", "1", "--schedules", "30", "--stop-on-first", "--preempt", "lines",
                     "--format", "json", "--output", str(out), "fixtures/stress/pure_python_counter.py")
    assert proc.returncode == 1, proc.stderr
    failure = next(f for f in load(out)["findings"] if f["kind"] == "target-failure")
    assert "--preempt lines" in failure["reproduce"]["command"]
    assert "lost update" in failure["message"]


# -- jobs, shards, merge ----------------------------------------------------------------------
def test_jobs_and_shards_and_merge_agree_with_one_unsharded_run(tmp_path: Path) -> None:
    script = "fixtures/stress/step_counter.py"
    common = ["--seed", "5", "--schedules", "12", "--format", "json"]
    whole, one, two, merged = (tmp_path / n for n in ("whole.json", "1.json", "2.json", "merged.json"))
    assert raceguard("stress", *common, "--jobs", "2", "--output", str(whole), script).returncode == 1
    assert raceguard("stress", *common, "--jobs", "1", "--shard", "1/2", "--output", str(one), script).returncode == 1
    assert raceguard("stress", *common, "--jobs", "1", "--shard", "2/2", "--output", str(two), script).returncode == 1
    proc = raceguard("merge", str(one), str(two), "--format", "json", "--output", str(merged))
    assert proc.returncode == 1, proc.stderr
    w, a, b, m = load(whole), load(one), load(two), load(merged)
    assert [s["index"] for s in a["stats"]["schedules"]] == [0, 2, 4, 6, 8, 10]
    assert [s["index"] for s in b["stats"]["schedules"]] == [1, 3, 5, 7, 9, 11]
    assert m["command"] == "merge"
    assert {f["fingerprint"] for f in m["findings"]} == {f["fingerprint"] for f in w["findings"]}
    # Same schedules, same results: schedule i behaves the same whatever the job or shard.
    per_schedule = lambda r: [(s["index"], s["seed"], s["fingerprints"]) for s in r["stats"]["schedules"]]  # noqa: E731
    assert per_schedule(m) == per_schedule(w)
    assert m["stats"]["schedules_run"] == w["stats"]["schedules_run"] == 12
    assert m["stats"]["first_failure_at"] == w["stats"]["first_failure_at"]
    for f in m["findings"]:
        same = next(g for g in w["findings"] if g["fingerprint"] == f["fingerprint"])
        assert f["reproduce"] == same["reproduce"]
    assert w["stats"]["pct_steps"] == a["stats"]["pct_steps"] == b["stats"]["pct_steps"]


def test_merge_junit_has_one_testcase_per_schedule(tmp_path: Path) -> None:
    reports = []
    for i, fps in enumerate((["0123456789abcdef"], [])):
        report = {
            "version": 1, "tool": {"name": "raceguard", "version": "0.1.0"}, "command": "stress",
            "target": ["x.py"], "status": "findings" if fps else "clean", "target_exit_code": 0,
            "findings": [{
                "kind": "target-failure", "severity": "error", "fingerprint": fps[0], "message": "boom",
                "resource": "thread 'MainThread'", "resource_kind": "thread", "accesses": [],
                "reproduce": {"seed": 10 + i, "schedule_index": i, "command": f"raceguard replay --seed {10 + i} x.py"},
            }] if fps else [],
            "stats": {"threads": 2, "ops": 5, "schedules_run": 1, "first_failure_at": i if fps else None,
                      "wall_seconds": 1.0, "schedules": [{"index": i, "seed": 10 + i, "fingerprints": fps}]},
        }
        path = tmp_path / f"r{i}.json"
        path.write_text(json.dumps(report))
        reports.append(str(path))
    proc = raceguard("merge", *reports, "--format", "junit", "-o", "-")
    assert proc.returncode == 1
    assert proc.stdout.count("<testcase") == 2 and proc.stdout.count("<failure") == 1


# -- stop-on-first, Ctrl-C, -m ----------------------------------------------------------------
def test_stop_on_first_stops_early(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = raceguard("stress", "--seed", "1", "--schedules", "100", "--stop-on-first", "--jobs", "2",
                     "--format", "json", "--output", str(out), "fixtures/stress/step_counter.py")
    assert proc.returncode == 1, proc.stderr
    stats = load(out)["stats"]
    assert stats["first_failure_at"] is not None
    # Schedules below the first failure all ran; at most the other job's schedule ran past it.
    assert stats["schedules_run"] <= stats["first_failure_at"] + 2
    assert [s["index"] for s in stats["schedules"]][: stats["first_failure_at"] + 1] == list(range(stats["first_failure_at"] + 1))


def _session_members(sid: int) -> list[str]:
    # The fork server and each schedule have process groups of their own: the session has them all.
    return live_members(sid, of="session")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="lists the session's processes through /proc")
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_ends_every_schedule_and_writes_the_findings_so_far(tmp_path: Path, how: str) -> None:
    """Ctrl-C from a terminal (SIGINT to the foreground group) or SIGTERM to raceguard alone (a
    CI job cancelled, timeout(1)) while a schedule runs: the report, written atomically, has the
    finished schedule's findings and the running one's so far; neither that schedule nor the
    fork server is left running; the summary says so, and no raceguard traceback."""
    out = tmp_path / "report.json"
    marker = tmp_path / "runs"  # one line per run of the fixture; from the second on, runs wait 60 s
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(
            [*RACEGUARD, "stress", "--seed", "1", "--schedules", "1000", "--jobs", "1", "--strategy", "random",
             "--format", "json", "--output", str(out), "fixtures/targets/race_then_wait.py", str(marker)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        # With --jobs 1, schedule 1 starts once schedule 0's result is in: it raced, then waits.
        while not (marker.exists() and len(marker.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()
            time.sleep(0.05)
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        stopped = time.monotonic()
        proc.wait(timeout=30)
        assert time.monotonic() - stopped < 10
        deadline = time.monotonic() + 10
        while _session_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _session_members(proc.pid) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == 1, stderr
    report = load(out)
    assert not list(tmp_path.glob(".report.json.*"))  # written atomically: no temporary left
    outcome = report["target_outcome"]
    assert outcome["kind"] == "interrupted" and outcome["signal"] == (None if how == "ctrl-c" else "SIGTERM")
    assert [f["kind"] for f in report["findings"]] == ["data-race"]
    race = report["findings"][0]
    assert race["reproduce"]["schedule_index"] == 0
    # Schedule 0 finished; schedule 1 was cut short, and what it had found is kept.
    schedules = report["stats"]["schedules"]
    assert [(s["index"], s["fingerprints"], s.get("interrupted", False)) for s in schedules] == [
        (0, [race["fingerprint"]], False), (1, [race["fingerprint"]], True)]
    assert "Traceback" not in stderr, stderr
    summary = f"interrupted ({'Ctrl-C' if how == 'ctrl-c' else 'SIGTERM'})"
    assert stderr.splitlines()[-1].startswith("raceguard: 1 finding") and stderr.rstrip().endswith(summary), stderr


def test_module_target(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = raceguard("stress", "--seed", "2", "--schedules", "3", "--format", "json", "--output", str(out),
                     "-m", "step_counter_locked", cwd=STRESS)
    assert proc.returncode == 0, proc.stderr
    report = load(out)
    assert report["target"] == ["-m", "step_counter_locked"]
    assert report["stats"]["schedules_run"] == 3


# -- usage errors -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["stress"],
        ["stress", "fixtures/stress/does_not_exist.py"],
        ["stress", "--shard", "3/2", "fixtures/stress/step_counter.py"],
        ["stress", "--shard", "x", "fixtures/stress/step_counter.py"],
        ["stress", "--strategy", "dfs", "fixtures/stress/step_counter.py"],
        ["stress", "--schedules", "0", "fixtures/stress/step_counter.py"],
        ["stress", "-m", "raceguard_no_such_module"],
        ["replay", "fixtures/stress/step_counter.py"],
        ["replay", "--seed", "1"],
        ["merge"],
        ["merge", "fixtures/stress/step_counter.py"],
        ["merge", "no-such-report.json"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    proc = raceguard(*args, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
