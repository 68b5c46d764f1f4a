"""Keep the fork server from initialising CUDA, so that every schedule can.

A process that initialised CUDA, or merely asked the CUDA runtime how many devices there are
(``torch.cuda.is_available()`` does, unless ``PYTORCH_NVML_BASED_CUDA_CHECK=1``), poisons its
forked children: their first CUDA call raises "Cannot re-initialize CUDA in forked subprocess".
The fork server imports torch, raceguard and the libraries the target imports at top level, and
any of those may ask. While the server sets up, :func:`guard` makes the entry points that
initialise CUDA or poison fork raise :class:`CudaRefused` instead: a library whose import needs
CUDA then fails to import *in the server* (``_preimport`` ignores that) and is imported by each
schedule's child, where CUDA is the target's to initialise. Nothing is answered in the server's
place, so no library caches a wrong ``is_available()`` that the children would inherit.

:meth:`Guard.lift` restores every patched attribute before the first fork. A module that bound a
guarded function during setup (``from torch.cuda import is_available``) keeps a wrapper that,
lifted, calls the original: children see torch's own behaviour.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

# (module, attribute): the Python entry points every CUDA initialisation and device-count query
# goes through (a CPU-only build answers is_available/device_count without reaching the C
# functions, so guarding the Python level is also what makes this testable on CPU).
GUARDED = (
    ("torch.cuda", "_lazy_init"),
    ("torch.cuda", "is_available"),
    ("torch.cuda", "device_count"),
    ("torch._C", "_cuda_getDeviceCount"),
    ("torch._C", "_cuda_init"),
)


class CudaRefused(RuntimeError):
    """Raised by a guarded CUDA entry point while the fork server sets up."""


class Guard:
    def __init__(self) -> None:
        self.armed = False
        self.refused: list[str] = []  # "torch.cuda.is_available (caller file:line)"
        self._patched: list[tuple[Any, str, Any]] = []

    def _wrap(self, qualname: str, original: Callable) -> Callable:
        guard = self

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if guard.armed:
                caller = sys._getframe(1)
                where = f"{caller.f_code.co_filename}:{caller.f_lineno}"
                guard.refused.append(f"{qualname} ({where})")
                raise CudaRefused(
                    f"raceguard's fork server does not initialise CUDA ({qualname}); "
                    "each schedule's process does"
                )
            return original(*args, **kwargs)

        guarded.__wrapped__ = original  # type: ignore[attr-defined]
        guarded.__name__ = getattr(original, "__name__", qualname)
        guarded.__doc__ = getattr(original, "__doc__", None)
        return guarded

    def arm(self) -> None:
        """Patch every module attribute that holds a guarded function (``torch.cuda.random``
        imported ``_lazy_init`` by name, so patching ``torch.cuda`` alone is not enough)."""
        originals: dict[int, tuple[str, Any]] = {}
        for modname, attr in GUARDED:
            mod = sys.modules.get(modname)
            fn = getattr(mod, attr, None) if mod is not None else None
            if fn is not None:
                originals[id(fn)] = (f"{modname}.{attr}", fn)
        if not originals:
            return
        wrappers = {key: self._wrap(name, fn) for key, (name, fn) in originals.items()}
        for name, mod in list(sys.modules.items()):
            if mod is None or not (name == "torch" or name.startswith("torch.")):
                continue
            d = getattr(mod, "__dict__", None)
            if not isinstance(d, dict):
                continue
            for attr, value in list(d.items()):
                w = wrappers.get(id(value))
                if w is not None and originals[id(value)][1] is value:
                    try:
                        setattr(mod, attr, w)
                    except (AttributeError, TypeError):
                        continue
                    self._patched.append((mod, attr, value))
        self.armed = True

    def lift(self) -> None:
        """Put every original back; wrappers bound elsewhere meanwhile delegate from now on."""
        self.armed = False
        for mod, attr, value in reversed(self._patched):
            try:
                setattr(mod, attr, value)
            except (AttributeError, TypeError):
                pass
        self._patched = []


def cuda_initialized() -> bool:
    """Whether this process initialised CUDA (reads torch's flag; initialises nothing)."""
    torch_cuda = sys.modules.get("torch.cuda")
    return bool(getattr(torch_cuda, "_initialized", False))
