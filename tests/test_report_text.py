"""The human (TSan-like) text report."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from raceguard.report.document import Report
from raceguard.report.finding import Access, Finding, Frame, Origin
from raceguard.report.text import headline, print_report, render_finding_text, render_text, summary_line

DATA = Path(__file__).parent / "data"


def sample() -> Report:
    return Report.from_dict(json.loads((DATA / "report-all-kinds.json").read_text(encoding="utf-8")))


def race() -> Finding:
    return Finding(
        kind="data-race",
        resource="model.fc1.weight",
        resource_kind="parameter",
        message="data race on parameter model.fc1.weight: write by 'trainer' vs read by 'checkpointer'",
        accesses=[
            Access(
                "trainer",
                "thread:trainer",
                "write",
                "aten::add_.Tensor",
                [],
                [
                    Frame("train.py", 42, "step"),
                    Frame("train.py", 57, "<module>"),
                    Frame("torch/optim/adam.py", 410, "_single_tensor_adam", user=False),
                    Frame("torch/optim/adam.py", 166, "step", user=False),
                    Frame("torch/optim/optimizer.py", 487, "wrapper", user=False),
                ],
            ),
            Access("checkpointer", "thread:checkpointer", "read", "aten::clone", ["ckpt_lock (train.py:12)"], [Frame("train.py", 30, "save")]),
        ],
        hint="Take ckpt_lock around optimizer.step() too.",
        details={"why": "'trainer' never takes ckpt_lock.", "also_on": ["a", "b", "c", "d", "e"]},
    )


def cycle(closed: bool = False) -> Finding:
    return Finding(
        kind="lock-order-cycle",
        resource="model_lock",
        resource_kind="lock",
        message="lock-order cycle between model_lock and io_lock",
        accesses=[
            # Listed in the opposite order to the cycle: the picture must follow details["lock"].
            Access("ckpt", "thread:ckpt", "acquire", None, ["io_lock"], [Frame("ckpt.py", 18, "save")], {"lock": "model_lock"}),
            Access("trainer", "thread:trainer", "acquire", None, ["model_lock"], [Frame("train.py", 40, "step")], {"lock": "io_lock"}),
        ],
        details={"cycle": ["model_lock", "io_lock", "model_lock"] if closed else ["model_lock", "io_lock"]},
    )


STATS = {"threads": 3, "ops": 18234, "schedules_run": 1, "first_failure_at": None, "wall_seconds": 2.1}


def check_report(**kwargs) -> Report:
    kwargs.setdefault("findings", [race(), cycle()])
    return Report(command="check", target=["train.py"], target_exit_code=0, stats=dict(STATS), **kwargs)


def test_data_race_block() -> None:
    lines = render_finding_text(race()).splitlines()
    assert lines == [
        "WARNING: raceguard: data race on parameter model.fc1.weight",
        "  write by thread 'trainer' (aten::add_.Tensor) with locks held: none",
        "    #0 step train.py:42",
        "    #1 <module> train.py:57",
        "    #2 _single_tensor_adam torch/optim/adam.py:410",
        "    #3 step torch/optim/adam.py:166",
        "    ... 1 more library frame (--verbose shows them)",
        "  read by thread 'checkpointer' (aten::clone) with locks held: ckpt_lock (train.py:12)",
        "    #0 save train.py:30",
        "  why: 'trainer' never takes ckpt_lock.",
        "  also on: a, b, c (+2 more)",
        "  hint: Take ckpt_lock around optimizer.step() too.",
        f"  fingerprint: {race().fingerprint}",
    ]


def test_verbose_shows_every_library_frame_and_resource() -> None:
    text = render_finding_text(race(), verbose=True)
    assert "    #4 wrapper torch/optim/optimizer.py:487" in text
    assert "more library frame" not in text
    assert "  also on: a, b, c, d, e\n" in text


@pytest.mark.parametrize("closed", [False, True])
def test_lock_order_cycle_picture(closed: bool) -> None:
    lines = render_finding_text(cycle(closed)).splitlines()
    assert lines[0] == "WARNING: raceguard: lock-order inversion (potential deadlock) between model_lock and io_lock"
    assert "  acquire of model_lock by thread 'ckpt' with locks held: io_lock" in lines
    assert "  cycle: model_lock → io_lock (train.py:40) → model_lock (ckpt.py:18)" in lines


def test_headline_of_every_kind() -> None:
    assert [headline(f) for f in sample().findings] == [
        "data race on parameter model.fc1.weight",
        "lock-order inversion (potential deadlock) between model_lock and io_lock",
        "deadlock: threads 'trainer' and 'loader' are blocked on each other",
        "unhandled exception in thread 'loader': ValueError: bad batch",
        "target failed under schedule #7 (seed 99)",
        "random generator torch.default_generator shared by threads 'trainer' and 'augment' without ordering",
        "thread-local mode mismatch on module attribute model.forward",
    ]


def test_full_report_of_every_kind() -> None:
    text = render_text(sample())
    assert text.count("WARNING: raceguard: ") == 7
    # Reproduce commands, tracebacks, wait targets, message lines.
    assert "  reproduce: raceguard replay --seed 1234 --schedule 3 -- src/train.py --epochs 1\n" in text
    assert "  wait by thread 'trainer' for batches.get() with locks held: model_lock\n" in text
    assert "  exception raised in thread 'loader' with locks held: none\n" in text
    assert "  traceback:\n    Traceback (most recent call last):\n" in text
    assert "    AssertionError: loss is nan\n" in text
    assert "  target exited with code 1 under schedule #7\n" in text  # the message, not a repeat of the header
    assert "  (no stack)" not in text
    assert text.endswith(
        "raceguard: 7 findings (1 data-race, 1 lock-order-cycle, 1 deadlock, 1 thread-exception, "
        "1 target-failure, 1 shared-rng, 1 thread-local-mode) in 4 threads, 18234 ops, 50 schedules, 12.5 s; "
        "target exited with code 1\n"
    )


def test_summary_with_findings_and_suppressed() -> None:
    report = check_report(suppressed=[race()])
    assert summary_line(report) == "raceguard: 2 findings (1 data-race, 1 lock-order-cycle) in 3 threads, 18234 ops, 2.1 s; 1 suppressed"


def test_summary_clean() -> None:
    assert summary_line(check_report(findings=[])) == "raceguard: clean — no findings in 3 threads, 18234 ops, 2.1 s"


def test_summary_singular_and_fixed() -> None:
    report = Report("check", ["t.py"], [race()], 0, {"threads": 1, "ops": 1, "wall_seconds": 0.04}, fixed=["0123456789abcdef"])
    assert summary_line(report) == "raceguard: 1 finding (1 data-race) in 1 thread, 1 op, 40 ms; 1 baseline finding fixed"


@pytest.mark.parametrize(
    "outcome, exit_code, expected",
    [
        ({"kind": "exit", "code": 3, "signal": None, "detail": None}, 3, "target exited with code 3"),
        ({"kind": "signal", "code": -11, "signal": "SIGSEGV", "detail": None}, None, "target killed by SIGSEGV"),
        ({"kind": "signal", "code": -9, "signal": None, "detail": None}, None, "target killed by SIGKILL"),
        ({"kind": "timeout", "code": None, "signal": None, "detail": "10"}, None, "target timed out after 10 s"),
        ({"kind": "timeout", "code": None, "signal": None, "detail": "2.5 min"}, None, "target timed out after 2.5 min"),
        ({"kind": "timeout", "code": None, "signal": None, "detail": "timed out after 10 s"}, None, "target timed out after 10 s"),
        ({"kind": "timeout", "code": None, "signal": None, "detail": None}, None, "target timed out"),
        (
            {"kind": "exception", "code": 1, "signal": None, "detail": "Traceback (most recent call last):\n  File \"t.py\", line 1\nKeyError: 'x'\n"},
            1,
            "target raised KeyError: 'x'",
        ),
        ({"kind": "signal", "code": None, "signal": "SIGABRT", "detail": "killed by SIGABRT\nFatal Python error"}, None, "target killed by SIGABRT"),
        ({"kind": "usage-error", "code": 2, "signal": None, "detail": "no such file: t.py"}, 2, "target could not be run: no such file: t.py"),
        ({"kind": "interrupted", "code": None, "signal": None, "detail": None}, None, "interrupted (Ctrl-C)"),
        ({"kind": "interrupted", "code": None, "signal": "SIGTERM", "detail": "x"}, None, "interrupted (SIGTERM)"),
        ({"kind": "exception", "code": 1, "signal": None, "detail": "ValueError: bad"}, 1, "target raised ValueError: bad"),
        (None, 3, "target exited with code 3"),
    ],
)
def test_summary_says_how_the_target_ended(outcome: dict | None, exit_code: int | None, expected: str) -> None:
    report = Report("check", ["t.py"], [], exit_code, dict(STATS), target_outcome=outcome)
    assert summary_line(report) == f"raceguard: clean — no findings in 3 threads, 18234 ops, 2.1 s; {expected}"


def test_summary_is_silent_about_a_clean_exit() -> None:
    report = check_report(findings=[], target_outcome={"kind": "exit", "code": 0, "signal": None, "detail": None})
    assert "target" not in summary_line(report)


def test_error_report() -> None:
    report = check_report(findings=[], error="engine crashed\nTraceback ...")
    text = render_text(report)
    assert "raceguard: internal error:\n  engine crashed\n  Traceback ...\n" in text
    assert text.endswith("raceguard: error: engine crashed\n")


def test_quiet_prints_only_the_summary() -> None:
    report = check_report()
    assert render_text(report, quiet=True) == summary_line(report) + "\n"
    stream = io.StringIO()
    print_report(report, file=stream, quiet=True)
    assert stream.getvalue() == summary_line(report) + "\n"


def test_verbose_lists_suppressed_findings() -> None:
    suppressed = Finding.from_dict({**race().to_dict(), "suppressed": "suppression 'data-race:*fc1*' (s.txt:1)"})
    text = render_text(check_report(findings=[], suppressed=[suppressed]), verbose=True)
    assert f"suppressed: data race on parameter model.fc1.weight [{race().fingerprint}]: suppression 'data-race:*fc1*' (s.txt:1)" in text
    assert "suppressed:" not in render_text(check_report(findings=[], suppressed=[suppressed]))


def test_long_lines_are_not_wrapped_and_brackets_are_literal() -> None:
    resource = "optimizer[Adam].state[model." + "layer." * 40 + "weight].exp_avg"
    finding = Finding("data-race", resource, "optimizer-state", "m", [Access("t", "thread:t", "write", None, [], [Frame("/a/very/long/" * 10 + "x.py", 1, "f")])])
    text = render_finding_text(finding)
    assert f"WARNING: raceguard: data race on optimizer state {resource}\n" in text
    assert "/a/very/long/" * 10 + "x.py:1" in text


def test_plain_stream_has_no_colour() -> None:
    stream = io.StringIO()
    print_report(check_report(), file=stream)
    assert "\x1b[" not in stream.getvalue()
    assert stream.getvalue() == render_text(check_report())


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_colour_and_dimmed_library_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    stream = FakeTerminal()
    print_report(check_report(findings=[race()]), file=stream)
    lines = stream.getvalue().splitlines()
    library = next(line for line in lines if "_single_tensor_adam" in line)
    user = next(line for line in lines if "#0 step train.py:42" in line)
    assert "\x1b[2m" in library  # SGR 2: dim
    assert "\x1b[" not in user
    assert "\x1b[1;31m" in lines[0]  # bold red header for an error-severity finding


def test_stream_that_cannot_encode_unicode_gets_ascii() -> None:
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    print_report(check_report(findings=[cycle()]), file=stream)
    stream.flush()
    text = raw.getvalue().decode("ascii")
    assert "  cycle: model_lock -> io_lock (train.py:40) -> model_lock (ckpt.py:18)" in text


def test_finding_without_stack() -> None:
    finding = Finding("thread-exception", "worker", "thread", "boom", [Access("worker", "thread:worker", "raise")])
    assert "    (no stack)" in render_finding_text(finding)


def test_verbose_shows_the_whole_outcome_detail() -> None:
    outcome = {"kind": "signal", "code": None, "signal": "SIGSEGV", "detail": "killed by SIGSEGV\nFatal Python error: Segmentation fault\n  File \"t.py\", line 3"}
    report = check_report(findings=[], target_outcome=outcome)
    assert "Fatal Python error" not in render_text(report)
    assert "target outcome:\n  killed by SIGSEGV\n  Fatal Python error: Segmentation fault\n" in render_text(report, verbose=True)


def test_a_program_that_needs_cuda_on_a_machine_without_it_says_so_in_one_line() -> None:
    report = Report(
        command="check",
        target=["gpu.py"],
        findings=[],
        target_exit_code=1,
        target_outcome={"kind": "exception", "code": 1, "detail": "AssertionError: Torch not compiled with CUDA enabled"},
    )
    line = summary_line(report)
    assert "needs CUDA, which this machine does not have" in line
    assert "\n" not in line.strip()


def _with_origins() -> Finding:
    finding = race()
    finding.accesses[0].origin = Origin(
        kind="thread-start",
        stack=[Frame("train.py", 70, "start_trainer"), Frame("train.py", 80, "<module>"), Frame("threading.py", 9, "start", user=False)],
        thread="MainThread",
    )
    finding.accesses[1].origin = Origin(kind="task-submit", stack=[Frame("train.py", 90, "<module>")], thread="MainThread")
    return finding


def test_origins_follow_each_stack() -> None:
    lines = render_finding_text(_with_origins()).splitlines()
    started = lines.index("    thread started at train.py:70 in start_trainer by thread 'MainThread'")
    submitted = lines.index("    task submitted at train.py:90 in <module> by thread 'MainThread'")
    # Each under its own access: after that access's frames, before the next access.
    assert lines[started - 1] == "    ... 1 more library frame (--verbose shows them)"
    assert lines[started + 1].startswith("  read by thread 'checkpointer'")
    assert lines[submitted - 1] == "    #0 save train.py:30"
    assert "start_trainer train.py:70" not in "\n".join(lines)  # the origin's stack only with --verbose


def test_verbose_shows_the_origin_call_chain() -> None:
    text = render_finding_text(_with_origins(), verbose=True)
    assert (
        "    thread started at train.py:70 in start_trainer by thread 'MainThread'\n"
        "      #0 start_trainer train.py:70\n"
        "      #1 <module> train.py:80\n"
        "      #2 start threading.py:9\n"
    ) in text


def test_origin_without_user_frames_or_thread() -> None:
    finding = race()
    finding.accesses[1].origin = Origin(kind="task-submit", stack=[Frame("asyncio/threads.py", 25, "to_thread", user=False)])
    assert "    task submitted at asyncio/threads.py:25 in to_thread\n" in render_finding_text(finding)
    finding.accesses[1].origin = Origin(kind="thread-start", stack=[])
    assert "    thread started\n" in render_finding_text(finding)
