"""A race's name, and so its fingerprint, does not depend on timing.

``.grad`` is read for naming only while no other thread is inside backward (the engine swaps
gradients without the GIL). A gradient the program allocated itself is therefore noted between
backward passes, so a race on it found while another thread is inside backward is named
``model.weight.grad`` as it is otherwise (it used to fall back to the allocation site, which
changed the fingerprint and flipped ``--baseline``). fixtures/races/grad_added_during_backward.py
holds a backward open while the race is found.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from test_cli_fixtures import FIXTURES, run_check

FIXTURE = FIXTURES / "races" / "grad_added_during_backward.py"


def test_a_race_on_a_program_allocated_grad_has_one_name_and_fingerprint(tmp_path: Path) -> None:
    seen = set()
    for run in range(3):
        out = tmp_path / str(run)
        out.mkdir()
        proc, report = run_check(FIXTURE, out)
        assert proc.returncode == 1, proc.stderr
        seen.update((f["resource"], f["resource_kind"], f["fingerprint"]) for f in report["findings"])
    assert len(seen) == 1, seen
    resource, kind, _ = seen.pop()
    assert (resource, kind) == ("model.weight.grad", "grad")


THREADS_SEEDING_AND_TRAINING = """
import threading, torch
def work(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inputs, targets = torch.randn(16, 32), torch.randn(16, 10)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print("done")
"""


@pytest.mark.parametrize("backend", ["python", "native"])
def test_threads_training_their_own_models_are_not_crashed_by_gradient_naming(tmp_path: Path, backend: str) -> None:
    # Reading every parameter's .grad between backward passes made the first Python object for
    # gradients other threads' optimizer steps were using without the GIL: the target died of
    # SIGSEGV or SIGABRT in most runs under either backend.
    target = tmp_path / "train.py"
    target.write_text(THREADS_SEEDING_AND_TRAINING)
    proc, report = run_check(target, tmp_path, env={**os.environ, "RACEGUARD_BACKEND": backend})
    assert proc.stdout == "done\n", proc.stderr[-2000:]
    assert report["target_exit_code"] == 0
    assert {f["kind"] for f in report["findings"]} == {"shared-rng"}  # the threads reseed one generator
