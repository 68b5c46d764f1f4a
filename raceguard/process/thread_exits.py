"""Before the checked interpreter finalizes: wait (bounded) until threads that ended are gone.

A thread's Python code ends before the thread does: C++ thread-local destructors run after it.
torch keeps Python objects in such thread-locals: the first thread to import
``torch._inductor.cudagraph_trees`` (for instance the first to run a ``torch.compile``'d
function) holds two of them, and its destructor takes the GIL to release them. If the main thread
is finalizing the interpreter by then, CPython ends that thread with a forced unwind, which the
destructor cannot pass: "terminate called without an active exception", SIGABRT, after the
program printed everything. Plain python loses that race now and then (torch 2.13.0+cpu: 1 run in
10 of a compiled trainer beside another compiling process, measured 2026-12-08); raceguard's own
work at a thread's end made it 3-5 in 10 under its Python mode. Waiting here, with the GIL
released, for each ended thread to leave ``/proc/self/task`` closes the window under either mode.
"""

from __future__ import annotations

import os
import threading
from time import monotonic, sleep  # bound now: a target that patches time.sleep does not slow this
from typing import Iterable

TASKS = "/proc/self/task"
# Ample for a thread's thread-local destructors (microseconds; a Python __del__ they run may take
# longer on a loaded machine), short enough that a thread id the kernel reused for a thread that
# lives on costs the exit little.
LIMIT_S = 1.0
POLL_S = 0.001


def _present(native_id: int) -> bool:
    return os.path.exists(f"{TASKS}/{native_id}")


def wait_until_gone(native_ids: Iterable[int], limit_s: float = LIMIT_S) -> int:
    """Wait at most ``limit_s`` for the threads ``native_ids`` (ended ones) to leave the process;
    how many were still there. Ids of threads still running Python code are not waited for."""
    if not os.path.isdir(TASKS):
        return 0
    running = {t.native_id for t in threading.enumerate()}
    pending = [n for n in set(native_ids) if n not in running and n != os.getpid() and _present(n)]
    deadline = monotonic() + limit_s
    while pending and monotonic() < deadline:
        sleep(POLL_S)  # releases the GIL, which those destructors take
        pending = [n for n in pending if _present(n)]
    return len(pending)
