#!/usr/bin/env python
"""How fast ``raceguard stress`` finds the four bug shapes, next to plain re-running and frontrun.

For each shape in ``fixtures/stress`` (lazy_init, hotswap_consistency, step_counter,
publish_before_load) this measures:

* **plain re-running**: how many of N ``python SCRIPT`` runs fail (two at a time);
* **raceguard stress**, for ``random`` and ``pct`` (depth 3) over several base seeds: the number
  of schedules up to and including the first one where the bug *manifests* (a target failure;
  data races are suppressed for this, since the happens-before engine reports them in schedule
  0 of every run — that column is shown separately), and the wall seconds of the whole command
  to that point (fork-server start-up included);
* **replay**: the reported replay command re-run R times, and how often it fails the same way;
* **frontrun** (PyPI; DPOR and random bytecode exploration) on the same shapes written as
  ``frontrun.explore(setup, workers, invariant)``: interleavings and seconds to the first failure,
  or "not found" with how many it explored;
* the **cost of the scheduler**: microseconds per scheduling point (in-process, a capture
  session with and without the scheduler over the same tensor ops, in process CPU time), and one
  schedule's wall time
  against a plain ``python SCRIPT`` run (target: at most a tenth).

It prints Markdown tables. Performance is measured, never asserted; the exit code is 0 unless a
measurement itself could not run. frontrun is optional (``pip install frontrun``; it is not a
dependency of raceguard); without it that column says so.

Usage: python benchmarks/stress_bench.py [--seeds 5] [--plain-runs 30] [--replays 10]
       [--schedules 100] [--only SHAPE ...] [--skip-plain] [--skip-frontrun] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIXTURES = ROOT / "fixtures" / "stress"
SHAPES = ["lazy_init", "hotswap_consistency", "step_counter", "publish_before_load"]
STRATEGIES = ["random", "pct"]


# -- plain runs -------------------------------------------------------------------------------
def plain_runs(shape: str, n: int) -> dict:
    script = FIXTURES / f"{shape}.py"

    def one(_: int) -> tuple[int, float]:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, timeout=300)
        return proc.returncode, time.perf_counter() - t

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(one, range(n)))
    return {
        "runs": n,
        "failures": sum(1 for rc, _ in results if rc != 0),
        "median_seconds": statistics.median(t for _, t in results),
    }


def plain_serial_seconds(shape: str, n: int = 3) -> float:
    """Wall time of one plain run, measured alone (no parallel runs competing)."""
    script = FIXTURES / f"{shape}.py"
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, timeout=300)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# -- raceguard --------------------------------------------------------------------------------
def stress_run(shape: str, strategy: str, seed: int, schedules: int, workdir: Path) -> dict:
    supp = workdir / "no-races.txt"
    supp.write_text("data-race:*\n")
    out = workdir / f"{shape}-{strategy}-{seed}.json"
    cmd = [
        sys.executable, "-m", "raceguard", "stress", "-q", "--seed", str(seed), "--strategy", strategy,
        "--schedules", str(schedules), "--stop-on-first", "--suppressions", str(supp),
        "--format", "json", "--output", str(out), str(FIXTURES / f"{shape}.py"),
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t
    if not out.exists():
        raise RuntimeError(f"stress produced no report (exit {proc.returncode}): {proc.stderr[-2000:]}")
    report = json.loads(out.read_text())
    first = report["stats"]["first_failure_at"]
    failure = next((f for f in report["findings"] if f["kind"] == "target-failure"), None)
    races = [f["reproduce"]["schedule_index"] for f in report.get("suppressed", []) if f["kind"] == "data-race"]
    per_schedule = [s.get("seconds") for s in report["stats"].get("schedules", []) if s.get("seconds") is not None]
    points = [s.get("scheduling_points") for s in report["stats"].get("schedules", []) if s.get("scheduling_points")]
    return {
        "found": failure is not None,
        "schedules_to_failure": (first + 1) if first is not None else None,
        "schedules_run": report["stats"]["schedules_run"],
        "seconds": wall,
        "first_race_at": min(races) if races else None,
        "replay": failure["reproduce"]["command"] if failure else None,
        "fingerprint": failure["fingerprint"] if failure else None,
        "schedule_seconds": per_schedule,
        "points": points,
        "watchdog": report["stats"].get("watchdog_interventions", 0),
    }


def replays(command: str, fingerprint: str, n: int) -> int:
    argv = command.split()
    same = 0
    for _ in range(n):
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "r.json"
            subprocess.run([sys.executable, "-m", "raceguard", *argv[1:-1], "-q", "--format", "json", "--output", str(out),
                            argv[-1]], cwd=ROOT, capture_output=True, timeout=600)
            if out.exists():
                report = json.loads(out.read_text())
                same += any(f["kind"] == "target-failure" and f["fingerprint"] == fingerprint for f in report["findings"])
    return same


def server_startup_seconds(n: int = 3) -> float:
    """``raceguard stress --schedules 1`` on a script that does nothing: the fixed cost."""
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "noop.py"
        script.write_text("import torch\n")
        times = []
        for _ in range(n):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "raceguard", "stress", "-q", "--schedules", "1", "--strategy", "random",
                            str(script)], cwd=ROOT, capture_output=True, timeout=600)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


# -- cost per scheduling point (in-process, run in a child of this script) -------------------
POINTS_CHILD = r'''
import json, sys, threading, time
import torch
from raceguard.capture import session as session_mod, sync
from raceguard.capture.session import Session
from raceguard.schedule.scheduler import Scheduler
from raceguard.schedule.strategies import RandomStrategy, FirstStrategy

OPS = int(sys.argv[1])
sync.install()

def workload(threads):
    def work(t):
        for _ in range(OPS // threads):
            t.add_(1)
    tensors = [torch.zeros(4) for _ in range(threads)]
    ts = [threading.Thread(target=work, args=(x,)) for x in tensors]
    for t in ts: t.start()
    for t in ts: t.join()

def measure(threads, mode, repeat=7):
    # CPU time of the whole process (all threads), not wall time: on a shared machine the wall
    # clock also counts other processes; a hand-over's kernel work is CPU time of this process.
    best = None
    points = switches = 0
    for _ in range(repeat):
        session_mod.ACTIVE = None
        sched = None
        if mode != "plain":
            session = Session(lambda e: None)
            session_mod.ACTIVE = session
            state = session.enter_thread(threading.main_thread(), None)
            if mode != "session":
                sched = Scheduler(RandomStrategy(1) if mode == "random" else FirstStrategy())
                session.sched = sched
                sched.add_main()
        t = time.process_time()
        workload(threads)
        dt = time.process_time() - t
        if mode != "plain":
            session.leave_thread(state, None)
            session_mod.ACTIVE = None
        if sched is not None:
            points, switches = sched.steps, sched.switches
        best = dt if best is None else min(best, dt)
    return {"seconds": best, "points": points, "switches": switches}

workload(2)  # warm-up: op plans, allocator
out = {}
for threads in (1, 2):
    for mode in ("plain", "session", "first", "random"):
        out[f"{threads}:{mode}"] = measure(threads, mode)
for threads in (1, 2):  # a second pass, keeping the better of the two: less noise from neighbours
    for mode in ("plain", "session", "first", "random"):
        again = measure(threads, mode)
        if again["seconds"] < out[f"{threads}:{mode}"]["seconds"]:
            out[f"{threads}:{mode}"] = again
print(json.dumps(out))
'''


def point_costs(ops: int = 20000) -> dict:
    proc = subprocess.run([sys.executable, "-c", POINTS_CHILD, str(ops)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    res = {"ops": ops}
    for threads in (1, 2):
        session = data[f"{threads}:session"]["seconds"]
        for mode in ("first", "random"):
            d = data[f"{threads}:{mode}"]
            res[f"{threads}t_{mode}_us_per_point"] = (d["seconds"] - session) / max(d["points"], 1) * 1e6
            res[f"{threads}t_{mode}_switches"] = d["switches"]
            res[f"{threads}t_{mode}_points"] = d["points"]
        res[f"{threads}t_capture_us_per_op"] = (session - data[f"{threads}:plain"]["seconds"]) / ops * 1e6
        res[f"{threads}t_plain_us_per_op"] = data[f"{threads}:plain"]["seconds"] / ops * 1e6
    return res


# -- frontrun (runs in `frontrun python this_file --frontrun-child`) --------------------------
def frontrun_child(seeds: int, budget: int) -> None:
    import threading

    import frontrun
    import torch
    from torch import nn
    from collections import OrderedDict

    class Lazy:
        def __init__(self):
            torch.manual_seed(0)
            self.model = None
            self.builds = 0
            self.x = torch.randn(1, 16)

        def get_model(self):
            if self.model is None:
                model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
                model.eval()
                self.builds += 1
                self.model = model
            return self.model

        def handle(self):
            with torch.no_grad():
                return self.get_model()(self.x)

    class Hotswap:
        def __init__(self):
            torch.manual_seed(0)
            mk = lambda: nn.Sequential(OrderedDict(fc1=nn.Linear(8, 16), act=nn.ReLU(), fc2=nn.Linear(16, 4)))  # noqa: E731
            self.model = mk().eval()
            self.new_state = {k: v * 0.5 + 0.1 for k, v in self.model.state_dict().items()}
            self.canary = torch.randn(2, 8)
            with torch.no_grad():
                self.expected_old = self.model(self.canary)
                ref = mk()
                ref.load_state_dict(self.new_state)
                self.expected_new = ref(self.canary)
            self.answers = []

        def reload(self):
            self.model.load_state_dict(self.new_state)

        def serve(self):
            with torch.no_grad():
                out = self.model(self.canary)
            self.answers.append(torch.allclose(out, self.expected_old) or torch.allclose(out, self.expected_new))

    class Steps:
        def __init__(self):
            torch.manual_seed(0)
            self.model = nn.Linear(8, 1)
            self.lock = threading.Lock()
            self.step = 0
            self.x, self.y = torch.randn(4, 8), torch.randn(4, 1)

        def train_step(self):
            step = self.step
            with self.lock:
                loss = ((self.model(self.x) - self.y) ** 2).mean()
                self.model.zero_grad()
                loss.backward()
                with torch.no_grad():
                    for p in self.model.parameters():
                        p -= 0.1 * min(1.0, (step + 1) / 4) * p.grad
            self.step = step + 1

    class Publish:
        def __init__(self):
            torch.manual_seed(0)
            trained = nn.Linear(8, 4)
            self.trained_state = {k: v.clone() for k, v in trained.state_dict().items()}
            self.query = torch.randn(2, 8)
            with torch.no_grad():
                self.expected = trained(self.query)
            self.model = None
            self.answers = []

        def load(self):
            self.model = nn.Linear(8, 4)
            self.model.load_state_dict(self.trained_state)
            self.model.eval()

        def client(self):
            model = self.model
            if model is None:
                return
            with torch.no_grad():
                out = model(self.query)
            self.answers.append(torch.allclose(out, self.expected))

    shapes = {
        "lazy_init": (Lazy, [Lazy.handle, Lazy.handle], lambda s: s.builds == 1),
        "hotswap_consistency": (Hotswap, [Hotswap.reload, Hotswap.serve], lambda s: all(s.answers)),
        "step_counter": (Steps, [Steps.train_step, Steps.train_step], lambda s: s.step == 2),
        "publish_before_load": (Publish, [Publish.load, Publish.client], lambda s: all(s.answers)),
    }
    results = {}
    for name, (setup, workers, invariant) in shapes.items():
        for strategy in ("dpor", "random"):
            runs = []
            for seed in range(seeds if strategy == "random" else 1):
                kw = {"max_executions": budget} if strategy == "dpor" else {"max_attempts": budget, "seed": seed + 1}
                t = time.perf_counter()
                try:
                    r = frontrun.explore(setup=setup, workers=workers, invariant=invariant, strategy=strategy,
                                         stop_on_first=True, reproduce_on_failure=0, detect_io=False,
                                         total_timeout=300, **kw)
                    runs.append({"found": r.property_holds is False, "explored": r.num_explored,
                                 "seconds": time.perf_counter() - t, "verdict": r.property_holds})
                except Exception as exc:  # frontrun's own limits (e.g. inconclusive)
                    runs.append({"found": False, "explored": None, "seconds": time.perf_counter() - t, "error": repr(exc)[:200]})
            results[f"{name}:{strategy}"] = runs
    print("FRONTRUN-JSON " + json.dumps(results))


def frontrun_results(seeds: int, budget: int) -> dict | None:
    exe = shutil.which("frontrun")
    if exe is None:
        return None
    proc = subprocess.run([exe, sys.executable, str(Path(__file__).resolve()), "--frontrun-child",
                           "--seeds", str(seeds), "--schedules", str(budget)],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600)
    for line in proc.stdout.splitlines():
        if line.startswith("FRONTRUN-JSON "):
            return json.loads(line[len("FRONTRUN-JSON "):])
    raise RuntimeError(f"frontrun run failed: {proc.stderr[-3000:]}")


# -- report -----------------------------------------------------------------------------------
def med(values: list, fmt: str = "{:.0f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return fmt.format(statistics.median(values))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--plain-runs", type=int, default=30)
    ap.add_argument("--replays", type=int, default=10)
    ap.add_argument("--schedules", type=int, default=100)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--skip-plain", action="store_true")
    ap.add_argument("--skip-frontrun", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--frontrun-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.frontrun_child:
        frontrun_child(args.seeds, args.schedules)
        return 0

    shapes = args.only or SHAPES
    data: dict = {"shapes": {}, "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    work = Path(tempfile.mkdtemp(prefix="stress-bench-"))
    try:
        data["startup_seconds"] = server_startup_seconds()
        print(f"fork-server start-up (stress --schedules 1 of `import torch`): {data['startup_seconds']:.2f} s", file=sys.stderr)
        data["points"] = point_costs()
        print(f"points: {data['points']}", file=sys.stderr)
        for shape in shapes:
            entry: dict = {}
            if not args.skip_plain:
                entry["plain"] = plain_runs(shape, args.plain_runs)
                print(f"{shape} plain: {entry['plain']}", file=sys.stderr)
            entry["plain_alone_seconds"] = plain_serial_seconds(shape)
            for strategy in STRATEGIES:
                runs = [stress_run(shape, strategy, 1000 * k + 1, args.schedules, work) for k in range(args.seeds)]
                entry[strategy] = runs
                print(f"{shape} {strategy}: {[r['schedules_to_failure'] for r in runs]} "
                      f"{[round(r['seconds'], 1) for r in runs]}", file=sys.stderr)
            found = next((r for s in STRATEGIES for r in entry[s] if r["found"]), None)
            if found is not None and args.replays:
                entry["replay"] = {"command": found["replay"], "same": replays(found["replay"], found["fingerprint"], args.replays),
                                   "of": args.replays}
                print(f"{shape} replay: {entry['replay']}", file=sys.stderr)
            data["shapes"][shape] = entry
        if not args.skip_frontrun:
            try:
                data["frontrun"] = frontrun_results(args.seeds, args.schedules)
            except Exception as exc:
                data["frontrun_error"] = str(exc)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print_tables(data, args)
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))
    return 0


def print_tables(data: dict, args: argparse.Namespace) -> None:
    startup = data["startup_seconds"]
    print(f"\n### Schedules and seconds to the first failure ({args.seeds} base seeds, median; "
          f"up to {args.schedules} schedules)\n")
    print("| bug shape | plain runs failing | raceguard random: schedules / s | raceguard pct: schedules / s "
          "| found (random, pct) | data race reported at | replay same failure | frontrun dpor | frontrun random |")
    print("|---|---|---|---|---|---|---|---|---|")
    fr = data.get("frontrun") or {}
    for shape, e in data["shapes"].items():
        plain = e.get("plain")
        plain_text = f"{plain['failures']}/{plain['runs']}" if plain else "–"
        cols = []
        found = []
        for s in STRATEGIES:
            runs = e[s]
            cols.append(f"{med([r['schedules_to_failure'] for r in runs])} / "
                        f"{med([r['seconds'] for r in runs if r['found']], '{:.1f}')}")
            found.append(f"{sum(r['found'] for r in runs)}/{len(runs)}")
        races = [r["first_race_at"] for s in STRATEGIES for r in e[s] if r["first_race_at"] is not None]
        race_text = f"schedule {min(races)}" if races else "–"
        rep = e.get("replay")
        rep_text = f"{rep['same']}/{rep['of']}" if rep else "–"
        fcols = []
        for s in ("dpor", "random"):
            runs = fr.get(f"{shape}:{s}")
            if not runs:
                fcols.append("n/a" if not fr else "–")
                continue
            hits = [r for r in runs if r["found"]]
            if hits:
                fcols.append(f"{med([r['explored'] for r in hits])} / {med([r['seconds'] for r in hits], '{:.2f}')} s "
                             f"({len(hits)}/{len(runs)})")
            else:
                explored = [r.get("explored") for r in runs]
                fcols.append(f"not found ({med(explored)} explored, {med([r['seconds'] for r in runs], '{:.1f}')} s)")
        print(f"| {shape} | {plain_text} | {cols[0]} | {cols[1]} | {', '.join(found)} | {race_text} | {rep_text} "
              f"| {fcols[0]} | {fcols[1]} |")
    print(f"\nSeconds are the whole `raceguard stress` command, fork-server start-up (~{startup:.1f} s: "
          "one `import torch`) included; frontrun seconds exclude its process start-up and `import torch`.")

    p = data["points"]
    print("\n### Cost of the scheduler\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| tensor op, plain (µs) | {p['2t_plain_us_per_op']:.1f} |")
    print(f"| capture (dispatch mode + happens-before) per op (µs) | {p['2t_capture_us_per_op']:.1f} |")
    def us(v: float) -> str:
        return f"{v:.1f}" if v >= 0.5 else "< 0.5 (below the noise)"

    print(f"| scheduling point, 1 thread, no choice (µs) | {us(p['1t_random_us_per_point'])} |")
    print(f"| scheduling point, 2 threads, strategy `first` (choice, no switch) (µs) | {us(p['2t_first_us_per_point'])} |")
    sw = p["2t_random_switches"] / max(p["2t_random_points"], 1)
    print(f"| scheduling point, 2 threads, strategy `random` ({sw:.0%} switch threads) (µs) | {p['2t_random_us_per_point']:.1f} |")
    sched_secs = [x for e in data["shapes"].values() for s in STRATEGIES for r in e[s] for x in r["schedule_seconds"]]
    plain_alone = [e["plain_alone_seconds"] for e in data["shapes"].values()]
    one = statistics.median(sched_secs) if sched_secs else float("nan")
    plain_med = statistics.median(plain_alone)
    print(f"| one schedule of a bug-shape fixture, median (s) | {one:.3f} |")
    print(f"| one plain `python SCRIPT` run of the same fixtures, median (s) | {plain_med:.2f} |")
    print(f"| schedule / plain run (target ≤ 0.10) | {one / plain_med:.3f} |")
    print(f"| fork-server start-up, once per command (s) | {startup:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
