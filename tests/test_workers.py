"""The plumbing of multi-process checking (raceguard.workers), without torch.distributed: the
hub's merge of one bug seen in several processes, the report's process labels, and the
bootstrap's promise to leave the environment's own sitecustomize working."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import raceguard
from raceguard.report.document import validate_report

from raceguard.report.finding import Access, Finding, Frame
from raceguard.report.text import access_line, finding_lines
from raceguard.process.supervisor import _Collector
from raceguard.process.workers import Listener, WorkerHub, scrub_environment

from proc_members import live_members

ROOT = Path(__file__).resolve().parent.parent


def _finding(process: str) -> dict:
    accesses = [
        Access(thread=t, timeline=f"thread:{t}", mode=m, stack=[Frame("train.py", line, "step")], process=process)
        for t, m, line in (("trainer", "write", 10), ("checkpointer", "read", 20))
    ]
    return Finding(kind="data-race", resource="model.w", resource_kind="parameter", message="m", accesses=accesses).to_dict()


def _send(path: str, *events: dict) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(b"".join(json.dumps(e).encode() + b"\n" for e in events))


def test_hub_merges_one_bug_from_several_processes_into_one_finding():
    listener = Listener()
    collector = _Collector(None)
    hub = WorkerHub(listener, collector.handle, collector.lock, collector.by_fingerprint)
    for rank in (1, 0, 10):
        label = f"rank {rank}"
        _send(listener.path, {"type": "hello", "pid": 1, "process": label}, {"type": "finding", "finding": _finding(label)},
              {"type": "exit", "stats": {"threads": 2, "ops": 5}})
    totals = hub.finish(5.0)
    assert not os.path.exists(listener.dir)
    assert len(collector.result.findings) == 1
    finding = collector.result.findings[0]
    assert finding.details["processes"] == ["rank 0", "rank 1", "rank 10"]
    assert (totals["workers"], totals["threads"], totals["ops"]) == (3, 6, 15)


def test_text_report_names_the_process_and_every_process_a_finding_was_seen_in():
    finding = Finding.from_dict(_finding("rank 1"))
    assert access_line(finding.accesses[0]).startswith("write by rank 1 / thread 'trainer'")
    finding.details["processes"] = ["rank 0", "rank 1"]
    assert any(str(line).strip() == "seen in: rank 0, rank 1" for line in finding_lines(finding))
    assert Access.from_dict(finding.accesses[0].to_dict()).process == "rank 1"


def test_scrub_environment_restores_what_was_there():
    listener = Listener()
    try:
        env = {"PYTHONPATH": "/mine"}
        env.update(listener.env("/pkg", env))
        assert env["PYTHONPATH"].endswith(os.pathsep + "/mine")
        scrub_environment(env)
        assert env == {"PYTHONPATH": "/mine"}
        env = {}
        env.update(listener.env("/pkg", env))
        scrub_environment(env)
        assert env == {}
    finally:
        listener.close()


def test_the_environments_own_sitecustomize_still_runs_in_the_target_and_its_children(tmp_path):
    own = tmp_path / "site"
    own.mkdir()
    (own / "sitecustomize.py").write_text("MARK = 'own sitecustomize'\n")
    script = tmp_path / "target.py"
    script.write_text(
        "import subprocess, sys\n"
        "probe = \"import sys; print(getattr(sys.modules.get('sitecustomize'), 'MARK', None), "
        "any('bootstrap' in p for p in sys.path))\"\n"
        "exec(probe)\n"
        "subprocess.run([sys.executable, '-c', probe], check=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(own)}
    proc = subprocess.run(
        [sys.executable, "-m", "raceguard", "check", str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["own sitecustomize False", "own sitecustomize False"]
    assert "2 processes" in proc.stderr


# -- Ctrl-C and SIGTERM during a multi-process check --------------------------------------------
def test_sigterm_to_raceguard_reports_the_cycles_of_a_worker_blocked_in_cpp(tmp_path):
    """Before ending the tree the supervisor asks every process for its lock-order cycles; the
    worker's heartbeat thread answers although its main thread waits in C++."""
    out = tmp_path / "report.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "raceguard", "check", "--format", "json", "--output", str(out),
         str(ROOT / "fixtures" / "targets" / "worker_cycle_then_blocked.py")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "worker inverted"
        os.kill(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    report = json.loads(out.read_text())
    assert report["target_outcome"]["signal"] == "SIGTERM", stderr
    cycles = [f for f in report["findings"] if f["kind"] == "lock-order-cycle"]
    assert len(cycles) == 1, stderr
    assert cycles[0]["details"]["processes"][0].startswith("process "), cycles[0]["details"]



STOPPED = ROOT / "fixtures" / "targets" / "workers_race_then_sleep.py"
PACKAGE_DIR = str(Path(raceguard.__file__).resolve().parent)


def _group_members(pgid: int) -> list[str]:
    return live_members(pgid, of="group")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="lists the process group through /proc")
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_ends_every_worker_and_reports_what_each_found(tmp_path, how):
    """Ctrl-C from a terminal (SIGINT to the whole foreground group) or SIGTERM to raceguard
    alone (CI cancelling a job): every process's findings are in the report, and no process of
    the tree is left running, not even a worker that ignores Ctrl-C."""
    out = tmp_path / "report.json"
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "raceguard", "check", "--format", "json", "--output", str(out), str(STOPPED), "--stubborn-worker"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,  # its own process group, like a terminal's foreground job
        )
    lines: queue.Queue = queue.Queue()

    def read_stdout() -> None:
        for line in proc.stdout:
            lines.put(line.strip())
        lines.put(None)  # stdout ended: every process of the tree closed it

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    try:
        ready = []
        while len(ready) < 3:  # the target and both workers raced (findings stream as they are made)
            line = lines.get(timeout=120)
            assert line is not None, (tmp_path / "stderr").read_text()
            ready.append(line)
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        stopped = time.monotonic()
        proc.wait(timeout=60)
        # The worker that ignores Ctrl-C is killed after the grace periods (2 + 3 s).
        assert time.monotonic() - stopped < 20
        reader.join(timeout=10)  # stdout ends only when no process of the tree holds it open
        assert not reader.is_alive(), _group_members(proc.pid)
        deadline = time.monotonic() + 10
        while _group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _group_members(proc.pid) == []
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == 1, stderr
    report = json.loads(out.read_text())
    validate_report(report)
    assert report["target_outcome"]["kind"] == "interrupted"
    assert report["target_outcome"]["signal"] == (None if how == "ctrl-c" else "SIGTERM")
    worker_pids = [int(line.split()[-1]) for line in ready if line.startswith("worker ")]
    assert len(worker_pids) == 2 and any(line.startswith("target ready") for line in ready), ready
    races = [f for f in report["findings"] if f["kind"] == "data-race"]
    seen_in = sorted(tuple(f.get("details", {}).get("processes", ["target"])) for f in races)
    assert seen_in == sorted([("target",), *((f"process {pid}",) for pid in worker_pids)]), report["findings"]
    assert report["stats"]["processes"] == 3
    # The target's own KeyboardInterrupt tracebacks may appear; raceguard's never do.
    assert f'File "{PACKAGE_DIR}' not in stderr, stderr
    summary = f"interrupted ({'Ctrl-C' if how == 'ctrl-c' else 'SIGTERM'})"
    assert stderr.splitlines()[-1].startswith("raceguard: 3 findings") and stderr.rstrip().endswith(summary), stderr
