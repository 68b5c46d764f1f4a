"""``--preempt lines``: a scheduling point before every line of the target's own code.

Python 3.11 has no ``sys.monitoring``: a trace function is installed in every managed thread
(``sys.settrace`` here, ``threading.settrace`` for threads started later). It traces only frames
whose code is the target's own (library and raceguard frames return no local tracer, so they run
at full speed) and takes a scheduling point on each ``line`` event. This finds check-then-act
bugs on plain Python state with no tensor op or lock in the window (``self.n += 1`` in two
threads), at the price of many more scheduling points (a larger PCT step estimate).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from ..capture.stacks import USER, classify_code


def install_line_preemption(sched: Any) -> None:
    def local_trace(frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            t = sched.current()
            if t is not None and not t.nest:
                sched.point(t)
        return local_trace

    def global_trace(frame: Any, event: str, arg: Any) -> Any:
        if event != "call" or classify_code(frame.f_code) != USER:
            return None
        return local_trace

    threading.settrace(global_trace)
    sys.settrace(global_trace)
