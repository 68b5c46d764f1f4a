"""The global RNG: every aten op drawing from a generator (:func:`on_rng_op`, called by
``Session.on_op``; :func:`on_rng_draw`, called for the native recorder's records), and
``torch.manual_seed`` / ``seed`` / ``set_rng_state`` are writes of that generator's location,
``torch.get_rng_state`` a read of the default one.
"""

from __future__ import annotations

from typing import Any, Callable

from ..capture.identity import present_as
from ..capture.rng_ops import default_generator_name, device_of, rng_generator
from . import _state
from ._state import _orig
from .locations import _loc, _record
from .reporting import _internal_error, _report_races


# -- RNG ops: raceguard/capture/rng_ops.py --------------------------------------------------
_default_generator_name = default_generator_name


# Devices whose kernels compute shapes only: an RNG op there draws from no generator (meta
# tensors, e.g. a model planned under ``torch.device("meta")`` before it is materialised).
_NON_DRAWING_DEVICES = frozenset({"meta"})


# -- the global RNG ------------------------------------------------------------------------------
def on_rng_op(s: Any, state: Any, func: Any, args: tuple, kwargs: dict) -> None:
    """An RNG op is about to run in the thread of ``state`` (call only when ``is_rng_op(func)``)."""
    if s.hb.timelines <= 1:
        return
    try:
        which = rng_generator(func, args, kwargs)
        if which is None:
            return
        device = which[0][1] if which[1] is None else device_of(args, kwargs)
    except Exception as exc:
        _internal_error(s, "recording a random draw", exc)
        return
    on_rng_draw(s, state, which[1], device, func.name())


def on_rng_draw(s: Any, state: Any, gen: Any, device: str, op: str, site: Any = None) -> None:
    """The thread of ``state`` draws from ``gen`` (None: the default generator of ``device``)
    in the op named ``op``, at ``site`` (None: here). The native recorder's records come here
    directly, with the generator, device and site it recorded."""
    if s.hb.timelines <= 1:
        return
    try:
        if device.partition(":")[0] in _NON_DRAWING_DEVICES:
            return
        key = ("default", device) if gen is None else id(gen)
        label = _default_generator_name(device) if gen is None else None
        shadow = _loc(key, gen, "rng", label)
        races = _record(s, state, shadow, [(0, 1)], True, op, site)
    except Exception as exc:
        _internal_error(s, "recording a random draw", exc)
        return
    if races:
        _report_races(s, races)


def _rng_call(name: str, is_write: bool) -> Callable:
    original = _orig[name]

    def call(*args: Any, **kwargs: Any) -> Any:
        s = _state._session
        if s is not None and s.hb.timelines > 1:
            try:
                key = ("default", "cpu")
                shadow = _loc(key, None, "rng", _default_generator_name("cpu"))
                races = _record(s, s.current(), shadow, [(0, 1)], is_write, name)
            except Exception as exc:
                _internal_error(s, "recording a reseed", exc)
                races = []
            if races:
                _report_races(s, races)
        return original(*args, **kwargs)

    call.__wrapped__ = original  # type: ignore[attr-defined]
    return present_as(call, original)


_RNG_FUNCTIONS = (
    ("torch.manual_seed", True),
    ("torch.seed", True),
    ("torch.set_rng_state", True),
    ("torch.get_rng_state", False),
)
