"""The ``why:`` line of a race in the program's terms: which two lines nothing orders, and which
synchronisation is missing between them.

The engines explain a race with vector clocks ("had synchronised with 'scale' only up to that
thread's epoch 1, and the write happened in epoch 4"): exact, but it speaks of the algorithm, not
of the program. The text report words it from what the finding already holds (the two accesses:
their lines, threads, locks and streams); the clock sentence itself stays in ``details.why`` of
the JSON report and under ``--verbose``.

Pure Python, no torch.
"""

from __future__ import annotations

from raceguard.report.finding import Access, Finding

HOST_SYNC = "no join, queue, event, barrier or future passes from one thread to the other between them"
STREAM_SYNC = "no wait_stream, event record/wait or synchronize between them"


def plain_why(finding: Finding) -> str | None:
    """The why in the program's terms, or None when the finding's own why needs no rewording
    (it does not speak of clocks) or the finding is not a race between two accesses."""
    why = finding.details.get("why")
    if not isinstance(why, str) or "epoch" not in why or len(finding.accesses) != 2:
        return None
    first, second = finding.accesses
    if "launch" in why:  # kernels launched by host threads that nothing orders
        text = (
            f"nothing on the host orders the launch at {_where(first)} before the launch at "
            f"{_where(second)}: {_locks(first, second)}, and {HOST_SYNC}"
        )
        if first.timeline == second.timeline and not _on_host(first):
            text += f"; both kernels ran on {first.timeline} in launch order, which another run can swap"
        return text
    if _on_host(first) and _on_host(second):
        return f"nothing orders {_where(first)} before {_where(second)}: {_locks(first, second)}, and {HOST_SYNC}"
    return f"nothing orders {_where(first)} before {_where(second)}: {STREAM_SYNC}"


def _on_host(access: Access) -> bool:
    return not access.timeline or access.timeline.startswith("thread:")


def _where(access: Access) -> str:
    """``train.py:31 (write, thread 'trainer')``, or ``(read on cuda:0 stream 7, launched by 'main')``."""
    frame = access.user_frame
    if frame is not None:
        line = f"{frame.file.replace(chr(92), '/').rsplit('/', 1)[-1]}:{frame.line}"
    else:
        line = access.op or "an unknown line"
    if _on_host(access):
        return f"{line} ({access.mode}, thread {access.thread!r})"
    return f"{line} ({access.mode} on {access.timeline}, launched by thread {access.thread!r})"


def _locks(first: Access, second: Access) -> str:
    """What the two accesses' locks did not do: ``they hold different locks (A in 'x', B in 'y')``."""
    a, b = first.locks_held, second.locks_held
    if not a and not b:
        return "neither holds a lock"
    same_name = set(a) & set(b)
    if same_name:  # one lock object would have ordered them: these are two made at the same place
        return f"they hold different locks made at the same place ({', '.join(sorted(same_name))})"
    if a and b:
        return f"they hold different locks ({', '.join(a)} in {first.thread!r}, {', '.join(b)} in {second.thread!r})"
    holder, held, other = (first, a, second) if a else (second, b, first)
    return f"only {holder.thread!r} holds a lock ({', '.join(held)}), {other.thread!r} none"
