"""JUnit XML output."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from raceguard.report.document import Report
from raceguard.report.render import render
from raceguard.report.finding import Access, Finding, Frame
from raceguard.report.junit import to_junit

DATA = Path(__file__).parent / "data"


def sample() -> Report:
    return Report.from_dict(json.loads((DATA / "report-all-kinds.json").read_text(encoding="utf-8")))


def finding(kind: str = "data-race", message: str = "data race on parameter w", suppressed: str | None = None) -> Finding:
    access = Access("t", "thread:t", "write", None, [], [Frame("train.py", 3, "step")])
    return Finding(kind, "w", "parameter", message, [access], suppressed=suppressed)


def suite_of(xml_text: str) -> ET.Element:
    root = ET.fromstring(xml_text.encode("utf-8"))
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 1 and suites[0].get("name") == "raceguard"
    return suites[0]


def test_check_report_is_one_testcase_with_a_failure_per_finding() -> None:
    report = Report("check", ["train.py", "--epochs", "1"], [finding(), finding("lock-order-cycle", "cycle a -> b")], 0,
                    {"wall_seconds": 2.5}, suppressed=[finding(suppressed="benign")])
    suite = suite_of(to_junit(report))
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("1", "2", "0")
    (case,) = suite.findall("testcase")
    assert case.get("classname") == "raceguard.check"
    assert case.get("name") == "train.py --epochs 1"
    assert case.get("time") == "2.500"
    failures = case.findall("failure")
    assert [(f.get("type"), f.get("message")) for f in failures] == [
        ("data-race", "data race on parameter w"),
        ("lock-order-cycle", "cycle a -> b"),
    ]
    assert failures[0].text.startswith("WARNING: raceguard: data race on parameter w\n")
    assert "#0 step train.py:3" in failures[0].text
    assert "suppressed data-race" in case.find("system-out").text


def test_clean_report_passes() -> None:
    suite = suite_of(to_junit(Report("check", ["train.py"], [], 0)))
    (case,) = suite.findall("testcase")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("1", "0", "0")
    assert list(case) == []


def test_target_failure_without_finding_is_an_error() -> None:
    report = Report("check", ["train.py"], [], None, target_outcome={"kind": "signal", "code": -11, "signal": "SIGSEGV", "detail": None})
    suite = suite_of(to_junit(report))
    (error,) = suite.find("testcase").findall("error")
    assert error.get("message") == "target killed by SIGSEGV" and error.get("type") == "target-failure"
    assert (suite.get("failures"), suite.get("errors")) == ("0", "1")


def test_target_failure_with_finding_is_only_failures() -> None:
    report = Report("check", ["train.py"], [finding()], 1)
    suite = suite_of(to_junit(report))
    assert (suite.get("failures"), suite.get("errors")) == ("1", "0")


def test_raceguard_error_is_an_error() -> None:
    suite = suite_of(to_junit(Report("check", ["t.py"], [], 0, error="engine crashed\ndetails")))
    error = suite.find("testcase/error")
    assert error.get("type") == "raceguard-error" and error.get("message") == "engine crashed"
    assert error.text == "engine crashed\ndetails"


def test_stress_report_has_one_testcase_per_schedule() -> None:
    report = sample()
    suite = suite_of(render(report, "junit"))
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [
        "src/train.py --epochs 1 [schedule 3, seed 1234]",
        "src/train.py --epochs 1 [schedule 7, seed 99]",
        "src/train.py --epochs 1 [schedule 8, seed 100]",
    ]
    assert [len(c.findall("failure")) for c in cases] == [2, 5, 0]
    assert {c.get("classname") for c in cases} == {"raceguard.stress"}
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "7", "0")
    assert [f.get("type") for f in cases[0].findall("failure")] == ["data-race", "lock-order-cycle"]


def test_schedule_fingerprints_of_suppressed_findings_do_not_fail() -> None:
    report = sample()
    report.suppressed = [report.findings.pop(0)]
    suite = suite_of(to_junit(report))
    assert [len(c.findall("failure")) for c in suite.findall("testcase")] == [1, 5, 0]


def test_control_characters_and_markup_survive() -> None:
    message = "bad \x1b[31m <tag> & \x00 byte"
    report = Report("check", ["a b.py", "--x=<y>"], [finding(message=message)], 0)
    suite = suite_of(to_junit(report))
    case = suite.find("testcase")
    assert case.get("name") == "'a b.py' '--x=<y>'"
    assert case.find("failure").get("message") == "bad ?[31m <tag> & ? byte"
