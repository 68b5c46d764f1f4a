"""Monkeypatches of torch.cuda's Python API (``Stream.wait_stream``, ``Event.record``,
``torch.cuda.synchronize``, ``Tensor.record_stream`` ...), applied by :func:`.cuda.install` and
undone exactly, each reporting to the active tracker after the real call returned."""

from __future__ import annotations

import _thread
from typing import Any, Callable

from ..capture.identity import present_as

_tls = _thread._local()  # depth of patched torch.cuda API calls in this thread


def in_api() -> bool:
    """Whether this thread is inside a patched API call (whose trace callbacks are muted)."""
    return getattr(_tls, "depth", 0) > 0


_MISSING = object()


class Patches:
    """Monkeypatches applied by one install(), undone exactly (never clobbering a later patch)."""

    def __init__(self) -> None:
        self.applied: list[tuple[Any, str, Any, Any]] = []

    def wrap(self, owner: Any, attr: str, make: Callable[[Callable], Callable]) -> None:
        current = getattr(owner, attr, None)
        if current is None:
            return
        original = owner.__dict__.get(attr, _MISSING) if hasattr(owner, "__dict__") else _MISSING
        wrapper = make(current)
        wrapper.__wrapped__ = current  # type: ignore[attr-defined]
        present_as(wrapper, current)
        setattr(owner, attr, wrapper)
        self.applied.append((owner, attr, original, wrapper))

    def undo(self) -> None:
        for owner, attr, original, wrapper in reversed(self.applied):
            if getattr(owner, "__dict__", {}).get(attr) is wrapper:
                if original is _MISSING:
                    delattr(owner, attr)
                else:
                    setattr(owner, attr, original)
        self.applied = []


def hook_failed(session: Any, what: str, exc: BaseException, ordering: bool = False) -> None:
    """Count a contained failure of a CUDA hook on ``session`` (see ``Session.hook_failed``)."""
    report = getattr(session, "hook_failed", None)
    if report is not None:
        report(what, exc, ordering)


def _api(method: Callable, active: Callable[[], Any], after: Callable[..., None]) -> Callable:
    """A patched API: run ``method`` with the trace's sync callbacks muted, then tell the active
    tracker (``active()``) ``after(tracker, result, *args, **kwargs)``. Outside a session: the
    plain method."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tracker = active()
        if tracker is None or not tracker.active or in_api():
            return method(*args, **kwargs)
        sched = tracker.session.sched
        if sched is not None:
            # Under stress/replay a stream or event call is a scheduling point, like a tensor op:
            # which host thread records or waits first is what the schedule decides.
            try:
                sched.op_point()
            except Exception as exc:  # ScheduleAborted is a SystemExit: it passes
                hook_failed(tracker.session, "a scheduling point before a CUDA API call", exc)
        _tls.depth = getattr(_tls, "depth", 0) + 1
        try:
            result = method(*args, **kwargs)
        finally:
            _tls.depth -= 1
        try:
            after(tracker, result, *args, **kwargs)
        except Exception as exc:  # the synchronisation is lost, the target's call stands
            hook_failed(tracker.session, f"following {getattr(method, '__qualname__', method)}", exc, True)
        return result

    return wrapper


def patch_apis(patches: "Patches", targets: dict, active: Callable[[], Any]) -> None:
    """Patch the API classes in ``targets`` (torch's, or the simulation's) to report to ``active()``."""
    stream_cls = targets.get("Stream")
    event_cls = targets.get("Event")
    cuda_mod = targets.get("cuda")
    tensor_cls = targets.get("Tensor")
    if stream_cls is not None:
        patches.wrap(
            stream_cls, "wait_stream", lambda m: _api(m, active, lambda t, r, this, stream: t.api_wait_stream(this, stream))
        )
        patches.wrap(
            stream_cls, "wait_event", lambda m: _api(m, active, lambda t, r, this, event: t.api_event_wait(event, this))
        )
        patches.wrap(stream_cls, "synchronize", lambda m: _api(m, active, lambda t, r, this: t.api_stream_synchronize(this)))
        patches.wrap(
            stream_cls, "query", lambda m: _api(m, active, lambda t, r, this: t.api_stream_synchronize(this) if r else None)
        )
    if event_cls is not None:
        patches.wrap(
            event_cls,
            "record",
            lambda m: _api(m, active, lambda t, r, e, stream=None: t.api_event_record(e, stream)),
        )
        patches.wrap(
            event_cls, "wait", lambda m: _api(m, active, lambda t, r, e, stream=None: t.api_event_wait(e, stream))
        )
        patches.wrap(event_cls, "synchronize", lambda m: _api(m, active, lambda t, r, e: t.api_event_synchronize(e)))
        patches.wrap(event_cls, "query", lambda m: _api(m, active, lambda t, r, e: t.api_event_synchronize(e) if r else None))
    if cuda_mod is not None:
        patches.wrap(
            cuda_mod, "synchronize", lambda m: _api(m, active, lambda t, r, device=None: t.api_device_synchronize(device))
        )
        patches.wrap(cuda_mod, "empty_cache", lambda m: _api(m, active, lambda t, r: t.api_empty_cache()))
    if tensor_cls is not None:
        patches.wrap(
            tensor_cls, "record_stream", lambda m: _api(m, active, lambda t, r, this, stream: t.api_record_stream(this, stream))
        )


def torch_targets() -> dict:
    import torch

    return {"Stream": torch.cuda.Stream, "Event": torch.cuda.Event, "cuda": torch.cuda, "Tensor": torch.Tensor}
