"""Module-level hooks read by cheap public entry points (no imports, no torch).

:data:`yield_hook` is set by a schedule's child process while the scheduler runs; otherwise
``raceguard.yield_point()`` costs one global lookup and a comparison.
"""

from __future__ import annotations

from typing import Callable

yield_hook: Callable[[], None] | None = None
