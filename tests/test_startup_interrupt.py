"""Ctrl-C (or SIGTERM) while raceguard is still starting the target, i.e. while the target's
process imports torch: one line, "interrupted before the target started", no traceback, exit
130 (143 for SIGTERM), nothing left running, and a requested report that says so instead of
calling the run clean.

The signal is sent once the process that will run the target has torch's library mapped (its
``import torch`` is under way: the target's first line is still more than a second away), so the
moment is the same on every run without a test hook in raceguard.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raceguard.report.document import validate_report

from proc_members import live_members

ROOT = Path(__file__).resolve().parent.parent
RACEGUARD = [sys.executable, "-m", "raceguard"]
TARGET = "fixtures/races/inplace_counter.py"

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="watches the target's process through /proc")


def _importing_torch(session: int, marker: str) -> bool:
    """Whether a process of ``session`` whose command line has ``marker`` has libtorch mapped."""
    for member in live_members(session, of="session"):
        pid, _, cmdline = member.partition(" ")
        if marker not in cmdline:
            continue
        try:
            if "libtorch" in Path(f"/proc/{pid}/maps").read_text():
                return True
        except OSError:
            continue
    return False


def interrupt_during_startup(args: list[str], marker: str, sig: int, whole_group: bool, tmp_path: Path):
    """Run raceguard with ``args`` and send ``sig`` while the process marked ``marker`` imports
    torch. On a loaded machine this test can see libtorch mapped only once the target has started
    (the signal then lands in the run, which ends as an ordinary interruption): such a try says
    nothing about start-up, and it is made again (5 tries at most)."""
    for _ in range(5):
        code, stdout, stderr = _interrupt_once(args, marker, sig, whole_group, tmp_path)
        if "before the target started" in stderr or not re.search(r"; interrupted \((Ctrl-C|SIGTERM)\)\n$", stderr):
            break
    return code, stdout, stderr


# Started first on PYTHONPATH of the processes under test: torch's import pauses at torch.nn (after
# libtorch is loaded) for a few seconds, so the signal lands during start-up even on a loaded
# machine where this test notices libtorch late. The test's own harness, not a hook in raceguard.
SLOW_TORCH_IMPORT = """
import sys, time
class _SlowTorchImport:
    done = False
    def find_spec(self, name, path=None, target=None):
        if name == "torch.nn" and not _SlowTorchImport.done:
            _SlowTorchImport.done = True
            time.sleep(3)
        return None
sys.meta_path.insert(0, _SlowTorchImport())
"""


def _as_from_a_terminal() -> None:
    """raceguard starts as a terminal starts it: SIGINT neither blocked nor ignored. A test
    runner's worker can hand its children either (a background job ignores SIGINT; a blocked
    mask was seen in a full-suite run), and then a Ctrl-C would reach no one, under plain python too."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_once(args: list[str], marker: str, sig: int, whole_group: bool, tmp_path: Path):
    slow = tmp_path / "slow_torch_import"
    slow.mkdir(exist_ok=True)
    (slow / "sitecustomize.py").write_text(SLOW_TORCH_IMPORT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(slow), os.environ.get("PYTHONPATH")]))}
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([*RACEGUARD, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True, env=env, preexec_fn=_as_from_a_terminal)
    try:
        deadline = time.monotonic() + 60
        while not _importing_torch(proc.pid, marker):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()
            time.sleep(0.005)
        if whole_group:  # a terminal's Ctrl-C: every process of the foreground group
            os.killpg(proc.pid, sig)
        else:  # to raceguard alone (a CI job cancelled, kill)
            os.kill(proc.pid, sig)
        stdout, _ = proc.communicate(timeout=30)
        deadline = time.monotonic() + 10
        while live_members(proc.pid, of="session") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live_members(proc.pid, of="session") == []  # nothing left running
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, stdout, (tmp_path / "stderr").read_text()


def test_ctrl_c_while_the_target_process_imports_torch(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    code, stdout, stderr = interrupt_during_startup(
        ["check", "--format", "json", "-o", str(out), TARGET], "process.child", signal.SIGINT, True, tmp_path)
    assert (code, stdout, stderr) == (130, "", "raceguard: interrupted before the target started\n")
    report = json.loads(out.read_text())
    validate_report(report)
    assert report["target_outcome"] == {"kind": "interrupted", "code": None, "signal": None,
                                        "detail": "interrupted before the target started"}
    assert report["findings"] == [] and report["stats"]["threads"] == 0


def test_text_report_of_a_start_up_interrupted_is_one_line(tmp_path: Path) -> None:
    code, _, stderr = interrupt_during_startup(["check", TARGET], "process.child", signal.SIGINT, True, tmp_path)
    assert (code, stderr) == (130, "raceguard: interrupted before the target started\n")


def test_sigterm_to_raceguard_while_the_target_process_imports_torch(tmp_path: Path) -> None:
    code, _, stderr = interrupt_during_startup(["check", TARGET], "process.child", signal.SIGTERM, False, tmp_path)
    assert (code, stderr) == (143, "raceguard: interrupted before the target started (SIGTERM)\n")


def test_ctrl_c_while_the_stress_fork_server_imports_torch(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    code, _, stderr = interrupt_during_startup(
        ["stress", "-q", "--seed", "1", "--schedules", "5", "--format", "json", "-o", str(out),
         "fixtures/stress/step_counter.py"], "forkserver", signal.SIGINT, True, tmp_path)
    assert (code, stderr) == (130, "raceguard: interrupted before the target started\n")
    report = json.loads(out.read_text())
    validate_report(report)
    assert report["target_outcome"]["detail"] == "interrupted before the target started"
    assert report["stats"]["schedules_run"] == 0
