"""TorchScript under the Python dispatch mode: raceguard steps aside instead of breaking it.

Each program of fixtures/torchscript breaks under any Python dispatch mode on torch 2.13 (a
traced graph's number constant refused by ``aten::view``, torch's error message lost to an empty
``RuntimeError:``, a ThroughputBenchmark that aborts the process). Under ``raceguard check`` with
the Python backend each must print what plain python prints and exit as it does, with no
finding, and the report's ``incomplete`` must say which calls ran without op capture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch_exit_abort import run_past_torch_exit_abort

from raceguard.capture import torchscript
from raceguard.capture.torch_ops import numbers_as_tensors, run_op
from raceguard.report.document import validate_report

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ROOT / "fixtures" / "torchscript"
# The kinds of calls each program makes that run with the mode stepped aside.
NOT_CAPTURED = {
    "trace_constant.py": {"TorchScript", "torch.jit.trace"},
    "script_shape_error.py": {"TorchScript"},
    "fork_wait.py": {"TorchScript"},
    "benchmark_script_module.py": {"ThroughputBenchmark"},
    "async_patterns.py": {"TorchScript", "torch.jit.trace"},
}
PYTHON_BACKEND = {**os.environ, "RACEGUARD_BACKEND": "python"}


def test_every_program_has_its_expectation() -> None:
    assert sorted(p.name for p in PROGRAMS.glob("*.py")) == sorted(NOT_CAPTURED)


@pytest.mark.parametrize("name", sorted(NOT_CAPTURED))
def test_program_runs_as_under_plain_python(name: str, tmp_path: Path) -> None:
    plain = run_past_torch_exit_abort(
        lambda: subprocess.run([sys.executable, name], cwd=PROGRAMS, capture_output=True, text=True, timeout=180)
    )
    assert plain.returncode == 0, plain.stderr
    out = tmp_path / "report.json"
    checked = run_past_torch_exit_abort(
        lambda: subprocess.run(
            [sys.executable, "-m", "raceguard", "check", "--format", "json", "-o", str(out), name],
            cwd=PROGRAMS,
            capture_output=True,
            text=True,
            timeout=300,
            env=PYTHON_BACKEND,
        )
    )
    assert checked.stdout == plain.stdout, checked.stderr
    assert checked.returncode == plain.returncode, checked.stderr
    report = json.loads(out.read_text())
    validate_report(report)
    assert report["target_exit_code"] == 0
    assert report["status"] == "clean" and report["findings"] == []
    incomplete = report["incomplete"]
    assert incomplete["internal_errors"] == 0 and incomplete["errors"] == []
    entries = incomplete["not_captured"]
    assert {e["kind"] for e in entries} == NOT_CAPTURED[name]
    for e in entries:
        assert e["calls"] >= 1
        assert e["message"].startswith(f"{e['kind']}: {e['calls']} call")
        assert "ran without op capture under the Python dispatch mode" in e["message"]
    assert "raceguard: not checked under the Python dispatch mode" in checked.stderr
    assert "ran without op capture" in checked.stderr.strip().splitlines()[-1]


def test_a_number_refused_in_place_of_a_wrapped_number_is_passed_as_a_tensor() -> None:
    # What a traced graph's constant looks like to a dispatch mode: a Python int for 'self'.
    view = torch.ops.aten.view.default
    with pytest.raises(RuntimeError) as refused:
        view(1, [1])
    args, kwargs = numbers_as_tensors(view, (1, [1]), {}, refused.value)
    assert isinstance(args[0], torch.Tensor) and args[0].dtype == torch.int64 and args[1] == [1]
    out = run_op(view, (1, [1]), {})
    assert out.tolist() == [1] and out.dtype == torch.int64
    assert run_op(torch.ops.aten.equal.default, (torch.tensor(2.5, dtype=torch.float64), 2.5), {}) is True


def test_the_ops_own_error_is_not_retried() -> None:
    calls = []

    class Refuses:
        _schema = torch.ops.aten.view.default._schema

        def __call__(self, *args, **kwargs):
            calls.append(args)
            raise RuntimeError("shape '[5]' is invalid for input of size 1")

    with pytest.raises(RuntimeError, match="is invalid"):
        run_op(Refuses(), (1, [5]), {})
    assert len(calls) == 1  # the op ran once: its own error reaches the caller unchanged


def test_wrappers_pass_through_without_a_session_and_are_removed_after_one() -> None:
    import raceguard

    originals = {(owner, attr): getattr(owner, attr) for owner, attr, _ in torchscript._patch_points()}

    @torch.jit.script
    def affine(x, w):
        return x @ w + 1

    seen = []
    with raceguard.watch() as session:
        assert all(getattr(o, a) is not f for (o, a), f in originals.items())
        try:
            affine(torch.ones(2, 3), torch.ones(2, 3))
        except RuntimeError as error:
            seen.append(str(error).strip().splitlines()[-1])
        worker = threading.Thread(target=lambda: seen.append(affine(torch.ones(1, 2), torch.ones(2, 1)).item()))
        worker.start()
        worker.join()
    assert all(getattr(o, a) is f for (o, a), f in originals.items())
    assert seen == ["RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x3 and 2x3)", 3.0]
    incomplete = session.report().incomplete
    assert incomplete is not None
    assert incomplete["not_captured"][0]["kind"] == "TorchScript" and incomplete["not_captured"][0]["calls"] == 2
    assert affine(torch.ones(1, 1), torch.ones(1, 1)).item() == 2.0  # no session: as torch does
