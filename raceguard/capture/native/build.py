"""Build (once per torch, CPython and source version) and load the native recorder.

The extension is compiled with torch's include paths (``torch.utils.cpp_extension``) by one
``c++`` call in a separate, isolated Python process, the first
time a checked process asks for it, into a cache directory whose name carries everything the
binary depends on: torch's version and install, CPython's version and ABI flags, the platform,
and a hash of the source. An upgraded torch therefore never loads a stale binary. Concurrent
first uses (``pytest -n 2``) wait on one file lock; the finished directory appears by an atomic
rename, so a half-written build is never loaded. Any failure gives ``None`` and one line saying
why; the caller then uses the Python dispatch mode.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys
import sysconfig
import time
from typing import Any

MODULE = "_raceguard_recorder"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recorder.cpp")
# Every file the build reads (recorder.cpp includes shadow.h): all of them key the cache.
SOURCES = (SOURCE, os.path.join(os.path.dirname(SOURCE), "shadow.h"))
# A failed build is not retried for this long (every checked process would pay for it again).
FAILURE_TTL_S = 24 * 3600
BUILD_TIMEOUT_S = 300
# Wall time of the first build on a 2-core machine (docs/native.md, "Build and cache").
FIRST_BUILD_S = 30
BUILD_COMMAND = "python -m raceguard.capture.native.build"
NO_COMPILER = "no C++ compiler found (install g++ to enable it)"


def cache_root() -> str:
    explicit = os.environ.get("RACEGUARD_CACHE_DIR")
    if explicit:
        return os.path.join(explicit, "native")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "raceguard", "native")


def _torch_identity() -> tuple[str, str]:
    """torch's version and the mtime of its version file, read without importing torch."""
    torch_mod = sys.modules.get("torch")
    version = getattr(torch_mod, "__version__", None) if torch_mod is not None else None
    if version is None:
        version = importlib.metadata.version("torch")
    spec = importlib.util.find_spec("torch")
    origin = spec.origin if spec is not None and spec.origin else ""
    version_file = os.path.join(os.path.dirname(origin), "version.py")
    try:
        stamp = str(os.stat(version_file).st_mtime_ns)
    except OSError:
        stamp = "?"
    return str(version), f"{os.path.dirname(origin)}:{stamp}"


def supported() -> str | None:
    """Why this interpreter cannot run the recorder, or None."""
    if sys.implementation.name != "cpython":
        return f"the native recorder needs CPython, not {sys.implementation.name}"
    if sys.version_info[:2] != (3, 11):
        return f"the native recorder reads CPython 3.11 frames; this is {platform.python_version()}"
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return "the native recorder does not support free-threaded CPython"
    if not sys.platform.startswith("linux"):
        return f"the native recorder is built and tested on Linux only, not {sys.platform}"
    return None


def cache_key(torch_version: str | None = None) -> str:
    """The build directory's name: torch version + install, CPython version + ABI, platform,
    source hash."""
    version, install = _torch_identity()
    if torch_version is not None:
        version = torch_version
    digest_of_sources = hashlib.sha256()
    for path in SOURCES:
        with open(path, "rb") as f:
            digest_of_sources.update(f.read())
    source_hash = digest_of_sources.hexdigest()[:16]
    parts = [
        version,
        install,
        sys.implementation.cache_tag,
        sys.abiflags,
        sysconfig.get_config_var("SOABI") or "",
        platform.machine(),
        source_hash,
    ]
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    safe_version = "".join(c if c.isalnum() or c in ".+-" else "_" for c in version)
    return f"torch-{safe_version}-{sys.implementation.cache_tag}{sys.abiflags}-{digest}"


def build_dir(torch_version: str | None = None) -> str:
    return os.path.join(cache_root(), cache_key(torch_version))


def _library(directory: str) -> str | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(directory, MODULE + suffix)
        if os.path.exists(path):
            return path
    path = os.path.join(directory, MODULE + ".so")
    return path if os.path.exists(path) else None


def cached_library() -> str | None:
    """The built extension for this torch/CPython/source, if the cache has it (no build)."""
    try:
        return _library(build_dir())
    except Exception:
        return None


def _load_library(path: str) -> Any:
    """Load the extension from ``path`` without registering it in ``sys.modules``."""
    import torch  # noqa: F401  (its shared libraries must be loaded first)

    loader = importlib.machinery.ExtensionFileLoader(MODULE, path)
    spec = importlib.util.spec_from_file_location(MODULE, path, loader=loader)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    loader.exec_module(module)
    return module


def _suffix() -> str:
    return importlib.machinery.EXTENSION_SUFFIXES[0]


# Run by a separate, isolated Python: torch's own include and library directories, the
# interpreter's headers, and one g++ call (no ninja, no <torch/extension.h>).
_COMPILE_SCRIPT = """
import os, subprocess, sys, sysconfig
import torch
from torch.utils import cpp_extension as ce
source, output = sys.argv[1], sys.argv[2]
lib = os.path.join(os.path.dirname(torch.__file__), "lib")
cxx = os.environ.get("CXX") or "c++"
abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
cmd = [cxx, "-O2", "-DNDEBUG", "-std=c++17", "-fPIC", "-shared", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
       "-w", *[f"-isystem{p}" for p in ce.include_paths()], f"-isystem{sysconfig.get_paths()['include']}",
       source, "-o", output + ".part", f"-L{lib}", f"-Wl,-rpath,{lib}",
       "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
subprocess.run(cmd, check=True)
os.rename(output + ".part", output)
"""


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _compile(target: str) -> str | None:
    """Compile into ``target`` (a fresh directory) in a separate process; the failure, or None."""
    import subprocess

    if _compiler() is None:
        return NO_COMPILER
    code = _COMPILE_SCRIPT
    # -I and no PYTHONPATH/RACEGUARD_*: the compiler's Python must not become a checked worker
    # of the run that asked for the build (raceguard checks the target's Python children).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("RACEGUARD_")}
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-c", code, SOURCE, os.path.join(target, MODULE + _suffix())],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            env=env,
        )
    except Exception as exc:
        return f"could not run the build: {exc}"
    if proc.returncode != 0 or _library(target) is None:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if "error" in ln.lower()]
        detail = (lines[0] if lines else (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"])
        text = detail if isinstance(detail, str) else detail[0]
        return f"the build failed: {text.strip()[:300]}"
    return None


class BuildResult:
    __slots__ = ("module", "reason", "path", "built_s")

    def __init__(self, module: Any, reason: str, path: str | None = None, built_s: float | None = None) -> None:
        self.module = module
        self.reason = reason
        self.path = path
        self.built_s = built_s


def ensure(build: bool = True, retry_failed: bool = False) -> BuildResult:
    """The loaded recorder (building it first if ``build`` and it is not cached), or a result
    whose module is None and whose reason is one line. A build that failed less than a day ago
    is not tried again unless ``retry_failed``. Never raises."""
    try:
        return _ensure(build, retry_failed)
    except Exception as exc:  # never let the backend choice break a check
        return BuildResult(None, f"the native recorder could not be loaded: {exc!r}")


def _remembered_failure(failed: str) -> str | None:
    """The line a build that failed less than :data:`FAILURE_TTL_S` ago left, or None."""
    try:
        if time.time() - os.stat(failed).st_mtime >= FAILURE_TTL_S:
            return None
        with open(failed) as f:
            return f.read().strip() or "an earlier build failed"
    except OSError:
        return None


def _say_building() -> None:
    """One line on stderr (never stdout: it is the target's) when a build really starts."""
    version = _torch_identity()[0]
    try:
        sys.stderr.write(
            f"raceguard: building the native recorder for torch {version} / CPython "
            f"{platform.python_version()} (first use, about {FIRST_BUILD_S} s)\n"
        )
        sys.stderr.flush()
    except Exception:  # a closed or broken stderr must not stop the build
        pass


def probe() -> tuple[str, str]:
    """(backend, reason) a checked run would get here, without building or retrying anything;
    a cached build is loaded to be sure it loads."""
    try:
        why = supported()
        if why is not None:
            return ("python", why)
        final = build_dir()
        lib = _library(final)
        if lib is not None:
            try:
                _load_library(lib)
            except Exception as exc:
                return ("python", f"the cached build {lib} does not load: {exc!r}")
            return ("native", f"cached build {lib}")
        failure = _remembered_failure(final + ".failed")
        if failure is not None:
            return ("python", f"{failure} (remembered for a day; `{BUILD_COMMAND}` tries again)")
        if _compiler() is None:
            return ("python", NO_COMPILER)
        return ("native", f"not built yet: the first checked run builds it (about {FIRST_BUILD_S} s, once), or `{BUILD_COMMAND}` now")
    except Exception as exc:
        return ("python", f"the native recorder's state could not be read: {exc!r}")


def _ensure(build: bool, retry_failed: bool = False) -> BuildResult:
    why = supported()
    if why is not None:
        return BuildResult(None, why)
    final = build_dir()
    lib = _library(final)
    if lib is None:
        failed = final + ".failed"
        if retry_failed:
            try:
                os.unlink(failed)
            except OSError:
                pass
        failure = _remembered_failure(failed)
        if failure is not None:
            return BuildResult(None, failure)
        if not build:
            return BuildResult(None, "the native recorder is not built yet")
        os.makedirs(cache_root(), exist_ok=True)
        import fcntl

        with open(os.path.join(cache_root(), ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others wait and reuse it
            lib = _library(final)
            if lib is None:
                failure = _remembered_failure(failed)
                if failure is not None:  # another process's build failed meanwhile
                    return BuildResult(None, failure)
                staging = f"{final}.tmp{os.getpid()}"
                shutil.rmtree(staging, ignore_errors=True)
                os.makedirs(staging)
                if _compiler() is not None:
                    _say_building()
                started = time.monotonic()
                failure = _compile(staging)
                took = time.monotonic() - started
                if failure is not None:
                    shutil.rmtree(staging, ignore_errors=True)
                    with open(failed, "w") as f:
                        f.write(failure + "\n")
                    return BuildResult(None, failure)
                with open(os.path.join(staging, "BUILD_SECONDS"), "w") as f:
                    f.write(f"{took:.1f}\n")
                os.rename(staging, final)  # atomic: a directory is either complete or absent
                lib = _library(final)
                module = _load_library(lib)  # type: ignore[arg-type]
                return BuildResult(module, f"built in {took:.0f} s", lib, took)
    module = _load_library(lib)
    return BuildResult(module, "cached build", lib)


def main() -> int:
    """``python -m raceguard.capture.native.build``: build now (again, if the last build failed)
    and say where; exit status 1 when there is no usable recorder (CI runs it to fail loudly)."""
    result = ensure(retry_failed=True)
    if result.module is None:
        print(f"raceguard: no native recorder: {result.reason}", file=sys.stderr)
        return 1
    how = f"built in {result.built_s:.0f} s" if result.built_s is not None else "already built"
    print(f"native recorder {how}: {result.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
