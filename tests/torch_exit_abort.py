"""torch's own abort at interpreter exit after its inter-op pool ran ``torch.jit.fork`` calls.

Under plain python, 1-3 runs in 16 of such a program end with ``terminate called without an
active exception`` (SIGABRT) after printing everything (torch 2.13.0+cpu, CPython 3.11, measured
2026-12-07): a thread of the pool is still joinable when static destructors run. Tests comparing a
program's run under raceguard with plain python run it again when that abort, and nothing else,
made the difference.
"""

from __future__ import annotations

import subprocess
from typing import Callable, TypeVar

MESSAGE = "terminate called without an active exception"
T = TypeVar("T")


def aborted_at_exit(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode in (-6, 134, 3) and MESSAGE in (proc.stderr or "")


def run_past_torch_exit_abort(run: Callable[[], T], proc_of: Callable[[T], subprocess.CompletedProcess] = lambda r: r,
                              attempts: int = 5) -> T:
    """``run()`` again (up to ``attempts`` times in all) while its process ended in torch's abort at exit."""
    result = run()
    for _ in range(attempts - 1):
        if not aborted_at_exit(proc_of(result)):
            break
        result = run()
    return result
