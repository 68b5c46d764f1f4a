"""Switching a :class:`~raceguard.capture.session.Session` on and off in a running process.

Both front ends that capture in-process use this module: the child process of ``raceguard
check`` (:mod:`.child`, which activates once, before the target's first line, and never
deactivates) and the Python API (:func:`raceguard.watch`, and through it the pytest plugin),
which activates for a block of code and must leave the process exactly as it found it.

:func:`activate` does, in this order:

1. remember every ``nn.Module`` and ``Optimizer`` built from now on, for naming
   (``torch.nn.Module.__init__`` / ``torch.optim.Optimizer.__init__`` are wrapped);
2. install the instrumented ``threading`` / ``queue`` / ``concurrent.futures`` primitives
   (:func:`.sync.install`), unless they are installed already;
3. make the session the one instrumented primitives report to (``session.ACTIVE``);
4. enter the session's dispatch mode in the calling thread, which becomes the session's first
   timeline (threads started afterwards get theirs at ``Thread.start()``).

:func:`deactivate` undoes all of it: it exits the calling thread's dispatch mode, clears
``session.ACTIVE``, forgets the session's bookkeeping on threads that outlive it, restores every
patched primitive to the object it was before :func:`activate` (when this activation installed
them) and unwraps the two constructors. Primitives created while the session was active keep
working afterwards: with no active session they behave exactly like the originals and report
nothing.

Only one session can be active in a process at a time; :func:`activate` raises
:class:`AlreadyActiveError` otherwise. :class:`ScopedSession` is the session type for blocks of
an ongoing process: it ignores clocks that locks and queues carry over from earlier sessions, and
stops recording once closed. :func:`hold_primitives` keeps the primitives installed
across several activations (the pytest plugin holds them for the whole run under
``--raceguard``, so that locks a test module creates at import time are instrumented too).
"""

from __future__ import annotations

import _thread
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from ..engine.hb import HappensBefore
from ..capture import backward
from ..capture import compiled
from ..capture import torchscript
from .. import cuda as cuda_pkg
from ..distributed import tracker as distributed
from .. import hazards
from ..capture import session as session_mod
from .. import sync
from ..capture.identity import present_as
from ..capture.session import Session

# Set to a non-empty value other than "0": CPU tensors are device memory (see raceguard/cuda/sim.py).
cudasim_env = cuda_pkg.SIMULATE_ENV

# Guards ACTIVE hand-over and the install count. A raw lock: never an instrumented one.
_guard = _thread.allocate_lock()
_holds = 0  # hold_primitives() calls not yet released
_users = 0  # holds plus the active activation, if any
_restore_to: dict | None = None  # what the primitives were before *we* installed them


class AlreadyActiveError(RuntimeError):
    """A session is already active in this process (``session.ACTIVE`` is set)."""

    def __init__(self, message: str, active: Any) -> None:
        super().__init__(message)
        self.active = active


@dataclass
class Handle:
    """What :func:`activate` changed, for :func:`deactivate` to undo."""

    session: Any
    # The ThreadState of the thread that called activate(); its dispatch mode is entered.
    state: Any
    thread_ident: int
    undo_constructors: Callable[[], None] | None = field(default=None, repr=False)
    closed: bool = False


def track_constructions(session: Any) -> Callable[[], None]:
    """Remember every nn.Module and Optimizer built from now on, for naming; returns the undo."""
    import torch

    namer = session.namer
    module_init = torch.nn.Module.__init__

    def init_module(self: Any, *args: Any, **kwargs: Any) -> None:
        module_init(self, *args, **kwargs)
        try:
            namer.modules.add(self)
        except TypeError:  # a module that cannot be weakly referenced: found by name only
            pass
        except Exception as exc:  # raceguard's own failure: never raised into the target
            session.hook_failed("remembering a module for naming", exc)

    init_module.__wrapped__ = module_init  # type: ignore[attr-defined]
    present_as(init_module, module_init)
    torch.nn.Module.__init__ = init_module  # type: ignore[method-assign]

    optimizer_init = torch.optim.Optimizer.__init__

    def init_optimizer(self: Any, *args: Any, **kwargs: Any) -> None:
        optimizer_init(self, *args, **kwargs)
        try:
            namer.optimizers.append(weakref.ref(self))
        except Exception as exc:  # raceguard's own failure: never raised into the target
            session.hook_failed("remembering an optimizer for naming", exc)

    init_optimizer.__wrapped__ = optimizer_init  # type: ignore[attr-defined]
    present_as(init_optimizer, optimizer_init)
    torch.optim.Optimizer.__init__ = init_optimizer  # type: ignore[method-assign]

    def undo() -> None:
        # Only if nobody wrapped them again since: never clobber someone else's patch.
        if torch.nn.Module.__dict__.get("__init__") is init_module:
            torch.nn.Module.__init__ = module_init  # type: ignore[method-assign]
        if torch.optim.Optimizer.__dict__.get("__init__") is init_optimizer:
            torch.optim.Optimizer.__init__ = optimizer_init  # type: ignore[method-assign]

    return undo


def _patch_points() -> list[tuple[Any, str]]:
    points = [(owner, attr) for owner, attr, _ in getattr(sync, "_MODULE_PATCHES", ())]
    points += [(cls, attr) for cls, attr, _ in getattr(sync, "_METHOD_PATCHES", ())]
    return points


_MISSING = object()


def _snapshot() -> dict:
    return {(owner, attr): owner.__dict__.get(attr, _MISSING) for owner, attr in _patch_points()}


def _restore(snapshot: dict) -> None:
    """Put back exactly what was there before install() (sync.uninstall() restores the values
    it saw at its *first* install, which may be stale: e.g. a threading.excepthook set since)."""
    for (owner, attr), value in snapshot.items():
        if value is _MISSING:
            if attr in owner.__dict__:
                delattr(owner, attr)
        elif owner.__dict__.get(attr, _MISSING) is not value:
            setattr(owner, attr, value)


def _use_primitives() -> None:
    """One more user of the instrumented primitives; installs them for the first one.

    Only an installation made here is undone (by the last user's :func:`_unuse_primitives`):
    primitives installed by someone else (the ``raceguard check`` child) stay as they are.
    Called with ``_guard`` held.
    """
    global _users, _restore_to
    if _users == 0 and not sync._installed:
        snapshot = _snapshot()
        sync.install()
        _restore_to = snapshot
    _users += 1


def _unuse_primitives() -> None:
    global _users, _restore_to
    _users -= 1
    if _users == 0 and _restore_to is not None:
        snapshot, _restore_to = _restore_to, None
        sync.uninstall()
        _restore(snapshot)


def primitives_installed() -> bool:
    """Whether ``threading.Lock`` & co. are raceguard's instrumented versions right now."""
    return bool(sync._installed)


def hold_primitives() -> None:
    """Install the instrumented primitives now and keep them installed until the matching
    :func:`release_primitives`, across any number of activations.

    With no session active they behave exactly like the originals (one attribute lookup more per
    call); the point is that primitives created in between, such as a lock at module level of a
    test file, are instrumented ones when a session starts later, so their ordering is seen.
    """
    global _holds
    with _guard:
        _use_primitives()
        _holds += 1


def release_primitives() -> None:
    """End one :func:`hold_primitives`; the last user restores the original primitives."""
    global _holds
    with _guard:
        if _holds == 0:
            return
        _holds -= 1
        _unuse_primitives()


def activate(session: Any, thread: threading.Thread | None = None, simulate_cuda: bool = False) -> Handle:
    """Make ``session`` the process's active session, instrumenting the calling thread.

    ``thread`` names the calling thread's timeline (default: ``threading.current_thread()``);
    the dispatch mode is always entered in the calling OS thread. ``simulate_cuda``: the
    program's CUDA calls run on the simulated device (``--simulate-cuda``, also asked for by
    ``RACEGUARD_SIMULATE_CUDA=program``). Raises :class:`AlreadyActiveError` if another session
    is active.
    """
    with _guard:
        active = session_mod.ACTIVE
        if active is not None:
            raise AlreadyActiveError("a raceguard session is already active in this process", active)
        if thread is None:
            thread = threading.current_thread()  # before ACTIVE: it may build a _DummyThread
        undo_constructors = track_constructions(session)
        _use_primitives()
        try:
            session_mod.ACTIVE = session
            hazards.install(session)
            compiled.install()  # torch.compile: Dynamo never traces raceguard; graphs recorded
            torchscript.install()  # scripted code, tracing, ThroughputBenchmark: the mode steps aside
            backward.install(session.hook_failed)  # which threads are inside backward: when .grad is safe to read
            distributed.install(session)  # async collectives as timelines of their process group
            state = session.enter_thread(thread, None)
            # CUDA streams as timelines; a no-op (one note in cuda.LAST_NOTE) without CUDA.
            # Simulated on the CPU under --simulate-cuda (or RACEGUARD_SIMULATE_CUDA).
            cuda_pkg.install_tracking(session, cuda_pkg.SIMULATE_PROGRAM if simulate_cuda else None)
        except BaseException:
            distributed.uninstall(session)
            backward.uninstall()
            torchscript.uninstall()
            compiled.uninstall()
            hazards.uninstall()
            session_mod.ACTIVE = None
            _unuse_primitives()
            undo_constructors()
            raise
        return Handle(
            session=session,
            state=state,
            thread_ident=_thread.get_ident(),
            undo_constructors=undo_constructors,
        )


def deactivate(handle: Handle) -> None:
    """Undo :func:`activate`. Idempotent.

    Must run in the thread that called :func:`activate`: a dispatch mode can only be exited in
    the thread that entered it. From another thread everything else is still undone, and
    RuntimeError is raised at the end.
    """
    with _guard:
        if handle.closed:
            return
        handle.closed = True
        same_thread = _thread.get_ident() == handle.thread_ident
        session = handle.session
        try:
            if same_thread:
                session.leave_thread(handle.state, None)
        finally:
            cuda_pkg.uninstall_tracking(session)
            distributed.uninstall(session)
            backward.uninstall()
            torchscript.uninstall()
            compiled.uninstall()
            if session_mod.ACTIVE is session:
                session_mod.ACTIVE = None
            hazards.uninstall()
            _forget_threads()
            _unuse_primitives()
            if handle.undo_constructors is not None:
                handle.undo_constructors()
    if not same_thread:
        raise RuntimeError(
            "raceguard: a session must be left in the thread that entered it; "
            "the dispatch mode of the entering thread could not be exited"
        )


def _forget_threads() -> None:
    """Threads started while the session was active and still running now carry the session's
    timeline id and end-of-thread clock; a later session must not read them (joining such a
    thread would name a timeline of the wrong session)."""
    for t in threading.enumerate():
        d = getattr(t, "__dict__", None)
        if d is not None:
            d.pop("_rg_tid", None)
            d.pop("_rg_end_var", None)


# -- sessions that end while the process goes on ------------------------------------------------
class ScopedHappensBefore(HappensBefore):
    """Happens-before that ignores the clocks synchronisation objects carry from earlier sessions.

    A lock, event, queue item or future used in an earlier session still holds that session's
    vector clock, indexed by *its* timeline ids; joining it here would order unrelated timelines
    of this session and hide races. The first time this engine sees an object, whatever clock it
    carries is dropped.
    """

    def __init__(self) -> None:
        super().__init__()
        self._owned: "weakref.WeakSet[Any]" = weakref.WeakSet()

    def _own(self, var: Any) -> None:
        if var not in self._owned:
            var.clock = None
            self._owned.add(var)

    def release(self, tid: int, var: Any) -> None:
        self._own(var)
        super().release(tid, var)

    def acquire(self, tid: int, var: Any) -> None:
        self._own(var)
        super().acquire(tid, var)


class ScopedSession(Session):
    """A capture session for a block of an ongoing process (``raceguard.watch()``).

    Differs from :class:`~raceguard.capture.session.Session` in two ways: synchronisation
    objects left over from earlier sessions start with a clean clock here, and once
    :attr:`closed` is set, threads it instrumented that are still running pass their tensor ops
    straight through (their dispatch modes cannot be exited from another thread).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hb = ScopedHappensBefore()
        self.closed = False
        # Set by the front end: who started this session, for "already active" messages.
        self.owner: Any = None

    def on_op(self, state: Any, func: Any, args: tuple, kwargs: dict) -> Any:
        if self.closed:
            return func(*args, **kwargs)
        return super().on_op(state, func, args, kwargs)

    def current(self) -> Any:
        # Session.current() calls threading.current_thread(); in a thread that threading did not
        # start (execnet's I/O thread under pytest-xdist, a C extension's thread) that builds a
        # _DummyThread, whose __init__ sets an Event: an instrumented one, which calls back into
        # current() before the dummy is registered, recursing until RecursionError. Adopt such a
        # thread without creating anything.
        state = self.states.get(_thread.get_ident())
        if state is None:
            state = self.adopt_thread(threading._active.get(_thread.get_ident()), None)  # type: ignore[attr-defined]
        return state
