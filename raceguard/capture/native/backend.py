"""Drain the native recorder's records into a session, as ``Session.on_op`` would have.

Most records are applied in C++ (``fast_drain``: the native shadow memory of ``shadow.h``, with
the same transitions as the Python engine). A record, or the part of it, that could race or needs
what only Python does comes back here as a tuple, the storages it touches handed over to the
Python engine first (:meth:`NativeBackend._adopt`), and :meth:`NativeBackend._apply` makes exactly
the calls ``on_op`` makes: the same access records, shadows keyed by the storage's ``_cdata``,
creation records for fresh outputs, gradient accumulation ordering and naming, and race reports.

When: every use of the session's lock drains first (:class:`DrainingLock`). Every
synchronisation event, thread start and end, lock, queue, hazard and report goes through that
lock, so each thread's ops are applied before anything that changes its clock, and a thread's
locks and origin at drain time are those it had when it ran them. A background thread drains
when a buffer is 1/16 full, and the session's statistics (the heartbeat, the exit) drain too.
"""

from __future__ import annotations

import _thread
import os
from typing import Any

from ...engine.hb import AccessRecord, CreationRecord, ShadowStorage, SyncVar
from ..identity import present_as
from ..naming import GRAD_INPLACE_OPS, GRAD_RESULT_OPS, OpInfo, StorageMeta, StorageRef
from ..rng_ops import draw_conditions
from ..stacks import first_user_location, set_native_site_capture
from ..torch_ops import FRESH_INPUT, METADATA_ONLY, UNDECLARED_WRITES, byte_ranges

# Per-thread capacities: records, tensor accesses (inputs and outputs), frames.
DEFAULT_CAPACITY = (1 << 14, 1 << 15, 1 << 17)
DRAIN_INTERVAL_S = 0.05

# Access tuple fields (recorder.cpp access_tuple)
_F_WRITE, _F_CONTIG, _F_TRUNCATED = 1, 2, 8


class _Strided:
    """What :func:`byte_ranges` and ``Namer.note_grad`` read of a tensor, from a record."""

    __slots__ = ("_a",)

    def __init__(self, access: tuple) -> None:
        self._a = access

    def is_contiguous(self) -> bool:
        return bool(self._a[2] & _F_CONTIG)

    def element_size(self) -> int:
        return self._a[6]

    def numel(self) -> int:
        return self._a[7]

    def storage_offset(self) -> int:
        return self._a[5]

    @property
    def shape(self) -> tuple:
        return self._a[4]

    def stride(self) -> tuple:
        return self._a[8]


class DrainingLock:
    """The session's lock, draining pending op records whenever it is taken (not reentrantly)."""

    def __init__(self, lock: Any, drain: Any) -> None:
        self._lock = lock
        self._drain = drain

    def __enter__(self) -> bool:
        self._lock.acquire()
        self._drain()
        return True

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()

    def acquire(self, *args: Any, **kwargs: Any) -> bool:
        got = self._lock.acquire(*args, **kwargs)
        if got:
            self._drain()
        return got

    def release(self) -> None:
        self._lock.release()

    def _is_owned(self) -> bool:
        return self._lock._is_owned()

    def _at_fork_reinit(self) -> None:
        self._lock._at_fork_reinit()


class NativeBackend:
    """Records ops in C++ for ``session`` and applies them to it."""

    def __init__(self, module: Any, capacity: tuple[int, int, int] = DEFAULT_CAPACITY) -> None:
        self.module = module
        self.capacity = capacity
        self.session: Any = None
        self._plans: dict[int, tuple[str, bool, bool]] = {}
        self._plan_ids: dict[str, int] = {}
        self._native_states: dict[int, Any] = {}
        self._draining: set[int] = set()
        self.records_to_python = 0  # records the fast drain could not apply natively
        self._drainer_wanted = False  # a forked child's drainer starts at its first drain
        self.dead_accesses = 0  # accesses to storages freed before their record was drained
        self.unwatched_records = 0  # ops of Python threads raceguard does not watch
        self._lost_reported = 0
        self._script_frames: dict[int, ScriptFrame] = {}
        self._open_calls: list[_NativeCall] = []
        self._undo: list = []
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------------------------
    def attach(self, session: Any) -> None:
        """Record for ``session`` from now on (before it is activated)."""
        self.session = session
        session.native = self
        session.lock = DrainingLock(session.lock, self.drain)
        session.shadows = NativeShadows(self.module.take)
        self.module.configure_fast(self._context_of, self._adopt, session.shadows)
        stats = session.stats

        def stats_after_drain() -> dict:
            self.drain()
            out = stats()
            lost = self.module.stats()[0]
            if lost:
                out["native_lost_records"] = lost
            return out

        session.stats = stats_after_drain
        self._wrap_native_starters()
        self.module.configure_rng(draw_conditions())
        self.module.configure_grad_ops(sorted(GRAD_RESULT_OPS), sorted(GRAD_INPLACE_OPS))
        session.namer.native_grads = self.module
        session.namer.before_grad_scan = self._settle_grad_notes
        set_native_site_capture(self.module.current_site)
        self._undo.append(lambda: set_native_site_capture(None))
        self.module.install(sorted(METADATA_ONLY), sorted(FRESH_INPUT), dict(UNDECLARED_WRITES), *self.capacity)
        _thread.start_new_thread(self._drain_loop, ())
        os.register_at_fork(after_in_child=self._after_fork_in_child)

    def _after_fork_in_child(self) -> None:
        """A forked child keeps the session: it needs its own background drainer, started at its
        first drain rather than here (a child that looks at its threads right after fork, as
        CPython's own tests do with sys._current_frames(), must find only its own)."""
        if not self._stopped:
            self._draining.clear()
            self._drainer_wanted = True

    def _start_drainer(self) -> None:
        self._drainer_wanted = False
        try:
            _thread.start_new_thread(self._drain_loop, ())
        except Exception as exc:
            self.session.hook_failed("starting the native recorder's drainer in a forked child", exc)

    def _wrap_native_starters(self) -> None:
        """Calls that start C++ threads, wrapped so that those threads' timelines start from
        the calling thread's and end joined into it, and are named after the call."""
        import torch.utils.throughput_benchmark as tb

        original = tb.ThroughputBenchmark.benchmark
        backend = self

        def benchmark(self: Any, *args: Any, **kwargs: Any) -> Any:
            call = backend._native_call_begin("ThroughputBenchmark.benchmark")
            try:
                return original(self, *args, **kwargs)
            finally:
                backend._native_call_end(call)

        tb.ThroughputBenchmark.benchmark = present_as(benchmark, original)
        self._undo.append(lambda: setattr(tb.ThroughputBenchmark, "benchmark", original))

    def _native_call_begin(self, what: str) -> Any:
        try:
            s = self.session
            origin = s.capture_origin("thread-start")
            state = s.current()
            with s.lock:  # drains: the caller's accesses so far come before the call's threads
                call = _NativeCall(what, origin, state.tid, self.module.tick())
                self._open_calls.append(call)
            return call
        except Exception as exc:
            self.session.hook_failed("starting a native call's threads", exc, ordering=True)
            return None

    def _native_call_end(self, call: Any) -> None:
        if call is None:
            return
        try:
            s = self.session
            with s.lock:  # drains: the call's threads were joined before it returned
                self._open_calls.remove(call)
                for state in call.threads:
                    var = SyncVar()
                    s.hb.release(state.tid, var)
                    s.hb.acquire(call.tid, var)
        except Exception as exc:
            self.session.hook_failed("joining a native call's threads", exc, ordering=True)

    def _settle_grad_notes(self) -> bool:
        """Before naming's scan between backward passes reads ``.grad``: apply what is pending,
        so that ``engine_param()`` covers every accumulation of the passes that ended (reading
        an engine-made gradient from another thread crashed targets). False once the recorder
        no longer records: the engine's accumulations are then unknown, so no gradient is read."""
        if self._stopped or not self.module.recording():
            return False
        with self.session.lock:  # drains
            pass
        return not self._stopped

    def stop(self) -> None:
        for undo in self._undo:
            undo()
        self._undo.clear()
        self._stopped = True
        self.module.pause()
        self.module.wake()
        self.drain()

    def _drain_loop(self) -> None:
        while not self._stopped:
            try:
                self.module.wait(DRAIN_INTERVAL_S)
                if self._stopped:
                    return
                session = self.session
                with session.lock:  # drains
                    pass
            except BaseException:  # interpreter teardown: the thread just ends
                return

    # -- draining ----------------------------------------------------------------------------
    def drain(self) -> None:
        """Apply every published record. Never raises (a failure is raceguard's own, counted)."""
        if self._drainer_wanted:
            self._start_drainer()
        if not self.module.pending():  # the common case when the session's lock is taken
            return
        me = _thread.get_ident()
        if me in self._draining:  # a __del__ run by our own bookkeeping took the lock again
            return
        self._draining.add(me)
        try:
            s = self.session
            module = self.module
            shared = s.shared_access
            shared_mode = 0 if shared is None else (2 if shared.awaiting else 1)
            while True:
                try:
                    rec = module.fast_drain(shared_mode)
                except Exception as exc:  # that record is lost; the next drain goes on after it
                    s.hook_failed("applying natively recorded tensor ops", exc, ordering=True)
                    break
                if rec is None:
                    break
                try:
                    if not self._apply(s, rec) and (rec[7] is not None or self._plan(rec[2])[2]):
                        self._give_back(s, rec)
                except Exception as exc:
                    s.hook_failed("applying a natively recorded tensor op", exc, ordering=True)
            ops, dead, unwatched, slow, _, mutex_failures = module.fast_counts()
            s.ops += ops
            self.dead_accesses += dead
            self.unwatched_records += unwatched
            self.records_to_python += slow
            if s._dead:
                s._reap()
            if mutex_failures:
                s.hook_failed(
                    "applying natively recorded tensor ops",
                    RuntimeError(f"{mutex_failures} gradient accumulation mutex releases failed"),
                    ordering=True,
                )
            lost = module.stats()[0]
            if lost and not self._lost_reported:
                self._lost_reported = lost
                s.hook_failed(
                    "recording tensor ops natively",
                    RecordsLost(f"op records were dropped because a thread's buffer was full ({lost} so far)"),
                    ordering=True,
                )
        except Exception as exc:
            self.session.hook_failed("applying natively recorded tensor ops", exc, ordering=True)
        finally:
            self._draining.discard(me)

    def _context_of(self, key: int) -> Any:
        """What the fast drain needs of a thread's records: (timeline, its clock (the Python
        engine's own list, which a gradient accumulation's mutex advances in place), (locks,
        origin), whether the session has one timeline); False for a Python thread raceguard does
        not watch; None where Python must decide (a C++ thread seen for the first time)."""
        s = self.session
        try:
            state = s.states.get(key) if key > 0 else self._native_states.get(key)
            if state is None:
                return False if key > 0 else None
            tid = state.tid
            return (tid, s.hb.clock(tid), (state.locks, state.origin), s.hb.timelines == 1)
        except Exception as exc:  # the record goes to _apply, which meets the problem itself
            s.hook_failed("reading a thread's clock for natively recorded ops", exc)
            return None

    def _adopt(self, cd: int, storage: Any, dtype: Any, shape: tuple, site: Any, seen_only: bool, state: tuple) -> None:
        """A storage's shadow, kept natively until now, handed to the Python engine."""
        try:
            self._adopt_shadow(cd, storage, dtype, shape, site, seen_only, state)
        except Exception as exc:  # its accesses so far are lost: later races are unreliable
            self.session.hook_failed("handing a natively kept shadow to the Python engine", exc, ordering=True)

    def _adopt_shadow(self, cd: int, storage: Any, dtype: Any, shape: tuple, site: Any, seen_only: bool, state: tuple) -> None:
        s = self.session
        lo, hi, write, reads = state
        meta = StorageMeta(StorageRef(storage, s._on_storage_death, cd), dtype, shape, site, seen_only=seen_only)
        sh = ShadowStorage(meta)
        if lo is not None:
            restored = self._access_record
            if reads is None:
                kept = None
            elif type(reads) is list:
                kept = {r[0]: restored(r) for r in reads}
            else:
                kept = restored(reads)
            sh.restore(lo, hi, restored(write) if write is not None else None, kept)
        dict.__setitem__(s.shadows, cd, sh)

    def _access_record(self, fields: tuple) -> AccessRecord:
        timeline, epoch, is_write, creates, site, plan, (locks, origin) = fields
        info = OpInfo(site, self._plan(plan)[0], locks, origin)
        return (CreationRecord if creates else AccessRecord)(timeline, epoch, is_write, info)

    def _state(self, key: int, seq: int) -> Any:
        s = self.session
        if key > 0:
            return s.states.get(key)
        state = self._native_states.get(key)
        if state is None:
            from ..session import ThreadState

            # A C++ thread started by a call raceguard wraps (the latest one open before this
            # record) is ordered after that call's caller, else after nothing.
            call = next((c for c in reversed(self._open_calls) if c.start < seq), None)
            tid = s.hb.new_timeline(call.tid if call is not None else None)
            state = ThreadState(tid, None)
            state.last_name = f"native thread {-key}"
            if call is not None:
                call.threads.append(state)
                state.start_origin = state.origin = call.origin
                where = first_user_location(call.origin.site) if call.origin is not None else None
                state.last_name += f" started by {call.what}" + (f" at {where}" if where else "")
            while len(s.timelines) <= tid:
                s.timelines.append(None)
            s.timelines[tid] = state
            self._native_states[key] = state
        return state

    def _plan(self, pid: int) -> tuple[str, bool, bool]:
        plan = self._plans.get(pid)
        if plan is None:
            plan = self._plans[pid] = self.module.plan(pid)
            self._plan_ids[plan[0]] = pid
        return plan

    def _give_back(self, s: Any, rec: tuple) -> None:
        """After a gradient accumulation or a fresh-input op (``torch.tensor``: an optimizer's
        step counter) the Python engine applied without a race: the storages it touched go back
        to the fast drain where their shadow is one interval of op accesses, so that their next
        uses (the optimizer's use of the gradient, ``step += 1``) are decided natively too."""
        if s.shared_access is not None:
            return
        shadows = s.shadows
        for a in rec[5] + rec[6]:
            st = a[0]
            sh = dict.get(shadows, a[1])
            if st is None or sh is None or len(sh.starts) > 1 or sh.meta.ref() is not st:
                continue
            if sh.starts:
                cell = sh.cells[0]
                write = cell.write
                reads = cell.reads
                try:
                    state = (
                        sh.starts[0],
                        sh.ends[0],
                        None if write is None else self._native_access(write),
                        None if reads is None else (
                            [self._native_access(r) for r in reads.values()] if type(reads) is dict
                            else self._native_access(reads)
                        ),
                    )
                except _NotAnOp:
                    continue
            else:
                state = (None, None, None, None)
            meta = sh.meta
            if self.module.give(a[1], st, meta.dtype, tuple(meta.shape), meta.site, meta.seen_only, state):
                dict.__delitem__(shadows, a[1])

    def _native_access(self, rec: AccessRecord) -> tuple:
        """An access record as the fast drain keeps it (see give())."""
        info = rec.info
        pid = self._plan_ids.get(getattr(info, "op", None))
        if type(info) is not OpInfo or pid is None or info.stream is not None:
            raise _NotAnOp
        return (rec.timeline, rec.epoch, rec.is_write, rec.creates, info.site, pid, (info.locks, info.origin))

    def _script_site(self, site: tuple) -> tuple:
        """A site with TorchScript frames (None, id) made of :class:`ScriptFrame` stand-ins."""
        out = list(site)
        for i in range(0, len(out), 2):
            if out[i] is None:
                frame = self._script_frames.get(out[i + 1])
                if frame is None:
                    frame = self._script_frames[out[i + 1]] = ScriptFrame(*self.module.script_frame(out[i + 1]))
                out[i] = frame
                out[i + 1] = 0
        return tuple(out)

    def _apply(self, s: Any, rec: tuple) -> None:
        seq, key, pid, backward, site, accs, outs, param, draw = rec
        if site and site[0] is None:
            site = self._script_site(site)
        name, metadata_only, fresh_input = self._plan(pid)
        state = self._state(key, seq)
        if state is None:
            self.unwatched_records += 1
            return
        if draw is not None and s.hazard_rng_draw is not None:
            # An RNG op: (generator or None, device), told to the hazards before its accesses
            # and with the sequence of sync events the Python mode's hazard_rng_op sees.
            s.hazard_rng_draw(s, state, draw[0], draw[1], name, site)
        tid = state.tid
        info = OpInfo(site, name, state.locks, state.origin)
        hb = s.hb
        shadows = s.shadows
        races: list = []
        inputs: list[int] = []
        accessed: list = []
        s.ops += 1
        if s._dead:
            s._reap()
        mutex = param is not None and hb.timelines > 1
        if mutex:  # the engine's per-parameter accumulation mutex, kept natively (grad_mutex)
            self.module.grad_mutex(param._cdata, hb.clock(tid), tid, False)
        if metadata_only:
            accs = ()
        if fresh_input:
            for a in accs:
                self._fresh(s, a, info, tid, inputs)
        else:
            read_rec = write_rec = None
            shared = s.shared_access  # multiprocess: accesses to shared storages also go to the supervisor
            for a in accs:
                st = a[0]
                if st is None:
                    self.dead_accesses += 1
                    continue
                cd = a[1]
                inputs.append(cd)
                is_write = bool(a[2] & _F_WRITE)
                if param is not None:
                    accessed.append((a[9], is_write))
                sh = shadows.get(cd)
                if sh is None or sh.meta.ref() is not st:
                    ref = StorageRef(st, s._on_storage_death, cd)
                    sh = shadows[cd] = _shadow(StorageMeta(ref, a[3], a[4], site, seen_only=True))
                if is_write:
                    r = write_rec
                    if r is None:
                        r = write_rec = hb.record(tid, True, info)
                else:
                    r = read_rec
                    if r is None:
                        r = read_rec = hb.record(tid, False, info)
                if a[2] & _F_CONTIG:
                    lo = a[5] * a[6]
                    hb.access_range(sh, lo, lo + a[7] * a[6], r, races)
                else:
                    hb.access(sh, byte_ranges(_Strided(a)), r, races)  # type: ignore[arg-type]
                if shared is not None and (st.is_shared() or shared.awaiting):
                    shared(s, _Strided(a), st, sh, r)
        if outs:
            if len(inputs) > 8:
                inputs = set(inputs)  # type: ignore[assignment]
            for o in outs:
                self._fresh(s, o, info, tid, inputs)
        if param is not None:
            out = outs[0][9] if len(outs) == 1 else None
            s.namer.note_grad(param, name, accessed, out)
            if mutex:
                self.module.grad_mutex(param._cdata, hb.clock(tid), tid, True)
        if races:
            s.report_races(races)
        return races

    def _fresh(self, s: Any, a: tuple, info: Any, tid: int, inputs: Any) -> None:
        """``Session._fresh`` for an output known from a record."""
        st = a[0]
        if st is None:
            return
        cd = a[1]
        if cd in inputs:
            return
        shadows = s.shadows
        sh = shadows.get(cd)
        if sh is not None and sh.meta.ref() is st:
            return
        meta = StorageMeta(StorageRef(st, s._on_storage_death, cd), a[3], a[4], info.site)
        shadows[cd] = _shadow(meta, s.hb.record_creation(tid, info), st.nbytes())
        if len(shadows) > s._next_sweep:
            s._sweep()


class _NativeCall:
    """A call into C++ that starts threads (ThroughputBenchmark.benchmark), while it runs."""

    __slots__ = ("what", "origin", "tid", "start", "threads")

    def __init__(self, what: str, origin: Any, tid: int, start: int) -> None:
        self.what = what
        self.origin = origin
        self.tid = tid
        self.start = start  # the sequence number taken when it began
        self.threads: list = []


class ScriptFrame:
    """A TorchScript frame where a site holds a code object: what stacks.render_site reads of
    one (file, function, and the line of instruction offset 0)."""

    __slots__ = ("co_filename", "co_firstlineno", "co_name", "__weakref__")

    def __init__(self, filename: str, line: int, name: str) -> None:
        self.co_filename = filename
        self.co_firstlineno = line
        self.co_name = name

    def co_lines(self) -> list:
        return [(0, 2, self.co_firstlineno)]


def _shadow(meta: Any, *rest: Any) -> Any:
    return ShadowStorage(meta, *rest)


class _NotAnOp(Exception):
    """A remembered access the fast drain cannot keep (not a tensor op's)."""


class NativeShadows(dict):
    """The Python engine's shadows by storage address. A storage the fast drain has kept
    natively is handed over the first time Python code looks for it (hazards, naming, the
    CUDA and distributed trackers all look up shadows here)."""

    __slots__ = ("_take",)

    def __init__(self, take: Any) -> None:
        super().__init__()
        self._take = take

    def get(self, cd: Any, default: Any = None) -> Any:
        sh = dict.get(self, cd)
        if sh is None and self._take(cd):
            sh = dict.get(self, cd)
        return default if sh is None else sh

    def __missing__(self, cd: Any) -> Any:
        if self._take(cd) and dict.__contains__(self, cd):
            return dict.__getitem__(self, cd)
        raise KeyError(cd)

    def __contains__(self, cd: Any) -> bool:
        return dict.__contains__(self, cd) or (bool(self._take(cd)) and dict.__contains__(self, cd))


class RecordsLost(RuntimeError):
    """Op records a full per-thread buffer could not take (the analysis is incomplete)."""
