#!/usr/bin/env python
"""Does the CUDA tracker's per-op cost grow with the number of live device blocks?

Issue 14 asks that the device shadow stay cheap as a program holds more memory. Through the
CUDA-on-CPU backend (``RACEGUARD_SIMULATE_CUDA=1``: every CPU tensor is device memory, every op
goes through the same tracker code as on a GPU), each run first makes ``N`` tensors and keeps
them alive (each one allocated and touched by an op, so each is a block with shadow cells), then
times a loop of small ops that allocate and free a fresh block every iteration, as a training
step does. Printed per ``N``: µs per op (CPU time, median of the runs), the device shadow's
cell count and the live block count at the end, and the garbage collector's collections during
the loop (per-op bookkeeping that piles up shows there first). Information, never a gate.

Usage: python benchmarks/gpu/live_blocks.py [--blocks 10 1000 10000 50000] [--ops 6000] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def child(blocks: int, iterations: int) -> None:
    import gc
    import time

    import torch

    torch.set_num_threads(1)
    sys.path[:0] = [str(ROOT), str(HERE.parent)]  # this checkout's raceguard
    from _capture import install_capture

    cap = install_capture()
    live = [torch.ones(4) + i for i in range(blocks)]  # noqa: F841 - kept alive on purpose
    x = torch.ones(64)
    for _ in range(200):  # warm-up: plans, streams, first allocations
        (x * 2).sum()
    collections = [0, 0, 0]

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            collections[info["generation"]] += 1

    gc.callbacks.append(count)
    ops_before = cap.session.ops
    started = time.process_time()
    for _ in range(iterations):
        (x * 2).sum()  # two ops, two fresh blocks, both freed by the next iteration
    cpu = time.process_time() - started
    gc.callbacks.remove(count)
    ops = cap.session.ops - ops_before
    cuda = cap.session.cuda
    print(json.dumps({
        "us_per_op": cpu / max(ops, 1) * 1e6,
        "ops": ops,
        "cells": len(cuda.memory.shadow.cells) if cuda is not None else None,
        "live_blocks": len(cuda.memory.blocks) if cuda is not None else None,
        "collections": collections,
    }))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, nargs="+", default=[10, 1000, 10000, 50000])
    ap.add_argument("--ops", type=int, default=6000, help="timed ops per run [6000]")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", help="write the raw runs here")
    opts = ap.parse_args()
    env = {**os.environ, "RACEGUARD_SIMULATE_CUDA": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    results = {}
    print(f"{'live blocks':>11} {'µs/op':>8} {'cells':>8} {'blocks':>8} {'gc collections (gen 0/1/2)':>28}")
    for n in opts.blocks:
        runs = []
        for _ in range(opts.runs):
            proc = subprocess.run([sys.executable, __file__, "--child", str(n), str(opts.ops // 2)], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise SystemExit(f"live_blocks: {n} blocks failed:\n{proc.stderr[-3000:]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        med = statistics.median(r["us_per_op"] for r in runs)
        last = runs[-1]
        results[n] = {"us_per_op": med, "runs": runs}
        print(f"{n:>11} {med:>8.1f} {last['cells']:>8} {last['live_blocks']:>8} "
              f"{'/'.join(map(str, last['collections'])):>28}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
