"""The ``stress``, ``replay`` and ``merge`` commands (:mod:`raceguard.cli` registers them on its group).

Thin: parse options, merge them with ``[tool.raceguard]`` / ``[tool.raceguard.stress]``, run
(:mod:`raceguard.stress`), print and exit with the contract's code.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any

import click

from .common import (
    REPORT_OPTIONS,
    TARGET_CONTEXT,
    TargetCommand,
    baseline_from,
    config_from,
    fail_usage,
    finish,
    internal_error,
    module_option,
    report_options,
    request_simulated_cuda,
    simulate_cuda_option,
    split_target,
    suppressions_from,
)
from ..report.document import FORMATS, Report


def _parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        i_text, n_text = value.split("/", 1)
        i, n = int(i_text), int(n_text)
    except ValueError:
        fail_usage(f"--shard must look like I/N (e.g. 1/4), not {value!r}")
    if n < 1 or not 1 <= i <= n:
        fail_usage(f"--shard {value}: I must be between 1 and N (N >= 1)")
    return (i, n)


STRESS_OPTIONS = {**REPORT_OPTIONS, **{key: key for key in ("schedules", "seed", "strategy", "depth", "jobs")},
                  "max-time": "max_time"}

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?")


class Duration(click.ParamType):
    """Seconds, or a duration like ``90s``, ``10m``, ``1h30m``."""

    name = "DURATION"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, (int, float)):
            seconds = float(value)
        else:
            match = _DURATION.fullmatch(str(value).strip())
            if not match or not str(value).strip():
                self.fail(f"{value!r} is not a duration (seconds, or e.g. 90s, 10m, 1h30m)", param, ctx)
            h, m, sec = (float(g) if g else 0.0 for g in match.groups())
            seconds = h * 3600 + m * 60 + sec
        if seconds < 0:
            self.fail(f"{value!r} is negative", param, ctx)
        return seconds


def _stress_config(opts: dict) -> Any:
    return config_from(opts, STRESS_OPTIONS)


def _schedule_options(f: Any) -> Any:
    options = [
        click.option("--strategy", type=click.Choice(["random", "pct"]), help="Scheduling strategy [default: pct]."),
        click.option("--depth", type=click.IntRange(min=1), help="PCT bug depth d: d-1 priority change points [default: 3]."),
        click.option("--pct-steps", type=click.IntRange(min=1), help="PCT step estimate (written into replay commands; "
                     "measured by a calibration run when absent)."),
        click.option("--preempt", type=click.Choice(["ops", "lines"]), default="ops", show_default=True,
                     help="Scheduling points: tensor ops and sync operations, or also every line of the target's own files."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.command(cls=TargetCommand, context_settings=TARGET_CONTEXT)
@module_option
@click.option("--schedules", type=click.IntRange(min=1), help="Number of schedules to run [default: 100].")
@click.option("--seed", type=click.IntRange(min=0), help="Base seed; schedule i uses seed+i [default: random, printed].")
@_schedule_options
@click.option("--jobs", "-j", type=click.IntRange(min=1), help="Schedules run in parallel [default: CPU count].")
@click.option("--stop-on-first", is_flag=True, help="Stop at the first failing schedule.")
@click.option("--max-time", type=Duration(), help="Time budget for the whole run (seconds, or 90s, 10m, 1h): once "
              "spent, no new schedule starts and the report says how many ran; 0 means no budget [default: 10m].")
@click.option("--shard", metavar="I/N", help="Run only schedules i with i % N == I-1 (split one run across CI jobs).")
@report_options
@simulate_cuda_option
@click.argument("target", nargs=-1, type=click.UNPROCESSED)
def stress(module: str | None, target: tuple[str, ...], **opts: Any) -> None:
    """Run SCRIPT [ARGS]... under many controlled thread schedules and report what fails.

    Exactly one thread runs at a time; at every tensor op and synchronisation operation the
    strategy picks which thread continues. Each failing schedule can be replayed exactly with
    the `raceguard replay` command printed next to its findings. --timeout is per schedule
    (default 60 s); --max-time bounds the whole run (default 10 min). Progress goes to stderr:
    a bar on a terminal, a line now and then otherwise.
    """
    from ..process import stress as stress_mod

    script, args = split_target(module, target)
    config = _stress_config(opts)
    request_simulated_cuda(config)  # inherited by the fork server and its schedules
    shard = _parse_shard(opts.get("shard"))
    jobs = config["jobs"] or os.cpu_count() or 1
    quiet, verbose = bool(opts.get("quiet")), bool(opts.get("verbose"))
    progress = _progress_display(quiet)
    max_time = config["max-time"] or None  # 0: no budget
    seed_given = config["seed"] is not None

    def on_event(what: str, data: dict) -> None:
        if what == "start" and not quiet:
            strategy = config["strategy"]
            desc = f"strategy {strategy}" + (f" (depth {config['depth']})" if strategy == "pct" else "")
            shard_text = f", shard {shard[0]}/{shard[1]}" if shard else ""
            from ..report.text import seconds_phrase

            budget = f", time budget {seconds_phrase(max_time)}" if max_time else ""
            click.echo(
                f"raceguard: stress: seed {data['seed']}{'' if seed_given else ' (random)'}, {desc}, "
                f"{data['schedules']} schedules{shard_text}, {jobs} {'job' if jobs == 1 else 'jobs'}{budget}",
                err=True,
            )
            progress.start(data["schedules"])
        elif what == "calibrating" and not quiet:
            progress.phase("calibrating")
        elif what == "ready" and verbose and data.get("pct_steps") is not None:
            click.echo(f"raceguard: stress: PCT step estimate {data['pct_steps']} (calibration run)", err=True)
        elif what == "abandoned" and not quiet:
            which = "the calibration schedule" if data["index"] is None else f"schedule {data['index']}"
            progress.note(
                f"raceguard: stress: {which} (seed {data['seed']}) abandoned, raceguard's own error "
                f"(no finding about the target comes from it): {data['message']}"
            )

    options = stress_mod.StressOptions(
        script=script,
        module=module,
        args=args,
        schedules=config["schedules"],
        seed=config["seed"],
        strategy=config["strategy"],
        depth=config["depth"],
        pct_steps=opts.get("pct_steps"),
        jobs=jobs,
        stop_on_first=bool(opts.get("stop_on_first")),
        timeout=config["timeout"],
        max_time=max_time,
        shard=shard,
        preempt=opts.get("preempt") or "ops",
        max_reports=config["max-reports"],
        suppressions=suppressions_from(config["suppressions"]),
        baseline=baseline_from(config["baseline"]),
        fail_on=config["fail-on"],
        on_progress=progress.update,
        on_event=on_event,
    )
    # Ctrl-C and SIGTERM (a cancelled CI job, timeout(1)) end the run with the report of what
    # was found so far; the handlers stay until it is written and raceguard exits.
    with stress_mod.Interrupt() as options.interrupt:
        try:
            report = stress_mod.run_stress(options)
        except stress_mod.TargetUsageError as exc:
            progress.stop()
            fail_usage(str(exc))
        except Exception as exc:
            progress.stop()
            internal_error(exc)
        progress.stop()
        finish(report, config, opts)


@click.command(cls=TargetCommand, context_settings=TARGET_CONTEXT)
@module_option
@click.option("--seed", type=click.IntRange(min=0), required=True, help="The schedule's seed (from the stress report).")
@_schedule_options
@report_options
@simulate_cuda_option
@click.argument("target", nargs=-1, type=click.UNPROCESSED)
def replay(module: str | None, target: tuple[str, ...], **opts: Any) -> None:
    """Replay one schedule of SCRIPT [ARGS]... exactly and report it like `check`.

    Use the command `raceguard stress` prints next to a finding; it carries the seed, the
    strategy and its parameters. The target's output goes to the terminal. Without --pct-steps,
    pct first measures the step estimate like `stress` does, with a calibration run whose output
    is discarded.
    """
    from ..process import stress as stress_mod

    script, args = split_target(module, target)
    config = _stress_config(opts)
    request_simulated_cuda(config)
    options = stress_mod.StressOptions(
        script=script,
        module=module,
        args=args,
        schedules=1,
        seed=opts["seed"],
        strategy=config["strategy"],
        depth=config["depth"],
        pct_steps=opts.get("pct_steps"),
        jobs=1,
        timeout=config["timeout"],
        preempt=opts.get("preempt") or "ops",
        max_reports=config["max-reports"],
        suppressions=suppressions_from(config["suppressions"]),
        baseline=baseline_from(config["baseline"]),
        fail_on=config["fail-on"],
        capture_output=False,
    )
    with stress_mod.Interrupt() as options.interrupt:  # as under stress
        try:
            report = stress_mod.run_replay(options)
        except stress_mod.TargetUsageError as exc:
            fail_usage(str(exc))
        except Exception as exc:
            internal_error(exc)
        finish(report, config, opts)


@click.command()
@click.argument("reports", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Report format [default: text].")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the merged report here (atomically).")
@click.option("--fail-on", type=click.Choice(["error", "warning"]), help="Lowest severity that fails [default: error].")
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary line.")
@click.option("-v", "--verbose", is_flag=True, help="Show library frames and the effective configuration.")
def merge(reports: tuple[str, ...], **opts: Any) -> None:
    """Combine JSON reports of `stress --shard I/N` runs into one report."""
    from ..report.document import validate_report
    from ..process.stress import merge_reports

    if not reports:
        fail_usage("merge needs at least one JSON report (from stress --format json --output FILE)")
    loaded: list[Report] = []
    for path in reports:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as exc:
            fail_usage(f"cannot read {path}: {exc.strerror or exc}")
        except ValueError as exc:
            fail_usage(f"{path} is not a JSON report: {exc}")
        try:
            validate_report(data)
            loaded.append(Report.from_dict(data))
        except (ValueError, KeyError, TypeError) as exc:
            fail_usage(f"{path} is not a raceguard report: {exc}")
    targets = {tuple(r.target) for r in loaded}
    if len(targets) > 1 and not opts.get("quiet"):
        click.echo("raceguard: merge: warning: the reports are of different targets", err=True)
    config = config_from(opts, {key: REPORT_OPTIONS[key] for key in ("format", "output", "fail-on")})
    try:
        report = merge_reports(loaded)
    except Exception as exc:
        internal_error(exc)
    finish(report, config, opts)


# -- progress ---------------------------------------------------------------------------------
# Without a terminal, a progress line at most every this many schedules (a tenth of the run) or,
# when schedules are slow, once this many seconds passed since the last line.
PLAIN_LINES_PER_RUN = 10
PLAIN_INTERVAL = 30.0


def _is_terminal(stream: Any) -> bool:
    try:
        return stream.isatty()
    except Exception:
        return False


def _progress_display(quiet: bool) -> Any:
    if quiet:
        return _PlainProgress(enabled=False)
    if _is_terminal(sys.stderr):
        return _BarProgress()
    return _PlainProgress(enabled=True)


def _duration_text(seconds: float | None) -> str:
    """``45 s``, ``3m05s``, ``1h02m``."""
    if seconds is None:
        return "?"
    total = int(round(seconds))
    if total < 60:
        return f"{total} s"
    minutes, sec = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _eta(p: Any) -> tuple[float | None, bool]:
    """(seconds left, whether the time budget is what ends the run) from the pace so far."""
    left = None
    if p.done and p.total > p.done:
        left = p.scheduling / p.done * (p.total - p.done)
    elif p.total and p.done >= p.total:
        left = 0.0
    budget = p.budget_left
    if budget is not None and (left is None or budget < left):
        return budget, True
    return left, False


def _progress_text(p: Any) -> str:
    """``12/100 schedules, 1 finding (3 failing schedules), 1m05s elapsed, about 8m10s left``."""
    text = f"{p.done}/{p.total} schedules, {p.bugs} {'finding' if p.bugs == 1 else 'findings'}"
    if p.failures:
        text += f" ({p.failures} failing {'schedule' if p.failures == 1 else 'schedules'})"
    text += f", {_duration_text(p.elapsed)} elapsed"
    left, by_budget = _eta(p)
    if left is not None and p.done < p.total:
        text += f", at most {_duration_text(left)} left (time budget)" if by_budget else f", about {_duration_text(left)} left"
    return text


class _PlainProgress:
    """Progress as plain lines on stderr (CI logs, pipes): one every tenth of the run, or every
    :data:`PLAIN_INTERVAL` seconds while schedules are slow; never one per schedule of a big run."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.step = 1
        self.printed_done = 0
        self.printed_at = time.monotonic()

    def start(self, total: int) -> None:
        self.step = max(1, -(-total // PLAIN_LINES_PER_RUN))
        self.printed_at = time.monotonic()

    def phase(self, name: str) -> None:
        if self.enabled and name == "calibrating":
            click.echo("raceguard: stress: calibration run (measures the PCT step estimate)", err=True)

    def update(self, p: Any) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        finished = p.done >= p.total
        due = p.done - self.printed_done >= self.step or now - self.printed_at >= PLAIN_INTERVAL or finished
        if due and (not finished or self.printed_done < p.total):  # the last line says all are done
            self.printed_done, self.printed_at = p.done, now
            click.echo(f"raceguard: stress: {_progress_text(p)}", err=True)

    def note(self, line: str) -> None:
        click.echo(line, err=True)

    def stop(self) -> None:
        pass


class _BarProgress:
    """A rich progress bar on stderr, redrawn in place: schedules done, findings, elapsed, ETA."""

    def __init__(self) -> None:
        self._progress: Any = None
        self._task: Any = None

    def start(self, total: int) -> None:
        if self._progress is not None:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]{task.fields[phase]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("schedules"),
            TextColumn("[magenta]{task.fields[bugs]} findings"),
            TextColumn("[red]{task.fields[failures]} failing"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),
            console=Console(file=sys.stderr),
            transient=True,
        )
        self._task = self._progress.add_task("stress", total=total, failures=0, bugs=0, phase="stress", eta="")
        self._progress.start()

    def phase(self, name: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, phase=name)

    def update(self, p: Any) -> None:
        if self._progress is None:
            return
        left, by_budget = _eta(p)
        eta = "" if left is None else f"{'budget' if by_budget else 'ETA'} {_duration_text(left)}"
        self._progress.update(self._task, completed=p.done, total=p.total, failures=p.failures, bugs=p.bugs,
                              phase="stress", eta=eta)

    def note(self, line: str) -> None:
        """One line on stderr, above the bar while it is shown."""
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            click.echo(line, err=True)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
