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
                           ``m.forward = f``), hook registration and removal,
                           ``functional_call``'s parameter and buffer swaps;
                           read: every module call reads ``training``,
                           ``forward`` and the forward/backward hook dicts
serialization              read of every tensor pickled (``torch.save``,          ``data-race`` on
                           ``pickle``: ``Tensor.__reduce_ex__``)                  the tensor
shared global RNG          write: every aten op drawing from the default          ``shared-rng``
                           generator (not on the meta device, which draws        (warning)
                           nothing), ``torch.manual_seed``/``seed``/
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

Wiring: the session never imports this package; :func:`install` registers the observers it
calls from ``Session.on_op`` (``hazard_rng_op`` before an RNG op, ``hazard_grad_accumulation`` /
``hazard_grad_accumulated`` around an op inside AccumulateGrad), and the sync package reports
thread starts and task submissions::

    hazards.install(session)       # activation (raceguard.process.install), after ``ACTIVE = session``
    hazards.uninstall()            # when a session ends in process (tests, the Python API)
    OpPlan.rng = is_rng_op(func)   # torch_ops.build_plan: once per op overload
    hazards.on_thread_start(s, thread)   # sync._thread_start, after s.fork() (parent side)
    hazards.on_submit(s, work_item)      # sync._work_item_init, after the submit edge

``RNG_OPS`` lists the op base names that draw from a generator; :func:`rng_generator` tells
which one (the ``generator`` argument, or the device's default generator when it is None or the
overload has none).

Each hazard's hooks live in a module of this package: ``attributes`` (module flags, attributes
and hooks), ``calls`` (module calls), ``lazy``, ``optimizer`` (state initialisation), ``grads``
(gradient accumulation), ``serialization``, ``rng``, ``modes`` (thread-local modes) and
``origins`` (where work was started or submitted), over ``locations`` (the shadow of each piece
of state), ``reporting`` and ``_state`` (the session and the originals). This module installs and
uninstalls them and re-exports the names the rest of raceguard uses.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..capture.identity import present_as
from ..capture.rng_ops import RNG_ALWAYS_DEFAULT, RNG_OPS, is_rng_op, rng_generator
from . import _state, calls, lazy
from ._state import _groups, _orig, _reported
from .attributes import SWAP_FUNCTIONS, _HOOK_METHODS, _handle_remove, _hook_registrar, _member_store
from .attributes import _module_delattr, _module_setattr
from .attributes import _unchanged  # noqa: F401 - re-exported (tests)
from .calls import _module_call
from .calls import watch_module_calls  # noqa: F401 - re-exported (tests)
from .grads import _grad_vars
from .grads import grad_accumulated, grad_accumulation  # noqa: F401 - re-exported (Session.on_op)
from .lazy import _infer_parameters
from .locations import CALL_SLOTS, _locs
from .locations import _covered, _loc, _ref  # noqa: F401 - re-exported (tests)
from .modes import _inference_mode_enter, _set_autocast_enabled, _set_grad_enabled
from .optimizer import _optimizer_pre_hook
from .optimizer import _runs  # noqa: F401 - re-exported (tests)
from .origins import on_submit, on_thread_start
from .rng import _RNG_FUNCTIONS, _rng_call, on_rng_draw, on_rng_op
from .serialization import _tensor_reduce_ex, _torch_save, record_tensor_reads


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
    "on_rng_draw",
    "on_thread_start",
    "on_submit",
    "record_tensor_reads",
]


# -- install / uninstall ---------------------------------------------------------------------------
def installed() -> bool:
    return _state._installed


def install(session: Any) -> None:
    """Patch torch for the hazards of this package and report to ``session``. Call once, right
    after the session is activated and before the target's first line; idempotent."""
    if session is not _state._session:
        # Locations hold access records with the previous session's timeline ids.
        _locs.clear()
        _grad_vars.clear()
        _groups.clear()
        _reported.clear()
    _state._session = session
    session.hazard_rng_op = on_rng_op
    session.hazard_rng_draw = on_rng_draw
    session.hazard_grad_accumulation = grad_accumulation
    session.hazard_grad_accumulated = grad_accumulated
    if _state._installed:
        return
    import torch.nn.utils._named_member_accessor as accessor_mod
    import torch.optim.optimizer as optimizer_mod
    import torch.serialization
    import torch.utils.hooks as hooks_mod
    from torch.nn.modules.lazy import LazyModuleMixin

    lazy._LAZY_TYPES = (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)
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
    for function in SWAP_FUNCTIONS:
        _orig[f"_named_member_accessor.{function}"] = getattr(accessor_mod, function)
    for name, _ in _RNG_FUNCTIONS:
        _orig[name] = getattr(torch, name.split(".", 1)[1])
        _orig["torch.random." + name.split(".", 1)[1]] = getattr(torch.random, name.split(".", 1)[1])

    # Each replacement carries the name, qualified name, module and doc of what it replaces.
    for new, original in (
        (_module_setattr, "Module.__setattr__"),
        (_module_delattr, "Module.__delattr__"),
        (_handle_remove, "RemovableHandle.remove"),
        (_infer_parameters, "LazyModuleMixin._infer_parameters"),
        (_tensor_reduce_ex, "Tensor.__reduce_ex__"),
        (_torch_save, "torch.save"),
        (_set_grad_enabled, "torch._C._set_grad_enabled"),
        (_set_autocast_enabled, "torch.set_autocast_enabled"),
        (_inference_mode_enter, "inference_mode.__enter__"),
    ):
        present_as(new, _orig[original])
    nn.Module.__setattr__ = _module_setattr  # type: ignore[method-assign]
    nn.Module.__delattr__ = _module_delattr  # type: ignore[method-assign]
    for method, slot_name in _HOOK_METHODS:
        setattr(nn.Module, method, _hook_registrar(method, slot_name))
    hooks_mod.RemovableHandle.remove = _handle_remove  # type: ignore[method-assign]
    for function in SWAP_FUNCTIONS:  # NamedMemberAccessor looks them up as module globals
        setattr(accessor_mod, function, _member_store(function))
    LazyModuleMixin._infer_parameters = _infer_parameters  # type: ignore[method-assign]
    torch.Tensor.__reduce_ex__ = _tensor_reduce_ex  # type: ignore[method-assign]
    _torch_save.__wrapped__ = _orig["torch.save"]  # type: ignore[attr-defined]
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
    _state._installed = True


def _unregister(session: Any) -> None:
    if session is not None:
        for name in ("hazard_rng_op", "hazard_rng_draw", "hazard_grad_accumulation", "hazard_grad_accumulated"):
            session.__dict__.pop(name, None)


def uninstall() -> None:
    """Undo :func:`install` and forget every location (the session is over)."""
    _unregister(_state._session)
    if not _state._installed:
        _state._session = None
        return
    import torch.nn.utils._named_member_accessor as accessor_mod
    import torch.serialization
    import torch.utils.hooks as hooks_mod
    from torch.nn.modules.lazy import LazyModuleMixin

    if calls._orig_call is not None:
        if nn.Module.__dict__.get("__call__") is _module_call:
            nn.Module.__call__ = calls._orig_call  # type: ignore[method-assign]
        calls._orig_call = None
    nn.Module.__setattr__ = _orig["Module.__setattr__"]  # type: ignore[method-assign]
    nn.Module.__delattr__ = _orig["Module.__delattr__"]  # type: ignore[method-assign]
    for method, _ in _HOOK_METHODS:
        setattr(nn.Module, method, _orig[f"Module.{method}"])
    hooks_mod.RemovableHandle.remove = _orig["RemovableHandle.remove"]  # type: ignore[method-assign]
    for function in SWAP_FUNCTIONS:
        setattr(accessor_mod, function, _orig[f"_named_member_accessor.{function}"])
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
    _state._session = None
    _locs.clear()
    _grad_vars.clear()
    _groups.clear()
    _reported.clear()
    _state._installed = False
