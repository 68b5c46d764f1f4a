"""raceguard.yield_point(): a no-op without a scheduler, a scheduling point with one."""

from __future__ import annotations

import subprocess
import sys

import raceguard
from raceguard.schedule import hooks


def test_yield_point_is_a_no_op_without_a_scheduler():
    assert hooks.yield_hook is None
    raceguard.yield_point()


def test_yield_point_calls_the_scheduler_hook():
    calls = []
    hooks.yield_hook = lambda: calls.append(1)
    try:
        raceguard.yield_point()
        raceguard.yield_point()
    finally:
        hooks.yield_hook = None
    assert calls == [1, 1]


def test_importing_raceguard_does_not_import_torch_or_the_scheduler():
    code = "import sys, raceguard; raceguard.yield_point(); print('torch' in sys.modules, 'raceguard.schedule.scheduler' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"]


def test_a_failing_scheduling_point_is_raceguards_error_never_the_targets(monkeypatch):
    """A scheduler failure at a point the target's own call takes (a lock operation, time.sleep,
    yield_point()) is counted on the session; the call returns as it would."""
    from types import SimpleNamespace

    from raceguard.capture import session as session_mod
    from raceguard.sync._common import _sync_point
    from raceguard.schedule.watchdog import virtual_sleep, yield_hook

    thread = SimpleNamespace(nest=0)

    class BrokenScheduler:
        def current(self):
            return thread

        def point(self, t):
            raise RuntimeError("scheduler bug")

        def yield_(self, t, delay=0.0):
            raise RuntimeError("scheduler bug")

    lost = []
    session = SimpleNamespace(hook_failed=lambda what, exc, ordering=False: lost.append((what, str(exc))))
    monkeypatch.setattr(session_mod, "ACTIVE", session)
    sched = BrokenScheduler()
    _sync_point(sched, thread)
    assert virtual_sleep(sched)(0.5) is None
    assert yield_hook(sched)() is None
    assert [what for what, _ in lost] == [
        "taking a scheduling point before a synchronisation",
        "taking a scheduling point in time.sleep",
        "taking a scheduling point in raceguard.yield_point()",
    ]
    assert {exc for _, exc in lost} == {"scheduler bug"}
