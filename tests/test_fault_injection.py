"""raceguard never changes what the target does, even when its own hooks fail.

Each hook family is made to raise inside a real target (fixtures/faults/inject.py patches
raceguard's internals in the target's process). The target's stdout, its own stderr and its
exit code must be exactly those of plain python; the report must say the analysis is incomplete
(``incomplete``, ``stats.internal_errors``, one stderr line) and carry no finding about the
target that the failure could have made up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raceguard.report.document import validate_report

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "fixtures" / "faults" / "inject.py"
FAMILIES = ["dispatch", "dispatch-after", "gpu-trace", "cuda-api", "module", "sync", "threads", "rng", "origins", "naming", "wrappers", "torchscript", "os-exit"]
ENV = {**os.environ, "RACEGUARD_SIMULATE_CUDA": "1"}
# The native recorder runs only where no CUDA (simulated or real) is in play.
NATIVE_ENV = {**{k: v for k, v in os.environ.items() if k != "RACEGUARD_SIMULATE_CUDA"}, "RACEGUARD_BACKEND": "native"}


def _target_stderr(text: str) -> list[str]:
    """The target's own stderr: raceguard's lines (they all start with 'raceguard') left out."""
    return [line for line in text.splitlines() if not line.startswith("raceguard")]


def _plain(*args: str, env: dict = ENV) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TARGET), *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def _checked(tmp_path: Path, *args: str, env: dict = ENV) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "raceguard", "check", "--format", "json", "-o", str(out), str(TARGET), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    report = json.loads(out.read_text())
    validate_report(report)
    return proc, report


@pytest.mark.parametrize("family", FAMILIES)
def test_a_failing_hook_family_leaves_the_target_unchanged(family: str, tmp_path: Path) -> None:
    plain = _plain(family)
    assert plain.returncode == 0, plain.stderr
    proc, report = _checked(tmp_path, family)
    _assert_unchanged_and_incomplete(plain, proc, report)


def _native_family_errors(tmp_path: Path, family: str) -> list[dict]:
    """Run ``family`` under the native recorder (skip without one): the target stays unchanged,
    the report incomplete; its errors."""
    plain = _plain(family, env=NATIVE_ENV)
    assert plain.returncode == 0, plain.stderr
    proc, report = _checked(tmp_path, family, env=NATIVE_ENV)
    if not report["stats"].get("capture_backend", "").startswith("native"):
        pytest.skip(f"native recorder unavailable: {report['stats'].get('capture_backend')}")
    _assert_unchanged_and_incomplete(plain, proc, report)
    return report["incomplete"]["errors"]


def test_a_failing_native_random_draw_leaves_the_target_unchanged(tmp_path: Path) -> None:
    draws = [e for e in _native_family_errors(tmp_path, "rng-draw") if "recording a random draw" in e["message"]]
    assert draws and "InjectedFault" in draws[0]["message"]


def test_a_failing_native_site_capture_leaves_the_target_unchanged(tmp_path: Path) -> None:
    errors = _native_family_errors(tmp_path, "native-site")
    sites = [e for e in errors if "InjectedFault" in e["traceback"] and "capture" in e["traceback"]]
    assert sites, errors


def test_a_failing_native_drain_before_reading_gradients_leaves_the_target_unchanged(tmp_path: Path) -> None:
    errors = _native_family_errors(tmp_path, "native-settle")
    scans = [e for e in errors if "noting gradients between backward passes" in e["message"]]
    assert scans and "InjectedFault" in scans[0]["message"], errors


def test_a_failing_wait_for_ended_threads_leaves_the_target_unchanged(tmp_path: Path) -> None:
    plain = _plain("thread-exits")
    proc, report = _checked(tmp_path, "thread-exits")
    _assert_unchanged_and_incomplete(plain, proc, report)
    waits = [e for e in report["incomplete"]["errors"] if "waiting for ended threads" in e["message"]]
    assert waits and "InjectedFault" in waits[0]["message"], report["incomplete"]["errors"]


def _assert_unchanged_and_incomplete(plain: subprocess.CompletedProcess, proc: subprocess.CompletedProcess, report: dict) -> None:
    assert proc.stdout == plain.stdout
    assert _target_stderr(proc.stderr) == _target_stderr(plain.stderr)
    assert proc.returncode == 0, proc.stderr  # clean: the failure is raceguard's, not the target's
    assert report["status"] == "clean", [f["message"] for f in report["findings"]]
    assert report["findings"] == []
    lost = report["incomplete"]
    assert lost["internal_errors"] >= 1
    assert report["stats"]["internal_errors"] == lost["internal_errors"]
    assert any("InjectedFault" in e["message"] and "InjectedFault" in e["traceback"] for e in lost["errors"])
    raceguard_lines = [line for line in proc.stderr.splitlines() if line.startswith("raceguard: internal error")]
    assert len(raceguard_lines) == 1, proc.stderr
    assert "analysis incomplete" in proc.stderr


@pytest.mark.parametrize("family", ["dispatch", "sync"])
def test_the_targets_own_exception_is_unchanged_when_a_hook_fails(family: str, tmp_path: Path) -> None:
    plain = _plain(family, "raise")
    assert plain.returncode == 1
    proc, report = _checked(tmp_path, family, "raise")
    assert proc.stdout == plain.stdout
    assert _target_stderr(proc.stderr) == _target_stderr(plain.stderr)
    assert "ValueError: the target's own error" in proc.stderr
    assert proc.returncode == 3  # the target failed and no finding explains it
    assert report["target_exit_code"] == 1
    assert report["incomplete"]["internal_errors"] >= 1


def test_text_report_says_the_analysis_is_incomplete(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "raceguard", "check", str(TARGET), "module"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env=ENV,
    )
    assert proc.returncode == 0
    summary = proc.stderr.strip().splitlines()[-1]
    assert summary.startswith("raceguard: clean")
    assert "analysis incomplete" in summary
