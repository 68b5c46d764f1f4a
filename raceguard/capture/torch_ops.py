"""Tensor-memory accesses of aten ops, seen through a TorchDispatchMode entered in every thread.

For each op overload an :class:`OpPlan` is built once from its schema (which arguments are
tensors, which are written, which are only aliased by a view) and corrected by a small table of
ops whose schema is not the whole truth. At run time the mode turns each tensor argument into
``(storage, byte ranges, read|write)`` and hands them to the session, runs the op, and registers
outputs that live in new storage as fresh allocations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .rng_ops import is_rng_op

# Ops that touch only metadata of their tensor arguments (or nothing at all).
METADATA_ONLY = frozenset(
    {
        "aten::empty_like", "aten::zeros_like", "aten::ones_like", "aten::full_like",
        "aten::rand_like", "aten::randn_like", "aten::randint_like", "aten::new_empty",
        "aten::new_empty_strided", "aten::new_zeros", "aten::new_ones", "aten::new_full",
        "aten::size", "aten::stride", "aten::sym_size", "aten::sym_stride", "aten::sym_numel",
        "aten::sym_storage_offset", "aten::is_same_size", "aten::_has_compatible_shallow_copy_type",
        "aten::_unsafe_view", "aten::_reshape_alias", "aten::resize_", "aten::set_",
        "aten::record_stream", "aten::_nested_tensor_size", "aten::is_pinned",
    }
)
# torch.tensor(...) / Adam's step: the schema says "aliases its input", but the input is a tensor
# created outside any op just before: treat it as a fresh allocation.
FRESH_INPUT = frozenset({"aten::lift_fresh", "aten::lift"})
# Ops that write arguments their schema does not mark as written: (indices, condition arg index).
# Batch norm in training mode updates running_mean/running_var in place.
UNDECLARED_WRITES: dict[str, tuple[tuple[int, ...], int]] = {
    "aten::native_batch_norm": ((3, 4), 5),
    "aten::batch_norm": ((3, 4), 5),
    "aten::_batch_norm_impl_index": ((3, 4), 5),
    "aten::cudnn_batch_norm": ((3, 4), 5),
    "aten::miopen_batch_norm": ((3, 4), 5),
    "aten::instance_norm": ((3, 4), 5),
}

# Argument kinds
_TENSOR, _LIST = 1, 2


@dataclass(frozen=True)
class ArgSpec:
    index: int
    name: str
    kind: int  # _TENSOR or _LIST
    is_write: bool
    kwarg_only: bool


@dataclass(frozen=True)
class OpPlan:
    name: str
    args: tuple[ArgSpec, ...]
    metadata_only: bool
    fresh_input: bool
    undeclared: tuple[tuple[int, ...], int] | None
    rng: bool = False  # draws from a random generator: Session.on_op calls hazards.on_rng_op
    # A tensor argument is a view/alias source (``Tensor(a)``), left out of ``args``: an output
    # may share memory with a tensor that tensor_args does not return.
    alias_inputs: bool = False
    # ``args`` as plain tuples (index, name, is_list, is_write, kwarg_only) for tensor_args.
    specs: tuple = ()


def _tensor_kind(type_str: str) -> int:
    if type_str in ("Tensor", "Optional[Tensor]"):
        return _TENSOR
    if type_str in ("List[Tensor]", "List[Optional[Tensor]]"):
        return _LIST
    return 0


def build_plan(func: Any) -> OpPlan:
    name = func.name()
    base = name.split(".", 1)[0]
    specs = []
    alias_inputs = False
    schema = func._schema
    for i, a in enumerate(schema.arguments):
        kind = _tensor_kind(str(a.type))
        if not kind:
            continue
        alias = a.alias_info
        if alias is not None and not alias.is_write:
            alias_inputs = True
            continue  # a view/alias source: the op reads no data through it
        specs.append(ArgSpec(i, a.name, kind, bool(alias is not None and alias.is_write), bool(a.kwarg_only)))
    return OpPlan(
        name=name,
        args=tuple(specs),
        metadata_only=base in METADATA_ONLY,
        fresh_input=base in FRESH_INPUT,
        undeclared=UNDECLARED_WRITES.get(base),
        rng=is_rng_op(func),
        alias_inputs=alias_inputs,
        specs=tuple((a.index, a.name, a.kind == _LIST, a.is_write, a.kwarg_only) for a in specs),
    )


_plans: dict[Any, OpPlan] = {}
# The same plans keyed by id(func): hashing an OpOverload runs a Python __hash__ (0.3 µs). The
# overloads are kept alive by _plans, so their ids are never reused.
plans_by_id: dict[int, OpPlan] = {}


def plan_for(func: Any) -> OpPlan:
    plan = plans_by_id.get(id(func))
    if plan is None:
        plan = _plans.get(func)
        if plan is None:
            plan = _plans[func] = build_plan(func)
        plans_by_id[id(func)] = plan
    return plan


# Non-contiguous tensors are split into contiguous runs up to this many; beyond, the byte hull.
MAX_RUNS = 4096


def byte_ranges(t: torch.Tensor) -> list[tuple[int, int]]:
    """Storage-relative byte ranges the elements of ``t`` occupy (exact for strided views)."""
    if t.is_contiguous():  # the common case first: one run
        es = t.element_size()
        nbytes = t.numel() * es
        if not nbytes:
            return []
        off = t.storage_offset() * es
        return [(off, off + nbytes)]
    es = t.element_size()
    numel = t.numel()
    if numel == 0:
        return []
    off = t.storage_offset() * es
    sizes = t.shape
    strides = t.stride()
    # Dims of size 1 do not matter; sort the rest by stride, innermost first.
    dims = sorted(((st, sz) for st, sz in zip(strides, sizes) if sz != 1), key=lambda d: abs(d[0]))
    if any(st < 0 for st, _ in dims):
        lo = off + sum(st * (sz - 1) for st, sz in dims if st < 0) * es
        hi = off + (sum(st * (sz - 1) for st, sz in dims if st > 0) + 1) * es
        return [(lo, hi)]
    # Merge dims that are contiguous with the run inside them.
    run = 1
    k = 0
    while k < len(dims) and dims[k][0] == run:
        run *= dims[k][1]
        k += 1
    outer = dims[k:]
    hull = (sum(st * (sz - 1) for st, sz in dims) + 1) * es
    if not outer or any(st == 0 for st, _ in outer):
        return [(off, off + hull)]
    n_runs = 1
    for _, sz in outer:
        n_runs *= sz
    if hull == numel * es:  # a permutation of a dense block: the hull is exact
        return [(off, off + hull)]
    if n_runs > MAX_RUNS:
        return [(off, off + hull)]
    starts = [0]
    for st, sz in outer:
        starts = [s + i * st for s in starts for i in range(sz)]
    starts.sort()
    ranges: list[tuple[int, int]] = []
    run_bytes = run * es
    for s in starts:
        lo = off + s * es
        hi = lo + run_bytes
        if ranges and lo <= ranges[-1][1]:
            if hi > ranges[-1][1]:
                ranges[-1] = (ranges[-1][0], hi)
        else:
            ranges.append((lo, hi))
    return ranges


_TensorType = torch.Tensor


def tensor_args(plan: OpPlan, args: tuple, kwargs: dict) -> list[tuple[torch.Tensor, bool]]:
    """(tensor, is_write) for every tensor argument whose data the op touches.

    Only real tensors: torch passes what the caller wrote, so an argument the schema declares
    ``Tensor`` can arrive as a Python number (``x * 2``, ``x.mul_(0.99)``), a list as a tuple,
    and an optional one as None."""
    out: list[tuple[torch.Tensor, bool]] = []
    nargs = len(args)
    for index, name, is_list, is_write, kwarg_only in plan.specs:
        if index < nargs and not kwarg_only:
            value = args[index]
        else:
            value = kwargs.get(name)
        if value is None:
            continue
        if is_list:
            if isinstance(value, (list, tuple)):
                for v in value:
                    if isinstance(v, _TensorType):
                        out.append((v, is_write))
            elif isinstance(value, _TensorType):
                out.append((value, is_write))
        elif isinstance(value, _TensorType):
            out.append((value, is_write))
    undeclared = plan.undeclared
    if undeclared is not None:
        indices, cond = undeclared
        if cond < nargs and args[cond] is True:
            for i in indices:
                if i < nargs and isinstance(args[i], _TensorType):
                    out.append((args[i], True))
    return out


def output_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        tensors = []
        for o in out:
            if isinstance(o, torch.Tensor):
                tensors.append(o)
            elif isinstance(o, (tuple, list)):  # e.g. _foreach ops nested in a tuple
                tensors.extend(x for x in o if isinstance(x, torch.Tensor))
        return tensors
    return []


# A wrapped number (the tensor torch makes of the ``1`` in ``x + 1``) reaches a Python dispatch
# mode as a Python number: torch turns it back into one when it hands the mode its arguments.
# Most ops accept that number again (add, mul, ...), but ops that take no numbers refuse it
# before they run, e.g. ``aten::view`` of a traced graph's constant: ``Expected a value of type
# 'Tensor' for argument 'self' but instead found type 'int'``. The dtype each had:
_WRAPPED_NUMBER_DTYPES = {bool: torch.bool, int: torch.int64, float: torch.float64, complex: torch.complex128}
_REFUSED_NUMBER = "Expected a value of type 'Tensor' for argument '"


def numbers_as_tensors(func: Any, args: tuple, kwargs: dict, error: BaseException) -> tuple[tuple, dict] | None:
    """When ``func`` refused a Python number in a ``Tensor`` argument (``error``, raised before the
    op ran), the arguments with each such number as a 0-dim tensor of the wrapped number's dtype;
    None otherwise (``error`` is the op's own). Never raises.

    Not bit-for-bit a wrapped number (no Python API makes one): type promotion against other
    0-dim tensors can differ, e.g. 0-dim int32 + it gives int64 where torch gave int32."""
    try:
        if _REFUSED_NUMBER not in str(error):
            return None
        new_args = list(args)
        new_kwargs = dict(kwargs)
        changed = False
        for i, a in enumerate(func._schema.arguments):
            if _tensor_kind(str(a.type)) != _TENSOR:
                continue
            in_args = i < len(args) and not a.kwarg_only
            value = new_args[i] if in_args else new_kwargs.get(a.name)
            dtype = _WRAPPED_NUMBER_DTYPES.get(type(value))
            if dtype is None:
                continue
            tensor = torch.tensor(value, dtype=dtype)
            if in_args:
                new_args[i] = tensor
            else:
                new_kwargs[a.name] = tensor
            changed = True
        return (tuple(new_args), new_kwargs) if changed else None
    except Exception:
        return None


def run_op(func: Any, args: tuple, kwargs: dict) -> Any:
    """Run ``func`` once with the target's arguments (see :func:`numbers_as_tensors`)."""
    try:
        return func(*args, **kwargs)
    except RuntimeError as exc:
        retry = numbers_as_tensors(func, args, kwargs, exc)
        if retry is None:
            raise
    return func(*retry[0], **retry[1])


class AccessMode(TorchDispatchMode):
    """Records every op of the thread that entered it. One instance per thread (see the sketch)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Otherwise torch wraps __torch_dispatch__ in torch._disable_dynamo, and the first op
        # would import dynamo (about a second) in every target.
        return False

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # torch.compile'd code runs compiled under raceguard: Dynamo compiles with this mode off
        # instead of falling back to eager, and capture/compiled.py records each graph call.
        return True

    def __init__(self, on_op: Callable, state: Any) -> None:
        super().__init__()
        self._on_op = on_op
        self._state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self._on_op(self._state, func, args, kwargs or {})
