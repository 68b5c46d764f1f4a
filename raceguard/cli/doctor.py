"""``raceguard doctor``: what a run would use here, in a dozen lines.

For a new user and for bug reports: which distribution provides the running package (and whether
PyPI's unrelated ``raceguard`` is installed too), Python, torch and its build, the capture backend,
the optional extras and the configuration file. It only reads: it never fails a CI step (exit 0).
"""

from __future__ import annotations

import importlib.util
import platform
import sys

import click


@click.command()
def doctor() -> None:
    """Show what raceguard would use here: install, Python, torch, capture backend, extras, config."""
    # Imported here: importlib.metadata alone costs every other command ~50 ms.
    from .distribution import clash_warning, describe_running, other_copies

    click.echo(describe_running())
    for line in other_copies():
        click.echo(line)
    warning = clash_warning()
    if warning:
        click.echo(warning)
    click.echo(f"python: {platform.python_implementation()} {platform.python_version()} ({sys.executable})")
    click.echo(f"torch: {torch_line()}")
    click.echo(f"capture: {capture_line()}")
    click.echo(f"hypothesis: {version_of('hypothesis') or 'not installed (raceguard.hypothesis.interleavings needs it)'}")
    click.echo(f"pytest plugin: {pytest_plugin_line()}")
    click.echo(f"configuration: {config_line()}")


def version_of(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def torch_line() -> str:
    """torch's version and build, and whether a GPU is visible (imports torch: ~1-2 s)."""
    if importlib.util.find_spec("torch") is None:
        return "not installed (raceguard needs torch>=2.4)"
    try:
        import torch
    except Exception as exc:  # a broken install: say so, doctor still answers the rest
        return f"installed but fails to import: {type(exc).__name__}: {exc}"
    cuda_build = getattr(torch.version, "cuda", None)
    hip_build = getattr(torch.version, "hip", None)
    if cuda_build:
        build = f"CUDA {cuda_build} build"
    elif hip_build:
        build = f"ROCm {hip_build} build"
    else:
        build = "CPU-only build"
    try:
        count = torch.cuda.device_count() if (cuda_build or hip_build) else 0
    except Exception:
        count = 0
    if count:
        gpu = f"{count} GPU{'s' if count > 1 else ''} visible ({torch.cuda.get_device_name(0)})"
    elif cuda_build or hip_build:
        gpu = "no GPU visible"
    else:
        gpu = "no GPU support"
    return f"{torch.__version__}, {build}, {gpu}"


def capture_line() -> str:
    """The op-capture backend a checked run would use here, and why. A cached native recorder is
    loaded to be sure it loads; nothing is built."""
    try:
        from ..capture import native

        backend, reason = native.status()
    except Exception as exc:
        return f"python dispatch mode (the native backend's status failed: {type(exc).__name__}: {exc})"
    if backend == "native":
        return f"native recorder ({reason})"
    return f"python dispatch mode ({reason})"


def pytest_plugin_line() -> str:
    from importlib import metadata

    try:
        entry_points = metadata.entry_points(group="pytest11")
    except Exception:
        entry_points = ()
    for entry_point in entry_points:
        if entry_point.value.split(":")[0] == "raceguard.pytest_plugin":
            pytest_version = version_of("pytest")
            where = f"pytest {pytest_version}" if pytest_version else "pytest not installed"
            return f"registered (entry point '{entry_point.name}'; {where})"
    return "not registered (reinstall the package to register the pytest11 entry point)"


def config_line() -> str:
    from ..config import ConfigError, load_config

    try:
        config = load_config()
    except ConfigError as exc:
        return f"invalid: {exc}"
    if config.path is None:
        return "no [tool.raceguard] table in a pyproject.toml here or above; defaults apply"
    return f"{config.path} [tool.raceguard]"
