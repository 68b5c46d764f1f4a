"""Command line: parse options, run, print the report, exit with the contract's code.

Exit codes: 0 clean, 1 findings at or above --fail-on, 2 usage error, 3 the target failed and no
finding explains it, 4 raceguard itself failed.
"""

from __future__ import annotations

import sys
import traceback
from typing import TYPE_CHECKING, Any

import click

from . import __version__
from .config import ConfigError, load_config, merge_cli
from .report.document import FORMATS, Report, render, write_atomic

if TYPE_CHECKING:  # imported where used: not needed before the target starts
    from .report.filters import Suppressions

EXIT_USAGE = 2
EXIT_INTERNAL = 4

_TARGET_CONTEXT = {
    # Everything after the script (or -m MODULE) belongs to the target, options included.
    "allow_interspersed_args": False,
    "help_option_names": ["-h", "--help"],
}


def _fail_usage(message: str) -> None:
    click.echo(f"raceguard: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="raceguard")
def main() -> None:
    """raceguard: find data races, lock-order cycles and deadlocks in PyTorch programs."""


def _report_options(f: Any) -> Any:
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


@main.command(context_settings=_TARGET_CONTEXT)
@click.option("-m", "module", metavar="MODULE", help="Run a library module as a script, like python -m.")
@_report_options
@click.argument("target", nargs=-1, type=click.UNPROCESSED)
def check(module: str | None, target: tuple[str, ...], **opts: Any) -> None:
    """Run SCRIPT [ARGS]... (or -m MODULE [ARGS]...) and report data races between its threads.

    Options after the script name belong to the script; `--` also ends raceguard's options.
    """
    from .check import CheckOptions, TargetUsageError, run_check

    if module is None and not target:
        _fail_usage("missing SCRIPT (or -m MODULE): what should raceguard run?")
    script = None if module else target[0]
    args = tuple(target if module else target[1:])
    config = _config(opts)
    check_options = CheckOptions(
        script=script,
        module=module,
        args=args,
        timeout=config["timeout"],
        max_reports=config["max-reports"],
        suppressions=_suppressions(config["suppressions"]),
        baseline=_baseline(config["baseline"]),
    )
    try:
        report = run_check(check_options)
    except TargetUsageError as exc:
        _fail_usage(str(exc))
    except Exception as exc:  # a bug in raceguard: say where, exit 4
        _internal_error(exc)
    _finish(report, config, opts)


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


def _config(opts: dict, options: dict[str, str] = REPORT_OPTIONS) -> Any:
    """``[tool.raceguard]`` with the command line's ``options`` over it; a bad value exits 2."""
    try:
        return merge_cli(load_config(), {key: opts.get(param) for key, param in options.items()})
    except ConfigError as exc:
        _fail_usage(str(exc))


def _suppressions(path: str | None) -> Suppressions | None:
    if not path:
        return None
    from .report.filters import Suppressions
    try:
        return Suppressions.load(path)
    except ConfigError as exc:
        _fail_usage(str(exc))


def _baseline(path: str | None) -> Any:
    if not path:
        return None
    from .report.filters import load_baseline
    try:
        return load_baseline(path)
    except ConfigError as exc:
        _fail_usage(str(exc))


def _finish(report: Report, config: Any, opts: dict) -> None:
    """Write the report where it was asked for, print the summary, exit with the contract code."""
    from .report.filters import write_baseline
    from .report.text import print_report

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
        _fail_usage(f"cannot write the report: {exc}")
    sys.exit(report.exit_code(config["fail-on"]))


@main.command("config")
def show_config() -> None:
    """Print the effective configuration and where each value came from."""
    try:
        config = load_config()
    except ConfigError as exc:
        _fail_usage(str(exc))
    where = str(config.path) if config.path else "no [tool.raceguard] table found; defaults apply"
    click.echo(f"# configuration file: {where}")
    for line in config.describe():
        click.echo(line)


def _internal_error(exc: BaseException) -> None:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "unknown location"
    click.echo(f"raceguard: internal error: {type(exc).__name__}: {exc} (at {where}); please report it", err=True)
    sys.exit(EXIT_INTERNAL)


from . import cli_stress  # noqa: E402,F401 - registers stress, replay and merge


if __name__ == "__main__":  # pragma: no cover
    main()
