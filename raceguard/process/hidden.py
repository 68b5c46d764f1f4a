"""Keep the modules the child imported for itself out of the target's ``sys.modules`` until the
target imports them.

The ``raceguard check`` child imports torch while the supervisor parses its arguments (see
:mod:`raceguard.prestart`), before it knows what the target is. A target that never imports torch
must still not find it in ``sys.modules``: CPython's regrtest rewrites ``__file__`` of every loaded
module (torch's config modules refuse that), and libraries take other paths when they see
``"torch" in sys.modules``.

So right before the target's first line, :func:`hide` takes every module the child imported that is
neither the standard library's nor raceguard's out of ``sys.modules``, and puts a finder first on
``sys.meta_path`` that hands each back — the same module object, never executed again — when the
target imports it: a whole top-level package at once (a package looks its own submodules up in
``sys.modules``), and everything at once for torch (torch looks its dependencies up there too,
and in plain python they would all have been imported with it).
"""

from __future__ import annotations

import copy
import importlib.machinery
import sys
import types
from typing import Any, Callable, Iterable

_MISSING = object()
# The module attributes import machinery sets from the spec it loads; put back as they were.
_SPEC_ATTRS = ("__spec__", "__loader__", "__package__", "__path__", "__file__", "__cached__")


def _top(name: str) -> str:
    return name.partition(".")[0]


class _Loader:
    """Loads a hidden module by handing back the module object itself; anything else (get_code for
    runpy, get_resource_reader, ...) is the module's own loader's."""

    def __init__(self, finder: "HiddenModules", original: Any) -> None:
        self.finder = finder
        self.original = original

    def create_module(self, spec: Any) -> types.ModuleType:
        return self.finder.all[spec.name]

    def exec_module(self, module: types.ModuleType) -> None:
        self.finder.put_back(module.__spec__.name, module)  # our spec: the key it was hidden under

    def __getattr__(self, attr: str) -> Any:
        if self.original is None:
            raise AttributeError(attr)
        return getattr(self.original, attr)


class HiddenModules:
    """The finder of hidden modules (see the module docstring)."""

    def __init__(self, modules: dict[str, types.ModuleType], everything_with: str, on_everything: Callable[[], None]) -> None:
        self.all = modules  # every module hidden, restored or not: see find_spec
        self.hidden = dict(modules)  # still out of sys.modules
        self.everything_with = everything_with
        self.on_everything = on_everything
        self.attrs = {name: {a: m.__dict__.get(a, _MISSING) for a in _SPEC_ATTRS} for name, m in modules.items()}

    # -- importlib's finder protocol ------------------------------------------------------------
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        module = self.all.get(name)
        if module is None or target is not None:  # not ours, or importlib.reload(): load it afresh
            return None
        # Also answer for a module another thread has just put back (it read sys.modules before
        # that): executing it again from its file would give the target a second copy.
        if name in self.hidden or sys.modules.get(name) is module:
            # The module's own spec with our loader: importlib.util.find_spec() callers that do not
            # import (runpy for `-m test`) see what they would see unhidden (a package, its origin).
            original = self.attrs[name]["__spec__"]
            spec = copy.copy(original) if isinstance(original, importlib.machinery.ModuleSpec) else None
            if spec is None:
                spec = importlib.machinery.ModuleSpec(name, None)
            spec.loader = _Loader(self, getattr(original, "loader", None))
            return spec
        return None

    def put_back(self, name: str, module: types.ModuleType) -> None:
        # Importing it set __spec__ (and maybe __loader__, __package__) from our spec: undo that.
        for attr, value in self.attrs[name].items():
            if value is _MISSING:
                module.__dict__.pop(attr, None)
            else:
                module.__dict__[attr] = value
        top = _top(name)
        if top == self.everything_with:
            self.restore(lambda n: True)
        else:
            self.restore(lambda n: _top(n) == top)

    # -- putting back ---------------------------------------------------------------------------
    def restore(self, which: Callable[[str], bool]) -> None:
        names = [n for n in list(self.hidden) if which(n)]
        everything_now = self.everything_with in {_top(n) for n in names}
        for n in names:
            module = self.hidden.get(n)
            if module is not None:
                sys.modules.setdefault(n, module)  # in sys.modules before it stops being hidden
                self.hidden.pop(n, None)
        if everything_now:
            try:
                self.on_everything()
            except Exception as exc:  # raceguard's own (torch's held-back warnings): never the target's import
                from ..capture import session as session_mod

                if session_mod.ACTIVE is not None:
                    session_mod.ACTIVE.hook_failed("handing torch back to the target", exc)


def new_modules(before: Iterable[str]) -> dict[str, types.ModuleType]:
    """The modules imported since ``before`` (a snapshot of ``sys.modules``' names) that the target
    would not have: all but the standard library's and raceguard's own (``raceguard.benign()``
    and the pytest plugin find raceguard's modules through ``sys.modules``)."""
    seen = set(before)
    stdlib = sys.stdlib_module_names
    found = {}
    for name, module in list(sys.modules.items()):
        top = _top(name)
        if name in seen or top in stdlib or top == "raceguard" or not isinstance(module, types.ModuleType):
            continue
        found[name] = module
    return found


def hide(modules: dict[str, types.ModuleType], everything_with: str = "torch",
         on_everything: Callable[[], None] = lambda: None) -> HiddenModules:
    """Take ``modules`` out of ``sys.modules`` until the target imports them (see the module
    docstring); ``on_everything`` runs when the target imports ``everything_with``, once all are
    back."""
    finder = HiddenModules(modules, everything_with, on_everything)
    sys.meta_path.insert(0, finder)
    for name, module in modules.items():
        if sys.modules.get(name) is module:
            del sys.modules[name]
    return finder
