"""Hazards beyond tensor memory through the public CLI: every fixture of ``fixtures/hazards``.

Same conventions as ``test_cli_fixtures.py`` (whose helpers are reused): a race fixture declares
``# expect: <kind> <resource>`` and marks its two user lines with ``# RACE: A`` / ``# RACE: B``.
When both accesses happen on one line of a fixture-defined function (an attribute assigned in
``forward`` by two callers), that line carries ``# SITE``: it must be the innermost user frame
of both accesses, and A and B are the two callers, each in a different access's stack.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raceguard.report.document import Report
from raceguard.report.text import render_text
from test_cli_fixtures import FIXTURES, ROOT, _expectation, _innermost_user_line, _markers, run_check

HAZARDS = FIXTURES / "hazards"

RESOURCE_KIND = {
    "train_flag_flip": "module-attribute",
    "forward_attribute": "module-attribute",
    "forward_monkeypatch": "module-attribute",
    "hook_registration": "module-attribute",
    "checkpoint_during_step": "parameter",
    "rng_two_threads": "rng",
    "rng_reseed": "rng",
    "no_grad_submit": "module-attribute",
    "autocast_thread": "module-attribute",
    "lazy_linear_two_threads": "parameter",
    "optimizer_first_step": "optimizer-state",
    "functional_call_shared_module": "module-attribute",
}
SEVERITY = {"data-race": "error", "shared-rng": "warning", "thread-local-mode": "warning"}
# Fixtures whose bug inherently shows up as more than one finding (all of the expected kind).
SEVERAL_FINDINGS = {"optimizer_first_step"}  # the unordered steps also race on weight, grad and state tensors

RACES = sorted(p for p in HAZARDS.glob("*.py") if _expectation(p)[0] != "clean")
CLEAN = sorted(p for p in HAZARDS.glob("*.py") if _expectation(p)[0] == "clean")


def _site(path: Path) -> int | None:
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if re.search(r"#\s*SITE\b", line):
            return number
    return None


def _user_lines(access: dict, path: Path) -> list[int]:
    n_user = access.get("user_frames", len(access["stack"]))
    return [f["line"] for f in access["stack"][:n_user] if Path(f["file"]).name == path.name]


def _lines_match(finding: dict, path: Path, markers: dict[str, int], site: int | None) -> bool:
    first, second = finding["accesses"]
    if site is None:
        return {_innermost_user_line(first, path), _innermost_user_line(second, path)} == {markers["A"], markers["B"]}
    if _innermost_user_line(first, path) != site or _innermost_user_line(second, path) != site:
        return False
    a, b = markers["A"], markers["B"]
    l1, l2 = _user_lines(first, path), _user_lines(second, path)
    return (a in l1 and b in l2) or (b in l1 and a in l2)


def test_every_race_fixture_has_a_clean_counterpart() -> None:
    assert len(RACES) == len(RESOURCE_KIND) == 12
    assert {p.stem for p in RACES} == set(RESOURCE_KIND)
    countered: set[str] = set()
    for path in CLEAN:
        text = path.read_text()
        assert "Counterpart of hazards/" in text, path.name
        for name in re.findall(r"hazards/(\w+)\.py", text):
            assert (HAZARDS / f"{name}.py").exists(), f"{path.name} names a missing fixture {name}.py"
            countered.add(name)
    assert countered == {p.stem for p in RACES}


@pytest.mark.parametrize("path", RACES, ids=lambda p: p.stem)
def test_hazard_fixture_reports_the_exact_finding(path: Path, tmp_path: Path) -> None:
    kind, resource = _expectation(path)
    markers = _markers(path)
    assert set(markers) == {"A", "B"}, f"{path.name} must mark both user lines"
    site = _site(path)
    proc, report = run_check(path, tmp_path)
    severity = SEVERITY[kind]
    assert proc.returncode == (1 if severity == "error" else 0), proc.stderr
    assert report["status"] == "findings"
    assert report["target_exit_code"] == 0
    findings = report["findings"]
    assert all(f["kind"] == kind for f in findings), [f["message"] for f in findings]
    if path.stem not in SEVERAL_FINDINGS:
        assert len(findings) == 1, [f["message"] for f in findings]
    matching = [
        f
        for f in findings
        if (f["resource"] == resource or resource in f.get("details", {}).get("also_on", []))
        and _lines_match(f, path, markers, site)
    ]
    assert matching, (
        f"expected {kind} on {resource} between lines {markers} (site {site}); got:\n"
        + "\n".join(
            f"  {f['resource']} lines {[_user_lines(a, path) for a in f['accesses']]} "
            f"also_on={f.get('details', {}).get('also_on')}"
            for f in findings
        )
    )
    finding = matching[0]
    assert finding["severity"] == severity
    assert finding["resource_kind"] == RESOURCE_KIND[path.stem]
    assert len({a["thread"] for a in finding["accesses"]}) == 2
    assert finding.get("hint")
    if kind == "data-race":
        assert "write" in {a["mode"] for a in finding["accesses"]}
    # The text report names the resource in the finding's headline.
    text = render_text(Report.from_dict(report))
    headline = next(line for line in text.splitlines() if line.startswith("WARNING: raceguard:") and resource in line)
    assert kind.split("-")[0] in headline.lower() or "thread-local" in headline


@pytest.mark.parametrize("path", CLEAN, ids=lambda p: p.stem)
def test_hazard_clean_counterpart_has_no_findings(path: Path, tmp_path: Path) -> None:
    proc, report = run_check(path, tmp_path)
    assert report["findings"] == [], "\n".join(f["message"] for f in report["findings"])
    assert report["status"] == "clean"
    assert proc.returncode == 0, proc.stderr
    assert report["target_exit_code"] == 0


def test_warnings_fail_the_run_with_fail_on_warning(tmp_path: Path) -> None:
    proc, report = run_check(HAZARDS / "rng_two_threads.py", tmp_path, "--fail-on", "warning")
    assert proc.returncode == 1
    [finding] = report["findings"]
    assert finding["kind"] == "shared-rng"
    assert "torch.Generator" in finding["hint"]
    assert "not reproducible" in finding["message"]


def test_thread_local_mode_names_the_submitting_site_and_the_mode(tmp_path: Path) -> None:
    path = HAZARDS / "no_grad_submit.py"
    markers = _markers(path)
    proc, report = run_check(path, tmp_path)
    [finding] = report["findings"]
    submit, forward = finding["accesses"]
    assert submit["thread"] == "MainThread"
    assert forward["thread"].startswith("inference")
    assert submit["op"] == "executor.submit() with grad mode disabled"
    assert forward["op"] == "Sequential.__call__ with grad mode enabled"
    assert f"at no_grad_submit.py:{markers['A']}" in finding["message"]
    assert finding["details"]["modes"] == {"grad mode": {"submitter": False, "worker": True}}
    assert "torch.no_grad()" in finding["hint"]
    text = render_text(Report.from_dict(report))
    assert "WARNING: raceguard: thread-local mode mismatch on module attribute model.forward" in text


def test_training_flag_race_lists_every_submodule(tmp_path: Path) -> None:
    proc, report = run_check(HAZARDS / "train_flag_flip.py", tmp_path)
    [finding] = report["findings"]
    assert finding["resource"] == "model.training"
    assert set(finding["details"]["also_on"]) == {"model.fc1.training", "model.act.training", "model.fc2.training"}
    ops = {a["mode"]: a["op"] for a in finding["accesses"]}
    assert ops == {"write": "setattr training", "read": "Sequential.__call__"}
