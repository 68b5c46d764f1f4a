"""Ordinary programs (fixtures/programs) run unchanged under raceguard, with zero findings.

Each is run by plain python, by ``raceguard check``, and by ``raceguard check`` through the
CUDA-on-CPU backend (every tensor device memory, every thread on the default stream; on a GPU
machine the programs use the real device instead). stdout must be identical, the target's own
stderr too, the exit code 0, no finding, nothing lost to raceguard's own errors.
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
PROGRAMS = ROOT / "fixtures" / "programs"
MODES = {"host": {}, "cuda-on-cpu": {"RACEGUARD_SIMULATE_CUDA": "1"}}


def _programs() -> list[Path]:
    return sorted(p for p in PROGRAMS.glob("*.py") if not p.name.startswith("_"))


def _own_stderr(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("raceguard")]


_plain_cache: dict[str, subprocess.CompletedProcess] = {}


def _plain(path: Path) -> subprocess.CompletedProcess:
    if path.name not in _plain_cache:
        _plain_cache[path.name] = subprocess.run(
            [sys.executable, path.name], cwd=PROGRAMS, capture_output=True, text=True, timeout=180
        )
    return _plain_cache[path.name]


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("path", _programs(), ids=lambda p: p.stem)
def test_ordinary_program_runs_unchanged_and_clean(path: Path, mode: str, tmp_path: Path) -> None:
    plain = _plain(path)
    assert plain.returncode == 0, plain.stderr
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "raceguard", "check", "--format", "json", "-o", str(out), path.name],
        cwd=PROGRAMS,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **MODES[mode]},
    )
    report = json.loads(out.read_text())
    validate_report(report)
    assert proc.stdout == plain.stdout
    assert _own_stderr(proc.stderr) == _own_stderr(plain.stderr)
    assert [f["message"] for f in report["findings"]] == []
    assert "incomplete" not in report, report["incomplete"]["errors"][0]["traceback"]
    assert proc.returncode == 0, proc.stderr
