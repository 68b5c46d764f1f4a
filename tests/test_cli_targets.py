"""How `raceguard check` runs targets: exactly like python, with the contract's exit codes, and
one clear line (never a traceback, never a hang) for bad input, crashes, timeouts and Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_cli_fixtures import ROOT, _innermost_user_line, _markers, run_check

TARGETS = ROOT / "fixtures" / "targets"
RACEGUARD = [sys.executable, "-m", "raceguard"]


def raceguard(*args: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*RACEGUARD, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def plain(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


import raceguard as _package

PACKAGE_DIR = Path(_package.__file__).resolve().parent
PACKAGE_FILES = sorted(p.relative_to(PACKAGE_DIR.parent).as_posix() for p in PACKAGE_DIR.rglob("*.py"))
FRAME = re.compile(r'^\s*File "([^"]+)", line \d+')


def raceguard_frames(lines: list[str]) -> list[str]:
    """The traceback lines that are frames of raceguard's own code: a file inside the package
    (computed from the imported package, wherever the checkout lives, even in a folder named
    raceguard) or a path ending in one of the package's modules (another copy of it)."""
    found = []
    for line in lines:
        m = FRAME.match(line)
        if not m:
            continue
        path = Path(m.group(1))
        inside = path.is_absolute() and path.resolve().is_relative_to(PACKAGE_DIR)
        if inside or any(path.as_posix().endswith("/" + name) for name in PACKAGE_FILES):
            found.append(line)
    return found


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[-1]


# -- running the target exactly like python -----------------------------------------------------
@pytest.mark.parametrize("args", [["a", "--b"], ["--", "x"], []])
def test_script_sees_what_plain_python_gives_it(args: list[str]) -> None:
    expected = plain("echo_argv.py", *args, cwd=TARGETS)
    got = raceguard("check", "-q", "echo_argv.py", *args, cwd=TARGETS)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == json.loads(expected.stdout)


def test_double_dash_ends_raceguard_options(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    got = raceguard("check", "--format", "json", "--output", str(out), "--", "echo_argv.py", "--format", cwd=TARGETS)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["argv"] == ["echo_argv.py", "--format"]
    assert json.loads(out.read_text())["target"] == ["echo_argv.py", "--format"]


def test_module_sees_what_python_dash_m_gives_it() -> None:
    expected = plain("-m", "echo_pkg", "x", "-y", cwd=TARGETS)
    got = raceguard("check", "-q", "-m", "echo_pkg", "x", "-y", cwd=TARGETS)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == json.loads(expected.stdout)


def test_sigterm_handler_looks_as_under_plain_python() -> None:
    # raceguard's own SIGTERM handler must not be the "previous handler" a program chains to.
    expected = plain("sigterm_handlers.py", cwd=TARGETS)
    got = raceguard("check", "-q", "sigterm_handlers.py", cwd=TARGETS)
    assert got.returncode == 0, got.stderr
    assert got.stdout == expected.stdout
    assert "installed SIG_DFL" in got.stdout


def test_the_fault_handler_looks_as_under_plain_python() -> None:
    # raceguard's own fault handler (the crash log of the report) is not the program's.
    expected = plain("faulthandler_state.py", cwd=TARGETS)
    got = raceguard("check", "-q", "faulthandler_state.py", cwd=TARGETS)
    assert got.returncode == 0, got.stderr
    assert got.stdout == expected.stdout
    assert got.stdout.startswith("at start False\n")


def test_target_stdout_is_untouched_and_report_goes_to_stderr() -> None:
    got = raceguard("check", str(TARGETS / "exits_3.py"))
    assert got.stdout == "about to exit\n"
    assert "raceguard:" in got.stderr


# -- the target's own failures -------------------------------------------------------------------
def test_sys_exit_code_is_reported_and_gives_exit_3(tmp_path: Path) -> None:
    proc, report = run_check(TARGETS / "exits_3.py", tmp_path)
    assert proc.returncode == 3
    assert report["target_exit_code"] == 3
    assert report["status"] == "clean"


@pytest.mark.parametrize("target", ["raises.py", "raises_in_forward.py"])
def test_uncaught_exception_prints_like_python_and_gives_exit_3(tmp_path: Path, target: str) -> None:
    expected = plain(str(TARGETS / target))
    proc, report = run_check(TARGETS / target, tmp_path)
    assert proc.returncode == 3
    assert report["target_exit_code"] == 1
    assert report["target_outcome"]["kind"] == "exception"
    # The same traceback python prints: no raceguard frames in it (not even the module-call
    # wrapper raceguard installs once a thread has started).
    # (From "Traceback" on in both: torch may warn on import first, e.g. without numpy.)
    want = expected.stderr[expected.stderr.index("Traceback") :].splitlines()
    tb = proc.stderr[proc.stderr.index("Traceback") :].splitlines()
    assert tb[: len(want)] == want
    assert raceguard_frames(tb) == []


def test_exception_escaping_a_thread_prints_like_python(tmp_path: Path) -> None:
    expected = plain(str(TARGETS / "thread_raises_in_forward.py"))
    proc, report = run_check(TARGETS / "thread_raises_in_forward.py", tmp_path)
    assert [f["kind"] for f in report["findings"]] == ["thread-exception"]
    marker = "Exception in thread server:"
    want = expected.stderr[expected.stderr.index(marker) :].splitlines()
    printed = proc.stderr[proc.stderr.index(marker) :].splitlines()[: len(want)]
    assert printed == want
    assert raceguard_frames(printed) == []


def test_exception_escaping_a_thread_is_a_finding(tmp_path: Path) -> None:
    path = TARGETS / "thread_exception.py"
    proc, report = run_check(path, tmp_path)
    assert proc.returncode == 1
    [finding] = report["findings"]
    assert finding["kind"] == "thread-exception"
    assert finding["resource"] == "thread 'loader'"
    assert "ValueError: bad batch of 3" in finding["message"]
    [access] = finding["accesses"]
    raise_line = next(i for i, l in enumerate(path.read_text().splitlines(), 1) if "# RAISE" in l)
    assert _innermost_user_line(access, path) == raise_line
    # Python's own printout of the exception is still there, unchanged.
    assert "Exception in thread loader:" in proc.stderr


# -- bad input: one line, exit 2 ------------------------------------------------------------------
def test_missing_script(tmp_path: Path) -> None:
    proc = raceguard("check", str(tmp_path / "nope.py"))
    assert proc.returncode == 2
    assert "No such file" in _one_line_error(proc)


def test_directory_instead_of_script(tmp_path: Path) -> None:
    proc = raceguard("check", str(tmp_path))
    assert proc.returncode == 2
    assert "directory" in _one_line_error(proc)


def test_syntax_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\ndef f(:\n    pass\n")
    proc = raceguard("check", str(bad))
    assert proc.returncode == 2
    line = _one_line_error(proc)
    assert "syntax error" in line and "bad.py:2" in line


def test_unknown_module() -> None:
    proc = raceguard("check", "-m", "no_such_module_xyz")
    assert proc.returncode == 2
    assert "No module named" in _one_line_error(proc)


def test_no_target_and_bad_option() -> None:
    assert raceguard("check").returncode == 2
    proc = raceguard("check", "--no-such-option", "x.py")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_unreadable_suppressions_file(tmp_path: Path) -> None:
    proc = raceguard("check", "--suppressions", str(tmp_path / "missing.supp"), str(TARGETS / "exits_3.py"))
    assert proc.returncode == 2
    _one_line_error(proc)


# -- a target that dies: findings made before are never lost ------------------------------------
def test_findings_survive_a_native_crash(tmp_path: Path) -> None:
    path = TARGETS / "race_then_segfault.py"
    proc, report = run_check(path, tmp_path)
    assert proc.returncode == 1
    assert report["target_outcome"]["kind"] == "signal"
    assert report["target_outcome"]["signal"] == "SIGSEGV"
    assert report["target_exit_code"] is None
    [finding] = report["findings"]
    markers = _markers(path)
    assert {_innermost_user_line(a, path) for a in finding["accesses"]} == {markers["A"], markers["B"]}
    assert "SIGSEGV" in proc.stderr
    assert report["stats"]["threads"] >= 2


def test_findings_survive_os_exit(tmp_path: Path) -> None:
    proc, report = run_check(TARGETS / "race_then_os_exit.py", tmp_path)
    assert proc.returncode == 1
    assert report["target_exit_code"] == 5
    assert len(report["findings"]) == 1


def test_statistics_survive_os_exit(tmp_path: Path) -> None:
    """os._exit runs no finally and no atexit: the final statistics are sent before it, or the
    report of a clean run would say 0 threads, 0 ops (a heartbeat every 0.5 s is too late)."""
    proc, report = run_check(TARGETS / "threads_then_os_exit.py", tmp_path)
    assert (proc.returncode, proc.stdout) == (3, "accumulated 10\n"), proc.stderr
    assert report["target_exit_code"] == 3 and report["findings"] == []
    assert report["stats"]["threads"] == 3 and report["stats"]["ops"] >= 10, report["stats"]


def test_os_exit_from_inside_raceguard_still_exits(tmp_path: Path) -> None:
    """The report before os._exit waits for raceguard's own locks on a thread of its own, for
    2 s at most: the calling thread may hold one (a signal handler ran inside raceguard)."""
    proc, report = run_check(TARGETS / "os_exit_inside_raceguard.py", tmp_path, "--timeout", "30")
    assert (proc.stdout, report["target_exit_code"]) == ("exiting\n", 5), proc.stderr
    assert report["target_outcome"]["kind"] == "exit"


def test_timeout_reports_what_was_found(tmp_path: Path) -> None:
    started = time.monotonic()
    proc, report = run_check(TARGETS / "sleeps.py", tmp_path, "--timeout", "15")
    assert time.monotonic() - started < 60
    assert report["target_outcome"]["kind"] == "timeout"
    assert len(report["findings"]) == 1
    assert proc.returncode == 1


def test_a_target_blocked_in_cpp_dies_of_sigterm_as_under_plain_python(tmp_path: Path) -> None:
    """No signal handler of raceguard's in the target: a Python handler runs only when the main
    thread runs Python code, and this one waits in C++ with the GIL released. Under plain python
    SIGTERM ends it at once (exit -15); a handler would have kept it alive for ever."""
    out = tmp_path / "r.json"
    proc = subprocess.Popen(
        [*RACEGUARD, "check", "--format", "json", "--output", str(out), str(TARGETS / "blocked_in_cpp.py")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        target_pid = int(proc.stdout.readline())
        time.sleep(0.5)  # into the wait
        os.kill(target_pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    report = json.loads(out.read_text())
    assert report["target_outcome"]["kind"] == "signal", stderr
    assert report["target_outcome"]["signal"] == "SIGTERM"


def test_a_timeout_reports_the_lock_order_cycles_of_a_target_blocked_in_cpp(tmp_path: Path) -> None:
    """The supervisor asks for the cycles before it ends the tree; the heartbeat thread answers
    while the main thread waits in C++ (a signal handler could not run there)."""
    proc, report = run_check(TARGETS / "lock_cycle_then_blocked.py", tmp_path, "--timeout", "5")
    assert proc.stdout == "inverted\n"
    assert report["target_outcome"]["kind"] == "timeout"
    assert [f["kind"] for f in report["findings"]] == ["lock-order-cycle"], proc.stderr
    assert not report.get("incomplete"), report.get("incomplete")


def test_ctrl_c_writes_the_report_so_far(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.Popen(
        [*RACEGUARD, "check", "--format", "json", "--output", str(out), str(TARGETS / "sleeps.py")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )
    line = proc.stdout.readline()  # the target finished racing
    assert line.strip() == "racing done"
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1, stderr
    report = json.loads(out.read_text())
    assert report["target_outcome"]["kind"] == "interrupted"
    assert len(report["findings"]) == 1
    # Python's own KeyboardInterrupt traceback of the target may appear; raceguard's never does.
    assert raceguard_frames(stderr.splitlines()) == []


def test_a_forked_worker_process_runs_normally_and_is_checked_as_a_process_of_its_own(tmp_path: Path) -> None:
    proc, report = run_check(TARGETS / "forks_a_worker.py", tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "child says 6.0" in proc.stdout and "exit 0" in proc.stdout
    # The parent's race, and the worker's own race between its two threads (its copy of the
    # tensor: not shared memory, so nothing across the two processes).
    by_process = sorted(tuple(f["details"].get("processes", ["target"])) for f in report["findings"])
    assert len(by_process) == 2 and by_process[1] == ("target",), report["findings"]
    assert by_process[0][0].startswith("process "), by_process
    assert report["stats"]["processes"] == 2
    assert report["stats"]["threads"] == 2 + 3  # parent: main, bump; worker: main, its thread, the queue's feeder
