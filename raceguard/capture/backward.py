"""Which threads are inside the autograd engine, so that raceguard reads ``.grad`` only when safe.

The engine installs and replaces a parameter's gradient (AccumulateGrad) in C++ without the GIL,
under a mutex Python never sees. A Python read of ``param.grad`` on another thread at that moment
copies the gradient's pointer while the engine swaps it: a use-after-free that killed a checked
target with SIGSEGV (a timer thread naming a race while the main thread ran ``backward()``).
The target's own code takes that risk; raceguard must not add it (the first law). So every
backward that goes through ``torch.autograd.graph._engine_run_backward`` (``Tensor.backward``,
``torch.autograd.backward`` and ``torch.autograd.grad``) is bracketed here, and naming asks
:func:`grads_readable` before it reads a gradient: only when no *other* thread is inside the
engine. With a torch that lacks the function, gradients are never read (their races are then
named by shape and allocation site, not ``model.fc1.weight.grad``).
"""

from __future__ import annotations

import _thread
from typing import Any, Callable

from .identity import present_as, shield

# thread ident -> depth of backward calls it is inside (reentrant backward, e.g. checkpointing)
_inside: dict[int, int] = {}
_patched: list[tuple[Any, Callable]] = []  # (module, original) for each patched binding


_broken = False  # the bookkeeping failed once: gradients are never read again (conservative)
# Where the bookkeeping's own failures are counted (the session's hook_failed), set by install().
_report_failure: Callable[[str, BaseException], None] | None = None
# Called when a backward pass is about to start or has just ended with no thread inside the
# engine: the moments naming may read every ``.grad`` and note it (see set_safe_point), so that
# a gradient raced on later, while some thread is inside, has the name it would have had anyway.
_safe_point: Callable[[], Any] | None = None
# Held while the safe-point observer reads gradients. A thread entering the engine marks itself
# inside, then waits for a read in progress to end: otherwise a read that checked others_inside()
# just before could still be copying a .grad pointer when the engine swaps it (seen as SIGSEGV in
# a reader with four threads training at once).
_reading = _thread.allocate_lock()


def set_safe_point(observer: Callable[[], Any] | None) -> None:
    """``observer()`` runs on the thread entering or leaving backward, with no thread inside
    the engine; it stops early once :func:`others_inside` says a backward started meanwhile."""
    global _safe_point
    _safe_point = observer


def others_inside() -> bool:
    """Whether a thread other than the caller is inside the engine (reading .grad is unsafe)."""
    if not _inside:
        return False
    me = _thread.get_ident()
    return any(ident != me for ident in list(_inside))


def _at_safe_point() -> None:
    observer = _safe_point
    if observer is None or _inside or _broken:
        return
    if not _reading.acquire(False):  # another thread is reading them right now
        return
    try:
        observer()
    except Exception as exc:  # naming only: gradients are still read when safe
        report = _report_failure
        if report is not None:
            report("noting gradients between backward passes", exc)
    finally:
        _reading.release()


def _failed(what: str, exc: BaseException) -> None:
    global _broken
    _broken = True
    report = _report_failure
    if report is not None:
        report(what, exc)


def _bracket(original: Callable) -> Callable:
    def _engine_run_backward(*args: Any, **kwargs: Any) -> Any:
        me = _thread.get_ident()
        _at_safe_point()
        try:
            _inside[me] = _inside.get(me, 0) + 1  # only this thread writes its own key
            _reading.acquire()  # a read of gradients that started before ends first
            _reading.release()
        except Exception as exc:  # raceguard's own failure: never raised into the target
            _failed("noting a backward pass", exc)
        try:
            return original(*args, **kwargs)
        finally:
            try:
                depth = _inside.get(me, 1) - 1
                if depth > 0:
                    _inside[me] = depth
                else:
                    _inside.pop(me, None)
            except Exception as exc:
                _failed("noting the end of a backward pass", exc)
            _at_safe_point()

    _engine_run_backward.__wrapped__ = original  # type: ignore[attr-defined]
    return present_as(_engine_run_backward, original)


def install(report_failure: Callable[[str, BaseException], None] | None = None) -> bool:
    """Bracket the engine's entry point; False (nothing patched) when this torch has none.
    ``report_failure(what, exc)`` counts the bookkeeping's own failures (never the target's)."""
    global _report_failure
    _report_failure = report_failure
    if _patched:
        return True
    try:
        import torch.autograd as autograd
        import torch.autograd.graph as graph
    except Exception:
        return False
    original = getattr(graph, "_engine_run_backward", None)
    if original is None or not callable(original):
        return False
    wrapper = _bracket(original)
    shield(wrapper.__code__)  # Dynamo never traces raceguard (see compiled.py)
    # torch.autograd imports the name into its own namespace: both bindings are called.
    for module in (graph, autograd):
        if getattr(module, "_engine_run_backward", None) is original:
            _patched.append((module, original))
            module._engine_run_backward = wrapper
    return True


def uninstall() -> None:
    global _broken, _report_failure, _safe_point
    _report_failure = None
    _safe_point = None
    while _patched:
        module, original = _patched.pop()
        module._engine_run_backward = original
    _inside.clear()
    _broken = False


def grads_readable(own_backward: bool = True) -> bool:
    """Whether reading ``.grad`` from the calling thread is safe now: the engine entry point is
    bracketed and no other thread is inside it. ``own_backward=False`` when the calling thread's
    own backward may have nodes running elsewhere (CUDA device threads): then no thread at all."""
    if not _patched or _broken:
        return False
    inside = list(_inside)  # a copy taken under the GIL
    if not own_backward:
        return not inside
    me = _thread.get_ident()
    return all(ident == me for ident in inside)
