"""Project configuration: the ``[tool.raceguard]`` table of ``pyproject.toml``.

Settings come from three places, in increasing priority: built-in defaults, the nearest
``pyproject.toml`` that has a ``[tool.raceguard]`` table (found by walking up from the current
directory), and the command line. :class:`Config` keeps, next to every value, where it came from
so that ``--verbose`` and error messages can say "fail-on = 'warning' (from pyproject.toml)".

Keys use the TOML spelling with hyphens (``fail-on``, ``max-reports``). The
``[tool.raceguard.stress]`` sub-table lives in the same flat namespace (``schedules``, ``seed``,
``strategy``, ``depth``, ``jobs``, ``max-time``): none of its names collides with a top-level key, and the CLI
options have the same names.

Pure Python, no torch. :class:`ConfigError` is what every bad setting, unreadable file or bad
suppression line raises; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class ConfigError(Exception):
    """A usage problem in configuration (bad value, unreadable file, malformed line).

    The message is meant for the user as is and names the file (and line, where there is one).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


PYPROJECT = "pyproject.toml"
TABLE = "[tool.raceguard]"
STRESS_TABLE = "[tool.raceguard.stress]"
SOURCE_DEFAULT = "default"
SOURCE_CLI = "command line"

FAIL_ON_CHOICES = ("error", "warning")
STRATEGY_CHOICES = ("random", "pct")
# Keys whose values are paths, resolved against the directory of the pyproject.toml.
PATH_KEYS = ("output", "suppressions", "baseline")

DEFAULTS: dict[str, Any] = {
    "fail-on": "error",
    "format": "text",
    "output": None,  # None: the text report goes to stderr, other formats to raceguard-report.<ext>
    "suppressions": None,
    "baseline": None,
    "timeout": None,  # seconds; None: no limit
    "max-reports": 100,  # findings reported per run; the rest are counted, not printed
    "simulate-cuda": False,  # run CUDA programs on a simulated device in CPU memory
    # [tool.raceguard.stress]
    "schedules": 100,
    "seed": None,  # None: pick a random seed and print it
    "strategy": "pct",
    "depth": 3,  # PCT bug depth: number of priority change points + 1
    "jobs": None,  # None: one per CPU
    # Seconds for a whole stress run (0: no budget): the default schedules of a small program
    # fit easily, and a CI job ends in time when each schedule takes many seconds.
    "max-time": 600.0,
}
TOP_LEVEL_KEYS = ("fail-on", "format", "output", "suppressions", "baseline", "timeout", "max-reports", "simulate-cuda")
STRESS_KEYS = ("schedules", "seed", "strategy", "depth", "jobs", "max-time")


@dataclass
class Config:
    """Effective settings and where each one came from."""

    values: dict[str, Any] = field(default_factory=lambda: dict(DEFAULTS))
    # key -> "default" | "<path>/pyproject.toml:[tool.raceguard]" | "command line"
    sources: dict[str, str] = field(default_factory=lambda: {k: SOURCE_DEFAULT for k in DEFAULTS})
    # The pyproject.toml the values came from, if any.
    path: Path | None = None

    def __getitem__(self, key: str) -> Any:
        return self.values[_normalise_key(key)]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(_normalise_key(key), default)

    def source(self, key: str) -> str:
        return self.sources.get(_normalise_key(key), SOURCE_DEFAULT)

    def describe(self) -> list[str]:
        """One ``key = value  (source)`` line per setting, for ``--verbose`` output."""
        lines = []
        for k in sorted(self.values):
            value = self.values[k]
            meaning = f": {NONE_MEANS[k]}" if value is None and k in NONE_MEANS else ""
            lines.append(f"{k} = {value!r}  ({self.sources.get(k, SOURCE_DEFAULT)}{meaning})")
        return lines


# What an unset (None) setting means, for `raceguard config`.
NONE_MEANS = {
    "output": "the text report goes to stderr, json/sarif/junit to raceguard-report.json/.sarif/.xml",
    "timeout": "no limit",
    "seed": "a random seed, printed",
    "jobs": "one per CPU",
}


def find_pyproject(start_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The nearest ``pyproject.toml`` with a ``[tool.raceguard]`` table, walking up from start_dir.

    The walk stops after the first directory that is a repository root (has ``.git``), so a
    checkout never picks up settings from an unrelated project around it.
    """
    directory = Path(start_dir if start_dir is not None else os.getcwd()).resolve()
    for candidate_dir in (directory, *directory.parents):
        candidate = candidate_dir / PYPROJECT
        if candidate.is_file() and _raceguard_table(_read_toml(candidate), candidate) is not None:
            return candidate
        if (candidate_dir / ".git").exists():
            return None
    return None


def load_config(start_dir: str | os.PathLike[str] | None = None, *, path: str | os.PathLike[str] | None = None) -> Config:
    """Defaults overlaid with the nearest ``[tool.raceguard]`` table.

    ``path`` names a pyproject.toml explicitly (e.g. from a ``--config`` option) instead of
    searching; it is an error if that file cannot be read.
    """
    config = Config()
    if path is not None:
        pyproject: Path | None = Path(path).resolve()
        if not pyproject.is_file():
            raise ConfigError(f"{path}: config file not found")
    else:
        pyproject = find_pyproject(start_dir)
    if pyproject is None:
        return config
    table = _raceguard_table(_read_toml(pyproject), pyproject)
    if table is None:
        return config
    config.path = pyproject
    base_dir = pyproject.parent

    stress = table.get("stress", {})
    if not isinstance(stress, dict):
        raise ConfigError(f"{pyproject}: {TABLE} 'stress' must be a table ({STRESS_TABLE})")
    top = {k: v for k, v in table.items() if k != "stress"}
    for table_name, entries, allowed in ((TABLE, top, TOP_LEVEL_KEYS), (STRESS_TABLE, stress, STRESS_KEYS)):
        where = f"{pyproject}:{table_name}"
        for raw_key, raw_value in entries.items():
            if raw_key not in allowed:
                raise ConfigError(f"{where}: unknown key '{raw_key}'{_suggestion(raw_key, allowed)}")
            value = _validate(raw_key, raw_value, where)
            if raw_key in PATH_KEYS and value is not None:
                value = str((base_dir / value).resolve()) if not os.path.isabs(value) else value
            config.values[raw_key] = value
            config.sources[raw_key] = where
    return config


def merge_cli(config: Config, cli_values: Mapping[str, Any]) -> Config:
    """A new Config where every CLI value that is not None wins over the file and the defaults.

    Keys may be spelled with underscores (click's parameter names) or hyphens. Relative paths
    from the command line stay as the user typed them: they are relative to the current
    directory, which is what the user meant.
    """
    merged = Config(values=dict(config.values), sources=dict(config.sources), path=config.path)
    for raw_key, value in cli_values.items():
        if value is None:
            continue
        key = _normalise_key(raw_key)
        if key in _VALIDATORS:
            value = _validate(key, value, SOURCE_CLI)
        merged.values[key] = value
        merged.sources[key] = SOURCE_CLI
    return merged


# --- validation ------------------------------------------------------------------------------


def _normalise_key(key: str) -> str:
    return key.replace("_", "-")


def _suggestion(key: str, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(_normalise_key(key), allowed, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(allowed)})"


def _is_int(value: Any) -> bool:
    # bool is an int subclass; `timeout = true` is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _choice(choices: tuple[str, ...]) -> Callable[[str, Any, str], Any]:
    def check(key: str, value: Any, where: str) -> Any:
        if value not in choices:
            raise ConfigError(f"{where}: {key} must be one of {', '.join(choices)} (got {value!r})")
        return value

    return check


def _format_choice(key: str, value: Any, where: str) -> Any:
    from raceguard.report.document import FORMATS  # lazy: keeps config importable on its own

    return _choice(FORMATS)(key, value, where)


def _positive_int(key: str, value: Any, where: str) -> Any:
    if not _is_int(value) or value <= 0:
        raise ConfigError(f"{where}: {key} must be a positive integer (got {value!r})")
    return value


def _seed(key: str, value: Any, where: str) -> Any:
    if not _is_int(value) or value < 0:
        raise ConfigError(f"{where}: {key} must be a non-negative integer (got {value!r})")
    return value


def _positive_number(key: str, value: Any, where: str) -> Any:
    if not (_is_int(value) or isinstance(value, float)) or value <= 0:
        raise ConfigError(f"{where}: {key} must be a positive number of seconds (got {value!r})")
    return value


def _seconds_or_zero(key: str, value: Any, where: str) -> Any:
    if not (_is_int(value) or isinstance(value, float)) or value < 0:
        raise ConfigError(f"{where}: {key} must be a number of seconds, 0 for no limit (got {value!r})")
    return value


def _boolean(key: str, value: Any, where: str) -> Any:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false (got {value!r})")
    return value


def _path(key: str, value: Any, where: str) -> Any:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {key} must be a non-empty path string (got {value!r})")
    return value


_VALIDATORS: dict[str, Callable[[str, Any, str], Any]] = {
    "fail-on": _choice(FAIL_ON_CHOICES),
    "format": _format_choice,
    "output": _path,
    "suppressions": _path,
    "baseline": _path,
    "timeout": _positive_number,
    "max-reports": _positive_int,
    "schedules": _positive_int,
    "seed": _seed,
    "strategy": _choice(STRATEGY_CHOICES),
    "depth": _positive_int,
    "jobs": _positive_int,
    "max-time": _seconds_or_zero,
    "simulate-cuda": _boolean,
}


def _validate(key: str, value: Any, where: str) -> Any:
    return _VALIDATORS[key](key, value, where)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e


def _raceguard_table(document: dict[str, Any], path: Path) -> dict[str, Any] | None:
    tool = document.get("tool")
    if not isinstance(tool, dict):
        return None
    table = tool.get("raceguard")
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {TABLE} must be a table")
    return table
