"""What the commands of :mod:`raceguard.cli` and :mod:`raceguard.cli_stress` share: the report
options, the configuration merge, usage and internal errors, the end of a run (report, exit
code), and how a target (``SCRIPT ARGS`` or ``-m MODULE ARGS``) is taken off the command line.

Neither command module imports the other's commands from here; :mod:`raceguard.cli` registers
those of :mod:`raceguard.cli_stress` on its group.
"""

from __future__ import annotations

import sys
import traceback
from typing import TYPE_CHECKING, Any, NoReturn

import click

from ..config import ConfigError, load_config, merge_cli
from ..report.document import DEFAULT_REPORT_FILES, FORMATS, STDOUT, Report, write_atomic
from ..report.render import render

if TYPE_CHECKING:  # imported where used: not needed before the target starts
    from ..report.filters import Suppressions

EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 4

TARGET_CONTEXT = {
    # Everything after the script (or -m MODULE) belongs to the target, options included.
    "allow_interspersed_args": False,
    "help_option_names": ["-h", "--help"],
}


def fail_usage(message: str) -> NoReturn:
    click.echo(f"raceguard: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def internal_error(exc: BaseException) -> NoReturn:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "unknown location"
    click.echo(f"raceguard: internal error: {type(exc).__name__}: {exc} (at {where}); please report it", err=True)
    sys.exit(EXIT_INTERNAL)


# -- the target on the command line ------------------------------------------------------------
class TargetCommand(click.Command):
    """A command that runs a target: ``[OPTIONS] SCRIPT [ARGS]...`` or ``[OPTIONS] -m MODULE
    [ARGS]...``, with python's rule that everything after the module name is the module's.

    click would read options after ``-m MODULE`` as the command's own (``-m json.tool
    --sort-keys`` fails with "No such option"); so the command line is cut right after the module
    name before click parses it, and the rest is handed over as the target's arguments.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, module_args_verbatim(args, self.get_params(ctx)))
        except click.UsageError as exc:
            # click's option parser raises "Option '-m' requires an argument." without a context,
            # and then prints no usage line: give it this command's.
            if exc.ctx is None:
                exc.ctx = ctx
                exc.cmd = self
            raise


def module_args_verbatim(args: list[str], params: list[click.Parameter]) -> list[str]:
    """``args`` with ``--`` inserted right after ``-m MODULE`` when ``-m`` comes before the first
    positional argument (or ``--``); otherwise ``args`` unchanged (click then reports what is
    wrong with them, if anything)."""
    takes_value: dict[str, bool] = {}
    for param in params:
        if isinstance(param, click.Option):
            for name in (*param.opts, *param.secondary_opts):
                takes_value[name] = not (param.is_flag or param.count)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--" or arg == "-" or not arg.startswith("-"):
            return args  # a script (or `--`): -m, if anywhere, belongs to it
        if arg.startswith("--"):
            name, eq, _ = arg.partition("=")
            if name not in takes_value:
                return args
            i += 2 if takes_value[name] and not eq else 1
            continue
        # Short options, possibly grouped (-qv) or with the value attached (-mjson.tool, -oFILE).
        step = 1
        for j in range(1, len(arg)):
            name = "-" + arg[j]
            if name not in takes_value:
                return args
            if not takes_value[name]:
                continue
            attached = arg[j + 1:]
            if name == "-m":
                if not attached and i + 1 >= len(args):
                    return args  # click says "-m requires an argument"
                before = args[:i] + ([arg[:j]] if j > 1 else [])
                module, rest = (attached, args[i + 1:]) if attached else (args[i + 1], args[i + 2:])
                return [*before, "-m", module, "--", *rest]
            step = 1 if attached else 2
            break
        i += step
    return args


def split_target(module: str | None, target: tuple[str, ...]) -> tuple[str | None, tuple[str, ...]]:
    """(script, args) of the command line's target; exits 2 when there is none, or when it
    cannot start (a missing script, an unknown module): answered here, at once, not after the
    target's process has imported torch (a pre-started one is killed at exit)."""
    from ..process.preflight import target_problem

    if module is None and not target:
        fail_usage("missing SCRIPT (or -m MODULE): what should raceguard run?")
    script, args = (None, tuple(target)) if module else (target[0], tuple(target[1:]))
    problem = target_problem(script, module)
    if problem:
        fail_usage(problem)
    return script, args


def module_option(f: Any) -> Any:
    return click.option(
        "-m", "module", metavar="MODULE",
        help="Run a library module as a script, like python -m; everything after MODULE is its arguments.",
    )(f)


# -- report options, configuration, the end of a run --------------------------------------------
def report_options(f: Any) -> Any:
    options = [
        click.option("--format", "fmt", type=click.Choice(FORMATS), help="Report format [default: text]."),
        click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True),
                     help="Write the report here (atomically) [default: text to stderr, json/sarif/junit to "
                     "raceguard-report.json/.sarif/.xml]."),
        click.option("--fail-on", type=click.Choice(["error", "warning"]), help="Lowest severity that fails the run [default: error]."),
        click.option("--max-reports", type=click.IntRange(min=1), help="Report at most N findings [default: 100]."),
        click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Stop the target after SECONDS and report."),
        click.option("--suppressions", type=click.Path(dir_okay=False), help="TSan-style suppressions file (KIND:PATTERN lines)."),
        click.option("--baseline", type=click.Path(dir_okay=False), help="Fail only on findings not in this baseline."),
        click.option("--write-baseline", type=click.Path(dir_okay=False), help="Record this run's findings as the baseline."),
        click.option("-q", "--quiet", is_flag=True, help="Print only the summary line."),
        click.option("-v", "--verbose", is_flag=True, help="Show library frames and the effective configuration."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def simulate_cuda_option(f: Any) -> Any:
    return click.option(
        "--simulate-cuda", "simulate_cuda", is_flag=True, default=None,
        help="Run a CUDA program unchanged on a CPU-only torch: its CUDA tensors, streams and events "
        "live on a simulated device in CPU memory, checked as on a GPU.",
    )(f)


def request_simulated_cuda(config: Any) -> bool:
    """Whether the run simulates CUDA; if so, the processes started from now on inherit it
    (stress's fork server and schedules, check's target when not pre-started)."""
    if not config["simulate-cuda"]:
        return False
    import os

    from ..cuda import SIMULATE_ENV, SIMULATE_PROGRAM  # no torch: the package root imports none

    os.environ[SIMULATE_ENV] = SIMULATE_PROGRAM
    return True


# Configuration key -> the click parameter that sets it on the command line.
REPORT_OPTIONS = {
    "format": "fmt",
    "output": "output",
    "fail-on": "fail_on",
    "max-reports": "max_reports",
    "timeout": "timeout",
    "suppressions": "suppressions",
    "baseline": "baseline",
    "simulate-cuda": "simulate_cuda",
}


def config_from(opts: dict, options: dict[str, str] = REPORT_OPTIONS) -> Any:
    """``[tool.raceguard]`` with the command line's ``options`` over it; a bad value exits 2.
    With ``-v`` the effective configuration is printed now, before anything runs."""
    try:
        config = merge_cli(load_config(), {key: opts.get(param) for key, param in options.items()})
    except ConfigError as exc:
        fail_usage(str(exc))
    ctx = click.get_current_context(silent=True)
    if config["output"] == STDOUT and ctx is not None and isinstance(ctx.command, TargetCommand):
        fail_usage("--output -: stdout carries the target's own output; write the report to a file (-o FILE)")
    if opts.get("verbose"):
        for line in config.describe():
            click.echo(f"raceguard: config: {line}", err=True)
    return config


def suppressions_from(path: str | None) -> Suppressions | None:
    if not path:
        return None
    from ..report.filters import Suppressions
    try:
        return Suppressions.load(path)
    except ConfigError as exc:
        fail_usage(str(exc))


def baseline_from(path: str | None) -> Any:
    if not path:
        return None
    from ..report.filters import load_baseline
    try:
        return load_baseline(path)
    except ConfigError as exc:
        fail_usage(str(exc))


def finish(report: Report, config: Any, opts: dict) -> NoReturn:
    """Write the report where it was asked for, print the summary, exit with the contract code.

    A machine-readable format never goes to stdout unless asked for (``-o -``, refused where a
    target runs): without ``--output`` it is written to ``raceguard-report.<ext>`` in the working
    directory and that path is printed on stderr. ``--write-baseline`` makes findings a success.
    """
    from ..report.filters import write_baseline
    from ..report.text import print_report

    if config["simulate-cuda"]:
        report.stats.setdefault("simulated_cuda", True)  # also when the target never imported torch
    fmt = config["format"]
    output = config["output"]
    quiet, verbose = opts.get("quiet"), opts.get("verbose")
    try:
        if opts.get("write_baseline"):
            recorded = report.findings + report.suppressed
            write_baseline(opts["write_baseline"], recorded)
        if output == STDOUT:
            sys.stdout.write(render(report, fmt, verbose=verbose))
            sys.stdout.flush()
        elif output:
            write_atomic(output, render(report, fmt, verbose=verbose))
        elif fmt != "text":
            output = DEFAULT_REPORT_FILES[fmt]
            write_atomic(output, render(report, fmt, verbose=verbose))
            click.echo(f"raceguard: {fmt} report written to {output}", err=True)
        # The human report on stderr: all of it for text (unless -q), else the summary, so that CI
        # logs show what happened.
        full = fmt == "text" and output != STDOUT and not quiet
        print_report(report, file=sys.stderr, verbose=verbose, quiet=not full)
        if opts.get("write_baseline"):
            n = len({f.fingerprint for f in recorded})
            click.echo(f"raceguard: baseline: {n} finding{'' if n == 1 else 's'} written to {opts['write_baseline']}", err=True)
    except OSError as exc:
        fail_usage(f"cannot write the report: {exc}")
    code = report.exit_code(config["fail-on"])
    if opts.get("write_baseline") and code == EXIT_FINDINGS:
        code = 0  # recording the known findings is what was asked: they are adopted, not failures
    sys.exit(code)
