"""pytest plugin: run tests under raceguard's data-race detection.

Installed with raceguard (``pytest11`` entry point ``raceguard``); inert until asked for, and
importing it imports neither torch nor the capture layer. Disable it with ``-p no:raceguard``.

Options
    ``--raceguard``
        Run every test under detection: fixture setup, the test and fixture teardown. A test
        whose run produces a finding at or above ``--raceguard-fail-on`` fails, and its failure
        shows raceguard's text report. A finding made during the test's setup or call fails the
        test itself; one made during its teardown (after the call phase was reported) is reported
        as an error at teardown of that test. Module- or session-scoped fixtures are set up
        during the first test that uses them and torn down during the last one, so what they do
        is attributed to those tests. The instrumented ``threading``/``queue`` primitives are
        installed when pytest starts, before the root ``conftest.py`` files and the test modules
        are imported, so a lock created at module level there is seen like any other (one made
        by a module imported before pytest started, e.g. by another plugin, is not).
    ``--raceguard-fail-on=error|warning``
        Lowest severity that fails a test (default: ``fail-on`` of ``[tool.raceguard]`` in
        ``pyproject.toml``, else ``error``).
    ``--raceguard-report=FILE``
        Write the JSON report of the whole run (the contract of ``raceguard check --format
        json``: ``command`` "check", ``target`` the pytest arguments) atomically to FILE at the
        end of the session. Each finding's ``details`` names the test (``test``, its node id)
        and the phase (``setup``, ``call``, ``teardown``) it was made in; a finding with the same
        fingerprint in several tests is reported once, with ``details.also_in_tests``.
        ``target_exit_code`` is pytest's exit status as it would have been without raceguard.
        With pytest-xdist, every worker writes its own file: FILE with the worker id inserted
        before the extension (``report.json`` -> ``report.gw0.json``, ``report.gw1.json``...);
        the controller writes none.
    ``--raceguard-suppressions=FILE``
        TSan-style suppressions (``KIND:PATTERN`` lines, as for ``raceguard check``); default:
        ``suppressions`` of ``[tool.raceguard]``. Suppressed findings never fail a test and are
        listed in the report's ``suppressed``.

Marker
    ``@pytest.mark.raceguard`` runs one test under detection without ``--raceguard``.
    ``@pytest.mark.raceguard(fail_on="warning")`` also sets its threshold;
    ``@pytest.mark.raceguard(enabled=False)`` opts a test out under ``--raceguard`` (e.g. a
    test of deliberately lock-free code).

    ``@pytest.mark.raceguard(schedules=50, seed=0, strategy="pct")`` runs the test body under 50
    controlled schedules (seeds 0, 1, ... 49) of raceguard's scheduler, in the test's process:
    one thread runs at a time and the strategy (``pct``: probabilistic concurrency testing,
    calibrated once per test, or ``random``) decides who continues at every tensor op and every
    lock/queue/event operation of the threads the body starts. ``schedules`` and ``strategy``
    default to those of ``[tool.raceguard.stress]`` in ``pyproject.toml`` (100, ``pct``), and so
    does PCT's ``depth`` (3). It stops at the first
    schedule whose body raises, deadlocks or produces a finding at or above ``fail_on``, and
    fails with the seed and the marker that replays it
    (``@pytest.mark.raceguard(schedules=1, seed=7, strategy="pct")``). Without ``seed`` a random
    one is chosen (and printed on failure); ``seed`` without ``schedules`` runs that one
    schedule. Fixtures are set up once: the body must build the state it races on itself.
    Python's ``random`` and torch's generator are seeded from each schedule's seed (and restored
    afterwards). Bad marker arguments fail the test without running it.

    Without ``--raceguard``, detection starts at the test's setup: locks, events and queues the
    test module created at import time are plain objects whose ordering raceguard cannot see,
    so races they prevent are reported anyway (the failure adds a note naming them). Create
    them in the test or a fixture, or use ``--raceguard``.

Fixture
    ``raceguard`` gives the test's :class:`raceguard.WatchSession`: ``findings`` so far,
    ``assert_clean()``, ``report()``, and ``clear()`` for a test that expects a race and has
    checked it. Requesting it turns detection on for that test. Inside a watched test, use the
    fixture rather than ``raceguard.watch()``, which would raise (one session at a time).

Threads a test leaves running are not watched by later tests, and neither are threads started
before detection began (a pool created by a session-scoped fixture is watched only during the
test that created it).
"""

from __future__ import annotations

import difflib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .config import STRATEGY_CHOICES, ConfigError, load_config
from .report.finding import SEVERITIES, Finding

MARKER = "raceguard"
FIXTURE = "raceguard"
MARKER_KWARGS = ("enabled", "fail_on", "schedules", "seed", "strategy")
SCHEDULE_KWARGS = ("schedules", "seed", "strategy")


# --- options and configuration ----------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("raceguard", "raceguard: data-race detection for threaded PyTorch code")
    group.addoption(
        "--raceguard",
        action="store_true",
        default=False,
        help="run every test under raceguard's data-race detection; a test with findings at or "
        "above --raceguard-fail-on fails with the report",
    )
    group.addoption(
        "--raceguard-fail-on",
        choices=SEVERITIES,
        default=None,
        help="lowest finding severity that fails a test (default: fail-on from "
        "[tool.raceguard] in pyproject.toml, else error)",
    )
    group.addoption(
        "--raceguard-report",
        metavar="FILE",
        default=None,
        help="write the run's JSON report to FILE (under xdist: one file per worker, "
        "FILE with the worker id before the extension, e.g. report.gw0.json)",
    )
    group.addoption(
        "--raceguard-simulate-cuda",
        action="store_true",
        default=None,
        help="run the tests' CUDA code on a simulated device in CPU memory (a CPU-only torch; "
        "default: simulate-cuda from [tool.raceguard])",
    )
    group.addoption(
        "--raceguard-suppressions",
        metavar="FILE",
        default=None,
        help="suppressions file (KIND:PATTERN lines) for findings that must not fail tests",
    )


@dataclass
class Settings:
    fail_on: str
    suppressions: Any  # Suppressions | None
    max_reports: int | None
    # Defaults of the marker's controlled schedules: [tool.raceguard.stress], as for `stress`.
    schedules: int = 100
    strategy: str = "pct"
    depth: int = 3
    simulate_cuda: bool = False  # --raceguard-simulate-cuda


@dataclass
class MarkerSpec:
    enabled: bool | None = None
    fail_on: str | None = None
    schedules: Any = None
    seed: Any = None
    strategy: Any = None
    error: str | None = None

    def schedule_args(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SCHEDULE_KWARGS if getattr(self, k) is not None}


@dataclass
class WatchedTest:
    """Detection state of one test."""

    nodeid: str
    session: Any = None  # raceguard.api.WatchSession while/after watching
    phase: str = "setup"
    # Set when the test must fail without running (bad marker, schedules unavailable).
    refusal: str | None = None
    reported: set = field(default_factory=set)  # fingerprints already shown in a test report
    # (schedules, seed, strategy) when the marker asks for controlled schedules.
    schedules: tuple[int, int | None, str] | None = None


@dataclass
class RunState:
    """Detection state of the whole pytest run (one per process: xdist workers have their own)."""

    config: pytest.Config
    started: float = field(default_factory=time.monotonic)
    settings_cache: Settings | None = None
    watched: int = 0
    failed_tests: int = 0  # tests failed by raceguard
    own_failures: int = 0  # reports that failed for the tests' own reasons
    threads: int = 0
    ops: int = 0
    findings: dict[str, Finding] = field(default_factory=dict)
    suppressed: dict[str, Finding] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    report_path: Path | None = None

    def settings(self) -> Settings:
        if self.settings_cache is None:
            self.settings_cache = _load_settings(self.config)
        return self.settings_cache


RUN_KEY = pytest.StashKey[RunState]()
TEST_KEY = pytest.StashKey[WatchedTest]()
HELD_KEY = pytest.StashKey[bool]()  # whether this run holds the instrumented primitives


def _load_settings(config: pytest.Config) -> Settings:
    """--raceguard-* options over ``[tool.raceguard]`` of the nearest pyproject.toml."""
    from .api import load_suppressions

    try:
        file_config = load_config(config.rootpath)
        fail_on = config.getoption("raceguard_fail_on") or file_config["fail-on"]
        path = config.getoption("raceguard_suppressions")
        if path:
            path = str(Path(config.invocation_params.dir, path))
        else:
            path = file_config["suppressions"]
        suppressions = load_suppressions(path) if path else None
    except ConfigError as exc:
        raise pytest.UsageError(f"raceguard: {exc}") from None
    return Settings(
        fail_on=fail_on,
        suppressions=suppressions,
        max_reports=file_config["max-reports"],
        schedules=file_config["schedules"],
        strategy=file_config["strategy"],
        depth=file_config["depth"],
        simulate_cuda=bool(config.getoption("raceguard_simulate_cuda") or file_config["simulate-cuda"]),
    )


def _is_xdist_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput") and config.pluginmanager.has_plugin("dsession")


def _worker_id(config: pytest.Config) -> str | None:
    workerinput = getattr(config, "workerinput", None)
    return workerinput.get("workerid") if isinstance(workerinput, dict) else None


def report_path_for(path: str | os.PathLike[str], worker_id: str | None) -> Path:
    """FILE, or under an xdist worker FILE with the worker id before the extension."""
    p = Path(path)
    if not worker_id:
        return p
    if p.suffix:
        return p.with_name(f"{p.stem}.{worker_id}{p.suffix}")
    return p.with_name(f"{p.name}.{worker_id}")


def _hold_primitives(config: pytest.Config) -> None:
    """Install the instrumented primitives for the rest of the run (released at unconfigure)."""
    if config.stash.get(HELD_KEY, False):
        return
    from .process import install

    install.hold_primitives()
    config.stash[HELD_KEY] = True


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    # Before the root conftest.py files are imported: their module-level locks are instrumented.
    ns = early_config.known_args_namespace
    if not getattr(ns, "raceguard", False):
        return
    numprocesses = getattr(ns, "numprocesses", None)
    if numprocesses and not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # an xdist controller runs no tests
    _hold_primitives(early_config)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(enabled=True, fail_on=None, schedules=None, seed=None, strategy=None): run this test "
        "under raceguard's data-race detection (without --raceguard); enabled=False opts it out. "
        "schedules=N runs the test body under N controlled thread schedules (strategy 'random' or "
        "'pct', seeds seed, seed+1, ...) and fails with the seed of the first failing one.",
    )
    run = RunState(config)
    config.stash[RUN_KEY] = run
    report = config.getoption("raceguard_report", None)
    if report:
        run.report_path = report_path_for(Path(config.invocation_params.dir, report), _worker_id(config))
    if _is_xdist_controller(config):
        if config.stash.get(HELD_KEY, False):  # -n was given some way the early check missed
            from .process import install

            config.stash[HELD_KEY] = False
            install.release_primitives()
        return  # runs no tests
    if config.getoption("raceguard", False):
        run.settings()  # a bad option or pyproject.toml is a usage error now, not in every test
        # Before collection imports the test modules (if not already done before the conftests).
        _hold_primitives(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    if config.stash.get(HELD_KEY, False):
        from .process import install

        config.stash[HELD_KEY] = False
        install.release_primitives()


# --- markers -----------------------------------------------------------------------------------


def parse_marker(marker: Any) -> MarkerSpec:
    """Validate ``@pytest.mark.raceguard(...)``; problems go to ``spec.error``."""
    where = "@pytest.mark.raceguard"
    if marker.args:
        return MarkerSpec(error=f"{where} takes keyword arguments only ({', '.join(MARKER_KWARGS)}), got {marker.args!r}")
    spec = MarkerSpec()
    for key, value in marker.kwargs.items():
        if key not in MARKER_KWARGS:
            close = difflib.get_close_matches(key, MARKER_KWARGS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(MARKER_KWARGS)})"
            return MarkerSpec(error=f"{where}: unknown argument {key!r}{hint}")
        problem = _marker_value_problem(key, value)
        if problem:
            return MarkerSpec(error=f"{where}: {key} {problem} (got {value!r})")
        setattr(spec, key, value)
    return spec


def _marker_value_problem(key: str, value: Any) -> str | None:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if key == "enabled" and not isinstance(value, bool):
        return "must be True or False"
    if key == "fail_on" and value not in SEVERITIES:
        return f"must be one of {', '.join(SEVERITIES)}"
    if key == "schedules" and not (is_int and value > 0):
        return "must be a positive integer"
    if key == "seed" and not (value is None or (is_int and value >= 0)):
        return "must be a non-negative integer"
    if key == "strategy" and value not in STRATEGY_CHOICES:
        return f"must be one of {', '.join(STRATEGY_CHOICES)}"
    return None


def schedule_settings(spec: MarkerSpec, defaults: Settings | None = None) -> tuple[int, int | None, str] | None:
    """``(schedules, seed, strategy)`` of a marker that asks for controlled schedules, else None.

    ``seed`` alone means one schedule (the form a failure prints to reproduce it); otherwise
    ``schedules`` and ``strategy`` default to ``schedules`` and ``strategy`` of
    ``[tool.raceguard.stress]`` (100, ``"pct"``), and ``seed`` to a fresh random one (printed
    when a schedule fails).
    """
    if not spec.schedule_args():
        return None
    defaults = defaults or Settings(fail_on="error", suppressions=None, max_reports=None)
    count = spec.schedules if spec.schedules is not None else (1 if spec.seed is not None else defaults.schedules)
    return count, spec.seed, spec.strategy or defaults.strategy


def reproduce_marker(seed: int, strategy: str) -> str:
    return f'@pytest.mark.raceguard(schedules=1, seed={seed}, strategy="{strategy}")'


# --- one test ----------------------------------------------------------------------------------


def _start(item: pytest.Item) -> None:
    run = item.config.stash[RUN_KEY]
    marker = item.get_closest_marker(MARKER)
    spec = parse_marker(marker) if marker is not None else MarkerSpec()
    if spec.error is not None:
        item.stash[TEST_KEY] = WatchedTest(item.nodeid, refusal=spec.error)
        return
    schedules = schedule_settings(spec, run.settings() if spec.schedule_args() else None)
    if schedules is not None and spec.enabled is False:
        item.stash[TEST_KEY] = WatchedTest(item.nodeid, refusal="@pytest.mark.raceguard: enabled=False cannot be combined with schedules/seed/strategy")
        return
    if schedules is not None and not isinstance(item, pytest.Function):
        item.stash[TEST_KEY] = WatchedTest(item.nodeid, refusal="@pytest.mark.raceguard(schedules=...) works on test functions only")
        return
    if spec.enabled is False:
        return
    wanted = marker is not None or item.config.getoption("raceguard") or FIXTURE in getattr(item, "fixturenames", ())
    if not wanted:
        return
    from .api import WatchSession

    settings = run.settings()
    module = getattr(item, "module", None)
    namespace = getattr(module, "__dict__", None)
    watch = WatchedTest(item.nodeid, schedules=schedules)

    def tag(finding: Finding) -> None:
        finding.details.setdefault("test", item.nodeid)
        finding.details.setdefault("phase", watch.phase)

    session = WatchSession(
        fail_on=spec.fail_on or settings.fail_on,
        suppressions=settings.suppressions,
        max_reports=settings.max_reports,
        label=item.nodeid,
        main_globals=lambda: namespace,
        owner=f"the pytest plugin (test {item.nodeid})",
        on_finding=tag,
        simulate_cuda=settings.simulate_cuda,
    )
    watch.session = session
    item.stash[TEST_KEY] = watch
    session._start()
    run.watched += 1


def _stop(item: pytest.Item) -> None:
    watch = item.stash.get(TEST_KEY, None)
    if watch is None or watch.session is None:
        return
    session = watch.session
    session._stop()
    run = item.config.stash[RUN_KEY]
    report = session.report()
    run.threads += int(report.stats.get("threads", 0))
    run.ops += int(report.stats.get("ops", 0))
    for finding in report.findings:
        _merge_finding(run.findings, finding, item.nodeid)
    for finding in report.suppressed:
        _merge_finding(run.suppressed, finding, item.nodeid)
    for error in session.errors:
        run.errors.append(f"{item.nodeid}: {error}")
        item.warn(pytest.PytestWarning(f"raceguard internal error (findings of this test may be incomplete): {error}"))


def _merge_finding(into: dict[str, Finding], finding: Finding, nodeid: str) -> None:
    known = into.get(finding.fingerprint)
    if known is None:
        into[finding.fingerprint] = finding
        return
    tests = known.details.setdefault("also_in_tests", [])
    if nodeid not in tests and nodeid != known.details.get("test"):
        tests.append(nodeid)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Any:
    _start(item)
    return (yield)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    watch = item.stash.get(TEST_KEY, None)
    if watch is not None:
        if watch.refusal is not None:
            pytest.fail(watch.refusal, pytrace=False)
        watch.phase = "call"
        if watch.schedules is not None and watch.session is not None:
            original = item.obj  # type: ignore[attr-defined]
            item.obj = _under_schedules(original, watch, item)  # type: ignore[attr-defined]
            try:
                return (yield)
            finally:
                item.obj = original  # type: ignore[attr-defined]
    return (yield)


def _under_schedules(test: Any, watch: WatchedTest, item: pytest.Item) -> Any:
    """The test function, run once per controlled schedule until one fails."""
    import functools
    import inspect

    if inspect.iscoroutinefunction(test) or inspect.isasyncgenfunction(test):
        def refuse(*args: Any, **kwargs: Any) -> None:
            pytest.fail("@pytest.mark.raceguard(schedules=...) cannot run async tests: their code runs in an event loop", pytrace=False)

        return refuse

    count, seed, strategy = watch.schedules  # type: ignore[misc]

    @functools.wraps(test)
    def run_schedules(*args: Any, **kwargs: Any) -> None:
        __tracebackhide__ = True
        import random as random_mod

        from .schedule.inprocess import explore

        base_seed = seed if seed is not None else random_mod.SystemRandom().randrange(1, 1_000_000)
        namespace = getattr(getattr(item, "module", None), "__dict__", None)
        result = explore(
            lambda: test(*args, **kwargs),
            schedules=count,
            base_seed=base_seed,
            strategy=strategy,
            depth=item.config.stash[RUN_KEY].settings().depth,
            label=item.nodeid,
            main_globals=namespace,
        )
        watch.session._schedules_run = result.ran
        run = result.failure
        if run is None:
            return
        if isinstance(run.error, (pytest.skip.Exception, pytest.xfail.Exception, pytest.exit.Exception)):
            raise run.error  # the body skipped, xfailed or exited pytest: not a failing schedule
        which = "the PCT calibration schedule" if result.index is None and strategy == "pct" else (
            f"schedule {result.index + 1} of {count}" if result.index is not None else "the schedule")
        message = (
            f"raceguard: {which} failed (strategy {strategy}, seed {result.seed}, "
            f"{run.stats.get('switches', 0)} switches): {run.describe_failure()}\n"
            f"reproduce it with {reproduce_marker(result.seed, strategy)}"  # type: ignore[arg-type]
        )
        if run.error is not None:
            add_note = getattr(run.error, "add_note", None)  # Python 3.11+
            if add_note is not None:
                add_note(message)
                raise run.error
            raise AssertionError(f"{message}\n{type(run.error).__name__}: {run.error}") from run.error
        pytest.fail(message, pytrace=False)

    return run_schedules


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    watch = item.stash.get(TEST_KEY, None)
    if watch is not None:
        watch.phase = "teardown"
    try:
        return (yield)
    finally:
        _stop(item)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    run = item.config.stash.get(RUN_KEY, None)
    watch = item.stash.get(TEST_KEY, None)
    if report.failed and run is not None:
        if watch is not None and watch.refusal is not None and call.when == "call":
            run.failed_tests += 1  # failed by the plugin (its marker), not by the test
        else:
            run.own_failures += 1
    if watch is None or watch.session is None or call.when == "setup":
        return report  # setup findings are judged with the call (or at teardown if setup failed)
    session = watch.session
    new = [f for f in session.findings if f.fingerprint not in watch.reported]
    if not any(f.at_least(session.fail_on) for f in new):
        return report
    watch.reported.update(f.fingerprint for f in new)
    text = _failure_text(session, new, verbose=item.config.getoption("verbose", 0) >= 2)
    if report.passed and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = RaceguardFailure(text, _crash_line(session, new), item)
        if run is not None:
            run.failed_tests += 1
    else:
        report.sections.append(("raceguard", text))
    return report


def _failure_text(session: Any, findings: list[Finding], verbose: bool = False) -> str:
    """The text report of ``findings`` (library frames and all details with ``-vv``)."""
    from .report.document import Report
    from .report.text import render_text

    full = session.report()
    report = Report(
        command="check",
        target=full.target,
        findings=findings,
        stats=full.stats,
        error=full.error,
        suppressed=full.suppressed,
    )
    text = render_text(report, verbose=verbose).rstrip("\n")
    note = session.untracked_note(report)
    return text + ("\n" + note if note else "")


def _crash_line(session: Any, findings: list[Finding]) -> str:
    from .report.text import headline

    failing = [f for f in findings if f.at_least(session.fail_on)]
    first = headline(failing[0])
    more = f" (+{len(failing) - 1} more)" if len(failing) > 1 else ""
    return f"raceguard: {first}{more}"


class _Crash:
    """What pytest's short summary and junitxml read from a failure (``reprcrash``)."""

    def __init__(self, path: str, lineno: int, message: str) -> None:
        self.path = path
        self.lineno = lineno
        self.message = message


class RaceguardFailure:
    """The longrepr of a test failed by raceguard: the text report, no Python traceback."""

    def __init__(self, text: str, message: str, item: pytest.Item) -> None:
        self.text = text
        path, lineno, _ = item.location
        self.reprcrash = _Crash(str(path), (lineno or 0) + 1, message)

    def toterminal(self, tw: Any) -> None:
        for line in self.text.splitlines():
            tw.line(line, red=line.startswith("WARNING: raceguard:"), bold=line.startswith("WARNING: raceguard:"))

    def __str__(self) -> str:
        return self.text


@pytest.fixture(name=FIXTURE)
def raceguard_fixture(request: pytest.FixtureRequest) -> Any:
    """The test's :class:`raceguard.WatchSession` (``findings``, ``assert_clean()``, ``report()``,
    ``clear()``); requesting it runs the test under detection."""
    watch = request.node.stash.get(TEST_KEY, None)
    if watch is not None and watch.refusal is not None:
        pytest.fail(watch.refusal, pytrace=False)
    if watch is None or watch.session is None:
        pytest.fail(
            "the raceguard fixture needs detection, but @pytest.mark.raceguard(enabled=False) turned it off for this test",
            pytrace=False,
        )
    return watch.session


# --- the run -----------------------------------------------------------------------------------


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    run = session.config.stash.get(RUN_KEY, None)
    if run is None or run.report_path is None or _is_xdist_controller(session.config):
        return
    from .report.document import Report, to_json, write_atomic

    status = int(exitstatus)
    # Without raceguard: tests it failed would have passed (unless others failed on their own).
    target_exit_code = 0 if status == int(pytest.ExitCode.TESTS_FAILED) and run.own_failures <= 0 else status
    report = Report(
        command="check",
        target=[str(a) for a in session.config.invocation_params.args],
        findings=list(run.findings.values()),
        target_exit_code=target_exit_code,
        stats={
            "threads": run.threads,
            "ops": run.ops,
            "schedules_run": 1,
            "first_failure_at": None,
            "wall_seconds": round(time.monotonic() - run.started, 3),
            "tests_watched": run.watched,
            "tests_failed_by_raceguard": run.failed_tests,
        },
        error="; ".join(dict.fromkeys(run.errors)) or None,
        target_outcome={"kind": "exit", "code": target_exit_code, "signal": None, "detail": None},
        suppressed=list(run.suppressed.values()),
    )
    try:
        run.report_path.parent.mkdir(parents=True, exist_ok=True)  # like --junitxml
        write_atomic(run.report_path, to_json(report))
    except OSError as exc:
        run.errors.append(f"cannot write the report {run.report_path}: {exc}")


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    run = config.stash.get(RUN_KEY, None)
    if run is None:
        return
    report_option = config.getoption("raceguard_report", None)
    if _is_xdist_controller(config):
        if report_option:
            pattern = report_path_for(report_option, "gw*")
            terminalreporter.write_sep("-", "raceguard")
            terminalreporter.write_line(f"raceguard: each xdist worker wrote its own report: {pattern}")
        return
    if not run.watched:
        return
    terminalreporter.write_sep("-", "raceguard")
    found = _count(list(run.findings.values())) if run.findings else "no findings"
    line = f"raceguard: {run.watched} {'test' if run.watched == 1 else 'tests'} watched, {found}"
    if run.failed_tests:
        line += f", {run.failed_tests} {'test' if run.failed_tests == 1 else 'tests'} failed by raceguard"
    if run.suppressed:
        line += f"; {len(run.suppressed)} suppressed"
    if run.report_path is not None and run.report_path.exists():
        line += f"; report: {run.report_path}"
    terminalreporter.write_line(line)
    for error in run.errors:
        terminalreporter.write_line(f"raceguard: error: {error}", red=True)


def _count(findings: list[Finding]) -> str:
    kinds: dict[str, int] = {}
    for f in findings:
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    breakdown = ", ".join(f"{n} {k}" for k, n in kinds.items())
    return f"{len(findings)} {'finding' if len(findings) == 1 else 'findings'} ({breakdown})"
