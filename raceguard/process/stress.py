"""``raceguard stress``, ``replay`` and ``merge``: many controlled schedules of one target.

Orchestration only (no torch here): a fork server (:mod:`raceguard.schedule.forkserver`) runs the
schedules; this module decides which schedules to run (seeds, shards, ``--jobs``,
``--stop-on-first``), collects what each one streams back, aggregates findings by fingerprint
(each keeps the lowest schedule index that showed it, with that schedule's seed and the exact
``raceguard replay`` command) and builds the report of the contract.

Schedule identity
-----------------
Schedule ``i`` of a run with base seed ``S`` uses seed ``S + i``. A ``random`` schedule is
determined by its seed; a ``pct`` schedule by its seed, ``--depth`` and the step estimate
``--pct-steps``, which ``stress`` measures once per run with a *calibration* schedule (PCT without
change points, with the fixed seed :data:`~raceguard.schedule.strategies.CALIBRATION_SEED`
whatever ``S``; its findings are not reported) and writes into every replay command. Shards
compute the same estimate, so ``--shard I/N`` runs are slices of one run, and ``replay`` without
``--pct-steps`` measures it again exactly as ``stress`` did, so ``--seed`` alone replays the
schedule too.

The calibration run's output never reaches the user: under ``stress`` no schedule's does, and
under ``replay`` the target's output must be that of the replayed schedule, once. It goes to a
log file that is deleted, and its stdin is ``/dev/null``, as under ``stress``: the calibration
runs in the same conditions whichever command runs it.

Sharding: schedule ``i`` belongs to shard ``I`` of ``N`` when ``i % N == I - 1``.
"""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from . import prestart
from ..report.document import NOT_STARTED, Report, incomplete_analysis
from ..report.filters import Baseline, Suppressions, apply_filters
from ..report.finding import Finding, Reproduce
from ..schedule import failures
from ..schedule.forkserver import ForkServerClient, ServerError, TargetUsageError
from ..schedule.strategies import CALIBRATION_SEED

# Per-schedule timeout when neither --timeout nor the config sets one: a schedule that hangs in
# a way the scheduler cannot see (real I/O, a C extension) must not hang the whole run.
DEFAULT_SCHEDULE_TIMEOUT = 60.0
OUTPUT_TAIL = 4000
CALIBRATION_INDEX = -1
# How many seeds of timed-out schedules the one timeout finding lists.
TIMEOUT_SEEDS_LISTED = 20

__all__ = [
    "DEFAULT_SCHEDULE_TIMEOUT",
    "Interrupt",
    "Progress",
    "ScheduleResult",
    "ServerError",
    "StressOptions",
    "TargetUsageError",
    "merge_reports",
    "replay_command",
    "run_replay",
    "run_stress",
    "schedule_indices",
]


@dataclass
class StressOptions:
    script: str | None = None
    module: str | None = None
    args: tuple[str, ...] = ()
    schedules: int = 100
    seed: int | None = None
    strategy: str = "pct"
    depth: int = 3
    pct_steps: int | None = None
    jobs: int = 1
    stop_on_first: bool = False
    timeout: float | None = None
    # Seconds for the whole run (server start and calibration included); once spent, no new
    # schedule starts and the running ones finish. None: no budget.
    max_time: float | None = None
    shard: tuple[int, int] | None = None  # (I, N), 1-based I
    preempt: str = "ops"
    max_reports: int | None = None
    suppressions: Suppressions | None = None
    baseline: Baseline | None = None
    fail_on: str = "error"
    capture_output: bool = True
    on_progress: Callable[["Progress"], None] | None = field(default=None, repr=False)
    on_event: Callable[[str, dict], None] | None = field(default=None, repr=False)
    # Entered by the caller (the CLI holds it until the report is written); else run_* hold one.
    interrupt: "Interrupt | None" = field(default=None, repr=False)

    def target_argv(self) -> list[str]:
        head = ["-m", self.module] if self.module else [self.script or ""]
        return [*head, *self.args]


@dataclass
class Progress:
    done: int
    total: int
    failures: int  # schedules that failed
    bugs: int  # distinct failing findings (fingerprints) so far
    running: int = 0
    elapsed: float = 0.0  # seconds since the run started
    scheduling: float = 0.0  # seconds since the first schedule started (the pace of the rest)
    budget_left: float | None = None  # seconds of --max-time left; None without a budget


@dataclass
class ScheduleResult:
    index: int
    seed: int
    findings: list[Finding]
    outcome: dict[str, Any]
    exit_code: int | None
    stats: dict[str, Any]
    internal_errors: list[str]
    seconds: float
    # Contained failures of raceguard's hooks in the schedule's process (see Report.incomplete).
    hook_errors: list[dict[str, Any]] = field(default_factory=list)

    def fingerprints(self) -> list[str]:
        return [f.fingerprint for f in self.findings]

    @property
    def abandoned(self) -> bool:
        """raceguard's scheduler failed in a hand-over and ended this schedule (its own error,
        in ``hook_errors``): the findings it made before stand, its outcome says nothing about
        the target."""
        return self.outcome.get("kind") == "abandoned"


def schedule_indices(total: int, shard: tuple[int, int] | None) -> list[int]:
    if shard is None:
        return list(range(total))
    i, n = shard
    return [k for k in range(total) if k % n == i - 1]


def replay_command(target: list[str], seed: int, strategy: str, depth: int, steps: int | None, preempt: str = "ops") -> str:
    parts = ["raceguard", "replay", "--seed", str(seed), "--strategy", strategy]
    if strategy == "pct":
        parts += ["--depth", str(depth)]
        if steps is not None:
            parts += ["--pct-steps", str(steps)]
    if preempt != "ops":
        parts += ["--preempt", preempt]
    return shlex.join(parts + list(target))


# --------------------------------------------------------------------------------------------
# one schedule's messages
# --------------------------------------------------------------------------------------------
class _ScheduleRun:
    def __init__(self, index: int, seed: int, log: str | None, timeout: float | None) -> None:
        self.index = index
        self.seed = seed
        self.log = log
        self.timeout = timeout
        self.findings: list[Finding] = []
        self.by_fp: dict[str, Finding] = {}
        self.exit: dict | None = None
        self.stats: dict[str, Any] = {}
        self.internal_errors: list[str] = []
        self.hook_errors: list[dict[str, Any]] = []
        self.exception: str | None = None
        # {"message", "traceback"} once raceguard's scheduler failed in a hand-over and ended the
        # schedule (runchild's on_failure): raceguard's internal error, never the target's.
        self.abandoned: dict[str, str] | None = None
        self.started = time.monotonic()

    def handle(self, event: dict) -> None:
        kind = event.get("type")
        if kind in ("finding", "also_on") and self.abandoned is not None:
            return  # made after the scheduler broke: nothing about the target can rest on that
        if kind == "finding":
            finding = Finding.from_dict(event["finding"])
            if finding.fingerprint not in self.by_fp:
                self.by_fp[finding.fingerprint] = finding
                self.findings.append(finding)
        elif kind == "also_on":
            finding = self.by_fp.get(event.get("fingerprint", ""))
            if finding is not None:
                also = finding.details.setdefault("also_on", [])
                if event["resource"] not in also and event["resource"] != finding.resource:
                    also.append(event["resource"])
        elif kind == "stats":
            self.stats.update(event.get("stats", {}))
        elif kind == "exit":
            self.exit = event
            self.stats.update(event.get("stats", {}))
        elif kind == "internal-error":
            self.internal_errors.append(event.get("message", "unknown error"))
        elif kind == "hook-error":
            self.hook_errors.append(event)
        elif kind == "schedule-abandoned":
            if self.abandoned is None:
                self.abandoned = {"message": str(event.get("message", "the schedule was abandoned")),
                                  "traceback": str(event.get("traceback", ""))}
                self.hook_errors.append({"type": "hook-error", **self.abandoned})
        elif kind == "target-exception":
            self.exception = event.get("exception")
        elif kind == "usage-error":
            self.internal_errors.append(event.get("message", "usage error"))

    def finish(self, done: dict) -> ScheduleResult:
        exit_code: int | None
        if self.abandoned is not None:
            # raceguard ended the schedule itself: no outcome of the target's, no crash or
            # timeout finding, one event lost (the schedule) in stats.internal_errors.
            exit_code = None
            outcome = {"kind": "abandoned", "code": None, "signal": None, "detail": self.abandoned["message"]}
            self.stats["internal_errors"] = max(int(self.stats.get("internal_errors") or 0), 1)
        elif self.exit is not None:
            kind = self.exit.get("outcome", "exit")
            exit_code = self.exit.get("code")
            detail = None
            if kind == "exception":
                detail = self.exception
            elif kind == "timeout":
                detail = f"timed out after {self.timeout:g} s" if self.timeout else "timed out"
            elif kind == "deadlock":
                detail = "deadlocked; stopped by raceguard"
            outcome = {"kind": kind, "code": exit_code, "signal": None, "detail": detail}
        elif done.get("killed"):
            exit_code = None
            outcome = {"kind": "timeout", "code": None, "signal": None,
                       "detail": f"timed out after {self.timeout:g} s" if self.timeout else "timed out"}
            if not any(f.kind == "target-failure" for f in self.findings):
                self._add(failures.timeout_failure(self.timeout or 0.0))
        elif done.get("signal"):
            exit_code = None
            outcome = {"kind": "signal", "code": None, "signal": done["signal"], "detail": f"killed by {done['signal']}"}
            self._add(failures.crash_failure(done["signal"], None, self._tail()))
        else:
            exit_code = done.get("code")
            outcome = {"kind": "exit", "code": exit_code, "signal": None,
                       "detail": f"exited abruptly with code {exit_code} (os._exit or a native abort)"}
            if exit_code != 0 and not self.internal_errors:
                self._add(failures.crash_failure(None, exit_code, self._tail()))
        if self.findings and self.log:
            tail = self._tail()
            if tail:
                for f in self.findings:
                    if f.kind in ("target-failure", "thread-exception") and "output" not in f.details:
                        f.details["output"] = tail
        return ScheduleResult(
            index=self.index,
            seed=self.seed,
            findings=self.findings,
            outcome=outcome,
            exit_code=exit_code,
            stats=self.stats,
            internal_errors=self.internal_errors,
            seconds=time.monotonic() - self.started,
            hook_errors=self.hook_errors,
        )

    def cut_short(self, sent: str | None) -> ScheduleResult:
        """The schedule was still running when the run was interrupted: what it found so far,
        with the outcome ``interrupted`` (no finding for being killed: raceguard ended it)."""
        return ScheduleResult(
            index=self.index,
            seed=self.seed,
            findings=self.findings,
            outcome={"kind": "interrupted", "code": None, "signal": _outcome_signal(sent),
                     "detail": f"cut short by {_interruption(sent)}"},
            exit_code=None,
            stats=self.stats,
            internal_errors=self.internal_errors,
            seconds=time.monotonic() - self.started,
            hook_errors=self.hook_errors,
        )

    def _add(self, finding: Finding) -> None:
        if finding.fingerprint not in self.by_fp:
            self.by_fp[finding.fingerprint] = finding
            self.findings.append(finding)

    def _tail(self) -> str | None:
        if not self.log:
            return None
        try:
            with open(self.log, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - OUTPUT_TAIL))
                data = f.read()
        except OSError:
            return None
        text = data.decode(errors="replace")
        return text if text.strip() else None


# --------------------------------------------------------------------------------------------
# running schedules
# --------------------------------------------------------------------------------------------
def _outcome_signal(sent: str | None) -> str | None:
    # As under `check`: Ctrl-C is the outcome's default reading, SIGTERM is named.
    return None if sent in (None, "SIGINT") else sent


def _interruption(sent: str | None) -> str:
    return "Ctrl-C" if sent in (None, "SIGINT") else sent


class Interrupt:
    """SIGINT (Ctrl-C) or SIGTERM (a cancelled CI job, ``timeout(1)``, ``kill``) while schedules
    run: stop launching, end the schedules and the server, report what was found.

    The handlers only take note (the first signal wins; more change nothing), from ``__enter__``
    (in the main thread only) until ``__exit__``; the CLI holds them until the report is written,
    so a second Ctrl-C or SIGTERM cannot lose it.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal: str | None = None  # "SIGINT" or "SIGTERM"
        self._previous: dict[int, Any] = {}

    @property
    def hit(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> "Interrupt":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handler)
            self.signal = self.signal or prestart.early_signal()  # while the CLI got ready
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous.clear()


def _interrupt_for(options: StressOptions) -> Any:
    """The caller's Interrupt (already entered), or one held for this run."""
    if options.interrupt is not None:
        return contextlib.nullcontext(options.interrupt)
    return Interrupt()


class _Runner:
    """Feeds schedules to the fork server, ``jobs`` at a time, and collects their results."""

    def __init__(self, client: ForkServerClient, options: StressOptions, logdir: str | None, interrupt: Interrupt) -> None:
        self.client = client
        self.options = options
        self.logdir = logdir
        self.interrupt = interrupt
        self.running: dict[int, _ScheduleRun] = {}
        self.server_error: str | None = None
        self.calibration_abandoned: ScheduleResult | None = None
        self.launched = 0  # schedules started, the calibration run included

    def spec(self, index: int, seed: int, strategy: str, steps: int | None) -> dict:
        log = os.path.join(self.logdir, f"schedule-{index}.log") if self.logdir else None
        return {
            "index": index,
            "seed": seed,
            "strategy": strategy,
            "depth": self.options.depth,
            "steps": steps,
            "timeout": self.options.timeout,
            "log": log,
            "max_reports": self.options.max_reports,
            "preempt": self.options.preempt,
        }

    def launch(self, spec: dict) -> None:
        self.running[spec["index"]] = _ScheduleRun(spec["index"], spec["seed"], spec["log"], spec["timeout"])
        self.launched += 1
        self.client.run(spec)

    def poll(self, timeout: float = 0.1) -> list[ScheduleResult]:
        finished = []
        for msg in self.client.messages(timeout):
            if "event" in msg:
                run = self.running.get(msg.get("index"))
                if run is not None:
                    run.handle(msg["event"])
            elif msg.get("type") == "done":
                run = self.running.pop(msg.get("index"), None)
                if run is not None:
                    result = run.finish(msg)
                    if run.log:
                        try:
                            os.unlink(run.log)
                        except OSError:
                            pass
                    finished.append(result)
        if not finished and (self.client.eof or not self.client.alive) and self.running:
            self.server_error = f"the fork server exited unexpectedly (code {self.client.proc.poll()})"
        return finished

    def run_one(self, spec: dict) -> ScheduleResult | None:
        self.launch(spec)
        while not self.interrupt.hit and self.server_error is None:
            for result in self.poll():
                return result
        return None

    def stop(self, grace: float = 5.0) -> list[ScheduleResult]:
        """After an interrupt: the server ends every schedule still running and passes on what
        each had streamed before that; those schedules come back cut short, with the findings
        they had made (a schedule that ended by itself meanwhile comes back as usual)."""
        self.client.stop()
        ended: list[ScheduleResult] = []
        deadline = time.monotonic() + grace
        while self.running and not self.client.eof and time.monotonic() < deadline:
            for msg in self.client.messages(0.1):
                run = self.running.get(msg.get("index"))
                if run is None:
                    continue
                if "event" in msg:
                    run.handle(msg["event"])
                elif msg.get("type") == "done":
                    del self.running[run.index]
                    finished = run.exit is not None or not msg.get("stopped")
                    ended.append(run.finish(msg) if finished else run.cut_short(self.interrupt.signal))
        # Gone without a word (killed, stuck): what arrived is what they found.
        ended += [run.cut_short(self.interrupt.signal) for run in self.running.values()]
        self.running.clear()
        return ended


def _start_server(options: StressOptions, interrupt: Interrupt) -> ForkServerClient:
    client = ForkServerClient(script=options.script, module=options.module, args=options.args)
    try:
        client.wait_ready(should_stop=lambda: interrupt.hit)
    except BaseException:
        client.close()
        raise
    return client


def _calibrate(runner: _Runner) -> int | None:
    """The PCT step estimate: choice steps of one run under PCT without change points.

    Always with :data:`CALIBRATION_SEED` (the estimate is part of every schedule's identity, so
    it must not depend on which seeds a run or a replay asks for), and always with the target's
    output captured in a log that is then deleted: it is a measurement, not one of the runs the
    user sees (``replay`` shows only the replayed schedule's output).
    """
    spec = runner.spec(CALIBRATION_INDEX, CALIBRATION_SEED, "pct", None)
    with tempfile.TemporaryDirectory(prefix="raceguard-calibration-") as logdir:
        if spec["log"] is None:
            spec["log"] = os.path.join(logdir, "calibration.log")
        result = runner.run_one(spec)
    if result is None:
        return None
    if result.internal_errors:
        runner.server_error = "; ".join(result.internal_errors)
    if result.abandoned:
        # Its estimate is the steps it took before raceguard's scheduler failed (deterministic,
        # and written into every replay command); the failure goes into the report.
        runner.calibration_abandoned = result
        _notify(runner.options, "abandoned", {"index": None, "seed": result.seed, "message": result.outcome["detail"]})
    steps = result.stats.get("pct_choice_steps", result.stats.get("choices", 0))
    return max(int(steps or 0), 1)


def run_stress(options: StressOptions) -> Report:
    started = time.monotonic()
    base_seed = options.seed if options.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    options.seed = base_seed
    if options.timeout is None:
        options.timeout = DEFAULT_SCHEDULE_TIMEOUT
    indices = schedule_indices(options.schedules, options.shard)
    _notify(options, "start", {"seed": base_seed, "schedules": len(indices)})
    logdir = tempfile.mkdtemp(prefix="raceguard-stress-") if options.capture_output else None
    results: dict[int, ScheduleResult] = {}
    steps = options.pct_steps
    interrupted = False
    server_error: str | None = None
    sent: str | None = None
    calibration: ScheduleResult | None = None
    budget_spent = False
    launched = 0
    try:
        with _interrupt_for(options) as interrupt:
            client = _start_server(options, interrupt)
            try:
                runner = _Runner(client, options, logdir, interrupt)
                if options.strategy == "pct" and steps is None and indices and not interrupt.hit:
                    _notify(options, "calibrating", {})
                    steps = _calibrate(runner)
                _notify(options, "ready", {"pct_steps": steps})
                if not interrupt.hit and runner.server_error is None:
                    budget_spent = _run_all(runner, options, indices, base_seed, steps, results, started)
                if interrupt.hit:
                    for result in runner.stop():
                        # A schedule cut short before it found anything adds nothing to the report.
                        if result.index != CALIBRATION_INDEX and (
                            result.outcome["kind"] != "interrupted" or result.findings or result.internal_errors
                            or result.hook_errors
                        ):
                            results[result.index] = result
                interrupted, sent = interrupt.hit, interrupt.signal
                server_error = runner.server_error
                calibration = runner.calibration_abandoned
                launched = runner.launched
            finally:
                client.close()
    finally:
        if logdir:
            shutil.rmtree(logdir, ignore_errors=True)
    return _build_report(
        "stress", options, results, base_seed, steps, started,
        interrupted=interrupted, sent=sent, server_error=server_error, planned=len(indices),
        calibration=calibration, budget_spent=budget_spent, launched=launched,
    )


# How often the progress callback hears from a run while no schedule finishes (a heartbeat for
# the elapsed time and a budget that runs out during a long schedule).
PROGRESS_TICK = 1.0


def _run_all(runner: _Runner, options: StressOptions, indices: list[int], base_seed: int, steps: int | None,
             results: dict[int, ScheduleResult], started: float) -> bool:
    """Run the schedules of ``indices``; True when the time budget stopped it before all had run."""
    queue = list(indices)
    queue.reverse()
    jobs = max(1, options.jobs)
    failing: set[str] = set()
    failures_count = 0
    first_failure: int | None = None
    total = len(indices)
    deadline = started + options.max_time if options.max_time else None
    budget_spent = False
    last_report = 0.0
    first_launch: float | None = None

    def report_progress() -> None:
        nonlocal last_report
        if options.on_progress is None:
            return
        now = time.monotonic()
        last_report = now
        left = max(0.0, deadline - now) if deadline is not None else None
        options.on_progress(Progress(len(results), total, failures_count, len(failing), len(runner.running),
                                     elapsed=now - started, scheduling=now - (first_launch or now), budget_left=left))

    while (queue or runner.running) and not runner.interrupt.hit and runner.server_error is None:
        if queue and deadline is not None and time.monotonic() >= deadline:
            # The schedules already running finish; the rest are not started.
            budget_spent = True
            queue.clear()
        while queue and len(runner.running) < jobs and first_failure is None and not runner.interrupt.hit:
            index = queue.pop()
            if first_launch is None:
                first_launch = time.monotonic()
            runner.launch(runner.spec(index, base_seed + index, options.strategy, steps))
        if first_failure is not None:
            # --stop-on-first: lower-numbered schedules already running still count (so the
            # reported first failure is the lowest failing index); higher ones are not needed.
            if not any(i < first_failure for i in runner.running):
                break
        finished = runner.poll()
        for result in finished:
            results[result.index] = result
            if result.abandoned:
                _notify(options, "abandoned", {"index": result.index, "seed": result.seed, "message": result.outcome["detail"]})
            bad = [f for f in result.findings if _fails(f, options)]
            if bad:
                failures_count += 1
                failing.update(f.fingerprint for f in bad)
                if options.stop_on_first and (first_failure is None or result.index < first_failure):
                    first_failure = result.index
        if finished or time.monotonic() - last_report >= PROGRESS_TICK:
            report_progress()
    return budget_spent


def _fails(finding: Finding, options: StressOptions) -> bool:
    if not finding.at_least(options.fail_on):
        return False
    if options.suppressions is not None and options.suppressions.match(finding) is not None:
        return False
    if options.baseline is not None and finding.fingerprint in options.baseline:
        return False
    return True


def _notify(options: StressOptions, what: str, data: dict) -> None:
    if options.on_event is not None:
        options.on_event(what, data)


def _build_report(
    command: str,
    options: StressOptions,
    results: dict[int, ScheduleResult],
    base_seed: int,
    steps: int | None,
    started: float,
    *,
    interrupted: bool = False,
    sent: str | None = None,
    server_error: str | None = None,
    planned: int = 0,
    replay: bool = False,
    calibration: ScheduleResult | None = None,
    budget_spent: bool = False,
    launched: int | None = None,
) -> Report:
    target = options.target_argv()
    ordered = [results[i] for i in sorted(results)]
    # Aggregate by fingerprint: the lowest schedule index that showed a finding keeps it.
    chosen: dict[str, Finding] = {}
    timed_out: list[ScheduleResult] = []
    for result in ordered:
        command_line = replay_command(target, result.seed, options.strategy, options.depth, steps, options.preempt)
        if any(failures.is_timeout(f) for f in result.findings):
            timed_out.append(result)
        for finding in result.findings:
            if finding.fingerprint in chosen:
                also = finding.details.get("also_on")
                if also:
                    kept = chosen[finding.fingerprint].details.setdefault("also_on", [])
                    kept.extend(r for r in also if r not in kept)
                continue
            finding.reproduce = Reproduce(seed=result.seed, schedule_index=None if replay else result.index, command=command_line)
            chosen[finding.fingerprint] = finding
    if len(timed_out) > 1:
        _count_timeouts(chosen, timed_out)
    filtered = apply_filters(list(chosen.values()), options.suppressions, options.baseline)
    kept = filtered.kept
    dropped = 0
    if options.max_reports is not None and len(kept) > options.max_reports:
        dropped = len(kept) - options.max_reports
        kept = kept[: options.max_reports]
    failing_fps = {f.fingerprint for f in filtered.kept if f.at_least(options.fail_on)}
    kept_fps = {f.fingerprint for f in filtered.kept}

    first_failure_at = None
    first_failed: ScheduleResult | None = None
    schedules = []
    for result in ordered:
        fps = [fp for fp in result.fingerprints() if fp in kept_fps]
        schedules.append({
            "index": result.index,
            "seed": result.seed,
            "fingerprints": fps,
            "seconds": round(result.seconds, 4),
            "scheduling_points": int(result.stats.get("scheduling_points", 0)),
            **({"interrupted": True} if result.outcome.get("kind") == "interrupted" else {}),
            **({"abandoned": True} if result.abandoned else {}),
        })
        if first_failure_at is None and any(fp in failing_fps for fp in fps):
            first_failure_at = result.index
            first_failed = result
    failed_schedules = sum(1 for s in schedules if any(fp in failing_fps for fp in s["fingerprints"]))

    errors = list(dict.fromkeys(e for r in ordered for e in r.internal_errors))
    if server_error:
        errors.append(server_error)
    if ordered and not interrupted and all(r.abandoned for r in ordered):
        # Nothing was tested: a clean exit would let CI pass on raceguard's own failure.
        errors.append(f"every schedule ({len(ordered)}) was abandoned by raceguard's own failure: nothing was tested")

    if interrupted:
        # Schedules still running were ended; what they had found is kept (stats.schedules
        # marks them "interrupted").
        cut = sum(1 for r in ordered if r.outcome.get("kind") == "interrupted")
        detail = f"interrupted ({_interruption(sent)})"
        if launched == 0:  # still starting (the fork server imports torch): nothing of the target ran
            detail = NOT_STARTED
        elif replay:
            detail += (" while the schedule ran: its findings so far" if cut
                       else " after the schedule ran" if ordered else " before the schedule ran")
        else:
            detail += f" after {len(ordered) - cut} of {planned} schedules"
            if cut:
                detail += f"; {cut} more cut short, with what {'it' if cut == 1 else 'they'} had found"
        outcome = {"kind": "interrupted", "code": None, "signal": _outcome_signal(sent), "detail": detail}
        exit_code = None
    elif first_failed is not None and not first_failed.abandoned:
        outcome = dict(first_failed.outcome)
        exit_code = first_failed.exit_code
    else:
        # An abandoned schedule ended by raceguard's failure, not the target's: it says nothing
        # about how the target ends.
        finished = [r for r in ordered if not r.abandoned]
        failed = next((r for r in finished if not (r.outcome.get("kind") == "exit" and r.outcome.get("code") == 0)), None)
        if failed is not None:
            outcome, exit_code = dict(failed.outcome), failed.exit_code
        elif finished:
            outcome, exit_code = {"kind": "exit", "code": 0, "signal": None, "detail": None}, 0
        else:
            outcome, exit_code = None, None

    stats: dict[str, Any] = {
        "threads": max((int(r.stats.get("threads", 0)) for r in ordered), default=0),
        "ops": sum(int(r.stats.get("ops", 0)) for r in ordered),
        "schedules_run": len(ordered),
        "first_failure_at": None if replay else first_failure_at,
        "wall_seconds": round(time.monotonic() - started, 3),
        "schedules": schedules,
        "seed": base_seed,
        "strategy": options.strategy,
        "failed_schedules": failed_schedules,
        "scheduling_points": sum(int(r.stats.get("scheduling_points", 0)) for r in ordered),
        "watchdog_interventions": sum(int(r.stats.get("watchdog_interventions", 0)) for r in ordered),
    }
    sites = list(dict.fromkeys(site for r in ordered for site in r.stats.get("watchdog_sites") or []))
    if sites:
        stats["watchdog_sites"] = sites[:10]
    if replay and first_failure_at is not None:
        stats["first_failure_at"] = 0
    if options.strategy == "pct":
        stats["depth"] = options.depth
        stats["pct_steps"] = steps
    if options.shard is not None:
        stats["shard"] = f"{options.shard[0]}/{options.shard[1]}"
    if not replay:
        stats["schedules_planned"] = planned
        if options.max_time:
            stats["max_time_seconds"] = options.max_time
            stats["time_budget_spent"] = budget_spent
    if dropped:
        stats["dropped_reports"] = dropped
    lost = ordered + ([calibration] if calibration is not None else [])  # an abandoned calibration run counts
    incomplete = incomplete_analysis(
        sum(int(r.stats.get("internal_errors", 0)) for r in lost), [e for r in lost for e in r.hook_errors]
    )
    if incomplete:
        stats["internal_errors"] = incomplete["internal_errors"]
    return Report(
        command=command,
        target=target,
        findings=kept,
        target_exit_code=exit_code,
        stats=stats,
        error="; ".join(errors) if errors else None,
        target_outcome=outcome,
        suppressed=filtered.suppressed,
        fixed=filtered.fixed,
        incomplete=incomplete,
    )


def _count_timeouts(chosen: dict[str, Finding], timed_out: list[ScheduleResult]) -> None:
    """Several schedules ran past --timeout: they share one finding (its fingerprint does not
    depend on where the threads were), kept from the first of them, which says how many."""
    finding = next((f for f in chosen.values() if failures.is_timeout(f)), None)
    if finding is not None:
        _describe_timeouts(finding, len(timed_out), [r.seed for r in timed_out], timed_out[0].index)


def _describe_timeouts(finding: Finding, count: int, seeds: list[int], first_index: int | None) -> None:
    seconds = finding.details.get("timeout_seconds")
    limit = f"within {seconds:g} s " if isinstance(seconds, (int, float)) and seconds else ""
    first = f", schedule #{first_index}" if first_index is not None else ""
    finding.message = f"the target did not finish {limit}in {count} schedules (the stacks are those of the first{first})"
    finding.details["timed_out_schedules"] = count
    finding.details["timed_out_seeds"] = seeds[:TIMEOUT_SEEDS_LISTED]


def _merge_timeouts(chosen: dict[str, Finding], timeouts: list[Finding]) -> None:
    """Shards' timeout findings are one finding (one fingerprint): the counts add up."""
    finding = next((f for f in chosen.values() if failures.is_timeout(f)), None)
    if finding is None or len(timeouts) < 2:
        return
    count = sum(int(f.details.get("timed_out_schedules") or 1) for f in timeouts)
    seeds = sorted(seed for f in timeouts for seed in (f.details.get("timed_out_seeds") or [f.reproduce.seed])
                   if seed is not None)
    _describe_timeouts(finding, count, seeds, finding.reproduce.schedule_index)


def run_replay(options: StressOptions) -> Report:
    """One schedule, reported like ``check``; the target's output goes to the terminal (the
    replayed schedule's only: a calibration run keeps its output to itself)."""
    started = time.monotonic()
    seed = options.seed if options.seed is not None else 0
    if options.timeout is None:
        options.timeout = DEFAULT_SCHEDULE_TIMEOUT
    results: dict[int, ScheduleResult] = {}
    steps = options.pct_steps
    interrupted = False
    sent: str | None = None
    server_error = None
    calibration: ScheduleResult | None = None
    launched = 0
    with _interrupt_for(options) as interrupt:
        client = _start_server(options, interrupt)
        try:
            runner = _Runner(client, options, None, interrupt)
            if options.strategy == "pct" and steps is None and not interrupt.hit:
                # Without --pct-steps: the same calibration as the stress run's (fixed seed,
                # output discarded), so --seed alone replays the schedule stress ran.
                steps = _calibrate(runner)
            if not interrupt.hit and runner.server_error is None:
                result = runner.run_one(runner.spec(0, seed, options.strategy, steps))
                if result is not None:
                    results[0] = result
            if interrupt.hit:  # the replayed schedule's findings so far (not the calibration's)
                for result in runner.stop():
                    if result.index == 0:
                        results[0] = result
            interrupted, sent = interrupt.hit, interrupt.signal
            server_error = runner.server_error
            calibration = runner.calibration_abandoned
            launched = runner.launched
        finally:
            client.close()
    report = _build_report(
        "replay", options, results, seed, steps, started,
        interrupted=interrupted, sent=sent, server_error=server_error, planned=1, replay=True,
        calibration=calibration, launched=launched,
    )
    report.stats.pop("schedules", None)
    return report


# --------------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------------
def merge_reports(reports: Iterable[Report]) -> Report:
    """Combine shard reports: findings deduplicated by fingerprint (the lowest schedule index
    wins), statistics summed, ``first_failure_at`` the minimum."""
    reports = list(reports)
    if not reports:
        raise ValueError("nothing to merge")
    chosen: dict[str, Finding] = {}
    suppressed: dict[str, Finding] = {}

    def key(f: Finding) -> tuple:
        idx = f.reproduce.schedule_index
        return (idx is None, idx if idx is not None else 0)

    for report in reports:
        for bucket, items in ((chosen, report.findings), (suppressed, report.suppressed)):
            for f in items:
                old = bucket.get(f.fingerprint)
                if old is None or key(f) < key(old):
                    bucket[f.fingerprint] = f
    _merge_timeouts(chosen, [f for r in reports for f in r.findings if failures.is_timeout(f)])
    findings = sorted(chosen.values(), key=key)
    for fp in list(suppressed):
        if fp in chosen:
            del suppressed[fp]
    schedules: dict[int, dict] = {}
    for report in reports:
        for s in report.stats.get("schedules") or []:
            schedules.setdefault(int(s["index"]), s)
    firsts = [r.stats.get("first_failure_at") for r in reports if r.stats.get("first_failure_at") is not None]
    stats: dict[str, Any] = {
        "threads": max(int(r.stats.get("threads") or 0) for r in reports),
        "ops": sum(int(r.stats.get("ops") or 0) for r in reports),
        "schedules_run": sum(int(r.stats.get("schedules_run") or 0) for r in reports),
        "first_failure_at": min(firsts) if firsts else None,
        "wall_seconds": round(sum(float(r.stats.get("wall_seconds") or 0) for r in reports), 3),
        "merged_reports": len(reports),
    }
    if schedules:
        stats["schedules"] = [schedules[i] for i in sorted(schedules)]
    for extra in ("failed_schedules", "scheduling_points", "watchdog_interventions", "schedules_planned"):
        if any(extra in r.stats for r in reports):
            stats[extra] = sum(int(r.stats.get(extra) or 0) for r in reports)
    if any("time_budget_spent" in r.stats for r in reports):
        stats["time_budget_spent"] = any(bool(r.stats.get("time_budget_spent")) for r in reports)
    if any(r.simulated_cuda() for r in reports):  # a shard ran under --simulate-cuda
        stats["simulated_cuda"] = True
    for same in ("seed", "strategy", "depth", "pct_steps", "max_time_seconds"):
        values = {repr(r.stats.get(same)) for r in reports}
        if len(values) == 1 and reports[0].stats.get(same) is not None:
            stats[same] = reports[0].stats[same]
    errors = [r.error for r in reports if r.error]
    incomplete = incomplete_analysis(
        sum(int((r.incomplete or {}).get("internal_errors", 0)) for r in reports),
        [e for r in reports for e in (r.incomplete or {}).get("errors", [])],
    )
    if incomplete:
        stats["internal_errors"] = incomplete["internal_errors"]
    outcome = None
    exit_code: int | None = None
    failed = [r for r in reports if r.target_failed()]
    if failed:
        first = min(failed, key=lambda r: r.stats.get("first_failure_at") if r.stats.get("first_failure_at") is not None else 1 << 60)
        outcome, exit_code = first.target_outcome, first.target_exit_code
    elif reports:
        outcome, exit_code = reports[0].target_outcome, reports[0].target_exit_code
    fixed = set.intersection(*(set(r.fixed) for r in reports)) if all(r.fixed for r in reports) else set()
    return Report(
        command="merge",
        target=list(reports[0].target),
        findings=findings,
        target_exit_code=exit_code,
        stats=stats,
        error="; ".join(dict.fromkeys(errors)) if errors else None,
        target_outcome=outcome,
        suppressed=list(suppressed.values()),
        fixed=sorted(fixed),
        incomplete=incomplete,
    )
