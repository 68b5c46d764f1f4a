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
from ..report.document import FORMATS, Report, write_atomic
from ..report.render import render

if TYPE_CHECKING:  # imported where used: not needed before the target starts
    from ..report.filters import Suppressions

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
        return super().parse_args(ctx, module_args_verbatim(args, self.get_params(ctx)))


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
    """(script, args) of the command line's target; exits 2 when there is none."""
    if module is None and not target:
        fail_usage("missing SCRIPT (or -m MODULE): what should raceguard run?")
    if module:
        return None, tuple(target)
    return target[0], tuple(target[1:])


def module_option(f: Any) -> Any:
    return click.option(
        "-m", "module", metavar="MODULE",
        help="Run a library module as a script, like python -m; everything after MODULE is its arguments.",
    )(f)


# -- report options, configuration, the end of a run --------------------------------------------
def report_options(f: Any) -> Any:
    options = [
        click.option("--format", "fmt", type=click.Choice(FORMATS), help="Report format [default: text]."),
        click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the report here (atomically)."),
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


# Configuration key -> the click parameter that sets it on the command line.
REPORT_OPTIONS = {
    "format": "fmt",
    "output": "output",
    "fail-on": "fail_on",
    "max-reports": "max_reports",
    "timeout": "timeout",
    "suppressions": "suppressions",
    "baseline": "baseline",
}


def config_from(opts: dict, options: dict[str, str] = REPORT_OPTIONS) -> Any:
    """``[tool.raceguard]`` with the command line's ``options`` over it; a bad value exits 2."""
    try:
        return merge_cli(load_config(), {key: opts.get(param) for key, param in options.items()})
    except ConfigError as exc:
        fail_usage(str(exc))


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
    """Write the report where it was asked for, print the summary, exit with the contract code."""
    from ..report.filters import write_baseline
    from ..report.text import print_report

    fmt = config["format"]
    output = config["output"]
    quiet, verbose = opts.get("quiet"), opts.get("verbose")
    try:
        if opts.get("write_baseline"):
            write_baseline(opts["write_baseline"], report.findings + report.suppressed)
        if output:
            write_atomic(output, render(report, fmt, verbose=verbose))
        if fmt == "text" and not output:
            print_report(report, file=sys.stderr, verbose=verbose, quiet=quiet)
        else:
            if not output:
                sys.stdout.write(render(report, fmt, verbose=verbose))
                sys.stdout.flush()
            # The human summary still goes to stderr: CI logs show what happened.
            print_report(report, file=sys.stderr, verbose=verbose, quiet=True if fmt != "text" or quiet else quiet)
        if verbose:
            for line in config.describe():
                click.echo(f"raceguard: config: {line}", err=True)
    except OSError as exc:
        fail_usage(f"cannot write the report: {exc}")
    sys.exit(report.exit_code(config["fail-on"]))
