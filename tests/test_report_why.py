"""The ``why:`` line of a race says which lines nothing orders and which synchronisation is
missing, in the program's terms; the engine's clock explanation (epochs) is kept for --verbose
and, unchanged, for the JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raceguard.report.finding import Access, Finding, Frame
from raceguard.report.text import render_finding_text
from raceguard.report.why import plain_why

ROOT = Path(__file__).resolve().parent.parent
CLOCKS = ("nothing orders these accesses: at its write, 'b' had synchronised with 'a' only up to that "
          "thread's epoch 0, and the read happened in epoch 2 (no lock, join, event, queue, barrier or future in between)")


def raceguard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raceguard", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def either_order(a: str, b: str, rest: str) -> set[str]:
    """The why for the two accesses ``a`` and ``b`` whichever of them ran first (the threads race)."""
    return {f"why: nothing orders {a} before {b}: {rest}", f"why: nothing orders {b} before {a}: {rest}"}


def why_line(stderr: str, label: str = "why") -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip().startswith(f"{label}: ")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def different_locks(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("why") / "report.json"
    proc = raceguard("check", "fixtures/races/lock_not_shared.py")
    assert raceguard("check", "--format", "json", "-o", str(out), "fixtures/races/lock_not_shared.py").returncode == 1
    return proc, json.loads(out.read_text())


def test_why_names_both_lines_and_the_two_locks_not_the_clocks(different_locks) -> None:
    proc, _ = different_locks
    assert proc.returncode == 1, proc.stderr
    scale, shift = "lock_not_shared.py:18 (write, thread 'scale')", "lock_not_shared.py:25 (write, thread 'shift')"
    # Each lock by its variable, whether or not its thread has ended when the race is reported.
    line = why_line(proc.stderr)
    scale_lock, shift_lock = "lock (lock_not_shared.py:15) in 'scale'", "lock (lock_not_shared.py:22) in 'shift'"
    tail = "and no join, queue, event, barrier or future passes from one thread to the other between them"
    assert line in {
        f"why: nothing orders {scale} before {shift}: they hold different locks ({scale_lock}, {shift_lock}), {tail}",
        f"why: nothing orders {shift} before {scale}: they hold different locks ({shift_lock}, {scale_lock}), {tail}",
    }
    assert "epoch" not in proc.stderr


def test_verbose_keeps_the_clock_detail_and_json_keeps_it_as_the_why(different_locks) -> None:
    _, report = different_locks
    verbose = raceguard("check", "-v", "fixtures/races/lock_not_shared.py")
    assert verbose.returncode == 1, verbose.stderr
    assert why_line(verbose.stderr).startswith("why: nothing orders lock_not_shared.py:")
    clocks = why_line(verbose.stderr, "clocks")
    assert "only up to that thread's epoch" in clocks, verbose.stderr
    (race,) = report["findings"]
    # Another run: the same sentence, though the epoch numbers may differ with the timing.
    assert "only up to that thread's epoch" in race["details"]["why"]
    assert clocks.startswith("clocks: nothing orders these accesses: at its write, ")


def test_a_race_without_locks_says_neither_holds_one() -> None:
    proc = raceguard("check", "fixtures/races/inplace_counter.py")
    assert proc.returncode == 1, proc.stderr
    assert why_line(proc.stderr) in either_order(
        "inplace_counter.py:17 (write, thread 'requests')", "inplace_counter.py:23 (write, thread 'retries')",
        "neither holds a lock, and no join, queue, event, barrier or future passes from one thread to the other "
        "between them")


def access(thread: str, mode: str, line: int, locks: list[str], timeline: str | None = None) -> Access:
    return Access(thread, timeline or f"thread:{thread}", mode, "aten::add_.Tensor", locks, [Frame("src/train.py", line, "f")])


def race(first: Access, second: Access, why: str = CLOCKS) -> Finding:
    return Finding(kind="data-race", resource="w", resource_kind="tensor", message="data race on w",
                   accesses=[first, second], details={"why": why})


def test_one_side_locked() -> None:
    text = plain_why(race(access("a", "write", 3, ["model_lock (train.py:2)"]), access("b", "read", 9, [])))
    assert text == ("nothing orders train.py:3 (write, thread 'a') before train.py:9 (read, thread 'b'): only 'a' "
                    "holds a lock (model_lock (train.py:2)), 'b' none, and no join, queue, event, barrier or future "
                    "passes from one thread to the other between them")


def test_stream_race_names_the_streams_and_the_stream_synchronisation() -> None:
    why = ("'cuda:0/stream 1' had seen 'cuda:0/stream 0' only up to its epoch 1, but the write happened in epoch 3: "
           "no wait_stream, event record/wait or synchronize orders the two accesses")
    text = plain_why(race(access("main", "write", 3, [], "cuda:0/stream 0"), access("main", "read", 5, [], "cuda:0/stream 1"), why))
    assert text == ("nothing orders train.py:3 (write on cuda:0/stream 0, launched by thread 'main') before train.py:5 "
                    "(read on cuda:0/stream 1, launched by thread 'main'): no wait_stream, event record/wait or "
                    "synchronize between them")


def test_a_why_without_clocks_is_shown_as_it_is() -> None:
    cycle = race(access("a", "write", 3, []), access("b", "read", 9, []), why="each thread holds one lock of the cycle")
    assert plain_why(cycle) is None
    assert "  why: each thread holds one lock of the cycle\n" in render_finding_text(cycle)
    assert "clocks:" not in render_finding_text(cycle, verbose=True)
