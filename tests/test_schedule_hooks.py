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
