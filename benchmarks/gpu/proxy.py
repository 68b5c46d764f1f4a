#!/usr/bin/env python
"""CPU proxy for raceguard's CUDA overhead: the tracker's own cost per op, measurable without a GPU.

``RACEGUARD_SIMULATE_CUDA=1`` makes every CPU tensor device memory of a simulated ``cuda:0``, so
every op goes through the same :class:`raceguard.cuda.tracker.CudaTracker` code a GPU run does
(stream lookup, launch edge, device shadow, allocation and free bookkeeping), on top of the host
capture. Each workload runs in-process in a fresh child per mode, the modes alternating:

* ``plain``: no capture;
* ``host``: raceguard's capture as ``raceguard check`` installs it on a CPU machine;
* ``sim``: the same with the CUDA tracker driven by the simulation.

Printed per workload: medians of the in-process CPU time of the workload (import torch and the
modules torch imports lazily at the first optimizer step excluded; CPU time, not wall time,
because the development machine's cores are shared), ops per run,
``host µs/op = (host − plain) / ops``, ``sim µs/op = (sim − plain) / ops`` and
``tracker µs/op = (sim − host) / ops``, the CUDA path's own cost (on an H200 an earlier version's
whole CUDA path cost ≈170 µs per op). Timings are information, never a pass/fail gate.

The estimate for a launch-bound GPU loop (printed under the table). When the GPU finishes each
kernel before the host has launched the next, the loop's wall time is the host's time per op:
``P`` plain, ``P + R`` under raceguard, a ratio of ``1 + R / P``; ``R ≤ P`` is an estimated
``≤ 2×``. On a GPU every op goes through the host capture and the CUDA tracker, which is what
``sim`` runs. The CPU runs the kernels itself, which a GPU does beside the host, so the estimate
runs each workload again (same op mix) with tensors shrunk until the CPU's kernels cost next to
nothing (``LAUNCH_BOUND``): there ``P = plain / ops`` is the host's own cost of an op on this
machine (its speed cancels out of ``R / P``) and ``R = (sim − plain) / ops``. The estimate is
pessimistic in that a GPU op's host cost also includes launching the kernel (a few µs, absent
here, which raceguard does not add to), and an upper bound where the GPU, not the host, is the
bottleneck (raceguard's host time then hides behind the kernels).

``--backend python|native`` sets ``RACEGUARD_BACKEND`` in the ``host`` and ``sim`` children,
which choose the op capture as the checked process does; each child reports what it ran. A
visible CUDA device or the simulation keeps the Python mode (``raceguard.capture.native``), so
``sim`` runs the Python mode under either backend and the GPU estimate is the same for both: a
native GPU path does not exist to be estimated. Under ``native`` the ``host`` column is the
native recorder on the same op mix, i.e. what a native path would cost before the CUDA tracker's
work is added; its launch-bound ratio ``host / plain`` is printed as a lower bound for such a
path, and ``tracker µs/op`` (``sim − host``) then mixes two backends and is left out.

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
# The same runs with tensors so small that a CPU kernel costs next to nothing: the host's own
# cost per op, for the launch-bound estimate (8 heads need d_model divisible by 8).
LAUNCH_BOUND = {
    "transformer_adamw_ema": ["--d-model", "8", "--batch", "1", "--seq", "2"],
    "stream_requests": ["--batch", "1", "--in-features", "8", "--hidden", "8"],
}
MODES = ("plain", "host", "sim")
BACKEND_ENV = "RACEGUARD_BACKEND"


def child(mode: str, script: str, args: list[str]) -> None:
    """Run one workload once in this process under ``mode``; print a JSON line."""
    import io
    import runpy
    from contextlib import redirect_stdout

    import torch
    import torch._dynamo  # noqa: F401 - the first optimizer.step() imports it (about a second): not an op's cost

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


def measure_runs(script: Path, args: list[str], runs: int, backend: str | None) -> dict:
    """``runs`` alternating runs of each mode; medians of their CPU time and the per-op costs."""
    by_mode: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(runs):
        for mode in MODES:
            by_mode[mode].append(run_one(mode, script, args, backend))
    # CPU time of the process (all its threads): steadier than wall time on a shared machine.
    med = {m: statistics.median(r["cpu"] for r in by_mode[m]) for m in MODES}
    ops = by_mode["sim"][0]["ops"] or 1
    return {
        "ops": ops,
        "launches": by_mode["sim"][0]["launches"],
        "seconds": med,
        "backend": {m: "/".join(sorted({r["backend"] for r in by_mode[m]})) for m in ("host", "sim")},
        "host_us_per_op": (med["host"] - med["plain"]) / ops * 1e6,
        "sim_us_per_op": (med["sim"] - med["plain"]) / ops * 1e6,
        "tracker_us_per_op": (med["sim"] - med["host"]) / ops * 1e6,
        "findings": max(r["findings"] for m in ("host", "sim") for r in by_mode[m]),
        "runs": by_mode,
    }


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
        row = measure_runs(script, args, opts.runs, opts.backend)
        same_backend = row["backend"]["host"] == row["backend"]["sim"]
        if not same_backend:
            row["tracker_us_per_op"] = None
        med = row["seconds"]
        tracker = f"{row['tracker_us_per_op']:>14.1f}" if same_backend else f"{'(mixed)':>14}"
        print(f"{name:24} {row['ops']:>7} {med['plain']:>8.2f} {med['host']:>8.2f} {med['sim']:>8.2f} "
              f"{row['host_us_per_op']:>11.1f} {row['sim_us_per_op']:>10.1f} {tracker} "
              f"{row['findings']:>8}  {row['backend']['host']}/{row['backend']['sim']}")
        row["launch_bound"] = measure_runs(script, args + LAUNCH_BOUND[name], opts.runs, opts.backend)
        results["workloads"][name] = row
        estimates.append((name, row["launch_bound"]))
    if estimates:
        print("\nlaunch-bound GPU loop (the same runs, tensors shrunk until the CPU's kernels cost next to "
              "nothing): P = plain / ops, R = (sim - plain) / ops, estimate 1 + R/P; target R ≤ P, i.e. ≤ 2×:")
        for name, lb in estimates:
            plain_us = lb["seconds"]["plain"] / lb["ops"] * 1e6
            estimate = lb["seconds"]["sim"] / lb["seconds"]["plain"]
            lb["plain_host_us_per_op"], lb["estimate"] = plain_us, estimate
            ok = "✓" if lb["sim_us_per_op"] <= plain_us else "✗"
            line = (f"  {name:24} {lb['ops']} ops: P {plain_us:5.1f} µs/op, R {lb['sim_us_per_op']:6.1f} µs/op "
                    f"(sim: {lb['backend']['sim']}) -> {estimate:.1f}× {ok}")
            if lb["backend"]["host"] == "native":
                lb["native_host_only_estimate"] = lb["seconds"]["host"] / lb["seconds"]["plain"]
                line += (f"; native host capture alone {lb['native_host_only_estimate']:.1f}× "
                         "(a lower bound for a native GPU path: no CUDA tracker in it)")
            print(line)
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
