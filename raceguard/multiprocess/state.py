"""What one checked process keeps for the cross-process happens-before (``session.multiprocess``)."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from . import handoffs
from .clocks import ProcessClocks
from .shared import SharedAccesses


class Multiprocess:
    def __init__(self, session: Any, send: Callable[[dict], None], label: Callable[[], str | None], directory: str | None) -> None:
        self.session = session
        self.dir = directory
        self.clocks = ProcessClocks(session)
        self.shared = SharedAccesses(session, self.clocks, send, label)

    def process_ends(self, session: Any) -> None:
        """``Process._bootstrap`` returned here (a forked child ``os._exit``s next): leave the
        clock for ``join()``, and the statistics for the report."""
        try:
            with session.lock:
                self.shared.flush()
                clock = self.clocks.export(session.current().tid)
            if self.dir:
                path = os.path.join(self.dir, f"exit-{os.getpid()}.json")
                with open(path + ".tmp", "w") as f:
                    json.dump(clock, f)
                os.replace(path + ".tmp", path)
            self.shared._send({"type": "stats", "stats": session.stats()})
        except Exception as exc:
            session.hook_failed("ending a multiprocessing child", exc)

    def flush(self) -> None:
        """Send the shared-storage accesses held back (the process ends, or a heartbeat)."""
        session = self.session
        try:
            with session.lock:
                self.shared.flush()
        except Exception as exc:
            session.hook_failed("sending accesses to shared storages", exc)

    def after_fork_in_parent(self) -> None:
        """What the forking thread does next is not what the child inherited."""
        session = self.session
        with session.lock:
            session.hb._tick(session.current().tid)

    def after_fork_in_child(self, send: Callable[[dict], None]) -> None:
        session = self.session
        with session.lock:
            self.clocks.after_fork_in_child(session.current())
            self.shared.reset()
            self.shared.send = send
            session.ops = 0


def install(session: Any, send: Callable[[dict], None], label: Callable[[], str | None], directory: str | None) -> Multiprocess:
    """Model ``multiprocessing``'s hand-offs and stream shared-storage accesses with ``send``."""
    handoffs.install()
    mp = session.multiprocess = Multiprocess(session, send, label, directory)
    session.shared_access = mp.shared
    return mp
