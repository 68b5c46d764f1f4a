"""torch.compile'd programs under raceguard (fixtures/compiled/): they run compiled and finish,
Dynamo never traces raceguard's own code, compiled graph calls are recorded as accesses, and both
capture backends report the same (kind, resource, both user lines, fingerprint, stdout, exit
status), recording nothing of the compile itself.

Compiling costs seconds of CPU (Inductor writes and builds C++), so each program runs once per
backend and the fixtures are two-layer models; the second run finds Inductor's cache warm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli_fixtures import FIXTURES, ROOT, _expectation, _innermost_user_line, _markers
from test_native_fixtures import _by_place, _env

from raceguard.capture.native import build
from raceguard.report.document import validate_report

COMPILED = FIXTURES / "compiled"
RACES = sorted(p for p in COMPILED.glob("*.py") if _expectation(p)[0] == "data-race")
CLEAN = sorted(p for p in COMPILED.glob("*.py") if _expectation(p)[0] == "clean")
# A cold compile of the training fixture takes ~25 s on two busy cores; the hang this guards
# against never ends.
TIMEOUT = 300
# The default backend is the native recorder wherever it can be built.
NATIVE = "native" if build.supported() is None else "python"


def _check(
    path: Path, tmp_path: Path, backend: str | None = None, env: dict | None = None
) -> tuple[subprocess.CompletedProcess, dict]:
    """``raceguard check`` with ``backend`` ("python"; None: the default, the native recorder).

    Run again, once, when the target died the way torch 2.13.0+cpu itself kills programs now
    and then at exit ("terminate called without an active exception", SIGABRT). Plain python
    aborted so on ``compiled_training_locked.py`` in 1-2 of 10 runs beside another compiling
    process: the trainer's thread-locals release Python objects after finalization began. The
    checked process waits for that (tests/test_thread_exits.py), so this retry is for aborts of
    other origins. Any other death, or that one twice, stays a failure."""
    out = tmp_path / f"report-{backend or 'default'}.json"
    for attempt in range(2):
        proc = subprocess.run(
            [sys.executable, "-m", "raceguard", "check", "--format", "json", "--output", str(out), str(path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,  # a hang fails here instead of stalling the suite
            env={**_env(backend), **(env or {})},
        )
        torch_abort = "terminate called without an active exception" in proc.stderr and "SIGABRT" in proc.stderr
        if not torch_abort or attempt == 1:
            break
    assert out.exists(), f"no report written; stderr:\n{proc.stderr}"
    report = json.loads(out.read_text())
    validate_report(report)
    return proc, report


def _both_backends(path: Path, tmp_path: Path, env: dict | None = None) -> dict:
    """{backend: (process, report)}: the default (the native recorder) and the Python mode give
    the same findings, stdout and exit status.

    Which pairs of lines a race is reported between can depend on the interleaving, under either
    backend: ``compiled_served_while_training.py`` also reported its trainer's line 29 with the
    server's line 36, beside lines 30 and 36, in about one run in three on a busy 2-core machine,
    from the Python mode as often as from the native recorder. So when the two runs' places
    differ, both run once more, and those two must agree."""
    for attempt in range(2):
        runs = {NATIVE: _check(path, tmp_path, None, env), "python": _check(path, tmp_path, "python", env)}
        (proc_native, native), (proc_py, python) = runs[NATIVE], runs["python"]
        by_place_native, by_place_python = _by_place(native), _by_place(python)
        if by_place_native.keys() == by_place_python.keys():
            break
    assert native["stats"]["capture_backend"].startswith(NATIVE + " ("), native["stats"]["capture_backend"]
    assert not native.get("incomplete"), native.get("incomplete")
    assert by_place_native.keys() == by_place_python.keys(), (by_place_native, by_place_python)
    for place, fingerprints in by_place_native.items():
        assert fingerprints & by_place_python[place], (place, fingerprints, by_place_python[place])
    assert (proc_native.returncode, proc_native.stdout) == (proc_py.returncode, proc_py.stdout)
    return runs


def test_fixtures_present() -> None:
    assert RACES and CLEAN


@pytest.mark.parametrize("path", RACES, ids=lambda p: p.stem)
def test_compiled_race_is_reported_with_both_user_lines_under_both_backends(path: Path, tmp_path: Path) -> None:
    _, resource = _expectation(path)
    markers = _markers(path)
    proc, report = _both_backends(path, tmp_path)["python"]
    assert proc.returncode == 1, proc.stderr
    assert report["target_exit_code"] == 0
    expected = {markers["A"], markers["B"]}
    matching = [
        f
        for f in report["findings"]
        if f["kind"] == "data-race"
        and (f["resource"] == resource or resource in f.get("details", {}).get("also_on", []))
        and {_innermost_user_line(a, path) for a in f["accesses"]} == expected
    ]
    assert matching, [(f["resource"], [_innermost_user_line(a, path) for a in f["accesses"]]) for f in report["findings"]]
    assert {a["mode"] for a in matching[0]["accesses"]} >= {"write"}
    assert len({a["thread"] for a in matching[0]["accesses"]}) == 2


@pytest.mark.parametrize("path", CLEAN, ids=lambda p: p.stem)
def test_compiled_training_with_a_lock_is_clean_and_raceguard_is_not_traced(path: Path, tmp_path: Path) -> None:
    # TORCH_LOGS=graph_breaks makes Dynamo log every graph break with the file it broke in.
    for proc, report in _both_backends(path, tmp_path, env={"TORCH_LOGS": "graph_breaks"}).values():
        assert report["findings"] == [], [f["message"] for f in report["findings"]]
        assert proc.returncode == 0, proc.stderr
        assert report["target_exit_code"] == 0
        raceguard_dir = str(ROOT / "raceguard")
        # A graph break's log names the file it broke in ("Graph break ... in user code at FILE");
        # its stack trace may also list raceguard's thread bootstrap, which Dynamo never traced.
        traced = [
            line
            for line in proc.stderr.splitlines()
            if ("Graph break" in line and raceguard_dir in line) or "Dynamo does not know how to trace" in line
        ]
        assert not traced, "Dynamo traced raceguard's own code:\n" + "\n".join(traced[:10])


# A compiled forward and backward whose compilers run ops on the graph's fake inputs with every
# dispatch mode off, as Inductor does, without Inductor's seconds of C++ compiling.
COMPILES_WITH_FAKE_OPS = """
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch.utils._python_dispatch import _disable_current_modes


def compile_graph(gm, example_inputs):
    with _disable_current_modes():
        for t in example_inputs:
            if isinstance(t, torch.Tensor):
                t.cos()
    return make_boxed_func(gm.forward)


def scaled_sin(x):
    return (x.sin() * 2).sum()


fn = torch.compile(scaled_sin, backend=aot_autograd(fw_compiler=compile_graph, bw_compiler=compile_graph))
x = torch.randn(64, requires_grad=True)
fn(x).backward()  # compiles the frame, then the graph's backward
fn(x).backward()
print(x.grad.shape)
"""


def test_nothing_torch_runs_to_compile_is_recorded_under_either_backend(tmp_path: Path) -> None:
    """Dynamo runs every traced op on fake tensors, and the backward is compiled at the first
    backward pass; the Python mode is off meanwhile, and the native recorder skips the compiling
    thread, so both backends count the same ops (it counted 55 against the Python mode's 19)."""
    script = tmp_path / "compiles.py"
    script.write_text(COMPILES_WITH_FAKE_OPS)
    runs = _both_backends(script, tmp_path)
    assert runs[NATIVE][1]["stats"]["ops"] == runs["python"][1]["stats"]["ops"]
    assert runs[NATIVE][0].stdout == "torch.Size([64])\n"


@pytest.mark.skipif(NATIVE != "native", reason="the native recorder cannot run here")
def test_a_failing_suspension_of_the_native_recorder_leaves_the_compile_unchanged(tmp_path: Path) -> None:
    """Fault injection (the compile's hooks under the native recorder): the program compiles and
    runs as ever, and the report says its analysis is incomplete."""
    script = tmp_path / "compiles.py"
    script.write_text(
        "import raceguard.capture.session as session_mod\n"
        "def boom():\n"
        "    raise RuntimeError('injected by test_compiled')\n"
        "session_mod.ACTIVE.native.module.suspend = boom\n" + COMPILES_WITH_FAKE_OPS
    )
    proc, report = _check(script, tmp_path)
    assert proc.stdout == "torch.Size([64])\n"
    assert proc.returncode == 0, proc.stderr
    assert report["findings"] == []
    assert report["incomplete"] and "suspending the native recorder" in json.dumps(report["incomplete"])


def test_compiled_graph_call_is_recorded_under_watch(tmp_path: Path) -> None:
    """raceguard.watch() around a compiled server racing an eager trainer (in a fresh process:
    compiled graphs and Dynamo's caches outlive a test)."""
    script = tmp_path / "watched.py"
    source = (COMPILED / "compiled_served_while_training.py").read_text()
    imports, body = source.split("torch.manual_seed(0)", 1)
    script.write_text(
        imports
        + "import raceguard\n"
        + "with raceguard.watch() as w:\n"
        + "    torch.manual_seed(0)\n"
        + "".join(f"    {line}\n" if line else "\n" for line in body.splitlines())
        + "print(sorted({r for f in w.findings for r in [f.resource, *f.details.get('also_on', [])]}))\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr
    assert "model.fc1.weight" in proc.stdout.splitlines()[-1], proc.stdout + proc.stderr
