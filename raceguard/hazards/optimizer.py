"""Optimizer state initialisation: a global step pre-hook makes the first ``optimizer.step()``
of a parameter (which creates its state) a write of the optimizer's location, one slot per
parameter, and every later step a read.
"""

from __future__ import annotations

import weakref
from typing import Any

from ..engine.hb import Race
from . import _state
from .calls import _compiling
from .locations import _loc, _record
from .reporting import _internal_error, _report_races


# -- optimizer state initialisation ------------------------------------------------------------
def _optimizer_pre_hook(opt: Any, args: Any, kwargs: Any) -> None:
    """Global step pre-hook: the first step of a parameter creates its state (a write of the
    location ``optimizer.state[p]``), every later step reads it. Parameters without a gradient
    are skipped, as the optimizers themselves do."""
    if _compiling():  # a compiled step: its graph call records the state (capture/compiled.py)
        return None
    s = _state._session
    if s is None or s.hb.timelines <= 1:
        return None
    try:
        shadow = _loc(id(opt), opt, "optimizer")
        meta = shadow.meta
        state_of = opt.state
        fresh: list[int] = []
        seen: list[int] = []
        with getattr(s, "quiet_lock", s.lock):  # the location's slots only: no op record needed first
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue  # every torch optimizer skips it: no state created or used
                    slot = meta.param_slots.get(id(p))
                    if slot is None or meta.params[slot]() is not p:
                        slot = meta.param_slots[id(p)] = len(meta.params)
                        meta.params.append(weakref.ref(p))
                    (seen if state_of.get(p) else fresh).append(slot)
        races: list[Race] = []
        state = s.current()
        label = f"{type(opt).__name__}.step"
        if fresh:
            races += _record(s, state, shadow, _runs(fresh), True, f"{label} (state initialisation)")
        if seen:
            races += _record(s, state, shadow, _runs(seen), False, label)
    except Exception as exc:
        _internal_error(s, "recording an optimizer step", exc)
        return None
    if races:
        _report_races(s, races)
    return None


def _runs(slots: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of slot numbers as byte ranges: one interval for a whole optimizer."""
    out: list[tuple[int, int]] = []
    for slot in sorted(slots):
        if out and out[-1][1] == slot:
            out[-1] = (out[-1][0], slot + 1)
        else:
            out.append((slot, slot + 1))
    return out
