"""``--simulate-cuda``: unchanged CUDA programs on a CPU-only torch, through the public CLI.

Each program under ``fixtures/cuda/`` (written for a GPU: ``device="cuda"``, ``torch.cuda.Stream``,
``pin_memory()``, ``.to("cuda", non_blocking=True)``, AMP) runs as it is. A race fixture must be
reported with its ``# expect:`` kind and resource and its two marked lines, the same spec a GPU
run is held to (``tests/test_cuda_real.py``); a clean one must stay clean. Where the program can
be written in the dialect of the CUDA-on-CPU backend line for line (``_port``: the
``fixtures/cuda_on_cpu`` way, every CPU tensor device memory), the ported run must give the same
findings, fingerprints included; the hand-ported fixtures of ``fixtures/cuda_on_cpu`` must agree
on kind, modes and timelines.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli_fixtures import _expectation, _innermost_user_line, _markers
from test_cli_fixtures import run_check as run_fixture

ROOT = Path(__file__).resolve().parent.parent
CUDA_FIXTURES = ROOT / "fixtures" / "cuda"
RACES = sorted((CUDA_FIXTURES / "races").glob("*.py"))
CLEAN = sorted((CUDA_FIXTURES / "clean").glob("*.py"))
PLAIN_ENV = {k: v for k, v in os.environ.items() if k != "RACEGUARD_SIMULATE_CUDA"}
EVERY_TENSOR_ENV = {**PLAIN_ENV, "RACEGUARD_SIMULATE_CUDA": "1"}


def simulate(path: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    return run_fixture(path, tmp_path, "--simulate-cuda", *extra, env=PLAIN_ENV)


def _timelines(path: Path) -> list[str] | None:
    for line in path.read_text().splitlines():
        if line.startswith("# expect-timelines:"):
            rest = line.split(":", 1)[1].split()
            return sorted(" ".join(rest[i : i + 2]) for i in range(0, len(rest), 2))
    return None


def _summary(report: dict) -> set[tuple]:
    return {
        (f["kind"], f["resource"], f["fingerprint"], tuple(sorted(a["timeline"] for a in f["accesses"])))
        for f in report["findings"]
    }


# -- the programs under fixtures/cuda, unchanged ----------------------------------------------------
@pytest.mark.parametrize("path", RACES, ids=lambda p: p.stem)
def test_cuda_race_fixture_runs_unchanged_and_is_found(path: Path, tmp_path: Path) -> None:
    kind, resource = _expectation(path)
    markers = _markers(path)
    proc, report = simulate(path, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert report["target_exit_code"] == 0, proc.stderr
    assert "incomplete" not in report, report["incomplete"]
    assert report["stats"]["simulated_cuda"] is True
    assert "CUDA simulated on the CPU (--simulate-cuda)" in proc.stderr.splitlines()[-1]
    matching = [
        f
        for f in report["findings"]
        if f["kind"] == kind
        and (f["resource"] == resource or resource in f.get("details", {}).get("also_on", []))
        and {_innermost_user_line(a, path) for a in f["accesses"]} == {markers["A"], markers["B"]}
    ]
    assert matching, [(f["resource"], [(a["timeline"], _innermost_user_line(a, path)) for a in f["accesses"]]) for f in report["findings"]]
    timelines = [a["timeline"] for a in matching[0]["accesses"]]
    assert any(t.startswith("cuda:0/stream") for t in timelines), timelines
    expected = _timelines(path)
    if expected is not None:  # one report across host threads and streams
        named = sorted({a["timeline"] for f in report["findings"] for a in f["accesses"]})
        assert named == expected


@pytest.mark.parametrize("path", CLEAN, ids=lambda p: p.stem)
def test_cuda_clean_fixture_runs_unchanged_and_stays_clean(path: Path, tmp_path: Path) -> None:
    proc, report = simulate(path, tmp_path)
    assert report["findings"] == [], "\n".join(f["message"] for f in report["findings"])
    assert "incomplete" not in report, report["incomplete"]
    assert proc.returncode == 0, proc.stderr
    assert report["stats"]["simulated_cuda"] is True
    assert report["stats"]["cuda_launches"] > 0


def test_without_the_option_a_cuda_program_still_fails_on_its_own(tmp_path: Path) -> None:
    """The simulation is opt-in: plain check keeps the target's own failure (exit 3)."""
    proc, report = run_fixture(CUDA_FIXTURES / "races" / "missing_wait_stream.py", tmp_path, env=PLAIN_ENV)
    assert proc.returncode == 3, proc.stderr
    assert "CUDA" in report["target_outcome"]["detail"]  # torch's own "... requires CUDA support"
    assert "simulated_cuda" not in report["stats"]


# -- the same findings as the CUDA-on-CPU backend's ports ---------------------------------------------
# A CUDA program in the dialect of fixtures/cuda_on_cpu (every CPU tensor is device memory, streams
# from raceguard.cuda.sim), line for line, so that lines and fingerprints must match.
_PORT = [
    (r"^import torch$", "import torch; from raceguard.cuda import sim as cudasim"),
    (r"torch\.cuda\.(Stream|Event|stream|current_stream)\(", r"cudasim.\1("),
    (r"torch\.cuda\.synchronize\(\)", "cudasim.simulated_cuda.synchronize()"),
    (r"torch\.cuda\._sleep\([^)]*\)", "cudasim.current_stream()"),
    (r', device="cuda"', ""),
    (r"(\w+)\.record_stream\(([^)]*\))\)", r"cudasim.record_stream(\1, \2)"),
    (r"(\w+)\.record_stream\((\w+)\)", r"cudasim.record_stream(\1, \2)"),
    (r"(torch\.\w+\([^)]*\))\.pin_memory\(\)", r"cudasim.pin(\1)"),
]
# What the every-tensor dialect cannot say: a host tensor apart from pinned ones, D2H copies, AMP.
_UNPORTABLE = re.compile(r"\.cuda\(|\.to\(|\.cpu\(|tolist|autocast|GradScaler|torch\.cuda\.|\"cuda\"")


def _port(path: Path) -> str | None:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            for pattern, replacement in _PORT:
                line = re.sub(pattern, replacement, line)
            if _UNPORTABLE.search(line.split("#", 1)[0]):
                return None
        lines.append(line)
    return "\n".join(lines) + "\n"


PORTABLE = [p for p in RACES + CLEAN if _port(p) is not None]


def test_most_cuda_fixtures_have_a_line_for_line_port() -> None:
    assert len(PORTABLE) >= 7, [p.name for p in PORTABLE]


@pytest.mark.parametrize("path", PORTABLE, ids=lambda p: f"{p.parent.name}-{p.stem}")
def test_simulated_findings_and_fingerprints_equal_the_ported_programs(path: Path, tmp_path: Path) -> None:
    ported = tmp_path / "port" / path.name
    ported.parent.mkdir()
    ported.write_text(_port(path) or "")
    _, as_port = run_fixture(ported, tmp_path / "port", env=EVERY_TENSOR_ENV)
    _, as_is = simulate(path, tmp_path)
    assert "incomplete" not in as_port and "incomplete" not in as_is
    assert _summary(as_is) == _summary(as_port)
    assert as_is["stats"]["cuda_streams"] == as_port["stats"]["cuda_streams"]


HAND_PORTED = {
    "races/missing_wait_stream.py": "races/side_stream_without_wait.py",
    "clean/wait_stream.py": "clean/side_stream_wait_stream.py",
    "clean/event_record_wait.py": "clean/loader_thread_wait_event.py",
}


@pytest.mark.parametrize("original", sorted(HAND_PORTED))
def test_hand_ported_fixture_reports_the_same_kind_of_finding(original: str, tmp_path: Path) -> None:
    def shape(report: dict) -> list[tuple]:
        return sorted(
            (f["kind"], tuple(sorted((a["timeline"], a["mode"]) for a in f["accesses"]))) for f in report["findings"]
        )

    for folder in ("simulated", "ported"):
        (tmp_path / folder).mkdir()
    _, as_is = simulate(CUDA_FIXTURES / original, tmp_path / "simulated")
    _, ported = run_fixture(ROOT / "fixtures" / "cuda_on_cpu" / HAND_PORTED[original], tmp_path / "ported", env=EVERY_TENSOR_ENV)
    assert shape(as_is) == shape(ported)


# -- where the simulation ends ---------------------------------------------------------------------------
def _write(tmp_path: Path, name: str, code: str) -> Path:
    path = tmp_path / name
    path.write_text(code)
    return path


def test_the_program_sees_one_cuda_device_and_its_memory(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "device_api.py",
        "import torch\n"
        "assert torch.cuda.is_available() and torch.cuda.device_count() == 1\n"
        "torch.cuda.set_device(0)\n"
        "x = torch.zeros(256, device=torch.device('cuda'))\n"
        "assert torch.cuda.memory_allocated() >= 1024\n"
        "y = x.cuda()\n"
        "assert y is x and x.to('cuda:0') is x\n"
        "z = x.cpu()\n"
        "assert z is not x and torch.cuda.memory_allocated() >= 1024\n"
        "h = torch.ones(4).pin_memory()\n"
        "assert h.is_pinned() and not torch.ones(1).is_pinned()\n"
        "d = h.to('cuda', non_blocking=True)\n"
        "s = torch.cuda.default_stream()\n"
        "assert torch.cuda.current_stream() == s\n"
        "before = torch.cuda.memory_allocated()\n"
        "with torch.device('cuda'):\n"
        "    w = torch.zeros(1024)\n"
        "assert torch.cuda.memory_allocated() == before + 4096\n"
        "with torch.autocast('cuda'):\n"
        "    assert (d[None] @ d[:, None]).dtype == torch.float16\n"
        "from torch.utils.data import DataLoader\n"
        "assert torch.accelerator.current_accelerator().type == 'cuda'\n"
        "for batch in DataLoader(torch.ones(4, 2), batch_size=2, pin_memory=True):\n"
        "    assert batch.is_pinned()\n"
        "layer = torch.nn.Linear(2, 2).cuda()\n"
        "opt = torch.optim.AdamW(layer.parameters())\n"
        "layer(d[:2][None]).sum().backward()\n"
        "opt.step()  # asks torch.accelerator's current stream whether it is capturing a graph\n"
        "print('ok', float(d.sum()))\n",
    )
    proc, report = simulate(path, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok 4.0\n"
    assert report["findings"] == []


def test_a_device_read_is_noted_once_with_its_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "reads_device.py", "import torch\nx = torch.ones(2, device='cuda')\nprint(x.device)\nprint(x.device, x.is_cuda)\n")
    proc, report = simulate(path, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "cpu\ncpu False\n"
    assert report["stats"]["simulation_notes"] == [
        "raceguard --simulate-cuda: x.device reports cpu for simulated CUDA tensors (first read at reads_device.py:3)",
        "raceguard --simulate-cuda: x.is_cuda is False for simulated CUDA tensors (first read at reads_device.py:4)",
    ]
    text = subprocess.run(
        [sys.executable, "-m", "raceguard", "check", "--simulate-cuda", str(path)],
        cwd=ROOT, capture_output=True, text=True, env=PLAIN_ENV, timeout=300,
    )
    assert "raceguard --simulate-cuda: x.device reports cpu for simulated CUDA tensors (first read at reads_device.py:3)" in text.stderr


@pytest.mark.parametrize(
    "code, message",
    [
        ("torch.ones(2, device='cuda:1')", "raceguard --simulate-cuda: cuda:1 is not simulated (there is one device, cuda:0)"),
        ("torch.cuda.get_device_properties(0)", "raceguard --simulate-cuda: torch.cuda.get_device_properties() needs a real GPU and is not simulated"),
        ("graph: torch.cuda.CUDAGraph | None = None  # libraries annotate with it\ntorch.cuda.CUDAGraph()", "raceguard --simulate-cuda: torch.cuda.CUDAGraph needs a real GPU and is not simulated"),
    ],
)
def test_a_call_the_simulation_cannot_answer_ends_the_target_with_one_line(code: str, message: str, tmp_path: Path) -> None:
    path = _write(tmp_path, "limit.py", f"import torch\n{code}\n")
    proc, report = simulate(path, tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert f"SimulationLimit: {message}" in proc.stderr
    assert report["target_outcome"]["detail"] == f"SimulationLimit: {message}"
    assert report["findings"] == []


# -- the caching allocator's per-stream pools ---------------------------------------------------------
def test_a_freed_block_is_reused_by_its_own_stream_only() -> None:
    import torch

    from raceguard.cuda.sim import SimAllocator

    allocator = SimAllocator()
    a = torch.empty(1000).untyped_storage()
    address = allocator.allocate(a, 0x5000)
    del a
    other = torch.empty(1000).untyped_storage()
    assert allocator.allocate(other, 0) != address  # the default stream does not get the side stream's block
    same = torch.empty(1000).untyped_storage()
    assert allocator.allocate(same, 0x5000) == address  # the side stream does
    assert allocator.reused == 1
    del other
    smaller = torch.empty(10).untyped_storage()
    assert allocator.allocate(smaller, 0) != address
    assert allocator.allocated == 4096 + 512


# -- the other front ends --------------------------------------------------------------------------------
def test_config_file_key_turns_the_simulation_on(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.raceguard]\nsimulate-cuda = true\n")
    target = CUDA_FIXTURES / "races" / "missing_wait_stream.py"
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "raceguard", "check", "--format", "json", "-o", str(out), str(target)],
        cwd=tmp_path, capture_output=True, text=True, env=PLAIN_ENV, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert json.loads(out.read_text())["stats"]["simulated_cuda"] is True
    (tmp_path / "pyproject.toml").write_text("[tool.raceguard]\nsimulate-cuda = 'yes'\n")
    bad = subprocess.run(
        [sys.executable, "-m", "raceguard", "check", str(target)], cwd=tmp_path, capture_output=True, text=True, env=PLAIN_ENV, timeout=300
    )
    assert bad.returncode == 2
    assert "simulate-cuda must be true or false (got 'yes')" in bad.stderr


def test_stress_and_replay_simulate_cuda(tmp_path: Path) -> None:
    target = CUDA_FIXTURES / "races" / "missing_wait_stream.py"
    out = tmp_path / "stress.json"
    proc = subprocess.run(
        [sys.executable, "-m", "raceguard", "stress", "--simulate-cuda", "--schedules", "2", "--seed", "1", "-j", "1",
         "--format", "json", "-o", str(out), str(target)],
        cwd=ROOT, capture_output=True, text=True, env=PLAIN_ENV, timeout=600,
    )
    assert proc.returncode == 1, proc.stderr
    report = json.loads(out.read_text())
    assert report["stats"]["simulated_cuda"] is True
    assert {f["resource"] for f in report["findings"]} == {_expectation(target)[1]}
    out = tmp_path / "replay.json"
    proc = subprocess.run(
        [sys.executable, "-m", "raceguard", "replay", "--simulate-cuda", "--seed", "1", "--strategy", "random",
         "--format", "json", "-o", str(out), str(target)],
        cwd=ROOT, capture_output=True, text=True, env=PLAIN_ENV, timeout=600,
    )
    assert proc.returncode == 1, proc.stderr
    assert json.loads(out.read_text())["stats"]["simulated_cuda"] is True


def test_watch_simulates_cuda_for_its_block_only() -> None:
    code = (
        "import torch, raceguard\n"
        "with raceguard.watch(simulate_cuda=True) as session:\n"
        "    side = torch.cuda.Stream()\n"
        "    x = torch.ones(1024, device='cuda')\n"
        "    x.add_(1)\n"
        "    with torch.cuda.stream(side):\n"
        "        y = x * 2\n"
        "print(session.findings[0].resource, session.report().stats['simulated_cuda'])\n"
        "print(torch.cuda.is_available())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=PLAIN_ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "tensor float32[1024] allocated at <string>:4 True\nFalse\n"


def test_pytest_plugin_option(tmp_path: Path) -> None:
    (tmp_path / "test_gpu.py").write_text(
        "import torch\n\n"
        "def test_side_stream_waits():\n"
        "    side = torch.cuda.Stream()\n"
        "    x = torch.ones(64, device='cuda')\n"
        "    side.wait_stream(torch.cuda.current_stream())\n"
        "    with torch.cuda.stream(side):\n"
        "        assert float(x.sum()) == 64.0\n\n"
        "def test_side_stream_without_wait():\n"
        "    side = torch.cuda.Stream()\n"
        "    x = torch.ones(64, device='cuda')\n"
        "    with torch.cuda.stream(side):\n"
        "        x.sum()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--raceguard", "--raceguard-simulate-cuda", "test_gpu.py"],
        cwd=tmp_path, capture_output=True, text=True, env=PLAIN_ENV, timeout=300,
    )
    assert "1 failed, 1 passed" in proc.stdout, proc.stdout + proc.stderr
    assert "test_side_stream_without_wait" in proc.stdout
    assert "cuda:0/stream 1" in proc.stdout


def test_a_failure_of_the_simulation_is_contained_and_reported() -> None:
    """Fault injection: the function mode's own bookkeeping raises; every call still runs as
    without the mode, and the session says what was lost."""
    code = (
        "import torch, raceguard\n"
        "from raceguard.cuda import program\n"
        "def broken(values):\n"
        "    raise RuntimeError('injected')\n"
        "program._any_device_tensor = broken\n"
        "with raceguard.watch(simulate_cuda=True) as session:\n"
        "    y = torch.ones(3) + 1\n"
        "    print(y.sum().item())\n"
        "print(session.report().incomplete['errors'][0]['message'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=PLAIN_ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "6.0\nraceguard failed while simulating a CUDA call: RuntimeError('injected')\n"


def test_a_merged_report_says_a_shard_was_simulated() -> None:
    from raceguard.process.stress import merge_reports
    from raceguard.report.document import Report

    shards = [Report("stress", ["t.py"], [], 0, stats={"simulated_cuda": True}), Report("stress", ["t.py"], [], 0)]
    assert merge_reports(shards).simulated_cuda()
    assert not merge_reports(shards[1:]).simulated_cuda()
