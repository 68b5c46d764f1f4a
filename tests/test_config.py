"""[tool.raceguard] configuration: discovery, validation, sources, command-line overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from raceguard.config import DEFAULTS, ConfigError, find_pyproject, load_config, merge_cli


def project(root: Path, toml: str) -> Path:
    """A repository root (with .git, so the walk stops there) holding ``pyproject.toml``."""
    (root / ".git").mkdir(exist_ok=True)
    path = root / "pyproject.toml"
    path.write_text(toml, encoding="utf-8")
    return path


FULL = """
[project]
name = "demo"

[tool.raceguard]
fail-on = "warning"
format = "sarif"
output = "reports/raceguard.sarif"
suppressions = "raceguard.supp"
baseline = "/abs/baseline.json"
timeout = 30
max-reports = 5

[tool.raceguard.stress]
schedules = 500
seed = 42
strategy = "random"
depth = 2
jobs = 4
"""


def test_defaults_without_pyproject(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    config = load_config(tmp_path)
    assert config.values == DEFAULTS
    assert set(config.sources.values()) == {"default"}
    assert config.path is None


def test_values_and_sources_from_pyproject_found_by_walking_up(tmp_path: Path) -> None:
    pyproject = project(tmp_path, FULL)
    nested = tmp_path / "src" / "pkg"
    nested.mkdir(parents=True)
    config = load_config(nested)
    assert config.path == pyproject.resolve()
    assert config["fail-on"] == "warning" and config["format"] == "sarif"
    assert config["timeout"] == 30 and config["max-reports"] == 5
    assert (config["schedules"], config["seed"], config["strategy"], config["depth"], config["jobs"]) == (500, 42, "random", 2, 4)
    assert config.sources["fail-on"] == f"{pyproject.resolve()}:[tool.raceguard]"
    assert config.sources["schedules"] == f"{pyproject.resolve()}:[tool.raceguard.stress]"


def test_relative_paths_resolve_against_the_pyproject_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project(tmp_path, FULL)
    nested = tmp_path / "sub"
    nested.mkdir()
    monkeypatch.chdir(nested)  # the default start directory is the cwd
    config = load_config()
    root = tmp_path.resolve()
    assert config["output"] == str(root / "reports" / "raceguard.sarif")
    assert config["suppressions"] == str(root / "raceguard.supp")
    assert config["baseline"] == "/abs/baseline.json"


def test_pyproject_without_raceguard_table_is_skipped(tmp_path: Path) -> None:
    project(tmp_path, '[tool.raceguard]\nfail-on = "warning"\n')
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "pyproject.toml").write_text('[project]\nname = "inner"\n', encoding="utf-8")
    assert load_config(inner)["fail-on"] == "warning"


def test_walk_stops_at_the_repository_root(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.raceguard]\nfail-on = "warning"\n', encoding="utf-8")
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    assert find_pyproject(repo) is None
    assert load_config(repo)["fail-on"] == "error"


def test_explicit_path(tmp_path: Path) -> None:
    path = tmp_path / "custom.toml"
    path.write_text("[tool.raceguard]\nmax-reports = 7\n", encoding="utf-8")
    assert load_config(path=path)["max-reports"] == 7
    with pytest.raises(ConfigError, match="not found"):
        load_config(path=tmp_path / "missing.toml")


def test_command_line_wins_and_is_recorded(tmp_path: Path) -> None:
    project(tmp_path, FULL)
    config = load_config(tmp_path)
    merged = merge_cli(config, {"fail_on": "error", "format": None, "max-reports": 9, "schedules": None, "seed": 0, "output": "out.sarif"})
    assert merged["fail-on"] == "error" and merged.sources["fail-on"] == "command line"
    assert merged["max-reports"] == 9 and merged.source("max_reports") == "command line"
    assert merged["seed"] == 0 and merged.sources["seed"] == "command line"  # 0 is a value, not "unset"
    assert merged["output"] == "out.sarif"  # relative to the cwd, as typed
    assert merged["format"] == "sarif" and merged.sources["format"].endswith(":[tool.raceguard]")
    assert merged["schedules"] == 500
    assert config["fail-on"] == "warning"  # the original is untouched
    assert any(line.startswith("fail-on = 'error'  (command line)") for line in merged.describe())


@pytest.mark.parametrize(
    "toml, fragment",
    [
        ('fail-on = "fatal"', "fail-on must be one of error, warning"),
        ('format = "xml"', "format must be one of text, json, sarif, junit"),
        ("timeout = -1", "timeout must be a positive number"),
        ("timeout = true", "timeout must be a positive number"),
        ('timeout = "10"', "timeout must be a positive number"),
        ("max-reports = 0", "max-reports must be a positive integer"),
        ("max-reports = 1.5", "max-reports must be a positive integer"),
        ('output = ""', "output must be a non-empty path"),
        ("suppressions = 3", "suppressions must be a non-empty path"),
        ('fail_on = "error"', "unknown key 'fail_on' (did you mean 'fail-on'?)"),
        ("stress = 3", "'stress' must be a table"),
        ("[tool.raceguard.stress]\nschedules = 0", "schedules must be a positive integer"),
        ('[tool.raceguard.stress]\nschedules = "10"', "schedules must be a positive integer"),
        ("[tool.raceguard.stress]\njobs = true", "jobs must be a positive integer"),
        ("[tool.raceguard.stress]\nseed = -1", "seed must be a non-negative integer"),
        ('[tool.raceguard.stress]\nstrategy = "dfs"', "strategy must be one of random, pct"),
        ("[tool.raceguard.stress]\ndepth = 0", "depth must be a positive integer"),
        ("[tool.raceguard.stress]\nfail-on = 'error'", "unknown key 'fail-on'"),
    ],
)
def test_invalid_values_raise_config_error_naming_the_file(tmp_path: Path, toml: str, fragment: str) -> None:
    pyproject = project(tmp_path, f"[tool.raceguard]\n{toml}\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert fragment in str(info.value)
    assert str(pyproject.resolve()) in str(info.value)


def test_invalid_toml_raises_config_error(tmp_path: Path) -> None:
    project(tmp_path, "[tool.raceguard\nfail-on = 1\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(tmp_path)


def test_raceguard_must_be_a_table(tmp_path: Path) -> None:
    project(tmp_path, '[tool]\nraceguard = "yes"\n')
    with pytest.raises(ConfigError, match=r"pyproject.toml: \[tool.raceguard\] must be a table"):
        load_config(tmp_path)


@pytest.mark.parametrize("values", [{"fail_on": "fatal"}, {"jobs": 0}, {"format": "html"}, {"timeout": 0}])
def test_invalid_command_line_values(tmp_path: Path, values: dict) -> None:
    (tmp_path / ".git").mkdir()
    with pytest.raises(ConfigError, match="^command line: "):
        merge_cli(load_config(tmp_path), values)


def test_timeout_accepts_floats(tmp_path: Path) -> None:
    project(tmp_path, "[tool.raceguard]\ntimeout = 2.5\n")
    assert load_config(tmp_path)["timeout"] == 2.5


def test_jobs_defaults_to_one_per_cpu_as_stress_uses_it(tmp_path):
    # `raceguard config` shows what `stress` does: no number of jobs unless one is configured.
    config = load_config(tmp_path)
    assert config["jobs"] is None and config.source("jobs") == "default"
    lines = config.describe()
    assert "jobs = None  (default: one per CPU)" in lines
    assert "timeout = None  (default: no limit)" in lines
    assert "baseline = None  (default)" in lines  # nothing to explain
