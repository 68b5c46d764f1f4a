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
    assert lines["capture"].startswith(("native recorder (", "python dispatch mode ("))  # and why
    assert lines["pytest plugin"].startswith(("registered", "not registered"))
    assert lines["configuration"] == f"{(tmp_path / 'pyproject.toml').resolve()} [tool.raceguard]"
    assert proc.stdout.splitlines()[0].startswith("raceguard ")


# -- machine-readable reports never mix with the target's stdout ---------------------------------
RACE = FIXTURES / "races" / "state_dict_snapshot.py"
PRINTS = 'import sys, threading\nprint("saved 2650 checkpoints")\nt = threading.Thread(target=print, args=("done",))\nt.start(); t.join()\n'


def _printing_target(tmp_path: Path) -> Path:
    path = tmp_path / "prints.py"
    path.write_text(PRINTS)
    return path


@pytest.mark.parametrize("fmt, name", [("json", "raceguard-report.json"), ("sarif", "raceguard-report.sarif"), ("junit", "raceguard-report.xml")])
def test_machine_format_without_output_goes_to_a_file_and_stdout_is_the_targets(tmp_path: Path, fmt: str, name: str) -> None:
    target = _printing_target(tmp_path)
    plain = subprocess.run([sys.executable, target.name], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    proc = raceguard("check", "--format", fmt, target.name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == plain.stdout == "saved 2650 checkpoints\ndone\n"
    assert f"raceguard: {fmt} report written to {name}" in proc.stderr.splitlines()
    text = (tmp_path / name).read_text()
    if fmt == "json":
        report = json.loads(text)
        validate_report(report)
        assert report["target"] == [target.name] and report["target_exit_code"] == 0
    elif fmt == "sarif":
        assert json.loads(text)["version"] == "2.1.0"
    else:
        import xml.etree.ElementTree as ET

        assert ET.fromstring(text).tag in ("testsuites", "testsuite")


def test_a_racing_target_keeps_its_stdout_and_the_report_with_findings_validates(tmp_path: Path) -> None:
    proc = raceguard("check", "--format", "json", str(RACE), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""  # the fixture prints nothing
    report = json.loads((tmp_path / "raceguard-report.json").read_text())
    validate_report(report)
    assert report["findings"] and report["status"] == "findings"


def test_report_on_stdout_is_refused_where_a_target_runs_and_exact_json_for_merge(tmp_path: Path) -> None:
    for command in ("check", "stress", "replay"):
        extra = ["--seed", "1"] if command == "replay" else []
        proc = raceguard(command, *extra, "--format", "json", "-o", "-", str(RACE), cwd=tmp_path)
        assert proc.returncode == 2, (command, proc.stderr)
        assert proc.stderr.splitlines() == [
            "raceguard: error: --output -: stdout carries the target's own output; write the report to a file (-o FILE)"
        ]
        assert proc.stdout == ""
    one = tmp_path / "one.json"
    assert raceguard("check", "--format", "json", "-o", str(one), str(_printing_target(tmp_path)), cwd=tmp_path).returncode == 0
    merged = raceguard("merge", str(one), "--format", "json", "-o", "-", cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    report = json.loads(merged.stdout)  # all of stdout, and nothing else
    validate_report(report)
    assert report["command"] == "merge"
    default = raceguard("merge", str(one), "--format", "json", cwd=tmp_path)
    assert default.stdout == "" and "raceguard: json report written to raceguard-report.json" in default.stderr


def test_stress_without_output_writes_the_default_file(tmp_path: Path) -> None:
    target = _printing_target(tmp_path)
    proc = raceguard("stress", "--schedules", "2", "--seed", "1", "--jobs", "1", "--format", "json", target.name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # stress keeps the schedules' output to itself
    report = json.loads((tmp_path / "raceguard-report.json").read_text())
    validate_report(report)
    assert report["command"] == "stress"


# -- usage errors are answered before the target's process is used --------------------------------
@pytest.mark.parametrize("args, message", [
    (["check", "missing.py"], "can't open file 'missing.py': No such file or directory"),
    (["check", "."], "'.' is a directory, not a Python script"),
    (["check", "-m", "no_such_module_rg"], "No module named no_such_module_rg"),
    (["check", "-m", "no_such_package_rg.sub"],
     "Error while finding module specification for 'no_such_package_rg.sub' (ModuleNotFoundError: No module named 'no_such_package_rg')"),
    (["stress", "missing.py"], "can't open file 'missing.py': No such file or directory"),
    (["replay", "--seed", "1", "-m", "no_such_module_rg"], "No module named no_such_module_rg"),
])
def test_a_target_that_cannot_start_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    proc = raceguard(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"raceguard: error: {message}"]
    assert proc.stdout == ""


def test_a_missing_submodule_imports_its_package_once_as_under_python(tmp_path: Path) -> None:
    """Only the top-level package is looked up before the target's process runs: importing the
    package there would run its code in raceguard's process too."""
    pkg = tmp_path / "pkg_rg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import os\nopen(os.path.join(os.path.dirname(__file__), '..', 'imported'), 'a').write('x\\n')\n")
    proc = raceguard("check", "-m", "pkg_rg.nosuch", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["raceguard: error: No module named pkg_rg.nosuch"]
    assert (tmp_path / "imported").read_text() == "x\n"


# -- --write-baseline, -v, check -m without a module -----------------------------------------------
def test_write_baseline_is_a_success_and_says_what_it_wrote(tmp_path: Path) -> None:
    baseline = tmp_path / "baseline.json"
    proc = raceguard("check", "-q", "--write-baseline", str(baseline), str(RACE), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    n = len(json.loads(baseline.read_text())["fingerprints"])
    assert n >= 1
    assert proc.stderr.splitlines()[-1] == f"raceguard: baseline: {n} finding{'' if n == 1 else 's'} written to {baseline}"
    again = raceguard("check", "-q", "--baseline", str(baseline), str(RACE), cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_verbose_prints_the_configuration_before_the_target_runs(tmp_path: Path) -> None:
    target = tmp_path / "says.py"
    target.write_text("import sys\nprint('TARGET RAN', file=sys.stderr)\n")
    proc = raceguard("check", "-v", target.name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    config = [i for i, line in enumerate(lines) if line.startswith("raceguard: config: ")]
    assert config and max(config) < lines.index("TARGET RAN")
    assert "raceguard: config: fail-on = 'error'  (default)" in lines


@pytest.mark.parametrize("command", ["check", "stress"])
def test_m_without_a_module_shows_the_usage_and_one_error_line(command: str) -> None:
    proc = raceguard(command, "-m")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == f"Usage: raceguard {command} [OPTIONS] [TARGET]..."
    assert proc.stderr.splitlines()[-1] == "Error: Option '-m' requires an argument."


def test_a_short_watch_block_shows_its_duration_not_zero() -> None:
    import threading

    import torch

    import raceguard
    from raceguard.report.text import summary_line

    weight = torch.zeros(4)

    def step() -> None:
        weight.add_(1)

    with raceguard.watch() as session:
        worker = threading.Thread(target=step)
        worker.start()
        worker.join()
    report = session.report()
    assert report.stats["wall_seconds"] > 0
    line = summary_line(report)
    assert not line.endswith(" 0.0 s"), line
    assert line.endswith((" ms", " s"))


def test_doctor_names_an_installed_copy_that_a_source_tree_shadows(tmp_path: Path) -> None:
    import shutil

    from raceguard.cli.distribution import DISTRIBUTION, providers

    installed = [p for p in providers() if p.name == DISTRIBUTION]
    if not installed:
        pytest.skip(f"{DISTRIBUTION} is not installed in this environment")
    import raceguard as package

    shutil.copytree(Path(package.__file__).parent, tmp_path / "raceguard", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    proc = raceguard("doctor", cwd=tmp_path, env=_env_with_path(tmp_path))
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()[:2]
    assert first.startswith("raceguard ") and str(tmp_path / "raceguard") in first
    assert second.startswith(f"note: {DISTRIBUTION} ") and installed[0].location in second
