"""The hot path's C++-captured sites render exactly like the frame walk's (no timing here)."""

from __future__ import annotations

import torch  # noqa: F401 - op_site_function uses torch's stack capture

from raceguard.capture import stacks
from raceguard.capture.stacks import current_site, first_user_location, op_site_function, render_site, user_key

capture = op_site_function()


def both_sites(depth: int = 0):
    if depth:
        return both_sites(depth - 1)
    return capture(), current_site(0)


def _hidden_helper():
    return capture(), current_site(0)


def test_captured_site_renders_like_the_walk():
    fast, walked = both_sites(3)
    assert render_site(fast) == render_site(walked)
    assert user_key(fast) == user_key(walked)
    assert first_user_location(fast) == first_user_location(walked)
    assert render_site(fast)[0].function == "both_sites"


def test_deep_stacks_keep_max_frames():
    fast, walked = both_sites(stacks.MAX_FRAMES + 10)
    assert len(render_site(fast)) == stacks.MAX_FRAMES
    assert render_site(fast) == render_site(walked)


def test_hidden_code_is_hidden_in_captured_sites():
    stacks.hide_code(_hidden_helper.__code__)
    fast, walked = _hidden_helper()
    assert all(f.function != "_hidden_helper" for f in render_site(fast))
    assert render_site(fast) == render_site(walked)


def test_exec_from_a_string_stays_visible():
    namespace = {"capture": capture, "current_site": current_site}
    exec("def f():\n    return capture(), current_site(0)\nresult = f()", namespace)  # noqa: S102
    fast, walked = namespace["result"]
    assert render_site(fast) == render_site(walked)
    assert any(f.file == "<string>" for f in render_site(fast))


def test_rendering_a_captured_site_imports_nothing_heavy():
    # torch's symbolize looks up torch._inductor; the lazy import would cost the target ~1 s.
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from raceguard.capture.stacks import op_site_function, render_site\n"
        "frames = render_site(op_site_function()())\n"
        "assert frames and frames[0].function == '<module>', frames\n"
        "assert 'torch._inductor' not in sys.modules\n"
        "assert torch._inductor is not None  # still importable afterwards\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
