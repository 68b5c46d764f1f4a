"""CUDA streams as happens-before timelines (owns: the stream tracker, torch.cuda API patches,
the caching-allocator model's reports, and the CUDA-on-CPU simulation).

May import: ``raceguard.engine`` (the stream model), ``raceguard.capture`` (the session it reports
to, naming, sites) and ``raceguard.report.finding``. Nothing else imports it but the
checked-process plumbing (``raceguard.process``) and the scheduler, which install it per session:

* :mod:`.tracker` — :class:`~.tracker.CudaTracker`, fed by the session's ops and torch's
  ``_gpu_trace`` callbacks; :mod:`.backend` — what it asks torch; :mod:`.patches` — the
  ``torch.cuda`` Python API it wraps; :mod:`.report` — naming and findings of stream races;
* :mod:`.sim` — the CUDA-on-CPU backend (CPU tensors as device memory) for machines without a GPU.
"""

from __future__ import annotations

import os
from typing import Any

# Set (not "0") to run the CUDA tracker over the CUDA-on-CPU simulation (raceguard's own GPU tests).
SIMULATE_ENV = "RACEGUARD_SIMULATE_CUDA"


def install_tracking(session: Any) -> Any:
    """What every front end calls (``check``'s child, ``watch()``, each ``stress`` schedule):
    the real tracker, or with ``RACEGUARD_SIMULATE_CUDA`` set (not "0") the CUDA-on-CPU backend
    of :mod:`.sim` (CPU tensors as device memory); None when CUDA is not tracked."""
    if os.environ.get(SIMULATE_ENV, "") not in ("", "0"):
        from . import sim

        return sim.install(session)
    from . import tracker

    return tracker.install(session)
