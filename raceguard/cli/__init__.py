"""Command line: parse options, run, print the report, exit with the contract's code.

Exit codes: 0 clean, 1 findings at or above --fail-on, 2 usage error, 3 the target failed and no
finding explains it, 4 raceguard itself failed.
"""

from __future__ import annotations

from typing import Any

import click

from .common import (
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
from .doctor import doctor
from .stress import merge, replay, stress
from ..config import ConfigError, load_config


def show_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """The version, and which installed distribution it comes from: PyPI's `raceguard` is another
    project, so the name alone does not say what runs."""
    if not value or ctx.resilient_parsing:
        return
    from .distribution import clash_warning, describe_running

    click.echo(describe_running())
    warning = clash_warning()
    if warning:
        click.echo(warning, err=True)
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version", is_flag=True, expose_value=False, is_eager=True, callback=show_version,
    help="Show the version and the distribution that provides it, then exit.",
)
def main() -> None:
    """raceguard: find data races, lock-order cycles and deadlocks in PyTorch programs."""


@main.command(cls=TargetCommand, context_settings=TARGET_CONTEXT)
@module_option
@report_options
@simulate_cuda_option
@click.option(
    "--no-children",
    is_flag=True,
    help="Check only the target's own process, not the Python processes it starts (torchrun workers, spawn).",
)
@click.argument("target", nargs=-1, type=click.UNPROCESSED)
def check(module: str | None, target: tuple[str, ...], no_children: bool, **opts: Any) -> None:
    """Run SCRIPT [ARGS]... (or -m MODULE [ARGS]...) and report data races between its threads.

    Options after the script or module name belong to the target; `--` also ends raceguard's
    options.
    """
    script, args = split_target(module, target)  # a target that cannot start exits here, at once
    from ..process.check import CheckOptions, TargetUsageError, run_check

    config = config_from(opts)
    check_options = CheckOptions(
        script=script,
        module=module,
        args=args,
        timeout=config["timeout"],
        max_reports=config["max-reports"],
        suppressions=suppressions_from(config["suppressions"]),
        baseline=baseline_from(config["baseline"]),
        children=not no_children,
        simulate_cuda=request_simulated_cuda(config),
    )
    try:
        report = run_check(check_options)
    except TargetUsageError as exc:
        fail_usage(str(exc))
    except Exception as exc:  # a bug in raceguard: say where, exit 4
        internal_error(exc)
    finish(report, config, opts)


@main.command("config")
def show_config() -> None:
    """Print the effective configuration and where each value came from."""
    try:
        config = load_config()
    except ConfigError as exc:
        fail_usage(str(exc))
    where = str(config.path) if config.path else "no [tool.raceguard] table found; defaults apply"
    click.echo(f"# configuration file: {where}")
    for line in config.describe():
        click.echo(line)


for _command in (stress, replay, merge, doctor):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
