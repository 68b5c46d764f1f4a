#!/usr/bin/env python
"""CPU proxy for raceguard's CUDA overhead: the tracker's own cost per op, measurable without a GPU.

``RACEGUARD_SIMULATE_CUDA=1`` makes every CPU tensor device memory of a simulated ``cuda:0``, so
every op goes through the same :class:`raceguard.cuda.tracker.CudaTracker` code a GPU run does
(stream lookup, launch edge, device shadow, allocation and free bookkeeping), on top of the host
capture. Each workload runs in-process in a fresh child per mode, the modes alternating:

* ``plain``: no capture;
* ``host``: raceguard's capture as ``raceguard check`` installs it on a CPU machine;
* ``sim``: the same with the CUDA tracker driven by the simulation.

Printed per workload: medians of the in-process CPU time of the workload (import torch
excluded; CPU time, not wall time, because the development machine's cores are shared), ops per
run, ``host µs/op = (host − plain) / ops``, ``sim µs/op = (sim − plain) / ops`` and
``tracker µs/op = (sim − host) / ops``, the CUDA path's own cost (on an H200 an earlier version's
whole CUDA path cost ≈170 µs per op). Timings are information, never a pass/fail gate.

The estimate for a launch-bound GPU loop (printed under the table). When the GPU finishes each
kernel before the host has launched the next, the loop's wall time is the host's time per op:
``P`` plain, ``P + R`` under raceguard, a ratio of ``1 + R / P``. On a GPU every op goes through
the host capture and the CUDA tracker, which is what ``sim`` runs, so ``R = sim µs/op`` and
``P = plain µs/op = plain / ops`` (this machine's cost of the same ops, so its speed cancels out):
estimated ratio ``= sim / plain``, and ``R ≤ P`` is an estimated ``≤ 2×``. Caveats: here ``P``
includes running the kernels on the CPU, which a GPU does beside the host, so ``P`` is
overstated and the estimate optimistic (little, at these shrunk sizes); where the GPU, not the
host, is the bottleneck, raceguard's host time hides behind the kernels and the real ratio is
lower; the simulation calls no stream or event API, whose own cost a GPU run adds to both.

``--backend python|native`` sets ``RACEGUARD_BACKEND`` in the ``host`` and ``sim`` children,
which choose the op capture as the checked process does; each child reports what it ran. A
visible CUDA device or the simulation keeps the Python mode (``raceguard.capture.native``), so
``sim`` runs the Python mode under either backend and the GPU estimate is the same for both: a
native GPU path does not exist to be estimated. Under ``native`` the ``host`` column is the
native recorder on the same op mix, i.e. what a native path would cost before the CUDA tracker's
work is added; its ratio ``host / plain`` is printed as a lower bound for such a path, and
``tracker µs/op`` (``sim − host``) then mixes two backends and is left out.

Usage: python benchmarks/gpu/proxy.py [--runs 3] [--only NAME ...] [--json FILE] [--backend python|native]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
# (name, script, arguments): small enough for a shared 2-core machine, same op mix as on a GPU.
WORKLOADS = [
    ("transformer_adamw_ema", HERE / "workloads" / "transformer_adamw_ema.py",
     ["--steps", "20", "--warmup", "2", "--d-model", "32"]),
    ("stream_requests", HERE / "workloads" / "stream_requests.py", ["--requests", "50"]),
]
MODES = ("plain", "host", "sim")
BACKEND_ENV = "RACEGUARD_BACKEND"


def child(mode: str, script: str, args: list[str]) -> None:
    """Run one workload once in this process under ``mode``; print a JSON line."""
    import io
    import runpy
    from contextlib import redirect_stdout

    import torch

    torch.set_num_threads(1)
    sys.path[:0] = [str(ROOT), str(HERE.parent)]  # this checkout's raceguard, whatever is installed
    cap = None
    if mode != "plain":
        from _capture import install_capture

        cap = install_capture(choose_backend=True)
    sys.argv = [script, *args]
    started, cpu_started = time.perf_counter(), time.process_time()
    with redirect_stdout(io.StringIO()):
        runpy.run_path(script, run_name="__main__")
    if cap is not None:
        cap.drain()  # the native recorder's last records count too
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    ops = cap.session.ops if cap is not None else 0
    launches = cap.session.cuda.model.launches if cap is not None and cap.session.cuda is not None else 0
    findings = cap.findings() if cap is not None else 0
    backend = cap.backend[0] if cap is not None else "none"
    print(json.dumps({"seconds": seconds, "cpu": cpu, "ops": ops, "launches": launches, "findings": findings,
                      "backend": backend}))


def run_one(mode: str, script: Path, args: list[str], backend: str | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("RACEGUARD_SIMULATE_CUDA", None)
    if backend is not None:
        env[BACKEND_ENV] = backend
    if mode == "sim":
        env["RACEGUARD_SIMULATE_CUDA"] = "1"
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"proxy: {script.name} under {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs per mode, alternating [3]")
    ap.add_argument("--only", nargs="*", help="workload names")
    ap.add_argument("--json", help="write the raw runs here")
    ap.add_argument("--backend", choices=("python", "native"),
                    help=f"{BACKEND_ENV} for the host and sim children [the environment's]")
    opts = ap.parse_args()
    if opts.backend == "native":
        sys.path.insert(0, str(ROOT))
        from raceguard.capture.native.build import ensure

        built = ensure()  # before the first timed child
        if built.module is None:
            raise SystemExit(f"proxy: the native recorder is unavailable: {built.reason}")
    requested = opts.backend or os.environ.get(BACKEND_ENV) or "default"
    print(f"{BACKEND_ENV} for the host and sim runs: {requested}")
    results: dict = {"backend_requested": requested, "workloads": {}}
    print(f"{'workload':24} {'ops':>7} {'plain s':>8} {'host s':>8} {'sim s':>8} "
          f"{'host µs/op':>11} {'sim µs/op':>10} {'tracker µs/op':>14} {'findings':>8}  backend host/sim")
    estimates = []
    for name, script, args in WORKLOADS:
        if opts.only and name not in opts.only:
            continue
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        for _ in range(opts.runs):
            for mode in MODES:
                runs[mode].append(run_one(mode, script, args, opts.backend))
        # CPU time of the process (all its threads): steadier than wall time on a shared machine.
        med = {m: statistics.median(r["cpu"] for r in runs[m]) for m in MODES}
        ops = runs["sim"][0]["ops"] or 1
        findings = max(r["findings"] for m in ("host", "sim") for r in runs[m])
        ran = {m: "/".join(sorted({r["backend"] for r in runs[m]})) for m in ("host", "sim")}
        same_backend = ran["host"] == ran["sim"]
        row = {
            "ops": ops,
            "launches": runs["sim"][0]["launches"],
            "seconds": med,
            "backend": ran,
            "plain_us_per_op": med["plain"] / ops * 1e6,
            "host_us_per_op": (med["host"] - med["plain"]) / ops * 1e6,
            "sim_us_per_op": (med["sim"] - med["plain"]) / ops * 1e6,
            "tracker_us_per_op": (med["sim"] - med["host"]) / ops * 1e6 if same_backend else None,
            "launch_bound_estimate": med["sim"] / med["plain"],
            "host_only_ratio": med["host"] / med["plain"],
            "findings": findings,
            "runs": runs,
        }
        results["workloads"][name] = row
        tracker = f"{row['tracker_us_per_op']:>14.1f}" if same_backend else f"{'(mixed)':>14}"
        print(f"{name:24} {ops:>7} {med['plain']:>8.2f} {med['host']:>8.2f} {med['sim']:>8.2f} "
              f"{row['host_us_per_op']:>11.1f} {row['sim_us_per_op']:>10.1f} {tracker} "
              f"{findings:>8}  {ran['host']}/{ran['sim']}")
        estimates.append((name, row))
    if estimates:
        print("\nlaunch-bound GPU loop, estimated as sim / plain = 1 + (sim µs/op) / (plain µs/op); "
              "target: raceguard's host µs/op ≤ the plain op's, i.e. ≤ 2×:")
        for name, row in estimates:
            ok = "✓" if row["sim_us_per_op"] <= row["plain_us_per_op"] else "✗"
            line = (f"  {name:24} plain {row['plain_us_per_op']:6.1f} µs/op, raceguard +{row['sim_us_per_op']:6.1f} µs/op "
                    f"(sim: {row['backend']['sim']}) -> {row['launch_bound_estimate']:.2f}× {ok}")
            if row["backend"]["host"] == "native":
                line += (f"; native host capture alone {row['host_only_ratio']:.2f}× "
                         "(a lower bound for a native GPU path: no CUDA tracker in it)")
            print(line)
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
