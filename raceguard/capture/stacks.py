"""Cheap call-site keys on the hot path, full stacks only when something is reported.

A *site* is a flat tuple ``(code0, lasti0, code1, lasti1, ...)`` of the frames that matter,
innermost first. Taking one costs a walk over ``f_back`` and one dict lookup per frame
(the user/library/hidden classification is cached per code object); line numbers, file names
and the user-frames-first order are computed only by :func:`render_site` for a report.

On the tensor-op hot path a site is instead taken by :func:`op_site_function`'s capturer:
torch's C++ stack capture (``torch._C._profiler.gather_traceback``, the one its memory snapshots
use), which costs ~0.4 µs whatever the depth against ~0.2 µs *per frame* for the walk. Such a
site is an opaque object holding the code objects and offsets of every frame; it is turned into
the same frames (hidden ones dropped, at most :data:`MAX_FRAMES` kept) only when reported.
"""

from __future__ import annotations

import _thread
import os
import sys
import sysconfig
from types import TracebackType
from typing import Any, Callable

from ..report.finding import Frame

Site = tuple  # (code, lasti, code, lasti, ...)

HIDDEN, USER, LIBRARY = 0, 1, 2
MAX_FRAMES = 40

_RACEGUARD_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _library_prefixes() -> tuple[str, ...]:
    paths = set()
    for scheme_key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(scheme_key)
        if p:
            paths.add(os.path.realpath(p) + os.sep)
            paths.add(os.path.abspath(p) + os.sep)
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix):
        lib = os.path.join(p, "lib")
        paths.add(os.path.abspath(lib) + os.sep)
    return tuple(sorted(paths))


_LIBRARY_PREFIXES = _library_prefixes()
# Frames a report never shows: raceguard itself and the threading module's plumbing.
_HIDDEN_FILES = {os.path.abspath(__import__("threading").__file__)}


# Files and pseudo-files of code torch generates at run time (see add_library_location).
_generated_prefixes: tuple[str, ...] = ()


def add_library_location(prefix: str) -> None:
    """Frames of files whose name starts with ``prefix`` are library frames: code torch writes
    at run time (Inductor's compiled graphs, FX's ``<eval_with_key>``) is never the user's."""
    global _generated_prefixes
    if prefix in _generated_prefixes:
        return
    _generated_prefixes += (prefix,)
    _file_class.clear()
    for code in _code_keep:  # forget what was decided before (hidden code stays hidden)
        if code.co_filename.startswith(prefix) and _code_class.get(id(code)) == USER:
            del _code_class[id(code)]
    _captured_frames.clear()


def classify_filename(filename: str) -> int:
    if _generated_prefixes and filename.startswith(_generated_prefixes):
        return LIBRARY
    if not filename or filename.startswith("<"):
        # <frozen runpy>, <string>, <stdin>: user code only when it is the target's -c text.
        return LIBRARY if filename.startswith("<frozen") else USER
    path = os.path.abspath(filename)
    if path.startswith(_RACEGUARD_DIR) or path in _HIDDEN_FILES:
        return HIDDEN
    if "site-packages" in path or "dist-packages" in path:
        return LIBRARY
    if path.startswith(_LIBRARY_PREFIXES):
        return LIBRARY
    return USER


# Keyed by id(code): hashing a code object hashes its constants recursively (12 µs for a large
# module's <module> code), far too slow for every frame of every op. The code objects are kept
# alive in _code_keep so their ids are never reused.
_code_class: dict[int, int] = {}
_code_keep: list[Any] = []


def classify_code(code: Any) -> int:
    kind = _code_class.get(id(code))
    if kind is None:
        kind = classify_filename(code.co_filename)
        _code_keep.append(code)
        _code_class[id(code)] = kind
    return kind


# Hidden code objects by (file, function), for sites captured in C++ (which know only names):
# those of real files are hidden wherever they are on the stack; pseudo-files (``<string>``, the
# ``python -c`` bootstrap of the child) only at the outermost end, so that user code exec'd from a
# string stays visible.
_hidden_names: set[tuple[str, str]] = set()
_hidden_outer: set[tuple[str, str]] = set()


def hide_code(code: Any) -> None:
    """Never show frames of this code object in a report (raceguard's own bootstrap)."""
    _code_keep.append(code)
    _code_class[id(code)] = HIDDEN
    key = (code.co_filename, code.co_name)
    (_hidden_outer if code.co_filename.startswith("<") else _hidden_names).add(key)
    _captured_frames.clear()


def is_user_code(code: Any) -> bool:
    return classify_code(code) == USER


def current_site(skip: int = 1) -> Site:
    """The site of the caller, ``skip`` frames up from this function's caller; the empty site
    when the stack is shallower than that (callbacks from C++ frees, interpreter teardown)."""
    try:
        f = sys._getframe(skip + 1)
    except ValueError:
        return ()
    out: list = []
    n = 0
    cls = _code_class
    while f is not None and n < MAX_FRAMES:
        code = f.f_code
        kind = cls.get(id(code))
        if kind is None:
            kind = classify_code(code)
        if kind:
            out.append(code)
            out.append(f.f_lasti)
            n += 1
        f = f.f_back
    return tuple(out)


# The native recorder's capture of the calling thread's stack (its current_site(), a site in the
# same tuple form as its op records'), while the recorder runs: op_site_function's capturers use
# it instead of their own (see set_native_site_capture).
_native_capture: Callable[[], Any] | None = None


def set_native_site_capture(capture: Callable[[], Any] | None) -> None:
    """While the native recorder runs, the sites that hooks take (module calls, optimizer
    steps, compiled graphs) come from its frame reader: about 0.3 µs against several µs for
    torch's capture, and the same frames as its op records. None restores torch's."""
    global _native_capture
    _native_capture = capture


def op_site_function() -> Callable[[], Any]:
    """The cheapest site capture available: the native recorder's while it runs, else torch's
    C++ capture of the Python stack when this torch has it, else the frame walk. Its sites go to
    the same :func:`render_site`, :func:`user_key` and :func:`first_user_location` as
    :func:`current_site`'s; raceguard's own frames are hidden there, so the capturer needs no
    ``skip``."""
    try:
        from torch._C._profiler import gather_traceback, symbolize_tracebacks
    except Exception:
        gather_traceback = None
    if gather_traceback is not None:
        try:
            global _symbolize
            _symbolize = symbolize_tracebacks
            probe = gather_traceback(True, False, False)
            if _symbolized(probe)[0]["name"] == "op_site_function":

                def capture() -> Any:
                    native = _native_capture
                    if native is not None:
                        return native()
                    return gather_traceback(True, False, False)

                return capture
        except Exception:
            pass

    def walk() -> Site:
        native = _native_capture
        if native is not None:
            return native()
        return current_site(1)

    return walk


_symbolize: Callable[[list], list] | None = None
_symbolize_lock = _thread.allocate_lock()


def _symbolized(site: Any) -> list:
    """``symbolize_tracebacks`` of one site, without its side effect: it looks up
    ``torch._inductor``, and torch's lazy module ``__getattr__`` would import inductor and dynamo
    (over a second) in the target. While it runs, that look-up fails in this thread only (other
    threads still go through torch's own ``__getattr__``); symbolize does without it."""
    torch = sys.modules.get("torch")
    lazy = getattr(torch, "__dict__", {}).get("__getattr__")
    if lazy is None or "torch._inductor" in sys.modules:
        return _symbolize([site])[0]  # type: ignore[misc]
    me = _thread.get_ident()

    def guard(name: str) -> Any:
        if name == "_inductor" and _thread.get_ident() == me:
            raise AttributeError(name)
        return lazy(name)

    with _symbolize_lock:
        torch.__getattr__ = guard  # type: ignore[union-attr]
        try:
            return _symbolize([site])[0]  # type: ignore[misc]
        finally:
            if torch.__dict__.get("__getattr__") is guard:  # type: ignore[union-attr]
                torch.__getattr__ = lazy  # type: ignore[union-attr]
# id(captured site) -> (the site, its frames): the site is kept so that its id is not reused.
_captured_frames: dict[int, tuple[Any, tuple]] = {}


def _classify_name(filename: str, name: str) -> int:
    if (filename, name) in _hidden_names:
        return HIDDEN
    kind = _file_class.get(filename)
    if kind is None:
        kind = _file_class[filename] = classify_filename(filename)
    return kind


_file_class: dict[str, int] = {}


def _frames_of(site: Any) -> tuple:
    """``(filename, line, function, kind)`` of the shown frames of a site, innermost first: what
    the frame walk of :func:`current_site` keeps (hidden frames dropped, at most MAX_FRAMES)."""
    if type(site) is tuple:
        out = []
        for i in range(0, len(site), 2):
            code = site[i]
            kind = classify_code(code)
            if kind:
                out.append((code.co_filename, _line_of(code, site[i + 1]), code.co_name, kind))
        return tuple(out)
    cached = _captured_frames.get(id(site))
    if cached is not None and cached[0] is site:
        return cached[1]
    raw = _symbolized(site)
    end = len(raw)
    while end and (raw[end - 1]["filename"], raw[end - 1]["name"]) in _hidden_outer:
        end -= 1
    out = []
    for fr in raw[:end]:
        filename, name = fr["filename"], fr["name"]
        kind = _classify_name(filename, name)
        if kind:
            out.append((filename, fr["line"], name, kind))
            if len(out) == MAX_FRAMES:
                break
    frames = tuple(out)
    if len(_captured_frames) > 4096:
        _captured_frames.clear()
    _captured_frames[id(site)] = (site, frames)
    return frames


def site_of_frame(f: Any) -> Site:
    out: list = []
    n = 0
    while f is not None and n < MAX_FRAMES:
        code = f.f_code
        if classify_code(code):
            out.append(code)
            out.append(f.f_lasti)
            n += 1
        f = f.f_back
    return tuple(out)


def site_of_traceback(tb: Any) -> Site:
    """Innermost-first site of a traceback (for exceptions escaping threads)."""
    entries = []
    while tb is not None:
        entries.append((tb.tb_frame.f_code, tb.tb_lasti))
        tb = tb.tb_next
    out: list = []
    for code, lasti in reversed(entries):
        if classify_code(code):
            out.append(code)
            out.append(lasti)
    return tuple(out[: 2 * MAX_FRAMES])


_line_cache: dict[tuple, int] = {}


def _line_of(code: Any, lasti: int) -> int:
    key = (id(code), lasti)  # code objects in sites are kept alive by _code_keep
    line = _line_cache.get(key)
    if line is None:
        line = code.co_firstlineno
        for start, end, lineno in code.co_lines():
            if start <= lasti < end:
                if lineno is not None:
                    line = lineno
                break
        _line_cache[key] = line
    return line


def display_path(filename: str) -> str:
    """Paths under the working directory are shown relative to it, like a person would type them."""
    if filename.startswith("<"):
        return filename
    for marker in ("site-packages", "dist-packages"):
        head, sep, tail = filename.rpartition(os.sep + marker + os.sep)
        if sep:  # torch/optim/sgd.py reads better than the full interpreter path
            return tail
    try:
        rel = os.path.relpath(filename)
    except ValueError:
        return filename
    return filename if rel.startswith("..") else rel


def render_site(site: Any) -> list[Frame]:
    """Frames of a site, user frames first (innermost first within each group)."""
    user: list[Frame] = []
    library: list[Frame] = []
    for filename, line, function, kind in _frames_of(site):
        frame = Frame(file=display_path(filename), line=line, function=function, user=kind == USER)
        (user if kind == USER else library).append(frame)
    return user + library


def user_key(site: Any) -> tuple:
    """The user-code part of a site as (file, line, function) triples: "the same place" across
    iterations and threads. Falls back to the innermost frame when no user frame exists."""
    frames = _frames_of(site)
    out = [(filename, line, function) for filename, line, function, kind in frames if kind == USER]
    if not out and frames:
        out.append(frames[0][:3])
    return tuple(out)


def first_user_location(site: Site) -> str | None:
    for frame in render_site(site):
        if frame.user:
            return f"{os.path.basename(frame.file)}:{frame.line}"
    return None


def own_frames_removed(exc: BaseException | None) -> BaseException | None:
    """``exc`` with raceguard's own frames (the bootstrap on top, the module-call wrapper in the
    middle) left out of its traceback and those of the exceptions chained to it, so that printing
    it gives what the interpreter prints without raceguard. Changes the exceptions in place."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        entries = []
        tb = e.__traceback__
        while tb is not None:
            if not tb.tb_frame.f_code.co_filename.startswith(_RACEGUARD_DIR):
                entries.append(tb)
            tb = tb.tb_next
        rebuilt = None
        for entry in reversed(entries):
            rebuilt = TracebackType(rebuilt, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
        e.__traceback__ = rebuilt
        todo += [e.__cause__, e.__context__]
    return exc
