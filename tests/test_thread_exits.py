"""The checked process lets threads that ended finish their C++ thread-local destructors before
the interpreter finalizes (raceguard.process.thread_exits).

torch releases Python objects it keeps in a thread's C++ thread-locals after the thread's Python
code ended; a release that meets interpreter finalization kills the process with SIGABRT ("terminate
called without an active exception"). Plain python runs into that in some runs of a compiled
trainer; raceguard's own work at a thread's end had made it more frequent.
"""

from __future__ import annotations

import _thread
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from raceguard.process.thread_exits import wait_until_gone
from test_native_fixtures import _env

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "tests" / "data" / "thread_exit_tls.py"


@pytest.mark.skipif(not hasattr(torch._C, "_stash_obj_in_tls"), reason="this torch keeps no Python objects in C++ thread-locals")
@pytest.mark.parametrize("backend", [None, "python"], ids=["default", "python"])
def test_a_thread_releasing_torch_thread_locals_at_its_end_is_not_killed_by_finalization(backend, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "raceguard", "check", "--format", "json", "--output", str(out), str(PROGRAM)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env(backend),
    )
    assert "terminate called" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    # the object's __del__ ran on the ending thread, after main had joined it
    assert proc.stdout.splitlines() == ["worker done", "main done", "released"], proc.stdout
    assert json.loads(out.read_text())["status"] == "clean"


def test_waiting_for_ended_threads_is_bounded_and_skips_running_ones() -> None:
    started, release, done = threading.Event(), threading.Event(), threading.Event()
    native = []

    def lingering() -> None:  # a thread threading does not know of: its id could be a reused one
        native.append(threading.get_native_id())
        started.set()
        release.wait()
        done.set()

    _thread.start_new_thread(lingering, ())
    assert started.wait(10)
    assert wait_until_gone(native, limit_s=0.02) == 1  # still there: given up on after the limit
    assert wait_until_gone([threading.get_native_id()], limit_s=5) == 0  # a running Python thread
    release.set()
    assert done.wait(10)
    assert wait_until_gone(native, limit_s=10) == 0
