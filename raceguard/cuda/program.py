"""``--simulate-cuda``: an unchanged CUDA program runs on a CPU-only torch, checked as on a GPU.

Three pieces, installed together by :func:`install` (and undone by :func:`uninstall`):

* :class:`CudaOnCpuMode`, a ``TorchFunctionMode`` entered in every thread the session watches,
  rewrites ``device="cuda"`` / ``"cuda:0"`` / ``torch.device("cuda")`` / ``0`` to the CPU and
  makes ``.cuda()``, ``.to("cuda")``, ``.cpu()``, ``.to("cpu")`` and ``pin_memory()`` return
  distinct tensors, as on a GPU. Around each call it tells the dispatch level what the call's new
  storages are (:data:`.sim.CUDA`, ``HOST`` or ``PINNED``), so that the CUDA tracker sees device
  memory exactly where the program has CUDA tensors (:meth:`.sim.SimBackend.claim_outputs`);
* the ``torch.cuda`` API surface a program uses (``is_available``, ``device_count``,
  ``current_device``, ``set_device``, streams, events, ``synchronize``, ``memory_allocated`` ...)
  answered by the simulated device of :mod:`.sim`; ``torch.autocast("cuda")`` runs as CPU
  autocast in float16 (CUDA's default), so ``GradScaler("cuda")`` scales and unscales for real;
* where the simulation cannot answer truthfully it says so: a CUDA-only call raises
  :class:`SimulationLimit` with one line naming it (never a made-up answer), and reads of a
  simulated CUDA tensor's ``.device`` / ``.is_cuda`` / ``.get_device()`` (which report the CPU)
  become notes in the report (``stats.simulation_notes``).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _device as _default_device

from . import sim
from . import tracker as cuda_tracker
from .patches import hook_failed

PREFIX = "raceguard --simulate-cuda"
DEVICE_NAME = "raceguard simulated CUDA device (CPU memory)"
_CPU = torch.device("cpu")
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_RACEGUARD_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_Tensor = torch.Tensor


class SimulationLimit(RuntimeError):
    """A CUDA call the simulation cannot answer without giving the program a wrong answer."""


def _limit(what: str) -> SimulationLimit:
    return SimulationLimit(f"{PREFIX}: {what}")


def cuda_index(device: Any) -> int | None:
    """0 when ``device`` names the simulated ``cuda:0``; None for any other device type.
    Another CUDA device raises :class:`SimulationLimit`: there is one simulated device."""
    if isinstance(device, str):
        if not device.startswith("cuda"):
            return None
        device = torch.device(device)
    elif isinstance(device, int) and not isinstance(device, bool):
        device = torch.device("cuda", device)  # a bare index means a CUDA device, as in torch
    elif not isinstance(device, torch.device):
        return None
    if device.type != "cuda":
        return None
    if device.index not in (None, 0):
        raise _limit(f"{device} is not simulated (there is one device, cuda:0)")
    return 0


# -- which tensors are device memory ----------------------------------------------------------------
_live = sim.ALLOCATOR.live


def is_simulated_cuda(t: Any) -> bool:
    """Whether ``t`` is one of the program's CUDA tensors (its storage is simulated device memory)."""
    try:
        return t.untyped_storage()._cdata in _live
    except Exception:
        return False


def _any_device_tensor(values: Any) -> bool:
    for v in values:
        if isinstance(v, _Tensor):
            if is_simulated_cuda(v):
                return True
        elif type(v) in (list, tuple):
            for x in v:
                if isinstance(x, _Tensor) and is_simulated_cuda(x):
                    return True
    return False


def _call(target: str, func: Callable, args: tuple, kwargs: dict) -> Any:
    """``func`` with the dispatch level told what its new storages are."""
    local = sim._local
    before = getattr(local, "target", None)
    local.target = target
    try:
        return func(*args, **kwargs)
    finally:
        local.target = before


# -- the function mode -------------------------------------------------------------------------------
class CudaOnCpuMode(TorchFunctionMode):
    """Rewrites CUDA devices to the CPU and marks what each call's new storages are."""

    def __init__(self, simulation: "Simulation") -> None:
        super().__init__()
        self.simulation = simulation

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        special = _SPECIAL.get(func)
        if special is not None:
            return special(self.simulation, func, args, kwargs)
        try:
            target, call_kwargs = self._plan(func, args, kwargs)
        except SimulationLimit:
            raise
        except Exception as exc:  # raceguard's own failure: the call runs as without the mode
            hook_failed(self.simulation.session, "simulating a CUDA call", exc)
            return func(*args, **kwargs)
        if target is None:
            return func(*args, **call_kwargs)
        return _call(target, func, args, call_kwargs)

    def _plan(self, func: Any, args: tuple, kwargs: dict) -> tuple[str | None, dict]:
        """(what the call's new storages are, its keyword arguments with CUDA devices rewritten)."""
        if type(func) is _METHOD_WRAPPER and func.__name__ == "__get__":
            getter = _GETTERS.get(func.__self__)
            if getter is not None and args and is_simulated_cuda(args[0]):
                self.simulation.note_fidelity(getter, sys._getframe(2))
            return None, kwargs
        target = None
        default = _default_device.CURRENT_DEVICE
        if default is not None and kwargs.get("device") is None and func in _CONSTRUCTORS and cuda_index(default) is not None:
            # torch.set_default_device("cuda") / `with torch.device("cuda")`: torch's own mode,
            # below this one, would add the device after this mode saw the call
            kwargs = {**kwargs, "device": _CPU}
            target = sim.CUDA
        if kwargs:
            device = kwargs.get("device")
            if device is not None and cuda_index(device) is not None:
                kwargs = {**kwargs, "device": _CPU}
                target = sim.CUDA
            if kwargs.get("pin_memory"):
                kwargs = {**kwargs, "pin_memory": False}
                target = sim.PINNED
            if target is None and _any_device_tensor(kwargs.values()):
                target = sim.CUDA
        if target is None and _any_device_tensor(args):
            target = sim.CUDA
        return target, kwargs


_METHOD_WRAPPER = type(torch.Tensor.device.__get__)
_CONSTRUCTORS = _default_device._device_constructors()
_GETTERS = {
    _Tensor.device: "x.device reports cpu for simulated CUDA tensors",
    _Tensor.is_cuda: "x.is_cuda is False for simulated CUDA tensors",
}


def _tensor_cuda(simulation: "Simulation", func: Any, args: tuple, kwargs: dict) -> Any:
    self = args[0]
    device = kwargs.get("device", args[1] if len(args) > 1 else None)
    if device is not None:
        cuda_index(device)
    if is_simulated_cuda(self):
        return self  # already on the device: no copy, as on a GPU
    non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
    extra = {"memory_format": kwargs["memory_format"]} if "memory_format" in kwargs else {}
    return _call(sim.CUDA, _Tensor.to, (self,), {"device": _CPU, "non_blocking": bool(non_blocking), "copy": True, **extra})


def _tensor_to(simulation: "Simulation", func: Any, args: tuple, kwargs: dict) -> Any:
    self, rest = args[0], args[1:]
    try:
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(
            *rest, **{k: v for k, v in kwargs.items() if k != "copy"}
        )
    except Exception:  # let torch say what is wrong with the arguments
        return func(*args, **kwargs)
    to_device = device is not None and cuda_index(device) is not None
    if rest and isinstance(rest[0], _Tensor):  # x.to(other): other's device and dtype
        to_device = is_simulated_cuda(rest[0])
        device = None if to_device else device
    on_device = is_simulated_cuda(self)
    call = {"dtype": dtype, "non_blocking": non_blocking, "copy": bool(kwargs.get("copy", False))}
    if memory_format is not None:
        call["memory_format"] = memory_format
    if to_device:
        if on_device:  # a dtype change at most: the result stays on the device
            return _call(sim.CUDA, _Tensor.to, (self,), {"device": _CPU, **call})
        return _call(sim.CUDA, _Tensor.to, (self,), {"device": _CPU, **call, "copy": True})
    if on_device and device is not None and device.type == "cpu":
        # device -> host: a new tensor; a non_blocking one lands in pinned memory, as on a GPU
        target = sim.PINNED if non_blocking else sim.HOST
        return _call(target, _Tensor.to, (self,), {"device": _CPU, **call, "copy": True})
    if on_device:
        return _call(sim.CUDA, func, args, kwargs)
    return func(*args, **kwargs)


def _tensor_cpu(simulation: "Simulation", func: Any, args: tuple, kwargs: dict) -> Any:
    self = args[0]
    if not is_simulated_cuda(self):
        return func(*args, **kwargs)
    return _call(sim.HOST, _Tensor.to, (self,), {"device": _CPU, "copy": True, **kwargs})


def _tensor_pin_memory(simulation: "Simulation", func: Any, args: tuple, kwargs: dict) -> Any:
    self = args[0]
    if is_simulated_cuda(self):
        raise RuntimeError(f"cannot pin '{self.type().replace('torch.', 'torch.cuda.')}' only dense CPU tensors can be pinned")
    if sim.is_pinned(self):
        return self
    return _call(sim.PINNED, _Tensor.clone, (self,), {})


def _tensor_is_pinned(simulation: "Simulation", func: Any, args: tuple, kwargs: dict) -> Any:
    return sim.is_pinned(args[0])


def _record_stream(original: Callable) -> Callable:
    """``Tensor.record_stream`` taking the simulated streams (torch's argument parser refuses
    them before any function mode could see the call)."""

    def record_stream(self: Any, stream: Any) -> None:
        if isinstance(stream, sim.Stream):
            if not is_simulated_cuda(self):
                raise RuntimeError("record_stream is only supported on CUDA tensors")  # as torch says
            sim._TensorApi.record_stream(self, stream)  # looked up now: the tracker patches it
            return None
        return original(self, stream)

    return record_stream


def _tensor_get_device(simulation: "Simulation", func: Any, args: tuple, kwargs: dict) -> Any:
    if args and is_simulated_cuda(args[0]):
        simulation.note_fidelity("x.get_device() returns -1 for simulated CUDA tensors", sys._getframe(2))
    return func(*args, **kwargs)


_SPECIAL: dict[Any, Callable[..., Any]] = {
    _Tensor.cuda: _tensor_cuda,
    _Tensor.to: _tensor_to,
    _Tensor.cpu: _tensor_cpu,
    _Tensor.pin_memory: _tensor_pin_memory,
    _Tensor.is_pinned: _tensor_is_pinned,
    _Tensor.get_device: _tensor_get_device,
}


# -- the torch.cuda surface ------------------------------------------------------------------------------
def _is_available() -> bool:
    return True


def _device_count() -> int:
    return 1


def _current_device() -> int:
    return 0


def _set_device(device: Any) -> None:
    if device is not None and not (isinstance(device, int) and device < 0):
        cuda_index(device if not isinstance(device, str) or device.startswith("cuda") else torch.device(device))


class _DeviceContext:
    """``torch.cuda.device(i)`` for the one simulated device."""

    def __init__(self, device: Any) -> None:
        _set_device(device)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return False


def _synchronize(device: Any = None) -> None:
    if device is not None:
        _set_device(device)
    sim.simulated_cuda.synchronize(device)  # looked up now: the tracker patches it


def _empty_cache() -> None:
    sim.simulated_cuda.empty_cache()


def _memory_allocated(device: Any = None) -> int:
    return sim.ALLOCATOR.allocated


def _max_memory_allocated(device: Any = None) -> int:
    return sim.ALLOCATOR.peak


def _memory_reserved(device: Any = None) -> int:
    return sim.ALLOCATOR.reserved()


def _reset_peak_memory_stats(device: Any = None) -> None:
    sim.ALLOCATOR.peak = sim.ALLOCATOR.allocated


def _get_device_name(device: Any = None) -> str:
    return DEVICE_NAME


def _is_bf16_supported(including_emulation: bool = True) -> bool:
    return True


def _is_current_stream_capturing() -> bool:
    return False  # CUDA graphs are refused (SimulationLimit): nothing is ever captured


def _sleep(cycles: int) -> None:
    """A busy kernel on a GPU: on the simulated device, whose kernels run at their launch, nothing."""


def _lazy_init() -> None:
    """Every ``torch.cuda`` function the simulation does not answer initialises CUDA first: say
    which call needs a real GPU, instead of torch's "Torch not compiled with CUDA enabled"."""
    frame = sys._getframe(1)
    if frame.f_code.co_filename.startswith(_TORCH_DIR):
        while frame.f_back is not None and frame.f_back.f_code.co_filename.startswith(_TORCH_DIR):
            frame = frame.f_back  # the torch function the program called
        name = f"{frame.f_globals.get('__name__', 'torch.cuda')}.{frame.f_code.co_name}()"
        raise _limit(f"{name} needs a real GPU and is not simulated")
    where = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
    raise _limit(f"the CUDA call at {where} is not simulated (a tensor made on cuda outside the threads raceguard watches?)")


def _not_simulated(name: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise _limit(f"{name} needs a real GPU and is not simulated")

    refuse.__name__ = name.rsplit(".", 1)[-1]
    return refuse


def _not_simulated_class(name: str) -> type:
    """A class that cannot be made: libraries name these in annotations (``CUDAGraph | None``)."""

    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise _limit(f"{name} needs a real GPU and is not simulated")

    return type(name.rsplit(".", 1)[-1], (), {"__init__": refuse, "__module__": "torch.cuda"})


_CUDA_FUNCTIONS: dict[str, Any] = {
    "is_available": _is_available,
    "device_count": _device_count,
    "current_device": _current_device,
    "set_device": _set_device,
    "device": _DeviceContext,
    "synchronize": _synchronize,
    "empty_cache": _empty_cache,
    "Stream": sim.Stream,
    "Event": sim.Event,
    "stream": sim.stream,
    "current_stream": sim.current_stream,
    "default_stream": sim.default_stream,
    "memory_allocated": _memory_allocated,
    "max_memory_allocated": _max_memory_allocated,
    "memory_reserved": _memory_reserved,
    "max_memory_reserved": _memory_reserved,
    "reset_peak_memory_stats": _reset_peak_memory_stats,
    "get_device_name": _get_device_name,
    "is_bf16_supported": _is_bf16_supported,
    "is_current_stream_capturing": _is_current_stream_capturing,
    "_sleep": _sleep,
    "_lazy_init": _lazy_init,
    "CUDAGraph": _not_simulated_class("torch.cuda.CUDAGraph"),
    "graph": _not_simulated_class("torch.cuda.graph"),
    "make_graphed_callables": _not_simulated("torch.cuda.make_graphed_callables"),
}
_NCCL = ("all_reduce", "reduce", "broadcast", "all_gather", "reduce_scatter")


def _current_accelerator(check_available: bool = False) -> torch.device:
    return torch.device("cuda")


# torch.accelerator, the device-generic API (DataLoader's pin_memory asks it): the same answers.
_ACCELERATOR_FUNCTIONS: dict[str, Any] = {
    "is_available": _is_available,
    "current_accelerator": _current_accelerator,
    "device_count": _device_count,
    "current_device_index": _current_device,
    "current_device_idx": _current_device,
    "set_device_index": _set_device,
    "set_device_idx": _set_device,
    "synchronize": _synchronize,
    "current_stream": sim.current_stream,
    "empty_cache": _empty_cache,
    "memory_allocated": _memory_allocated,
    "max_memory_allocated": _max_memory_allocated,
    "memory_reserved": _memory_reserved,
    "max_memory_reserved": _memory_reserved,
    "reset_peak_memory_stats": _reset_peak_memory_stats,
}


class _Replaced:
    """Module and class attributes replaced by the simulation, put back exactly (an attribute
    someone replaced again since is left alone)."""

    _MISSING = object()

    def __init__(self) -> None:
        self.applied: list[tuple[Any, str, Any, Any]] = []

    def replace(self, owner: Any, attr: str, value: Any) -> None:
        original = owner.__dict__.get(attr, self._MISSING)
        setattr(owner, attr, value)
        self.applied.append((owner, attr, original, value))

    def undo(self) -> None:
        for owner, attr, original, value in reversed(self.applied):
            if owner.__dict__.get(attr, self._MISSING) is value:
                if original is self._MISSING:
                    delattr(owner, attr)
                else:
                    setattr(owner, attr, original)
        self.applied = []


def _patch_torch_cuda(replaced: _Replaced) -> None:
    import torch.amp.autocast_mode as autocast_mode
    import torch.cuda.nccl as nccl

    original_lazy_init = torch.cuda._lazy_init
    for name, value in _CUDA_FUNCTIONS.items():
        replaced.replace(torch.cuda, name, value)
    for module in list(sys.modules.values()):  # the torch.cuda modules that bound _lazy_init
        if getattr(module, "__name__", "").startswith("torch.") and getattr(module, "_lazy_init", None) is original_lazy_init:
            replaced.replace(module, "_lazy_init", _lazy_init)
    for name in _NCCL:
        replaced.replace(nccl, name, _not_simulated(f"torch.cuda.nccl.{name}"))
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        for name, value in _ACCELERATOR_FUNCTIONS.items():
            if hasattr(accelerator, name):
                replaced.replace(accelerator, name, value)
    original_init = autocast_mode.autocast.__init__

    def autocast_init(self: Any, device_type: str, dtype: Any = None, *args: Any, **kwargs: Any) -> None:
        # CUDA autocast never touches a CPU tensor: run it as CPU autocast in CUDA's default dtype.
        if device_type == "cuda":
            device_type, dtype = "cpu", dtype if dtype is not None else torch.float16
        original_init(self, device_type, dtype, *args, **kwargs)

    replaced.replace(autocast_mode.autocast, "__init__", autocast_init)
    replaced.replace(torch.Tensor, "record_stream", _record_stream(torch.Tensor.record_stream))


# -- the simulation of one session ---------------------------------------------------------------------
class Simulation:
    """The function mode in every watched thread, the ``torch.cuda`` patches, the notes."""

    def __init__(self, session: Any, backend: Any) -> None:
        self.session = session
        self.backend = backend
        self.replaced = _Replaced()
        self.local = threading.local()  # .mode: this thread's entered CudaOnCpuMode
        self._session_methods: dict[str, Any] = {}

    def note_fidelity(self, what: str, frame: Any) -> None:
        """A read of what the simulation cannot report as a GPU would, by the program's own code
        (torch's reads are its business): noted once per kind, with the first place."""
        try:
            if what in self.backend.notes:
                return
            filename = frame.f_code.co_filename
            if filename.startswith(_TORCH_DIR) or filename.startswith(_RACEGUARD_DIR):
                return
            self.backend.notes[what] = f"{PREFIX}: {what} (first read at {os.path.basename(filename)}:{frame.f_lineno})"
        except Exception as exc:
            hook_failed(self.session, "noting a simulated CUDA tensor's device read", exc)

    def enter_thread(self) -> None:
        if getattr(self.local, "mode", None) is not None:
            return
        mode = CudaOnCpuMode(self)
        mode.__enter__()
        self.local.mode = mode

    def leave_thread(self) -> None:
        mode = getattr(self.local, "mode", None)
        if mode is None:
            return
        self.local.mode = None
        try:
            mode.__exit__(None, None, None)
        except Exception:
            pass

    def start(self) -> None:
        _patch_torch_cuda(self.replaced)
        session = self.session
        enter, leave = session.enter_thread, session.leave_thread

        def enter_thread(*args: Any, **kwargs: Any) -> Any:
            state = enter(*args, **kwargs)
            try:
                self.enter_thread()
            except Exception as exc:  # the thread runs, its CUDA calls fail as without raceguard
                hook_failed(session, "entering the CUDA simulation in a thread", exc)
            return state

        def leave_thread(*args: Any, **kwargs: Any) -> Any:
            self.leave_thread()
            return leave(*args, **kwargs)

        # Per instance: the threads this session watches (started now or later) enter the mode.
        session.enter_thread, session.leave_thread = enter_thread, leave_thread
        self._session_methods = {"enter_thread": enter_thread, "leave_thread": leave_thread}
        self.enter_thread()

    def stop(self) -> None:
        self.leave_thread()
        for name, method in self._session_methods.items():
            if self.session.__dict__.get(name) is method:
                del self.session.__dict__[name]
        self._session_methods = {}
        self.replaced.undo()


_simulation: Simulation | None = None


def install(session: Any) -> Any:
    """Run the program's CUDA calls on the simulated device and track them; the tracker, or None
    when installing failed (then the program's CUDA calls fail as without raceguard)."""
    global _simulation
    uninstall(None)
    tracker = sim.install(session, every_cpu_tensor=False)
    if tracker is None:
        return None
    simulation = Simulation(session, tracker.backend)
    try:
        simulation.start()
    except Exception as exc:
        simulation.stop()
        cuda_tracker.uninstall(session)
        hook_failed(session, "starting the CUDA simulation", exc)
        return None
    _simulation = simulation
    return tracker


def uninstall(session: Any) -> None:
    """Undo :func:`install` (the calling thread leaves the mode; threads still running keep it
    until they end). ``session`` None: whatever simulation is installed."""
    global _simulation
    simulation = _simulation
    if simulation is None or (session is not None and simulation.session is not session):
        return
    _simulation = None
    simulation.stop()
    cuda_tracker.uninstall(simulation.session)
