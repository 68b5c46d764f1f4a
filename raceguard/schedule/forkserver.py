"""The fork server: import torch once, fork a fresh child per schedule.

``raceguard stress`` must not pay interpreter start and ``import torch`` (~1.8 s) per schedule.
The supervising process (:class:`ForkServerClient`, no torch) starts one server process
(``python -c`` running :func:`server_main`), which prepares the target (compiles the script or
finds the module), imports torch and raceguard's capture layer, installs the instrumented
primitives, freezes the garbage collector's view of everything imported so far, and then waits
for ``run`` requests. For each one it ``os.fork()``\\s a child that runs one schedule
(:mod:`.runchild`) and streams its messages back over a pipe of its own. The server forwards them,
tagged with the schedule's index, over one pipe to the supervisor.

The server never starts a Python thread and never runs a tensor op (so no intra-op thread pool
exists when it forks); it multiplexes its pipes with ``selectors``. It ignores SIGINT: on Ctrl-C
(or SIGTERM to ``raceguard``) the supervisor decides (it sends ``stop``, or closes the control
pipe), and the server kills its children, passes on what they had written before that (so no
finding already made is lost) with a ``done`` that says ``stopped``, and exits.

Each schedule's child is the leader of a process group of its own: killing a schedule (its
timeout, ``stop``) kills that group, so processes the target started in that schedule end with
it (unless they left the group).

Protocol (JSON lines). Supervisor → server: ``{"op": "run", "index", "seed", "strategy",
"depth", "steps", "timeout", "log", "max_reports", "preempt"}`` and ``{"op": "stop"}``. Server →
supervisor: ``{"type": "ready"}``, ``{"type": "usage-error", "message"}``, ``{"type":
"started", "index", "pid"}``, ``{"index", "event": <child message>}`` and ``{"type": "done",
"index", "code", "signal", "killed", "stopped"}`` (``stopped``: ended by ``stop`` while it still ran).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any, Iterator

ENV_VAR = "RACEGUARD_FORKSERVER"
# After the child's own timeout report, the server kills a child that is still alive this late.
KILL_GRACE = 5.0


# ============================================================================================
# server side (runs in the server process)
# ============================================================================================
class _Child:
    __slots__ = ("index", "pid", "fd", "buffer", "eof", "status", "deadline", "killed", "reaped_at", "stopped")

    def __init__(self, index: int, pid: int, fd: int, deadline: float | None) -> None:
        self.index = index
        self.pid = pid
        self.fd = fd
        self.buffer = b""
        self.eof = False
        self.status: int | None = None
        self.deadline = deadline
        self.killed = False
        self.reaped_at: float | None = None
        self.stopped = False


# The server's children still running, by pid: killed when the supervisor is gone (see _write_all).
_children: dict[int, _Child] = {}


def server_main() -> None:
    config = json.loads(os.environ.pop(ENV_VAR))
    from ..process import child as child_mod

    child_mod._hide_bootstrap_frames()
    bootstrap_path = config.get("bootstrap_path")
    if bootstrap_path and sys.path and sys.path[0] == bootstrap_path:
        del sys.path[0]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctl_fd, out_fd = config["ctl_fd"], config["out_fd"]
    for fd in (ctl_fd, out_fd):
        os.set_inheritable(fd, False)

    def send(obj: dict) -> None:
        _write_all(out_fd, (json.dumps(obj, default=str) + "\n").encode())

    from ..process import runner

    code = runner.prepare_or_exit(config, send)

    started = time.monotonic()
    import torch  # noqa: F401 - once, for every schedule

    from .cudaguard import Guard, cuda_initialized

    # Nothing imported here may initialise CUDA (or ask the CUDA runtime for the device count):
    # the forked schedules could not use CUDA any more. A library that insists is imported by
    # each schedule instead (see .cudaguard).
    guard = Guard()
    guard.arm()
    try:
        from ..capture import lockreport, naming, session, stacks, torch_ops  # noqa: F401
        from .. import sync  # noqa: F401
        from . import failures, runchild, scheduler, strategies  # noqa: F401
        from .runchild import Target

        sync.install()
        _preimport(config, code)
    finally:
        guard.lift()
    cuda_state = {"initialized": cuda_initialized(), "refused": guard.refused[:20]}
    if cuda_state["initialized"]:  # not through Python's entry points (a C extension): say so
        sys.stderr.write("raceguard: the fork server initialised CUDA while importing the target's libraries; "
                         "schedules that use CUDA will fail\n")
    import gc

    gc.collect()
    gc.freeze()  # children share these pages: no copy-on-write from the collector touching them
    target = Target(config.get("script"), config.get("module"), config.get("args", []), code)
    send({"type": "ready", "pid": os.getpid(), "import_seconds": round(time.monotonic() - started, 3),
          "cuda": cuda_state})
    _serve(ctl_fd, out_fd, target, send)


def _preimport(config: dict, code: Any) -> None:
    """Import, once in the server, the library modules the script imports at top level (and
    torch._dynamo, which the first optimizer step imports, ~1 s), so schedules need not."""
    names: list[str] = list(config.get("preimport") or [])
    if code is not None:
        names += _top_level_imports(config["script"])
    source = ""
    try:
        if config.get("script"):
            with open(config["script"], encoding="utf-8", errors="replace") as f:
                source = f.read()
    except OSError:
        pass
    if "optim" in source:
        names.append("torch._dynamo")
    import importlib
    import importlib.util

    from ..capture.stacks import LIBRARY, classify_filename

    for name in dict.fromkeys(names):
        if name in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError, AttributeError):
            continue
        origin = getattr(spec, "origin", None) if spec is not None else None
        if spec is None or (origin and origin not in ("built-in", "frozen") and classify_filename(origin) != LIBRARY):
            continue  # the target's own modules run their top level in each schedule, as usual
        try:
            importlib.import_module(name)
        except Exception:
            pass


def _top_level_imports(path: str) -> list[str]:
    import ast

    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return []
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


def _serve(ctl_fd: int, out_fd: int, target: Any, send: Any) -> None:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(ctl_fd, selectors.EVENT_READ, None)
    children = _children  # by pid
    ctl_buffer = b""
    stopping = False

    def finish(child: _Child) -> None:
        status = child.status or 0
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        sig = None
        if os.WIFSIGNALED(status):
            try:
                sig = signal.Signals(os.WTERMSIG(status)).name
            except ValueError:
                sig = f"signal {os.WTERMSIG(status)}"
        send({"type": "done", "index": child.index, "code": code, "signal": sig, "killed": child.killed,
              "stopped": child.stopped})
        del children[child.pid]

    def forward(child: _Child, data: bytes) -> None:
        child.buffer += data
        *lines, child.buffer = child.buffer.split(b"\n")
        for line in lines:
            if line.strip():
                _write_all(out_fd, b'{"index": %d, "event": ' % child.index + line + b"}\n")

    def stop_all() -> None:
        """End every schedule still running, then pass on what each wrote before it ended (a
        finding streamed just before the stop must not be lost) and say each is done."""
        for child in children.values():
            if child.status is None:
                _kill(child.pid)
                child.stopped = True
            elif not child.eof:  # ended, but what it started holds its pipe: end that too
                _kill(child.pid, group_only=True)
        for child in list(children.values()):
            if child.status is None:
                try:
                    _, child.status = os.waitpid(child.pid, 0)
                except ChildProcessError:
                    child.status = 0
            if not child.eof:
                os.set_blocking(child.fd, False)
                while True:  # what is in the pipe now; a process that left the group may hold it open
                    try:
                        data = os.read(child.fd, 65536)
                    except (BlockingIOError, OSError):
                        break
                    if not data:
                        break
                    forward(child, data)
                os.close(child.fd)
                child.eof = True
            finish(child)

    while True:
        timeout = 0.05 if children else None
        for key, _ in sel.select(timeout):
            if key.data is None:  # control pipe
                try:
                    data = os.read(ctl_fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    stopping = True
                    break
                ctl_buffer += data
                *lines, ctl_buffer = ctl_buffer.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    msg = json.loads(line)
                    if msg.get("op") == "stop":
                        stopping = True
                    elif msg.get("op") == "run" and not stopping:
                        child = _spawn(msg, target, ctl_fd, out_fd, sel, children)
                        children[child.pid] = child
                        sel.register(child.fd, selectors.EVENT_READ, child)
                        send({"type": "started", "index": child.index, "pid": child.pid})
            else:
                child = key.data
                try:
                    data = os.read(child.fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    # The child exited (or closed its pipe): reap it now. A partial last line
                    # means it died mid-write; that line carries nothing complete.
                    sel.unregister(child.fd)
                    os.close(child.fd)
                    child.eof = True
                    if child.status is None:
                        try:
                            _, child.status = os.waitpid(child.pid, 0)
                        except ChildProcessError:
                            child.status = 0
                    finish(child)
                    continue
                forward(child, data)
        if stopping:
            stop_all()
            os._exit(0)
        now = time.monotonic()
        for child in list(children.values()):
            if child.status is None:
                try:
                    pid, status = os.waitpid(child.pid, os.WNOHANG)
                except ChildProcessError:
                    pid, status = child.pid, 0
                if pid:
                    child.status = status
                    child.reaped_at = now
                elif child.deadline is not None and now > child.deadline and not child.killed:
                    _kill(child.pid)
                    child.killed = True
            if child.status is not None:
                if not child.eof and now - (child.reaped_at or now) > 1.0:
                    # A process the target forked keeps the pipe open: stop waiting for it.
                    sel.unregister(child.fd)
                    os.close(child.fd)
                    child.eof = True
                if child.eof:
                    finish(child)


def _spawn(msg: dict, target: Any, ctl_fd: int, out_fd: int, sel: Any, children: dict) -> _Child:
    read_fd, write_fd = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    pid = os.fork()
    if pid == 0:  # the schedule's child
        try:
            try:
                os.setpgid(0, 0)  # a group of its own: see _kill
            except OSError:
                pass
            os.close(read_fd)
            for fd in [ctl_fd, out_fd] + [c.fd for c in children.values() if not c.eof]:
                try:
                    os.close(fd)
                except OSError:
                    pass
            try:
                sel.close()
            except Exception:
                pass
            os.set_inheritable(write_fd, False)
            from .runchild import run_schedule

            run_schedule(msg, target, write_fd)
        finally:
            os._exit(70)
    os.close(write_fd)
    try:
        os.setpgid(pid, pid)  # also here: a kill right after the fork must find the group
    except OSError:
        pass
    timeout = msg.get("timeout")
    deadline = time.monotonic() + float(timeout) + KILL_GRACE if timeout else None
    return _Child(int(msg["index"]), pid, read_fd, deadline)


def _kill(pid: int, group_only: bool = False) -> None:
    """SIGKILL a schedule's child and what the target started in it (its process group).
    ``group_only`` for a child already reaped: its pid stays reserved only while its group has
    members, so it must not be signalled as a process."""
    try:
        os.killpg(pid, signal.SIGKILL)
        return
    except (ProcessLookupError, PermissionError):
        pass
    if group_only:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except BrokenPipeError:  # the supervisor is gone: so are the schedules it asked for
            for child in list(_children.values()):
                if child.status is None:
                    _kill(child.pid)
            os._exit(0)
        data = data[n:]


# ============================================================================================
# supervisor side (no torch)
# ============================================================================================
class ServerError(Exception):
    """The fork server died or could not start (raceguard's own failure)."""


class TargetUsageError(Exception):
    """The target cannot be started (missing file, syntax error, unknown module)."""


def _bootstrap_code(package_parent: str) -> str:
    return (
        f"__import__('sys').path.insert(0, {package_parent!r}); "
        "__import__('raceguard.schedule.forkserver', fromlist=['server_main']).server_main()"
    )


class ForkServerClient:
    """Starts the fork server and talks to it."""

    def __init__(
        self,
        *,
        script: str | None,
        module: str | None,
        args: tuple[str, ...] | list[str],
        python: str | None = None,
        env: dict | None = None,
    ) -> None:
        package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        ctl_read, self._ctl = os.pipe()
        self._out, out_write = os.pipe()
        config = {
            "ctl_fd": ctl_read,
            "out_fd": out_write,
            "script": script,
            "module": module,
            "args": list(args),
            "bootstrap_path": package_parent,
        }
        child_env = dict(os.environ if env is None else env)
        child_env[ENV_VAR] = json.dumps(config)
        # Same hash seed for every schedule and for replay: str/bytes hashing (set and dict
        # iteration orders) must not differ between the run that failed and its replay.
        child_env.setdefault("PYTHONHASHSEED", "0")
        extra: dict = {}
        if sys.version_info >= (3, 11):
            # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which
            # decides (the server also ignores SIGINT once it runs, for older Pythons).
            extra["process_group"] = 0
        try:
            self.proc = subprocess.Popen(
                [python or sys.executable, "-c", _bootstrap_code(package_parent)],
                pass_fds=(ctl_read, out_write),
                env=child_env,
                **extra,
            )
        finally:
            os.close(ctl_read)
            os.close(out_write)
        os.set_blocking(self._out, False)
        self._buffer = b""
        self._closed = False
        self._ctl_open = True
        self._out_open = True
        self.ready: dict | None = None

    def wait_ready(self, timeout: float = 600.0, should_stop: Any = None) -> dict | None:
        """Wait until torch is imported; raises TargetUsageError or ServerError. Returns None if
        ``should_stop()`` became true first (Ctrl-C)."""
        deadline = time.monotonic() + timeout
        while True:
            if should_stop is not None and should_stop():
                return None
            for msg in self.messages(0.1):
                kind = msg.get("type")
                if kind == "ready":
                    self.ready = msg
                    return msg
                if kind == "usage-error":
                    self.close()
                    raise TargetUsageError(msg.get("message", "cannot start the target"))
            if self.proc.poll() is not None and not self._pending_data():
                raise ServerError(f"the fork server exited with code {self.proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                self.close()
                raise ServerError("the fork server did not start in time")

    def _pending_data(self) -> bool:
        r, _, _ = select.select([self._out], [], [], 0)
        return bool(r)

    def run(self, spec: dict) -> None:
        self._send({"op": "run", **spec})

    def _send(self, msg: dict) -> None:
        if not self._ctl_open:
            raise ServerError("the fork server was stopped")
        data = (json.dumps(msg) + "\n").encode()
        try:
            while data:
                n = os.write(self._ctl, data)
                data = data[n:]
        except (BrokenPipeError, OSError) as exc:
            raise ServerError(f"the fork server is gone: {exc}") from None

    def messages(self, timeout: float) -> Iterator[dict]:
        """Messages that arrive within ``timeout`` seconds (all those already buffered)."""
        try:
            r, _, _ = select.select([self._out], [], [], timeout)
        except InterruptedError:
            return
        if not r:
            return
        while True:
            try:
                chunk = os.read(self._out, 1 << 20)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                self._closed = True
                break
            self._buffer += chunk
            if len(chunk) < (1 << 20):
                break
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError:
                    yield {"type": "garbled", "line": line[:200].decode(errors="replace")}

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def eof(self) -> bool:
        return self._closed

    def stop(self) -> None:
        """Ask the server to stop: it kills the schedules still running, sends what they wrote
        before that and a ``done`` for each (read them with :meth:`messages` until :attr:`eof`),
        and exits. Idempotent."""
        if not self._ctl_open:
            return
        try:
            self._send({"op": "stop"})
        except ServerError:
            pass
        self._ctl_open = False
        try:
            os.close(self._ctl)
        except OSError:
            pass

    def close(self, timeout: float = 5.0) -> None:
        """Stop the server: it kills the schedules still running and exits."""
        self.stop()
        if self.ready is None:
            # Still importing (it reads no request before it is ready) and it has started no
            # schedule yet: waiting for it would only delay an interrupted run.
            timeout = 0.0
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._out_open:  # closed once: the number may belong to another file by now
            self._out_open = False
            try:
                os.close(self._out)
            except OSError:
                pass
