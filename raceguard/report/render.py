"""Turning a :class:`~raceguard.report.document.Report` into any output format.

The one module that knows every writer, so that :mod:`.document` knows none of them and each
writer imports :mod:`.document` without a circle.
"""

from __future__ import annotations

import json
import os

from raceguard.report.document import FORMATS, Report, to_json


def render(report: Report, fmt: str, *, verbose: bool = False, base_dir: str | os.PathLike[str] | None = None) -> str:
    """The report in one of FORMATS, as text ending with a newline.

    ``verbose`` affects the text format (and the failure text inside JUnit); ``base_dir`` is
    the repository root SARIF uris are made relative to (default: the current directory).
    """
    if fmt == "text":
        from raceguard.report.text import render_text  # rich: imported only when asked for

        return render_text(report, verbose=verbose)
    if fmt == "json":
        return to_json(report)
    if fmt == "sarif":
        from raceguard.report.sarif import to_sarif

        return json.dumps(to_sarif(report, base_dir=base_dir), indent=2, ensure_ascii=False, default=str) + "\n"
    if fmt == "junit":
        from raceguard.report.junit import to_junit

        return to_junit(report, verbose=verbose)
    raise ValueError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")

