#!/usr/bin/env python
"""Whole-process overhead of ``raceguard check`` on a few representative workloads.

For each workload this runs ``python WORKLOAD`` and ``python -m raceguard check -q WORKLOAD`` in
alternating pairs (the order flips every pair, so slow drift of a shared machine hits both sides
alike) and measures, per run:

* wall time of the whole command, from spawn to reap (``time.perf_counter``);
* peak RSS of the whole process tree. ``raceguard check`` runs the target in a child of the
  supervisor, i.e. a grandchild of this script, so a thread polls ``/proc/<pid>/status`` of every
  descendant and keeps the largest *sum* of VmRSS over the tree; ``os.wait4`` adds the exact
  ``ru_maxrss`` of the largest single process in the tree (Linux folds reaped descendants into
  it), which floors the sampled figure.

One extra ``raceguard check --format json`` run per workload reads ``stats.ops`` to turn the
time difference into a per-op cost. A ``startup`` row (a script that only imports torch) gives
the fixed cost of the supervisor and the child's set-up, which the ``net µs/op`` column removes.

``--backend python|native`` sets ``RACEGUARD_BACKEND`` for the ``raceguard check`` runs (without
it they get whatever the environment says); the header and the JSON record the request, and the
``backend`` column what the ops-counting run's report says ran (``stats.capture_backend``, which
names a fallback to the Python mode and why), else the request.

Performance is measured here, never asserted in tests: the targets are printed next to the
ratios, and the exit code is 0 whatever they say (non-zero only when a run itself fails).

Usage: python benchmarks/run_overhead.py [--pairs 5] [--json FILE] [--only NAME ...] [--backend python|native]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKLOADS = HERE / "workloads"

# name -> (script, time-ratio target)
BENCHES: dict[str, tuple[Path, float | None]] = {
    "startup": (WORKLOADS / "startup.py", None),
    "mlp_single": (WORKLOADS / "mlp_single.py", 1.3),
    "mlp_server": (WORKLOADS / "mlp_server.py", 1.3),
    "transformer_ema": (WORKLOADS / "transformer_ema.py", 1.3),
    "compute_bound": (WORKLOADS / "compute_bound.py", 1.05),
}
RSS_TARGET = 1.5
POLL_SECONDS = 0.02
BACKEND_ENV = "RACEGUARD_BACKEND"


# -- measuring one command ----------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _descendants(root: int) -> list[int]:
    seen = [root]
    i = 0
    while i < len(seen):
        seen.extend(_children(seen[i]))
        i += 1
    return seen


def _status_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB, (0, 0) when it is gone or a zombie."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


class TreeSampler(threading.Thread):
    """Polls the process tree under ``root``: peak of the summed VmRSS, and VmHWM per process."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.stop = threading.Event()
        self.tree_peak_kb = 0
        self.hwm_kb: dict[int, int] = {}
        self.max_procs = 0

    def run(self) -> None:
        while not self.stop.is_set():
            total = 0
            pids = _descendants(self.root)
            self.max_procs = max(self.max_procs, len(pids))
            for pid in pids:
                rss, hwm = _status_kb(pid)
                total += rss
                if hwm > self.hwm_kb.get(pid, 0):
                    self.hwm_kb[pid] = hwm
            self.tree_peak_kb = max(self.tree_peak_kb, total)
            self.stop.wait(POLL_SECONDS)


@dataclass
class Run:
    seconds: float
    tree_peak_kb: int  # max over samples of the tree's summed VmRSS (floored by max_proc_kb)
    max_proc_kb: int  # ru_maxrss from wait4: the largest single process in the tree, exact
    cpu_seconds: float  # user + system time of the tree (wait4 includes reaped descendants)
    returncode: int
    stderr_tail: str = ""


def measure(argv: list[str], env: dict[str, str]) -> Run:
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, env=env)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting
        sampler.stop.set()
        sampler.join()
        err.seek(0)
        tail = err.read()[-2000:].decode(errors="replace")
    max_proc_kb = int(usage.ru_maxrss)  # KiB on Linux
    cpu = usage.ru_utime + usage.ru_stime
    return Run(seconds, max(sampler.tree_peak_kb, max_proc_kb), max_proc_kb, cpu, proc.returncode, tail)


# -- one workload ---------------------------------------------------------------------------------
@dataclass
class Result:
    name: str
    target: float | None
    plain: list[Run] = field(default_factory=list)
    raceguard: list[Run] = field(default_factory=list)
    ops: int | None = None
    threads: int | None = None
    backend: str | None = None  # stats.capture_backend of the ops-counting run, when it says
    failures: list[str] = field(default_factory=list)

    @property
    def t_plain(self) -> float:
        return statistics.median(r.seconds for r in self.plain)

    @property
    def t_rg(self) -> float:
        return statistics.median(r.seconds for r in self.raceguard)

    @property
    def ratio(self) -> float:
        return statistics.median(g.seconds / p.seconds for p, g in zip(self.plain, self.raceguard))

    @property
    def cpu_plain(self) -> float:
        return statistics.median(r.cpu_seconds for r in self.plain)

    @property
    def cpu_rg(self) -> float:
        return statistics.median(r.cpu_seconds for r in self.raceguard)

    @property
    def cpu_ratio(self) -> float:
        return statistics.median(g.cpu_seconds / p.cpu_seconds for p, g in zip(self.plain, self.raceguard))

    @property
    def ratio_of_mins(self) -> float:
        """Fastest raceguard run over fastest plain run: the least disturbed by a busy machine."""
        return min(r.seconds for r in self.raceguard) / min(r.seconds for r in self.plain)

    @property
    def rss_plain(self) -> int:
        return max(r.tree_peak_kb for r in self.plain)

    @property
    def rss_rg(self) -> int:
        return max(r.tree_peak_kb for r in self.raceguard)

    @property
    def rss_ratio(self) -> float:
        return self.rss_rg / self.rss_plain if self.rss_plain else float("nan")

    def us_per_op(self, fixed: float = 0.0) -> float | None:
        if not self.ops or self.name == "startup":
            return None
        return (self.t_rg - self.t_plain - fixed) / self.ops * 1e6

    def cpu_us_per_op(self, fixed: float = 0.0) -> float | None:
        if not self.ops or self.name == "startup":
            return None
        return (self.cpu_rg - self.cpu_plain - fixed) / self.ops * 1e6

    def summary(self, fixed: float | None) -> dict:
        return {
            "name": self.name,
            "plain_s_median": round(self.t_plain, 4),
            "raceguard_s_median": round(self.t_rg, 4),
            "time_ratio_median_of_pairs": round(self.ratio, 4),
            "time_ratio_of_minimums": round(self.ratio_of_mins, 4),
            "cpu_plain_s_median": round(self.cpu_plain, 4),
            "cpu_raceguard_s_median": round(self.cpu_rg, 4),
            "cpu_ratio_median_of_pairs": round(self.cpu_ratio, 4),
            "time_ratio_target": self.target,
            "rss_plain_kb": self.rss_plain,
            "rss_raceguard_kb": self.rss_rg,
            "rss_ratio": round(self.rss_ratio, 4),
            "rss_ratio_target": RSS_TARGET,
            "ops": self.ops,
            "threads": self.threads,
            "capture_backend": self.backend,
            "us_per_op": _round(self.us_per_op()),
            "us_per_op_net_of_startup": _round(self.us_per_op(fixed)) if fixed is not None else None,
            "cpu_us_per_op": _round(self.cpu_us_per_op()),
            "failures": self.failures,
            "runs": {"plain": [asdict(r) for r in self.plain], "raceguard": [asdict(r) for r in self.raceguard]},
        }


def _round(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def count_ops(script: Path, env: dict[str, str]) -> tuple[int | None, int | None, str | None, str | None]:
    """(ops, threads, capture backend, problem) of one ``raceguard check --format json`` run."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "report.json"
        argv = [sys.executable, "-m", "raceguard", "check", "-q", "--format", "json", "--output", str(out), str(script)]
        proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
        try:
            report = json.loads(out.read_text())
        except (OSError, ValueError):
            return None, None, None, f"no JSON report (exit {proc.returncode}): {proc.stderr[-500:]}"
    problem = None
    if proc.returncode != 0 or report.get("findings"):
        problem = f"raceguard exit {proc.returncode}, {len(report.get('findings', []))} finding(s): not race-free?"
    stats = report.get("stats", {})
    return stats.get("ops"), stats.get("threads"), stats.get("capture_backend"), problem


def bench(name: str, script: Path, target: float | None, pairs: int, env: dict[str, str],
          rg_env: dict[str, str], log) -> Result:
    res = Result(name, target)
    plain_argv = [sys.executable, str(script)]
    rg_argv = [sys.executable, "-m", "raceguard", "check", "-q", str(script)]
    # One untimed warm-up of each: page cache, .pyc files.
    measure(plain_argv, env)
    measure(rg_argv, rg_env)
    for i in range(pairs):
        order = [("plain", plain_argv, env), ("raceguard", rg_argv, rg_env)]
        if i % 2:
            order.reverse()
        got = {}
        for kind, argv, run_env in order:
            got[kind] = run = measure(argv, run_env)
            if run.returncode != 0:
                res.failures.append(f"{kind} run {i} exit {run.returncode}: {run.stderr_tail.strip()[-300:]}")
        res.plain.append(got["plain"])
        res.raceguard.append(got["raceguard"])
        log(
            f"  {name} pair {i + 1}/{pairs}: plain {got['plain'].seconds:.3f}s "
            f"raceguard {got['raceguard'].seconds:.3f}s ({got['raceguard'].seconds / got['plain'].seconds:.3f}x)"
        )
    res.ops, res.threads, res.backend, problem = count_ops(script, rg_env)
    if problem:
        res.failures.append(problem)
    return res


# -- report ---------------------------------------------------------------------------------------
def _mb(kb: int) -> str:
    return f"{kb / 1024:.0f}"


def _verdict(value: float, target: float | None) -> str:
    if target is None:
        return "(fixed cost)"
    return f"≤ {target:g}× {'✓' if value <= target else '✗'}"


def markdown(results: list[Result], fixed: float | None, requested: str) -> str:
    lines = [
        "| workload | plain s | raceguard s | ratio | min ratio | CPU ratio | target | RSS plain MB "
        "| RSS raceguard MB | RSS ratio | RSS target | ops | threads | µs/op | net µs/op | CPU µs/op | backend |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]

    def num(x: float | int | None, fmt: str) -> str:
        return "–" if x is None else format(x, fmt)

    for r in results:
        net = r.us_per_op(fixed) if fixed is not None and r.name != "startup" else None
        lines.append(
            f"| {r.name} | {r.t_plain:.3f} | {r.t_rg:.3f} | {r.ratio:.3f}× | {r.ratio_of_mins:.3f}× | {r.cpu_ratio:.3f}× "
            f"| {_verdict(r.ratio, r.target)} "
            f"| {_mb(r.rss_plain)} | {_mb(r.rss_rg)} | {r.rss_ratio:.3f}× | {_verdict(r.rss_ratio, RSS_TARGET)} "
            f"| {num(r.ops, 'd')} | {num(r.threads, 'd')} | {num(r.us_per_op(), '.1f')} | {num(net, '.1f')} "
            f"| {num(r.cpu_us_per_op(), '.1f')} | {r.backend or requested} |"
        )
    return "\n".join(lines) + "\n"


def compile_raceguard() -> str:
    """Write raceguard's ``__pycache__`` before measuring, as installing it does.

    ``pip install`` compiles a package's bytecode; an editable checkout writes it on first
    import, unless ``PYTHONDONTWRITEBYTECODE`` is set (it is on the development machine), in
    which case every ``raceguard check`` compiled raceguard's sources again: ~0.1 s in the child
    and more in the supervisor, which no installed copy pays. torch's caches exist either way.
    """
    import compileall

    import raceguard

    root = Path(raceguard.__file__).resolve().parent
    ok = compileall.compile_dir(str(root), quiet=1)
    return f"written for {root}" if ok else f"could not all be written for {root}"


def build_native() -> str | None:
    """Build (or find cached) the native recorder before the first timed run; why not, or None."""
    from raceguard.capture.native.build import ensure

    built = ensure()
    return None if built.module is not None else built.reason


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=5, help="alternating plain/raceguard pairs per workload [5]")
    ap.add_argument("--json", metavar="FILE", help="also write every run and the summary as JSON")
    ap.add_argument("--only", nargs="+", choices=list(BENCHES), help="run only these workloads")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS/MKL_NUM_THREADS for the targets [1]: intra-op thread pools spin-wait "
        "badly on a shared 2-core machine; 0 leaves the environment alone",
    )
    ap.add_argument(
        "--backend",
        choices=("python", "native"),
        help="RACEGUARD_BACKEND for the raceguard check runs [the environment's]",
    )
    ap.add_argument(
        "--no-bytecode",
        action="store_true",
        help="do not write raceguard's bytecode caches first (see compile_raceguard)",
    )
    args = ap.parse_args(argv)
    if args.pairs < 1:
        ap.error("--pairs must be at least 1")
    bytecode = "not written (--no-bytecode)" if args.no_bytecode else compile_raceguard()

    env = dict(os.environ)
    if args.torch_threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.torch_threads)
    rg_env = dict(env)
    if args.backend:
        rg_env[BACKEND_ENV] = args.backend
    requested = rg_env.get(BACKEND_ENV) or "default"
    if requested == "native":
        native_build = build_native()
        if native_build is not None:
            print(f"run_overhead: the native recorder is unavailable: {native_build}", file=sys.stderr)
            return 2

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    names = args.only or list(BENCHES)
    results: list[Result] = []
    started = time.monotonic()
    for name in names:
        script, target = BENCHES[name]
        log(f"{name}: {args.pairs} pairs")
        results.append(bench(name, script, target, args.pairs, env, rg_env, log))
    fixed = next((r.t_rg - r.t_plain for r in results if r.name == "startup"), None)

    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    try:
        from importlib.metadata import version

        machine += f", torch {version('torch')}"
    except Exception:
        pass
    print(f"## raceguard overhead ({args.pairs} alternating pairs per workload; {machine}; "
          f"torch threads: {args.torch_threads or 'default'}; raceguard bytecode caches: {bytecode}; "
          f"{BACKEND_ENV} for the checked runs: {requested})\n")
    print(markdown(results, fixed, requested))
    print(
        "ratio = median of per-pair raceguard/plain wall-time ratios; min ratio = fastest raceguard run / "
        "fastest plain run (least disturbed by other load); CPU ratio = median of per-pair ratios of the "
        "tree's user+system CPU time (steadier than wall time on a busy machine); plain/raceguard s = medians; "
        "RSS = peak of the process tree (max over runs); µs/op = (median raceguard s - median plain s) / ops; "
        "net µs/op also subtracts the startup row's fixed cost; CPU µs/op = (median raceguard CPU s - median plain CPU s) / ops."
        + (f" Fixed startup cost: {fixed:.3f} s." if fixed is not None else "")
    )
    failed = [(r.name, f) for r in results for f in r.failures]
    for name, f in failed:
        print(f"\n**{name}: {f}**")
    print(f"\n_total benchmark time {time.monotonic() - started:.0f} s_")
    if args.json:
        doc = {
            "pairs": args.pairs,
            "machine": machine,
            "torch_threads": args.torch_threads,
            "backend_requested": requested,
            "fixed_startup_s": _round(fixed, 4),
            "workloads": [r.summary(fixed) for r in results],
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
