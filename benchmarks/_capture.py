"""Install raceguard's capture in this process exactly as ``raceguard check``'s child does.

Newer checkouts route this through :func:`raceguard.process.install.activate`; older ones (and
the brief this benchmark was written to) do it by hand in ``raceguard/process/child.py``: build a
``Session``, track constructions, ``sync.install()``, set ``session.ACTIVE``, ``enter_thread`` on
the main thread. Either way the sink only collects events, so reporting costs nothing.

``install_capture(choose_backend=True)`` also lets ``RACEGUARD_BACKEND`` pick the op capture,
as the checked process does (``raceguard.capture.native.choose``, before activation); the
default keeps the Python dispatch mode whatever the environment says.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Capture:
    session: Any
    state: Any  # the main thread's ThreadState (its dispatch mode is entered)
    events: list = field(default_factory=list)
    _close: Callable[[], None] | None = None
    backend: tuple[str, str] = ("python", "the dispatch mode (no backend was chosen)")

    def drain(self) -> None:
        """Apply the ops the native recorder holds (nothing to do for the dispatch mode)."""
        native = getattr(self.session, "native", None)
        if native is not None:
            native.drain()

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None

    def findings(self) -> int:
        return sum(1 for e in self.events if e.get("type") == "finding")


def noop_mode() -> Any:
    """A TorchDispatchMode that only runs each op: torch's own price of capturing in Python.
    ``_should_skip_dynamo`` returns False, like raceguard's AccessMode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoOpMode(TorchDispatchMode):
        @classmethod
        def _should_skip_dynamo(cls) -> bool:
            return False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    return NoOpMode()


def install_capture(choose_backend: bool = False) -> Capture:
    import torch  # noqa: F401 - the dispatch mode needs torch before the first op

    from raceguard.capture.session import Session

    events: list[dict] = []
    session = Session(
        events.append,
        main_globals=lambda: getattr(sys.modules.get("__main__"), "__dict__", None),
    )
    backend = Capture.backend
    if choose_backend:
        from raceguard.capture import native

        backend = native.choose(session)
    try:
        from raceguard.process.install import activate, deactivate
    except ImportError:
        activate = deactivate = None
    if activate is not None:
        handle = activate(session, thread=threading.main_thread())

        def close_all() -> None:
            deactivate(handle)
            if getattr(session, "native", None) is not None:
                session.native.stop()

        return Capture(session, handle.state, events, close_all, backend)

    from raceguard.process import child as child_mod
    from raceguard.capture import session as session_mod
    from raceguard import sync

    child_mod._track_constructions(session)
    sync.install()
    session_mod.ACTIVE = session
    state = session.enter_thread(threading.main_thread(), None)

    def close() -> None:
        session.leave_thread(state, None)
        session_mod.ACTIVE = None
        sync.uninstall()

    return Capture(session, state, events, close)
