"""raceguard's bootstrap for the Python processes a checked target starts (see raceguard.workers).

This directory is first on ``PYTHONPATH`` under ``raceguard check``, so Python's ``site`` imports
this module before the process's ``__main__``. It leaves no trace the program could see: it takes
its directory out of ``sys.path``, runs the environment's own ``sitecustomize`` (the one it
shadowed) if there is one, and then, in a worker (not in the target's own process, which
raceguard started itself), connects to the supervisor and starts checking.
"""

import os as _os
import sys as _sys


def _bootstrap() -> None:
    here = _os.path.dirname(_os.path.abspath(__file__))
    _sys.path[:] = [p for p in _sys.path if not p or _os.path.abspath(p) != here]
    me = _sys.modules.pop(__name__)
    try:
        import sitecustomize  # noqa: F401 - the environment's own, which this module shadowed
    except ImportError as exc:
        if exc.name != "sitecustomize":
            raise
    finally:
        # The import system takes sys.modules["sitecustomize"] back out when this module ends:
        # the environment's own if there was one, else this one must be there.
        _sys.modules.setdefault(__name__, me)
    raw = _os.environ.get("RACEGUARD_WORKERS")
    if not raw or "RACEGUARD_CHILD" in _os.environ:
        return  # not under raceguard, or the target's own process (raceguard.process.child)
    if _os.environ.get("RACEGUARD_CHECKED_PID") == str(_os.getpid()):
        return  # a subinterpreter of a process raceguard already checks: torch cannot load there
    try:
        import json

        config = json.loads(raw)
        _sys.path.insert(0, config["package"])
        try:
            from raceguard.process import child_worker as worker
        finally:
            if _sys.path and _sys.path[0] == config["package"]:
                del _sys.path[0]
        worker.start(config)
    except Exception:
        # raceguard's own failure (an unreadable configuration, raceguard unimportable in this
        # environment, a bug before the worker reached the supervisor): the worker runs unchecked,
        # exactly as without raceguard, never with site's "Error in sitecustomize" on its stderr.
        pass


_bootstrap()
del _bootstrap
