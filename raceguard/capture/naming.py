"""Names a person would write for raced-on memory and for locks, resolved only when reported.

Roots are found without user code changes: module-level globals of the target's ``__main__``
(and one attribute level deeper, for ``server.model``), then the locals of the user-code frames
of every live thread, then every ``nn.Module`` / ``Optimizer`` whose ``__init__`` ran (named by
class). Grads and optimizer state come and go, so nothing is cached between reports.
"""

from __future__ import annotations

import ast
import functools
import itertools
import linecache
import sys
import threading
import types
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from . import backward
from .stacks import USER, classify_code, first_user_location, user_key

# A gradient known from the op that installed it (Namer.note_grad), not read from ``.grad``:
# ranked after optimizer state, since a post-accumulate-grad hook (an optimizer step) runs under
# the same autograd node and may write state with the same ops.
_NOTED_GRAD = "grad (noted)"
# What the engine's AccumulateGrad dispatches: the gradient is the output of detach (first
# gradient, stolen), clone (first, copied), add (create_graph) or _to_copy, or add_'s first
# argument (accumulated in place).
GRAD_RESULT_OPS = frozenset({"aten::detach", "aten::clone", "aten::add", "aten::_to_copy"})
GRAD_INPLACE_OPS = frozenset({"aten::add_"})

_PLAIN_PARAMETERS = (torch.nn.Parameter, torch.Tensor)

KIND_RANK = {"parameter": 0, "buffer": 1, "grad": 2, "optimizer-state": 3, _NOTED_GRAD: 3.5, "tensor": 4}


@dataclass(frozen=True)
class Resource:
    name: str
    kind: str
    # The owner used in fingerprints ("model", "optimizer[Adam]", or the allocation site), so that
    # which tensor of one bug happened to be detected first does not change the fingerprint.
    root: str


class OpInfo:
    """Payload of an access record (a tensor op's, or a module-state access's): enough to
    rebuild the report line later."""

    __slots__ = ("site", "op", "locks", "stream", "origin")

    def __init__(self, site: tuple, op: str, locks: tuple, origin: "OriginSite | None" = None) -> None:
        self.site = site
        self.op = op
        self.locks = locks
        # The CUDA stream timeline a kernel was launched on (set by the CUDA tracker), else None.
        self.stream = None
        # Where the thread's current work came from (ThreadState.origin when recorded): one
        # reference per access, rendered only if the access is reported.
        self.origin = origin


class OriginSite:
    """Where a thread was started or a task submitted, as captured there: a site (rendered
    only when an access of that work is reported) and the starting/submitting timeline."""

    __slots__ = ("kind", "site", "tid")

    def __init__(self, kind: str, site: Any, tid: int) -> None:
        self.kind = kind  # "thread-start" or "task-submit"
        self.site = site
        self.tid = tid


class StorageRef(weakref.ref):
    """A weak reference to a storage that knows the storage's key (``_cdata``), so that the
    callback that learns of its death can tell which shadow to drop."""

    __slots__ = ("cd",)

    def __new__(cls, storage: Any, callback: Any, cd: int) -> "StorageRef":
        self = super().__new__(cls, storage, callback)
        self.cd = cd
        return self

    def __init__(self, storage: Any, callback: Any, cd: int) -> None:
        super().__init__(storage, callback)


class StorageMeta:
    """What the capture layer remembers about a storage, for naming it later."""

    __slots__ = ("ref", "dtype", "shape", "site", "seen_only")

    def __init__(self, ref: Any, dtype: Any, shape: Any, site: Any, seen_only: bool = False) -> None:
        self.ref = ref
        self.dtype = dtype
        self.shape = shape
        self.site = site
        # True when the allocation itself was not seen (tensor made outside any aten op).
        self.seen_only = seen_only


def race_finding(resource: Resource, message: str, first: Any, second: Any, hint: str, details: dict) -> Any:
    """A ``data-race`` finding on ``resource`` between the accesses ``first`` and ``second``; its
    fingerprint comes from the resource's root and the two accesses, whatever layer found it."""
    from ..report.finding import Finding, compute_fingerprint

    return Finding(
        kind="data-race",
        resource=resource.name,
        resource_kind=resource.kind,
        message=message,
        accesses=[first, second],
        fingerprint=compute_fingerprint("data-race", resource.root, [first, second]),
        hint=hint,
        details=details,
    )


def shape_of(t: Any) -> tuple:
    """``t``'s shape for naming it later; () for a nested tensor, which has no single shape."""
    try:
        return tuple(t.shape)
    except Exception:
        return ()


def describe_tensor(meta: StorageMeta) -> str:
    dtype = str(meta.dtype).replace("torch.", "")
    shape = ", ".join(str(int(s)) for s in meta.shape)
    where = first_user_location(meta.site) if meta.site else None
    if meta.seen_only:
        return f"tensor {dtype}[{shape}] first used at {where or 'an unknown site'}"
    return f"tensor {dtype}[{shape}] allocated at {where or 'an unknown site'}"


class Namer:
    def __init__(
        self, main_globals: Callable[[], dict | None], device_threads: Callable[[], bool] = lambda: False
    ) -> None:
        self._main_globals = main_globals
        # Whether a backward may run nodes on threads other than its caller's (CUDA): then
        # .grad is read only while no thread at all is inside backward (see backward.py).
        self._device_threads = device_threads
        # storage _cdata -> (weakref to the storage, {id(param): (weakref to it, lo, hi)}) of
        # every gradient the engine installed or accumulated: names gradients without reading
        # .grad. Several, as one storage can hold the gradients of several parameters (views).
        self._grads: dict[int, tuple[Any, dict[int, tuple[Any, int, int]]]] = {}
        self._next_grad_sweep = 1024
        # id(param) -> weakref to the .grad last noted for it between backward passes.
        self._seen_grads: dict[int, Any] = {}
        # Parameters whose gradient the engine has accumulated: note_grad names those gradients,
        # and the scan between backward passes leaves them alone (see note_installed_grads).
        self._engine_params: dict[int, weakref.ref] = {}  # id(param) -> weakref to it
        # The native recorder's notes of the same, for accumulations it applied itself (its
        # grad_spans() and engine_param()); None under the Python mode.
        self.native_grads: Any = None
        # Called before the scan between backward passes reads any .grad (the native backend:
        # apply the records still pending, so that engine_param() knows every accumulation of
        # the passes that ended); False: which gradients the engine made is unknown, read none.
        self.before_grad_scan: Callable[[], bool] | None = None
        self.modules: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
        self.optimizers: list[weakref.ref] = []  # creation order matters for labels
        observer = weakref.WeakMethod(self.note_installed_grads)
        backward.set_safe_point(lambda: (observer() or _nothing)())

    # -- gradients as the engine writes them ----------------------------------------------
    def note_grad(self, param: Any, op: str, accessed: list, out: Any) -> None:
        """An op ran inside ``param``'s AccumulateGrad node (on the engine's thread, holding the
        node's mutex): remember which storage is now ``param``'s gradient."""
        known = self._engine_params.get(id(param))
        if known is None or known() is not param:
            try:
                self._engine_params[id(param)] = weakref.ref(param)
            except TypeError:  # a parameter without weakref support
                pass
        base = op.split(".", 1)[0]
        if base in GRAD_RESULT_OPS:
            tensors = [out] if isinstance(out, torch.Tensor) else []
        elif base in GRAD_INPLACE_OPS:
            tensors = [t for t, is_write in accessed if is_write][:1]
        else:
            return
        for t in tensors:
            self._note_span(param, t)

    def note_installed_grads(self) -> None:
        """Between backward passes (no thread inside the engine, see backward.set_safe_point):
        note each parameter's current ``.grad``, also one the program installed itself
        (``p.grad = torch.zeros(...)``), so that its name never depends on whether a race on it
        is reported while another thread is inside backward. Only while several threads run."""
        if threading.active_count() < 2:
            return
        settle = self.before_grad_scan
        if settle is not None and not settle():
            return
        seen = self._seen_grads
        others_inside = backward.others_inside
        for module in list(self.modules):
            if others_inside():
                return  # a backward started meanwhile: .grad is no longer safe to read
            for param in list(module._parameters.values()):  # a copy: another thread may register one
                # A plain leaf only: .grad of a non-leaf warns, a subclass's may run its code.
                if type(param) not in _PLAIN_PARAMETERS or not param.is_leaf:
                    continue
                # A gradient the engine made is named by note_grad; reading it here could make its
                # first Python object while its thread's ops use it without the GIL, which
                # crashed targets training in several threads at once (SIGSEGV).
                ref = self._engine_params.get(id(param))
                if ref is not None and ref() is param:
                    continue
                native = self.native_grads
                if native is not None and native.engine_param(param._cdata):
                    continue
                grad = param.grad
                if grad is None:
                    continue
                ref = seen.get(id(param))
                if ref is not None and ref() is grad:
                    continue
                self._note_span(param, grad)
                try:
                    seen[id(param)] = weakref.ref(grad)
                except TypeError:
                    pass
        if len(seen) > 2 * self._next_grad_sweep:
            for key in [k for k, ref in list(seen.items()) if ref() is None]:
                seen.pop(key, None)
            for key in [k for k, ref in list(self._engine_params.items()) if ref() is None]:
                self._engine_params.pop(key, None)

    def _note_span(self, param: Any, t: Any) -> None:
        """Remember that ``t``'s bytes are ``param``'s gradient."""
        try:
            st = t.untyped_storage()
            es = t.element_size()
            lo = t.storage_offset() * es
            span = (weakref.ref(param), lo, lo + max(t.numel(), 1) * es)
        except Exception:  # sparse, nested, or a parameter without weakref support
            return
        entry = self._grads.get(st._cdata)
        if entry is None or entry[0]() is not st:
            entry = self._grads[st._cdata] = (weakref.ref(st), {})
        entry[1][id(param)] = span
        if len(self._grads) > self._next_grad_sweep:
            for cd in [cd for cd, (st, _) in list(self._grads.items()) if st() is None]:
                self._grads.pop(cd, None)
            self._next_grad_sweep = max(1024, 2 * len(self._grads))

    def _noted_grads(self, storage: Any) -> dict[int, tuple[Any, int, int]]:
        """``{id(param): (param, lo, hi)}`` of the gradients the engine put in ``storage`` (live
        parameters only, so an id found here is that parameter's)."""
        spans = {}
        native = self.native_grads
        if native is not None:
            for param, lo, hi in native.grad_spans(storage._cdata):
                spans[id(param)] = (param, lo, hi)
        entry = self._grads.get(storage._cdata)
        if entry is None or entry[0]() is not storage:
            return spans
        for key, (ref, lo, hi) in list(entry[1].items()):
            param = ref()
            if param is not None and id(param) == key:
                spans[key] = (param, lo, hi)
        return spans

    # -- discovery -------------------------------------------------------------------------
    def _named_objects(self) -> Iterator[tuple[str, Any]]:
        """(name, object) pairs from globals and live user frames, best names first."""
        g = self._main_globals() or {}
        yield from _scan_namespace(g)
        for frame in _user_frames():
            yield from _scan_namespace(frame.f_locals)

    def roots(self) -> tuple[list[tuple[str, torch.nn.Module]], list[tuple[str, Any]]]:
        modules: list[tuple[str, torch.nn.Module]] = []
        optimizers: list[tuple[str, Any]] = []
        seen: set[int] = set()
        for name, obj in self._named_objects():
            if id(obj) in seen:
                continue
            if isinstance(obj, torch.nn.Module):
                seen.add(id(obj))
                modules.append((name, obj))
            elif isinstance(obj, torch.optim.Optimizer):
                seen.add(id(obj))
                optimizers.append((name, obj))
        covered = set(seen)
        for _, m in modules:
            covered.update(id(sub) for sub in m.modules())
        tracked = list(self.modules)
        children = {id(c) for m in tracked for c in m.children()}
        for m in tracked:
            if id(m) not in covered and id(m) not in children:
                modules.append((type(m).__name__, m))
                covered.update(id(sub) for sub in m.modules())
        for ref in self.optimizers:
            opt = ref()
            if opt is not None and id(opt) not in seen:
                optimizers.append(("", opt))
                seen.add(id(opt))
        return modules, optimizers

    def optimizer_label(self, opt: Any) -> str:
        cls = type(opt).__name__
        same = [r() for r in self.optimizers if type(r()) is type(opt)]
        same = [o for o in same if o is not None]
        if len(same) > 1 and opt in same:
            return f"optimizer[{cls}#{same.index(opt) + 1}]"
        return f"optimizer[{cls}]"

    # -- tensors ---------------------------------------------------------------------------
    @staticmethod
    def _module_tensors(modules: list) -> Iterator[tuple[str, str, str, torch.Tensor]]:
        for root, m in modules:
            for pname, p in m.named_parameters(prefix=root, remove_duplicate=False):
                yield pname, "parameter", root, p
            for bname, b in m.named_buffers(prefix=root, remove_duplicate=False):
                yield bname, "buffer", root, b

    def grads_readable(self) -> bool:
        """Whether this thread may read ``.grad`` now: while another thread is inside backward,
        the engine swaps gradients without the GIL, and a read is a use-after-free."""
        return backward.grads_readable(own_backward=not self._device_threads())

    def _grads_and_state(
        self, modules: list, optimizers: list, storage: Any
    ) -> Iterator[tuple[str, str, str, torch.Tensor]]:
        # name_storage asks for these only when no parameter or buffer is the race's tensor.
        grads = self.grads_readable()
        noted = self._noted_grads(storage)
        param_names: dict[int, str] = {}
        for root, m in modules:
            for pname, p in m.named_parameters(prefix=root, remove_duplicate=False):
                param_names.setdefault(id(p), pname)
                g = p.grad if grads else None
                if g is not None:
                    yield pname + ".grad", "grad", root, g
                if id(p) in noted:  # also when readable: the name must not depend on that
                    yield pname + ".grad", _NOTED_GRAD, root, (storage, *noted[id(p)][1:])
        for _, opt in optimizers:
            label = self.optimizer_label(opt)
            index = 0
            for group in opt.param_groups:
                for p in group["params"]:
                    pname = param_names.get(id(p)) or f"param{index}"
                    index += 1
                    if id(p) not in param_names:
                        yield f"{label}.{pname}", "parameter", label, p
                        g = p.grad if grads else None
                        if g is not None:
                            yield f"{label}.{pname}.grad", "grad", label, g
                        if id(p) in noted:
                            yield f"{label}.{pname}.grad", _NOTED_GRAD, label, (storage, *noted[id(p)][1:])
                    state = opt.state.get(p)
                    if not state:
                        continue
                    # list(): one copy under the GIL, as the optimizer's thread may add entries
                    for key, value in list(state.items()):
                        if isinstance(value, torch.Tensor):
                            yield f"{label}.state[{pname}].{key}", "optimizer-state", label, value

    def name_storage(self, storage: Any, lo: int, hi: int, meta: StorageMeta) -> Resource:
        cdata = storage._cdata
        modules, optimizers = self.roots()
        best = _best_match(self._module_tensors(modules), cdata, lo, hi)
        if best is None or best[0][0] != 0:  # no parameter or buffer is exactly this tensor
            found = _best_match(self._grads_and_state(modules, optimizers, storage), cdata, lo, hi)
            if found is not None and (best is None or found[0] < best[0]):
                best = found
        if best is not None:
            kind = "grad" if best[2] == _NOTED_GRAD else best[2]
            return Resource(best[1], kind, best[3])
        name = describe_tensor(meta)
        return Resource(name, "tensor", name)

    # -- locks -----------------------------------------------------------------------------
    def name_object(self, obj: Any) -> str | None:
        for name, candidate in self._named_objects():
            if candidate is obj:
                return name
        return None

    def name_lock(self, lock: Any, site: Any) -> str | None:
        """A lock's name: where the script's globals reach it (``model_lock``, ``server.lock``),
        else the variable its creation line assigns it to (``lock = threading.Lock()``), else
        None (the caller names it by type). Never from the locals of live frames: whether the
        frame that holds a lock is still running when a report is made is timing, and the same
        lock would be named by its variable in one run and by its type in the next."""
        for name, candidate in _scan_namespace(self._main_globals() or {}):
            if candidate is lock:
                return name
        for filename, line, _ in user_key(site) if site else ():
            statement = _one_line_statement(filename, line)
            if isinstance(statement, ast.Return) and isinstance(statement.value, ast.Call):
                continue  # a factory of the program's: named where its caller assigns the result
            return assigned_name(filename, line, _call_column(site, filename, line))
        return None


def _nothing() -> None:
    pass


@functools.lru_cache(maxsize=256)
def _one_line_statement(filename: str, line: int) -> ast.stmt | None:
    """The statement that is the whole of ``filename:line``; None for a line that is not one."""
    try:
        [stmt] = ast.parse(linecache.getline(filename, line).strip()).body
    except (SyntaxError, ValueError):
        return None
    return stmt


def _call_column(site: Any, filename: str, line: int) -> int | None:
    """The column where the call at ``filename:line`` in ``site`` (``(code, lasti, ...)``) starts,
    from the code object's instruction positions; None where it cannot be told."""
    for i in range(0, len(site) - 1, 2):
        code, lasti = site[i], site[i + 1]
        if getattr(code, "co_filename", None) != filename or not hasattr(code, "co_positions"):
            continue
        try:
            position = next(itertools.islice(code.co_positions(), lasti // 2, None), None)
        except Exception:
            return None
        if position is not None and position[0] == line and position[2] is not None:
            return position[2]
    return None


def assigned_name(filename: str, line: int, column: int | None = None) -> str | None:
    """The target of the one-line assignment at ``filename:line`` whose value is a call (``lock =
    threading.Lock()``, ``self._lock: Lock = RLock()``): ``lock``, ``self._lock``. With the call's
    ``column``, also one element of a tuple assignment of calls (``a, b = Lock(), Lock()``). None for
    any other statement (several targets, a comprehension, a statement over several lines)."""
    stmt = _one_line_statement(filename, line)
    if (
        column is not None
        and isinstance(stmt, ast.Assign)
        and len(stmt.targets) == 1
        and isinstance(stmt.targets[0], ast.Tuple)
        and isinstance(stmt.value, ast.Tuple)
        and len(stmt.targets[0].elts) == len(stmt.value.elts)
    ):
        text = linecache.getline(filename, line)
        column -= len(text) - len(text.lstrip())  # the statement was parsed without its indentation
        for target, value in zip(stmt.targets[0].elts, stmt.value.elts):
            if isinstance(value, ast.Call) and value.col_offset == column and isinstance(target, ast.Name):
                return target.id
        return None
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
        target = stmt.targets[0]
    elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
        target = stmt.target
    else:
        return None
    if not isinstance(stmt.value, ast.Call):
        return None
    node = target
    while isinstance(node, ast.Attribute):
        node = node.value
    return ast.unparse(target) if isinstance(node, ast.Name) else None


def _best_match(candidates: Iterable[tuple[str, str, str, Any]], cdata: int, lo: int, hi: int) -> tuple | None:
    """The candidate whose bytes of storage ``cdata`` best cover ``[lo, hi)``: exact first, then
    containing, then overlapping; among equals, by KIND_RANK. ``(rank, name, kind, root)``."""
    best: tuple | None = None
    for name, kind, root, t in candidates:
        if type(t) is tuple:  # (storage, lo, hi): a noted gradient
            if t[0]._cdata != cdata:
                continue
            t_lo, t_hi = t[1], t[2]
        else:
            try:
                if t.untyped_storage()._cdata != cdata:
                    continue
            except Exception:
                continue
            es = t.element_size()
            t_lo = t.storage_offset() * es
            t_hi = t_lo + max(t.numel(), 1) * es
        if t_hi <= lo or hi <= t_lo:
            continue
        exact = 0 if (t_lo, t_hi) == (lo, hi) else 1 if t_lo <= lo and hi <= t_hi else 2
        rank = (exact, KIND_RANK.get(kind, 9))
        if best is None or rank < best[0]:
            best = (rank, name, kind, root)
    return best


def _scan_namespace(ns: dict) -> Iterator[tuple[str, Any]]:
    """Variables of a namespace, then one attribute level deeper (``server.model``)."""
    items = [(k, v) for k, v in list(ns.items()) if not k.startswith("__")]
    for k, v in items:
        yield k, v
    for k, v in items:
        if isinstance(v, (types.ModuleType, type, types.FunctionType, torch.Tensor, torch.nn.Module)):
            continue
        try:
            attrs = vars(v)
        except TypeError:
            continue
        for ak, av in list(attrs.items()):
            if not ak.startswith("__"):
                yield f"{k}.{ak}", av


def _user_frames() -> Iterable[Any]:
    me = sys._getframe()
    for frame in sys._current_frames().values():
        f = frame
        while f is not None:
            if f is not me and classify_code(f.f_code) == USER and f.f_code.co_name != "<module>":
                yield f
            f = f.f_back
