"""Reporting: findings, the report document and its writers (text, JSON, SARIF, JUnit), filters.

Everything here is pure Python and never imports torch. Names are exported lazily (PEP 562) so
that ``import raceguard.report.finding`` from the capture layer, inside the target process,
does not pay for importing rich and the writers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # finding.py
    "Access": "finding",
    "Finding": "finding",
    "Frame": "finding",
    "Reproduce": "finding",
    "KINDS": "finding",
    "MODES": "finding",
    "RESOURCE_KINDS": "finding",
    "SEVERITIES": "finding",
    "compute_fingerprint": "finding",
    # document.py
    "FORMATS": "document",
    "Report": "document",
    "load_schema": "document",
    "validate_report": "document",
    "write_atomic": "document",
    # render.py
    "render": "render",
    # text.py
    "print_report": "text",
    "render_text": "text",
    "render_finding_text": "text",
    "summary_line": "text",
    # sarif.py / junit.py
    "to_sarif": "sarif",
    "to_junit": "junit",
    # filters.py
    "Baseline": "filters",
    "FilterResult": "filters",
    "Suppressions": "filters",
    "apply_baseline": "filters",
    "apply_filters": "filters",
    "load_baseline": "filters",
    "write_baseline": "filters",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value  # cache: the next lookup is a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
