"""A lock's name in reports is the same whenever the report is made: its name in the script's
globals, else the variable its creation line assigns (``lock = threading.Lock()``), else its type.
It never depends on whether the frame that holds the lock is still running (that is timing: the
thread that made the lock may or may not have ended when a race on its data is reported)."""

from __future__ import annotations

from raceguard.capture.naming import assigned_name
from raceguard.capture.session import Session
from raceguard.capture.stacks import current_site


class TrackedLock:
    """What naming reads of an instrumented lock: where it was made, and its kind."""

    _rg_kind = "Lock"

    def __init__(self, site: tuple) -> None:
        self._rg_site = site


def _session(main_globals: dict) -> Session:
    return Session(lambda event: None, main_globals=lambda: main_globals)


def test_a_local_lock_is_named_the_same_while_its_frame_runs_and_after_it_returned() -> None:
    session = _session({})
    seen = {}

    def worker() -> TrackedLock:
        worker_lock = TrackedLock(current_site(0))
        seen["while running"] = session.lock_name(worker_lock)
        return worker_lock

    made = worker()
    line = worker.__code__.co_firstlineno + 1
    assert seen["while running"] == session.lock_name(made) == f"worker_lock (test_lock_names.py:{line})"


def test_a_lock_in_the_scripts_globals_is_named_by_the_global_and_one_without_a_variable_by_its_type() -> None:
    class Server:
        def __init__(self) -> None:
            self.lock = TrackedLock(current_site(0))

    server = Server()
    assert _session({"server": server}).lock_name(server.lock).startswith("server.lock (")
    assert _session({}).lock_name(server.lock).startswith("self.lock (")
    anonymous = [TrackedLock(current_site(0))]
    assert _session({}).lock_name(anonymous[0]).startswith("Lock (test_lock_names.py:")


def _make_lock() -> TrackedLock:
    return TrackedLock(current_site(0))


def test_a_lock_made_by_a_factory_of_the_programs_is_named_where_the_factory_is_called() -> None:
    cache_lock = _make_lock()
    assert _session({}).lock_name(cache_lock).startswith("cache_lock (test_lock_names.py:")


def test_only_a_one_line_assignment_of_a_call_names_a_lock(tmp_path) -> None:
    source = tmp_path / "program.py"
    source.write_text(
        "lock = threading.Lock()\n"
        "self._lock: Lock = threading.RLock()\n"
        "a, b = threading.Lock(), threading.Lock()\n"
        "locks = [threading.Lock() for _ in range(2)]\n"
        "x = y = threading.Lock()\n"
        "run(threading.Lock())\n"
        "locks[0] = threading.Lock()\n"
        "big = threading.Lock(\n"
    )
    names = [assigned_name(str(source), line) for line in range(1, 9)]
    assert names == ["lock", "self._lock", None, None, None, None, None, None]
