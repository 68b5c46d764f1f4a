"""Hazards beyond tensor memory: module state, serialization, the global RNG, thread-local modes
and lazy initialisation.

Many PyTorch thread-safety bugs involve no in-place aten op at all. This module models the
shared state behind them as *locations* of the happens-before engine: each location is a
:class:`~raceguard.engine.hb.ShadowStorage` whose "bytes" are slots (one per attribute name,
parameter or generator), so ordering, FastTrack's read sets and race checks are exactly the
engine's. Locations are keyed by object identity and hold only weak references.

=========================  =====================================================  ==============
hazard                     accesses recorded                                      finding
=========================  =====================================================  ==============
module flags/attributes    write: ``Module.__setattr__``/``__delattr__`` (so      ``data-race``,
                           ``train()``/``eval()``, ``self.x = ...`` in forward,   module-attribute
                           ``m.forward = f``), hook registration and removal;
                           read: every module call reads ``training``,
                           ``forward`` and the forward/backward hook dicts
serialization              read of every tensor pickled (``torch.save``,          ``data-race`` on
                           ``pickle``: ``Tensor.__reduce_ex__``)                  the tensor
shared global RNG          write: every aten op drawing from the default          ``shared-rng``
                           generator, ``torch.manual_seed``/``seed``/             (warning)
                           ``set_rng_state``; read: ``get_rng_state``
thread-local modes         the submitter's grad/inference/autocast modes at       ``thread-local-
                           ``Thread.start()`` / ``executor.submit()`` against     mode`` (warning)
                           the worker's at module call, unless the worker set
                           that mode itself
lazy initialisation        write: ``nn.Lazy*`` materialisation; read: every       ``data-race`` on
                           call of a lazy module; write: the first                the parameter /
                           ``optimizer.step()`` of a parameter (state init),      optimizer state
                           read: later steps
=========================  =====================================================  ==============

A location is touched only while the session has more than one timeline: while a single one
exists, every timeline created later is forked from it and so ordered after the access, which
therefore can never race. Single-threaded programs pay one comparison per module call.

Wiring: the session calls five hooks (a dozen lines in child.py, session.py, torch_ops.py and
sync.py)::

    hazards.install(session)       # child.main(), right after ``session_mod.ACTIVE = session``
    hazards.uninstall()            # when a session ends in process (tests, the Python API)
    OpPlan.rng = is_rng_op(func)   # torch_ops.build_plan: once per op overload
    if plan.rng: hazards.on_rng_op(self, state, func, args, kwargs)   # Session.on_op, before the op
    hazards.on_thread_start(s, thread)   # sync._thread_start, after s.fork() (parent side)
    hazards.on_submit(s, work_item)      # sync._work_item_init, after the submit edge

``RNG_OPS`` lists the op base names that draw from a generator; :func:`rng_generator` tells
which one (the ``generator`` argument, or the device's default generator when it is None or the
overload has none).
"""

from __future__ import annotations

import _thread
import concurrent.futures.thread as futures_thread
import os
import threading
import weakref
from bisect import bisect_right
from typing import Any, Callable

import torch
from torch import nn

from ..engine.hb import Race, ShadowStorage, SyncVar
from ..report.finding import Access, Finding, compute_fingerprint
from .naming import OpInfo, StorageMeta, shape_of
from .rng_ops import RNG_ALWAYS_DEFAULT, RNG_OPS, default_generator_name, is_rng_op, rng_generator
from .stacks import current_site, op_site_function, render_site, user_key
from .torch_ops import byte_ranges

__all__ = [
    "RNG_OPS",
    "RNG_ALWAYS_DEFAULT",
    "CALL_SLOTS",
    "install",
    "uninstall",
    "installed",
    "is_rng_op",
    "rng_generator",
    "on_rng_op",
    "on_thread_start",
    "on_submit",
    "record_tensor_reads",
]

# -- RNG ops: raceguard/capture/rng_ops.py --------------------------------------------------
_default_generator_name = default_generator_name


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


def _record(s: Any, state: Any, shadow: ShadowStorage, ranges: list, is_write: bool, op: str) -> list[Race]:
    """Record one access of the calling thread to ``ranges`` of a location; return the races."""
    if getattr(s, "closed", False):  # a ScopedSession that ended: its threads run on unwatched
        return []
    hb = s.hb
    tid = state.tid
    with s.lock:
        epoch = hb.epoch(tid)
        if all(_covered(shadow, lo, hi, tid, epoch, is_write) for lo, hi in ranges):
            return []
    info = OpInfo(_site(), op, state.locks, state.origin)
    races: list[Race] = []
    with s.lock:
        rec = hb.record(tid, is_write, info)
        hb.access(shadow, ranges, rec, races)
    return races


# The site of an access on the hot paths (torch's C++ stack capture; raceguard's frames hidden).
_site = op_site_function()


# -- the session -----------------------------------------------------------------------------
_session: Any = None
_orig: dict[str, Any] = {}
_installed = False
_tls = threading.local()
_reported: set[str] = set()
_groups: dict[tuple, dict] = {}
_report_lock = _thread.allocate_lock()


# -- module flags, attributes and hooks ------------------------------------------------------
def _module_setattr(self: Any, name: str, value: Any) -> None:
    if type(value) in _LAZY_TYPES:
        _mark_lazy(self, name, value)
    s = _session
    if s is not None and s.hb.timelines > 1 and not getattr(_tls, "quiet", 0):
        old = _stored_value(self, name)
        if old is _SETTER:
            # A property: its setter's own stores are recorded where it makes them (transformers'
            # kernels_mode setter re-kernelises only when the mode changes).
            _attr_access(s, self, name, f"setattr {name} (property)", False)
        elif old is not _ABSENT and _unchanged(old, value):
            # Storing the value already there (model.eval() on an eval model, as libraries do on
            # every request) changes nothing another thread could observe: a read, which still
            # races with a store that does change it.
            _attr_access(s, self, name, f"setattr {name} (same value)", False)
        else:
            _attr_write(s, self, name, f"setattr {name}")
    _orig["Module.__setattr__"](self, name, value)


_ABSENT = object()
_SETTER = object()
# Types whose values are compared by value: immutable, and their == runs no user code.
_VALUE_TYPES = frozenset({bool, int, str, bytes, type(None), torch.dtype, torch.device})
_setter_cache: dict[tuple[type, str], Any] = {}  # (class, name) -> its data descriptor or None
_MemberDescriptor = type(type("_Slotted", (), {"__slots__": ("x",)}).__dict__["x"])


def _stored_value(module: Any, name: str) -> Any:
    """What ``module.name = value`` would replace, without running any of the target's code:
    ``_SETTER`` when a property (data descriptor) of the class takes the store, ``_ABSENT``
    when nothing is stored under that name yet."""
    d = module.__dict__
    for store in ("_parameters", "_buffers", "_modules"):
        held = d.get(store)
        if held is not None and name in held:
            return held[name]
    key = (type(module), name)
    desc = _setter_cache.get(key, _ABSENT)
    if desc is _ABSENT:
        desc = None
        for klass in type(module).__mro__:
            attr = klass.__dict__.get(name, _ABSENT)
            if attr is not _ABSENT:
                if hasattr(type(attr), "__set__"):  # a data descriptor takes the store
                    desc = attr
                break
        _setter_cache[key] = desc
    if desc is None:
        return d.get(name, _ABSENT)
    if type(desc) is property:
        return _SETTER
    if type(desc) is _MemberDescriptor:  # a __slots__ entry: reading it runs no target code
        try:
            return desc.__get__(module, type(module))
        except AttributeError:
            return _ABSENT
    return _ABSENT  # another descriptor: a write, as before


def _unchanged(old: Any, new: Any) -> bool:
    """Whether storing ``new`` over ``old`` changes nothing: the same object, or an equal value
    of an immutable type (tuples of such values included)."""
    if old is new:
        return True
    t = type(old)
    if t is not type(new):
        return False
    if t in _VALUE_TYPES:
        return old == new
    if t is float or t is complex:
        return repr(old) == repr(new)  # exact, tells -0.0 from 0.0, and nan equals nan
    if t is tuple:
        return len(old) == len(new) and all(_unchanged(a, b) for a, b in zip(old, new))
    return False


def _module_delattr(self: Any, name: str) -> None:
    s = _session
    if s is not None and s.hb.timelines > 1 and not getattr(_tls, "quiet", 0):
        _attr_write(s, self, name, f"delattr {name}")
    _orig["Module.__delattr__"](self, name)


def _attr_write(s: Any, module: Any, name: str, op: str) -> None:
    _attr_access(s, module, name, op, True)


def _attr_access(s: Any, module: Any, name: str, op: str, is_write: bool) -> None:
    try:
        slot = _slot(name)
        races = _record(s, s.current(), _module_loc(module), [(slot, slot + 1)], is_write, op)
    except Exception as exc:  # never break the target
        _internal_error(s, "recording a module attribute write", exc)
        return
    if races:
        _report_races(s, races)


def _hook_registrar(method: str, slot_name: str) -> Callable:
    original = getattr(nn.Module, method)

    def register(self: Any, *args: Any, **kwargs: Any) -> Any:
        s = _session
        if s is not None and s.hb.timelines > 1 and not getattr(_tls, "quiet", 0):
            _attr_write(s, self, slot_name, method)
        handle = original(self, *args, **kwargs)
        try:
            handle._rg_hz_owner = (weakref.ref(self), slot_name)
        except Exception:
            pass
        return handle

    register.__wrapped__ = original  # type: ignore[attr-defined]
    register.__name__ = method
    register.__doc__ = original.__doc__
    return register


_HOOK_METHODS = (
    ("register_forward_pre_hook", "_forward_pre_hooks"),
    ("register_forward_hook", "_forward_hooks"),
    ("register_full_backward_pre_hook", "_backward_pre_hooks"),
    ("register_full_backward_hook", "_backward_hooks"),
    ("register_backward_hook", "_backward_hooks"),
)


def _handle_remove(self: Any) -> None:
    owner = self.__dict__.get("_rg_hz_owner")
    if owner is not None:
        s = _session
        module = owner[0]()
        if module is not None and s is not None and s.hb.timelines > 1 and not getattr(_tls, "quiet", 0):
            hooks = self.hooks_dict_ref()
            if hooks is not None and self.id in hooks:  # removing an already removed hook is a no-op
                _attr_write(s, module, owner[1], "RemovableHandle.remove")
    _orig["RemovableHandle.remove"](self)


def _module_call(self: Any, *args: Any, **kwargs: Any) -> Any:
    # The hot path: every module call of the target comes through here once a thread started.
    # Its frame is left out of the tracebacks the target process prints (runner.own_frames_removed).
    if _compiling():  # Dynamo tracing: trace the original only (capture/compiled.py records graphs)
        return _orig_call(self, *args, **kwargs)
    s = _session
    if s is not None and s.hb.timelines > 1:
        _on_module_call(s, self)
    return _orig_call(self, *args, **kwargs)


_orig_call: Any = None
# Constant True while Dynamo traces (it never traces a hook's bookkeeping), False in eager code.
_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


def watch_module_calls() -> None:
    """Start seeing module calls, at the first thread start: until then there is nothing to race
    with, and a program that never starts a thread keeps nn.Module.__call__ untouched (and its
    tracebacks exactly as they are). A wrapper, not a global forward pre-hook: with one of those
    torch calls forward() through an extra frame of its own, on every call."""
    global _orig_call
    if _installed and _orig_call is None:
        _orig_call = nn.Module.__call__
        nn.Module.__call__ = _module_call  # type: ignore[method-assign]


def _on_module_call(s: Any, module: Any) -> None:
    if getattr(s, "closed", False):
        return
    try:
        state = s.states.get(_thread.get_ident()) or s.current()
        shadow = _locs.get(id(module))
        if shadow is None or shadow.meta.ref() is not module:
            shadow = _module_loc(module)
        lazy = shadow.meta.lazy
        races: list[Race] = []
        if lazy or not _call_read_covered(s, shadow, state.tid):
            ranges = [(0, CALL_SLOTS)]
            if lazy:
                ranges.extend((slot, slot + 1) for slot in lazy)
            races = _record(s, state, shadow, ranges, False, f"{type(module).__name__}.__call__")
        origin = getattr(_tls, "origin", _UNSET)
        if origin is _UNSET:
            origin = _tls.origin = getattr(threading.current_thread(), "_rg_hz_origin", None)
        if origin is not None and not origin.reported:
            _check_modes(s, state, origin, module)
    except Exception as exc:
        _internal_error(s, "recording a module call", exc)
        return
    if races:
        _report_races(s, races)


def _call_read_covered(s: Any, shadow: ShadowStorage, tid: int) -> bool:
    """The common case of :func:`_covered` without the session lock: the call slots are one
    interval that this thread already read in its current epoch. Sound without the lock: a
    write that lands after this check still sees that read and reports the race."""
    if len(shadow.cells) != 1 or shadow.starts[0] != 0 or shadow.ends[0] != CALL_SLOTS:
        return False
    r = shadow.cells[0].reads
    if r is None:
        return False
    if type(r) is dict:
        r = r.get(tid)
        if r is None:
            return False
    elif r.timeline != tid:
        return False
    return r.epoch == s.hb.epoch(tid)


# -- lazy modules ------------------------------------------------------------------------------
_LAZY_TYPES: tuple = ()


def _mark_lazy(module: Any, name: str, value: Any) -> None:
    kind = "buffer" if isinstance(value, nn.parameter.UninitializedBuffer) else "parameter"
    s = _session
    lock = s.lock if s is not None else _report_lock
    with lock:
        _module_loc(module).meta.lazy[_slot(name)] = (name, kind)


def _infer_parameters(self: Any, module: Any, *args: Any, **kwargs: Any) -> Any:
    """``LazyModuleMixin._infer_parameters``: the forward pre-hook that materialises a lazy
    module. A write of every parameter/buffer it creates; the bookkeeping writes it makes
    (removing its own hooks, changing ``__class__``) are part of that one write."""
    s = _session
    if s is not None and s.hb.timelines > 1:
        try:
            lazy = [
                (name, "buffer" if isinstance(t, nn.parameter.UninitializedBuffer) else "parameter")
                for name, t in list(module._parameters.items()) + list(module._buffers.items())
                if t is not None and type(t) in _LAZY_TYPES
            ]
            if lazy:
                shadow = _module_loc(module)
                with s.lock:
                    for name, kind in lazy:
                        shadow.meta.lazy[_slot(name)] = (name, kind)
                ranges = [(_slot(n), _slot(n) + 1) for n, _ in lazy]
                races = _record(s, s.current(), shadow, ranges, True, f"{type(module).__name__}.initialize_parameters")
                if races:
                    _report_races(s, races)
        except Exception as exc:
            _internal_error(s, "recording a lazy module's initialisation", exc)
    _tls.quiet = getattr(_tls, "quiet", 0) + 1
    try:
        return _orig["LazyModuleMixin._infer_parameters"](self, module, *args, **kwargs)
    finally:
        _tls.quiet -= 1


# -- optimizer state initialisation ------------------------------------------------------------
def _optimizer_pre_hook(opt: Any, args: Any, kwargs: Any) -> None:
    """Global step pre-hook: the first step of a parameter creates its state (a write of the
    location ``optimizer.state[p]``), every later step reads it. Parameters without a gradient
    are skipped, as the optimizers themselves do."""
    if _compiling():  # a compiled step: its graph call records the state (capture/compiled.py)
        return None
    s = _session
    if s is None or s.hb.timelines <= 1:
        return None
    try:
        shadow = _loc(id(opt), opt, "optimizer")
        meta = shadow.meta
        state_of = opt.state
        fresh: list[int] = []
        seen: list[int] = []
        with s.lock:
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


# -- the autograd engine's gradient accumulation -----------------------------------------------
# Concurrent backward() on shared parameters is documented thread-safe: the engine runs each
# parameter's AccumulateGrad node under that node's own mutex, which Python never sees. Every op
# dispatched while such a node runs (the detach that installs a first .grad, the add_ that
# accumulates into an existing one, the clone of a gradient it may not steal, post-accumulate-grad
# hooks, which run under the mutex too) is bracketed by an acquire and a release of one SyncVar per
# parameter: accumulations are ordered as the engine ordered them. The installing detach carries
# the producer's write of the gradient's memory into that order, so the thread accumulating next
# is ordered after it. User code touching .grad outside backward takes no such lock and still
# races with backward. A parameter keeps one AccumulateGrad node while any graph holds it, so one
# variable per parameter is one per mutex. Accumulation ops run on the engine's device threads
# on CUDA; the op's state is then the thread that called backward(), which waits for them.
_current_node = getattr(torch._C, "_current_autograd_node", None)  # verified on torch 2.13
_ACCUMULATE_GRAD = getattr(getattr(torch._C, "_functions", None), "AccumulateGrad", None)
_grad_vars: dict[int, tuple[Any, SyncVar]] = {}  # id(parameter) -> (weakref, variable)
_next_grad_sweep = 4096


def grad_accumulation(s: Any, state: Any) -> SyncVar | None:
    """Called by ``Session.on_op`` before recording an op's accesses: when the op runs inside an
    AccumulateGrad node, take that parameter's variable for ``state`` and return it (release it
    with :func:`grad_accumulated` once the op's accesses and outputs are recorded); else None."""
    if _current_node is None:  # a torch without the binding: accumulations stay unordered
        return None
    node = _current_node()  # None outside backward: the common case costs this one call
    if node is None or type(node) is not _ACCUMULATE_GRAD or s.hb.timelines <= 1:
        return None
    try:
        param = node.variable
        with s.lock:
            var = _grad_var(param)
            s.hb.acquire(state.tid, var)
        return var
    except Exception as exc:  # never break the target
        _internal_error(s, "ordering a gradient accumulation", exc)
        return None


def grad_accumulated(s: Any, state: Any, var: SyncVar) -> None:
    """The accumulation op that :func:`grad_accumulation` returned ``var`` for is recorded."""
    with s.lock:
        s.hb.release(state.tid, var)


def _grad_var(param: Any) -> SyncVar:
    global _next_grad_sweep
    entry = _grad_vars.get(id(param))
    if entry is not None and entry[0]() is param:
        return entry[1]
    var = SyncVar()
    _grad_vars[id(param)] = (weakref.ref(param), var)
    if len(_grad_vars) > _next_grad_sweep:
        for k in [k for k, (ref, _) in _grad_vars.items() if ref() is None]:
            del _grad_vars[k]
        _next_grad_sweep = max(4096, 2 * len(_grad_vars))
    return var


# -- serialization -----------------------------------------------------------------------------
def record_tensor_reads(s: Any, state: Any, tensors: list, op: str) -> None:
    """Record reads of ``tensors``' memory made outside any aten op (serialization), exactly as
    ``Session.on_op`` records an op's inputs, and report the races through the session."""
    if not tensors or s.hb.timelines <= 1 or getattr(s, "closed", False):
        return
    site = _site()
    info = OpInfo(site, op, state.locks, state.origin)
    races: list[Race] = []
    hb = s.hb
    with s.lock:
        rec = None
        for t in tensors:
            try:
                st = t.untyped_storage()
                ranges = byte_ranges(t)
            except Exception:  # sparse, nested, meta: no plain storage to track
                continue
            cd = st._cdata
            sh = s.shadows.get(cd)
            if sh is None or sh.meta.ref() is not st:
                meta = StorageMeta(weakref.ref(st), t.dtype, shape_of(t), site, seen_only=True)
                sh = s.shadows[cd] = ShadowStorage(meta)
            rec = rec or hb.record(state.tid, False, info)
            hb.access(sh, ranges, rec, races)
    if races:
        s.report_races(races)


def _tensor_reduce_ex(self: Any, proto: Any) -> Any:
    s = _session
    if s is not None and s.hb.timelines > 1:
        try:
            if not getattr(self, "is_meta", False) and self.layout == torch.strided:
                op = "torch.save" if getattr(_tls, "saving", 0) else "pickle (Tensor.__reduce_ex__)"
                record_tensor_reads(s, s.current(), [self], op)
        except Exception as exc:
            _internal_error(s, "recording a serialization read", exc)
    return _orig["Tensor.__reduce_ex__"](self, proto)


def _torch_save(*args: Any, **kwargs: Any) -> Any:
    _tls.saving = getattr(_tls, "saving", 0) + 1
    try:
        return _orig["torch.save"](*args, **kwargs)
    finally:
        _tls.saving -= 1


# -- the global RNG ------------------------------------------------------------------------------
def on_rng_op(s: Any, state: Any, func: Any, args: tuple, kwargs: dict) -> None:
    """An RNG op is about to run in the thread of ``state`` (call only when ``is_rng_op(func)``)."""
    if s.hb.timelines <= 1:
        return
    try:
        which = rng_generator(func, args, kwargs)
        if which is None:
            return
        key, gen = which
        label = _default_generator_name(key[1]) if gen is None else None
        shadow = _loc(key, gen, "rng", label)
        races = _record(s, state, shadow, [(0, 1)], True, func.name())
    except Exception as exc:
        _internal_error(s, "recording a random draw", exc)
        return
    if races:
        _report_races(s, races)


def _rng_call(name: str, is_write: bool) -> Callable:
    original = _orig[name]

    def call(*args: Any, **kwargs: Any) -> Any:
        s = _session
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
    call.__name__ = getattr(original, "__name__", name)
    call.__doc__ = getattr(original, "__doc__", None)
    return call


_RNG_FUNCTIONS = (
    ("torch.manual_seed", True),
    ("torch.seed", True),
    ("torch.set_rng_state", True),
    ("torch.get_rng_state", False),
)


# -- thread-local modes --------------------------------------------------------------------------
_UNSET = object()
# (key, human name, getter, value in a new thread)
_MODES: list[tuple[str, str, Callable[[], bool], bool]] = [
    ("grad", "grad mode", torch.is_grad_enabled, True),
    ("inference", "inference mode", torch.is_inference_mode_enabled, False),
    ("autocast_cpu", "autocast (cpu)", lambda: torch.is_autocast_enabled("cpu"), False),
]
# _is_compiled(), not is_available(): asking the CUDA runtime at import would poison the stress
# fork server's children ("Cannot re-initialize CUDA in forked subprocess").
if torch.cuda._is_compiled():  # pragma: no cover - CPU-only development machine
    _MODES.append(("autocast_cuda", "autocast (cuda)", lambda: torch.is_autocast_enabled("cuda"), False))


class _Origin:
    """Thread-local modes of the thread that started a thread or submitted a work item, kept
    only when some differ from what a new thread starts with."""

    __slots__ = ("modes", "site", "thread", "locks", "how", "reported")

    def __init__(self, modes: list, site: tuple, thread: str, locks: tuple, how: str) -> None:
        self.modes = modes  # [(index into _MODES, value at submission)], non-default only
        self.site = site
        self.thread = thread
        self.locks = locks
        self.how = how
        self.reported = False


def _capture_origin(s: Any, how: str) -> _Origin | None:
    modes = []
    for i, (_, _, get, default) in enumerate(_MODES):
        value = bool(get())
        if value != default:
            modes.append((i, value))
    if not modes:
        return None
    state = s.current()
    return _Origin(modes, current_site(1), state.name, state.locks, how)


def on_thread_start(s: Any, thread: threading.Thread) -> None:
    """``Thread.start()`` is starting ``thread`` (called in the parent). Remembers the parent's
    thread-local modes when they differ from a new thread's, for the check at module calls."""
    watch_module_calls()
    try:
        if getattr(thread, "_target", None) is futures_thread._worker:
            return  # executor workers: each work item carries its submitter's modes instead
        origin = _capture_origin(s, "start")
        if origin is not None:
            thread._rg_hz_origin = origin  # type: ignore[attr-defined]
    except Exception as exc:
        _internal_error(s, "capturing thread-local modes", exc)


def on_submit(s: Any, work_item: Any) -> None:
    """``executor.submit()`` built ``work_item`` (called in the submitting thread, after
    ``_WorkItem.__init__``). The work runs with the submitter's modes attached."""
    try:
        origin = _capture_origin(s, "submit")
        if origin is None:
            return  # nothing to compare with: the worker starts with the same modes
        fn = work_item.fn

        def run_with_origin(*args: Any, **kwargs: Any) -> Any:
            previous = getattr(_tls, "origin", _UNSET)
            previous_explicit = getattr(_tls, "explicit", None)
            _tls.origin = origin
            _tls.explicit = set()
            try:
                return fn(*args, **kwargs)
            finally:
                _tls.explicit = previous_explicit
                if previous is _UNSET:
                    del _tls.origin
                else:
                    _tls.origin = previous

        run_with_origin.__wrapped__ = fn  # type: ignore[attr-defined]
        work_item.fn = run_with_origin
    except Exception as exc:
        _internal_error(s, "capturing thread-local modes", exc)


def _set_explicitly(*keys: str) -> None:
    """The calling thread set these modes itself (``no_grad``, ``enable_grad``, ``autocast``,
    ``inference_mode``...): from then on its choice, not its submitter's, is what counts."""
    explicit = getattr(_tls, "explicit", None)
    if explicit is None:
        explicit = _tls.explicit = set()
    explicit.update(keys)


def _set_grad_enabled(mode: Any) -> Any:
    _set_explicitly("grad")
    return _orig["torch._C._set_grad_enabled"](mode)


def _set_autocast_enabled(*args: Any, **kwargs: Any) -> Any:
    device = args[0] if args and isinstance(args[0], str) else kwargs.get("device_type", "cuda")
    _set_explicitly(f"autocast_{device}")
    return _orig["torch.set_autocast_enabled"](*args, **kwargs)


def _inference_mode_enter(self: Any) -> Any:
    _set_explicitly("inference", "grad")
    return _orig["inference_mode.__enter__"](self)


def _check_modes(s: Any, state: Any, origin: _Origin, module: Any) -> None:
    differ = []
    explicit = getattr(_tls, "explicit", None) or ()
    for i, value in origin.modes:
        key, name, get, default = _MODES[i]
        if key in explicit:
            continue  # the worker chose this mode itself (e.g. torch.enable_grad() inside it)
        now = bool(get())
        # Only a mode the worker left at a new thread's default: a mode still set from earlier
        # work of a reused pool thread is not its submitter's concern.
        if now == default and now != value:
            differ.append((name, value, now))
    if not differ:
        return
    origin.reported = True
    _report_mode_mismatch(s, state, origin, module, differ)


# -- reporting ------------------------------------------------------------------------------------
def _internal_error(s: Any, what: str, exc: BaseException) -> None:
    try:
        s._internal_error(what, exc)
    except Exception:
        pass


def _room(s: Any) -> bool:
    room = getattr(s, "_room_for_report", None)
    return room() if room is not None else True


def _access(s: Any, rec: Any) -> Access:
    state = s.timelines[rec.timeline] if rec.timeline < len(s.timelines) else None
    name = state.name if state is not None else f"thread-{rec.timeline}"
    return Access(
        thread=name,
        timeline=f"thread:{name}",
        mode="write" if rec.is_write else "read",
        op=rec.info.op,
        locks_held=[s.lock_name(lk) for lk in rec.info.locks],
        stack=render_site(rec.info.site),
        origin=s.origin_of(rec.info, rec.timeline),
    )


def _module_path(s: Any, module: Any) -> tuple[str, str]:
    """``(qualified name, root)`` of a module: ``("model.0", "model")``."""
    modules, _ = s.namer.roots()
    best: tuple | None = None
    for order, (root, m) in enumerate(modules):
        for name, sub in m.named_modules(prefix=root):
            if sub is module:
                # Prefer the outermost container (model.attn over the attn module's own `self`
                # in a forward frame), then the best-ranked root.
                rank = (root == "self" or root.startswith("self."), name == root, order)
                if best is None or rank < best[0]:
                    best = (rank, name, root)
                break
    if best is not None:
        return best[1], best[2]
    name = type(module).__name__
    return name, name


def _param_name(s: Any, param: Any) -> str | None:
    modules, _ = s.namer.roots()
    for root, m in modules:
        for name, p in m.named_parameters(prefix=root, remove_duplicate=False):
            if p is param:
                return name
    return None


class _Named:
    __slots__ = ("kind", "name", "resource_kind", "root", "fingerprint_resource", "attr")

    def __init__(
        self, kind: str, name: str, resource_kind: str, root: str, fingerprint_resource: str, attr: str
    ) -> None:
        self.kind = kind  # finding kind
        self.name = name
        self.resource_kind = resource_kind
        self.root = root
        self.fingerprint_resource = fingerprint_resource
        self.attr = attr


def _name_location(s: Any, race: Race) -> _Named | None:
    meta = race.shadow.meta
    if meta.kind == "rng":
        if meta.label is not None:
            label = meta.label
        else:
            gen = meta.ref() if meta.ref is not None else None
            if gen is None:
                return None
            var = None
            try:
                var = s.namer.name_object(gen)
            except Exception:
                pass
            label = f"{var} (torch.Generator, {gen.device})" if var else f"torch.Generator ({gen.device})"
        return _Named("shared-rng", label, "rng", label, label, "")
    obj = meta.ref() if meta.ref is not None else None
    if obj is None:
        return None
    if meta.kind == "module":
        attr = _slot_names[race.lo] if race.lo < len(_slot_names) else f"slot{race.lo}"
        path, root = _module_path(s, obj)
        lazy = meta.lazy.get(race.lo)
        if lazy is not None and lazy[0] == attr:
            # A parameter or buffer the lazy module creates: named like any tensor race, so the
            # tensor engine's report of the same bug collapses into this one (same fingerprint).
            return _Named("data-race", f"{path}.{attr}", lazy[1], root, root, attr)
        return _Named("data-race", f"{path}.{attr}", "module-attribute", root, f"{root}|{attr}", attr)
    if meta.kind == "optimizer":
        ref = meta.params[race.lo] if race.lo < len(meta.params) else None
        param = ref() if ref is not None else None
        pname = (_param_name(s, param) if param is not None else None) or f"param{race.lo}"
        label = s.namer.optimizer_label(obj)
        return _Named("data-race", f"{label}.state[{pname}]", "optimizer-state", label, f"{label}.state", "state")
    return None


def _report_races(s: Any, races: list[Race]) -> None:
    for race in races:
        try:
            _report_race(s, race)
        except Exception as exc:
            _internal_error(s, "naming a hazard", exc)


def _report_race(s: Any, race: Race) -> None:
    e, l = race.earlier, race.later
    meta = race.shadow.meta
    pair = tuple(sorted([(user_key(e.info.site), e.is_write), (user_key(l.info.site), l.is_write)]))
    group_key = (meta.kind, pair)
    with _report_lock:
        group = _groups.get(group_key)
        slot_key = (id(race.shadow), race.lo)
        if group is not None and (slot_key in group["slots"] or len(group["slots"]) > 64):
            return
        if group is None:
            group = _groups[group_key] = {"slots": set(), "resources": set(), "fingerprint": None}
        group["slots"].add(slot_key)
    named = _name_location(s, race)
    if named is None:
        return
    if group["fingerprint"] is not None:
        if named.name not in group["resources"]:
            group["resources"].add(named.name)
            s.emit({"type": "also_on", "fingerprint": group["fingerprint"], "resource": named.name})
        return
    finding = _race_finding(s, race, named)
    group["fingerprint"] = finding.fingerprint
    group["resources"].add(named.name)
    _emit(s, finding)


def _emit(s: Any, finding: Finding) -> None:
    with _report_lock:
        if finding.fingerprint in _reported:
            return
        _reported.add(finding.fingerprint)
    if _room(s):
        s.emit({"type": "finding", "finding": finding.to_dict()})


def _why(first: Access, second: Access, race: Race) -> str:
    why = (
        f"'{second.thread}' had seen '{first.thread}' only up to its epoch {race.seen_epoch}, "
        f"but the {first.mode} happened in epoch {race.earlier.epoch}: no lock, join, event, "
        f"queue, barrier or future orders the two accesses"
    )
    if first.locks_held or second.locks_held:
        if not set(first.locks_held) & set(second.locks_held):
            why += " (they hold different locks)"
    return why


def _race_finding(s: Any, race: Race, named: _Named) -> Finding:
    first, second = _access(s, race.earlier), _access(s, race.later)
    details: dict[str, Any] = {"why": _why(first, second, race)}
    if named.kind == "shared-rng":
        threads = f"'{first.thread}' and '{second.thread}'"
        message = (
            f"random generator {named.name} used by {threads} with no order between them: "
            f"{_rng_what(first)} and {_rng_what(second)} interleave differently from run to run, "
            "so seeded results are not reproducible"
        )
        hint = (
            "give each thread its own torch.Generator (e.g. torch.Generator().manual_seed(seed + rank)) "
            "and pass generator=... to the random ops, or draw under one lock in a fixed order"
        )
        accesses = [first, second]
        return Finding(
            kind="shared-rng",
            severity="warning",
            resource=named.name,
            resource_kind="rng",
            message=message,
            accesses=accesses,
            fingerprint=compute_fingerprint("shared-rng", named.fingerprint_resource, accesses),
            hint=hint,
            details=details,
        )
    kind_word = named.resource_kind.replace("-", " ")
    message = (
        f"data race on {kind_word} {named.name}: "
        f"{first.mode} by '{first.thread}' vs {second.mode} by '{second.thread}'"
    )
    details["hazard"] = _hazard_name(named, race)
    return Finding(
        kind="data-race",
        resource=named.name,
        resource_kind=named.resource_kind,
        message=message,
        accesses=[first, second],
        fingerprint=compute_fingerprint("data-race", named.fingerprint_resource, [first, second]),
        hint=_hint(named, race),
        details=details,
    )


def _rng_what(a: Access) -> str:
    op = a.op or "a draw"
    if op.startswith("torch."):
        return f"{op}() in '{a.thread}'"
    return f"{op} in '{a.thread}'"


def _hazard_name(named: _Named, race: Race) -> str:
    meta = race.shadow.meta
    if meta.kind == "optimizer":
        return "optimizer state initialisation"
    if named.resource_kind in ("parameter", "buffer"):
        return "lazy module initialisation"
    if named.attr == "training":
        return "training flag"
    if named.attr.startswith("_") and named.attr.endswith("hooks"):
        return "hook registration"
    return "module attribute"


def _hint(named: _Named, race: Race) -> str:
    hazard = _hazard_name(named, race)
    if hazard == "training flag":
        return (
            "call model.train()/model.eval() once before starting the threads that run the model "
            "(or use a separate copy per mode); never switch modes while another thread runs forward"
        )
    if hazard == "hook registration":
        return (
            "register hooks before starting the threads that run the model, "
            "or guard registration and forward with one lock"
        )
    if hazard == "lazy module initialisation":
        return "materialise lazy modules with one dry-run forward before sharing the model between threads"
    if hazard == "optimizer state initialisation":
        return (
            "run the first optimizer.step() (which creates the state) before starting threads, "
            "or guard every step with one lock"
        )
    if named.attr == "forward":
        return (
            "patch forward before starting the threads that call the module, "
            "or guard the patch and every call with one lock"
        )
    return (
        "do not keep per-call results on a shared module (return them from forward instead), "
        "or guard every write and read of the attribute with one lock"
    )


def _mode_phrase(name: str, value: bool) -> str:
    return f"{name} {'enabled' if value else 'disabled'}"


def _report_mode_mismatch(s: Any, state: Any, origin: _Origin, module: Any, differ: list) -> None:
    site = current_site(1)
    path, _ = _module_path(s, module)
    submitter = Access(
        thread=origin.thread,
        timeline=f"thread:{origin.thread}",
        mode="write",
        op=f"{'Thread.start()' if origin.how == 'start' else 'executor.submit()'} with "
        + ", ".join(_mode_phrase(n, v) for n, v, _ in differ),
        locks_held=[s.lock_name(lk) for lk in origin.locks],
        stack=render_site(origin.site),
    )
    worker = Access(
        thread=state.name,
        timeline=f"thread:{state.name}",
        mode="read",
        op=f"{type(module).__name__}.__call__ with " + ", ".join(_mode_phrase(n, now) for n, _, now in differ),
        locks_held=[s.lock_name(lk) for lk in state.locks],
        stack=render_site(site),
        origin=s.render_origin(state.origin),
    )
    names = ", ".join(n for n, _, _ in differ)
    verb = "started" if origin.how == "start" else "submitted"
    where = _first_user_line(submitter)
    message = (
        f"{path} ran in thread '{worker.thread}' with "
        + ", ".join(_mode_phrase(n, now) for n, _, now in differ)
        + f", but its work was {verb} by '{submitter.thread}'"
        + (f" at {where}" if where else "")
        + " with "
        + ", ".join(_mode_phrase(n, v) for n, v, _ in differ)
        + (f": {names} is thread-local and does not" if len(differ) == 1 else f": {names} are thread-local and do not")
        + " follow work into other threads"
    )
    entered = [_MODE_CONTEXT.get(n, n) for n, v, _ in differ]
    finding = Finding(
        kind="thread-local-mode",
        severity="warning",
        resource=f"{path}.forward",
        resource_kind="module-attribute",
        message=message,
        accesses=[submitter, worker],
        hint=f"enter {' / '.join(entered)} inside the worker function (thread-local modes are not inherited)",
        details={"modes": {n: {"submitter": v, "worker": now} for n, v, now in differ}},
    )
    _emit(s, finding)


_MODE_CONTEXT = {
    "grad mode": "torch.no_grad()",
    "inference mode": "torch.inference_mode()",
    "autocast (cpu)": "torch.autocast('cpu')",
    "autocast (cuda)": "torch.autocast('cuda')",
}


def _first_user_line(a: Access) -> str | None:
    for f in a.stack:
        if f.user:
            return f"{os.path.basename(f.file)}:{f.line}"
    return None


# -- install / uninstall ---------------------------------------------------------------------------
def installed() -> bool:
    return _installed


def install(session: Any) -> None:
    """Patch torch for the hazards above and report to ``session``. Call once, right after the
    session is activated and before the target's first line; idempotent."""
    global _installed, _session, _LAZY_TYPES
    if session is not _session:
        # Locations hold access records with the previous session's timeline ids.
        _locs.clear()
        _grad_vars.clear()
        _groups.clear()
        _reported.clear()
    _session = session
    if _installed:
        return
    import torch.optim.optimizer as optimizer_mod
    import torch.serialization
    import torch.utils.hooks as hooks_mod
    from torch.nn.modules.lazy import LazyModuleMixin

    _LAZY_TYPES = (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)
    _orig["Module.__setattr__"] = nn.Module.__setattr__
    _orig["Module.__delattr__"] = nn.Module.__delattr__
    _orig["RemovableHandle.remove"] = hooks_mod.RemovableHandle.remove
    _orig["LazyModuleMixin._infer_parameters"] = LazyModuleMixin.__dict__["_infer_parameters"]
    _orig["Tensor.__reduce_ex__"] = torch.Tensor.__dict__["__reduce_ex__"]
    _orig["torch.save"] = torch.save
    _orig["torch.serialization.save"] = torch.serialization.save
    _orig["torch._C._set_grad_enabled"] = torch._C._set_grad_enabled
    _orig["torch.set_autocast_enabled"] = torch.set_autocast_enabled
    _orig["inference_mode.__enter__"] = torch.autograd.grad_mode.inference_mode.__dict__["__enter__"]
    for method, _ in _HOOK_METHODS:
        _orig[f"Module.{method}"] = nn.Module.__dict__[method]
    for name, _ in _RNG_FUNCTIONS:
        _orig[name] = getattr(torch, name.split(".", 1)[1])
        _orig["torch.random." + name.split(".", 1)[1]] = getattr(torch.random, name.split(".", 1)[1])

    nn.Module.__setattr__ = _module_setattr  # type: ignore[method-assign]
    nn.Module.__delattr__ = _module_delattr  # type: ignore[method-assign]
    for method, slot_name in _HOOK_METHODS:
        setattr(nn.Module, method, _hook_registrar(method, slot_name))
    hooks_mod.RemovableHandle.remove = _handle_remove  # type: ignore[method-assign]
    LazyModuleMixin._infer_parameters = _infer_parameters  # type: ignore[method-assign]
    torch.Tensor.__reduce_ex__ = _tensor_reduce_ex  # type: ignore[method-assign]
    _torch_save.__wrapped__ = _orig["torch.save"]  # type: ignore[attr-defined]
    _torch_save.__doc__ = _orig["torch.save"].__doc__
    torch.save = _torch_save
    torch.serialization.save = _torch_save
    torch._C._set_grad_enabled = _set_grad_enabled
    torch.set_autocast_enabled = _set_autocast_enabled
    torch.autograd.grad_mode.inference_mode.__enter__ = _inference_mode_enter  # type: ignore[method-assign]
    for name, is_write in _RNG_FUNCTIONS:
        attr = name.split(".", 1)[1]
        wrapped = _rng_call(name, is_write)
        setattr(torch, attr, wrapped)
        setattr(torch.random, attr, wrapped)
    _orig["optimizer_hook"] = optimizer_mod.register_optimizer_step_pre_hook(_optimizer_pre_hook)
    _installed = True


def uninstall() -> None:
    """Undo :func:`install` and forget every location (the session is over)."""
    global _installed, _session, _orig_call
    if not _installed:
        _session = None
        return
    import torch.serialization
    import torch.utils.hooks as hooks_mod
    from torch.nn.modules.lazy import LazyModuleMixin

    if _orig_call is not None:
        if nn.Module.__dict__.get("__call__") is _module_call:
            nn.Module.__call__ = _orig_call  # type: ignore[method-assign]
        _orig_call = None
    nn.Module.__setattr__ = _orig["Module.__setattr__"]  # type: ignore[method-assign]
    nn.Module.__delattr__ = _orig["Module.__delattr__"]  # type: ignore[method-assign]
    for method, _ in _HOOK_METHODS:
        setattr(nn.Module, method, _orig[f"Module.{method}"])
    hooks_mod.RemovableHandle.remove = _orig["RemovableHandle.remove"]  # type: ignore[method-assign]
    LazyModuleMixin._infer_parameters = _orig["LazyModuleMixin._infer_parameters"]  # type: ignore[method-assign]
    torch.Tensor.__reduce_ex__ = _orig["Tensor.__reduce_ex__"]  # type: ignore[method-assign]
    torch.save = _orig["torch.save"]
    torch.serialization.save = _orig["torch.serialization.save"]
    torch._C._set_grad_enabled = _orig["torch._C._set_grad_enabled"]
    torch.set_autocast_enabled = _orig["torch.set_autocast_enabled"]
    torch.autograd.grad_mode.inference_mode.__enter__ = _orig["inference_mode.__enter__"]  # type: ignore[method-assign]
    for name, _ in _RNG_FUNCTIONS:
        attr = name.split(".", 1)[1]
        setattr(torch, attr, _orig[name])
        setattr(torch.random, attr, _orig["torch.random." + attr])
    _orig["optimizer_hook"].remove()
    _session = None
    _locs.clear()
    _grad_vars.clear()
    _groups.clear()
    _reported.clear()
    _installed = False
