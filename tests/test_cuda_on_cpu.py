"""The CUDA path on the CPU: the whole CPU fixture suite through the CUDA tracker.

With ``RACEGUARD_SIMULATE_CUDA=1`` (raceguard/cuda/sim.py) every CPU tensor is device memory
of a simulated ``cuda:0`` and every thread launches on the default stream, the way most GPU
programs run: a model moved to the GPU, no stream ever created. Real ops go through the real
tracker, so what broke on the first real GPU (``x * 2`` passing a Python number where the schema
says ``Tensor``; a free from a shallow stack) breaks here first. Each race fixture must report
the same race as on the CPU, now as kernels on ``cuda:0/stream 0`` whose launches nothing on the
host ordered; each clean fixture must stay clean; no target may change behaviour.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from test_cli_fixtures import (
    CLEAN_FIXTURES,
    RACE_FIXTURES,
    _expectation,
    _innermost_user_line,
    _markers,
)
from test_cli_fixtures import run_check as run_fixture

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
SIMULATED = {**os.environ, "RACEGUARD_SIMULATE_CUDA": "1"}
DEFAULT_STREAM = "cuda:0/stream 0"


def run_check(path: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    return run_fixture(path, tmp_path, env=SIMULATED)


HAS_CUDA = torch.cuda.is_available()
LAUNCHER = ROOT / "tests" / "data" / "on_default_device.py"
# How a fixture runs on "the default stream": through the CPU backend here; on a machine with a
# GPU also for real, with torch's default device set to cuda in every thread.
WAYS = ["cuda-on-cpu"] + (["real-cuda"] if HAS_CUDA else [])


def _run(way: str, path: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    if way == "real-cuda":
        return run_fixture(path, tmp_path, str(LAUNCHER), "cuda", env=dict(os.environ))
    return run_check(path, tmp_path)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("path", RACE_FIXTURES, ids=lambda p: p.stem)
def test_race_fixture_on_the_default_stream_reports_the_same_race(path: Path, way: str, tmp_path: Path) -> None:
    kind, resource = _expectation(path)
    markers = _markers(path)
    proc, report = _run(way, path, tmp_path)
    assert "incomplete" not in report, report["incomplete"]
    assert proc.returncode == 1, proc.stderr
    assert report["target_exit_code"] == 0
    expected_lines = {markers["A"], markers["B"]}
    matching = [
        f
        for f in report["findings"]
        if f["kind"] == kind
        and (f["resource"] == resource or resource in f.get("details", {}).get("also_on", []))
        and {_innermost_user_line(a, path) for a in f["accesses"]} == expected_lines
    ]
    assert matching, "\n".join(
        f"{f['kind']} {f['resource']} {[(_innermost_user_line(a, path), a['timeline']) for a in f['accesses']]}"
        for f in report["findings"]
    )
    finding = matching[0]
    # Kernels on the one default stream, launched by two host threads that nothing ordered: the
    # stream's own order is no synchronisation. (torch.save's read of the raw storage is the
    # host's own, as it would be of the bytes a GPU tensor's copy brings back.)
    timelines = [a["timeline"] for a in finding["accesses"]]
    assert DEFAULT_STREAM in timelines
    assert all(t == DEFAULT_STREAM or t.startswith("thread:") for t in timelines), timelines
    assert len({a["thread"] for a in finding["accesses"]}) == 2
    if timelines == [DEFAULT_STREAM, DEFAULT_STREAM]:
        assert "in launch order" in finding["details"]["why"]
    assert "write" in {a["mode"] for a in finding["accesses"]}


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("path", CLEAN_FIXTURES, ids=lambda p: p.stem)
def test_clean_fixture_on_the_default_stream_stays_clean(path: Path, way: str, tmp_path: Path) -> None:
    proc, report = _run(way, path, tmp_path)
    assert report["findings"] == [], "\n".join(f["message"] for f in report["findings"])
    assert "incomplete" not in report, report["incomplete"]
    assert proc.returncode == 0, proc.stderr
    assert report["stats"]["ops"] > 0
    assert report["stats"]["cuda_launches"] > 0  # the ops really went through the CUDA tracker


STREAM_RACES = sorted((FIXTURES / "cuda_on_cpu" / "races").glob("*.py"))
STREAM_CLEAN = sorted((FIXTURES / "cuda_on_cpu" / "clean").glob("*.py"))


def _expected_timelines(path: Path) -> list[str]:
    for line in path.read_text().splitlines():
        if line.startswith("# expect-timelines:"):
            rest = line.split(":", 1)[1].split()
            return [" ".join(rest[i : i + 2]) for i in range(0, len(rest), 2)]
    raise AssertionError(f"{path} has no '# expect-timelines:' header")


@pytest.mark.parametrize("path", STREAM_RACES, ids=lambda p: p.stem)
def test_stream_race_through_real_ops(path: Path, tmp_path: Path) -> None:
    kind, resource = _expectation(path)
    markers = _markers(path)
    proc, report = run_check(path, tmp_path)
    assert proc.returncode == 1, proc.stderr
    matching = [
        f
        for f in report["findings"]
        if f["kind"] == kind
        and f["resource"] == resource
        and {_innermost_user_line(a, path) for a in f["accesses"]} == {markers["A"], markers["B"]}
    ]
    assert matching, [(f["resource"], [a["timeline"] for a in f["accesses"]]) for f in report["findings"]]
    assert sorted(a["timeline"] for a in matching[0]["accesses"]) == sorted(_expected_timelines(path))


@pytest.mark.parametrize("path", STREAM_CLEAN, ids=lambda p: p.stem)
def test_stream_synchronisation_through_real_ops_is_clean(path: Path, tmp_path: Path) -> None:
    proc, report = run_check(path, tmp_path)
    assert report["findings"] == [], "\n".join(f["message"] for f in report["findings"])
    assert proc.returncode == 0, proc.stderr
    assert report["stats"]["cuda_streams"] >= 2


def test_the_gpu_launcher_keeps_names_and_lines(tmp_path: Path) -> None:
    """tests/data/on_default_device.py (the GPU check's way to move fixtures to cuda), tried on
    the CPU: the fixture's own lines and names come through it unchanged."""
    path = FIXTURES / "races" / "ema_reader.py"
    kind, resource = _expectation(path)
    markers = _markers(path)
    proc, report = run_fixture(path, tmp_path, str(LAUNCHER), "cpu", env=SIMULATED)
    assert proc.returncode == 1, proc.stderr
    assert any(
        f["resource"] == resource and {_innermost_user_line(a, path) for a in f["accesses"]} == {markers["A"], markers["B"]}
        for f in report["findings"]
    ), [f["resource"] for f in report["findings"]]
