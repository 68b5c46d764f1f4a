"""TorchScript under the Python dispatch mode: step aside where the mode cannot run faithfully.

Three things break with *any* Python ``TorchDispatchMode`` entered, raceguard's or a no-op one
(torch 2.13), so in those places the calling thread runs with its mode suspended
(``torch._C._DisableTorchDispatch``: the Python dispatch keys excluded, exactly the dispatch of a
thread without a mode) and the calls are counted; their ops are not recorded:

* **Scripted and traced code** (``ScriptFunction`` / ``ScriptMethod`` calls). The TorchScript
  interpreter hands the mode its arguments converted to Python objects, and a wrapped number (the
  ``1`` of ``x + 1`` in a traced graph) arrives as a Python ``int``, which ops such as
  ``aten::view`` or ``aten::equal`` then refuse: ``Expected a value of type 'Tensor'``. An error
  raised inside the mode also reaches the user as an empty ``RuntimeError:`` (the interpreter
  loses the Python exception's message), ``torch.jit.fork`` tasks included.
* **Tracing** (``torch.jit.trace`` / ``trace_module`` and ``torch.onnx`` through the same
  ``torch._C`` entry points): the traced function's check runs the traced graph, as above.
* **ThroughputBenchmark**. Its calling threads are C++ threads that copy the caller's dispatch
  key set (Python key included) but not its mode stack: an op whose tensors have no Python object
  then hits ``INTERNAL ASSERT FAILED ... Hit Python dispatch key but no arguments had
  PyInterpreter`` and the process aborts. Suspending the mode in the calling thread gives the
  benchmark threads a key set without the Python key.

The mode is suspended only where it is the calling thread's one dispatch mode (a target's own
mode stacked on it stays as it is). Counts per kind go to :meth:`Session.not_captured`, and the
report lists them under ``incomplete``. The native recorder (a RecordFunction observer) sees
these ops; with it no mode is entered and these wrappers pass straight through.
"""

from __future__ import annotations

import _thread
from typing import Any, Callable

import torch

from . import session as session_mod
from .identity import present_as, shield

# Kinds of skipped calls, as the report names them.
SCRIPTED = "TorchScript"
TRACING = "torch.jit.trace"
BENCHMARK = "ThroughputBenchmark"

_PYTHON_KEY = torch._C.DispatchKey.Python
_get_ident = _thread.get_ident
_stack_len = torch._C._len_torch_dispatch_stack
_stack_at = torch._C._get_dispatch_stack_at
_key_excluded = torch._C._dispatch_tls_is_dispatch_key_excluded
_DisableTorchDispatch = torch._C._DisableTorchDispatch


def _patch_points() -> list[tuple[Any, str, str]]:
    """(owner, attribute, kind) of every entry point into code the mode cannot follow."""
    C = torch._C
    points = [
        (C.ScriptFunction, "__call__", SCRIPTED),
        (C.ScriptMethod, "__call__", SCRIPTED),
        (C, "_create_function_from_trace", TRACING),
        (C, "_create_function_from_trace_with_dict", TRACING),
        (C, "_create_graph_by_tracing", TRACING),
        (C.ScriptModule, "_create_method_from_trace", TRACING),
        (C.ScriptModule, "_create_method_from_trace_with_dict", TRACING),
        (C.ThroughputBenchmark, "benchmark", BENCHMARK),
        (C.ThroughputBenchmark, "run_once", BENCHMARK),
    ]
    return [(owner, attr, kind) for owner, attr, kind in points if hasattr(owner, attr)]


# (owner, attribute) -> (original, replacement), while installed.
_installed: dict[tuple[Any, str], tuple[Any, Any]] = {}
_guard = _thread.allocate_lock()


def _suspension() -> Any:
    """The guard that suspends the calling thread's raceguard mode for one call, or None where
    nothing needs suspending: no session, the native recorder (no mode), the mode already
    suspended, or another dispatch mode on the stack."""
    session = session_mod.ACTIVE
    if session is None:
        return None
    state = session.states.get(_get_ident())
    mode = getattr(state, "mode", None)
    if mode is None or _stack_len() != 1 or _stack_at(0) is not mode:
        return None
    if _key_excluded(_PYTHON_KEY):  # inside another suspended call: counted there
        return None
    return session


def stepping_aside(original: Callable, kind: str) -> Callable:
    """``original`` run with the calling thread's dispatch mode suspended, counted as ``kind``.
    raceguard's own bookkeeping never raises into the call; ``original`` runs exactly once."""

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            session = _suspension()
        except Exception as exc:  # raceguard's own failure: the call runs as it would have before
            _failed(f"deciding whether to step aside for {kind}", exc)
            session = None
        if session is None:
            return original(*args, **kwargs)
        try:
            session.not_captured(kind)
        except Exception as exc:  # the count is lost, the call still steps aside
            _failed(f"counting a {kind} call run without op capture", exc)
        with _DisableTorchDispatch():
            return original(*args, **kwargs)

    present_as(call, original)
    call.__wrapped__ = original  # type: ignore[attr-defined]
    shield(call.__code__)
    return call


def _failed(what: str, exc: Exception) -> None:
    session = session_mod.ACTIVE
    if session is not None:
        session.hook_failed(what, exc)


def install() -> None:
    """Wrap the entry points (once per process; idempotent)."""
    with _guard:
        for owner, attr, kind in _patch_points():
            if (owner, attr) in _installed:
                continue
            original = getattr(owner, attr)
            replacement = stepping_aside(original, kind)
            setattr(owner, attr, replacement)
            _installed[(owner, attr)] = (original, replacement)


def uninstall() -> None:
    """Put the originals back, unless someone replaced our wrapper since."""
    with _guard:
        for (owner, attr), (original, replacement) in list(_installed.items()):
            if getattr(owner, attr, None) is replacement:
                setattr(owner, attr, original)
            del _installed[(owner, attr)]
