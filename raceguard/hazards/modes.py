"""Thread-local modes (grad, inference, autocast): what a thread that starts a thread or submits
a work item has set (:class:`_Origin`), which modes a worker set itself, the check at each module
call of the worker, and the ``thread-local-mode`` finding when the worker runs with a mode its
submitter had changed.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from ..report.finding import Access, Finding
from ..capture.stacks import current_site, render_site
from . import _state
from ._state import _orig, _tls
from .reporting import _emit, _internal_error, _module_path


# -- thread-local modes --------------------------------------------------------------------------
_UNSET = object()
# (key, human name, getter, value in a new thread)
_MODES: list[tuple[str, str, Callable[[], bool], bool]] = [
    ("grad", "grad mode", torch.is_grad_enabled, True),
    ("inference", "inference mode", torch.is_inference_mode_enabled, False),
    ("autocast_cpu", "autocast (cpu)", lambda: torch.is_autocast_enabled("cpu"), False),
]
# _is_compiled(), not is_available(): asking the CUDA runtime at import would poison the stress
# fork server's children ("Cannot re-initialize CUDA in forked subprocess").
if torch.cuda._is_compiled():  # pragma: no cover - CPU-only development machine
    _MODES.append(("autocast_cuda", "autocast (cuda)", lambda: torch.is_autocast_enabled("cuda"), False))


class _Origin:
    """Thread-local modes of the thread that started a thread or submitted a work item, kept
    only when some differ from what a new thread starts with."""

    __slots__ = ("modes", "site", "thread", "locks", "how", "reported")

    def __init__(self, modes: list, site: tuple, thread: str, locks: tuple, how: str) -> None:
        self.modes = modes  # [(index into _MODES, value at submission)], non-default only
        self.site = site
        self.thread = thread
        self.locks = locks
        self.how = how
        self.reported = False


def _set_explicitly(*keys: str) -> None:
    """The calling thread set these modes itself (``no_grad``, ``enable_grad``, ``autocast``,
    ``inference_mode``...): from then on its choice, not its submitter's, is what counts."""
    explicit = getattr(_tls, "explicit", None)
    if explicit is None:
        explicit = _tls.explicit = set()
    explicit.update(keys)


# The three setters are hook boundaries: whatever noting the mode raises is counted (the thread's
# own choice is lost, so a thread-local-mode warning may follow), the setter runs as it would.
def _set_grad_enabled(mode: Any) -> Any:
    try:
        _set_explicitly("grad")
    except Exception as exc:
        _internal_error(_state._session, "noting a grad mode set", exc)
    return _orig["torch._C._set_grad_enabled"](mode)


def _set_autocast_enabled(*args: Any, **kwargs: Any) -> Any:
    try:
        device = args[0] if args and isinstance(args[0], str) else kwargs.get("device_type", "cuda")
        _set_explicitly(f"autocast_{device}")
    except Exception as exc:
        _internal_error(_state._session, "noting an autocast mode set", exc)
    return _orig["torch.set_autocast_enabled"](*args, **kwargs)


def _inference_mode_enter(self: Any) -> Any:
    try:
        _set_explicitly("inference", "grad")
    except Exception as exc:
        _internal_error(_state._session, "noting an inference mode set", exc)
    return _orig["inference_mode.__enter__"](self)


def _check_modes(s: Any, state: Any, origin: _Origin, module: Any) -> None:
    differ = []
    explicit = getattr(_tls, "explicit", None) or ()
    for i, value in origin.modes:
        key, name, get, default = _MODES[i]
        if key in explicit:
            continue  # the worker chose this mode itself (e.g. torch.enable_grad() inside it)
        now = bool(get())
        # Only a mode the worker left at a new thread's default: a mode still set from earlier
        # work of a reused pool thread is not its submitter's concern.
        if now == default and now != value:
            differ.append((name, value, now))
    if not differ:
        return
    origin.reported = True
    _report_mode_mismatch(s, state, origin, module, differ)


def _mode_phrase(name: str, value: bool) -> str:
    return f"{name} {'enabled' if value else 'disabled'}"


def _report_mode_mismatch(s: Any, state: Any, origin: _Origin, module: Any, differ: list) -> None:
    site = current_site(1)
    path, _ = _module_path(s, module)
    submitter = Access(
        thread=origin.thread,
        timeline=f"thread:{origin.thread}",
        mode="write",
        op=f"{'Thread.start()' if origin.how == 'start' else 'executor.submit()'} with "
        + ", ".join(_mode_phrase(n, v) for n, v, _ in differ),
        locks_held=[s.lock_name(lk) for lk in origin.locks],
        stack=render_site(origin.site),
    )
    worker = Access(
        thread=state.name,
        timeline=f"thread:{state.name}",
        mode="read",
        op=f"{type(module).__name__}.__call__ with " + ", ".join(_mode_phrase(n, now) for n, _, now in differ),
        locks_held=[s.lock_name(lk) for lk in state.locks],
        stack=render_site(site),
        origin=s.render_origin(state.origin),
    )
    names = ", ".join(n for n, _, _ in differ)
    verb = "started" if origin.how == "start" else "submitted"
    where = _first_user_line(submitter)
    message = (
        f"{path} ran in thread '{worker.thread}' with "
        + ", ".join(_mode_phrase(n, now) for n, _, now in differ)
        + f", but its work was {verb} by '{submitter.thread}'"
        + (f" at {where}" if where else "")
        + " with "
        + ", ".join(_mode_phrase(n, v) for n, v, _ in differ)
        + (f": {names} is thread-local and does not" if len(differ) == 1 else f": {names} are thread-local and do not")
        + " follow work into other threads"
    )
    entered = [_MODE_CONTEXT.get(n, n) for n, v, _ in differ]
    finding = Finding(
        kind="thread-local-mode",
        severity="warning",
        resource=f"{path}.forward",
        resource_kind="module-attribute",
        message=message,
        accesses=[submitter, worker],
        hint=f"enter {' / '.join(entered)} inside the worker function (thread-local modes are not inherited)",
        details={"modes": {n: {"submitter": v, "worker": now} for n, v, now in differ}},
    )
    _emit(s, finding)


_MODE_CONTEXT = {
    "grad mode": "torch.no_grad()",
    "inference mode": "torch.inference_mode()",
    "autocast (cpu)": "torch.autocast('cpu')",
    "autocast (cuda)": "torch.autocast('cuda')",
}


def _first_user_line(a: Access) -> str | None:
    for f in a.stack:
        if f.user:
            return f"{os.path.basename(f.file)}:{f.line}"
    return None
