"""The happens-before edges ``multiprocessing`` creates between processes, each carrying a clock.

=====================================  ==========================================================
hand-off                               how the clock travels
=====================================  ==========================================================
``Process.start()`` → child's first op  on the Process object while ``start()`` pickles it
                                       (spawn, forkserver); a fork inherits it (:mod:`.clocks`)
child's exit → ``join()``              a file ``exit-PID.json`` beside the supervisor's socket,
                                       written when ``Process._bootstrap`` returns
``Lock``/``RLock``/``Semaphore``       a file per semaphore, ``sem-NAME``, joined into at every
(and ``Condition``, ``Event``,          ``release()`` and read at every successful ``acquire()``,
``Barrier``, ``Value``/``Array``        under ``flock``; only primitives the target creates
locks, built on them)                  (library ones, such as a queue's own locks, order nothing)
``Queue``/``SimpleQueue``/``Pipe``     in the pickled payload: ``put``/``send`` wraps the item in
                                       :class:`Stamped`, which unpickles as the item itself
``ProcessPoolExecutor.submit``         the submitted function is stamped the same way
pool results                           through the pool's result queue (a stamped ``put``)
=====================================  ==========================================================

A queue's feeder thread pickles what ``put`` handed it; its tensor ops (moving a storage into
shared memory) are the sender's, ordered before ``put`` returns: the feeder thread records none.
Stamped payloads need raceguard importable where they are unpickled (every process started with
``sys.executable`` under ``raceguard check`` has it).
"""

from __future__ import annotations

import fcntl
import importlib.machinery
import json
import os
import sys
from typing import Any

from ..capture import session as session_mod
from ..capture.stacks import current_site, first_user_location, own_frames_removed

_orig: dict[str, Any] = {}


def _state() -> tuple[Any, Any]:
    s = session_mod.ACTIVE
    if s is None:
        return None, None
    return s, getattr(s, "multiprocess", None)


def _release_here(s: Any, mp: Any) -> dict:
    with s.lock:
        return mp.clocks.release(s.current().tid)


def _acquire_here(s: Any, mp: Any, clock: dict) -> None:
    with s.lock:
        mp.clocks.acquire(s.current().tid, clock)


# -- payloads ------------------------------------------------------------------------------------
def _received(obj: Any, clock: dict) -> Any:
    """Unpickling a :class:`Stamped`: the receiving thread acquires the sender's clock."""
    s, mp = _state()
    if mp is not None:
        try:
            _acquire_here(s, mp, clock)
        except Exception as exc:
            s.hook_failed("receiving a clock from another process", exc, ordering=True)
    return obj


class Stamped:
    """An object on its way to another process (or thread), with the sender's clock."""

    __slots__ = ("obj", "clock")

    def __init__(self, obj: Any, clock: dict) -> None:
        self.obj = obj
        self.clock = clock

    def __reduce__(self) -> tuple:
        return (_received, (self.obj, self.clock))


def _stamp(obj: Any, what: str) -> Any:
    s, mp = _state()
    if mp is None:
        return obj
    try:
        with s.lock:
            mp.shared.will_be_shared(obj)
        return Stamped(obj, _release_here(s, mp))
    except Exception as exc:
        s.hook_failed(what, exc, ordering=True)
        return obj


# Every wrapper that calls the original takes its own frame out of an exception's traceback
# (own_frames_removed, then a bare raise, which adds no frame): what the target prints is what
# it prints without raceguard.
def _queue_put(self: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
    obj = _stamp(obj, "sending a clock through a queue")
    try:
        return _orig["Queue.put"](self, obj, *args, **kwargs)
    except BaseException as exc:
        own_frames_removed(exc)
        raise


def _simple_queue_put(self: Any, obj: Any) -> Any:
    obj = _stamp(obj, "sending a clock through a queue")
    try:
        return _orig["SimpleQueue.put"](self, obj)
    except BaseException as exc:
        own_frames_removed(exc)
        raise


def _connection_send(self: Any, obj: Any) -> Any:
    obj = _stamp(obj, "sending a clock through a pipe")
    try:
        return _orig["Connection.send"](self, obj)
    except BaseException as exc:
        own_frames_removed(exc)
        raise


def _executor_submit(self: Any, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
    fn = _stamp(fn, "sending a clock with a pool task")
    try:
        return _orig["ProcessPoolExecutor.submit"](self, fn, *args, **kwargs)
    except BaseException as exc:
        own_frames_removed(exc)
        raise


def _feed(*args: Any, **kwargs: Any) -> Any:
    """A queue's feeder thread: it pickles what ``put`` handed over, on the sender's behalf."""
    from torch.utils._python_dispatch import _disable_current_modes

    recorder = _native_recording_suspended()
    try:
        with _disable_current_modes():
            return _orig["Queue._feed"](*args, **kwargs)
    except BaseException as exc:
        own_frames_removed(exc)
        raise
    finally:
        if recorder is not None:
            recorder.resume()


def _native_recording_suspended() -> Any:
    """The native recorder, told to record none of this thread's ops (as the dispatch mode is off
    here), when it records this process's session; else None."""
    s = session_mod.ACTIVE
    native = getattr(s, "native", None)
    if native is None:
        return None
    try:
        native.module.suspend()
        return native.module
    except Exception as exc:  # the feeder's ops are then recorded: a report may be a false race
        s.hook_failed("keeping a queue's feeder thread out of the native recording", exc, ordering=True)
        return None


# -- processes -----------------------------------------------------------------------------------
def _process_start(self: Any) -> Any:
    s, mp = _state()
    if mp is not None:
        try:
            site = first_user_location(current_site(1))
            self.__dict__["_rg_start"] = {"clock": _release_here(s, mp), "site": site}
        except Exception as exc:
            s.hook_failed("sending a clock to a new process", exc, ordering=True)
    try:
        return _orig["BaseProcess.start"](self)
    except BaseException as exc:
        own_frames_removed(exc)
        raise
    finally:
        self.__dict__.pop("_rg_start", None)


def _process_bootstrap(self: Any, *args: Any, **kwargs: Any) -> Any:
    payload = self.__dict__.pop("_rg_start", None)
    s, mp = _state()
    if mp is not None and payload is not None:
        try:
            _acquire_here(s, mp, payload["clock"])
            mp.shared.started_at = payload.get("site")
        except Exception as exc:
            s.hook_failed("receiving the clock of the process start", exc, ordering=True)
    try:
        return _orig["BaseProcess._bootstrap"](self, *args, **kwargs)
    finally:
        s, mp = _state()
        if mp is not None:
            mp.process_ends(s)


def _process_join(self: Any, timeout: Any = None) -> Any:
    try:
        out = _orig["BaseProcess.join"](self, timeout)
    except BaseException as exc:
        own_frames_removed(exc)
        raise
    s, mp = _state()
    if mp is not None and self.exitcode is not None and mp.dir:
        try:
            with open(os.path.join(mp.dir, f"exit-{self.pid}.json")) as f:
                clock = json.load(f)
        except (OSError, ValueError):
            clock = None  # the child was not checked, or ended without a word (killed)
        if clock:
            try:
                _acquire_here(s, mp, clock)
            except Exception as exc:
                s.hook_failed("receiving the clock of a joined process", exc, ordering=True)
    return out


# -- semaphores (Lock, RLock, Semaphore, and what is built on them) -----------------------------
# multiprocessing frames between the target's call and the SemLock: only these count as "the
# target created it" (a queue's or a pool's own locks are library ones).
_USER_FACTORIES = ("context.py", "synchronize.py", "sharedctypes.py")


def _created_by_target() -> bool:
    from ..capture.stacks import USER, classify_code

    f = sys._getframe(2)
    mp_dir = os.path.dirname(_orig["mp_file"])
    while f is not None and os.path.dirname(f.f_code.co_filename) == mp_dir:
        if os.path.basename(f.f_code.co_filename) not in _USER_FACTORIES:
            return False
        f = f.f_back
    return f is not None and classify_code(f.f_code) == USER


def _semlock_init(self: Any, *args: Any, **kwargs: Any) -> None:
    _orig["SemLock.__init__"](self, *args, **kwargs)
    s, mp = _state()
    if mp is None or not mp.dir:
        return
    try:
        if _created_by_target():
            sl = self._semlock
            key = sl.name or f"fork-{os.getpid()}-{sl.handle}"
            self.__dict__["_rg_sem"] = os.path.join(mp.dir, "sem-" + key.strip("/").replace("/", "_"))
            open(self.__dict__["_rg_sem"], "a").close()
            self._make_methods()
    except Exception as exc:
        s.hook_failed("tracking a multiprocessing lock", exc)


def _semlock_setstate(self: Any, state: Any) -> None:
    _orig["SemLock.__setstate__"](self, state)
    s, mp = _state()
    if mp is None or not mp.dir:
        return
    path = os.path.join(mp.dir, "sem-" + (self._semlock.name or "").strip("/").replace("/", "_"))
    if self._semlock.name and os.path.exists(path):
        self.__dict__["_rg_sem"] = path
        self._make_methods()


def _semlock_make_methods(self: Any) -> None:
    _orig["SemLock._make_methods"](self)
    path = self.__dict__.get("_rg_sem")
    if path is None:
        return
    acquire, release = self._semlock.acquire, self._semlock.release

    def tracked_acquire(*args: Any, **kwargs: Any) -> Any:
        try:
            got = acquire(*args, **kwargs)
        except BaseException as exc:
            own_frames_removed(exc)
            raise
        if got:
            _sem_acquired(path)
        return got

    def tracked_release() -> Any:
        _sem_releasing(path)
        try:
            return release()
        except BaseException as exc:  # ValueError: released too many times, as the original
            own_frames_removed(exc)
            raise

    self.acquire = tracked_acquire
    self.release = tracked_release


def _semlock_enter(self: Any) -> Any:
    try:
        return self.acquire()
    except BaseException as exc:
        own_frames_removed(exc)
        raise


def _semlock_exit(self: Any, *args: Any) -> Any:
    try:
        return self.release()
    except BaseException as exc:
        own_frames_removed(exc)
        raise


def _sem_releasing(path: str) -> None:
    s, mp = _state()
    if mp is None:
        return
    try:
        clock = _release_here(s, mp)
        with open(path, "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            text = f.read()
            known = json.loads(text) if text else {}
            for name, value in clock.items():
                if value > known.get(name, 0):
                    known[name] = value
            f.seek(0)
            f.truncate()
            f.write(json.dumps(known))
    except Exception as exc:
        s.hook_failed("releasing a multiprocessing lock", exc, ordering=True)


def _sem_acquired(path: str) -> None:
    s, mp = _state()
    if mp is None:
        return
    try:
        with open(path) as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            text = f.read()
        if text:
            _acquire_here(s, mp, json.loads(text))
    except Exception as exc:
        s.hook_failed("acquiring a multiprocessing lock", exc, ordering=True)


# -- installing ---------------------------------------------------------------------------------
def _patch(owner: Any, attr: str, new: Any, key: str) -> None:
    if key in _orig:
        return
    _orig[key] = owner.__dict__[attr]
    new.__name__ = getattr(_orig[key], "__name__", attr)
    new.__qualname__ = getattr(_orig[key], "__qualname__", attr)
    new.__doc__ = getattr(_orig[key], "__doc__", None)
    setattr(owner, attr, staticmethod(new) if isinstance(_orig[key], staticmethod) else new)
    if isinstance(_orig[key], staticmethod):
        _orig[key] = _orig[key].__func__


def _patch_module(name: str, module: Any) -> None:
    if name == "multiprocessing.process":
        cls = module.BaseProcess
        _patch(cls, "start", _process_start, "BaseProcess.start")
        _patch(cls, "_bootstrap", _process_bootstrap, "BaseProcess._bootstrap")
        _patch(cls, "join", _process_join, "BaseProcess.join")
        _orig.setdefault("mp_file", module.__file__)
    elif name == "multiprocessing.connection":
        _patch(module._ConnectionBase, "send", _connection_send, "Connection.send")
    elif name == "multiprocessing.queues":
        _patch(module.Queue, "put", _queue_put, "Queue.put")
        _patch(module.Queue, "_feed", _feed, "Queue._feed")
        _patch(module.SimpleQueue, "put", _simple_queue_put, "SimpleQueue.put")
    elif name == "multiprocessing.synchronize":
        cls = module.SemLock
        _patch(cls, "__init__", _semlock_init, "SemLock.__init__")
        _patch(cls, "__setstate__", _semlock_setstate, "SemLock.__setstate__")
        _patch(cls, "_make_methods", _semlock_make_methods, "SemLock._make_methods")
        _patch(cls, "__enter__", _semlock_enter, "SemLock.__enter__")
        _patch(cls, "__exit__", _semlock_exit, "SemLock.__exit__")
    elif name == "concurrent.futures.process":
        _patch(module.ProcessPoolExecutor, "submit", _executor_submit, "ProcessPoolExecutor.submit")


PATCHED_MODULES = (
    "multiprocessing.process",
    "multiprocessing.connection",
    "multiprocessing.queues",
    "multiprocessing.synchronize",
    "concurrent.futures.process",
)


class _PatchOnImport:
    """Patches a module of :data:`PATCHED_MODULES` right after the target imports it: importing
    them here would put them in every target's ``sys.modules``."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in PATCHED_MODULES or name in _patched:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            _patched.add(name)
            if len(_patched) == len(PATCHED_MODULES) and self in sys.meta_path:
                sys.meta_path.remove(self)  # nothing left to patch: leave no trace
            try:
                _patch_module(name, module)
            except Exception as exc:
                s = session_mod.ACTIVE
                if s is not None:
                    s.hook_failed(f"instrumenting {name}", exc)

        loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


_patched: set = set()
_finder = _PatchOnImport()


def install() -> None:
    """Patch what is imported already; the rest when the target imports it."""
    import multiprocessing

    _orig.setdefault("mp_file", os.path.join(os.path.dirname(multiprocessing.__file__), "process.py"))
    for name in PATCHED_MODULES:
        module = sys.modules.get(name)
        if module is not None and name not in _patched:
            _patched.add(name)
            _patch_module(name, module)
    if len(_patched) < len(PATCHED_MODULES) and _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
