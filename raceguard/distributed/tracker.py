"""torch.distributed collectives and point-to-point ops launched with ``async_op=True``.

Such an op keeps reading and writing its tensors after the call returned, until the program
learns that it finished. The session's dispatch mode sees the ``c10d::*`` op at its launch, as a
host access of the launching thread (and that is the whole truth for a blocking op, which has
finished when the call returns: blocking collectives order what they touch). For an asynchronous
op this module adds what happens next: its accesses on a *lane* of the process group
(:mod:`raceguard.engine.collectives`), complete for the program only once it waits:

* ``work.wait()``, ``work.is_completed()`` returning True;
* ``work.get_future()`` then ``.wait()`` / ``.value()`` / ``.done()`` returning True, and the
  callbacks of ``.then(cb)`` / ``.add_done_callback(cb)``, which run after the op (the future
  ``then`` returns completes after its callback);
* ``dist.barrier(group)`` on the same group (gloo and NCCL finish earlier work first).

A host access in between is a ``data-race`` named like any other (``model.weight.grad``), with
the launch line and the access line.

Patched: the public launch functions of ``torch.distributed`` (table below, in both
``torch.distributed`` and ``torch.distributed.distributed_c10d``), ``Work.wait`` /
``is_completed`` / ``get_future`` and ``torch.Future.wait`` / ``value`` / ``done`` / ``then`` /
``add_done_callback``. What is left out, on purpose:

* ops launched inside the autograd engine (a Python DDP communication hook): DDP's reducer
  waits on them in C++ before ``backward()`` returns, where Python sees no wait; they count as
  blocking. DDP's own bucketed all-reduce never passes through Python at all: the dispatch mode
  sees its ``c10d::allreduce_`` as a host access of the thread running backward, which is how
  DDP orders it, so a correct DDP loop is clean and a background thread races exactly as in one
  process;
* CUDA tensors (NCCL): the CUDA tracker sees the op as a kernel on the current stream; see
  ``docs/distributed.md`` for how the communicator's stream fits the stream model.

Every hook is contained (``Session.hook_failed``): the target's call runs exactly once and its
result or exception is the target's own.
"""

from __future__ import annotations

import _thread
import functools
import inspect
import weakref
from typing import Any, Callable

from ..engine.collectives import CollectiveModel, Pending
from ..engine.hb import AccessRecord, Race, ShadowStorage
from ..report.finding import Access, Finding
from ..capture.naming import Resource, StorageMeta, race_finding, shape_of
from ..capture.stacks import current_site, first_user_location, render_site, user_key
from ..capture.torch_ops import byte_ranges

# The tracker the patched APIs report to (one session at a time, like session.ACTIVE).
_ACTIVE: "DistTracker | None" = None
_tls = _thread._local()  # depth of patched launch functions in this thread (only the outermost counts)

# Works and futures not yet forgotten; beyond this many, completed ones are dropped (a later
# wait on a dropped one then orders nothing: it can add a report, never hide one).
MAX_TRACKED = 4096

R, W = False, True


def _t(v: Any) -> list:
    """The tensors in an argument: a tensor, a list of tensors, a list of lists, or None."""
    import torch

    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        out = []
        for x in v:
            out.extend(_t(x))
        return out
    return []


def _is_root(b: dict, key: str, group_key: str) -> bool:
    """Whether this rank is ``src``/``dst`` of a rooted collective (global or group rank)."""
    import torch.distributed as dist

    if b.get(key) is not None:
        return dist.get_rank() == b[key]
    if b.get(group_key) is not None:
        return dist.get_rank(b.get("group")) == b[group_key]
    return False


def _accesses_all_reduce(b: dict) -> list:
    return [(t, W) for t in _t(b.get("tensor")) + _t(b.get("tensors"))]


def _accesses_broadcast(b: dict) -> list:
    mode = R if _is_root(b, "src", "group_src") else W
    return [(t, mode) for t in _t(b["tensor"])]


def _accesses_reduce(b: dict) -> list:
    mode = W if _is_root(b, "dst", "group_dst") else R
    return [(t, mode) for t in _t(b["tensor"])]


def _out_in(out: str, inp: str) -> Callable[[dict], list]:
    def accesses(b: dict) -> list:
        return [(t, R) for t in _t(b.get(inp))] + [(t, W) for t in _t(b.get(out))]

    return accesses


# name -> what the op reads and writes, from its bound arguments.
LAUNCHES: dict[str, Callable[[dict], list]] = {
    "all_reduce": _accesses_all_reduce,
    "all_reduce_coalesced": _accesses_all_reduce,
    "broadcast": _accesses_broadcast,
    "reduce": _accesses_reduce,
    "all_gather": _out_in("tensor_list", "tensor"),
    "all_gather_coalesced": _out_in("output_tensor_lists", "input_tensor_list"),
    "all_gather_into_tensor": _out_in("output_tensor", "input_tensor"),
    "reduce_scatter": _out_in("output", "input_list"),
    "reduce_scatter_tensor": _out_in("output", "input"),
    "all_to_all_single": _out_in("output", "input"),
    "all_to_all": _out_in("output_tensor_list", "input_tensor_list"),
    "gather": _out_in("gather_list", "tensor"),
    "scatter": _out_in("tensor", "scatter_list"),
    "isend": lambda b: [(t, R) for t in _t(b["tensor"])],
    "irecv": lambda b: [(t, W) for t in _t(b["tensor"])],
    "barrier": lambda b: [],
    "batch_isend_irecv": lambda b: [],  # per op, see _launch_batch
}


class LaunchInfo:
    """Payload of an access recorded on a lane: where and by whom the op was launched."""

    __slots__ = ("site", "op", "locks", "host", "group", "stream")

    def __init__(self, site: tuple, op: str, host: int, group: str) -> None:
        self.site = site
        self.op = op
        self.locks = ()  # a lock held at the launch does not protect the op running after it
        self.host = host
        self.group = group
        self.stream = None


class DistTracker:
    def __init__(self, session: Any) -> None:
        self.session = session
        self.model = CollectiveModel(session.hb)
        # id(work or future) -> (the object, kept alive so the id stays its own; its pendings)
        self.tracked: dict[int, tuple[Any, list[Pending]]] = {}
        self._groups: dict[tuple, dict] = {}

    # -- launches ------------------------------------------------------------------------------
    def group_label(self, group: Any) -> str:
        import torch.distributed as dist

        default = dist.distributed_c10d._get_default_group()
        if group is None or group is default or group is dist.GroupMember.WORLD:
            return "default"
        name = getattr(group, "group_name", None)
        return f"group {name}" if name else f"group@{id(group):x}"

    def launched(self, name: str, accesses: list, group: Any, site: tuple, result: Any) -> None:
        """``name`` returned ``result``: a Work when launched asynchronously."""
        import torch.distributed as dist

        Work = dist.Work
        session = self.session
        label = self.group_label(group)
        if name == "barrier":
            if isinstance(result, Work):
                with session.lock:
                    pending = self.model.barrier(label, None)
                self._track(result, [pending])
            else:  # returned: every op launched on the group before it finished
                state = session.current()
                with session.lock:
                    self.model.complete_group(state.tid, label)
            return
        if not isinstance(result, Work):
            return  # blocking: the dispatch mode recorded it on the host, and it has finished
        if any(t.device.type != "cpu" for t, _ in accesses):
            return  # CUDA (NCCL): the CUDA tracker's stream model (docs/distributed.md)
        pending = self._launch(name, accesses, label, site)
        self._track(result, [pending])

    def _launch(self, name: str, accesses: list, label: str, site: tuple) -> Pending:
        session = self.session
        state = session.current()
        races: list[Race] = []
        info = LaunchInfo(site, f"{name} (async_op=True)", state.tid, label)
        with session.lock:
            pending = self.model.launch(state.tid, label, info)
            tid = pending.lane.tid
            hb = session.hb
            for t, is_write in accesses:
                st = t.untyped_storage()
                cd = st._cdata
                sh = session.shadows.get(cd)
                if sh is None or sh.meta.ref() is not st:
                    sh = session.shadows[cd] = ShadowStorage(
                        StorageMeta(weakref.ref(st), t.dtype, shape_of(t), site, seen_only=True)
                    )
                hb.access(sh, byte_ranges(t), hb.record(tid, is_write, info), races)
            self.model.launched(pending)
        if races:
            session.report_races(races)
        return pending

    def launched_batch(self, ops: list, site: tuple, result: Any) -> None:
        """``batch_isend_irecv``: one op per entry; one Work each, or one for all (coalesced)."""
        import torch.distributed as dist

        works = [w for w in (result or ()) if isinstance(w, dist.Work)]
        if not works:
            return
        pendings = []
        for p2p in ops:
            t = p2p.tensor
            if t.device.type != "cpu":
                continue
            is_send = getattr(p2p.op, "__name__", "") in ("isend", "send")
            name = "isend" if is_send else "irecv"
            pendings.append(self._launch(name, [(t, R if is_send else W)], self.group_label(p2p.group), site))
        if len(works) == len(pendings):
            for w, p in zip(works, pendings):
                self._track(w, [p])
        else:  # coalesced: waiting on any of the works waits for the whole batch
            for w in works:
                self._track(w, pendings)

    def _track(self, obj: Any, pendings: list[Pending]) -> None:
        with self.session.lock:
            entry = self.tracked.get(id(obj))
            if entry is not None and entry[0] is obj:
                entry[1].extend(p for p in pendings if p not in entry[1])
                return
            self.tracked[id(obj)] = (obj, list(pendings))
            if len(self.tracked) > MAX_TRACKED:
                self._prune()

    def _prune(self) -> None:
        done = [k for k, (_, ps) in self.tracked.items() if all(p.done for p in ps)]
        for k in done[: max(len(done), len(self.tracked) - MAX_TRACKED // 2)]:
            del self.tracked[k]
        while len(self.tracked) > MAX_TRACKED:
            del self.tracked[next(iter(self.tracked))]

    def pendings_of(self, obj: Any) -> list[Pending] | None:
        entry = self.tracked.get(id(obj))
        if entry is None or entry[0] is not obj:
            return None
        return entry[1]

    # -- completion ----------------------------------------------------------------------------
    def done(self, obj: Any) -> None:
        """The calling thread learnt that ``obj`` (a Work or a Future) finished."""
        pendings = self.pendings_of(obj)
        if not pendings:
            return
        state = self.session.current()
        with self.session.lock:
            for p in pendings:
                self.model.complete(state.tid, p)

    def future_of(self, work: Any, future: Any) -> None:
        pendings = self.pendings_of(work)
        if pendings:
            self._track(future, pendings)

    def chained(self, parent: Any, child: Any, after: Pending) -> None:
        """``child`` (from ``parent.then``) completes after the callback, which released ``after``."""
        pendings = self.pendings_of(parent) or []
        self._track(child, [*pendings, after])

    # -- reports -------------------------------------------------------------------------------
    def owns(self, race: Race) -> bool:
        by_tid = self.model.by_tid
        return race.earlier.timeline in by_tid or race.later.timeline in by_tid

    def take_races(self, races: list[Race]) -> list[Race]:
        """Report races involving a lane; return the others for the session (or CUDA tracker)."""
        mine = [r for r in races if self.owns(r)]
        if not mine:
            return races
        for race in mine:
            try:
                self._report_race(race)
            except Exception as exc:  # never let reporting break the target
                self.session._internal_error("naming a data race with a collective", exc)
        return [r for r in races if not self.owns(r)]

    def _access(self, rec: AccessRecord) -> Access:
        lane = self.model.by_tid.get(rec.timeline)
        if lane is None:
            return self.session._access(rec)
        info = rec.info
        return Access(
            thread=self.session.thread_name(info.host),
            timeline=lane.label,
            mode="write" if rec.is_write else "read",
            op=info.op,
            locks_held=[],
            stack=render_site(info.site),
            details={"collective": info.op.split(" ")[0], "process_group": info.group, "async_op": True},
        )

    def _report_race(self, race: Race) -> None:
        session = self.session
        e, l = race.earlier, race.later
        storage = race.shadow.meta.ref()
        if storage is None:
            return
        resource = session.namer.name_storage(storage, race.lo, race.hi, race.shadow.meta)
        benign = session._benign_reason(storage) if session.benign_marks else None
        pair = tuple(sorted([(user_key(e.info.site), e.is_write), (user_key(l.info.site), l.is_write)]))
        key = (pair, benign)
        with session.lock:
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = {"resources": set(), "fingerprint": None}
            if resource.name in group["resources"]:
                return
            group["resources"].add(resource.name)
            fp = group["fingerprint"]
            if fp is None:
                group["fingerprint"] = "pending"
        if fp is not None:
            if fp != "pending":
                session.emit({"type": "also_on", "fingerprint": fp, "resource": resource.name})
            return
        finding = self._finding(race, resource)
        if benign is not None:
            finding.suppressed = f"raceguard.benign: {benign}"
        group["fingerprint"] = finding.fingerprint
        if session._room_for_report():
            session.emit({"type": "finding", "finding": finding.to_dict()})

    def _finding(self, race: Race, resource: Resource) -> Finding:
        first, second = self._access(race.earlier), self._access(race.later)
        lane_first = race.earlier.timeline in self.model.by_tid
        coll, host = (first, second) if lane_first else (second, first)
        name = coll.details["collective"]
        group = coll.details["process_group"]
        coll_rec, host_rec = (race.earlier, race.later) if lane_first else (race.later, race.earlier)
        launch_at = first_user_location(coll_rec.info.site) or "its launch"
        host_at = first_user_location(host_rec.info.site) or "the host"
        kind_word = resource.kind.replace("-", " ")
        what = resource.name if resource.kind == "tensor" else f"{kind_word} {resource.name}"
        message = (
            f"data race on {what}: {name} with async_op=True (launched by '{coll.thread}' at "
            f"{launch_at}) {'writes' if coll.mode == 'write' else 'reads'} it in the background vs "
            f"{host.mode} by '{host.thread}' at {host_at}"
        )
        if lane_first:
            why = (
                f"the {name} launched at {launch_at} runs on process group '{group}' until the host "
                f"waits on it (work.wait(), work.is_completed() returning True, a wait on "
                f"work.get_future(), or dist.barrier() on the group); the {host.mode} at {host_at} "
                f"by '{host.thread}' came before any of them"
            )
            hint = (
                "call work.wait() before touching the tensor (in the thread that touches it, or hand "
                "over from the waiting thread through a lock, queue or event), or launch with "
                "async_op=False"
            )
        else:
            why = (
                f"the {host.mode} at {host_at} by '{host.thread}' is not ordered before the launch of "
                f"the {name} at {launch_at} (no lock, join, event, queue or future in between), so the "
                f"collective may run while it happens"
            )
            hint = "order the access before the launch: guard both with one lock, or hand over through a queue or event"
        return race_finding(resource, message, first, second, hint, {"why": why, "bytes": [race.lo, race.hi]})

    def stats(self) -> dict:
        return {"collectives_async": self.model.launches}


# -- patches ------------------------------------------------------------------------------------
def _failed(what: str, exc: BaseException) -> None:
    tracker = _ACTIVE
    if tracker is not None:
        tracker.session.hook_failed(what, exc, ordering=True)


def _in_autograd() -> bool:
    import torch

    return torch._C._current_autograd_node() is not None


def _wrap_launch(name: str, orig: Callable) -> Callable:
    signature = inspect.signature(orig)
    what = LAUNCHES[name]

    @functools.wraps(orig)
    def launch(*args: Any, **kwargs: Any) -> Any:
        tracker = _ACTIVE
        depth = getattr(_tls, "depth", 0)
        if tracker is None or depth:
            return orig(*args, **kwargs)
        plan = None
        try:
            if not _in_autograd():
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                b = bound.arguments
                plan = (what(b), b, current_site(1))
        except Exception as exc:
            _failed(f"recording the launch of {name}", exc)
        _tls.depth = depth + 1
        try:
            result = orig(*args, **kwargs)
        finally:
            _tls.depth = depth
        if plan is not None:
            accesses, b, site = plan
            try:
                if name == "batch_isend_irecv":
                    tracker.launched_batch(list(b["p2p_op_list"]), site, result)
                else:
                    tracker.launched(name, accesses, b.get("group"), site, result)
            except Exception as exc:
                _failed(f"recording the launch of {name}", exc)
        return result

    launch.__wrapped__ = orig  # type: ignore[attr-defined]
    return launch


def _after(orig: Callable, hook: Callable[..., None], what: str) -> Callable:
    """``orig`` with ``hook(self, result)`` after it, contained."""

    @functools.wraps(orig)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = orig(self, *args, **kwargs)
        if _ACTIVE is not None:
            try:
                hook(self, result)
            except Exception as exc:
                _failed(what, exc)
        return result

    method.__wrapped__ = orig  # type: ignore[attr-defined]
    return method


def _on_wait(obj: Any, result: Any) -> None:
    if result is not False:  # Work.wait returns True, or raises; Future.wait the value
        _ACTIVE.done(obj)


def _on_future_wait(obj: Any, result: Any) -> None:
    _ACTIVE.done(obj)


def _on_poll(obj: Any, result: Any) -> None:
    if result is True:
        _ACTIVE.done(obj)


def _on_future(work: Any, future: Any) -> None:
    _ACTIVE.future_of(work, future)


def _wrap_then(orig: Callable) -> Callable:
    """``fut.then(cb)``: ``cb`` runs after the op; the returned future completes after ``cb``."""
    @functools.wraps(orig)
    def then(self: Any, callback: Callable, *args: Any, **kwargs: Any) -> Any:
        tracker = _ACTIVE
        after = None
        try:
            if tracker is not None and tracker.pendings_of(self):
                after = Pending(None, None)
                callback = _callback(tracker, self, callback, after)
        except Exception as exc:
            _failed("recording a future's callback", exc)
        child = orig(self, callback, *args, **kwargs)
        if after is not None:
            try:
                tracker.chained(self, child, after)
            except Exception as exc:
                _failed("recording a future's callback", exc)
        return child

    then.__wrapped__ = orig  # type: ignore[attr-defined]
    return then


def _wrap_done_callback(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def add_done_callback(self: Any, callback: Callable, *args: Any, **kwargs: Any) -> Any:
        tracker = _ACTIVE
        try:
            if tracker is not None and tracker.pendings_of(self):
                callback = _callback(tracker, self, callback, None)
        except Exception as exc:
            _failed("recording a future's callback", exc)
        return orig(self, callback, *args, **kwargs)

    add_done_callback.__wrapped__ = orig  # type: ignore[attr-defined]
    return add_done_callback


def _callback(tracker: DistTracker, future: Any, callback: Callable, after: Pending | None) -> Callable:
    session = tracker.session

    def run(fut: Any) -> Any:
        try:
            tracker.done(future)
        except Exception as exc:
            _failed("ordering a future's callback after its op", exc)
        try:
            return callback(fut)
        finally:
            if after is not None:
                try:
                    state = session.current()
                    with session.lock:
                        session.hb.release(state.tid, after.var)
                except Exception as exc:
                    _failed("ordering a future's callback before its chained future", exc)

    return run


class _Patches:
    def __init__(self) -> None:
        self.undo: list[tuple[Any, str, Any, Any]] = []

    def set(self, owner: Any, attr: str, new: Any) -> None:
        old = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
        setattr(owner, attr, new)
        self.undo.append((owner, attr, old, new))

    def restore(self) -> None:
        for owner, attr, old, new in reversed(self.undo):
            current = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
            if current is new:  # never clobber a patch someone made since
                setattr(owner, attr, old)
        self.undo.clear()


_patches: _Patches | None = None


def install(session: Any) -> DistTracker | None:
    """Track asynchronous collectives for ``session``; None when torch.distributed is missing."""
    global _ACTIVE, _patches
    import torch

    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available():
        return None
    tracker = DistTracker(session)
    _ACTIVE = tracker
    session.dist = tracker
    if _patches is None:
        patches = _Patches()
        c10d = dist.distributed_c10d
        for name in LAUNCHES:
            orig = getattr(c10d, name, None)
            if orig is None:
                continue
            wrapped = _wrap_launch(name, orig)
            patches.set(c10d, name, wrapped)
            if getattr(dist, name, None) is orig:
                patches.set(dist, name, wrapped)
        Work = dist.Work
        patches.set(Work, "wait", _after(Work.wait, _on_wait, "recording a work's wait"))
        patches.set(Work, "is_completed", _after(Work.is_completed, _on_poll, "recording a work's completion"))
        patches.set(Work, "get_future", _after(Work.get_future, _on_future, "recording a work's future"))
        Future = torch._C.Future
        patches.set(Future, "wait", _after(Future.wait, _on_future_wait, "recording a future's wait"))
        patches.set(Future, "value", _after(Future.value, _on_future_wait, "recording a future's value"))
        patches.set(Future, "done", _after(Future.done, _on_poll, "recording a future's completion"))
        patches.set(Future, "then", _wrap_then(Future.then))
        patches.set(Future, "add_done_callback", _wrap_done_callback(Future.add_done_callback))
        _patches = patches
    return tracker


def uninstall(session: Any) -> None:
    global _ACTIVE, _patches
    if _ACTIVE is not None and _ACTIVE.session is session:
        _ACTIVE = None
        if _patches is not None:
            _patches.restore()
            _patches = None
    if getattr(session, "dist", None) is not None:
        session.dist = None
