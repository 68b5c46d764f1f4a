"""The human report: ThreadSanitizer-like text, rendered with rich.

One block per finding (a ``WARNING: raceguard: ...`` header, each access with its stack, then the
kind-specific extras, the hint, the reproduce command and the fingerprint) and one summary line.
The same builder serves the terminal (:func:`print_report`, coloured when the stream is a
terminal, library frames dimmed) and plain strings (:func:`render_text`, used by ``--format
text --output``, the JUnit failure bodies and the tests).

Pure Python, no torch.
"""

from __future__ import annotations

import signal as signal_module
import sys
from collections import Counter
from dataclasses import dataclass
from io import StringIO
from typing import TYPE_CHECKING, Any, Iterable, TextIO

from rich.console import Console
from rich.text import Text

from raceguard.report.finding import KINDS, Access, Finding, Frame, Origin
from raceguard.report.why import plain_why

if TYPE_CHECKING:
    from raceguard.report.document import Report

# How many library (torch, site-packages) frames to show per stack without --verbose.
LIBRARY_FRAMES_SHOWN = 2
# How many entries of details["also_on"] to name without --verbose.
ALSO_ON_SHOWN = 3
RENDER_WIDTH = 100

RESOURCE_NOUNS = {
    "parameter": "parameter",
    "buffer": "buffer",
    "grad": "gradient",
    "optimizer-state": "optimizer state",
    "tensor": "tensor",
    "module-attribute": "module attribute",
    "lock": "lock",
    "rng": "random generator",
    "thread": "thread",
}

STYLE_ERROR = "bold red"
STYLE_WARNING = "bold yellow"
STYLE_LIBRARY = "dim"
STYLE_HINT = "cyan"
STYLE_REPRODUCE = "green"
STYLE_MUTED = "dim"
STYLE_CLEAN = "bold green"


@dataclass(frozen=True)
class Glyphs:
    """The two non-ASCII characters the report uses, swappable for streams that cannot encode them."""

    arrow: str = "→"
    dash: str = "—"


UNICODE = Glyphs()
ASCII = Glyphs(arrow="->", dash="-")


# --- wording ---------------------------------------------------------------------------------


def resource_phrase(finding: Finding) -> str:
    """``parameter model.fc1.weight``; no repeated noun for ``tensor float32[...] allocated at ...``."""
    noun = RESOURCE_NOUNS.get(finding.resource_kind, finding.resource_kind)
    if finding.resource.startswith(noun + " "):
        return finding.resource
    return f"{noun} {finding.resource}"


def cycle_locks(finding: Finding) -> list[str]:
    """The locks of a lock-order cycle, each once, in cycle order (details["cycle"] may be closed)."""
    cycle = finding.details.get("cycle")
    if not isinstance(cycle, list) or not cycle:
        return []
    locks = [str(lock) for lock in cycle]
    if len(locks) > 1 and locks[0] == locks[-1]:
        locks = locks[:-1]
    return locks


def headline(finding: Finding) -> str:
    """What the finding is, in a few words: the text after ``WARNING: raceguard:``."""
    kind = finding.kind
    threads = _unique(a.thread for a in finding.accesses)
    if kind == "data-race":
        return f"data race on {resource_phrase(finding)}"
    if kind == "lock-order-cycle":
        locks = cycle_locks(finding) or [finding.resource]
        return f"lock-order inversion (potential deadlock) between {_and_list(locks)}"
    if kind == "deadlock":
        if len(threads) == 1:
            return f"deadlock: thread {threads[0]!r} waits forever for {finding.resource}"
        if threads:
            return f"deadlock: threads {_and_list([repr(t) for t in threads])} are blocked on each other"
        return f"deadlock on {resource_phrase(finding)}"
    if kind == "thread-exception":
        thread = threads[0] if threads else finding.resource
        exception = finding.details.get("exception")
        return f"unhandled exception in thread {thread!r}" + (f": {exception}" if exception else "")
    if kind == "target-failure":
        where = ""
        if finding.reproduce.schedule_index is not None:
            where = f" under schedule #{finding.reproduce.schedule_index}"
            if finding.reproduce.seed is not None:
                where += f" (seed {finding.reproduce.seed})"
        return f"target failed{where}"
    if kind == "shared-rng":
        who = f"threads {_and_list([repr(t) for t in threads])}" if len(threads) > 1 else "several threads"
        return f"{resource_phrase(finding)} shared by {who} without ordering"
    if kind == "thread-local-mode":
        return f"thread-local mode mismatch on {resource_phrase(finding)}"
    return f"{kind} on {resource_phrase(finding)}"


def access_line(access: Access) -> str:
    """``write by thread 'trainer' (aten::add_.Tensor) with locks held: none``."""
    what = access.mode
    lock = access.details.get("lock")
    if access.mode == "acquire" and lock:
        what = f"acquire of {lock}"
    text = f"{what} by thread {access.thread!r}"
    if access.mode == "raise":
        text = f"exception raised in thread {access.thread!r}"
    if access.process:  # a worker of a multi-process job: "write by rank 1 / thread 'trainer'"
        text = text.replace(" thread ", f" {access.process} / thread ", 1)
    if access.timeline and access.timeline != f"thread:{access.thread}":
        text += f" on {access.timeline}"
    waits_for = access.details.get("waits_for")
    if access.mode == "wait" and waits_for:
        text += f" for {waits_for}"
    if access.op:
        text += f" ({access.op})"
    return text + f" with locks held: {', '.join(access.locks_held) or 'none'}"


def frame_location(frame: Frame) -> str:
    return f"{frame.file}:{frame.line}"


ORIGIN_VERBS = {"thread-start": "thread started", "task-submit": "task submitted"}


def origin_line(origin: Origin) -> str:
    """``task submitted at train.py:30 in <module> by thread 'MainThread'``: the innermost user
    frame of the starting or submitting call (ThreadSanitizer's "thread created at")."""
    text = ORIGIN_VERBS.get(origin.kind, origin.kind)
    frame = origin.user_frame
    if frame is not None:
        text += f" at {frame_location(frame)} in {frame.function}"
    if origin.thread:
        text += f" by thread {origin.thread!r}"
    return text


def cycle_picture(finding: Finding, glyphs: Glyphs = UNICODE) -> str | None:
    """``model_lock → io_lock (train.py:40) → model_lock (ckpt.py:18)``.

    Edge i goes from lock i to lock i+1; the location is where that second lock was taken
    while the first was held: the acquire access naming it in details["lock"], else the i-th.
    """
    locks = cycle_locks(finding)
    if not locks:
        return None
    acquires = [a for a in finding.accesses if a.mode == "acquire"] or list(finding.accesses)
    unused = list(acquires)
    parts = [locks[0]]
    for i in range(len(locks)):
        to_lock = locks[(i + 1) % len(locks)]
        edge = next((a for a in unused if a.details.get("lock") == to_lock), None)
        if edge is None and i < len(acquires) and acquires[i] in unused:
            edge = acquires[i]
        if edge is not None:
            unused.remove(edge)
        frame = edge.user_frame if edge is not None else None
        parts.append(f"{to_lock} ({frame_location(frame)})" if frame is not None else to_lock)
    return f" {glyphs.arrow} ".join(parts)


# What torch says when a program asks for a GPU on a machine without one.
_NO_CUDA_MARKERS = (
    "Torch not compiled with CUDA enabled",
    "Found no NVIDIA driver",
    "No CUDA GPUs are available",
    "CUDA driver initialization failed",
)


def describe_outcome(report: "Report") -> str | None:
    """How the target ended when it did not exit 0 (``target killed by SIGSEGV``); else None."""
    outcome = report.target_outcome
    if outcome is None:
        code = report.target_exit_code
        return f"target exited with code {code}" if code not in (None, 0) else None
    kind = outcome.get("kind")
    code = outcome.get("code")
    detail = outcome.get("detail")
    if kind == "exit":
        return None if code == 0 else f"target exited with code {code}"
    if kind == "signal":
        return f"target killed by {_signal_name(outcome.get('signal'), code)}"
    # The summary is one line: a multi-line detail (a traceback) contributes one line of it.
    first = _first_line(detail)
    if kind == "timeout":
        return _timeout_phrase(first)
    if kind == "interrupted":
        sent = outcome.get("signal")
        return f"interrupted ({sent})" if sent and sent != "SIGINT" else "interrupted (Ctrl-C)"
    if kind == "deadlock":
        return "target deadlocked and was stopped"
    if kind == "exception":
        last = _last_line(detail)  # "ValueError: bad batch" ends a traceback
        if last and any(marker in last for marker in _NO_CUDA_MARKERS):
            return f"target raised {last} (the program needs CUDA, which this machine does not have; nothing was checked on a GPU)"
        return f"target raised {last}" if last else "target raised an exception"
    if kind == "usage-error":
        return f"target could not be run: {first}" if first else "target could not be run"
    return f"target ended: {kind}" + (f" ({first})" if first else "")


def summary_line(report: "Report", glyphs: Glyphs = UNICODE) -> str:
    """``raceguard: 2 findings (1 data-race, 1 lock-order-cycle) in 3 threads, 18234 ops, 2.1 s; 1 suppressed``."""
    findings = report.findings
    scope = _scope(report)
    if report.interrupted_before_start() and not findings and not report.error:
        # Nothing ran, so nothing is clean: no counts, no "no findings".
        sent = (report.target_outcome or {}).get("signal")
        return f"raceguard: {(report.target_outcome or {}).get('detail')}" + (f" ({sent})" if sent and sent != "SIGINT" else "")
    if report.error:
        first_line = report.error.strip().splitlines()[0] if report.error.strip() else "unknown error"
        text = f"raceguard: error: {first_line}"
        if findings:
            text += f"; {_count_findings(findings)} in {scope}"
    elif findings:
        text = f"raceguard: {_count_findings(findings)} in {scope}"
    else:
        text = f"raceguard: clean {glyphs.dash} no findings in {scope}"
    if report.suppressed:
        text += f"; {len(report.suppressed)} suppressed"
    if report.fixed:
        text += f"; {len(report.fixed)} baseline {_plural(len(report.fixed), 'finding')} fixed"
    outcome = describe_outcome(report)
    if outcome:
        text += f"; {outcome}"
    budget = budget_phrase(report)
    if budget:
        text += f"; {budget}"
    if report.incomplete:
        lost = int(report.incomplete.get("internal_errors", 0))
        uncaptured = sum(int(e.get("calls", 0)) for e in report.incomplete.get("not_captured") or [])
        parts = [f"{lost} {_plural(lost, 'event')} lost to raceguard's own errors"] if lost or not uncaptured else []
        if uncaptured:
            parts.append(f"{uncaptured} {_plural(uncaptured, 'call')} ran without op capture")
        text += f"; analysis incomplete: {', '.join(parts)}"
    if report.simulated_cuda():
        text += "; CUDA simulated on the CPU (--simulate-cuda)"
    return text


def budget_phrase(report: "Report") -> str | None:
    """``time budget of 10 min spent: 37 of 100 schedules run`` when --max-time ended a stress run."""
    stats = report.stats
    if not stats.get("time_budget_spent"):
        return None
    seconds = stats.get("max_time_seconds")
    amount = f" of {seconds_phrase(float(seconds))}" if isinstance(seconds, (int, float)) and seconds else ""
    run = int(stats.get("schedules_run") or 0)
    planned = stats.get("schedules_planned")
    if isinstance(planned, int):
        return f"time budget{amount} spent: {run} of {planned} schedules run"
    return f"time budget{amount} spent: {run} {_plural(run, 'schedule')} run"


def incomplete_line(report: "Report") -> str | None:
    """One line on what raceguard lost to its own errors (shown even with --quiet)."""
    if not report.incomplete:
        return None
    errors = report.incomplete.get("errors") or []
    uncaptured = report.incomplete.get("not_captured") or []
    if uncaptured and not errors and not report.incomplete.get("internal_errors"):
        # Not a failure: raceguard stepped aside where its dispatch mode cannot run faithfully.
        calls = ", ".join(f"{e.get('kind')} ({e.get('calls')} {_plural(int(e.get('calls') or 0), 'call')})" for e in uncaptured)
        return f"raceguard: not checked under the Python dispatch mode (the native backend sees them): {calls}"
    first = str(errors[0].get("message", "")) if errors else "unknown error"
    # A scheduler failure in a hand-over between threads (Scheduler._abandon) ends its schedule:
    # the target did not run on, but its code never saw the failure.
    contained = "the target's code never saw it" if _HANDOVER in first else "the target ran unchanged"
    return (
        f"raceguard: internal error inside the target, contained ({contained}): {first}; "
        "please report it (the JSON report has the traceback)"
    )


_HANDOVER = "while handing control over between threads"


# --- building rich lines ---------------------------------------------------------------------


def finding_lines(finding: Finding, *, verbose: bool = False, glyphs: Glyphs = UNICODE) -> list[Text]:
    """The block for one finding, one rich Text per output line."""
    header_style = STYLE_ERROR if finding.severity == "error" else STYLE_WARNING
    head = headline(finding)
    lines = [Text(f"WARNING: raceguard: {head}", style=header_style)]
    if finding.message and not finding.message.lower().startswith(head.lower()):
        lines.append(Text(f"  {finding.message}"))
    for access in finding.accesses:
        lines.append(Text(f"  {access_line(access)}"))
        lines.extend(_stack_lines(access.stack, verbose=verbose))
        if access.origin is not None:
            lines.append(Text(f"    {origin_line(access.origin)}"))
            if verbose:  # the whole call chain that started or submitted it
                lines.extend(_stack_lines(access.origin.stack, verbose=True, indent="      "))
    details = finding.details
    if details.get("why"):
        # In the program's terms; the engine's clock explanation only under --verbose.
        plain = plain_why(finding)
        lines.extend(_labelled("why", plain or str(details["why"])))
        if plain and verbose:
            lines.extend(_labelled("clocks", str(details["why"]), style=STYLE_MUTED))
    also_on = details.get("also_on")
    if isinstance(also_on, list) and also_on:
        shown = also_on if verbose else also_on[:ALSO_ON_SHOWN]
        rest = len(also_on) - len(shown)
        lines.append(Text(f"  also on: {', '.join(str(r) for r in shown)}" + (f" (+{rest} more)" if rest else "")))
    processes = details.get("processes")
    if isinstance(processes, list) and len(processes) > 1:
        lines.append(Text(f"  seen in: {', '.join(str(p) for p in processes)}"))
    picture = cycle_picture(finding, glyphs)
    if picture:
        lines.append(Text(f"  cycle: {picture}"))
    traceback = details.get("traceback")
    if traceback:
        # A string, or a list of lines as from traceback.format_exception (with or without "\n").
        text = "\n".join(str(line).rstrip("\n") for line in traceback) if isinstance(traceback, list) else str(traceback)
        lines.append(Text("  traceback:"))
        lines.extend(Text(f"    {line}") for line in text.rstrip("\n").splitlines())
    if verbose:
        shown_keys = {"why", "also_on", "cycle", "traceback", "exception", "processes"}
        for key in sorted(k for k in details if k not in shown_keys):
            lines.extend(_labelled(key, _short(details[key]), style=STYLE_MUTED))
    if finding.hint:
        lines.extend(_labelled("hint", finding.hint, style=STYLE_HINT))
    reproduce = finding.reproduce
    if reproduce.command:
        lines.append(Text(f"  reproduce: {reproduce.command}", style=STYLE_REPRODUCE))
    elif reproduce.seed is not None or reproduce.schedule_index is not None:
        lines.append(Text(f"  first seen: schedule #{reproduce.schedule_index}, seed {reproduce.seed}", style=STYLE_REPRODUCE))
    if finding.suppressed:
        lines.append(Text(f"  suppressed: {finding.suppressed}", style=STYLE_MUTED))
    lines.append(Text(f"  fingerprint: {finding.fingerprint}", style=STYLE_MUTED))
    return lines


def report_lines(report: "Report", *, verbose: bool = False, quiet: bool = False, glyphs: Glyphs = UNICODE) -> list[Text]:
    """Every line of the report; ``quiet`` keeps only the summary line."""
    summary_style = STYLE_ERROR if (report.error or report.findings) else STYLE_CLEAN
    summary = Text(summary_line(report, glyphs), style=summary_style)
    incomplete = incomplete_line(report)
    if quiet:
        return [Text(incomplete, style=STYLE_WARNING), summary] if incomplete else [summary]
    lines: list[Text] = []
    for finding in report.findings:
        lines.extend(finding_lines(finding, verbose=verbose, glyphs=glyphs))
        lines.append(Text(""))
    if verbose and report.suppressed:
        for finding in report.suppressed:
            lines.append(Text(f"suppressed: {headline(finding)} [{finding.fingerprint}]: {finding.suppressed or 'suppressed'}", style=STYLE_MUTED))
        lines.append(Text(""))
    if verbose and report.fixed:
        lines.append(Text(f"fixed since baseline: {', '.join(sorted(report.fixed))}", style=STYLE_MUTED))
        lines.append(Text(""))
    outcome_detail = (report.target_outcome or {}).get("detail")
    if verbose and outcome_detail and report.target_failed():
        # The crash text or traceback the supervisor captured; the summary shows one line of it.
        lines.append(Text("target outcome:", style=STYLE_MUTED))
        lines.extend(Text(f"  {line}", style=STYLE_MUTED) for line in str(outcome_detail).rstrip("\n").splitlines())
        lines.append(Text(""))
    if report.error:
        lines.append(Text("raceguard: internal error:", style=STYLE_ERROR))
        lines.extend(Text(f"  {line}") for line in report.error.rstrip("\n").splitlines())
        lines.append(Text(""))
    if incomplete:
        lines.append(Text(incomplete, style=STYLE_WARNING))
        if verbose:
            for e in report.incomplete.get("errors") or []:  # type: ignore[union-attr]
                lines.extend(Text(f"  {line}", style=STYLE_MUTED) for line in str(e.get("traceback", "")).splitlines())
    # Where --simulate-cuda could not report what a GPU would (e.g. x.device reads cpu).
    lines.extend(Text(str(note), style=STYLE_WARNING) for note in report.stats.get("simulation_notes") or [])
    lines.append(summary)
    return lines


# --- output ----------------------------------------------------------------------------------


def _string_console(buffer: StringIO) -> Console:
    return Console(
        file=buffer,
        width=RENDER_WIDTH,
        force_terminal=False,
        color_system=None,
        highlight=False,
        emoji=False,
        markup=False,
        soft_wrap=True,
    )


def _to_string(lines: Iterable[Text]) -> str:
    buffer = StringIO()
    console = _string_console(buffer)
    for line in lines:
        console.print(line, soft_wrap=True)
    return buffer.getvalue()


def render_text(report: "Report", *, verbose: bool = False, quiet: bool = False) -> str:
    """The text report as a plain string (no colour), ending with a newline."""
    return _to_string(report_lines(report, verbose=verbose, quiet=quiet))


def render_finding_text(finding: Finding, *, verbose: bool = False) -> str:
    """One finding's block as plain text (used for JUnit failure bodies)."""
    return _to_string(finding_lines(finding, verbose=verbose))


def print_report(report: "Report", file: TextIO | None = None, verbose: bool = False, quiet: bool = False) -> None:
    """Print the text report to ``file`` (default: the current sys.stderr).

    Colour is used only when the stream is a terminal (rich also honours NO_COLOR and
    FORCE_COLOR); lines are never wrapped, so paths stay copy-pasteable.
    """
    stream = file if file is not None else sys.stderr
    glyphs = UNICODE if _can_encode(stream, UNICODE.arrow + UNICODE.dash) else ASCII
    console = Console(file=stream, highlight=False, emoji=False, markup=False, soft_wrap=True)
    for line in report_lines(report, verbose=verbose, quiet=quiet, glyphs=glyphs):
        console.print(line, soft_wrap=True)


# --- helpers ---------------------------------------------------------------------------------


def _stack_lines(stack: list[Frame], *, verbose: bool, indent: str = "    ") -> list[Text]:
    if not stack:
        return [Text(f"{indent}(no stack)", style=STYLE_MUTED)]
    lines: list[Text] = []
    library_shown = 0
    library_hidden = 0
    for index, frame in enumerate(stack):
        text = f"{indent}#{index} {frame.function} {frame_location(frame)}"
        if frame.user:
            lines.append(Text(text))
        elif verbose or library_shown < LIBRARY_FRAMES_SHOWN:
            lines.append(Text(text, style=STYLE_LIBRARY))
            library_shown += 1
        else:
            library_hidden += 1
    if library_hidden:
        lines.append(Text(f"{indent}... {library_hidden} more library {_plural(library_hidden, 'frame')} (--verbose shows them)", style=STYLE_LIBRARY))
    return lines


def _labelled(label: str, value: str, style: str = "") -> list[Text]:
    """``  label: first line`` with continuation lines indented under it."""
    value_lines = value.rstrip("\n").splitlines() or [""]
    out = [Text(f"  {label}: {value_lines[0]}", style=style)]
    indent = " " * (len(label) + 4)
    out.extend(Text(f"{indent}{line}", style=style) for line in value_lines[1:])
    return out


def _short(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _scope(report: "Report") -> str:
    stats = report.stats
    threads = int(stats.get("threads") or 0)
    ops = int(stats.get("ops") or 0)
    parts = [f"{threads} {_plural(threads, 'thread')}", f"{ops} {_plural(ops, 'op')}"]
    processes = int(stats.get("processes") or 0)
    if processes > 1:  # a multi-process job: the target's process and the workers it started
        parts.insert(0, f"{processes} processes")
    schedules = int(stats.get("schedules_run") or 0)
    if report.command == "stress" or schedules > 1:
        parts.append(f"{schedules} {_plural(schedules, 'schedule')}")
    wall = float(stats.get("wall_seconds") or 0.0)
    # A watch() block often takes milliseconds: "0.0 s" would read as "not measured".
    parts.append(f"{wall * 1000:.0f} ms" if 0 < wall < 0.095 else f"{wall:.1f} s")
    return ", ".join(parts)


def seconds_phrase(seconds: float) -> str:
    """``45 s``, ``10 min``, ``2.5 min``, ``1.5 h``."""
    if seconds < 60:
        return f"{seconds:g} s"
    if seconds < 3600:
        return f"{seconds / 60:g} min"
    return f"{seconds / 3600:g} h"


def _count_findings(findings: list[Finding]) -> str:
    by_kind = Counter(f.kind for f in findings)
    ordered = [k for k in KINDS if k in by_kind] + sorted(k for k in by_kind if k not in KINDS)
    breakdown = ", ".join(f"{by_kind[k]} {k}" for k in ordered)
    return f"{len(findings)} {_plural(len(findings), 'finding')} ({breakdown})"


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _and_list(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _signal_name(name: Any, code: Any) -> str:
    if isinstance(name, str) and name and not name.lstrip("-").isdigit():
        return name
    number = int(name) if isinstance(name, str) and name.lstrip("-").isdigit() else code
    if isinstance(number, int):
        try:
            return signal_module.Signals(abs(number)).name
        except ValueError:
            return f"signal {abs(number)}"
    return "a signal"


def _timeout_phrase(detail: str | None) -> str:
    """``target timed out after 10 s`` from a detail of ``10``, ``10 s`` or ``timed out after 10 s``."""
    if not detail:
        return "target timed out"
    try:
        return f"target timed out after {float(detail):g} s"
    except ValueError:
        pass
    if detail.startswith("timed out"):
        return f"target {detail}"
    if detail[0].isdigit():
        return f"target timed out after {detail}"
    return f"target timed out ({detail})"


def _first_line(text: Any) -> str | None:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()] if text else []
    return lines[0] if lines else None


def _last_line(text: Any) -> str | None:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()] if text else []
    return lines[-1] if lines else None


def _can_encode(stream: Any, text: str) -> bool:
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True
