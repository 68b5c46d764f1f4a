"""The child started before the CLI is imported (``raceguard.prestart``).

It must run nothing of the target before its configuration arrives, end quietly when the
supervisor does not need it, never outlive the supervisor, and give the same results as a child
started after argument parsing (``RACEGUARD_NO_PRESTART=1``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raceguard.process import prestart

ROOT = Path(__file__).resolve().parent.parent
RACEGUARD = [sys.executable, "-m", "raceguard"]


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            found.append(int(entry))
    return found


def test_a_child_whose_configuration_never_comes_ends_quietly_without_running_anything(tmp_path):
    marker = tmp_path / "ran"
    pre = prestart.start()
    try:
        os.close(pre.config_fd)  # the supervisor decided it does not need the child
        pre.config_fd = -1
        assert pre.proc.wait(timeout=120) == 0
        with os.fdopen(pre.read_fd, "rb") as messages:
            pre.read_fd = -1
            assert messages.read() == b""  # no message: nothing was run or reported
    finally:
        prestart._discard(pre)
    assert not marker.exists()


@pytest.mark.parametrize("argv", [["check", "--help"], ["check", "--no-such-option", "x.py"], ["check", "missing.py"]])
def test_the_cli_leaves_no_child_behind_when_it_does_not_run_one(argv, tmp_path):
    proc = subprocess.Popen([*RACEGUARD, *argv], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == (0 if "--help" in argv else 2), err
    if "--help" in argv:
        assert out.startswith("Usage: raceguard check")
    elif "missing.py" in argv:
        assert err == "raceguard: error: can't open file 'missing.py': No such file or directory\n"
    else:
        assert "Error: No such option '--no-such-option'." in err
    assert children_of(proc.pid) == []  # reaped: the prestarted child was killed and waited for


def test_prestarted_and_late_started_children_give_the_same_report(tmp_path):
    fixture = ROOT / "fixtures" / "races" / "overlapping_slices.py"
    results = []
    for env in (dict(os.environ), dict(os.environ, RACEGUARD_NO_PRESTART="1")):
        out = tmp_path / "report.json"
        done = subprocess.run([*RACEGUARD, "check", "--format", "json", "-o", str(out), str(fixture)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        report = json.loads(out.read_text())
        # Which pairs of the racing lines are reported can vary with timing; what raced cannot.
        results.append((done.returncode, sorted({(f["kind"], f["resource"]) for f in report["findings"]})))
    assert results[0] == results[1] and results[0][0] == 1 and results[0][1]


def test_take_refuses_a_child_of_another_interpreter(monkeypatch):
    class FakeProc:
        killed = False

        def kill(self):
            FakeProc.killed = True

        def wait(self):
            return -9

    r, w = os.pipe()
    monkeypatch.setattr(prestart, "_pending", prestart.Prestarted(FakeProc(), r, w))
    assert prestart.take("/usr/bin/some-other-python") is None
    assert FakeProc.killed and prestart._pending is None
