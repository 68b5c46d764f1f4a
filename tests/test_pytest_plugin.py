"""The pytest plugin, through real pytest runs (``pytester``, in subprocesses).

One inner test file (``SUITE``) holds every scenario; it runs twice, with ``--raceguard`` (under
pytest-xdist when it is installed, so the per-worker report files are checked too) and without,
and each run is checked scenario by scenario. The documented example
(``examples/pytest_example``) is copied in and runs with it. Subprocesses keep the inner runs'
instrumentation out of this process; each costs a torch import, so there are only two.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path

import pytest

from raceguard.pytest_plugin import MarkerSpec, Settings, parse_marker, report_path_for, reproduce_marker, schedule_settings
from raceguard.report.document import validate_report

pytest_plugins = ["pytester"]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pytest_example" / "test_checkpoint.py"

SUITE = '''
import threading

import pytest
import torch

import raceguard as rg

MODULE_LOCK = threading.Lock()


def writer_a(t, lock=None):
    for _ in range(3):
        if lock is None:
            t.add_(1)  # LINE_A
        else:
            with lock:
                t.add_(1)


def writer_b(t, lock=None):
    for _ in range(3):
        if lock is None:
            t.mul_(2)  # LINE_B
        else:
            with lock:
                t.mul_(2)


def race(t, lock=None):
    threads = [
        threading.Thread(target=writer_a, args=(t, lock), name="writer-a"),
        threading.Thread(target=writer_b, args=(t, lock), name="writer-b"),
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return t


def test_racy():
    race(torch.zeros(3))  # ALLOC_RACY


def test_locked():
    race(torch.zeros(3), threading.Lock())


def test_module_lock():
    race(torch.zeros(3), MODULE_LOCK)


def test_conftest_lock():
    from conftest import CONFTEST_LOCK

    race(torch.zeros(3), CONFTEST_LOCK)


@pytest.fixture
def racy_setup():
    return race(torch.zeros(3))  # ALLOC_SETUP


def test_setup_race(racy_setup):
    pass


@pytest.fixture
def racy_teardown():
    t = torch.zeros(3)  # ALLOC_TEARDOWN
    yield t
    race(t)


def test_teardown_race(racy_teardown):
    pass


def known_benign_worker(t):
    for _ in range(3):
        t.add_(1)


def test_suppressed_race():
    t = torch.zeros(3)
    threads = [threading.Thread(target=known_benign_worker, args=(t,)) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def test_fixture_session(raceguard):
    race(torch.zeros(3), threading.Lock())
    assert raceguard.findings == []
    raceguard.assert_clean()
    race(torch.zeros(3))
    with pytest.raises(rg.RaceError):
        raceguard.assert_clean()
    assert [f.kind for f in raceguard.clear()] == ["data-race"]
    raceguard.assert_clean()


@pytest.mark.raceguard
def test_marker_racy():
    race(torch.zeros(3))  # ALLOC_MARKER


@pytest.mark.raceguard
def test_marker_locked():
    race(torch.zeros(3), threading.Lock())


@pytest.mark.raceguard
def test_marker_module_lock():
    race(torch.zeros(3), MODULE_LOCK)


@pytest.mark.raceguard(enabled=False)
def test_opted_out():
    race(torch.zeros(3))


@pytest.mark.raceguard(schedules=3, seed=0, strategy="pct")
def test_with_schedules():
    race(torch.zeros(3), threading.Lock())


def inject_warning(session, resource):
    # No capture makes warning-severity findings yet: inject one to test the threshold.
    from raceguard.report.finding import Finding

    finding = Finding(kind="shared-rng", severity="warning", resource=resource,
                      resource_kind="rng", message="shared generator", accesses=[])
    session._sink({"type": "finding", "finding": finding.to_dict()})


def test_warning_only(raceguard):
    inject_warning(raceguard, "generator one")
    assert [f.severity for f in raceguard.findings] == ["warning"]


@pytest.mark.raceguard(fail_on="warning")
def test_warning_marker_fail_on(raceguard):
    inject_warning(raceguard, "generator two")


@pytest.mark.raceguard
def test_watch_inside_watched_test():
    with pytest.raises(RuntimeError, match="use the `raceguard` fixture"):
        with rg.watch():
            pass
'''

SUPPRESSIONS = "# the benign counter\ndata-race:known_benign_worker\n"


def line_of(marker: str) -> int:
    for number, line in enumerate(SUITE.splitlines()[1:], start=1):  # makepyfile dedents, drops the first newline
        if line.rstrip().endswith(f"# {marker}"):
            return number
    raise AssertionError(marker)


def section(stdout: str, title: str) -> str:
    """The block of pytest's failure/error output whose header names ``title``."""
    lines = stdout.splitlines()
    header = re.compile(r"^_{3,} (.*) _{3,}$")
    for i, line in enumerate(lines):
        m = header.match(line)
        if m and m.group(1) == title:
            end = next((j for j in range(i + 1, len(lines)) if header.match(lines[j]) or lines[j].startswith("=====")), len(lines))
            return "\n".join(lines[i + 1 : end])
    raise AssertionError(f"no section {title!r} in:\n{stdout}")


def registered_entry_points() -> list[str]:
    # Every distribution, like pytest's own loading: a stale raceguard.egg-info in the working
    # directory would hide the installed one from importlib.metadata.entry_points().
    return [
        ep.value
        for dist in importlib.metadata.distributions()
        for ep in dist.entry_points
        if ep.group == "pytest11" and ep.name == "raceguard"
    ]


def plugin_args() -> list[str]:
    # A checkout whose editable install predates the entry point: load the plugin explicitly.
    return [] if registered_entry_points() else ["-p", "raceguard.pytest_plugin"]


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    for var in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID", "PYTEST_ADDOPTS"):
        monkeypatch.delenv(var, raising=False)
    pytester.makepyfile(test_suite=SUITE, test_example=EXAMPLE.read_text())
    pytester.makeconftest("import threading\n\nCONFTEST_LOCK = threading.Lock()\n")
    pytester.path.joinpath("raceguard.supp").write_text(SUPPRESSIONS)
    return pytester


def outcomes(result: pytest.RunResult) -> dict[str, str]:
    """test name -> outcome words ("ERROR+PASSED" for an error at teardown), from -rA's summary."""
    found: dict[str, set] = {}
    for line in result.outlines:
        m = re.match(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)", line)
        if m:
            found.setdefault(m.group(2).split("::")[-1], set()).add(m.group(1))
    return {name: "+".join(sorted(words)) for name, words in found.items()}


# -- units ---------------------------------------------------------------------------------------


def test_entry_point_is_registered():
    values = registered_entry_points()
    if not values:
        pytest.skip("the editable install predates the pytest11 entry point: pip install -e . again")
    assert set(values) == {"raceguard.pytest_plugin"}


def test_report_path_per_xdist_worker(tmp_path):
    assert report_path_for(tmp_path / "report.json", None) == tmp_path / "report.json"
    assert report_path_for(tmp_path / "report.json", "gw0") == tmp_path / "report.gw0.json"
    assert report_path_for(tmp_path / "report", "gw3") == tmp_path / "report.gw3"


class _Marker:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def test_marker_arguments_are_validated():
    assert parse_marker(_Marker()) == MarkerSpec()
    assert parse_marker(_Marker(schedules=50, seed=0, strategy="pct")).schedule_args() == {"schedules": 50, "seed": 0, "strategy": "pct"}
    assert "did you mean 'schedules'" in parse_marker(_Marker(schedule=5)).error
    assert "keyword arguments only" in parse_marker(_Marker(False)).error
    assert "positive integer" in parse_marker(_Marker(schedules=0)).error
    assert "non-negative" in parse_marker(_Marker(seed=-1)).error
    assert "one of random, pct" in parse_marker(_Marker(strategy="dfs")).error
    assert "one of error, warning" in parse_marker(_Marker(fail_on="fatal")).error
    assert "True or False" in parse_marker(_Marker(enabled="no")).error


def test_same_bug_in_several_tests_is_one_finding_of_the_run():
    from raceguard.pytest_plugin import _merge_finding
    from raceguard.report.finding import Finding

    def finding(test):
        return Finding(kind="data-race", resource="model.weight", resource_kind="parameter", message="m",
                       accesses=[], fingerprint="0123456789abcdef", details={"test": test})

    run: dict = {}
    for test in ("t.py::a", "t.py::b", "t.py::b", "t.py::c"):
        _merge_finding(run, finding(test), test)
    [merged] = run.values()
    assert merged.details == {"test": "t.py::a", "also_in_tests": ["t.py::b", "t.py::c"]}


def test_schedule_settings_of_the_marker():
    assert schedule_settings(MarkerSpec()) is None
    assert schedule_settings(MarkerSpec(enabled=True, fail_on="warning")) is None
    assert schedule_settings(MarkerSpec(schedules=50, seed=0, strategy="pct")) == (50, 0, "pct")
    assert schedule_settings(MarkerSpec(schedules=5)) == (5, None, "pct")  # [tool.raceguard.stress] defaults
    assert schedule_settings(MarkerSpec(seed=7, strategy="random")) == (1, 7, "random")  # a reproduction
    assert schedule_settings(MarkerSpec(strategy="random")) == (100, None, "random")
    configured = Settings(fail_on="error", suppressions=None, max_reports=None, schedules=20, strategy="random")
    assert schedule_settings(MarkerSpec(seed=3), configured) == (1, 3, "random")
    assert schedule_settings(MarkerSpec(schedules=5), configured) == (5, None, "random")
    assert schedule_settings(MarkerSpec(strategy="pct"), configured) == (20, None, "pct")
    assert reproduce_marker(7, "pct") == '@pytest.mark.raceguard(schedules=1, seed=7, strategy="pct")'


# -- real runs -----------------------------------------------------------------------------------


def test_run_with_flag(suite: pytest.Pytester):
    xdist = importlib.util.find_spec("xdist") is not None
    args = [*plugin_args(), "-rA", "-p", "no:cacheprovider", "--raceguard", "--raceguard-report=out/report.json",
            "--raceguard-suppressions=raceguard.supp"]
    if xdist:
        args += ["-n", "1"]  # one worker is enough to check the per-worker file name
    result = suite.runpytest_subprocess(*args, timeout=240)
    got = outcomes(result)
    expected = {
        "test_racy": "FAILED",
        "test_locked": "PASSED",
        "test_module_lock": "PASSED",  # module-level lock: instrumented since pytest started
        "test_conftest_lock": "PASSED",  # even one made by the root conftest.py
        "test_setup_race": "FAILED",  # race in a fixture's setup fails the test that used it
        "test_teardown_race": "ERROR+PASSED",  # race in a fixture's teardown: error at its teardown
        "test_suppressed_race": "PASSED",
        "test_fixture_session": "PASSED",
        "test_marker_racy": "FAILED",
        "test_marker_locked": "PASSED",
        "test_marker_module_lock": "PASSED",
        "test_opted_out": "PASSED",
        "test_with_schedules": "PASSED",  # locked: clean under 3 PCT schedules
        "test_warning_only": "PASSED",  # a warning does not fail at the default fail-on=error
        "test_warning_marker_fail_on": "FAILED",
        "test_watch_inside_watched_test": "PASSED",
        "test_checkpoint_racy": "FAILED",
        "test_checkpoint_locked": "PASSED",
        "test_checkpoint_locked_checked_midway": "PASSED",
    }
    assert {k: got.get(k) for k in expected} == expected, result.stdout.str()
    result.assert_outcomes(passed=14, failed=5, errors=1)

    out = result.stdout.str()
    racy = section(out, "test_racy")
    assert f"WARNING: raceguard: data race on tensor float32[3] allocated at test_suite.py:{line_of('ALLOC_RACY')}" in racy
    assert f"test_suite.py:{line_of('LINE_A')}" in racy and f"test_suite.py:{line_of('LINE_B')}" in racy
    assert "write by thread 'writer-a' (aten::add_.Tensor)" in racy
    assert "write by thread 'writer-b' (aten::mul_.Tensor)" in racy
    assert "raceguard: 1 finding (1 data-race)" in racy
    assert "Traceback" not in racy and "pytest_plugin.py" not in racy
    assert f"allocated at test_suite.py:{line_of('ALLOC_SETUP')}" in section(out, "test_setup_race")
    assert f"allocated at test_suite.py:{line_of('ALLOC_TEARDOWN')}" in section(out, "ERROR at teardown of test_teardown_race")
    assert "random generator generator two" in section(out, "test_warning_marker_fail_on")
    assert "data race on parameter model.weight" in section(out, "test_checkpoint_racy")

    if xdist:
        paths = sorted(suite.path.joinpath("out").glob("report.gw*.json"))
        assert [p.name for p in paths] == ["report.gw0.json"]
        assert not suite.path.joinpath("out", "report.json").exists()
        result.stdout.fnmatch_lines(["raceguard: each xdist worker wrote its own report: *report.gw*.json"])
    else:
        paths = [suite.path / "out" / "report.json"]
    findings, suppressed = {}, {}
    for path in paths:
        document = json.loads(path.read_text())
        validate_report(document)
        assert document["command"] == "check"
        assert document["target"][-len(args):] == args  # pytester adds --basetemp in front
        assert document["target_exit_code"] == 0  # every failure came from raceguard
        findings.update({f["details"]["test"].split("::")[-1]: f for f in document["findings"]})
        suppressed.update({f["details"]["test"].split("::")[-1]: f for f in document.get("suppressed", [])})
    phases = {test: f["details"]["phase"] for test, f in findings.items()}
    assert phases == {
        "test_racy": "call",
        "test_setup_race": "setup",
        "test_teardown_race": "teardown",
        "test_marker_racy": "call",
        "test_checkpoint_racy": "call",
        "test_warning_marker_fail_on": "call",
        "test_warning_only": "call",
    }
    assert findings["test_setup_race"]["resource"].endswith(f"test_suite.py:{line_of('ALLOC_SETUP')}")
    assert list(suppressed) == ["test_suppressed_race"]
    assert suppressed["test_suppressed_race"]["suppressed"].startswith("suppression 'data-race:known_benign_worker'")


def test_run_without_flag(suite: pytest.Pytester):
    args = [*plugin_args(), "-rA", "-p", "no:cacheprovider", "--raceguard-fail-on=warning", "--raceguard-report=report.json"]
    result = suite.runpytest_subprocess(*args, timeout=240)
    got = outcomes(result)
    expected = {
        "test_racy": "PASSED",  # not watched without the flag
        "test_locked": "PASSED",
        "test_conftest_lock": "PASSED",
        "test_setup_race": "PASSED",
        "test_teardown_race": "PASSED",
        "test_suppressed_race": "PASSED",
        "test_fixture_session": "PASSED",  # the fixture turns detection on
        "test_marker_racy": "FAILED",  # the marker turns detection on
        "test_marker_locked": "PASSED",
        "test_marker_module_lock": "FAILED",  # lock made at import, before detection: see the note
        "test_opted_out": "PASSED",
        "test_with_schedules": "PASSED",  # locked: clean under 3 PCT schedules
        "test_warning_only": "FAILED",  # --raceguard-fail-on=warning
        "test_warning_marker_fail_on": "FAILED",
        "test_watch_inside_watched_test": "PASSED",
        "test_checkpoint_racy": "PASSED",
        "test_checkpoint_locked": "PASSED",
        "test_checkpoint_locked_checked_midway": "PASSED",
    }
    assert {k: got.get(k) for k in expected} == expected, result.stdout.str()
    result.assert_outcomes(passed=15, failed=4)

    out = result.stdout.str()
    marker = section(out, "test_marker_racy")
    assert f"allocated at test_suite.py:{line_of('ALLOC_MARKER')}" in marker
    assert f"test_suite.py:{line_of('LINE_A')}" in marker and f"test_suite.py:{line_of('LINE_B')}" in marker
    note = section(out, "test_marker_module_lock")
    assert "note: MODULE_LOCK was created before raceguard started watching" in note
    assert "run --raceguard" in note or "run with --raceguard" in note
    result.stdout.fnmatch_lines(
        ["raceguard: 9 tests watched, 4 findings (2 data-race, 2 shared-rng), 4 tests failed by raceguard; report: *report.json"]
    )

    document = json.loads((suite.path / "report.json").read_text())
    validate_report(document)
    assert document["target"][-len(args):] == args and document["status"] == "findings"
    assert document["target_exit_code"] == 0
    assert document["stats"]["tests_watched"] == 9
    tests = sorted(f["details"]["test"].split("::")[-1] for f in document["findings"])
    assert tests == ["test_marker_module_lock", "test_marker_racy", "test_warning_marker_fail_on", "test_warning_only"]
