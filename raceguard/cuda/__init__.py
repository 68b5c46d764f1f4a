"""CUDA streams as happens-before timelines (owns: the stream tracker, torch.cuda API patches,
the caching-allocator model's reports, and the CUDA-on-CPU simulation).

May import: ``raceguard.engine`` (the stream model), ``raceguard.capture`` (the session it reports
to, naming, sites) and ``raceguard.report.finding``. Nothing else imports it but the
checked-process plumbing (``raceguard.process``) and the scheduler, which install it per session:

* :mod:`.tracker` — :class:`~.tracker.CudaTracker`, fed by the session's ops and torch's
  ``_gpu_trace`` callbacks; :mod:`.backend` — what it asks torch; :mod:`.patches` — the
  ``torch.cuda`` Python API it wraps; :mod:`.report` — naming and findings of stream races;
* :mod:`.sim` — the CUDA-on-CPU backend (CPU tensors as device memory) for machines without a GPU;
* :mod:`.program` — ``--simulate-cuda``: an unchanged CUDA program on that backend.
"""

from __future__ import annotations

import os
from typing import Any

# RACEGUARD_SIMULATE_CUDA: "program" (what --simulate-cuda sets): the program's own CUDA tensors
# live on a simulated device in CPU memory (.program); any other value but "0" (raceguard's own
# GPU tests): every CPU tensor is device memory of the simulated device (.sim).
SIMULATE_ENV = "RACEGUARD_SIMULATE_CUDA"
SIMULATE_PROGRAM = "program"


def simulation_requested() -> str | None:
    """Which simulation the environment asks for: "program", "every-tensor", or None."""
    value = os.environ.get(SIMULATE_ENV, "")
    if value in ("", "0"):
        return None
    return SIMULATE_PROGRAM if value == SIMULATE_PROGRAM else "every-tensor"


def install_tracking(session: Any, simulate: str | None = None) -> Any:
    """What every front end calls (``check``'s child, ``watch()``, each ``stress`` schedule):
    the real tracker, or a simulation (``simulate``, else what ``RACEGUARD_SIMULATE_CUDA``
    asks for): "program" runs an unchanged CUDA program on the CPU (:mod:`.program`),
    "every-tensor" makes every CPU tensor device memory (:mod:`.sim`); None when CUDA is not
    tracked."""
    simulate = simulate or simulation_requested()
    if simulate == SIMULATE_PROGRAM:
        from . import program

        return program.install(session)
    if simulate is not None:
        from . import sim

        return sim.install(session)
    from . import tracker

    return tracker.install(session)


def uninstall_tracking(session: Any) -> None:
    """Undo :func:`install_tracking` for ``session`` (idempotent)."""
    import sys

    program = sys.modules.get(__name__ + ".program")
    if program is not None:
        program.uninstall(session)
    from . import tracker

    tracker.uninstall(session)
