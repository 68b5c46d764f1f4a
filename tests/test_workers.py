"""The plumbing of multi-process checking (raceguard.workers), without torch.distributed: the
hub's merge of one bug seen in several processes, the report's process labels, and the
bootstrap's promise to leave the environment's own sitecustomize working."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from raceguard.report.finding import Access, Finding, Frame
from raceguard.report.text import access_line, finding_lines
from raceguard.process.supervisor import _Collector
from raceguard.process.workers import Listener, WorkerHub, scrub_environment

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
