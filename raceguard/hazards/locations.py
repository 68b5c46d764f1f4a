"""Locations: the shadow of each piece of shared state a hazard hook watches. A location is a
:class:`~raceguard.engine.hb.ShadowStorage` whose "bytes" are slots (one per module attribute
name, optimizer parameter or generator), keyed by object identity and holding only a weak
reference; :func:`_record` records one access of the calling thread to some of its slots and
returns the races, skipping the stack capture when FastTrack's same-epoch rule says the access
adds nothing (:func:`_covered`).
"""

from __future__ import annotations

import weakref
from bisect import bisect_right
from typing import Any, Callable

from ..engine.hb import Race, ShadowStorage
from ..capture.naming import OpInfo
from ..capture.stacks import op_site_function


# -- locations -------------------------------------------------------------------------------
# Module slots read by every call: the flag forward depends on, the method it runs, and the
# hook dicts _call_impl iterates.
_FIXED_SLOTS = ("training", "forward", "_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
CALL_SLOTS = len(_FIXED_SLOTS)
_slot_names: list[str] = list(_FIXED_SLOTS)
_slot_by_name: dict[str, int] = {n: i for i, n in enumerate(_FIXED_SLOTS)}
# Hook dicts that share the slot of the dict _call_impl reads.
_slot_by_name["_forward_hooks_with_kwargs"] = _slot_by_name["_forward_hooks"]
_slot_by_name["_forward_hooks_always_called"] = _slot_by_name["_forward_hooks"]
_slot_by_name["_forward_pre_hooks_with_kwargs"] = _slot_by_name["_forward_pre_hooks"]
_slot_by_name["_is_full_backward_hook"] = _slot_by_name["_backward_hooks"]

# torch.nn.utils._named_member_accessor's functions that store into a module's _parameters,
# _buffers or _modules directly (functional_call's swaps): their accesses are named after them.
SWAP_FUNCTIONS = ("swap_tensor", "set_tensor", "swap_submodule")


def _slot(name: str) -> int:
    slot = _slot_by_name.get(name)
    if slot is None:
        slot = _slot_by_name[name] = len(_slot_names)
        _slot_names.append(name)
    return slot


class _LocMeta:
    """What a location stands for; ``ShadowStorage.meta`` of every hazard location."""

    __slots__ = ("kind", "ref", "label", "lazy", "param_slots", "params")

    def __init__(self, kind: str, ref: Any, label: str | None = None) -> None:
        self.kind = kind  # "module", "optimizer" or "rng"
        self.ref = ref  # weakref to the object, or None for a default generator
        self.label = label  # rng: the generator's name
        self.lazy: dict[int, tuple[str, str]] = {}  # module: slot -> (name, "parameter"|"buffer")
        self.param_slots: dict[int, int] = {}  # optimizer: id(param) -> slot
        self.params: list[Any] = []  # optimizer: slot -> weakref(param)


_locs: dict[Any, ShadowStorage] = {}
_next_sweep = 4096


def _loc(key: Any, obj: Any, kind: str, label: str | None = None) -> ShadowStorage:
    """The location of ``obj`` (created on first use; replaced if ``id`` was reused)."""
    global _next_sweep
    sh = _locs.get(key)
    if sh is not None:
        ref = sh.meta.ref
        if ref is None or ref() is obj:
            return sh
    ref = _ref(obj) if obj is not None else None
    sh = _locs[key] = ShadowStorage(_LocMeta(kind, ref, label))
    if len(_locs) > _next_sweep:
        for k in [k for k, s in _locs.items() if s.meta.ref is not None and s.meta.ref() is None]:
            del _locs[k]
        _next_sweep = max(4096, 2 * len(_locs))
    return sh


def _ref(obj: Any) -> Callable[[], Any]:
    """A weak reference where the type allows one; else a strong one. torch 2.11's
    ``torch._C.Generator`` cannot be weakly referenced, and generators are few and long-lived."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


def _module_loc(module: Any) -> ShadowStorage:
    return _loc(id(module), module, "module")


def _covered(shadow: ShadowStorage, lo: int, hi: int, tid: int, epoch: int, is_write: bool) -> bool:
    """Whether an access of ``tid`` at ``epoch`` to [lo, hi) would add nothing: the same timeline
    already made it in this epoch and nobody touched the slots since (FastTrack's same-epoch
    rule). Lets the hot paths skip the stack capture."""
    starts, ends, cells = shadow.starts, shadow.ends, shadow.cells
    i = bisect_right(ends, lo)
    pos = lo
    n = len(starts)
    while pos < hi:
        if i >= n or starts[i] > pos:
            return False
        cell = cells[i]
        if is_write:
            w = cell.write
            if w is None or w.timeline != tid or w.epoch != epoch:
                return False
            r = cell.reads
            if r is not None and (type(r) is dict or r.timeline != tid):
                return False
        else:
            r = cell.reads
            if r is None:
                return False
            if type(r) is dict:
                r = r.get(tid)
                if r is None:
                    return False
            elif r.timeline != tid:
                return False
            if r.epoch != epoch:
                return False
        pos = ends[i]
        i += 1
    return True


def _record(
    s: Any, state: Any, shadow: ShadowStorage, ranges: list, is_write: bool, op: str, site: Any = None
) -> list[Race]:
    """Record one access of the thread of ``state`` to ``ranges`` of a location, made at ``site``
    (None: the calling thread, now); return the races."""
    if getattr(s, "closed", False):  # a ScopedSession that ended: its threads run on unwatched
        return []
    hb = s.hb
    tid = state.tid
    lock = getattr(s, "quiet_lock", s.lock)  # a location's shadow and an epoch: no tensor op's record is needed first
    with lock:
        epoch = hb.epoch(tid)
        if all(_covered(shadow, lo, hi, tid, epoch, is_write) for lo, hi in ranges):
            return []
    info = OpInfo(_site() if site is None else site, op, state.locks, state.origin)
    races: list[Race] = []
    with lock:
        rec = hb.record(tid, is_write, info)
        hb.access(shadow, ranges, rec, races)
    return races


# The site of an access on the hot paths (torch's C++ stack capture; raceguard's frames hidden).
_site = op_site_function()
