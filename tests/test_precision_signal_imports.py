"""What reports lock-order cycles when the run is being ended imports nothing when it runs.

When the supervisor is about to end the tree (a timeout, SIGTERM to raceguard), each checked
process's heartbeat thread reports the lock-order cycles seen so far. The main thread may then
be stuck anywhere, halfway through importing a module included; a lazy import of that module on
the heartbeat's path would wait for that import's lock and the cycles of that process would be
lost. So every function on the path imports at module level only.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import textwrap

from raceguard.capture import lockreport, naming, stacks
from raceguard.capture.session import Session
from raceguard.process import child, child_worker
from raceguard.report import finding

# The heartbeat and what it calls to report.
HANDLER_PATH = [
    child._heartbeat,
    Session.report_lock_cycles,
    Session.report_deadlock,
    Session.emit,
    Session.lock_name,
    naming.Namer.name_lock,
    naming.assigned_name,
    naming._one_line_statement,
    Session.thread_name,
    Session.lock_by_key,
    Session.origin_of,
    lockreport,
    stacks.render_site,
    stacks._frames_of,
    finding.Finding.to_dict,
    finding.compute_fingerprint,
    child.PipeSink.__call__,
    child_worker.ProcessSink.__call__,
    child_worker.process_label,
]


def _imports_inside(obj: object) -> list[str]:
    """The import statements inside ``obj``'s functions (a module: inside any of its functions)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    body_nodes = tree.body if inspect.ismodule(obj) else [tree]
    found = []
    for top in body_nodes:
        for node in ast.walk(top):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        found.append(f"{getattr(obj, '__qualname__', obj.__name__)}:{inner.lineno}")
    return sorted(set(found))


def test_nothing_on_the_flush_path_imports_lazily() -> None:
    lazy = [where for obj in HANDLER_PATH for where in _imports_inside(obj)]
    assert lazy == [], f"imports run when the cycles are reported: {lazy}"


def test_the_lock_report_is_loaded_with_the_session() -> None:
    """A fresh interpreter: once the session's module is loaded (before the heartbeat starts),
    so is everything the heartbeat reports with."""
    code = (
        "import sys, raceguard.capture.session\n"
        "missing = [m for m in ('raceguard.capture.lockreport', 'raceguard.engine.lockgraph', "
        "'raceguard.engine.waitfor', 'raceguard.report.finding') if m not in sys.modules]\n"
        "assert not missing, missing\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
