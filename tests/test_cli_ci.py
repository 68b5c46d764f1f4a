"""CI gating through the public CLI: SARIF (validated against the official 2.1.0 schema), JUnit,
baselines, suppressions, pyproject configuration, and their usage errors (exit 2)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema

from test_cli_fixtures import FIXTURES, ROOT

RACE = FIXTURES / "races" / "inplace_counter.py"
OTHER_RACE = FIXTURES / "races" / "lock_not_shared.py"
SARIF_SCHEMA = ROOT / "tests" / "data" / "sarif-schema-2.1.0.json"


def raceguard(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raceguard", *args], cwd=cwd, capture_output=True, text=True, timeout=180)


def test_sarif_output_validates_and_points_at_the_racing_line(tmp_path: Path) -> None:
    out = tmp_path / "r.sarif"
    proc = raceguard("check", "--format", "sarif", "--output", str(out), str(RACE))
    assert proc.returncode == 1, proc.stderr
    sarif = json.loads(out.read_text())
    jsonschema.Draft7Validator(json.loads(SARIF_SCHEMA.read_text())).validate(sarif)
    [result] = sarif["runs"][0]["results"]
    assert result["ruleId"] == "data-race"
    location = result["locations"][0]["physicalLocation"]
    assert location["artifactLocation"]["uri"] == "fixtures/races/inplace_counter.py"
    lines = RACE.read_text().splitlines()
    assert "# RACE:" in lines[location["region"]["startLine"] - 1]
    assert result["relatedLocations"] and result["codeFlows"][0]["threadFlows"]
    assert result["partialFingerprints"]


def test_junit_output_has_one_failure_per_finding(tmp_path: Path) -> None:
    out = tmp_path / "r.xml"
    proc = raceguard("check", "--format", "junit", "--output", str(out), str(RACE))
    assert proc.returncode == 1
    root = ET.parse(out).getroot()
    cases = root.iter("testcase")
    failures = [f for case in cases for f in case.iter("failure")]
    assert len(failures) == 1
    assert failures[0].get("type") == "data-race"
    assert "inplace_counter.py" in (failures[0].text or "")


def test_baseline_turns_a_known_race_green_and_a_new_race_red(tmp_path: Path) -> None:
    baseline = tmp_path / "baseline.json"
    proc = raceguard("check", "-q", "--write-baseline", str(baseline), str(RACE))
    assert proc.returncode == 0  # recording the known findings is a success
    assert json.loads(baseline.read_text())["fingerprints"]
    # The same race with the baseline: known, so green, and listed as suppressed.
    out = tmp_path / "known.json"
    proc = raceguard("check", "--baseline", str(baseline), "--format", "json", "--output", str(out), str(RACE))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["findings"] == [] and len(report["suppressed"]) == 1
    # A different race is new: red, and the baselined one is listed as fixed.
    out = tmp_path / "new.json"
    proc = raceguard("check", "--baseline", str(baseline), "--format", "json", "--output", str(out), str(OTHER_RACE))
    assert proc.returncode == 1
    report = json.loads(out.read_text())
    assert len(report["findings"]) == 1
    known = [entry["fingerprint"] for entry in json.loads(baseline.read_text())["fingerprints"]]
    assert report["fixed"] == known


def test_suppressions_file_silences_a_matching_race(tmp_path: Path) -> None:
    supp = tmp_path / "raceguard.supp"
    supp.write_text("# the counter is statistics only\ndata-race:*inplace_counter.py*\n")
    out = tmp_path / "r.json"
    proc = raceguard("check", "--suppressions", str(supp), "--format", "json", "--output", str(out), str(RACE))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["findings"] == []
    assert "suppression" in report["suppressed"][0]["suppressed"]
    assert "1 suppressed" in proc.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.supp"
    bad.write_text("no-such-kind:*\n")
    proc = raceguard("check", "--suppressions", str(bad), str(RACE))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "bad.supp:1" in proc.stderr
    proc = raceguard("check", "--baseline", str(tmp_path / "missing.json"), str(RACE))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    proc = raceguard("check", "--format", "xml", str(RACE))
    assert proc.returncode == 2


def test_pyproject_configuration_and_command_line_precedence(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    (project / ".git").mkdir()  # the configuration search stops at the repository root
    shutil.copy(RACE, project / "counter.py")
    (project / "pyproject.toml").write_text('[tool.raceguard]\nformat = "json"\noutput = "from-config.json"\n')
    proc = raceguard("config", cwd=project)
    assert proc.returncode == 0
    assert "format = 'json'" in proc.stdout and "pyproject.toml:[tool.raceguard]" in proc.stdout
    proc = raceguard("check", "-q", "counter.py", cwd=project)
    assert proc.returncode == 1
    assert json.loads((project / "from-config.json").read_text())["findings"]
    proc = raceguard("check", "-q", "--format", "junit", "--output", "cli.xml", "counter.py", cwd=project)
    assert proc.returncode == 1
    ET.parse(project / "cli.xml")
    (project / "pyproject.toml").write_text('[tool.raceguard]\nfail-on = "sometimes"\n')
    proc = raceguard("check", "counter.py", cwd=project)
    assert proc.returncode == 2 and "pyproject.toml" in proc.stderr and "Traceback" not in proc.stderr


def test_benign_annotation_reports_intentional_races_as_suppressed(tmp_path: Path) -> None:
    path = FIXTURES / "ci" / "hogwild_benign.py"
    out = tmp_path / "r.json"
    proc = raceguard("check", "--format", "json", "--output", str(out), str(path))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["findings"] == []
    assert report["suppressed"]
    for finding in report["suppressed"]:
        assert finding["resource"] == "model.fc1.weight"
        assert finding["suppressed"] == "raceguard.benign: hogwild: lock-free SGD by design"
    # The same program without the annotation fails: the annotation is what makes it pass.
    unmarked = tmp_path / "hogwild_unmarked.py"
    unmarked.write_text("\n".join(l for l in path.read_text().splitlines() if "raceguard.benign(" not in l) + "\n")
    proc = raceguard("check", "-q", str(unmarked))
    assert proc.returncode == 1
