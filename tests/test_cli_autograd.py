"""The autograd engine's accumulation into .grad through the public CLI (issue 13).

``fixtures/clean/concurrent_backward.py`` and ``fixtures/races/grad_monitor_concurrent_backward.py``
run with every other fixture in ``test_cli_fixtures.py``; here, what that generic check cannot
see: the race fixture's only finding is the monitor against a worker, never worker against worker.
"""

from __future__ import annotations

from pathlib import Path

from test_cli_fixtures import FIXTURES, _innermost_user_line, _markers, run_check


def test_monitor_races_with_backward_but_the_workers_do_not_race(tmp_path: Path) -> None:
    path = FIXTURES / "races" / "grad_monitor_concurrent_backward.py"
    markers = _markers(path)
    proc, report = run_check(path, tmp_path)
    assert proc.returncode == 1, proc.stderr
    [finding] = report["findings"]
    assert (finding["kind"], finding["resource"], finding["resource_kind"]) == (
        "data-race",
        "model.fc1.weight.grad",
        "grad",
    )
    by_thread = {a["thread"]: a for a in finding["accesses"]}
    assert "monitor" in by_thread and len(by_thread) == 2
    worker = next(a for t, a in by_thread.items() if t != "monitor")
    assert worker["thread"].startswith("worker-") and worker["mode"] == "write"
    assert _innermost_user_line(worker, path) == markers["A"]
    assert _innermost_user_line(by_thread["monitor"], path) == markers["B"]
