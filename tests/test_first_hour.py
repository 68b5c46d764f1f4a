"""What a new user meets first: which distribution runs (PyPI's `raceguard` is another project),
`raceguard doctor`, machine-readable reports kept out of the target's stdout, usage errors
answered before the target's process is used, `--write-baseline` as a success, and the small
things the first runs show (`-v`, `check -m` without a module, a `watch()` summary's duration)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from raceguard.report.document import validate_report
from test_cli_fixtures import FIXTURES, ROOT

RACEGUARD = [sys.executable, "-m", "raceguard"]


def raceguard(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*RACEGUARD, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _env_with_path(entry: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(entry), env.get("PYTHONPATH", "")) if p)
    return env


def _fake_other_raceguard(site: Path, version: str = "0.2.1") -> None:
    """The metadata PyPI's unrelated `raceguard` distribution installs (no code needed)."""
    info = site / f"raceguard-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: raceguard\nVersion: {version}\n")
    (info / "top_level.txt").write_text("raceguard\n")
    (info / "RECORD").write_text(f"raceguard/__init__.py,,\nraceguard-{version}.dist-info/METADATA,,\n")


# -- which distribution runs ----------------------------------------------------------------------
def test_version_names_the_running_package_and_its_distribution() -> None:
    proc = raceguard("--version")
    assert proc.returncode == 0, proc.stderr
    [line] = proc.stdout.splitlines()
    assert line.startswith("raceguard ")
    import raceguard as package

    # Installed as torch-raceguard, or run from a source tree on sys.path: either is named.
    assert "from distribution torch-raceguard" in line or os.path.dirname(package.__file__) in line
    assert "warning" not in proc.stderr


def test_pypi_raceguard_installed_alongside_is_named_by_version_and_doctor(tmp_path: Path) -> None:
    _fake_other_raceguard(tmp_path)
    env = _env_with_path(tmp_path)
    version = raceguard("--version", env=env)
    assert version.returncode == 0
    [warning] = version.stderr.splitlines()
    assert warning.startswith("warning: distribution 'raceguard' 0.2.1 is installed")
    assert "pip uninstall raceguard" in warning and "torch-raceguard" in warning
    doctor = raceguard("doctor", env=env)
    assert doctor.returncode == 0
    assert warning in doctor.stdout.splitlines()


def test_doctor_says_what_a_run_would_use(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.raceguard]\nmax-reports = 7\n")
    proc = raceguard("doctor", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in proc.stdout.splitlines()[1:]}
    import torch

    assert lines["python"].startswith(f"{platform.python_implementation()} {platform.python_version()} ")
    assert lines["torch"].startswith(torch.__version__)
    assert ("CUDA" in lines["torch"]) == bool(torch.version.cuda)
    assert lines["capture"]
    assert lines["pytest plugin"].startswith(("registered", "not registered"))
    assert lines["configuration"] == f"{(tmp_path / 'pyproject.toml').resolve()} [tool.raceguard]"
    assert proc.stdout.splitlines()[0].startswith("raceguard ")
