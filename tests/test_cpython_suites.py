"""CPython's own threading, queue and _thread tests under `raceguard check`: the instrumented
primitives must pass them as the originals do, and CPython's regrtest (which rewrites
``__file__`` of every loaded module) must run a target that never imports torch.

Each test runs plain python and raceguard side by side (the suites mostly sleep) and compares
the counts. Skipped where the interpreter has no ``test`` package (some distributions split it
off)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli_targets import RACEGUARD

pytestmark = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import test.support"], capture_output=True).returncode != 0,
    reason="this python has no CPython test package (test.support)",
)


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default disposition. A shell starts background
    jobs and nohup'd commands with SIGINT ignored, and an ignored SIGINT is inherited across exec:
    test_threading's interrupt_main tests then fail under plain python too."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _side_by_side(args: list[str], cwd: Path, timeout: float = 600) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    # In a scratch directory each: the suites write their temporary files to the working directory.
    (cwd / "plain").mkdir()
    (cwd / "raceguard").mkdir()
    procs = [
        subprocess.Popen(cmd, cwd=cwd / where, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=_default_sigint)
        for where, cmd in (("plain", [sys.executable, *args]), ("raceguard", [*RACEGUARD, "check", *args]))
    ]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done[0], done[1]


def test_threading_queue_and_thread_suites_pass_as_under_plain_python(tmp_path: Path) -> None:
    plain, checked = _side_by_side(["-m", "unittest", "test.test_threading", "test.test_queue", "test.test_thread"], tmp_path)

    def summary(proc: subprocess.CompletedProcess) -> tuple[str, str]:
        ran = re.search(r"^Ran (\d+) tests", proc.stderr, re.M)
        result = re.search(r"^(OK.*|FAILED.*)$", proc.stderr, re.M)
        assert ran and result, proc.stderr[-3000:]
        return ran.group(1), result.group(1)

    assert plain.returncode == 0, plain.stderr[-3000:]
    assert summary(checked) == summary(plain), checked.stderr[-5000:]
    assert checked.returncode == 0


def test_regrtest_runs_a_target_that_never_imports_torch(tmp_path: Path) -> None:
    plain, checked = _side_by_side(["-m", "test", "test_thread"], tmp_path)

    def totals(proc: subprocess.CompletedProcess) -> str:
        found = re.search(r"^Total tests: (.*)$", proc.stdout, re.M)
        assert found and "Result: SUCCESS" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
        return found.group(1)

    assert totals(checked) == totals(plain)
    assert checked.returncode == 0, checked.stderr[-3000:]
