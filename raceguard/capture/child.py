"""Entry point of the process that runs the target under instrumentation.

The supervising ``raceguard`` process starts ``python -c`` with this module's :func:`main`, a pipe
and a JSON configuration in ``RACEGUARD_CHILD``. Findings are streamed over the pipe the moment
they are made, one JSON object per line, so a target that segfaults, aborts or calls
``os._exit`` loses none of them. The target's stdin/stdout/stderr are the child's own, untouched.

Messages: ``finding``, ``also_on``, ``internal-error``, ``usage-error``, ``stats`` (a heartbeat),
``exit`` (the target's exit code and final statistics).
"""

from __future__ import annotations

import _thread
import faulthandler
import json
import os
import sys
import time
from typing import Any

ENV_VAR = "RACEGUARD_CHILD"


class PipeSink:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.broken = False

    def __call__(self, event: dict) -> None:
        if self.broken:
            return
        data = (json.dumps(event, default=str) + "\n").encode()
        try:
            while data:
                n = os.write(self.fd, data)
                data = data[n:]
        except OSError:
            self.broken = True  # the supervisor is gone; keep the target running unchanged


def _heartbeat(session: Any, sink: PipeSink, period: float) -> None:
    while not sink.broken:
        time.sleep(period)
        sink({"type": "stats", "stats": session.stats()})


def _track_constructions(session: Any) -> None:
    """Remember every nn.Module and Optimizer the target builds, for naming."""
    import torch

    namer = session.namer
    module_init = torch.nn.Module.__init__

    def init_module(self: Any, *args: Any, **kwargs: Any) -> None:
        module_init(self, *args, **kwargs)
        try:
            namer.modules.add(self)
        except TypeError:
            pass

    init_module.__wrapped__ = module_init  # type: ignore[attr-defined]
    torch.nn.Module.__init__ = init_module  # type: ignore[method-assign]

    import weakref

    optimizer_init = torch.optim.Optimizer.__init__

    def init_optimizer(self: Any, *args: Any, **kwargs: Any) -> None:
        optimizer_init(self, *args, **kwargs)
        namer.optimizers.append(weakref.ref(self))

    init_optimizer.__wrapped__ = optimizer_init  # type: ignore[attr-defined]
    torch.optim.Optimizer.__init__ = init_optimizer  # type: ignore[method-assign]


def main() -> None:
    config = json.loads(os.environ.pop(ENV_VAR))
    bootstrap_path = config.get("bootstrap_path")
    if bootstrap_path and sys.path and sys.path[0] == bootstrap_path:
        del sys.path[0]
    # Not inherited by the target's own subprocesses, so the supervisor sees EOF when we end.
    os.set_inheritable(config["fd"], False)
    sink = PipeSink(config["fd"])

    from . import runner

    code = None
    try:
        if config.get("module"):
            runner.check_module(config["module"])
        else:
            code = runner.prepare_script(config["script"])
    except runner.UsageError as exc:
        sink({"type": "usage-error", "message": str(exc)})
        os._exit(2)

    crash_log = config.get("crash_log")
    if crash_log:
        try:
            faulthandler.enable(file=open(crash_log, "w"), all_threads=True)
        except OSError:
            pass

    import torch  # noqa: F401 - the dispatch mode needs it before the target's first line

    from . import session as session_mod
    from . import sync
    from .session import Session

    session = Session(
        sink,
        main_globals=lambda: getattr(sys.modules.get("__main__"), "__dict__", None),
        max_reports=config.get("max_reports"),
    )
    _track_constructions(session)
    sync.install()
    session_mod.ACTIVE = session
    import threading

    main_state = session.enter_thread(threading.main_thread(), None)
    _thread.start_new_thread(_heartbeat, (session, sink, 1.0))

    exit_code = 0
    outcome = "exit"
    try:
        try:
            if config.get("module"):
                runner.run_module(config["module"], tuple(config["args"]))
            else:
                runner.run_script(config["script"], code, tuple(config["args"]))
        except SystemExit as exc:
            exit_code = runner.exit_code_of(exc)
        except KeyboardInterrupt as exc:
            runner.print_uncaught(exc)
            exit_code, outcome = 130, "interrupted"
        except BaseException as exc:  # the target's own uncaught exception
            runner.print_uncaught(exc)
            exit_code, outcome = 1, "exception"
            sink({"type": "target-exception", "exception": f"{type(exc).__name__}: {exc}"})
        try:
            runner.wait_for_threads()
        except KeyboardInterrupt:
            exit_code, outcome = 130, "interrupted"
    finally:
        session.leave_thread(main_state, None)
        sink({"type": "exit", "code": exit_code, "outcome": outcome, "stats": session.stats()})
    try:
        sys.stdout.flush()
    except Exception:
        pass
    sys.exit(exit_code)
