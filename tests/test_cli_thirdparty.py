"""Real third-party model code through the public CLI: every program of ``fixtures/thirdparty``.

Same conventions as ``test_cli_fixtures.py`` (whose helpers are reused). The models are built from
a config with random weights, and sentence-transformers loads one saved to a temporary directory:
nothing is downloaded. Each program is skipped when its library is not installed.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from test_cli_fixtures import FIXTURES, _expectation, _innermost_user_line, _markers, run_check

THIRDPARTY = FIXTURES / "thirdparty"
PROGRAMS = sorted(THIRDPARTY.glob("*.py"))


def _needs(path: Path) -> list[str]:
    """Top-level packages the program imports that are not torch or the standard library."""
    text = path.read_text()
    names = re.findall(r"^(?:from|import)\s+(transformers|sentence_transformers)\b", text, re.M)
    return sorted(set(names))


def _skip_without_libraries(path: Path) -> None:
    missing = [n for n in _needs(path) if importlib.util.find_spec(n) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")


def test_every_program_needs_a_library_and_declares_an_expectation() -> None:
    assert len(PROGRAMS) >= 3
    for path in PROGRAMS:
        assert _needs(path), path.name
        _expectation(path)


@pytest.mark.parametrize("path", [p for p in PROGRAMS if _expectation(p)[0] == "clean"], ids=lambda p: p.stem)
def test_thirdparty_clean_program_has_no_findings(path: Path, tmp_path: Path) -> None:
    _skip_without_libraries(path)
    proc, report = run_check(path, tmp_path)
    assert report["findings"] == [], "\n".join(f["message"] for f in report["findings"])
    assert report["status"] == "clean"
    assert proc.returncode == 0, proc.stderr
    assert report["stats"]["ops"] > 0


@pytest.mark.parametrize("path", [p for p in PROGRAMS if _expectation(p)[0] != "clean"], ids=lambda p: p.stem)
def test_thirdparty_race_names_the_parameter_and_both_user_lines(path: Path, tmp_path: Path) -> None:
    _skip_without_libraries(path)
    kind, resource = _expectation(path)
    markers = _markers(path)
    proc, report = run_check(path, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert report["target_exit_code"] == 0
    findings = report["findings"]
    assert [f["kind"] for f in findings] == [kind], [f["message"] for f in findings]
    [finding] = findings
    resources = [finding["resource"], *finding.get("details", {}).get("also_on", [])]
    assert resource in resources, resources
    assert all(r.startswith("model.") and r.endswith((".weight", ".bias")) for r in resources), resources
    assert finding["resource_kind"] == "parameter"
    lines = {_innermost_user_line(a, path) for a in finding["accesses"]}
    assert lines == {markers["A"], markers["B"]}, lines
    assert {a["mode"] for a in finding["accesses"]} == {"read", "write"}
    assert len({a["thread"] for a in finding["accesses"]}) == 2
