"""Controlled schedules of CUDA programs: `stress`/`replay`, the fork server, the in-process front ends.

On a GPU the fork server must never initialise CUDA (a forked child of a process that did cannot
use CUDA at all), and every schedule tracks CUDA streams as `check` does. Here there is no GPU: the
device-agnostic fixtures run on the CPU, and again with ``RACEGUARD_SIMULATE_CUDA=1``, where every
tensor is device memory of a simulated ``cuda:0`` driving the real CUDA tracker; the fork server's
guard is checked through torch's Python entry points, which a CPU build has too. Everything here
is verified on the CPU only; ``benchmarks/gpu/run_all.sh`` runs the same acceptance on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from raceguard.report.document import validate_report
from raceguard.schedule.cudaguard import CudaRefused, Guard

ROOT = Path(__file__).resolve().parent.parent
RACEGUARD = [sys.executable, "-m", "raceguard"]
FIXTURES = ["device_torn_reload", "device_item_lost_update"]
# "native": the fixtures on their own device (cuda on a GPU machine, the CPU here); "cuda-on-cpu":
# with the CUDA tracker driven by the CPU backend (on a GPU machine the fixtures' cuda tensors are
# then host memory to raceguard; the target-failure shape does not depend on it).
WAYS = {"native": {}, "cuda-on-cpu": {"RACEGUARD_SIMULATE_CUDA": "1"}}
HAS_CUDA = torch.cuda.is_available()


def raceguard(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*RACEGUARD, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def load(path: Path) -> dict:
    data = json.loads(path.read_text())
    validate_report(data)
    return data


# -- the fork server never initialises CUDA ----------------------------------------------------------
def test_guard_refuses_cuda_entry_points_while_armed_and_restores_them():
    originals = (torch.cuda.is_available, torch.cuda.device_count, torch.cuda._lazy_init)
    bound_lazy_init = torch.cuda.random._lazy_init  # imported by name: patched there too
    guard = Guard()
    guard.arm()
    try:
        bound_during = torch.cuda.is_available  # what `from torch.cuda import ...` would bind now
        for call in (torch.cuda.is_available, torch.cuda.device_count, torch.cuda.init,
                     torch.cuda.random.get_rng_state):
            with pytest.raises(CudaRefused):
                call()
        assert torch.cuda.random._lazy_init is not bound_lazy_init
    finally:
        guard.lift()
    assert (torch.cuda.is_available, torch.cuda.device_count, torch.cuda._lazy_init) == originals
    assert torch.cuda.random._lazy_init is bound_lazy_init
    assert bound_during() == torch.cuda.is_available()  # lifted: delegates to torch
    assert [r.split(" ")[0] for r in guard.refused[:3]] == [
        "torch.cuda.is_available", "torch.cuda.device_count", "torch.cuda._lazy_init"]
    assert not torch.cuda.is_initialized()


PROBE_LIB = '''\
import os
import torch

N = torch.cuda.device_count()  # a library asking at import time (as many do)
with open(os.environ["PROBE_LOG"], "a") as f:
    f.write(f"imported {os.getpid()}\\n")
'''
PROBE_TARGET = '''\
import os
import torch
import rg_probe_lib  # top-level import of a library: the fork server tries to preimport it

available = torch.cuda.is_available()  # the target's own calls work as under plain python
try:
    torch.cuda.init()
except Exception as exc:
    assert "raceguard" not in str(exc), exc
with open(os.environ["PROBE_LOG"], "a") as f:
    f.write(f"ran {os.getpid()} {available} {rg_probe_lib.N}\\n")
'''


def test_fork_server_never_initialises_cuda_and_schedules_may(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from raceguard.schedule.forkserver import ForkServerClient

    lib = tmp_path / "site-packages"  # a path that reads as a library: the server preimports it
    lib.mkdir()
    (lib / "rg_probe_lib.py").write_text(PROBE_LIB)
    script = tmp_path / "probe.py"
    script.write_text(PROBE_TARGET)
    log = tmp_path / "probe.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(lib), os.environ.get("PYTHONPATH", "")]),
           "PROBE_LOG": str(log)}
    client = ForkServerClient(script=str(script), module=None, args=[], env=env)
    try:
        ready = client.wait_ready(timeout=120)
        assert ready["cuda"]["initialized"] is False
        # The library's import asked CUDA: refused in the server, so it is imported per schedule.
        assert any(r.startswith("torch.cuda.device_count (") and "rg_probe_lib.py:4" in r
                   for r in ready["cuda"]["refused"]), ready
        assert not log.exists() or "imported" not in log.read_text()
        for i in range(2):
            client.run({"index": i, "seed": i, "strategy": "random", "depth": 3, "steps": None,
                        "timeout": 60, "log": None, "max_reports": 10, "preempt": None})
        done, deadline = [], time.monotonic() + 120
        while len(done) < 2 and time.monotonic() < deadline:
            done += [m for m in client.messages(0.2) if m.get("type") == "done"]
        assert [m["code"] for m in sorted(done, key=lambda m: m["index"])] == [0, 0], done
    finally:
        client.close()
    lines = log.read_text().split()
    pids = {lines[i + 1] for i, word in enumerate(lines) if word == "imported"}
    ran = {lines[i + 1] for i, word in enumerate(lines) if word == "ran"}
    assert len(ran) == 2 and pids == ran and str(ready["pid"]) not in pids


# -- acceptance: found within 100 schedules, replayed 3/3, on CPU and CUDA-on-CPU ---------------------
_searches: dict[tuple[str, str], dict] = {}


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory):
    def run(fixture: str, way: str) -> dict:
        if (fixture, way) not in _searches:
            d = tmp_path_factory.mktemp(f"{fixture}-{way}")
            supp = d / "suppressions.txt"
            supp.write_text("# stop where the bug manifests, not at the data race of schedule 0\ndata-race:*\n")
            out = d / "report.json"
            proc = raceguard("stress", "--seed", "1", "--schedules", "100", "--stop-on-first", "--suppressions",
                             str(supp), "--format", "json", "--output", str(out), f"fixtures/stress/{fixture}.py",
                             env=WAYS[way])
            assert proc.returncode == 1, proc.stderr
            _searches[(fixture, way)] = load(out)
        return _searches[(fixture, way)]

    return run


@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.parametrize("fixture", FIXTURES)
def test_device_fixture_found_within_100_schedules_and_replayed_3_of_3(fixture, way, search, tmp_path):
    report = search(fixture, way)
    failures = [f for f in report["findings"] if f["kind"] == "target-failure"]
    assert len(failures) == 1, report["findings"]
    failure = failures[0]
    assert report["stats"]["first_failure_at"] < 100
    assert "AssertionError" in failure["details"]["traceback"]
    argv = failure["reproduce"]["command"].split()
    assert argv[:2] == ["raceguard", "replay"] and argv[-1] == f"fixtures/stress/{fixture}.py"
    for attempt in range(3):
        out = tmp_path / f"replay-{attempt}.json"
        proc = raceguard(*argv[1:-1], "--format", "json", "--output", str(out), argv[-1], env=WAYS[way])
        assert proc.returncode == 1, proc.stderr
        again = [f for f in load(out)["findings"] if f["kind"] == "target-failure"]
        assert [(f["fingerprint"], f["message"]) for f in again] == [(failure["fingerprint"], failure["message"])]


def test_schedules_track_cuda_streams_as_check_does(tmp_path: Path):
    """Each schedule's child installs the CUDA tracker: the version stamps' race is reported as
    kernels on the default stream whose launches no host order fixed."""
    out = tmp_path / "report.json"
    proc = raceguard("stress", "--seed", "1", "--schedules", "2", "--format", "json", "--output", str(out),
                     "fixtures/stress/device_torn_reload.py", env=WAYS["native" if HAS_CUDA else "cuda-on-cpu"])
    assert proc.returncode == 1, proc.stderr
    races = [f for f in load(out)["findings"] if f["kind"] == "data-race"]
    assert races, proc.stderr
    assert all(a["timeline"] == "cuda:0/stream 0" for f in races for a in f["accesses"]), races
    assert any(f["resource"].endswith(".version") for f in races), [f["resource"] for f in races]


# -- in-process front ends (the marker's and Hypothesis's run_schedule) with CUDA tensors --------------
@pytest.fixture
def cuda_on_cpu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RACEGUARD_SIMULATE_CUDA", "1")
    from raceguard.cuda import sim as cudasim

    return cudasim


class TornServer:
    """The torn reload of device_torn_reload.py, as callables for Schedule.run."""

    def __init__(self) -> None:
        self.versions = [torch.zeros((), dtype=torch.int64) for _ in range(3)]
        self.seen: list[list[int]] = []

    def reload(self) -> None:
        for v in self.versions:
            v.fill_(1)

    def handle(self) -> None:
        self.seen.append([int(v.item()) for v in self.versions])

    def torn(self) -> bool:
        return any(len(set(s)) > 1 for s in self.seen)


def test_interleavings_find_and_replay_a_torn_reload_of_cuda_tensors(cuda_on_cpu):
    from hypothesis import HealthCheck, given, settings

    from raceguard import RaceError
    from raceguard.hypothesis import interleavings, replay

    found = []

    @settings(max_examples=100, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(schedule=interleavings(races="ignore"))
    def check(schedule):
        server = TornServer()
        schedule.run(server.reload, server.handle)
        if server.torn():
            found.append(schedule)
        assert not server.torn()

    with pytest.raises(AssertionError):
        check()
    again = TornServer()
    replay(found[-1].preemptions, races="ignore").run(again.reload, again.handle)
    assert again.torn()
    # Races are reported as CUDA races: kernels on the default stream, launched by unordered threads.
    shared = TornServer()
    with pytest.raises(RaceError) as err:
        replay(found[-1].preemptions).run(shared.reload, shared.handle)
    assert "cuda:0/stream 0" in str(err.value)


def test_stream_and_event_calls_are_scheduling_points(cuda_on_cpu):
    from raceguard.schedule.inprocess import run_schedule
    from raceguard.schedule.strategies import make_strategy

    def points(records: int) -> int:
        def body() -> None:
            s = cuda_on_cpu.Stream()
            ev = cuda_on_cpu.Event()

            def side() -> None:
                for _ in range(records):
                    ev.record(s)
                s.synchronize()

            t = threading.Thread(target=side)
            t.start()
            t.join()

        run = run_schedule(body, make_strategy("random", 0, 3, None), seed=0)
        assert not run.failed, run.describe_failure()
        return run.stats["scheduling_points"]

    assert points(20) - points(0) == 20
