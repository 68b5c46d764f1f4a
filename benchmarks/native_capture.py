"""Per-op cost of the native recorder against plain torch and the Python dispatch mode.

Process CPU time (``time.process_time``: every thread of the process counts) of two loops, in
one process, repetitions interleaved so that machine noise hits every mode alike:

* ``add_``: ``x.add_(1)`` on a 64x64 float tensor;
* ``mlp``: one training step of a tiny MLP (Linear 32-64, ReLU, Linear 64-10, MSE, SGD).

Modes: ``plain``; ``python`` (raceguard's session with the Python dispatch mode); ``record``
(the native recorder alone: records are dropped without being drained); ``native`` (the native
recorder drained into the session). Prints the median per iteration and its ratio to plain,
and the same for the fastest repetition of each mode.

    python benchmarks/native_capture.py [--reps 15] [--iters 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

import torch

from raceguard.capture import torch_ops
from raceguard.capture.native.backend import NativeBackend
from raceguard.capture.native.build import ensure
from raceguard.capture.session import Session
from raceguard.process.install import activate, deactivate


def add_loop(iters: int) -> Callable[[], None]:
    x = torch.zeros(64, 64)

    def run() -> None:
        for _ in range(iters):
            x.add_(1)

    return run


def mlp_loop(iters: int) -> Callable[[], None]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data, target = torch.randn(16, 32), torch.randn(16, 10)
    loss_fn = torch.nn.MSELoss()

    def run() -> None:
        for _ in range(iters // 20):
            opt.zero_grad()
            loss_fn(model(data), target).backward()
            opt.step()

    return run


def timed(run: Callable[[], None]) -> float:
    start = time.process_time()
    run()
    return time.process_time() - start


def measure(mode: str, run: Callable[[], None], module: Any) -> float:
    if mode == "plain":
        return timed(run)
    if mode == "record":
        module.install(sorted(torch_ops.METADATA_ONLY), sorted(torch_ops.FRESH_INPUT), dict(torch_ops.UNDECLARED_WRITES), 1 << 16, 1 << 17, 1 << 19)
        try:
            return timed(run)
        finally:
            module.pause()
            module.discard()
    session = Session(lambda event: None)
    backend = None
    if mode == "native":
        backend = NativeBackend(module, (1 << 16, 1 << 17, 1 << 19))
        backend.attach(session)
    handle = activate(session)
    try:
        if backend is None:
            return timed(run)

        def run_and_drain() -> None:
            run()
            backend.drain()

        return timed(run_and_drain)
    finally:
        deactivate(handle)
        if backend is not None:
            backend.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--iters", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    built = ensure()
    if built.module is None:
        sys.exit(f"native recorder unavailable: {built.reason}")
    modes = ("plain", "python", "record", "native")
    loops = {"add_": add_loop(args.iters), "mlp": mlp_loop(args.iters)}
    for name, run in loops.items():
        for mode in modes:  # warm-up: plans, pinned code objects, allocator
            measure(mode, run, built.module)
        samples: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.reps):
            for mode in modes:
                samples[mode].append(measure(mode, run, built.module))
        plain = statistics.median(samples["plain"])
        fastest_plain = min(samples["plain"])
        per = args.iters if name == "add_" else args.iters // 20
        unit = "op" if name == "add_" else "step"
        print(f"{name}:  (median; fastest repetition, less sensitive to a busy machine)")
        for mode in modes:
            med = statistics.median(samples[mode])
            low = min(samples[mode])
            print(
                f"  {mode:7s} {med / per * 1e6:9.2f} us/{unit}  {med / plain:5.2f}x plain;"
                f"  fastest {low / per * 1e6:9.2f} us/{unit}  {low / fastest_plain:5.2f}x"
            )


if __name__ == "__main__":
    main()
