"""Both capture backends, one truth: every race fixture, and each random-generator hazard,
through the public CLI with the default backend (the native recorder) gives the findings the Python dispatch mode
(``RACEGUARD_BACKEND=python``) gives (kind, resource, both user lines, fingerprint), and every
clean fixture is clean under the Python mode too; the TorchScript programs a dispatch mode breaks run under the
native backend with plain python's output and exit status; and the race between ThroughputBenchmark's
C++ threads is reported on the buffer with the ``add_`` line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch_exit_abort import run_past_torch_exit_abort
from test_cli_fixtures import CLEAN_FIXTURES, FIXTURES, RACE_FIXTURES, ROOT, _expectation, _markers, run_check

from raceguard.capture.native import build

NATIVE_FIXTURES = sorted((FIXTURES / "native").glob("*.py"))
# shared-rng needs each random op's generator and device, which the recorder records too; the
# clean twin runs with the default backend in test_cli_hazards.
RNG_RACES = [p for p in sorted((FIXTURES / "hazards").glob("rng_*.py")) if _expectation(p)[0] != "clean"]


@pytest.fixture(scope="module", autouse=True)
def recorder_built():
    result = build.ensure()  # once per CI run: the cache serves every later process
    if result.module is None:
        pytest.skip(f"native recorder unavailable: {result.reason}")


def _env(backend: str | None) -> dict:
    """The environment with RACEGUARD_BACKEND set to ``backend``, or unset (the default)."""
    env = {k: v for k, v in os.environ.items() if k != "RACEGUARD_BACKEND"}
    return env if backend is None else {**env, "RACEGUARD_BACKEND": backend}


def _findings(report: dict) -> list[tuple]:
    out = []
    for f in report["findings"]:
        lines = []
        for access in f["accesses"]:
            user = [fr for fr in access["stack"][: access.get("user_frames", len(access["stack"]))]]
            lines.append(f"{user[0]['file']}:{user[0]['line']}" if user else "-")
        out.append((f["kind"], f["resource"], tuple(sorted(lines)), f["fingerprint"]))
    return sorted(out)


def _by_place(report: dict) -> dict[tuple, set]:
    """{(kind, resource, both user lines): fingerprints}"""
    out: dict[tuple, set] = {}
    for kind, resource, lines, fingerprint in _findings(report):
        out.setdefault((kind, resource, lines), set()).add(fingerprint)
    return out


@pytest.mark.parametrize("path", RACE_FIXTURES + RNG_RACES, ids=lambda p: p.stem)
def test_race_fixture_findings_are_identical_under_both_backends(path: Path, tmp_path: Path) -> None:
    (tmp_path / "py").mkdir()
    (tmp_path / "native").mkdir()
    proc_py, report_py = run_check(path, tmp_path / "py", env=_env("python"))
    proc_native, report_native = run_check(path, tmp_path / "native", env=_env(None))  # the default
    native, python = _by_place(report_native), _by_place(report_py)
    assert native.keys() == python.keys()
    for place, fingerprints in native.items():
        # One finding per read/write combination on a pair of lines: how many combinations race
        # first depends on the interleaving, under either backend.
        assert fingerprints & python[place], (place, fingerprints, python[place])
    assert not report_native.get("incomplete"), report_native.get("incomplete")
    assert report_native["stats"]["capture_backend"].startswith("native (")  # cached, or built by this run
    assert report_py["stats"]["capture_backend"] == "python (RACEGUARD_BACKEND=python)"
    assert (proc_native.returncode, proc_native.stdout) == (proc_py.returncode, proc_py.stdout)


@pytest.mark.parametrize("path", CLEAN_FIXTURES, ids=lambda p: p.stem)
def test_clean_fixture_is_clean_under_the_python_mode(path: Path, tmp_path: Path) -> None:
    # test_cli_fixtures checks every clean twin with the default (the native recorder here).
    _, report = run_check(path, tmp_path, env=_env("python"))
    assert report["findings"] == [], [f["message"] for f in report["findings"]]
    assert not report.get("incomplete"), report.get("incomplete")
    assert report["stats"]["capture_backend"] == "python (RACEGUARD_BACKEND=python)"


@pytest.mark.parametrize("path", NATIVE_FIXTURES, ids=lambda p: p.stem)
def test_torchscript_programs_run_as_under_plain_python(path: Path, tmp_path: Path) -> None:
    plain = run_past_torch_exit_abort(
        lambda: subprocess.run([sys.executable, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=180)
    )
    proc, report = run_past_torch_exit_abort(lambda: run_check(path, tmp_path, env=_env("native")), lambda r: r[0])
    assert proc.stdout == plain.stdout
    assert not report.get("incomplete"), report.get("incomplete")
    kind, resource = _expectation(path)
    if kind == "clean":
        assert report["findings"] == []
        return
    (finding,) = [f for f in report["findings"] if f["kind"] == kind]
    assert finding["resource"] == resource
    line = _markers(path)["A"]
    for access in finding["accesses"]:
        assert access["stack"][0]["line"] == line and access["stack"][0]["file"].endswith(path.name)
        assert access["thread"].startswith("native thread ")
        assert "started by ThroughputBenchmark.benchmark at " in access["thread"]


def test_a_scripted_shape_error_fails_the_program_as_under_plain_python(tmp_path: Path) -> None:
    path = FIXTURES / "native" / "jit_script_shape_error.py"
    plain = subprocess.run([sys.executable, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=180)
    proc, _ = run_check(path, tmp_path, env=_env("native"))
    assert plain.returncode == 1
    assert "must match the size of tensor b (3)" in proc.stderr
    assert plain.stderr.strip().splitlines()[-1] in proc.stderr
