"""torch.compile under raceguard: Dynamo never sees raceguard, and compiled graphs are still seen.

Four things make a compiled program run compiled, and its accesses recorded as the Python
dispatch mode records them under either capture backend:

1. **raceguard's dispatch frames are invisible to Dynamo.** Inside ``__torch_dispatch__`` the
   mode is popped off the dispatch stack, so a Dynamo frame callback that is still set (the
   eager code around and between compiled graphs) would try to compile raceguard's own
   ``Session.on_op``: it traced ``gather_traceback``, broke the graph inside ``with
   self.lock``, and compiled the rest while holding the session lock, which hung the first
   thread the compiler started (tqdm's monitor). :func:`shield` marks those code objects
   "skip, and skip everything they call" in Dynamo's C frame evaluator, which costs nothing per
   op and imports nothing (``torch._C._dynamo`` is part of ``torch._C``).
2. **The mode ignores compile internals** (``AccessMode.ignore_compile_internals``): Dynamo then
   compiles as it would without raceguard, with every dispatch mode switched off while it traces
   and compiles (FakeTensor and functionalisation never reach raceguard), instead of falling
   back to eager for every frame. The compiled code runs with the mode on: the aten ops it still
   dispatches (extern kernels such as ``mm``, AOTAutograd's epilogue copies) are seen as usual.
3. **A compiled graph call is an access** (:class:`_CompiledGraph`): fused kernels dispatch
   nothing, so each call of a graph Dynamo compiled records, on the calling thread, a read of
   every tensor the graph is given (with Dynamo's default ``inline_inbuilt_nn_modules`` that
   includes the parameters and buffers) and a write of every input the graph mutates. Which
   inputs those are comes from AOTAutograd's mutation metadata when the backend recorded it, and
   from version counters after the call otherwise (BatchNorm running stats, optimizer state in a
   compiled ``step``).
4. **Under the native recorder, the compile is not recorded either** (:class:`_Unrecorded`):
   every dispatch mode is off while torch compiles, but a RecordFunction observer is not, and
   saw the compile's own ops on fake tensors (Dynamo's propagation of every traced op,
   AOTAutograd's and Inductor's passes), with the user's line as their site. The recorder skips
   the compiling thread's ops inside Dynamo's compile of a frame (convert_frame's
   ``_disable_current_modes()``) and inside the compile of a graph's backward, which
   AOTAutograd runs at the graph's first backward pass.

Everything used from torch here is private; each piece checks what it needs and leaves the
program exactly as it is when it is missing (then a compiled graph's fused work is not seen).
"""

from __future__ import annotations

import _thread
import contextlib
import getpass
import importlib.abc
import os
import re
import sys
import tempfile
import threading
import weakref
from typing import Any, Callable, Iterator

import torch

from ..engine.hb import Race, ShadowStorage
from . import session as session_mod
from .identity import shield
from .naming import OpInfo, StorageMeta, shape_of
from .stacks import add_library_location, op_site_function
from .torch_ops import byte_ranges

_DYNAMO_OUTPUT_GRAPH = "torch._dynamo.output_graph"
_DYNAMO_CONVERT_FRAME = "torch._dynamo.convert_frame"
_site = op_site_function()
_Tensor = torch.Tensor
_finder: "_ImportWatch | None" = None
_lock = _thread.allocate_lock()  # raw: never an instrumented lock


# -- 1. invisible to Dynamo -------------------------------------------------------------------
# -- 3. compiled graph calls as accesses ------------------------------------------------------
class _CompiledGraph:
    """A graph Dynamo compiled, recording each call as one access per input tensor."""

    __slots__ = ("fn", "lifted", "writes", "label", "__weakref__")

    def __init__(self, fn: Callable, lifted: tuple, writes: frozenset, label: str) -> None:
        self.fn = fn
        # (tensor, is_write) of the graph module's own parameters and buffers (optimizer state
        # Dynamo registered on the graph): passed to the compiled code without being arguments.
        self.lifted = lifted
        self.writes = writes  # indices of the arguments the graph mutates
        self.label = label

    def __getattr__(self, name: str) -> Any:  # Dynamo and its caches may look at the callable
        return getattr(self.fn, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        s = session_mod.ACTIVE
        if s is None or getattr(s, "closed", False) or s.hb.timelines <= 1:
            # One thread so far: whatever it does is ordered before every thread it starts.
            return self.fn(*args, **kwargs)
        try:
            accessed = [(t, w, _version_of(t)) for t, w in self.lifted]
            writes = self.writes
            flat = args[0] if len(args) == 1 and type(args[0]) is list else args  # boxed calling convention
            for i, a in enumerate(flat):
                if isinstance(a, _Tensor):
                    accessed.append((a, i in writes, _version_of(a)))
            state = s.current()
            _record(s, state, [(t, w) for t, w, _ in accessed], self.label)
        except Exception as exc:  # the graph runs exactly as without raceguard
            s.hook_failed("recording a compiled graph's reads", exc)
            return self.fn(*args, **kwargs)
        out = self.fn(*args, **kwargs)
        try:
            # Mutations AOTAutograd did not report (another backend): the version counter moved.
            changed = [(t, True) for t, w, v in accessed if not w and _version_of(t) != v]
            if changed:
                _record(s, state, changed, self.label)
        except Exception as exc:
            s.hook_failed("recording a compiled graph's writes", exc)
        return out


def _version_of(t: Any) -> int:
    try:
        return t._version
    except Exception:
        return -1


def _record(s: Any, state: Any, accessed: list, op: str) -> None:
    """Record ``(tensor, is_write)`` accesses made by compiled code, as ``Session.on_op`` records
    an op's arguments, and report the races through the session."""
    info = OpInfo(_site(), op, state.locks, state.origin)
    races: list[Race] = []
    hb = s.hb
    with s.lock:
        read_rec = write_rec = None
        for t, is_write in accessed:
            try:
                st = t.untyped_storage()
                ranges = byte_ranges(t)
            except Exception:  # fake, sparse, nested, meta: no plain storage to track
                continue
            cd = st._cdata
            sh = s.shadows.get(cd)
            if sh is None or sh.meta.ref() is not st:
                meta = StorageMeta(weakref.ref(st), t.dtype, shape_of(t), info.site, seen_only=True)
                sh = s.shadows[cd] = ShadowStorage(meta)
            if is_write:
                rec = write_rec = write_rec or hb.record(state.tid, True, info)
            else:
                rec = read_rec = read_rec or hb.record(state.tid, False, info)
            hb.access(sh, ranges, rec, races)
    if races:
        s.report_races(races)


# AOTAutograd's mutation metadata of the compile running in this thread (see _note_metadata).
_tls = threading.local()
_RUNTIME_WRAPPERS = "torch._functorch._aot_autograd.runtime_wrappers"


def _note_metadata(self: Any, compiled_fn: Any, aot_config: Any, *args: Any, **kwargs: Any) -> Any:
    """``RuntimeWrapper.post_compile``: the one place AOTAutograd hands over which inputs a graph
    mutates, whether it compiled the graph or loaded it from its cache."""
    try:
        meta = kwargs.get("runtime_metadata")
        if meta is not None:
            _tls.input_info = getattr(meta, "input_info", None)
    except Exception as exc:  # the graph's mutations are then seen by version counters only
        _failed("reading a compiled graph's mutation metadata", exc)
    return _orig["post_compile"](self, compiled_fn, aot_config, *args, **kwargs)


def _graph_tensors(gm: Any, input_info: Any) -> tuple[tuple, frozenset]:
    """The graph module's own tensors as (tensor, mutated) and the indices of the mutated
    arguments, from AOTAutograd's metadata: its inputs are the graph module's parameters and
    buffers (as ``aot_module_simplified`` lifts them) followed by the graph's arguments. Without
    that metadata, or when the counts disagree (another torch), nothing is known to be mutated
    and the version counters after each call stand in."""
    own = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
    lifted = [t for t in own.values() if isinstance(t, _Tensor)]
    n_args = sum(1 for node in gm.graph.nodes if node.op == "placeholder")
    info = list(input_info or ())
    if len(info) != len(lifted) + n_args:
        return tuple((t, False) for t in lifted), frozenset()
    mutated = [bool(getattr(i, "mutates_data", False) or getattr(i, "mutates_metadata", False)) for i in info]
    k = len(lifted)
    return tuple(zip(lifted, mutated[:k])), frozenset(i for i, m in enumerate(mutated[k:]) if m)


def _call_user_compiler(self: Any, gm: Any, *args: Any, **kwargs: Any) -> Any:
    _tls.input_info = None
    fn = _orig["call_user_compiler"](self, gm, *args, **kwargs)
    try:
        _generated_code_is_library()
        lifted, writes = _graph_tensors(gm, _tls.input_info)
        return _CompiledGraph(fn, lifted, writes, "torch.compile graph")
    except Exception as exc:  # an unexpected graph module: run the graph unrecorded, never break it
        _failed("wrapping a compiled graph", exc)
        return fn
    finally:
        _tls.input_info = None


def _failed(what: str, exc: BaseException) -> None:
    s = session_mod.ACTIVE
    if s is not None:
        s.hook_failed(what, exc)


# -- 4. the compile itself, unrecorded under the native recorder too --------------------------
@contextlib.contextmanager
def _modes_off(*args: Any, **kwargs: Any) -> Iterator[Any]:
    """convert_frame's ``_disable_current_modes()``, around everything Dynamo does to compile a
    frame (tracing, AOTAutograd, Inductor)."""
    with _orig["_disable_current_modes"](*args, **kwargs) as value, _Unrecorded():
        yield value


def _backward_get_or_compile(self: Any, *args: Any, **kwargs: Any) -> Any:
    """``_AutogradBackwardCompiler.get_or_compile``: a graph's backward is compiled at its first
    backward pass, inside that pass, with the modes off (Inductor's ``compile_fx_inner``)."""
    if getattr(self, "compiled_bw", None) is not None:  # compiled already: every later pass
        return _orig["get_or_compile"](self, *args, **kwargs)
    with _Unrecorded():
        return _orig["get_or_compile"](self, *args, **kwargs)


class _Unrecorded:
    """Inside it, the native recorder (when it records the active session) records none of the
    calling thread's ops."""

    __slots__ = ("recorder",)

    def __enter__(self) -> None:
        self.recorder = None
        native = getattr(session_mod.ACTIVE, "native", None)
        if native is None:
            return
        try:
            native.module.suspend()
            self.recorder = native.module
        except Exception as exc:  # the compile's fake-tensor ops are then recorded, harmlessly
            _failed("suspending the native recorder while torch compiles", exc)

    def __exit__(self, *exc_info: Any) -> None:
        if self.recorder is not None:
            try:
                self.recorder.resume()
            except Exception as exc:
                _failed("resuming the native recorder after torch compiled", exc)


# (module, class or None for the module itself, attribute, replacement): wrapped while a
# session is active.
_PATCHES = (
    (_DYNAMO_OUTPUT_GRAPH, "OutputGraph", "call_user_compiler", _call_user_compiler),
    (_RUNTIME_WRAPPERS, "RuntimeWrapper", "post_compile", _note_metadata),
    (_RUNTIME_WRAPPERS, "_AutogradBackwardCompiler", "get_or_compile", _backward_get_or_compile),
    (_DYNAMO_CONVERT_FRAME, None, "_disable_current_modes", _modes_off),
)
_WATCHED = frozenset(p[0] for p in _PATCHES)
_orig: dict[str, Callable] = {}


def _patch_dynamo() -> None:
    """Wrap every graph Dynamo compiles from now on (idempotent)."""
    for module_name, cls_name, attr, replacement in _PATCHES:
        owner = _owner(module_name, cls_name)
        current = vars(owner).get(attr) if owner is not None else None
        if current is None or current is replacement:
            continue
        _orig[attr] = current
        setattr(owner, attr, replacement)


def _owner(module_name: str, cls_name: str | None) -> Any:
    module = sys.modules.get(module_name)
    return module if cls_name is None else getattr(module, cls_name, None)


class _ImportWatch(importlib.abc.MetaPathFinder):
    """Patches Dynamo and AOTAutograd right after their modules are imported (the first
    optimizer step or ``torch.compile`` call imports them, long after raceguard started)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _WATCHED:
            return None
        for finder in sys.meta_path:  # whoever would have loaded it loads it
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _PatchAfterExec(spec.loader)
        return spec


class _PatchAfterExec(importlib.abc.Loader):
    """The module's own loader, then the patches; the module keeps its own loader."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        sys.modules[module.__name__] = module  # _patch_dynamo looks it up there
        try:
            _patch_dynamo()
        except Exception as exc:  # unrecorded compiled graphs, never a failed import
            _failed("watching torch.compile", exc)


def _generated_code_is_library() -> None:
    """Python that torch writes while compiling (Inductor's graphs in its cache directory, FX's
    ``<eval_with_key>`` modules) shows as library frames, never as the user's code."""
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # set by Inductor once it compiled
    if cache is None:
        try:
            user = getpass.getuser()
        except Exception:
            user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
        cache = os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))
    add_library_location(os.path.abspath(cache) + os.sep)
    add_library_location("<eval_with_key>")


def install() -> None:
    """Called when a session is activated."""
    global _finder
    from .torch_ops import AccessMode

    shield(AccessMode.__torch_dispatch__.__code__)
    _generated_code_is_library()
    with _lock:
        _patch_dynamo()
        if _finder is None and not all(m in sys.modules for m in _WATCHED):
            _finder = _ImportWatch()
            sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    """Called when a session is deactivated: graphs compiled meanwhile keep their wrapper, which
    passes straight through without an active session."""
    global _finder
    with _lock:
        if _finder is not None:
            try:
                sys.meta_path.remove(_finder)
            except ValueError:
                pass
            _finder = None
        for module_name, cls_name, attr, replacement in _PATCHES:
            owner = _owner(module_name, cls_name)
            if owner is not None and vars(owner).get(attr) is replacement:
                setattr(owner, attr, _orig.pop(attr))
