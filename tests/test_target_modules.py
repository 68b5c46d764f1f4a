"""What the target finds in ``sys.modules`` under `raceguard check`: what plain python gives it.

The child imports torch before it knows the target (the fast start of torch programs); a target
that never imports torch must not see it, and one that does must get the very modules the child
loaded, never a second copy. Through the public CLI, compared with plain python."""

from __future__ import annotations

import json

from test_cli_targets import TARGETS, plain, raceguard


def test_a_target_that_never_imports_torch_does_not_find_it() -> None:
    expected = plain("sees_modules.py", cwd=TARGETS)
    got = raceguard("check", "-q", "sees_modules.py", cwd=TARGETS)
    assert got.returncode == 0, got.stderr
    assert "torch" not in json.loads(got.stdout)
    assert json.loads(got.stdout) == json.loads(expected.stdout)


def test_a_torch_target_gets_the_modules_the_child_loaded_and_torchs_warning_filters() -> None:
    expected = plain("sees_torch.py", cwd=TARGETS)
    got = raceguard("check", "-q", "sees_torch.py", cwd=TARGETS)
    assert got.returncode == 0, got.stderr
    seen = json.loads(got.stdout)
    assert seen == json.loads(expected.stdout)
    assert seen["typing_extensions_is_torchs"] and seen["find_spec_is_the_module_spec"]
    assert seen["filters_added_by_torch"]  # torch adds some on import; raceguard used to drop them


def test_a_module_the_child_loaded_runs_with_dash_m_like_under_python() -> None:
    # runpy asks the loader for the code of a module that is not in sys.modules.
    expected = plain("-m", "typing_extensions")
    got = raceguard("check", "-q", "-m", "typing_extensions")
    assert (got.returncode, got.stdout) == (expected.returncode, expected.stdout), got.stderr
