"""Overhead of ``raceguard check`` on a 4-process Hogwild run (fork), against plain python.

    python benchmarks/hogwild.py                 # 5 alternating pairs
    python benchmarks/hogwild.py --pairs 3 --steps 200 --lock

The workload (this file run with ``--workload``) shares a 3-layer MLP (256 → 512 → 512 → 10,
``share_memory()``) and starts four fork workers that each run SGD on it (batch 128); with ``--lock`` every step holds one
``mp.Lock`` (a new epoch per step: every access to a parameter is streamed to the supervisor),
without it the updates race as Hogwild intends (raceguard reports them; the numbers include that).
Each pair runs plain and checked in alternating order; the report gives the median wall-time
ratio and the median ratio of CPU time of the whole process tree (``wait4`` rusage), steadier when
other work shares the machine. Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


def workload(steps: int, use_lock: bool) -> None:
    import contextlib

    import torch
    import torch.multiprocessing as mp
    from torch import nn

    def train(model: nn.Module, lock: object, seed: int) -> None:
        torch.manual_seed(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(128, 256), torch.randint(0, 10, (128,))
        for _ in range(steps):
            with lock if lock is not None else contextlib.nullcontext():
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

    torch.set_num_threads(1)
    mp.set_start_method("fork")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    model.share_memory()
    lock = mp.Lock() if use_lock else None
    workers = [mp.Process(target=train, args=(model, lock, rank)) for rank in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join()


def _run(cmd: list[str], report: str | None = None) -> tuple[float, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    code = os.waitstatus_to_exitcode(status)
    if report is None:
        ok = code == 0
    else:  # 1: raceguard found Hogwild's races; the target itself must have exited 0
        with open(report) as f:
            ok = code in (0, 1) and json.load(f)["target_outcome"]["code"] == 0
    if not ok:
        raise SystemExit(f"run failed ({code}): {' '.join(cmd)}\n{stderr.decode(errors='replace')[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lock", action="store_true", help="one mp.Lock around every step")
    args = parser.parse_args()
    if args.workload:
        workload(args.steps, args.lock)
        return
    target = [HERE, "--workload", "--steps", str(args.steps)] + (["--lock"] if args.lock else [])
    report = os.path.join(tempfile.mkdtemp(prefix="raceguard-hogwild-"), "report.json")
    plain = [sys.executable, *target]
    checked = [sys.executable, "-m", "raceguard", "check", "-q", "--format", "json", "-o", report, *target]
    reports = {id(plain): None, id(checked): report}
    _run(plain), _run(checked, report)  # warm-up: page cache, torch's lazy imports
    walls, cpus = [], []
    for i in range(args.pairs):
        order = (plain, checked) if i % 2 == 0 else (checked, plain)
        results = {id(cmd): _run(cmd, reports[id(cmd)]) for cmd in order}
        (pw, pc), (cw, cc) = results[id(plain)], results[id(checked)]
        walls.append((pw, cw))
        cpus.append((pc, cc))
        print(f"pair {i + 1}: plain {pw:.2f} s wall {pc:.2f} s CPU | raceguard {cw:.2f} s wall {cc:.2f} s CPU", flush=True)
    wall_ratio = statistics.median(c / p for p, c in walls)
    cpu_ratio = statistics.median(c / p for p, c in cpus)
    print(
        f"4-process Hogwild ({'mp.Lock per step' if args.lock else 'no lock'}, {args.steps} steps each): "
        f"plain {statistics.median(p for p, _ in walls):.2f} s, raceguard {statistics.median(c for _, c in walls):.2f} s; "
        f"wall ratio {wall_ratio:.2f}x (target <= 1.3x), CPU ratio {cpu_ratio:.2f}x"
    )


if __name__ == "__main__":
    main()
