"""One detection run: wires captured events into the engines and turns their answers into findings.

The session owns the happens-before engine, the shadow memory of every storage, the per-thread
state, and the sink findings go to (a pipe to the supervising process under ``raceguard check``,
a list under the Python API). Instrumented primitives (:mod:`.sync`) and the dispatch mode
(:mod:`.torch_ops`) call into the module-level :data:`ACTIVE` session.
"""

from __future__ import annotations

import _thread
import collections
import os
import threading
import time
import traceback
import weakref
from typing import Any, Callable

import torch

from ..engine.hb import HappensBefore, Race, ShadowStorage, SyncVar
from ..engine.lockgraph import HeldLock, LockGraph
from ..engine.waitfor import Deadlock, ThreadJoin, WaitForGraph
from ..report.finding import Access, Finding, Origin, compute_fingerprint
# Imported now, not when first needed: the SIGTERM handler reports lock cycles, and an import
# the signal interrupts (or one running in another thread) leaves the module half-initialised.
from .lockreport import cycle_finding, deadlock_finding
from .naming import Namer, OpInfo, OriginSite, Resource, StorageMeta, StorageRef, race_finding, shape_of
from .stacks import current_site, op_site_function, render_site, site_of_traceback, user_key
from .torch_ops import AccessMode, byte_ranges, numbers_as_tensors, output_tensors, plan_for, plans_by_id, run_op, tensor_args

Sink = Callable[[dict], None]

# Findings that rest on the happens-before order raceguard recorded: after a synchronisation
# event was lost to raceguard's own error they may be false, and are reported suppressed.
ORDER_DERIVED_KINDS = frozenset({"data-race", "lock-order-cycle", "shared-rng"})
ORDERING_LOST_REASON = (
    "unreliable: raceguard lost a synchronisation event to its own internal error before this "
    "was found, so the order it saw may be incomplete (see the report's 'incomplete')"
)

# The session instrumented primitives report to; None when nothing is being watched.
ACTIVE: "Session | None" = None

_get_ident = _thread.get_ident
_op_site = op_site_function()  # the site of a tensor op (see on_op)
_plans_by_id = plans_by_id
_Tensor = torch.Tensor
# The autograd node running in this thread (None outside backward): checked inline per op, so the
# common case pays one C call (hazard_grad_accumulation does the rest; None on an old torch).
_autograd_node = getattr(torch._C, "_current_autograd_node", None)
_ACCUMULATE_GRAD = getattr(getattr(torch._C, "_functions", None), "AccumulateGrad", None)


class ThreadState:
    """Per-thread capture state: its timeline, the instrumented locks it holds, and where its
    current work came from."""

    __slots__ = (
        "tid", "thread_ref", "last_name", "held", "held_sites", "locks", "mode", "origin", "start_origin", "__weakref__"
    )

    def __init__(self, tid: int, thread: threading.Thread | None) -> None:
        self.tid = tid
        self.thread_ref = weakref.ref(thread) if thread is not None else None
        self.last_name = thread.name if thread is not None else f"thread-{tid}"
        self.held: list[Any] = []  # lock objects, outermost first
        self.held_sites: list[tuple] = []  # where each held lock was taken
        self.locks: tuple = ()  # immutable snapshot of `held`, shared by access records
        self.mode: AccessMode | None = None
        # Where the thread was started (its Thread.start() call), None for the main thread and
        # threads raceguard did not see start; `origin` is that, or while the thread runs an
        # executor/pool task, where the task was submitted. Accesses keep `origin` as recorded.
        self.start_origin: OriginSite | None = None
        self.origin: OriginSite | None = None

    @property
    def name(self) -> str:
        t = self.thread_ref() if self.thread_ref is not None else None
        if t is not None:
            self.last_name = t.name
        return self.last_name


class Session:
    # Observers that raceguard.hazards registers when it is installed for this session
    # (hazards reports *to* the session, which never imports it): an RNG op about to run
    # ``(session, state, func, args, kwargs)``; an op inside an AccumulateGrad node, before
    # ``(session, state) -> var | None`` and after its accesses ``(session, state, var)``.
    hazard_rng_op: Callable[..., None] | None = None
    # A random draw the native recorder saw ``(session, state, generator or None, device, op, site)``.
    hazard_rng_draw: Callable[..., None] | None = None
    hazard_grad_accumulation: Callable[..., Any] | None = None
    hazard_grad_accumulated: Callable[..., None] | None = None
    # Set by raceguard.multiprocess in a checked multi-process run: each access to a storage in
    # shared memory ``(session, tensor, storage, shadow, record)``, checked across processes.
    shared_access: Callable[..., None] | None = None

    def __init__(
        self,
        sink: Sink,
        *,
        main_globals: Callable[[], dict | None] = lambda: None,
        max_reports: int | None = None,
    ) -> None:
        self.sink = sink
        self.hb = HappensBefore()
        # Reentrant: a __del__ run by the garbage collector inside our bookkeeping may release an
        # instrumented lock on the same thread.
        self.lock = _thread.RLock()
        # The same lock for bookkeeping that changes no clock and no thread's state (hazard
        # locations): taking it does not first apply the native recorder's pending ops, which
        # the session's lock does (capture/native/backend.py), since nothing they depend on changes.
        self.quiet_lock = self.lock
        self.shadows: dict[int, ShadowStorage] = {}
        self._next_sweep = 4096
        # Storages that died since the last op (appended by their weak references' callback, in
        # whichever thread freed them): their shadows are dropped at once, so that per-op
        # bookkeeping does not pile up until a sweep and push the target into the garbage
        # collector's full collections (a fifth of the per-op cost before).
        self._dead: list[StorageRef] = []
        self._on_storage_death = self._dead.append
        self.states: dict[int, ThreadState] = {}
        self.timelines: list[ThreadState] = []
        self.namer = Namer(main_globals, lambda: self.cuda is not None)
        self.max_reports = max_reports
        self.ops = 0
        self.started = time.monotonic()
        self._race_groups: dict[tuple, dict] = {}
        self._reported = 0
        self.dropped = 0
        self._emit_lock = _thread.allocate_lock()
        self.lockgraph = LockGraph()
        self.waitfor = WaitForGraph()
        self.lock_refs: dict[int, weakref.ref] = {}
        self.sync_events = 0  # progress counter for the "everyone blocked" watchdog
        # OS ids of the threads that ended most recently (the process waits for them to be gone
        # before it finalizes: raceguard.process.thread_exits)
        self.ended_threads: collections.deque[int] = collections.deque(maxlen=1024)
        # Called after a deadlock finding was emitted; the child process ends the run there.
        self.on_deadlock: Callable[[], None] | None = None
        self._deadlock_reported = False
        self._cycles_reported: set[str] = set()
        self.benign_marks: list[tuple[weakref.ref, str]] = []
        # Events lost to raceguard's own failures (see hook_failed).
        self.internal_errors = 0
        self._hook_error_keys: set[tuple[str, str]] = set()
        # Calls run with this thread's mode suspended because it cannot follow them faithfully
        # (TorchScript, tracing, ThroughputBenchmark; see capture/torchscript.py), per kind.
        self.uncaptured: dict[str, int] = {}
        self.ordering_lost = False  # a synchronisation event was lost (see hook_failed)
        # CUDA streams as timelines (raceguard.cuda.tracker.CudaTracker), set by cuda.install() once
        # the target initialises CUDA; None otherwise: a CPU-only run pays one attribute check.
        self.cuda: Any = None
        # Asynchronous torch.distributed collectives (raceguard.distributed.tracker.DistTracker),
        # set by its install(); it names the races that involve a collective's timeline.
        self.dist: Any = None
        # The controlled scheduler (raceguard stress / replay), None otherwise: then the hot path
        # pays exactly one attribute check for it (see on_op).
        self.sched: Any = None
        # The native op recorder (capture/native) when it records this session's tensor ops
        # instead of the dispatch mode; it drains its records whenever self.lock is taken.
        self.native: Any = None

    # -- threads ---------------------------------------------------------------------------
    def current(self) -> ThreadState:
        ident = _get_ident()
        state = self.states.get(ident)
        if state is None:
            # Not threading.current_thread(): in a thread threading did not start it builds a
            # _DummyThread, whose Event would call back here forever.
            state = self.adopt_thread(threading._active.get(ident), None)
        return state

    def adopt_thread(self, thread: threading.Thread | None, tid: int | None) -> ThreadState:
        """Register the calling OS thread; ``tid`` is the timeline forked for it at ``start()``."""
        with self.lock:
            if tid is None:
                tid = self.hb.new_timeline(None)
            state = ThreadState(tid, thread)
            while len(self.timelines) <= tid:
                self.timelines.append(None)  # type: ignore[arg-type]
            self.timelines[tid] = state
            self.states[_get_ident()] = state
        return state

    def fork(self) -> int | None:
        """A timeline for a thread about to start, ordered after everything its parent did."""
        try:
            parent = self.current()
            with self.lock:
                return self.hb.new_timeline(parent.tid)
        except Exception as exc:
            self.hook_failed("starting a thread's timeline", exc, ordering=True)

    def enter_thread(self, thread: threading.Thread | None, tid: int | None) -> ThreadState:
        state = None
        try:
            state = self.adopt_thread(thread, tid)
            state.start_origin = state.origin = getattr(thread, "_rg_origin", None)
            if self.native is None:  # else the native recorder sees this thread's ops
                state.mode = AccessMode(self.on_op, state)
                state.mode.__enter__()
        except Exception as exc:  # the thread runs unwatched, exactly as without raceguard
            self.hook_failed("starting to watch a thread", exc, ordering=True)
            if state is None:
                state = ThreadState(-1, thread)
        return state

    def leave_thread(self, state: ThreadState, end_var: SyncVar | None) -> None:
        try:
            if state.mode is not None:
                try:
                    state.mode.__exit__(None, None, None)
                except Exception:
                    pass
                state.mode = None
            with self.lock:
                if end_var is not None:
                    self.hb.release(state.tid, end_var)
                state.last_name = state.name
                self.states.pop(_get_ident(), None)
                self.ended_threads.append(threading.get_native_id())
                self.waitfor.timeline_finished(state.tid)
                self.sync_events += 1
        except Exception as exc:
            self.hook_failed("ending a thread's timeline", exc, ordering=True)

    # -- where work comes from (origins) ---------------------------------------------------
    def capture_origin(self, kind: str) -> OriginSite | None:
        """The calling thread is starting a thread or submitting a task: where (a cheap site,
        rendered only if an access of that work is reported). Never raises."""
        try:
            return OriginSite(kind, _op_site(), self.current().tid)
        except Exception as exc:
            self.hook_failed("capturing where a thread or task came from", exc)
            return None

    def task_begin(self, origin: OriginSite | None) -> tuple[ThreadState, OriginSite | None] | None:
        """The calling (worker) thread starts a task submitted at ``origin``: its accesses name
        that submission until :meth:`task_end` with the returned token. Never raises."""
        try:
            state = self.current()
            previous = state.origin
            state.origin = origin
            return state, previous
        except Exception as exc:
            self.hook_failed("entering a submitted task", exc)
            return None

    def task_end(self, token: tuple[ThreadState, OriginSite | None] | None) -> None:
        if token is not None:
            token[0].origin = token[1]

    def origin_of(self, info: Any, tid: int | None) -> Origin | None:
        """The report's origin of an access recorded with ``info`` on timeline ``tid``: the one
        the access recorded, else (records that carry none, such as a CUDA stream's) where the
        thread of ``tid`` was started."""
        site = getattr(info, "origin", None)
        if site is None and tid is not None and 0 <= tid < len(self.timelines):
            state = self.timelines[tid]
            site = state.start_origin if state is not None else None
        return self.render_origin(site)

    def render_origin(self, site: OriginSite | None) -> Origin | None:
        if site is None:
            return None
        return Origin(kind=site.kind, stack=render_site(site.site), thread=self.thread_name(site.tid))

    # -- synchronisation -------------------------------------------------------------------
    def release(self, var: SyncVar) -> None:
        try:
            state = self.current()
            with self.lock:
                self.hb.release(state.tid, var)
        except Exception as exc:
            self.hook_failed("recording a release", exc, ordering=True)

    def acquire(self, var: SyncVar) -> None:
        try:
            state = self.current()
            with self.lock:
                self.hb.acquire(state.tid, var)
        except Exception as exc:
            self.hook_failed("recording an acquire", exc, ordering=True)

    def lock_acquired(self, lock: Any) -> None:
        """An instrumented lock was taken: happens-before, lock order, ownership."""
        try:
            state = self.current()
            site = current_site(2)
            key = lock._rg_key
            with self.lock:
                self.sync_events += 1
                self.hb.acquire(state.tid, lock._rg_var)
                if state.held:
                    held = [HeldLock(h._rg_key, hs) for h, hs in zip(state.held, state.held_sites)]
                    self.lockgraph.on_acquire(state.tid, key, held, site)
                else:
                    self.lockgraph.on_acquire(state.tid, key, (), site)
                state.held.append(lock)
                state.held_sites.append(site)
                state.locks = tuple(state.held)
                if key not in self.lock_refs:
                    self.lock_refs[key] = weakref.ref(lock)
                self.waitfor.set_owner(key, state.tid, reentrant=lock._rg_reentrant)
        except Exception as exc:
            self.hook_failed("recording a lock acquisition", exc, ordering=True)

    def lock_released(self, lock: Any) -> None:
        try:
            state = self.current()
            with self.lock:
                self.sync_events += 1
                self.hb.release(state.tid, lock._rg_var)
                owner = state
                if lock not in state.held:  # a Lock released by another thread than its owner
                    owner = next((s for s in self.states.values() if lock in s.held), state)
                held = owner.held
                for i in range(len(held) - 1, -1, -1):
                    if held[i] is lock:
                        del held[i]
                        del owner.held_sites[i]
                        break
                owner.locks = tuple(held)
                self.waitfor.set_owner(lock._rg_key, None)
        except Exception as exc:
            self.hook_failed("recording a lock release", exc, ordering=True)

    # -- blocking waits (deadlock detection) -----------------------------------------------
    def wait_begin(self, resource: Any, forever: bool) -> ThreadState | None:
        """The calling thread is about to block on ``resource`` (a lock key, a ThreadJoin or an
        anonymous key). Only waits without a timeout can be part of a deadlock."""
        try:
            if not forever:
                return None
            state = self.current()
            site = current_site(2)
            with self.lock:
                self.sync_events += 1
                if isinstance(resource, ThreadJoin):
                    deadlock = self.waitfor.block_on_timeline(state.tid, resource.timeline, site)
                else:
                    deadlock = self.waitfor.block(state.tid, resource, site)
            if deadlock is not None:
                self.report_deadlock(deadlock)
            return state
        except Exception as exc:
            self.hook_failed("recording a blocking wait", exc)

    def wait_end(self, state: ThreadState | None) -> None:
        try:
            if state is not None:
                with self.lock:
                    self.sync_events += 1
                    self.waitfor.unblock(state.tid)
        except Exception as exc:
            self.hook_failed("recording the end of a wait", exc)

    def check_all_blocked(self) -> Deadlock | None:
        with self.lock:
            live = [s.tid for s in self.states.values()]
            return self.waitfor.all_blocked(live)

    def report_deadlock(self, deadlock: Deadlock) -> None:
        with self.lock:
            if self._deadlock_reported:
                return
            self._deadlock_reported = True
        try:
            finding = deadlock_finding(self, deadlock)
            self.emit({"type": "finding", "finding": finding.to_dict()})
            self.report_lock_cycles()
        except Exception as exc:
            self._internal_error("reporting a deadlock", exc)
        if self.on_deadlock is not None:
            self.on_deadlock()

    def report_lock_cycles(self) -> None:
        """Emit every feasible lock-order cycle seen so far (once each)."""
        try:
            for cycle in self.lockgraph.cycles():
                finding = cycle_finding(self, cycle)
                if finding.fingerprint in self._cycles_reported:
                    continue
                self._cycles_reported.add(finding.fingerprint)
                if self._room_for_report():
                    self.emit({"type": "finding", "finding": finding.to_dict()})
        except Exception as exc:
            self._internal_error("reporting lock-order cycles", exc)

    def thread_name(self, tid: int) -> str:
        state = self.timelines[tid] if tid < len(self.timelines) else None
        return state.name if state is not None else f"thread-{tid}"

    def lock_by_key(self, key: Any) -> Any:
        ref = self.lock_refs.get(key)
        return ref() if ref is not None else None

    # -- tensor ops (hot path) -------------------------------------------------------------
    # Every aten op of every instrumented thread comes through on_op, so it is written for speed:
    # the site is taken by torch's C++ stack capture (stacks.op_site_function), plans are found
    # by id(func), and a contiguous tensor goes to HappensBefore.access_range directly (whose
    # fast path handles an interval only this timeline ever touched).
    #
    # It is also a hook boundary: whatever raceguard's bookkeeping raises before or after the op
    # is caught and counted (the op's accesses are lost, see hook_failed), and ``func`` runs
    # exactly once, outside both guards, so the target sees its own result or its own exception.
    # Only the scheduler's ScheduleAborted (a SystemExit, meant to unwind the thread) passes.
    def on_op(self, state: ThreadState, func: Any, args: tuple, kwargs: dict) -> Any:
        races: list[Race] = []
        try:
            if self.sched is not None:  # a scheduling point before every tensor op
                self.sched.op_point()
            plan = _plans_by_id.get(id(func)) or plan_for(func)
            if plan.rng and self.hazard_rng_op is not None:
                self.hazard_rng_op(self, state, func, args, kwargs)
            site = _op_site()
            info = OpInfo(site, plan.name, state.locks, state.origin)
            inputs: list[int] = []
            if plan.metadata_only:
                accessed = ()
            else:
                accessed = tensor_args(plan, args, kwargs)
            tid = state.tid
            # Inside the autograd engine's AccumulateGrad: its per-parameter mutex, taken (else None).
            # Taken before the launch below, so a CUDA accumulation is ordered by it too.
            acc = node = None
            if _autograd_node is not None:
                node = _autograd_node()
                if node is not None and self.hazard_grad_accumulation is not None:  # inside backward
                    acc = self.hazard_grad_accumulation(self, state)
            cuda = self.cuda
            if cuda is not None and accessed:
                # CUDA tensors (and the pinned host side of non_blocking copies) also go to
                # stream timelines.
                accessed = cuda.before_op(state, plan, accessed, args, kwargs, info)
            with self.lock:
                self.ops += 1
                if self._dead:
                    self._reap()
                if not accessed:
                    pass
                elif plan.fresh_input:
                    for t, _ in accessed:
                        self._fresh(t, info, tid, inputs)
                else:
                    hb = self.hb
                    shadows = self.shadows
                    read_rec = write_rec = None
                    shared = self.shared_access
                    for t, is_write in accessed:
                        try:
                            st = t.untyped_storage()
                        except Exception:  # sparse, nested: no plain storage to track
                            continue
                        cd = st._cdata
                        inputs.append(cd)
                        sh = shadows.get(cd)
                        if sh is None or sh.meta.ref() is not st:
                            ref = StorageRef(st, self._on_storage_death, cd)
                            sh = shadows[cd] = ShadowStorage(
                                StorageMeta(ref, t.dtype, shape_of(t), site, seen_only=True)
                            )
                        if is_write:
                            rec = write_rec
                            if rec is None:
                                rec = write_rec = hb.record(tid, True, info)
                        else:
                            rec = read_rec
                            if rec is None:
                                rec = read_rec = hb.record(tid, False, info)
                        if t.is_contiguous():  # one byte range, without building a list of them
                            es = t.element_size()
                            lo = t.storage_offset() * es
                            hb.access_range(sh, lo, lo + t.numel() * es, rec, races)
                        else:
                            hb.access(sh, byte_ranges(t), rec, races)
                        if shared is not None and (st.is_shared() or shared.awaiting):
                            shared(self, t, st, sh, rec)
        except Exception as exc:  # with CUDA an op can be a synchronisation (.item(), copies)
            self.hook_failed("recording a tensor op", exc, self.cuda is not None)
            return run_op(func, args, kwargs)
        retry = None
        try:
            out = func(*args, **kwargs)
        except RuntimeError as exc:  # refused before it ran: a wrapped number torch gave us as a number?
            retry = numbers_as_tensors(func, args, kwargs, exc)
            if retry is None:
                raise  # the op's own error, unchanged
        if retry is not None:
            args, kwargs = retry
            out = func(*args, **kwargs)
        try:
            cuda = self.cuda  # again: this op may have initialised CUDA
            if type(out) is _Tensor and cuda is None:
                with self.lock:
                    self._fresh(out, info, tid, inputs)
            else:
                outs = output_tensors(out)
                if cuda is not None:
                    outs = cuda.after_op(state, plan, outs, args, kwargs, info)
                if outs:
                    if len(inputs) > 8:  # _foreach_* ops: many inputs, many outputs
                        inputs = set(inputs)
                    with self.lock:
                        for o in outs:
                            self._fresh(o, info, tid, inputs)
            if node is not None and type(node) is _ACCUMULATE_GRAD:  # a gradient installed
                self.namer.note_grad(node.variable, plan.name, accessed, out)
            if acc is not None:
                self.hazard_grad_accumulated(self, state, acc)
            if races:
                self.report_races(races)
        except Exception as exc:
            self.hook_failed("recording a tensor op's results", exc, self.cuda is not None)
        return out

    def _fresh(self, t: Any, info: OpInfo, tid: int, inputs: Any) -> None:
        """Register an output in storage no input had: new memory, written by this op."""
        try:
            st = t.untyped_storage()
        except Exception:
            return
        cd = st._cdata
        if cd in inputs:
            return
        shadows = self.shadows
        sh = shadows.get(cd)
        if sh is not None and sh.meta.ref() is st:
            return
        # (A second output in the same new storage finds this shadow and returns above.)
        meta = StorageMeta(StorageRef(st, self._on_storage_death, cd), t.dtype, shape_of(t), info.site)
        shadows[cd] = ShadowStorage(meta, self.hb.record_creation(tid, info), st.nbytes())
        if len(shadows) > self._next_sweep:
            self._sweep()

    def _reap(self) -> None:
        """Drop the shadows of storages that died (under the session lock)."""
        dead = self._dead
        shadows = self.shadows
        while dead:
            ref = dead.pop()
            sh = shadows.get(ref.cd)
            if sh is not None and sh.meta.ref is ref:
                del shadows[ref.cd]

    def _sweep(self) -> None:
        dead = [cd for cd, sh in self.shadows.items() if sh.meta.ref() is None]
        for cd in dead:
            del self.shadows[cd]
        self._next_sweep = max(4096, 2 * len(self.shadows))

    # -- findings --------------------------------------------------------------------------
    def emit(self, event: dict) -> None:
        if self.ordering_lost and event.get("type") == "finding":
            finding = event["finding"]
            if finding.get("kind") in ORDER_DERIVED_KINDS and not finding.get("suppressed"):
                # Never a finding about the target that raceguard's own failure may have made.
                event = {**event, "finding": {**finding, "suppressed": ORDERING_LOST_REASON}}
        with self._emit_lock:
            self.sink(event)
        if event.get("type") in ("finding", "hook-error"):
            # Statistics travel with every finding and lost event: a crash right after loses
            # neither. Counted outside the emit lock: counting applies the ops the native
            # recorder still holds, which can report a race, i.e. emit again and take the
            # session's lock (whose holder may be waiting for the emit lock).
            stats = self.stats()
            with self._emit_lock:
                self.sink({"type": "stats", "stats": stats})

    def _room_for_report(self) -> bool:
        if self.max_reports is not None and self._reported >= self.max_reports:
            self.dropped += 1
            return False
        self._reported += 1
        return True

    def report_races(self, races: list[Race]) -> None:
        if self.dist is not None and self.dist.model.by_tid:
            races = self.dist.take_races(races)
        if self.cuda is not None:  # races involving a stream timeline are named by the tracker
            races = self.cuda.take_races(races)
        for race in races:
            try:
                self._report_race(race)
            except Exception as exc:  # never let reporting break the target
                self._internal_error("naming a data race", exc)

    def _report_race(self, race: Race) -> None:
        e, l = race.earlier, race.later
        storage = race.shadow.meta.ref()
        benign = self._benign_reason(storage) if self.benign_marks and storage is not None else None
        pair = (
            tuple(sorted([(user_key(e.info.site), e.is_write), (user_key(l.info.site), l.is_write)])),
            benign,  # intentional races never share a finding with unintended ones
        )
        with self.lock:
            group = self._race_groups.get(pair)
            if group is not None and (id(race.shadow) in group["shadows"] or len(group["shadows"]) > 64):
                return
            if group is None:
                group = self._race_groups[pair] = {"shadows": set(), "resources": set(), "fingerprint": None}
            group["shadows"].add(id(race.shadow))
        if storage is None:
            return
        resource = self.namer.name_storage(storage, race.lo, race.hi, race.shadow.meta)
        if group["fingerprint"] is not None:
            if resource.name not in group["resources"]:
                group["resources"].add(resource.name)
                self.emit({"type": "also_on", "fingerprint": group["fingerprint"], "resource": resource.name})
            return
        finding = self._race_finding(race, resource)
        if benign is not None:
            finding.suppressed = f"raceguard.benign: {benign}"
        group["fingerprint"] = finding.fingerprint
        group["resources"].add(resource.name)
        if self._room_for_report():
            self.emit({"type": "finding", "finding": finding.to_dict()})

    # -- intentional races (raceguard.benign) ------------------------------------------------
    def mark_benign(self, obj: Any, reason: str) -> None:
        """Races on these tensors are intentional (Hogwild): report them as suppressed."""
        import torch

        if isinstance(obj, (torch.Tensor, torch.nn.Module)):
            targets = [obj]
        else:
            targets = list(obj)  # parameters(), a list of tensors or modules
        with self.lock:
            for target in targets:
                self.benign_marks.append((weakref.ref(target), reason))

    def _benign_reason(self, storage: Any) -> str | None:
        import torch

        cdata = storage._cdata
        for ref, reason in list(self.benign_marks):
            target = ref()
            if target is None:
                continue
            if isinstance(target, torch.nn.Module):
                tensors = [*target.parameters(), *target.buffers()]
            else:
                tensors = [target]
            grads = self.namer.grads_readable()  # never while another thread runs backward
            for t in tensors:
                grad = t.grad if grads and isinstance(t, torch.Tensor) and t.requires_grad else None
                for candidate in (t, grad):
                    if candidate is not None and candidate.untyped_storage()._cdata == cdata:
                        return reason
        return None

    def _access(self, rec: Any) -> Access:
        """The report's view of a recorded access (the session's and the hazard hooks' alike)."""
        state = self.timelines[rec.timeline] if rec.timeline < len(self.timelines) else None
        name = state.name if state is not None else f"thread-{rec.timeline}"
        return Access(
            thread=name,
            timeline=f"thread:{name}",
            mode="write" if rec.is_write else "read",
            op=rec.info.op,
            locks_held=[self.lock_name(lk) for lk in rec.info.locks],
            stack=render_site(rec.info.site),
            origin=self.origin_of(rec.info, rec.timeline),
        )

    def _race_finding(self, race: Race, resource: Resource) -> Finding:
        first, second = self._access(race.earlier), self._access(race.later)
        kind_word = resource.kind.replace("-", " ")
        what = resource.name if resource.kind == "tensor" else f"{kind_word} {resource.name}"
        message = (
            f"data race on {what}: {first.mode} by '{first.thread}' vs {second.mode} by '{second.thread}'"
        )
        why = (
            f"nothing orders these accesses: at its {second.mode}, '{second.thread}' had synchronised with "
            f"'{first.thread}' only up to that thread's epoch {race.seen_epoch}, and the {first.mode} happened "
            f"in epoch {race.earlier.epoch} (no lock, join, event, queue, barrier or future in between)"
        )
        if first.locks_held or second.locks_held:
            common = set(first.locks_held) & set(second.locks_held)
            if not common:
                why += " (they hold different locks)"
        hint = _race_hint(first, second, resource)
        return race_finding(resource, message, first, second, hint, {"why": why, "bytes": [race.lo, race.hi]})

    def lock_name(self, lock: Any) -> str:
        site = getattr(lock, "_rg_site", None)
        where = _site_location(site)
        try:
            name = self.namer.name_lock(lock, site)
        except Exception:
            name = None
        if name and name.endswith("._lock") and getattr(lock, "_rg_kind", "") == "Condition":
            name = name[: -len("._lock")]  # a Condition's own lock is named after the Condition
        label = name or getattr(lock, "_rg_kind", type(lock).__name__)
        return f"{label} ({where})" if where else label

    def thread_exception(self, args: Any) -> None:
        """threading.excepthook: an exception escaped a thread and Python only prints it."""
        try:
            thread = args.thread
            name = thread.name if thread is not None else "<unknown thread>"
            state = self.states.get(getattr(thread, "ident", None) or _get_ident())
            site = site_of_traceback(args.exc_traceback)
            exc_text = "".join(traceback.format_exception_only(args.exc_type, args.exc_value)).strip()
            tb_text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
            access = Access(
                thread=name,
                timeline=f"thread:{name}",
                mode="raise",
                op=None,
                locks_held=[self.lock_name(lk) for lk in (state.locks if state else ())],
                stack=render_site(site),
                origin=self.render_origin(state.origin) if state is not None else None,
            )
            finding = Finding(
                kind="thread-exception",
                resource=f"thread '{name}'",
                resource_kind="thread",
                message=f"exception escaped thread '{name}': {exc_text}",
                accesses=[access],
                fingerprint=compute_fingerprint("thread-exception", args.exc_type.__name__, [access]),
                hint="catch and report exceptions inside the thread, or run the work through an "
                "executor and call future.result() so the failure reaches the caller",
                details={"traceback": tb_text, "exception": exc_text},
            )
            if self._room_for_report():
                self.emit({"type": "finding", "finding": finding.to_dict()})
        except Exception as exc:
            self._internal_error("reporting a thread exception", exc)

    # Distinct failures whose traceback is sent; beyond, failures are only counted.
    MAX_HOOK_ERROR_REPORTS = 8

    def hook_failed(self, what: str, exc: BaseException, ordering: bool = False) -> None:
        """A hook of raceguard's raised while ``what``: the event it was recording is lost, the
        target goes on exactly as without raceguard. Counted in ``stats.internal_errors``; the
        first traceback of each distinct failure goes to the report, which then says the
        analysis is incomplete. ``ordering``: the lost event was a synchronisation, so later
        races and lock-order cycles may be artefacts of the loss (they are reported suppressed,
        see emit). Never raises."""
        try:
            if ordering:
                self.ordering_lost = True
            self.internal_errors += 1
            key = (what, type(exc).__name__)
            if key in self._hook_error_keys or len(self._hook_error_keys) >= self.MAX_HOOK_ERROR_REPORTS:
                return
            self._hook_error_keys.add(key)
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            self.emit(
                {"type": "hook-error", "message": f"raceguard failed while {what}: {exc!r}", "traceback": text}
            )
        except Exception:
            pass  # the sink itself failed: nothing more can be said, and the target must go on

    # Failures while reporting (naming a race, a deadlock, a thread's exception) are hook
    # failures too: the finding is lost, not the run.
    _internal_error = hook_failed

    def not_captured(self, kind: str) -> None:
        """One call of ``kind`` runs without op capture (its ops are not seen)."""
        with self.lock:
            self.uncaptured[kind] = self.uncaptured.get(kind, 0) + 1

    def stats(self) -> dict:
        stats = {
            "threads": sum(1 for s in self.timelines if s is not None),
            "ops": self.ops,
            "dropped_reports": self.dropped,
        }
        if self.internal_errors:
            stats["internal_errors"] = self.internal_errors
        if self.uncaptured:
            stats["not_captured"] = dict(self.uncaptured)
        if self.cuda is not None:
            stats.update(self.cuda.stats())
        return stats


def _site_location(site: Any) -> str | None:
    if not site:
        return None
    for frame in render_site(site):
        if frame.user:
            return f"{os.path.basename(frame.file)}:{frame.line}"
    return None


def _race_hint(first: Access, second: Access, resource: Resource) -> str:
    if first.locks_held and second.locks_held:
        return "the two accesses hold different locks: protect this tensor with one lock in both places"
    if resource.kind in ("parameter", "optimizer-state", "grad"):
        return (
            "take one lock around the training step and around every reader of the model, or "
            "publish a snapshot (clone under that lock) instead of reading live tensors"
        )
    if resource.kind == "buffer":
        return (
            "buffers are written by forward in train mode: call model.eval() before sharing the "
            "model, or serialise forward calls with a lock"
        )
    return "order the two accesses: guard both with one lock, or hand the tensor over through a queue or event"
