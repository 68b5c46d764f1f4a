"""Per-op cost of the native recorder against plain torch and the Python dispatch mode.

Process CPU time (``time.process_time``: every thread of the process counts) of each workload,
in one process, repetitions interleaved so that machine noise hits every mode alike:

* ``add_``: ``x.add_(1)`` on a 64x64 float tensor;
* ``mlp``: one training step of a tiny MLP (Linear 32-64, ReLU, Linear 64-10, MSE, SGD);
* ``mlp4-own``: four threads each running that step on its own model and optimizer;
* ``mlp4-shared``: four threads each running that step on one shared model (each thread's
  parameters are its own tensors over the shared weights' storage, as Hogwild's processes have
  them): forward and backward without a lock, the optimizer step under a lock. The unlocked
  reads of weights another thread's step writes are races (the Hogwild pattern), so this one
  also measures accesses several timelines share and reporting; the findings column says how
  many were reported per repetition;
* ``pool16``: sixteen threads, each running ``add_`` on its own 16x16 tensor, ``--iters`` ops
  apiece (a request pool): what each recording thread's buffers cost, mostly in peak RSS.

Threads are started and joined inside every timed repetition, in every mode, after the session
is activated, so raceguard sees their start, join and lock as the checked process would.

Modes: ``plain``; ``python`` (raceguard's session with the Python dispatch mode); ``record``
(the native recorder alone: records are dropped without being drained); ``native`` (the native
recorder drained into the session). Prints, per op (ops counted by a dispatch mode over one
step: the ops the Python mode sees), the median over repetitions and its ratio to plain, and
the same for the fastest repetition of each mode.

Peak RSS per mode (``--rss-reps``, 0 skips it): each workload runs under each mode in a fresh
child process (a process's peak RSS cannot be reset), one warm-up and ``--rss-reps``
repetitions, and reports its peak RSS (``VmHWM``); not ``record``, whose buffers are sized to
hold a whole repetition (``native`` uses the backend's own sizes, drained as they fill). The plain child never imports raceguard, so a mode's
ratio includes raceguard's import and the native library as well as what recording keeps.
The CPU ratios stay in one process: interleaving there is what keeps them comparable on a
shared machine, and a child per repetition would add an interpreter's start-up noise.

    python benchmarks/native_capture.py [--reps 15] [--iters 2000] [--only add_ mlp mlp4]
        [--modes python native] [--rss-reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

MODES = ("plain", "python", "record", "native")
WORKLOADS = ("add_", "mlp", "mlp4-own", "mlp4-shared", "pool16")
GROUPS = {"mlp4": ("mlp4-own", "mlp4-shared")}  # --only names that stand for several workloads
THREADS = 4
POOL_THREADS = 16
STEP_ITERS = 20  # --iters counts add_ ops; an MLP step is worth this many of them
# Record capacities per thread (records, accesses, frames) of ``record``, which never drains:
# no repetition fills them. ``native`` uses the backend's own, as ``raceguard check`` does.
RECORD_CAPACITY = (1 << 16, 1 << 17, 1 << 19)


@dataclass
class Workload:
    run: Callable[[], None]
    ops: int  # ops one run() makes (all threads)
    label: str


def count_ops(step: Callable[[], None]) -> int:
    """Ops one call of ``step`` makes, as a dispatch mode sees them (this thread only)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.ops += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        step()
    return Counter.ops


def tiny_mlp() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 32, generator=gen), torch.randn(16, 10, generator=gen)


def training_step(model: torch.nn.Module, opt: torch.optim.Optimizer, data: torch.Tensor,
                  target: torch.Tensor) -> Callable[[], None]:
    loss_fn = torch.nn.MSELoss()

    def step() -> None:
        opt.zero_grad()
        loss_fn(model(data), target).backward()
        opt.step()

    return step


def add_loop(iters: int) -> Workload:
    x = torch.zeros(64, 64)

    def run() -> None:
        for _ in range(iters):
            x.add_(1)

    return Workload(run, iters, "x.add_(1), 64x64")


def mlp_loop(iters: int) -> Workload:
    torch.manual_seed(0)
    step = training_step(*tiny_mlp(), *batch(0))
    steps = iters // STEP_ITERS
    per_step = count_ops(step)

    def run() -> None:
        for _ in range(steps):
            step()

    return Workload(run, steps * per_step, f"{steps} steps of {per_step} ops, one thread")


def in_threads(work: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=work, args=(i,), name=f"worker-{i}") for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def mlp4_own_loop(iters: int) -> Workload:
    torch.manual_seed(0)
    steps_of = [training_step(*tiny_mlp(), *batch(i)) for i in range(THREADS)]
    steps = iters // STEP_ITERS
    per_step = count_ops(steps_of[0])

    def work(i: int) -> None:
        step = steps_of[i]
        for _ in range(steps):
            step()

    return Workload(lambda: in_threads(work), THREADS * steps * per_step,
                    f"{THREADS} threads x {steps} steps of {per_step} ops, a model and optimizer each")


def replica(shared: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model whose parameters are new tensors over ``shared``'s storage (as Hogwild's
    processes have): the weights are shared, autograd's version counters are not, so one
    thread's step does not fail another's backward."""
    model, _ = tiny_mlp()
    with torch.no_grad():
        for mine, theirs in zip(model.parameters(), shared.parameters()):
            mine.set_(theirs.untyped_storage(), theirs.storage_offset(), theirs.shape, theirs.stride())
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def mlp4_shared_loop(iters: int) -> Workload:
    torch.manual_seed(0)
    shared, _ = tiny_mlp()
    replicas = [replica(shared) for _ in range(THREADS)]
    batches = [batch(i) for i in range(THREADS)]
    loss_fn = torch.nn.MSELoss()
    steps = iters // STEP_ITERS

    def step(i: int, lock: Any) -> None:
        model, opt = replicas[i]
        data, target = batches[i]
        opt.zero_grad()
        loss_fn(model(data), target).backward()
        with lock:
            opt.step()

    per_step = count_ops(lambda: step(0, threading.Lock()))

    def run() -> None:
        lock = threading.Lock()  # made per run: the active session's instrumented lock

        def work(i: int) -> None:
            for _ in range(steps):
                step(i, lock)

        in_threads(work)

    return Workload(run, THREADS * steps * per_step,
                    f"{THREADS} threads x {steps} steps of {per_step} ops, one model, optimizer step locked")


def pool16_loop(iters: int) -> Workload:
    tensors = [torch.zeros(16, 16) for _ in range(POOL_THREADS)]

    def work(i: int) -> None:
        x = tensors[i]
        for _ in range(iters):
            x.add_(1)

    def run() -> None:
        threads = [threading.Thread(target=work, args=(i,), name=f"request-{i}") for i in range(POOL_THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    return Workload(run, POOL_THREADS * iters, f"{POOL_THREADS} threads x {iters} x.add_(1), 16x16, a tensor each")


FACTORIES: dict[str, Callable[[int], Workload]] = {
    "add_": add_loop, "mlp": mlp_loop, "mlp4-own": mlp4_own_loop, "mlp4-shared": mlp4_shared_loop,
    "pool16": pool16_loop,
}


def timed(run: Callable[[], None]) -> float:
    start = time.process_time()
    run()
    return time.process_time() - start


@dataclass
class Sample:
    seconds: float  # process CPU time of one run
    findings: int = 0  # findings reported during it
    lost: int = 0  # op records the native recorder dropped (a full buffer)


def measure(mode: str, run: Callable[[], None], module: Any) -> Sample:
    if mode == "plain":
        return Sample(timed(run))
    lost_before = module.stats()[0] if module is not None else 0

    def lost() -> int:
        return module.stats()[0] - lost_before if module is not None else 0

    from raceguard.capture import torch_ops

    if mode == "record":
        # Configured as NativeBackend.attach does: plans are built once, by whichever mode runs first.
        from raceguard.capture.naming import GRAD_INPLACE_OPS, GRAD_RESULT_OPS
        from raceguard.capture.rng_ops import draw_conditions

        module.configure_rng(draw_conditions())
        module.configure_grad_ops(sorted(GRAD_RESULT_OPS), sorted(GRAD_INPLACE_OPS))
        module.install(sorted(torch_ops.METADATA_ONLY), sorted(torch_ops.FRESH_INPUT),
                       dict(torch_ops.UNDECLARED_WRITES), *RECORD_CAPACITY)
        try:
            seconds = timed(run)
        finally:
            module.pause()
            module.discard()
        return Sample(seconds, 0, lost())
    from raceguard.capture.native.backend import NativeBackend
    from raceguard.capture.session import Session
    from raceguard.process.install import activate, deactivate

    findings = [0]

    def sink(event: dict) -> None:
        if event.get("type") == "finding":
            findings[0] += 1

    session = Session(sink)
    backend = None
    if mode == "native":
        backend = NativeBackend(module)
        backend.attach(session)
    handle = activate(session)
    try:
        if backend is None:
            seconds = timed(run)
        else:

            def run_and_drain() -> None:
                run()
                backend.drain()

            seconds = timed(run_and_drain)
    finally:
        deactivate(handle)
        if backend is not None:
            backend.stop()
    return Sample(seconds, findings[0], lost())


def native_module(modes: tuple[str, ...]) -> Any:
    if not {"record", "native"} & set(modes):
        return None
    from raceguard.capture.native.build import ensure

    built = ensure()
    if built.module is None:
        sys.exit(f"native recorder unavailable: {built.reason}")
    return built.module


def cpu_table(names: list[str], modes: tuple[str, ...], reps: int, iters: int, module: Any) -> None:
    for name in names:
        work = FACTORIES[name](iters)
        for mode in modes:  # warm-up: plans, pinned code objects, allocator
            measure(mode, work.run, module)
        samples: dict[str, list[float]] = {m: [] for m in modes}
        findings: dict[str, int] = {m: 0 for m in modes}
        lost: dict[str, int] = {m: 0 for m in modes}
        for _ in range(reps):
            for mode in modes:
                got = measure(mode, work.run, module)
                samples[mode].append(got.seconds)
                findings[mode] = max(findings[mode], got.findings)
                lost[mode] += got.lost
        plain = statistics.median(samples["plain"])
        fastest_plain = min(samples["plain"])
        print(f"{name}: {work.label}; {work.ops} ops per repetition")
        print("  (median; fastest repetition, less sensitive to a busy machine; findings per repetition)")
        for mode in modes:
            med = statistics.median(samples[mode])
            low = min(samples[mode])
            print(
                f"  {mode:7s} {med / work.ops * 1e6:9.2f} us/op  {med / plain:5.2f}x plain;"
                f"  fastest {low / work.ops * 1e6:9.2f} us/op  {low / fastest_plain:5.2f}x"
                f"  findings {findings[mode]}"
                + (f"  ({lost[mode]} records lost: a buffer was full)" if lost[mode] else "")
            )


def rss_child(name: str, mode: str, iters: int, reps: int) -> None:
    """In a fresh process: one warm-up and ``reps`` runs of ``name`` under ``mode``; print the
    peak RSS as JSON."""
    torch.set_num_threads(1)
    module = native_module((mode,))
    work = FACTORIES[name](iters)
    for _ in range(1 + reps):
        measure(mode, work.run, module)
    print(json.dumps({"maxrss_kb": peak_rss_kb()}))


def peak_rss_kb() -> int:
    """This process's peak RSS: ``VmHWM``, not ``ru_maxrss``, which Linux carries over from
    the parent's size at fork across ``exec``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rss_table(names: list[str], modes: tuple[str, ...], reps: int, iters: int) -> None:
    print(f"peak RSS, each mode in a fresh process (warm-up + {reps} repetitions; VmHWM):")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    modes = tuple(m for m in modes if m != "record")  # its buffers are sized for the benchmark
    for name in names:
        peak: dict[str, int] = {}
        for mode in modes:
            argv = [sys.executable, os.path.abspath(__file__), "--rss-child", name, mode,
                    "--iters", str(iters), "--rss-reps", str(reps)]
            proc = subprocess.run(argv, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{name} under {mode}: the RSS child failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
            peak[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["maxrss_kb"]
        cells = [f"{mode} {peak[mode] / 1024:6.1f} MB {peak[mode] / peak['plain']:5.3f}x" for mode in modes]
        print(f"  {name:12s}" + "   ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions per mode [15]")
    parser.add_argument("--iters", type=int, default=2000,
                        help=f"add_ ops per repetition; MLP steps are this / {STEP_ITERS} (per thread) [2000]")
    parser.add_argument("--only", nargs="+", choices=[*WORKLOADS, *GROUPS], metavar="WORKLOAD",
                        help=f"run only these: {', '.join(WORKLOADS)}, or mlp4 for both mlp4 variants")
    parser.add_argument("--modes", nargs="+", choices=MODES[1:], metavar="MODE",
                        help="modes besides plain (always measured): python, record, native [all]")
    parser.add_argument("--rss-reps", type=int, default=3,
                        help="repetitions in each peak-RSS child; 0 skips peak RSS [3]")
    parser.add_argument("--rss-child", nargs=2, metavar=("WORKLOAD", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reps < 1 or args.iters < STEP_ITERS or args.rss_reps < 0:
        parser.error(f"--reps must be at least 1, --iters at least {STEP_ITERS}, --rss-reps at least 0")
    if args.rss_child:
        rss_child(args.rss_child[0], args.rss_child[1], args.iters, args.rss_reps)
        return
    torch.set_num_threads(1)
    chosen = args.only or list(WORKLOADS)
    names = [w for w in WORKLOADS if w in chosen or any(w in GROUPS.get(g, ()) for g in chosen)]
    modes = ("plain", *[m for m in MODES[1:] if args.modes is None or m in args.modes])
    cpu_table(names, modes, args.reps, args.iters, native_module(modes))
    if args.rss_reps:
        rss_table(names, modes, args.rss_reps, args.iters)


if __name__ == "__main__":
    main()
