"""Counting the statistics that travel with a finding may report more findings.

With the native recorder, ``Session.stats()`` first applies the ops the recorder still holds,
and one of them can complete a race: that report emits again (and takes the session's lock,
which another thread may hold while it waits to emit). So the statistics are counted outside
the emit lock; counted inside, a thread exception reported while two threads' racing ops were
still held hung the target for good (``raceguard check`` then ended it by --timeout)."""

from __future__ import annotations

import threading

from raceguard.capture.session import Session


def test_a_finding_reported_while_the_statistics_are_counted_does_not_hang_the_reporter() -> None:
    events: list[dict] = []
    session = Session(events.append, main_globals=lambda: {})
    counted = session.stats

    def stats_that_complete_a_race() -> dict:
        session.stats = counted
        session.emit({"type": "finding", "finding": {"kind": "data-race"}})
        return counted()

    session.stats = stats_that_complete_a_race
    reporter = threading.Thread(
        target=session.emit, args=({"type": "finding", "finding": {"kind": "thread-exception"}},), daemon=True
    )
    reporter.start()
    reporter.join(timeout=10)
    assert not reporter.is_alive(), "the reporting thread waits for the emit lock it holds"
    kinds = [e["finding"]["kind"] if e["type"] == "finding" else e["type"] for e in events]
    assert kinds == ["thread-exception", "data-race", "stats", "stats"]
