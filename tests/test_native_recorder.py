"""The native recorder: what it records, its bounded buffers, its build cache and its fallback.

The recorder is built once per torch/CPython/source version into the cache (CI builds it before
the tests; otherwise the first test to need it pays ~30 s); without a compiler or on another
CPython these tests skip with the reason the backend gives.
"""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from raceguard.capture import native, torch_ops
from raceguard.capture.rng_ops import device_of, draw_conditions, is_rng_op, rng_generator
from raceguard.capture.native import build
from raceguard.capture.native.backend import NativeBackend
from raceguard.capture.naming import GRAD_INPLACE_OPS, GRAD_RESULT_OPS
from raceguard.capture.session import Session

CAPACITY = (1 << 14, 1 << 15, 1 << 17)


@pytest.fixture(scope="module")
def rec():
    result = build.ensure()
    if result.module is None:
        pytest.skip(f"native recorder unavailable: {result.reason}")
    module = result.module
    module.configure_rng(draw_conditions())  # before install: plans keep what they were built with
    module.configure_grad_ops(sorted(GRAD_RESULT_OPS), sorted(GRAD_INPLACE_OPS))
    module.install(sorted(torch_ops.METADATA_ONLY), sorted(torch_ops.FRESH_INPUT), dict(torch_ops.UNDECLARED_WRITES), *CAPACITY)
    module.drain()
    yield module
    module.pause()
    module.discard()


def _ops(module):
    out = []
    for seq, key, pid, backward, site, accs, outs, param, draw in module.drain():
        name = module.plan(pid)[0]
        out.append((name, key, backward, [(a[1], a[2] & 1, a[5] * a[6], a[7] * a[6]) for a in accs], outs, site))
    return out


def _attached(rec, events=None, drainer=True):
    """A session that the native recorder records for, the calling thread adopted as its main
    thread: (session, backend, that thread's state). ``drainer=False``: no background drain."""
    session = Session(events.append if events is not None else (lambda event: None))
    backend = NativeBackend(rec, CAPACITY)
    if not drainer:
        backend._drain_loop = lambda: None
    backend.attach(session)
    return session, backend, session.adopt_thread(threading.current_thread(), None)


def test_views_in_place_and_out_are_recorded_with_exact_ranges(rec):
    x = torch.zeros(10, 10)
    cd = x.untyped_storage()._cdata
    rec.drain()
    x[2:4].add_(1)
    x[:, 1].mul_(2)
    torch.add(x, 1, out=x)
    ops = {name: accs for name, _, _, accs, _, _ in _ops(rec)}
    assert ops["aten::slice.Tensor"] == []  # a view reads no data
    assert (cd, 1, 80, 80) in ops["aten::add_.Tensor"]  # rows 2-3: offset 80 bytes, 80 bytes
    mul = [a for a in ops["aten::mul_.Tensor"] if a[0] == cd]
    assert mul == [(cd, 1, 4, 40)]  # a strided column: offset 4, 10 elements
    out = [a for a in ops["aten::add.out"] if a[0] == cd]
    assert (cd, 0, 0, 400) in out and (cd, 1, 0, 400) in out  # read as self, written as out=


def test_backward_ops_are_recorded_inside_the_engines_ranges(rec):
    lin = torch.nn.Linear(4, 3)
    rec.drain()
    lin(torch.randn(2, 4)).sum().backward()
    names = [(name, backward) for name, _, backward, _, _, _ in _ops(rec)]
    assert ("aten::mm", 1) in names  # the weight's gradient, computed by the engine
    assert ("aten::addmm", 0) in names


def test_composite_ops_are_seen_as_their_decomposition_like_the_dispatch_mode(rec):
    lin = torch.nn.Linear(4, 3)
    inp = torch.randn(2, 4)
    rec.drain()
    lin(inp)
    names = [name for name, *_ in _ops(rec)]
    assert "aten::linear" not in names and "aten::addmm" in names


def test_sites_are_the_callers_frames(rec):
    x = torch.zeros(3)
    rec.drain()
    x.add_(1)  # this line
    (op,) = [o for o in _ops(rec) if o[0] == "aten::add_.Tensor"]
    site = op[5]
    assert site[0].co_name == "test_sites_are_the_callers_frames"


def test_random_draws_are_recorded_as_the_dispatch_mode_sees_them(rec):
    from torch.utils._python_dispatch import TorchDispatchMode

    gen = torch.Generator()
    x = torch.rand(4)
    calls = [
        lambda: torch.randn(3),
        lambda: torch.randn(3, generator=gen),
        lambda: torch.randn(3, device="meta"),
        lambda: torch.randint(0, 10, (4,)),
        lambda: x.clone().bernoulli_(0.5, generator=gen),
        lambda: torch.normal(x, 1.0),  # the device of a positional tensor
        lambda: torch.nn.functional.dropout(x, 0.5, training=True),
        lambda: torch.nn.functional.rrelu(x, training=False),  # training=False is rrelu's default
        lambda: torch.nn.functional.rrelu(x, training=True),
    ]
    seen = []

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if is_rng_op(func):
                which = rng_generator(func, args, kwargs)
                seen.append(None if which is None else (which[1] is None, device_of(args, kwargs)))
            return func(*args, **kwargs)

    with Mode():
        for call in calls:
            call()
    rec.drain()
    for call in calls:
        call()
    rngs = set(draw_conditions())
    recorded = [
        None if draw is None else (draw[0] is None, draw[1])
        for _, _, pid, _, _, _, _, _, draw in rec.drain()
        if rec.plan(pid)[0].split(".")[0] in rngs
    ]
    assert recorded == seen
    assert seen.count(None) == 1 and (False, "cpu") in seen and (True, "meta") in seen


def test_python_thread_and_native_thread_ops_carry_their_thread(rec):
    x = torch.zeros(4)
    rec.drain()
    t = threading.Thread(target=lambda: x.add_(1))
    t.start()
    t.join()
    keys = {key for name, key, *_ in _ops(rec) if name == "aten::add_.Tensor"}
    assert keys == {t.ident}

    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("hits", torch.zeros(1))

        def forward(self, x):
            self.hits.add_(1)
            return x + 1

    bench = torch.utils.ThroughputBenchmark(torch.jit.script(Counter()))
    bench.add_input(torch.zeros(2))
    rec.drain()
    bench.benchmark(num_calling_threads=2, num_warmup_iters=1, num_iters=4)
    keys = {key for name, key, *_ in _ops(rec) if name.startswith("aten::add_")}
    assert keys and all(k < 0 for k in keys)  # C++ threads: native keys, no Python frames


def test_a_tiny_buffer_loses_records_and_counts_them_without_crashing(rec):
    rec.discard()
    before = rec.stats()[0]
    rec.install([], [], {}, 4, 16, 64)  # new capacities apply to threads started from now

    def flood():
        y = torch.zeros(2)
        for _ in range(500):
            y.add_(1)

    t = threading.Thread(target=flood)
    t.start()
    t.join()
    assert rec.stats()[0] - before > 400
    rec.discard()
    rec.install(sorted(torch_ops.METADATA_ONLY), sorted(torch_ops.FRESH_INPUT), dict(torch_ops.UNDECLARED_WRITES), *CAPACITY)


def test_lost_records_make_the_session_say_its_analysis_is_incomplete(rec):
    events = []
    session = Session(events.append)
    backend = NativeBackend(rec, (4, 16, 64))
    backend.attach(session)
    try:

        def flood():
            y = torch.zeros(2)
            for _ in range(500):
                y.add_(1)

        t = threading.Thread(target=flood)
        t.start()
        t.join()
        backend.drain()
    finally:
        backend.stop()
        rec.install(sorted(torch_ops.METADATA_ONLY), sorted(torch_ops.FRESH_INPUT), dict(torch_ops.UNDECLARED_WRITES), *CAPACITY)
    errors = [e for e in events if e["type"] == "hook-error"]
    assert any("buffer was full" in e["message"] for e in errors)
    assert session.internal_errors >= 1


@pytest.mark.parametrize("where", ["backend._apply", "backend._adopt_shadow", "hb.clock"])
def test_an_exception_while_draining_never_reaches_the_target(rec, monkeypatch, where):
    # _apply: a record the Python engine applies (a view of 4 separate runs); _adopt_shadow: a
    # storage kept natively, then handed to Python (the same view); hb.clock: what the fast
    # drain asks of the thread (_context_of).
    events = []
    session, backend, _ = _attached(rec, events)

    def broken(*args):
        raise RuntimeError("injected drain failure")

    owner, name = where.split(".")
    monkeypatch.setattr(backend if owner == "backend" else session.hb, name, broken)
    try:
        x = torch.zeros(4, 4)
        x.add_(1)  # the target's ops run as usual
        with session.lock:  # drains
            pass
        x[:, :2].add_(1)
        with session.lock:  # drains: the failure is raceguard's own
            pass
    finally:
        backend.stop()
    assert x.sum().item() == 24.0
    assert session.internal_errors >= 1
    assert any("injected drain failure" in e.get("message", "") for e in events if e["type"] == "hook-error")


def test_drained_records_find_the_race_the_dispatch_mode_finds(rec):
    events = []
    session, backend, main = _attached(rec, events)
    try:
        counter = torch.zeros(4)
        tid = session.fork()
        other = {}

        def worker():
            other["state"] = session.adopt_thread(threading.current_thread(), tid)
            counter.add_(1)

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        counter.add_(1)  # unordered with the worker's: no join was recorded
        backend.drain()
    finally:
        backend.stop()
    races = [e["finding"] for e in events if e["type"] == "finding" and e["finding"]["kind"] == "data-race"]
    assert races and races[0]["resource"].startswith("tensor float32[4] allocated at test_native_recorder.py:")
    assert main.tid != other["state"].tid


def test_a_gradient_accumulated_natively_is_noted_for_naming(rec):
    # One timeline: the engine's per-parameter mutex orders nothing, so the accumulation is
    # applied natively, and what Namer.note_grad would note is kept natively for naming.
    session, backend, _ = _attached(rec)
    try:
        model = torch.nn.Linear(4, 2)
        step = torch.tensor(0.0)  # an optimizer's step counter: torch.tensor's lift_fresh
        backend.drain()
        before = backend.records_to_python
        model(torch.ones(3, 4)).sum().backward()
        step += 1
        step += 1
        backend.drain()
        to_python = backend.records_to_python - before
        grad = model.weight.grad
        spans = rec.grad_spans(grad.untyped_storage()._cdata)
        engine = rec.engine_param(model.weight._cdata), rec.engine_param(torch.zeros(1)._cdata)
    finally:
        backend.stop()
    assert [(p is model.weight, lo, hi) for p, lo, hi in spans] == [(True, 0, grad.numel() * 4)]
    assert engine == (True, False)
    # Only the step counter's first use goes to Python (its storage, made by lift_fresh, came
    # back to the native memory after that).
    assert to_python <= 1, to_python


def test_gradient_accumulations_of_several_threads_stay_native(rec):
    # Two threads: the accumulation mutex is kept natively (grad_mutex), so accumulations are
    # applied natively too; two backward passes into one parameter are ordered by it (no race).
    events = []
    session, backend, _ = _attached(rec, events)
    try:
        model = torch.nn.Linear(4, 2)
        tid = session.fork()
        backend.drain()
        before = backend.records_to_python

        def worker():
            session.adopt_thread(threading.current_thread(), tid)
            model(torch.ones(3, 4)).sum().backward()

        t = threading.Thread(target=worker)
        t.start()
        model(torch.ones(3, 4)).sum().backward()
        t.join()
        backend.drain()
        to_python = backend.records_to_python - before
    finally:
        backend.stop()
    races = [e["finding"] for e in events if e["type"] == "finding"]
    assert to_python == 0 and not races, (to_python, races)
    assert model.weight.grad.sum().item() == 2 * 3 * 4 * 2


def test_the_scan_between_backward_passes_never_reads_a_gradient_the_engine_made(rec):
    # Naming reads .grad between backward passes only where the engine did not make it (reading
    # one that another thread's ops use crashed targets; a benchmark with the recorder paused
    # died of SIGSEGV in it). The native notes say which the engine made once their records are
    # applied: the scan applies what is pending first, and reads nothing while nothing records.
    session, backend, _ = _attached(rec, drainer=False)  # only the scan's own drain applies them
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)  # the scan runs only while several threads do
    other.start()
    namer = session.namer
    try:
        engine_made, installed = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
        installed.weight.grad = torch.zeros(2, 4)  # the program's own: the scan notes it
        namer.modules.add(engine_made)
        namer.modules.add(installed)
        engine_made(torch.ones(3, 4)).sum().backward()
        pending = rec.pending()
        namer.note_installed_grads()
        recording = set(namer._seen_grads)
        namer._seen_grads.clear()
        rec.pause()
        namer.note_installed_grads()
        paused = set(namer._seen_grads)
    finally:
        stop.set()
        other.join()
        backend.stop()
    assert pending
    assert id(installed.weight) in recording and id(engine_made.weight) not in recording
    assert not paused


def test_a_new_session_starts_without_the_native_state_of_the_last(rec):
    # The native memory, gradient notes and accumulation mutexes live in the process. A mutex's
    # clock kept from an earlier session (indexed by that session's timelines) would order the
    # next session's threads: here it hid the race on x.
    model = torch.nn.Linear(4, 2)

    def run(race: bool) -> list:
        events = []
        session, backend, _ = _attached(rec, events)
        try:
            x = torch.zeros(4)
            tid = session.fork()
            backend.drain()
            if race:
                x.add_(1)
            else:  # the main thread's accumulations advance the mutex's clock
                for _ in range(6):
                    model(torch.ones(3, 4)).sum().backward()

            def worker():
                session.adopt_thread(threading.current_thread(), tid)
                model(torch.ones(3, 4)).sum().backward()  # acquires the parameters' mutexes
                if race:
                    x.add_(1)

            t = threading.Thread(target=worker)
            t.start()
            t.join()
            backend.drain()
        finally:
            backend.stop()
        return [e["finding"] for e in events if e["type"] == "finding"]

    assert run(race=False) == []
    races = run(race=True)
    assert [f["kind"] for f in races] == ["data-race"], races
    assert races[0]["resource"].startswith("tensor float32[4]"), races[0]["resource"]


def test_threads_that_come_and_go_while_records_are_drained_do_not_crash_the_target(rec):
    # Storages die on the target's threads while others drain (tests/data/native_drain_churn.py,
    # which killed its process with a corrupted heap in one of three 20-second runs while the
    # table could be swept in the middle of applying a record).
    import subprocess
    import sys

    program = os.path.join(os.path.dirname(__file__), "data", "native_drain_churn.py")
    proc = subprocess.run([sys.executable, program, "10"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout) >= 1


def test_drained_records_give_their_pages_back(rec):
    # Eight threads each sweep their ~8.5 MB of record buffers several times over
    # (tests/data/native_ring_memory.py); their peak RSS grew by about 67 MB while every page a
    # thread had reached stayed resident, and by about 7 MB now that drained pages go back.
    import subprocess
    import sys

    program = os.path.join(os.path.dirname(__file__), "data", "native_ring_memory.py")
    proc = subprocess.run([sys.executable, program, "30000"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout) < 30, proc.stdout


def test_a_pending_record_lets_go_of_a_storage_that_died(rec):
    # A pending record's reference kept a dead storage's StorageImpl object allocated between the
    # target's freed chunks (a training's peak RSS grew 15-18 MB); the recorder's reaper drops it
    # within milliseconds, and the drain then counts the access as dead, as it did before.
    import time

    session, backend, _ = _attached(rec, drainer=False)
    try:
        backend.drain()
        before = rec.reaped()
        x = torch.zeros(64)
        x.add_(1)
        (x * 2).sum()  # a temporary, dead at once
        del x
        deadline = time.monotonic() + 5
        while rec.reaped() < before + 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        reaped = rec.reaped() - before
        dead_before = backend.dead_accesses
        backend.drain()
        dead = backend.dead_accesses - dead_before
    finally:
        backend.stop()
    assert reaped >= 3, reaped  # x's accesses, and the temporary's
    assert dead >= 2, dead


def test_cache_key_changes_with_the_torch_version():
    assert build.build_dir("2.13.0+cpu") != build.build_dir("2.14.0+cpu")
    assert build.build_dir() == build.build_dir(torch.__version__)


def test_a_failed_build_falls_back_to_the_python_mode_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RACEGUARD_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("RACEGUARD_BACKEND", raising=False)  # the default
    monkeypatch.setattr(native, "_main_checked_process", lambda: True)
    monkeypatch.setattr(build, "_compiler", lambda: "/usr/bin/c++")
    monkeypatch.setattr(build, "_compile", lambda target: "the build failed: simulated")
    session = Session(lambda e: None)
    backend, reason = native.choose(session)
    assert backend == "python" and reason == "the build failed: simulated"
    assert "\n" not in reason and session.native is None
    assert native.status() == ("python", reason)
    assert session.stats()["capture_backend"] == "python (native recorder unavailable: the build failed: simulated)"
    err = capsys.readouterr()
    assert err.out == ""  # the target's stdout
    building, fallback = err.err.splitlines()
    assert building.startswith(f"raceguard: building the native recorder for torch {torch.__version__} / CPython ")
    assert fallback == "raceguard: checking with the Python dispatch mode: native recorder unavailable: the build failed: simulated"
    # the failure is remembered: the next process does not pay for a build again, says why once
    monkeypatch.setattr(build, "_compile", lambda target: pytest.fail("rebuilt after a failure"))
    assert native.choose(Session(lambda e: None))[0] == "python"
    assert capsys.readouterr().err.splitlines() == [fallback]
    # a checked worker of the same run says nothing: the target's own process said it
    monkeypatch.setattr(native, "_main_checked_process", lambda: False)
    assert native.choose(Session(lambda e: None))[0] == "python"
    assert capsys.readouterr().err == ""
    # the explicit build command tries again, and fails loudly
    monkeypatch.setattr(build, "_compile", lambda target: "the build failed: still")
    assert build.main() == 1
    assert capsys.readouterr().err.splitlines()[-1] == "raceguard: no native recorder: the build failed: still"


FALLBACK_TARGET = '''
import subprocess, sys, threading
import torch
x = torch.zeros(4)
t = threading.Thread(target=x.add_, args=(1,))
t.start()
x.add_(1)
t.join()
subprocess.run([sys.executable, "-c", "import torch; torch.ones(2).add_(1)"], check=True)
print("done")
'''


def test_a_failed_build_leaves_the_check_to_the_python_mode_with_one_line_per_run(tmp_path, monkeypatch):
    import json
    import subprocess
    import sys

    monkeypatch.setenv("RACEGUARD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RACEGUARD_BACKEND", raising=False)
    failed = build.build_dir() + ".failed"  # what a failed build leaves for the next day
    os.makedirs(os.path.dirname(failed))
    with open(failed, "w") as f:
        f.write("the build failed: simulated\n")
    target = tmp_path / "target.py"
    target.write_text(FALLBACK_TARGET)
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "raceguard", "check", "--format", "json", "-o", str(out), str(target)],
        capture_output=True, text=True, timeout=180,
    )
    report = json.loads(out.read_text())
    assert proc.stdout == "done\n"
    assert proc.returncode == 1, proc.stderr  # the race, found by the Python mode
    assert [f["kind"] for f in report["findings"]] == ["data-race"]
    assert report["stats"]["processes"] == 2  # the child Python was checked, and said nothing
    assert report["stats"]["capture_backend"] == "python (native recorder unavailable: the build failed: simulated)"
    said = [line for line in proc.stderr.splitlines() if "native recorder" in line]
    assert said == ["raceguard: checking with the Python dispatch mode: native recorder unavailable: the build failed: simulated"]


def test_the_native_recorder_is_the_default_and_the_python_mode_can_be_forced(monkeypatch):
    # Not chosen for a real session here: that would install the recorder in this test process.
    monkeypatch.delenv("RACEGUARD_BACKEND", raising=False)
    assert native.requested() == "native"
    monkeypatch.setenv("RACEGUARD_BACKEND", "native")
    assert native.requested() == "native"
    monkeypatch.setenv("RACEGUARD_BACKEND", "bogus")
    assert native.requested() == "native"
    assert "'bogus' is not 'python' or 'native'" in native._invalid_value()
    # what doctor says before any session chose: the Python mode wherever a run would take it
    monkeypatch.setattr(native, "_chosen", False)
    monkeypatch.delenv("RACEGUARD_BACKEND")
    monkeypatch.setenv("RACEGUARD_SIMULATE_CUDA", "1")
    assert native.status() == ("python", "--simulate-cuda rewrites devices in the Python mode's op hook")
    monkeypatch.delenv("RACEGUARD_SIMULATE_CUDA")
    monkeypatch.setenv("RACEGUARD_BACKEND", "python")
    assert native.status() == ("python", "RACEGUARD_BACKEND=python")
    session = Session(lambda e: None)
    assert native.choose(session) == ("python", "RACEGUARD_BACKEND=python")
    assert session.native is None
    assert session.stats()["capture_backend"] == "python (RACEGUARD_BACKEND=python)"


def test_a_cached_build_loads_without_a_build_line(rec, capsys):
    result = build.ensure()
    assert result.module is not None and result.reason == "cached build"
    assert capsys.readouterr().err == ""
    assert build.probe() == ("native", f"cached build {result.path}")


@pytest.mark.skipif(os.environ.get("CXX") == "/nonexistent", reason="compiler disabled")
def test_no_compiler_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("RACEGUARD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    result = build.ensure()
    assert result.module is None and result.reason.startswith("no C++ compiler")


FAULTY_TARGET = '''
import sys, threading
import torch
from raceguard.capture.native import backend

def boom(*args, **kwargs):
    raise RuntimeError("injected into the native drain")

if len(sys.argv) > 1:  # under plain python nothing calls them
    backend.NativeBackend._apply = boom  # the records the Python engine applies
    # what the fast drain asks of a thread: every record then goes to _apply
    from raceguard.engine import hb
    hb.HappensBefore.clock = boom
x = torch.zeros(4)
lock = threading.Lock()
def work():
    for _ in range(50):
        with lock:
            x.add_(1)
threads = [threading.Thread(target=work) for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
print("total", x.sum().item())
raise SystemExit(3)
'''


def test_a_failing_drain_in_a_checked_program_changes_nothing_the_program_does(rec, tmp_path):
    import json
    import subprocess
    import sys

    target = tmp_path / "target.py"
    target.write_text(FAULTY_TARGET)
    plain = subprocess.run([sys.executable, str(target), "inject"], capture_output=True, text=True, timeout=120)
    out = tmp_path / "report.json"
    env = {**os.environ, "RACEGUARD_BACKEND": "native"}
    proc = subprocess.run(
        [sys.executable, "-m", "raceguard", "check", "--format", "json", "-o", str(out), str(target), "inject"],
        capture_output=True, text=True, timeout=180, env=env,
    )
    report = json.loads(out.read_text())
    assert (plain.returncode, plain.stdout) == (3, "total 400.0\n")
    assert proc.stdout == plain.stdout
    assert report["target_exit_code"] == 3
    assert report["stats"]["capture_backend"].startswith("native (")  # cached, or built by this run
    assert report["incomplete"]["internal_errors"] >= 1
    assert not [f for f in report["findings"] if f["kind"] == "data-race" and not f.get("suppressed")]
