"""The Python API: ``raceguard.watch()`` as a context manager and a decorator, in this process.

Every test checks, through the autouse fixture, that the interpreter is left exactly as it was:
the primitives, ``threading.excepthook``, the ``nn.Module`` / ``Optimizer`` constructors, and no
active session. This file is user code for the capture layer, so ``threading.Lock()`` here is
the instrumented one while a block is active.
"""

from __future__ import annotations

import concurrent.futures as cf
import concurrent.futures._base as futures_base
import io
import queue
import re
import runpy
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

import raceguard
from raceguard.api import active_session, untracked_sync_objects
from raceguard.process import install
from raceguard.capture import session as session_mod
from raceguard.config import ConfigError
from raceguard.report.document import Report, validate_report
from raceguard.report.finding import Finding
from raceguard.report.text import render_text

# These tests open their own watch() blocks: opt out when the suite itself runs under --raceguard.
pytestmark = pytest.mark.raceguard(enabled=False)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HERE = Path(__file__).name

_PATCHED = [
    (threading, "Lock"), (threading, "RLock"), (threading, "Condition"), (threading, "Semaphore"),
    (threading, "BoundedSemaphore"), (threading, "Event"), (threading, "Barrier"),
    (threading, "excepthook"), (queue, "Queue"), (queue, "LifoQueue"), (queue, "PriorityQueue"),
    (queue, "SimpleQueue"), (cf, "wait"), (cf, "as_completed"), (futures_base, "wait"),
    (futures_base, "as_completed"), (threading.Thread, "start"), (threading.Thread, "join"),
    (threading.Thread, "_bootstrap_inner"), (futures_base.Future, "result"),
    (futures_base.Future, "set_result"), (torch.nn.Module, "__init__"), (torch.optim.Optimizer, "__init__"),
]


def _current() -> dict:
    return {(owner.__name__, attr): owner.__dict__[attr] for owner, attr in _PATCHED}


@pytest.fixture(autouse=True)
def pristine():
    before = _current()
    assert session_mod.ACTIVE is None
    yield before
    after = _current()
    changed = [key for key in before if before[key] is not after[key]]
    assert not changed, f"left patched: {changed}"
    assert session_mod.ACTIVE is None, "a session was left active"


@pytest.fixture
def plain_primitives():
    """For tests about installing and restoring the primitives: not under ``pytest --raceguard``,
    which keeps the instrumented primitives installed for the whole run."""
    if install.primitives_installed():
        pytest.skip("the instrumented primitives are held installed (pytest --raceguard)")


# -- helpers -------------------------------------------------------------------------------------


def writer_a(t, lock=None):
    for _ in range(3):
        if lock is None:
            t.add_(1)  # LINE_A
        else:
            with lock:
                t.add_(1)


def writer_b(t, lock=None):
    for _ in range(3):
        if lock is None:
            t.mul_(2)  # LINE_B
        else:
            with lock:
                t.mul_(2)


def run_pair(t, lock=None, names=("writer-a", "writer-b")):
    threads = [
        threading.Thread(target=writer_a, args=(t, lock), name=names[0]),
        threading.Thread(target=writer_b, args=(t, lock), name=names[1]),
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def line_of(marker: str) -> int:
    for number, line in enumerate(Path(__file__).read_text().splitlines(), start=1):
        if line.rstrip().endswith(f"# {marker}"):
            return number
    raise AssertionError(marker)


def warning_finding() -> dict:
    # No capture produces warning-severity findings yet (shared-rng / thread-local-mode are
    # planned); inject one through the session's sink to check the fail_on threshold.
    finding = Finding(
        kind="shared-rng",
        severity="warning",
        resource="torch default generator",
        resource_kind="rng",
        message="default generator drawn from by several threads",
        accesses=[],
    )
    return {"type": "finding", "finding": finding.to_dict()}


# -- the context manager -------------------------------------------------------------------------


def test_with_block_reports_race_with_both_lines():
    with raceguard.watch() as session:  # ENTER
        t = torch.zeros(3)  # ALLOC
        run_pair(t)
    assert isinstance(session, raceguard.WatchSession)
    assert not session.active
    [finding] = session.findings
    assert isinstance(finding, Finding)
    assert finding.kind == "data-race" and finding.severity == "error"
    assert finding.resource == f"tensor float32[3] allocated at {HERE}:{line_of('ALLOC')}"
    assert sorted(a.thread for a in finding.accesses) == ["writer-a", "writer-b"]
    lines = {a.user_frame.line for a in finding.accesses}
    assert lines == {line_of("LINE_A"), line_of("LINE_B")}
    # Same fields as the JSON contract.
    assert Finding.from_dict(finding.to_dict()) == finding

    report = session.report()
    assert isinstance(report, Report)
    document = report.to_dict()
    validate_report(document)
    assert document["command"] == "check" and document["status"] == "findings"
    [target] = document["target"]
    assert target.endswith(f"{HERE}:{line_of('ENTER')}")
    assert document["stats"]["threads"] == 3 and document["stats"]["ops"] > 0
    assert document["target_exit_code"] == 0


def test_assert_clean_message_is_the_text_report():
    with raceguard.watch() as session:
        run_pair(torch.zeros(3))
    with pytest.raises(raceguard.RaceError) as caught:
        session.assert_clean()
    error = caught.value
    assert isinstance(error, AssertionError)  # test runners show it as a failure
    assert str(error) == render_text(session.report()).rstrip("\n")
    assert error.findings == session.findings and error.fail_on == "error"
    text = str(error)
    assert text.startswith("WARNING: raceguard: data race on tensor float32[3]")
    assert f"{HERE}:{line_of('LINE_A')}" in text and f"{HERE}:{line_of('LINE_B')}" in text
    assert "raceguard: 1 finding (1 data-race)" in text


def test_locked_block_is_clean():
    with raceguard.watch() as session:
        lock = threading.Lock()
        run_pair(torch.zeros(3), lock)
    assert session.findings == []
    session.assert_clean()
    assert session.report().status() == "clean"


def test_findings_so_far_while_active_and_clear():
    with raceguard.watch() as session:
        assert session.active and session.findings == []
        assert active_session() is session
        run_pair(torch.zeros(3))
        assert [f.kind for f in session.findings] == ["data-race"]
        with pytest.raises(raceguard.RaceError):
            session.assert_clean()
        taken = session.clear()
        assert [f.kind for f in taken] == ["data-race"]
        session.assert_clean()
    assert active_session() is None
    assert session.findings == [] and session.report().findings == []


def test_primitives_restored_even_when_the_block_raises(pristine, plain_primitives):
    original_lock = threading.Lock
    with pytest.raises(ValueError, match="boom"):
        with raceguard.watch() as session:
            assert threading.Lock is not original_lock
            assert install.primitives_installed()
            run_pair(torch.zeros(3))
            raise ValueError("boom")
    assert threading.Lock is original_lock
    assert not install.primitives_installed()
    # The calling thread's dispatch mode was exited: ops here are not recorded any more.
    ops = session.report().stats["ops"]
    torch.ones(2).add_(1)
    assert session.report().stats["ops"] == ops
    outcome = session.report().target_outcome
    assert outcome["kind"] == "exception" and "ValueError: boom" in outcome["detail"]
    assert [f.kind for f in session.findings] == ["data-race"]


def test_excepthook_set_before_the_block_is_restored(plain_primitives):
    seen = []

    def hook(args):
        seen.append(args.exc_type)

    previous = threading.excepthook
    threading.excepthook = hook
    try:
        with raceguard.watch():
            pass
        assert threading.excepthook is hook
        with raceguard.watch() as session:  # a second block: restores the same hook again
            t = threading.Thread(target=lambda: 1 / 0, name="crasher")
            t.start()
            t.join()
        assert threading.excepthook is hook
        assert seen == [ZeroDivisionError]  # the program's hook still ran
        assert [f.kind for f in session.findings] == ["thread-exception"]
    finally:
        threading.excepthook = previous


def test_primitives_made_inside_work_after_the_block_and_stop_reporting():
    with raceguard.watch() as session:
        lock = threading.Lock()
        rlock = threading.RLock()
        cond = threading.Condition()
        event = threading.Event()
        q = queue.Queue()
    assert type(lock).__name__ == "TrackedLock"
    with lock:
        assert lock.locked()
    with rlock, rlock:
        pass
    with cond:
        cond.notify_all()
    q.put(1)
    assert q.get() == 1
    event.set()
    assert event.wait(0)
    # Racing after the block is not recorded.
    run_pair(torch.zeros(3))
    assert session.findings == []


def test_lock_from_an_earlier_block_orders_a_later_one():
    with raceguard.watch():
        lock = threading.Lock()
        run_pair(torch.zeros(3), lock)
    with raceguard.watch() as session:
        run_pair(torch.zeros(3), lock)
    assert session.findings == []


def test_clock_carried_over_by_a_lock_does_not_hide_a_race():
    # Block 1 leaves the lock's clock saying "timeline 1 is at epoch 4". Block 2's timeline 1 is
    # another thread; joining that stale clock would order its write before main's read.
    with raceguard.watch():
        lock = threading.Lock()
        run_pair(torch.zeros(3), lock)
    with raceguard.watch() as session:
        with lock:
            pass
        t = torch.zeros(3)
        worker = threading.Thread(target=lambda: t.add_(1), name="late-writer")
        worker.start()
        while worker.is_alive():  # waits without synchronising
            time.sleep(0.001)
        t.sum()
        worker.join()
    assert [f.kind for f in session.findings] == ["data-race"]


def test_threads_started_before_the_block_are_not_watched():
    t = torch.zeros(3)
    go = threading.Event()
    done = threading.Event()

    def early():
        go.wait()
        t.add_(1)
        done.set()

    worker = threading.Thread(target=early, name="early")
    worker.start()
    with raceguard.watch() as session:
        go.set()
        done.wait()
        t.add_(1)
    worker.join()
    assert session.findings == []


def test_modules_are_named_from_globals_and_locals():
    with raceguard.watch() as session:
        model = torch.nn.Linear(4, 2)
        reader_out = []

        def train():
            with torch.no_grad():
                model.weight.add_(1)

        def read():
            reader_out.append(model.weight.clone())

        threads = [threading.Thread(target=train, name="trainer"), threading.Thread(target=read, name="reader")]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    [finding] = session.findings
    assert (finding.resource, finding.resource_kind) == ("model.weight", "parameter")


# -- the decorator -------------------------------------------------------------------------------


def test_decorator_raises_after_the_call():
    calls = []

    @raceguard.watch(fail_on="error")
    def racy(x):
        calls.append(x)
        run_pair(torch.zeros(3))
        return x * 2

    with pytest.raises(raceguard.RaceError) as caught:
        racy(21)
    assert calls == [21]
    assert racy.__name__ == "racy"
    assert racy.last_session.findings == caught.value.findings
    assert racy.last_session.report().target == [f"{__name__}.{racy.__qualname__}"]


def test_decorator_without_parentheses_returns_the_value():
    @raceguard.watch
    def clean(x):
        run_pair(torch.zeros(3), threading.Lock())
        return x * 2

    assert clean(21) == 42
    assert clean.last_session.findings == []
    first = clean.last_session
    assert clean(1) == 2
    assert clean.last_session is not first  # a new session per call


def test_decorator_propagates_the_function_exception():
    @raceguard.watch()
    def fails():
        run_pair(torch.zeros(3))
        raise KeyError("mine")

    with pytest.raises(KeyError):
        fails()
    assert [f.kind for f in fails.last_session.findings] == ["data-race"]


def test_decorator_refuses_async_and_generators():
    async def coroutine():
        pass

    def generator():
        yield 1

    with pytest.raises(TypeError, match="async"):
        raceguard.watch()(coroutine)
    with pytest.raises(TypeError, match="generator"):
        raceguard.watch()(generator)


# -- options -------------------------------------------------------------------------------------


def test_fail_on_warning_vs_error():
    with raceguard.watch() as default:
        default._sink(warning_finding())
    assert [f.severity for f in default.findings] == ["warning"]
    default.assert_clean()  # a warning does not fail at fail_on="error"
    with raceguard.watch(fail_on="warning") as strict:
        strict._sink(warning_finding())
    with pytest.raises(raceguard.RaceError, match="random generator torch default generator"):
        strict.assert_clean()


def test_suppressions_as_lines_and_file(tmp_path):
    with raceguard.watch(suppressions=["data-race:writer_a"]) as session:
        run_pair(torch.zeros(3))
    assert session.findings == []
    [suppressed] = session.suppressed
    assert suppressed.suppressed.startswith("suppression 'data-race:writer_a'")
    session.assert_clean()
    report = session.report()
    assert report.status() == "clean" and len(report.suppressed) == 1
    validate_report(report.to_dict())

    supp = tmp_path / "raceguard.supp"
    supp.write_text("# known\ndata-race:*float32[3]*\n")
    with raceguard.watch(suppressions=supp) as session:
        run_pair(torch.zeros(3))
    assert session.findings == [] and len(session.suppressed) == 1


def test_max_reports_counts_the_rest():
    with raceguard.watch(max_reports=1) as session:
        run_pair(torch.zeros(3))
        run_pair(torch.zeros(4), names=("other-a", "other-b"))
        t = torch.zeros(5)
        threads = [threading.Thread(target=lambda: t.sub_(1)) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert len(session.findings) == 1
    assert session.report().stats["dropped_reports"] >= 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="fail_on"):
        raceguard.watch(fail_on="fatal")
    with pytest.raises(ValueError, match="max_reports"):
        raceguard.watch(max_reports=0)
    with pytest.raises(ConfigError, match="cannot read suppressions"):
        raceguard.watch(suppressions="/nonexistent/raceguard.supp")
    with pytest.raises(ConfigError, match="unknown finding kind"):
        raceguard.watch(suppressions=["data-rance:x"])


# -- one at a time -------------------------------------------------------------------------------


def test_nested_watch_is_an_error():
    with raceguard.watch() as outer:
        with pytest.raises(RuntimeError) as caught:
            with raceguard.watch():
                pass
        assert outer.active
        run_pair(torch.zeros(3))
    message = str(caught.value)
    assert message.startswith(f"raceguard.watch() is already active in thread {threading.current_thread().name!r}")
    assert f"{HERE}:" in message and "nested or concurrent watch() blocks are not supported" in message
    assert [f.kind for f in outer.findings] == ["data-race"]  # the outer block kept working


def test_concurrent_watch_in_another_thread_is_an_error():
    errors = []

    def other():
        try:
            with raceguard.watch():
                pass
        except RuntimeError as exc:
            errors.append(str(exc))

    with raceguard.watch():
        th = threading.Thread(target=other, name="second")
        th.start()
        th.join()
    assert len(errors) == 1 and "already active in thread" in errors[0]


def test_watch_in_a_worker_thread():
    result = {}

    def body():
        with raceguard.watch() as session:
            run_pair(torch.zeros(3))
        result["session"] = session

    th = threading.Thread(target=body, name="driver")
    th.start()
    th.join()
    [finding] = result["session"].findings
    assert finding.kind == "data-race"


def test_untracked_lock_note(plain_primitives):
    namespace = {"plain_lock": threading.Lock(), "plain_event": threading.Event(), "x": 1}
    assert untracked_sync_objects(namespace) == ["plain_lock", "plain_event"]
    with raceguard.watch() as session:
        tracked = threading.Lock()
    assert untracked_sync_objects({"tracked": tracked}) == []
    assert session.untracked_note() is None


# -- the documented example ----------------------------------------------------------------------


def test_watch_example_runs_as_documented():
    out = io.StringIO()
    with redirect_stdout(out):
        runpy.run_path(str(EXAMPLES / "watch_example.py"), run_name="__main__")
    text = out.getvalue()
    assert text.startswith("data-race model.weight ['reader', 'trainer']\n")
    assert "WARNING: raceguard: data race on parameter model.weight" in text
    assert re.search(r"read by thread 'reader' \(aten::clone\)", text)
    assert text.rstrip().endswith("locked version: clean")


# -- raceguard.process.install -------------------------------------------------------------------


def _scoped_session():
    return install.ScopedSession(lambda event: None)


def test_install_hold_keeps_primitives_across_activations(plain_primitives):
    original = threading.Lock
    install.hold_primitives()
    try:
        assert install.primitives_installed()
        module_level = threading.Lock()  # like a test module's lock, made before any session
        handle = install.activate(_scoped_session())
        install.deactivate(handle)
        assert install.primitives_installed() and threading.Lock is not original
        with module_level:
            pass
    finally:
        install.release_primitives()
    assert threading.Lock is original and not install.primitives_installed()
    install.release_primitives()  # unbalanced release: ignored


def test_install_hold_taken_while_active_is_handed_over(plain_primitives):
    original = threading.Lock
    handle = install.activate(_scoped_session())
    install.hold_primitives()
    install.deactivate(handle)
    assert threading.Lock is not original  # the hold keeps them
    install.release_primitives()
    assert threading.Lock is original


def test_install_one_session_at_a_time():
    first = _scoped_session()
    handle = install.activate(first)
    try:
        with pytest.raises(install.AlreadyActiveError) as caught:
            install.activate(_scoped_session())
        assert caught.value.active is first
    finally:
        install.deactivate(handle)
    install.deactivate(handle)  # idempotent


def test_install_deactivate_from_another_thread_undoes_the_rest():
    session = _scoped_session()
    handle = install.activate(session)
    errors = []

    def other():
        try:
            install.deactivate(handle)
        except RuntimeError as exc:
            errors.append(str(exc))

    th = threading.Thread(target=other)
    th.start()
    th.join()
    try:
        assert errors and "thread that entered it" in errors[0]
        assert session_mod.ACTIVE is None
    finally:
        handle.state.mode.__exit__(None, None, None)  # what only this thread can do


def test_race_error_pickles():
    import pickle

    with raceguard.watch() as session:
        run_pair(torch.zeros(3))
    with pytest.raises(raceguard.RaceError) as caught:
        session.assert_clean()
    copy = pickle.loads(pickle.dumps(caught.value))
    assert str(copy) == str(caught.value) and copy.findings == caught.value.findings


def test_thread_not_started_by_threading_can_use_primitives():
    # Such a thread (execnet's under pytest-xdist, a C extension's) has no Thread object until
    # threading.current_thread() makes a _DummyThread, whose __init__ sets an instrumented Event.
    import _thread

    done = _thread.allocate_lock()
    done.acquire()
    errors = []

    def raw(event):
        try:
            event.set()
            with threading.Lock():
                pass
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc)[:200])
        finally:
            done.release()

    with raceguard.watch():
        event = threading.Event()
        _thread.start_new_thread(raw, (event,))
        done.acquire()
    assert errors == [] and event.is_set()


# -- deadlocks in watched code -------------------------------------------------------------------


def _wait_for(predicate, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_everyone_blocked_in_a_watched_block_is_a_deadlock_reported_while_it_hangs(capfd):
    # A block entered in a helper thread joins a worker that waits on a queue nobody fills: both
    # block for good. raceguard reports it after its 2 s grace; the test then unblocks them.
    import queue

    box: dict = {}
    work: "queue.Queue" = None  # type: ignore[assignment]
    created = threading.Event()

    def watched():
        nonlocal work
        with raceguard.watch() as session:
            box["session"] = session
            work = queue.Queue()
            created.set()
            worker = threading.Thread(target=work.get, name="consumer", daemon=True)
            worker.start()
            worker.join()  # WAIT: joins a thread that waits forever

    helper = threading.Thread(target=watched, name="watcher", daemon=True)
    helper.start()
    assert created.wait(10)
    assert _wait_for(lambda: any(f.kind == "deadlock" for f in box["session"].findings)), box["session"].findings
    [finding] = [f for f in box["session"].findings if f.kind == "deadlock"]
    assert {a.thread for a in finding.accesses} == {"watcher", "consumer"}
    assert "raceguard: deadlock in" in capfd.readouterr().err
    work.put(None)  # untangle: the worker returns, the join returns, the block ends
    helper.join(10)
    assert not helper.is_alive()


def test_a_lock_order_deadlock_in_a_watched_block_is_reported_at_once(capfd):
    with raceguard.watch() as session:
        a, b = threading.Lock(), threading.Lock()
        both = threading.Barrier(2)

        def one():
            a.acquire()  # released by the test below, to untangle the deadlock
            both.wait()
            with b:
                pass

        def two():
            with b:
                both.wait()
                with a:
                    pass

        threads = [threading.Thread(target=f, name=f.__name__, daemon=True) for f in (one, two)]
        for t in threads:
            t.start()
        assert _wait_for(lambda: any(f.kind == "deadlock" for f in session.findings), 10)
        a.release()  # a plain Lock may be released by any thread: 'two' goes on, then 'one'
        for t in threads:
            t.join(10)
    err = capfd.readouterr().err
    assert "raceguard: deadlock in" in err and "threads 'one' and 'two' are blocked on each other" in err
