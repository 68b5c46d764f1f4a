#!/usr/bin/env python
"""Where raceguard's per-op time goes: run one workload in this process under the capture and
profile it.

The capture is installed the way ``raceguard/process/child.py`` installs it (a ``Session`` with a
sink that only collects, construction tracking, ``sync.install()``, ``session.ACTIVE``,
``enter_thread`` on the main thread); the workload runs with ``runpy`` as ``__main__``.

Profilers:

* ``cprofile`` (default): deterministic, sorted by ``tottime``. It charges its own per-call cost
  to every Python call, so it inflates code made of many tiny calls (which on_op is) and hides
  work done inside C calls (a dict look-up that hashes a code object shows up as ``dict.get``).
* ``sample``: SIGPROF every ``--interval`` ms of CPU time; self samples per line (a C call is
  charged to the line that made it), inclusive samples per function: coarser, but undistorted.
* ``none``: just the in-process wall time of the workload (compare with ``--plain``).

Usage: python benchmarks/profile_capture.py [WORKLOAD] [--profiler cprofile|sample|none]
       [--top 25] [--sort tottime] [--runs 1] [--plain] [--torch-threads 1]
WORKLOAD defaults to benchmarks/workloads/mlp_single.py.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import io
import os
import pstats
import runpy
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", nargs="?", default=str(HERE / "workloads" / "mlp_single.py"))
    ap.add_argument("--profiler", choices=["cprofile", "sample", "none"], default="cprofile")
    ap.add_argument("--top", type=int, default=25, help="lines to print [25]")
    ap.add_argument("--sort", default="tottime", help="pstats sort key for cprofile [tottime]")
    ap.add_argument("--interval", type=float, default=1.0, help="sampling interval in ms [1]")
    ap.add_argument("--runs", type=int, default=1, help="profiled runs of the workload [1]")
    ap.add_argument("--plain", action="store_true", help="run without the capture (baseline)")
    ap.add_argument(
        "--noop-mode",
        action="store_true",
        help="run under a no-op TorchDispatchMode instead (torch's own cost of a Python mode)",
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed, unprofiled runs first [1]: the first run imports torch._dynamo, sympy... lazily",
    )
    ap.add_argument("--torch-threads", type=int, default=1, help="OMP_NUM_THREADS [1]; 0 leaves it")
    ap.add_argument(
        "--child",
        action="store_true",
        help="profile the real `raceguard check` child process (cProfile over its whole life: "
        "bootstrap, import torch, activate, the target's first and only run, exit)",
    )
    ap.add_argument("--callers", help="with --child: also print the callers of functions matching this")
    return ap.parse_args()


def profile_child(args: argparse.Namespace) -> None:
    """Run ``raceguard check WORKLOAD`` through the real supervisor, with the child's bootstrap
    wrapped in cProfile: exactly what ``raceguard check`` installs, the way it runs the target."""
    import tempfile

    import raceguard.process.prestart as prestart
    from raceguard.process.check import CheckOptions, run_check

    fd, out = tempfile.mkstemp(suffix=".prof")
    os.close(fd)
    bootstrap = prestart.bootstrap_code

    def profiled_bootstrap(package_parent: str) -> str:
        return (
            "import cProfile as _rg_p, atexit as _rg_a; _rg_prof = _rg_p.Profile(); "
            f"_rg_a.register(lambda: (_rg_prof.disable(), _rg_prof.dump_stats({out!r}))); "
            "_rg_prof.enable(); " + bootstrap(package_parent)
        )

    prestart.bootstrap_code = profiled_bootstrap
    start = time.perf_counter()
    report = run_check(CheckOptions(script=os.path.abspath(args.workload)))
    wall = time.perf_counter() - start
    ops = report.stats.get("ops", 0)
    print(
        f"\n## {os.path.relpath(args.workload)}: the `raceguard check` child under cProfile, "
        f"{wall:.3f} s whole run, {ops} ops, {len(report.findings)} finding(s)\n"
    )
    text = io.StringIO()
    stats = pstats.Stats(out, stream=text).sort_stats(args.sort)
    stats.print_stats(args.top)
    if args.callers:
        stats.print_callers(args.callers)
    os.unlink(out)
    print(text.getvalue().replace(os.getcwd() + os.sep, ""))


class Sampler:
    """SIGPROF sampling of the main thread: self samples per line, inclusive per function.

    The handler runs in the main thread at the next bytecode boundary, so time inside a C call
    (a tensor op, a dict look-up hashing a code object) lands on the Python line that made it.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.self_counts: collections.Counter = collections.Counter()
        self.incl_counts: collections.Counter = collections.Counter()
        self.samples = 0

    @staticmethod
    def where(code) -> str:
        name = code.co_filename
        for marker in ("site-packages" + os.sep, os.getcwd() + os.sep):
            if marker in name:
                name = name.split(marker, 1)[1]
        return name

    def handler(self, signum, frame) -> None:
        if frame is None:
            return
        self.samples += 1
        self.self_counts[f"{self.where(frame.f_code)}:{frame.f_lineno}({frame.f_code.co_name})"] += 1
        seen = set()
        while frame is not None:
            code = frame.f_code
            if code not in seen:
                seen.add(code)
                self.incl_counts[f"{self.where(code)}:{code.co_firstlineno}({code.co_name})"] += 1
            frame = frame.f_back

    def start(self) -> None:
        signal.signal(signal.SIGPROF, self.handler)
        signal.setitimer(signal.ITIMER_PROF, self.interval, self.interval)

    def stop(self) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, signal.SIG_DFL)

    def report(self, top: int) -> str:
        out = io.StringIO()
        n = max(1, self.samples)
        out.write(f"{self.samples} CPU-time samples every {self.interval * 1e3:.1f} ms\n\n")
        out.write("self% by line (C calls charged to the calling line):\n")
        for k, c in self.self_counts.most_common(top):
            out.write(f"  {100 * c / n:6.1f}  {k}\n")
        out.write("\nincl% by function:\n")
        for k, c in self.incl_counts.most_common(top):
            out.write(f"  {100 * c / n:6.1f}  {k}\n")
        return out.getvalue()


def main() -> None:
    args = parse()
    if args.torch_threads > 0:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.torch_threads))
    if args.child:
        profile_child(args)
        return
    import torch

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)

    session = cap = None
    sys.path.insert(0, str(HERE))
    from _capture import install_capture, noop_mode

    if args.noop_mode:
        noop_mode().__enter__()
    elif not args.plain:

        cap = install_capture()
        session = cap.session
    workload = os.path.abspath(args.workload)
    sys.path.insert(0, os.path.dirname(workload))

    for _ in range(args.warmup):
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(workload, run_name="__main__")
    ops_before = session.ops if session is not None else 0

    profiler = sampler = None
    if args.profiler == "cprofile":
        profiler = cProfile.Profile()
    elif args.profiler == "sample":
        sampler = Sampler(args.interval / 1e3)

    start = time.perf_counter()
    cpu_start = time.process_time()
    if profiler is not None:
        profiler.enable()
    if sampler is not None:
        sampler.start()
    try:
        for i in range(args.runs):
            with contextlib.redirect_stdout(io.StringIO()) if i else contextlib.nullcontext():
                runpy.run_path(workload, run_name="__main__")
    finally:
        if profiler is not None:
            profiler.disable()
        if sampler is not None:
            sampler.stop()
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start

    where = "plain" if args.plain else "under a no-op dispatch mode" if args.noop_mode else "under raceguard's capture"
    n_ops = session.ops - ops_before if session is not None else 0
    ops = f", {n_ops} ops captured ({wall / n_ops * 1e6:.1f} µs/op all in)" if n_ops else ""
    print(
        f"\n## {os.path.relpath(workload)} {where}, profiler {args.profiler}, after {args.warmup} "
        f"warm-up run(s), {args.runs} profiled run(s): {wall:.3f} s in process ({cpu:.3f} s CPU){ops}\n"
    )
    if cap is not None:
        print(f"findings sent to the sink: {cap.findings()}\n")
    if profiler is not None:
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats(args.sort).print_stats(args.top)
        text = out.getvalue()
        # pstats prints absolute paths; shorten the interpreter's and this checkout's.
        for prefix in sorted({os.path.dirname(torch.__file__).rsplit("torch", 1)[0], os.getcwd() + os.sep}, key=len, reverse=True):
            text = text.replace(prefix, "")
        print(text)
    if sampler is not None:
        print(sampler.report(args.top))


if __name__ == "__main__":
    main()
