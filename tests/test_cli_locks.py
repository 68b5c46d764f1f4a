"""Lock-order cycles and real deadlocks through the public CLI.

Cycle fixtures mark each edge's acquisition line with ``# EDGE: held->taken``; deadlock fixtures
mark each blocked thread's waiting line with ``# WAIT: <thread name>``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raceguard.report.document import Report
from raceguard.report.text import render_text
from test_cli_fixtures import FIXTURES, _expectation, _innermost_user_line, run_check

LOCKS = FIXTURES / "locks"


def _marks(path: Path, tag: str) -> dict[str, int]:
    found = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        m = re.search(rf"#\s*{tag}:\s*(\S+)", line)
        if m:
            found[m.group(1)] = number
    return found


CYCLES = ["inversion", "three_lock_cycle", "condition_rlock_cycle"]
DEADLOCKS = ["real_deadlock", "self_deadlock", "join_while_holding", "queue_forever"]
CLEAN = ["consistent_order", "gate_lock", "rlock_reentry"]


@pytest.mark.parametrize("name", CYCLES)
def test_lock_order_cycle_is_reported_from_a_run_that_did_not_deadlock(name: str, tmp_path: Path) -> None:
    path = LOCKS / f"{name}.py"
    kind, expected = _expectation(path)
    locks = set(expected.split())
    proc, report = run_check(path, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert report["target_exit_code"] == 0
    [finding] = report["findings"]
    assert finding["kind"] == kind == "lock-order-cycle"
    assert finding["resource_kind"] == "lock"
    assert set(finding["details"]["cycle"]) == locks
    edges = _marks(path, "EDGE")
    assert len(finding["accesses"]) == len(edges) == len(locks)
    got = {}
    for access in finding["accesses"]:
        assert access["mode"] == "acquire"
        held = access["details"]["while_holding"].split(" (")[0]
        taken = access["details"]["lock"].split(" (")[0]
        got[f"{held}->{taken}"] = _innermost_user_line(access, path)
        assert access["locks_held"][0].split(" (")[0] == held
    assert got == edges
    # The picture a person reads at once: "a → b (file:line) → a (file:line)".
    text = render_text(Report.from_dict(report))
    picture = next(line for line in text.splitlines() if line.strip().startswith("cycle:"))
    first = finding["details"]["cycle"][0]
    assert picture.strip().startswith(f"cycle: {first} → ")
    assert picture.count("→") == len(locks)
    assert f"{path.name}:" in picture


@pytest.mark.parametrize("name", DEADLOCKS)
def test_real_deadlock_is_reported_instead_of_hanging(name: str, tmp_path: Path) -> None:
    path = LOCKS / f"{name}.py"
    kind, expected = _expectation(path)
    proc, report = run_check(path, tmp_path, "--timeout", "60")
    assert proc.returncode == 1, proc.stderr
    # Ended by raceguard's deadlock detection, not by --timeout (that outcome would be "timeout"):
    # no wall-clock bound, which a loaded machine exceeds.
    assert report["target_outcome"]["kind"] == "deadlock"
    assert report["target_exit_code"] is None
    deadlocks = [f for f in report["findings"] if f["kind"] == "deadlock"]
    assert len(deadlocks) == 1, report["findings"]
    finding = deadlocks[0]
    waits = _marks(path, "WAIT")
    got = {a["thread"]: _innermost_user_line(a, path) for a in finding["accesses"]}
    assert got == waits
    assert all(a["mode"] == "wait" for a in finding["accesses"])
    for lock in (expected or "").split():
        assert any(lock in a["details"]["waits_for"] or any(lock in h for h in a["locks_held"]) for a in finding["accesses"])


@pytest.mark.parametrize("name", CLEAN)
def test_consistent_locking_is_clean(name: str, tmp_path: Path) -> None:
    path = LOCKS / f"{name}.py"
    assert _expectation(path)[0] == "clean"
    proc, report = run_check(path, tmp_path)
    assert report["findings"] == [], [f["message"] for f in report["findings"]]
    assert proc.returncode == 0
