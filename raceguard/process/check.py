"""``raceguard check``: run the target once under detection and build its report.

Glue between the supervisor (which runs the target) and the report layer; the CLI only parses
options and prints. Pure Python on this side: torch is imported only in the target's process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .supervisor import RunResult, run_target

if TYPE_CHECKING:
    from ..report.document import Report
    from ..report.filters import Baseline, Suppressions
    from ..report.finding import Finding


@dataclass
class CheckOptions:
    script: str | None = None
    module: str | None = None
    args: tuple[str, ...] = ()
    timeout: float | None = None
    max_reports: int | None = None
    suppressions: Suppressions | None = None
    baseline: Baseline | None = None
    children: bool = True  # check the Python processes the target starts (raceguard.workers)
    simulate_cuda: bool = False  # --simulate-cuda: CUDA on a simulated device in CPU memory
    on_finding: Callable[[Finding], None] | None = field(default=None, repr=False)

    def target_argv(self) -> list[str]:
        head = ["-m", self.module] if self.module else [self.script or ""]
        return [*head, *self.args]


class TargetUsageError(Exception):
    """The target could not be started (missing file, syntax error, unknown module)."""


def run_check(options: CheckOptions) -> Report:
    result = run_target(
        script=options.script,
        module=options.module,
        args=options.args,
        timeout=options.timeout,
        max_reports=options.max_reports,
        on_finding=options.on_finding,
        on_started=import_report_layer,
        children=options.children,
        simulate_cuda=options.simulate_cuda,
    )
    if result.usage_error is not None:
        raise TargetUsageError(result.usage_error)
    return build_report("check", options.target_argv(), result, options.suppressions, options.baseline)


def import_report_layer() -> None:
    """Import what building and printing the report needs (rich alone is ~40 ms) while the
    target's process imports torch, instead of after it ended: the user waits for neither."""
    from ..report import document, filters, text  # noqa: F401


def build_report(
    command: str,
    target: list[str],
    result: RunResult,
    suppressions: Suppressions | None = None,
    baseline: Baseline | None = None,
) -> Report:
    from ..report.document import Report, incomplete_analysis
    from ..report.filters import apply_filters

    filtered = apply_filters(result.findings, suppressions, baseline)
    stats = {
        "threads": int(result.stats.get("threads", 0)),
        "ops": int(result.stats.get("ops", 0)),
        "schedules_run": 1,
        "first_failure_at": None,
        "wall_seconds": round(result.wall_seconds, 3),
    }
    if result.stats.get("dropped_reports"):
        stats["dropped_reports"] = result.stats["dropped_reports"]
    if result.stats.get("processes"):  # the target's Python children were checked too
        stats["processes"] = int(result.stats["processes"])
    if result.stats.get("capture_backend"):  # which op recorder ran, and why
        stats["capture_backend"] = str(result.stats["capture_backend"])
    for key in ("cuda_streams", "cuda_launches"):  # present once the target initialised CUDA
        if key in result.stats:
            stats[key] = int(result.stats[key])
    if result.stats.get("simulated_cuda"):  # --simulate-cuda: and where the simulation's fidelity ended
        stats["simulated_cuda"] = True
        if result.stats.get("simulation_notes"):
            stats["simulation_notes"] = [str(n) for n in result.stats["simulation_notes"]]
    incomplete = incomplete_analysis(
        int(result.stats.get("internal_errors", 0)), result.hook_errors, result.stats.get("not_captured")
    )
    if incomplete and incomplete["internal_errors"]:
        stats["internal_errors"] = incomplete["internal_errors"]
    error = None
    if result.internal_errors:
        error = "; ".join(dict.fromkeys(result.internal_errors))
    return Report(
        command=command,
        target=target,
        findings=filtered.kept,
        target_exit_code=result.target_exit_code,
        stats=stats,
        error=error,
        target_outcome=result.outcome or None,
        suppressed=filtered.suppressed,
        fixed=filtered.fixed,
        incomplete=incomplete,
    )
