"""Multi-process jobs through the public CLI, on CPU with gloo and a world of two: torchrun
(``raceguard check -m torch.distributed.run --nproc-per-node 2 FIXTURE``) and
``torch.multiprocessing.spawn``. The workers are checked and stream to one report; each access
says its rank; the same bug on both ranks is one finding listing both."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from raceguard.report.document import validate_report

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover - torch built without distributed
    pytest.skip("torch.distributed is not available", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "distributed"
TORCHRUN = ("-m", "torch.distributed.run", "--nproc-per-node", "2")


def _check(tmp_path: Path, *argv: str, options: tuple = (), timeout: float = 240) -> tuple[subprocess.CompletedProcess, dict]:
    """``raceguard check`` of ``argv``. Run again, once, when a worker died the way torch
    2.13.0+cpu itself kills processes now and then at exit ("terminate called without an active
    exception", SIGABRT): a torchrun worker of ``ddp_checkpoint_locked.py`` did so once while the
    whole suite ran on 2 busy cores, and torchrun's workers run the Python mode, which loads no
    native code. Any other death, or that one twice, stays a failure."""
    out = tmp_path / "report.json"
    for attempt in range(2):
        proc = subprocess.run(
            [sys.executable, "-m", "raceguard", "check", "--format", "json", "--output", str(out), *options, *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        torch_abort = "terminate called without an active exception" in proc.stderr and "SIGABRT" in proc.stderr
        if not torch_abort or attempt == 1:
            break
    assert out.exists(), f"no report written; stderr:\n{proc.stderr}"
    report = json.loads(out.read_text())
    validate_report(report)
    return proc, report


def _markers(path: Path) -> set[int]:
    return {n for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"#\s*RACE:\s*[AB]\b", line)}


def _the_race(report: dict, fixture: Path, resource: str) -> dict:
    races = [f for f in report["findings"] if f["kind"] == "data-race"]
    assert [f["resource"] for f in races] == [resource], report["findings"]
    race = races[0]
    lines = {a["stack"][0]["line"] for a in race["accesses"] if a["stack"][0]["file"].endswith(fixture.name)}
    assert lines == _markers(fixture), race["accesses"]
    return race


def test_torchrun_async_all_reduce_before_wait_is_one_finding_on_both_ranks(tmp_path):
    fixture = FIXTURES / "async_allreduce_before_wait.py"
    proc, report = _check(tmp_path, *TORCHRUN, str(fixture))
    assert proc.returncode == 1, proc.stderr
    race = _the_race(report, fixture, "model.weight.grad")
    assert race["details"]["processes"] == ["rank 0", "rank 1"]
    timelines = sorted(a["timeline"] for a in race["accesses"])
    assert timelines == ["collective:default", "thread:MainThread"]
    assert {a["process"] for a in race["accesses"]} <= {"rank 0", "rank 1"}
    assert report["stats"]["processes"] == 3  # torchrun's launcher and two workers


def test_torchrun_async_all_reduce_waited_first_is_clean(tmp_path):
    proc, report = _check(tmp_path, *TORCHRUN, str(FIXTURES / "async_allreduce_wait_first.py"))
    assert (proc.returncode, report["findings"]) == (0, []), proc.stderr
    assert report["stats"]["processes"] == 3


def test_torchrun_ddp_with_a_checkpoint_thread_races_on_rank_0(tmp_path):
    fixture = FIXTURES / "ddp_checkpoint_thread.py"
    proc, report = _check(tmp_path, *TORCHRUN, str(fixture))
    race = _the_race(report, fixture, "model.fc1.weight")
    assert race["details"]["processes"] == ["rank 0"]
    assert {a["process"] for a in race["accesses"]} == {"rank 0"}
    assert {a["thread"] for a in race["accesses"]} == {"checkpointer", "MainThread"}


def test_torchrun_ddp_with_a_locked_checkpoint_thread_is_clean(tmp_path):
    proc, report = _check(tmp_path, *TORCHRUN, str(FIXTURES / "ddp_checkpoint_locked.py"))
    assert (proc.returncode, report["findings"]) == (0, []), proc.stderr


def test_torch_multiprocessing_spawn_workers_are_checked(tmp_path):
    fixture = FIXTURES / "spawn_async_allreduce.py"
    proc, report = _check(tmp_path, str(fixture))
    race = _the_race(report, fixture, "model.weight.grad")
    assert race["details"]["processes"] == ["rank 0", "rank 1"]


def test_forkserver_pool_workers_are_checked(tmp_path):
    # The fork server is a checked worker; the pool workers it forks reconnect, stay checked and
    # report a race between their own threads (they used to stop reporting at the fork).
    fixture = FIXTURES / "forkserver_pool_race.py"
    proc, report = _check(tmp_path, str(fixture))
    assert proc.returncode == 1, proc.stderr
    [race] = [f for f in report["findings"] if f["kind"] == "data-race"]
    assert race["resource"].startswith("tensor float32[16] allocated at forkserver_pool_race.py:14")
    assert {a["stack"][0]["line"] for a in race["accesses"]} == _markers(fixture)
    assert {a["thread"] for a in race["accesses"]} == {"bump-0", "bump-1"}
    assert len(race["details"].get("processes", [])) >= 1


def test_no_children_checks_only_the_targets_own_process(tmp_path):
    proc, report = _check(tmp_path, *TORCHRUN, str(FIXTURES / "async_allreduce_before_wait.py"), options=("--no-children",))
    assert (proc.returncode, report["findings"]) == (0, []), proc.stderr
    assert "processes" not in report["stats"]


def test_a_killed_worker_loses_nothing_it_found(tmp_path):
    fixture = FIXTURES / "race_then_killed.py"
    proc, report = _check(tmp_path, *TORCHRUN, str(fixture))
    race = _the_race(report, fixture, "model.weight.grad")
    assert "rank 1" in race["details"]["processes"]
    assert report["target_exit_code"] != 0


def test_timeout_ends_the_whole_tree_and_writes_the_report(tmp_path):
    fixture = FIXTURES / "race_then_hang.py"
    proc, report = _check(tmp_path, *TORCHRUN, str(fixture), options=("--timeout", "20"))
    assert report["target_outcome"]["kind"] == "timeout"
    _the_race(report, fixture, "model.weight.grad")
    left = [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline_has(pid, str(fixture))]
    assert left == []


def _cmdline_has(pid: str, text: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return text.encode() in f.read()
    except OSError:
        return False
