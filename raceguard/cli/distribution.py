"""Which installed distribution provides the running ``raceguard`` package.

This project is published as ``torch-raceguard``; the import package and the command are
``raceguard``. PyPI's ``raceguard`` is a different project: installed alongside (or instead), its
files can shadow ours, and ``raceguard`` then runs someone else's code. ``raceguard --version``
and ``raceguard doctor`` say which distribution the running package came from and warn about the
other one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import metadata
from urllib.parse import unquote, urlparse

DISTRIBUTION = "torch-raceguard"  # this project's name on PyPI
OTHER_PROJECT = "raceguard"  # PyPI's raceguard: another author's thread race detector
PACKAGE = "raceguard"


@dataclass
class Provider:
    """An installed distribution that ships the ``raceguard`` import package."""

    name: str
    version: str
    location: str  # the package's directory (a source checkout for an editable install)
    editable: bool
    running: bool  # the running package is this distribution's copy


def package_dir() -> str:
    import raceguard

    return os.path.dirname(os.path.realpath(raceguard.__file__))


def providers() -> list[Provider]:
    """Every installed distribution that ships the ``raceguard`` package, ours or not."""
    running_dir = package_dir()
    source_tree = os.path.dirname(running_dir)
    found: list[Provider] = []
    seen: set[tuple[str, str]] = set()
    for dist in metadata.distributions():
        if PACKAGE not in _top_level_names(dist):
            continue
        base = os.path.realpath(str(dist.locate_file("")))
        name = dist.metadata["Name"] or "?"
        if base == source_tree and not _is_dist_info(dist):
            continue  # the checkout's own build metadata (NAME.egg-info next to the package), not an install
        if (name.lower(), base) in seen:
            continue
        seen.add((name.lower(), base))
        location, editable = _package_location(dist)
        found.append(Provider(
            name=name,
            version=dist.version,
            location=location or "unknown location",
            editable=editable,
            running=location is not None and os.path.realpath(location) == running_dir,
        ))
    return found


def _top_level_names(dist: metadata.Distribution) -> set[str]:
    top_level = dist.read_text("top_level.txt")
    if top_level:
        return set(top_level.split())
    return {f.parts[0] for f in dist.files or () if len(f.parts) > 1}


def _is_dist_info(dist: metadata.Distribution) -> bool:
    return any(str(f).endswith(".dist-info/METADATA") for f in dist.files or ())


def _package_location(dist: metadata.Distribution) -> tuple[str | None, bool]:
    """(the package directory this distribution installed, whether it is an editable install)."""
    direct_url = dist.read_text("direct_url.json")
    if direct_url:
        try:
            info = json.loads(direct_url)
        except ValueError:
            info = {}
        if info.get("dir_info", {}).get("editable"):
            url = urlparse(info.get("url", ""))
            if url.scheme == "file":
                return os.path.join(unquote(url.path), PACKAGE), True
    init = dist.locate_file(f"{PACKAGE}/__init__.py")
    if os.path.exists(str(init)):
        return os.path.dirname(str(init)), False
    return None, False


def describe_running() -> str:
    """One line: the running package's distribution, version and location."""
    from .. import __version__

    running = [p for p in providers() if p.running]
    if running:
        p = running[0]
        how = "editable install of " if p.editable else ""
        return f"raceguard {__version__} from distribution {p.name} {p.version} ({how}{p.location})"
    return f"raceguard {__version__} from {package_dir()} (not an installed distribution: a source tree on sys.path)"


def other_copies() -> list[str]:
    """One line per installed copy of this project that is not the one running (a source tree
    on sys.path shadows an install, or two environments' paths are mixed)."""
    return [
        f"note: {p.name} {p.version} is also installed ({'editable install of ' if p.editable else ''}{p.location}), "
        "but is not the copy that runs"
        for p in providers()
        if not p.running and p.name.lower() != OTHER_PROJECT
    ]


def clash_warning() -> str | None:
    """One line when a distribution named ``raceguard`` (PyPI's other project) is installed."""
    other = [p for p in providers() if p.name.lower() == OTHER_PROJECT]
    if not other:
        return None
    p = other[0]
    runs = "and provides the running raceguard package" if p.running else "alongside; its files may shadow this package"
    if p.editable:  # this project installed from a checkout under its former name
        fix = f"pip uninstall {OTHER_PROJECT} && pip install -e {os.path.dirname(p.location)}"
    else:
        fix = f"pip uninstall {OTHER_PROJECT} && pip install {DISTRIBUTION}"
    return (
        f"warning: distribution '{OTHER_PROJECT}' {p.version} is installed {runs}: PyPI's '{OTHER_PROJECT}' is "
        f"another project, this one is '{DISTRIBUTION}' ({fix})"
    )
