"""The autograd engine's gradient accumulation: ops run inside a parameter's AccumulateGrad node
are ordered by one sync variable per parameter, as the engine's per-node mutex orders them
(:func:`grad_accumulation` / :func:`grad_accumulated`, called by ``Session.on_op``).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ..engine.hb import SyncVar
from .reporting import _internal_error


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
    except Exception as exc:  # never break the target; the engine's order is lost
        _internal_error(s, "ordering a gradient accumulation", exc, ordering=True)
        return None


def grad_accumulated(s: Any, state: Any, var: SyncVar) -> None:
    """The accumulation op that :func:`grad_accumulation` returned ``var`` for is recorded."""
    try:
        with s.lock:
            s.hb.release(state.tid, var)
    except Exception as exc:
        _internal_error(s, "ordering a gradient accumulation", exc, ordering=True)


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
