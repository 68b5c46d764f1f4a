"""Implementation of ``micro_dispatch.py``, kept out of the entry script on purpose.

``current_site()`` looks every frame's code object up in a dict, and hashing a code object is
not cached by CPython: it recurses into ``co_consts``, i.e. into every function nested in it. A
script's ``<module>`` frame is on every stack, so if this file were the script, its own size
would inflate the per-op cost measured here. The entry script is tiny and ``main`` here only
calls small functions, like a typical training script's hot loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=20000, help="ops per timed loop [20000]")
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds; medians are reported [7]")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch.set_num_threads [1]; 0 leaves it")
    return ap.parse_args()


ARGS = _parse()
if ARGS.torch_threads > 0:
    os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.torch_threads))


import torch  # noqa: E402
from torch.utils._python_dispatch import _disable_current_modes  # noqa: E402

from _capture import Capture, install_capture, noop_mode  # noqa: E402

from raceguard.capture import stacks, torch_ops  # noqa: E402
from raceguard.capture.session import OpInfo  # noqa: E402

if ARGS.torch_threads > 0:
    torch.set_num_threads(ARGS.torch_threads)


def add_loop(a: torch.Tensor, b: torch.Tensor, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        a.add_(b)
    return time.perf_counter() - start


def per_op_us(seconds: float, n: int) -> float:
    return seconds / n * 1e6


def timed(fn: Callable[[], Any], n: int) -> float:
    """µs per call of ``fn`` (loop overhead of an empty call subtracted)."""
    def empty() -> None:
        return None

    best = []
    for f in (empty, fn):
        start = time.perf_counter()
        for _ in range(n):
            f()
        best.append(time.perf_counter() - start)
    return max(0.0, (best[1] - best[0]) / n * 1e6)


def at_depth(depth: int, fn: Callable[[], Any]) -> Any:
    """Call ``fn`` from ``depth`` extra user frames (a model's forward is ~10-30 frames deep)."""
    if depth <= 0:
        return fn()
    return at_depth(depth - 1, fn)


def run_path(kind: str, a: torch.Tensor, b: torch.Tensor, n: int) -> float:
    if kind == "raceguard":
        return add_loop(a, b, n)  # the capture's mode is on this thread's stack
    with _disable_current_modes():
        if kind == "plain":
            return add_loop(a, b, n)
        with noop_mode():
            return add_loop(a, b, n)


def site_loop(n: int) -> float:
    """current_site() as on_op takes it, from the same stack as add_loop (bar one small frame)."""
    site = stacks.current_site
    start = time.perf_counter()
    for _ in range(n):
        site(0)
    mid = time.perf_counter()
    for _ in range(n):
        pass
    return (mid - start) - (time.perf_counter() - mid)


def time_paths(a: torch.Tensor, b: torch.Tensor, n: int, rounds: int) -> dict[str, list[float]]:
    for kind in PATHS:  # warm-up: plan cache, code-class cache, shadows of a and b
        run_path(kind, a, b, 2000)
    times: dict[str, list[float]] = {k: [] for k in PATHS + ["current_site"]}
    for r in range(rounds):
        order = PATHS[r % 3:] + PATHS[: r % 3]  # rotate who goes first
        for kind in order:
            times[kind].append(run_path(kind, a, b, n))
        times["current_site"].append(site_loop(n))
    return times


PATHS = ["plain", "noop_mode", "raceguard"]


def report_paths(times: dict[str, list[float]], n: int, captured: int, findings: int) -> dict[str, float]:
    med = {k: per_op_us(statistics.median(v), n) for k, v in times.items()}
    best = {k: per_op_us(min(v), n) for k, v in times.items()}
    print(f"## micro_dispatch: {n} x a.add_(b) on 16-element tensors, {ARGS.rounds} alternating rounds")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), Python {sys.version.split()[0]}\n")
    print("| path | µs/op (median) | µs/op (best) | over plain (median) | over no-op mode (median) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| plain | {med['plain']:.2f} | {best['plain']:.2f} | – | – |")
    for k in PATHS[1:]:
        print(
            f"| {k} | {med[k]:.2f} | {best[k]:.2f} | {med[k] - med['plain']:+.2f} | "
            f"{med[k] - med['noop_mode']:+.2f} |"
        )
    k = "current_site"
    print(f"| current_site() alone, same stack as the add_ loop | {med[k]:.2f} | {best[k]:.2f} | – | – |")
    print(
        f"\nraceguard counted {captured} ops in its timed rounds (expected {ARGS.rounds * n}); "
        f"{findings} finding(s) sent to the sink."
    )
    return med


def time_pieces(cap: Capture, a: torch.Tensor, b: torch.Tensor, n: int) -> dict[str, float]:
    """The pieces of Session.on_op, each timed alone on the same op and tensors."""
    session, state = cap.session, cap.state
    func = torch.ops.aten.add_.Tensor
    plan = torch_ops.plan_for(func)
    args_ = (a, b)
    kwargs: dict = {}
    site = stacks.current_site(1)
    info = OpInfo(site, plan.name, state.locks)
    hb = session.hb
    sh_a = session.shadows[a.untyped_storage()._cdata]
    sh_b = session.shadows[b.untyped_storage()._cdata]
    rngs = torch_ops.byte_ranges(a)
    with open(torch.nn.modules.module.__file__) as f:
        big_source = f.read()
    big_code = compile(big_source, torch.nn.modules.module.__file__, "exec")
    big_lines = len(big_source.splitlines())
    m = max(2000, n // 2)

    def hb_pair() -> None:
        races: list = []
        hb.access(sh_a, rngs, hb.record(state.tid, True, info), races)
        hb.access(sh_b, rngs, hb.record(state.tid, False, info), races)

    def shadow_lookup() -> None:
        for t in (a, b):
            s = t.untyped_storage()
            sh = session.shadows.get(s._cdata)
            if sh is not None:
                sh.meta.ref() is s  # noqa: B015 - the identity check on_op does

    def lock_cycle() -> None:
        with session.lock:
            session.ops += 0

    def outputs() -> None:
        inputs = {a.untyped_storage()._cdata, b.untyped_storage()._cdata}
        for o in torch_ops.output_tensors(a):
            session._fresh(o, info, state.tid, inputs)

    op_site = stacks.op_site_function()
    pieces = [
        ("op site capture (what on_op takes), from this table's timing loop", op_site),
        ("op site capture, 20 user frames deeper", lambda: at_depth(20, op_site)),
        ("current_site() frame walk (locks, hazards), from this table's timing loop", lambda: stacks.current_site(1)),
        ("current_site(), 20 user frames deeper", lambda: at_depth(20, lambda: stacks.current_site(1))),
        ("  (at_depth(20) call overhead alone)", lambda: at_depth(20, lambda: None)),
        ("current_site(), 60 user frames deeper (capped at MAX_FRAMES)", lambda: at_depth(60, lambda: stacks.current_site(1))),
        ("  (at_depth(60) call overhead alone)", lambda: at_depth(60, lambda: None)),
        (f"hash() of a {big_lines}-line file's <module> code (torch/nn/modules/module.py)", lambda: hash(big_code)),
        ("plan_for(func)", lambda: torch_ops.plan_for(func)),
        ("OpInfo(site, name, locks)", lambda: OpInfo(site, plan.name, state.locks)),
        ("tensor_args(plan, args, kwargs)", lambda: torch_ops.tensor_args(plan, args_, kwargs)),
        ("2x t.untyped_storage()._cdata", lambda: (a.untyped_storage()._cdata, b.untyped_storage()._cdata)),
        ("shadow look-up + weakref check (2 tensors)", shadow_lookup),
        ("2x byte_ranges(t)", lambda: (torch_ops.byte_ranges(a), torch_ops.byte_ranges(b))),
        ("hb.record + hb.access (1 write + 1 read)", hb_pair),
        ("session.lock acquire/release (x1)", lock_cycle),
        ("output_tensors + _fresh (output aliases an input)", outputs),
        ("func(*args) called directly (the op itself)", lambda: func(a, b)),
    ]
    print("\n### pieces of Session.on_op, each timed alone\n")
    print("| piece | µs/call |")
    print("|---|---:|")
    by: dict[str, float] = {}
    with _disable_current_modes():  # keep the capture out of the pieces' own tensor calls
        for label, fn in pieces:
            fn()
            by[label] = us = statistics.median(timed(fn, m) for _ in range(3))
            print(f"| {label} | {us:.2f} |")
    return by


ON_OP_PIECES = (
    "op site capture (what on_op takes), from this table's timing loop",
    "plan_for(func)",
    "OpInfo(site, name, locks)",
    "tensor_args(plan, args, kwargs)",
    "2x t.untyped_storage()._cdata",
    "shadow look-up + weakref check (2 tensors)",
    "2x byte_ranges(t)",
    "hb.record + hb.access (1 write + 1 read)",
    "output_tensors + _fresh (output aliases an input)",
)


def summarise(by: dict[str, float], med: dict[str, float]) -> None:
    total = sum(by[k] for k in ON_OP_PIECES) + 2 * by["session.lock acquire/release (x1)"]
    print(
        f"\nsum of the on_op pieces (2 lock cycles): {total:.2f} µs; measured raceguard - no-op "
        f"mode: {med['raceguard'] - med['noop_mode']:.2f} µs (the rest: on_op's own bytecode, the "
        f"set/lists it builds, the AccessMode indirection)."
    )
    deep = by["current_site(), 20 user frames deeper"] - by["  (at_depth(20) call overhead alone)"]
    deep_op = by["op site capture, 20 user frames deeper"] - by["  (at_depth(20) call overhead alone)"]
    print(
        f"The frame walk current_site() costs {med['current_site']:.2f} µs on the add_ loop's 5-frame "
        f"stack and ~{deep:.2f} µs with 20 more user frames (it walks up to {stacks.MAX_FRAMES} kept "
        f"frames); on_op's C++ capture costs {by[ON_OP_PIECES[0]]:.2f} µs and ~{deep_op:.2f} µs "
        f"20 frames deeper."
    )


def main() -> None:
    n = ARGS.ops
    a = torch.zeros(16)
    b = torch.ones(16)
    cap = install_capture()
    ops_before = cap.session.ops
    times = time_paths(a, b, n, ARGS.rounds)
    captured = cap.session.ops - ops_before - 2000  # minus the warm-up
    findings = cap.findings()
    med = report_paths(times, n, captured, findings)
    by = time_pieces(cap, a, b, n)
    summarise(by, med)
    cap.close()
