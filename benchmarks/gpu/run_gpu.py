#!/usr/bin/env python
"""Issue 14's GPU overhead benchmark: plain python vs `raceguard check` vs CUDA Sanitizer, one run.

Each workload (``workloads/``, device-agnostic) times its own loop after warm-up and prints
``loop_seconds=``; this script runs it ``--rounds`` times under each tool, alternating, and prints
the median loop time per tool, the ratios against plain python of the same run, and peak RSS
(``wait4``'s ``ru_maxrss``: the largest single process of the tree). The CUDA Sanitizer column
(``TORCH_CUDA_SANITIZER=1``) is "n/a" without a GPU. Targets from the issue: raceguard ≤ 3× plain
loop time (goal 2×), ≥ 3× cheaper than CUDA Sanitizer, RSS ≤ 1.5×. Information, never a gate.

Usage: python benchmarks/gpu/run_gpu.py [--rounds 2] [--quick] [--only NAME ...] [--json FILE]
``--quick`` shrinks the workloads (a CPU dry run of this script).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WORKLOADS = {
    "transformer_adamw_ema": (HERE / "workloads" / "transformer_adamw_ema.py", [],
                              ["--steps", "10", "--warmup", "1", "--d-model", "32"]),
    "stream_requests": (HERE / "workloads" / "stream_requests.py", [], ["--requests", "30"]),
}
TIMEOUT = 600


def cuda_available() -> bool:
    # In a child: this process must not poison anything, and the answer is the same.
    proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                          capture_output=True, text=True)
    return proc.stdout.strip() == "True"


def run(tool: str, script: Path, args: list[str]) -> dict:
    # One intra-op thread for every tool: a spinning pool on shared cores made plain CPU runs vary
    # by 3x (benchmarks/README.md); on a GPU the host threads only launch.
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **os.environ}
    env.pop("RACEGUARD_SIMULATE_CUDA", None)
    if tool == "raceguard":
        cmd = [sys.executable, "-m", "raceguard", "check", "-q", str(script), *args]
    else:
        cmd = [sys.executable, str(script), *args]
        if tool == "sanitizer":
            env["TORCH_CUDA_SANITIZER"] = "1"
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return {"error": f"timed out after {TIMEOUT} s"}
    wall = time.perf_counter() - started
    m = re.search(r"loop_seconds=([0-9.]+)", out)
    if m is None:
        return {"error": f"exit {proc.returncode}: {(err or out)[-400:]}"}
    return {"loop": float(m.group(1)), "wall": wall, "code": proc.returncode}


def rss_of(tool: str, script: Path, args: list[str]) -> int:
    """Peak RSS of one run of ``tool`` alone, in a fresh process (RUSAGE_CHILDREN only grows)."""
    code = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **os.environ}
    env.pop("RACEGUARD_SIMULATE_CUDA", None)
    if tool == "sanitizer":
        env["TORCH_CUDA_SANITIZER"] = "1"
    inner = [sys.executable, "-m", "raceguard", "check", "-q"] if tool == "raceguard" else [sys.executable]
    proc = subprocess.run([sys.executable, "-c", code, *inner, str(script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    try:
        return int(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small workloads (a CPU dry run)")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--json")
    opts = ap.parse_args()
    gpu = cuda_available()
    tools = ["plain", "raceguard"] + (["sanitizer"] if gpu else [])
    print(f"gpu-bench: device {'cuda' if gpu else 'cpu (no GPU: the sanitizer column is n/a)'}, "
          f"{opts.rounds} round(s), loop time after warm-up, median")
    print(f"{'workload':24} {'plain s':>8} {'raceguard s':>12} {'sanitizer s':>12} {'rg ratio':>9} "
          f"{'san ratio':>10} {'san/rg':>7} {'RSS rg/plain':>13}")
    results, failed = {}, False
    for name, (script, full, quick) in WORKLOADS.items():
        if opts.only and name not in opts.only:
            continue
        args = quick if opts.quick else full
        runs: dict[str, list[dict]] = {t: [] for t in tools}
        for _ in range(opts.rounds):
            for tool in tools:
                runs[tool].append(run(tool, script, args))
        errors = [f"{t}: {r['error']}" for t in tools for r in runs[t] if "error" in r]
        if errors:
            failed = True
            print(f"{name:24} failed: {errors[0]}")
            continue
        med = {t: statistics.median(r["loop"] for r in runs[t]) for t in tools}
        rss = {t: rss_of(t, script, args) for t in ("plain", "raceguard")}
        rg = med["raceguard"] / med["plain"]
        san = med["sanitizer"] / med["plain"] if gpu else None
        rss_ratio = rss["raceguard"] / rss["plain"] if rss["plain"] else float("nan")
        results[name] = {"median_loop": med, "ratio_raceguard": rg, "ratio_sanitizer": san, "rss_kb": rss,
                         "rss_ratio": rss_ratio, "runs": runs, "args": args}
        san_s = f"{med['sanitizer']:>12.3f}" if gpu else f"{'n/a':>12}"
        san_r = f"{san:>9.2f}x" if san is not None else f"{'n/a':>10}"
        san_rg = f"{san / rg:>6.2f}x" if san is not None else f"{'n/a':>7}"
        print(f"{name:24} {med['plain']:>8.3f} {med['raceguard']:>12.3f} {san_s} {rg:>8.2f}x {san_r} {san_rg} "
              f"{rss_ratio:>12.2f}x")
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
