"""Synchronisation created by library code, through the public CLI.

A library's Lock or RLock is taken in passing and orders nothing (it must not hide the target's
race); a library's Condition hands state between threads and orders each release of it before
every later acquisition, whether the receiver had to wait or found its predicate already true.
PyTorch's threaded process group, whose collectives publish their results that way, runs end to
end without a finding.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from test_cli_fixtures import ROOT, run_check

LIBRARY_DIR = ROOT / "tests" / "data" / "site-packages"

PRELUDE = f"""\
import sys, threading, time
sys.path.insert(0, {str(LIBRARY_DIR)!r})
import torch
import handoff_lib
"""


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "target.py"
    path.write_text(PRELUDE + textwrap.dedent(body))
    return path


def _line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def _user_line(access: dict) -> int:
    return next(f["line"] for f in access["stack"] if Path(f["file"]).name == "target.py")


def test_a_library_condition_orders_the_receiver(tmp_path: Path) -> None:
    # Both timings: the receiver waits for the notification, or finds the predicate already true.
    path = _write(
        tmp_path,
        """
        for receiver_late in (False, True):
            t = torch.zeros(8)
            box = handoff_lib.Mailbox()

            def sender():
                if not receiver_late:
                    time.sleep(0.2)
                t.add_(1.0)
                box.post()

            def receiver():
                if receiver_late:
                    time.sleep(0.2)
                box.collect()
                assert t.sum().item() == 8.0

            threads = [threading.Thread(target=sender), threading.Thread(target=receiver)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        """,
    )
    proc, report = run_check(path, tmp_path)
    assert report["findings"] == [], "\n".join(f["message"] for f in report["findings"])
    assert proc.returncode == 0, proc.stderr
    assert report["target_exit_code"] == 0


def test_a_library_mutex_taken_in_passing_hides_no_race(tmp_path: Path) -> None:
    # In real time the writer's critical section comes first each time; only its lock, the
    # library's, stands between the write and the read.
    path = _write(
        tmp_path,
        """
        by_lock, by_rlock = torch.zeros(8), torch.zeros(8)
        lock, rlock = handoff_lib.Counter("Lock"), handoff_lib.Counter("RLock")

        def writer():
            by_lock.add_(1.0)  # write Lock
            lock.bump()
            by_rlock.add_(1.0)  # write RLock
            rlock.bump()

        def reader():
            time.sleep(0.3)
            lock.bump()
            by_lock.sum()  # read Lock
            rlock.bump()
            by_rlock.sum()  # read RLock

        threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        """,
    )
    proc, report = run_check(path, tmp_path)
    assert proc.returncode == 1, proc.stderr
    findings = report["findings"]
    assert [f["kind"] for f in findings] == ["data-race"] * 2, [f["message"] for f in findings]
    found = {frozenset(_user_line(a) for a in f["accesses"]) for f in findings}
    expected = {
        frozenset({_line_of(path, f"# write {kind}"), _line_of(path, f"# read {kind}")})
        for kind in ("Lock", "RLock")
    }
    assert found == expected


def test_threaded_process_group_collectives_have_no_finding(tmp_path: Path) -> None:
    """PyTorch's threaded process group (what its multi-threaded distributed tests run on):
    three ranks, each collective's result read by every rank right after it returns."""
    path = tmp_path / "target.py"
    path.write_text(
        textwrap.dedent(
            """
            import threading
            import torch
            import torch.distributed as dist
            from torch.testing._internal.distributed.multi_threaded_pg import _install_threaded_pg

            WORLD = 3
            _install_threaded_pg()
            store = dist.HashStore()
            failures = []

            def rank_main(rank):
                dist.init_process_group("threaded", rank=rank, world_size=WORLD, store=store)
                t = torch.full((4,), float(rank))
                for _ in range(3):
                    dist.all_reduce(t)
                    if not t.eq(t[0]).all():
                        failures.append(rank)
                b = torch.full((4,), float(rank))
                dist.broadcast(b, src=1)
                if not b.eq(1.0).all():
                    failures.append(rank)
                gathered = [torch.empty(2) for _ in range(WORLD)]
                dist.all_gather(gathered, torch.full((2,), float(rank)))
                if [int(g[0]) for g in gathered] != list(range(WORLD)):
                    failures.append(rank)
                dist.barrier()
                dist.destroy_process_group()

            torch._C._distributed_c10d._set_thread_isolation_mode(True)
            ranks = [threading.Thread(target=rank_main, args=(r,)) for r in range(WORLD)]
            for th in ranks:
                th.start()
            for th in ranks:
                th.join()
            assert failures == [], failures
            """
        )
    )
    proc, report = run_check(path, tmp_path)
    assert report["findings"] == [], "\n".join(f["message"] for f in report["findings"])
    assert proc.returncode == 0, proc.stderr
    assert report["target_exit_code"] == 0
    assert report["stats"]["ops"] > 20


def test_conditions_inside_modelled_primitives_hand_nothing_off() -> None:
    """Queue, Event, Barrier and Future are modelled item by item; a hand-off through their inner
    Conditions would be coarser (a get would be ordered after every earlier put)."""
    code = textwrap.dedent(
        """
        import concurrent.futures, queue, threading
        from raceguard import sync
        sync.install()
        q = queue.Queue()
        inner = [q.not_empty, q.not_full, threading.Event()._cond, threading.Barrier(2)._cond,
                 concurrent.futures.Future()._condition]
        assert all(c._rg_handoff is None for c in inner), [c._rg_handoff for c in inner]
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
