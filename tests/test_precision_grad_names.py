"""A race's name, and so its fingerprint, does not depend on timing.

``.grad`` is read for naming only while no other thread is inside backward (the engine swaps
gradients without the GIL). A gradient the program allocated itself is therefore noted between
backward passes, so a race on it found while another thread is inside backward is named
``model.weight.grad`` as it is otherwise (it used to fall back to the allocation site, which
changed the fingerprint and flipped ``--baseline``). fixtures/races/grad_added_during_backward.py
holds a backward open while the race is found.
"""

from __future__ import annotations

from pathlib import Path

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
