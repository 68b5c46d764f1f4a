"""Module flags, attributes and hooks: ``Module.__setattr__`` / ``__delattr__`` (so
``train()`` / ``eval()``, ``self.x = ...`` in forward, ``m.forward = f``) and hook registration
and removal are writes of the module's location, one slot per attribute name; storing the value
already there is a read. So are the stores torch makes straight into a module's ``_parameters``,
``_buffers`` and ``_modules`` dicts, bypassing ``__setattr__``: ``torch.func.functional_call``
swapping the given tensors in and the originals back (``swap_tensor`` / ``set_tensor`` /
``swap_submodule`` of ``torch.nn.utils._named_member_accessor``).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import nn

from ..capture.identity import present_as
from . import _state, lazy
from ._state import _orig, _tls
from .locations import SWAP_FUNCTIONS, _module_loc, _record, _slot
from .reporting import _internal_error, _report_races


# -- module flags, attributes and hooks ------------------------------------------------------
def _module_setattr(self: Any, name: str, value: Any) -> None:
    # A hook boundary on a hot path: one try, free while nothing raises; the store itself runs
    # once, outside it.
    s = _state._session
    try:
        if type(value) in lazy._LAZY_TYPES:
            lazy._mark_lazy(self, name, value)
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
    except Exception as exc:
        _internal_error(s, "recording a module attribute write", exc)
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
    s = _state._session
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


# -- direct stores into a module's member dicts (functional_call's swaps) -----------------------
_SWAP_STORES = {
    "swap_tensor": ("_parameters", "_buffers"),
    "set_tensor": ("_parameters", "_buffers"),
    "swap_submodule": ("_modules",),
}


def _member_store(function: str) -> Callable:
    """A replacement for ``_named_member_accessor.<function>(module, name, value, ...)`` that
    records the store as the module attribute's, as ``__setattr__`` would. Stores that go
    through ``setattr`` (a name in none of the member dicts) are recorded there instead."""
    original = _orig[f"_named_member_accessor.{function}"]
    stores = _SWAP_STORES[function]

    def store(module: Any, name: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        s = _state._session
        if s is not None and s.hb.timelines > 1 and not getattr(_tls, "quiet", 0):
            try:
                members = module.__dict__ if isinstance(module, nn.Module) else {}
                for store_name in stores:
                    held = members.get(store_name)
                    if held is not None and isinstance(name, str) and name in held:
                        same = _unchanged(held[name], value)
                        _attr_access(s, module, name, f"{function} {name}" + (" (same value)" if same else ""), not same)
                        break
            except Exception as exc:
                _internal_error(s, "recording a parameter swap", exc)
        return original(module, name, value, *args, **kwargs)

    return present_as(store, original)


def _hook_registrar(method: str, slot_name: str) -> Callable:
    original = getattr(nn.Module, method)

    def register(self: Any, *args: Any, **kwargs: Any) -> Any:
        s = _state._session
        if s is not None and s.hb.timelines > 1 and not getattr(_tls, "quiet", 0):
            _attr_write(s, self, slot_name, method)
        handle = original(self, *args, **kwargs)
        try:
            handle._rg_hz_owner = (weakref.ref(self), slot_name)
        except Exception:
            pass
        return handle

    register.__wrapped__ = original  # type: ignore[attr-defined]
    return present_as(register, original)


_HOOK_METHODS = (
    ("register_forward_pre_hook", "_forward_pre_hooks"),
    ("register_forward_hook", "_forward_hooks"),
    ("register_full_backward_pre_hook", "_backward_pre_hooks"),
    ("register_full_backward_hook", "_backward_hooks"),
    ("register_backward_hook", "_backward_hooks"),
)


def _handle_remove(self: Any) -> None:
    s = _state._session
    try:
        owner = self.__dict__.get("_rg_hz_owner")
        if owner is not None:
            module = owner[0]()
            if module is not None and s is not None and s.hb.timelines > 1 and not getattr(_tls, "quiet", 0):
                hooks = self.hooks_dict_ref()
                if hooks is not None and self.id in hooks:  # removing an already removed hook is a no-op
                    _attr_write(s, module, owner[1], "RemovableHandle.remove")
    except Exception as exc:
        _internal_error(s, "recording a hook removal", exc)
    _orig["RemovableHandle.remove"](self)
