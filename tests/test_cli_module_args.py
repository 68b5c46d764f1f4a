"""`-m MODULE ARGS` as python does it: everything after the module name is the module's, options
included; raceguard's own options go before `-m`. For `check`, `stress` and `replay`, through the
public CLI, compared with plain `python -m`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_cli_targets import TARGETS, plain, raceguard


@pytest.fixture
def unsorted_json(tmp_path: Path) -> Path:
    path = tmp_path / "f.json"
    path.write_text('{"b": 1, "a": {"d": [1, 2], "c": null}}')
    return path


def test_check_passes_options_after_the_module_to_it(unsorted_json: Path) -> None:
    expected = plain("-m", "json.tool", "--sort-keys", str(unsorted_json))
    got = raceguard("check", "-m", "json.tool", "--sort-keys", str(unsorted_json))
    assert expected.returncode == 0 and '"a"' in expected.stdout.split("\n")[1]  # sorted: a first
    assert got.returncode == 0, got.stderr
    assert got.stdout == expected.stdout


@pytest.mark.parametrize(
    "module_args",
    [
        ["--sort-keys", "-x", "--format", "json", "-q"],  # raceguard's own option names, too
        ["--", "-m", "other", "--timeout", "1"],  # `--` after the module is the module's
        ["-h"],
        [],
    ],
)
def test_check_gives_the_module_the_argv_python_gives_it(module_args: list[str]) -> None:
    expected = plain("-m", "echo_pkg", *module_args, cwd=TARGETS)
    got = raceguard("check", "-q", "-m", "echo_pkg", *module_args, cwd=TARGETS)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == json.loads(expected.stdout)


@pytest.mark.parametrize(
    "before",
    [
        ["--format", "json", "--output", "{out}"],
        ["--format=json", "-o{out}", "-q"],
        ["-qo", "{out}", "--format", "json"],  # grouped short options, the last one with a value
    ],
)
def test_raceguard_options_before_dash_m_still_apply(before: list[str], tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    opts = [arg.replace("{out}", str(out)) for arg in before]
    expected = plain("-m", "echo_pkg", "--format", "text", cwd=TARGETS)
    got = raceguard("check", *opts, "-m", "echo_pkg", "--format", "text", cwd=TARGETS)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == json.loads(expected.stdout)
    assert json.loads(out.read_text())["target"] == ["-m", "echo_pkg", "--format", "text"]


def test_module_name_attached_to_dash_m(unsorted_json: Path) -> None:
    expected = plain("-mjson.tool", "--indent", "1", str(unsorted_json))
    got = raceguard("check", "-q", "-mjson.tool", "--indent", "1", str(unsorted_json))
    assert got.returncode == 0, got.stderr
    assert got.stdout == expected.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["check", "--no-such-option", "-m", "json.tool"],  # before -m: still raceguard's, still wrong
        ["check", "-m"],
    ],
)
def test_usage_errors_before_the_module_are_still_raceguards(args: list[str]) -> None:
    proc = raceguard(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_dash_m_after_the_script_belongs_to_the_script() -> None:
    expected = plain("echo_argv.py", "-m", "json.tool", cwd=TARGETS)
    got = raceguard("check", "-q", "echo_argv.py", "-m", "json.tool", cwd=TARGETS)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == json.loads(expected.stdout)


def test_torch_distributed_run_gets_its_options(tmp_path: Path) -> None:
    train = tmp_path / "train.py"
    # One write per worker (print writes each argument separately, and two workers' pieces
    # interleave on the shared pipe, under plain python too).
    train.write_text(
        'import os, sys\nsys.stdout.write(f"rank {os.environ[\'RANK\']} of {os.environ[\'WORLD_SIZE\']} {sys.argv[1:]}\\n")\n'
    )
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(train), "--epochs", "1"]
    expected = plain(*args)
    got = raceguard("check", "-q", *args)
    assert expected.returncode == 0, expected.stderr
    assert got.returncode == 0, got.stderr
    def ranks(out: str) -> list[str]:  # the workers print concurrently, blank lines come and go
        return sorted(line for line in out.splitlines() if line.strip())

    assert ranks(got.stdout) == ranks(expected.stdout)
    assert "rank 1 of 2 ['--epochs', '1']" in got.stdout


def test_stress_passes_options_after_the_module_to_it(unsorted_json: Path, tmp_path: Path) -> None:
    # stress keeps the target's stdout to itself: json.tool writes its output file instead.
    plain("-m", "json.tool", "--sort-keys", str(unsorted_json), str(tmp_path / "expected.json"))
    out = tmp_path / "got.json"
    report = tmp_path / "report.json"
    proc = raceguard("stress", "--schedules", "1", "-j", "1", "--format", "json", "-o", str(report),
                     "-m", "json.tool", "--sort-keys", str(unsorted_json), str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == (tmp_path / "expected.json").read_text()
    assert json.loads(report.read_text())["target"] == ["-m", "json.tool", "--sort-keys", str(unsorted_json), str(out)]


def test_replay_passes_options_after_the_module_to_it(unsorted_json: Path) -> None:
    expected = plain("-m", "json.tool", "--sort-keys", str(unsorted_json))
    # pct without --pct-steps runs a calibration first: its output is discarded, the user sees one run
    got = raceguard("replay", "--seed", "1", "-q", "-m", "json.tool", "--sort-keys", str(unsorted_json))
    assert got.returncode == 0, got.stderr
    assert got.stdout == expected.stdout
