"""JUnit XML output, for CI systems that show test results (GitLab, Jenkins, Azure, CircleCI).

One ``<testsuite name="raceguard">`` (inside the usual ``<testsuites>`` root) with one
``<testcase>`` for the checked command line, or, when the report carries per-schedule results
(``stats["schedules"] = [{"index", "seed", "fingerprints": [...]}, ...]`` under ``stress``), one
testcase per schedule. Every unsuppressed finding becomes a ``<failure>`` whose body is that
finding's text report; a target that failed with no finding to explain it, or raceguard's own
error, becomes an ``<error>``.

Pure Python (xml.etree), no torch.
"""

from __future__ import annotations

import re
import shlex
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any

from raceguard.report.finding import Finding
from raceguard.report.text import describe_outcome, render_finding_text

if TYPE_CHECKING:
    from raceguard.report.document import Report

SUITE_NAME = "raceguard"

# Characters XML 1.0 cannot carry at all (control characters from a traceback, ANSI escapes).
_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def to_junit(report: "Report", *, verbose: bool = False) -> str:
    """The report as a JUnit XML document (a string with an XML declaration)."""
    classname = f"raceguard.{report.command}"
    command_line = shlex.join(report.target) if report.target else report.command
    schedules = report.stats.get("schedules")
    by_fingerprint = {f.fingerprint: f for f in report.findings}

    testcases: list[ET.Element] = []
    if isinstance(schedules, list) and schedules:
        for schedule in schedules:
            testcases.append(_schedule_case(schedule, classname, command_line, by_fingerprint, verbose))
        if report.error:
            case = _testcase(classname, f"{command_line} [raceguard]")
            _add_error(case, "raceguard-error", report.error)
            testcases.append(case)
    else:
        case = _testcase(classname, command_line, time=report.stats.get("wall_seconds"))
        for finding in report.findings:
            _add_failure(case, finding, verbose)
        if report.error:
            _add_error(case, "raceguard-error", report.error)
        elif not report.findings and report.target_failed():
            outcome = describe_outcome(report) or "target failed"
            _add_error(case, "target-failure", outcome)
        if report.suppressed:
            lines = [f"suppressed {f.kind} {f.fingerprint}: {f.suppressed or 'suppressed'}" for f in report.suppressed]
            ET.SubElement(case, "system-out").text = _clean("\n".join(lines))
        testcases.append(case)

    failures = sum(len(case.findall("failure")) for case in testcases)
    errors = sum(len(case.findall("error")) for case in testcases)
    attributes = {
        "name": SUITE_NAME,
        "tests": str(len(testcases)),
        "failures": str(failures),
        "errors": str(errors),
        "skipped": "0",
        "time": _seconds(report.stats.get("wall_seconds")),
    }
    root = ET.Element("testsuites", attributes)
    suite = ET.SubElement(root, "testsuite", attributes)
    suite.extend(testcases)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _testcase(classname: str, name: str, time: Any = None) -> ET.Element:
    attributes = {"classname": classname, "name": _clean(name)}
    if time is not None:
        attributes["time"] = _seconds(time)
    return ET.Element("testcase", attributes)


def _schedule_case(schedule: dict[str, Any], classname: str, command_line: str, by_fingerprint: dict[str, Finding], verbose: bool) -> ET.Element:
    index = schedule.get("index")
    seed = schedule.get("seed")
    label = f"schedule {index}" + (f", seed {seed}" if seed is not None else "")
    case = _testcase(classname, f"{command_line} [{label}]", time=schedule.get("wall_seconds"))
    for fingerprint in schedule.get("fingerprints") or []:
        finding = by_fingerprint.get(fingerprint)
        if finding is not None:
            _add_failure(case, finding, verbose)
        # A fingerprint absent from the report's findings was suppressed or baselined: not a failure.
    return case


def _add_failure(case: ET.Element, finding: Finding, verbose: bool) -> None:
    if finding.suppressed:
        return
    failure = ET.SubElement(case, "failure", {"message": _clean(finding.message), "type": finding.kind})
    failure.text = _clean(render_finding_text(finding, verbose=verbose))


def _add_error(case: ET.Element, error_type: str, message: str) -> None:
    first_line = message.strip().splitlines()[0] if message.strip() else error_type
    error = ET.SubElement(case, "error", {"message": _clean(first_line), "type": error_type})
    error.text = _clean(message)


def _seconds(value: Any) -> str:
    try:
        return f"{float(value or 0.0):.3f}"
    except (TypeError, ValueError):
        return "0.000"


def _clean(text: str) -> str:
    return _INVALID_XML.sub("?", text)
