"""What the CUDA tracker asks torch (current streams, handles, which tensors live on the device),
behind one small interface that the CUDA-on-CPU backend (:mod:`.cudasim`) and the simulated
tests implement too."""

from __future__ import annotations

from typing import Any

class TorchBackend:
    """What the tracker asks torch: current streams, the current device, pinned-ness."""

    def __init__(self) -> None:
        import torch

        self._torch = torch
        self._get_stream = torch._C._cuda_getCurrentStream
        self._handles: dict[tuple[int, int], int] = {}

    def current_stream(self, device: int) -> tuple[int, int]:
        """(device, cudaStream_t handle) of the calling thread's current stream on ``device``."""
        stream_id, index, device_type = self._get_stream(device)
        key = (index, stream_id)
        handle = self._handles.get(key)
        if handle is None:
            s = self._torch.cuda.Stream(stream_id=stream_id, device_index=index, device_type=device_type)
            handle = self._handles[key] = int(s.cuda_stream)
        return index, handle

    def current_device(self) -> int:
        return int(self._torch.cuda.current_device())

    def stream_key(self, stream: Any) -> tuple[int, int]:
        """(device, handle) of a torch.cuda.Stream or torch.Stream."""
        if stream is None:
            return self.current_stream(self.current_device())
        handle = getattr(stream, "cuda_stream", None)
        if handle is None:  # a generic torch.Stream
            s = self._torch.cuda.Stream(
                stream_id=stream.stream_id, device_index=stream.device_index, device_type=stream.device_type
            )
            handle = s.cuda_stream
        return int(stream.device_index), int(handle)

    def event_handle(self, event: Any) -> int:
        return int(getattr(event, "cuda_event", 0) or 0)

    def device_index(self, device: Any) -> int | None:
        if device is None:
            return self.current_device()
        return int(self._torch.cuda._get_device_index(device, optional=True))

    def is_pinned(self, t: Any) -> bool:
        try:
            return bool(t.is_pinned())
        except Exception:
            return False

    @staticmethod
    def is_device(t: Any) -> bool:
        """Whether tensor ``t`` lives in device memory (the tracker's, not the host's)."""
        return t.is_cuda

    @staticmethod
    def device_of(t: Any) -> int:
        return t.get_device()

    @staticmethod
    def is_device_storage(st: Any) -> bool:
        return st.device.type == "cuda"


def tensorlike(v: Any) -> bool:
    """A tensor argument (torch passes Python numbers where a schema says Tensor)."""
    return hasattr(v, "untyped_storage")


def is_cuda(t: Any) -> bool:
    return bool(getattr(t, "is_cuda", False))


def get_device(t: Any) -> int:
    return t.get_device()


def storage_is_cuda(st: Any) -> bool:
    device = getattr(st, "device", None)
    return getattr(device, "type", None) == "cuda"


def target_device(backend: Any, device: Any) -> int | None:
    """The CUDA device index a ``device=`` keyword names, or None when it is not a CUDA device."""
    if device is None:
        return None
    dtype = getattr(device, "type", None)
    if dtype is None:
        text = str(device)
        if not text.startswith("cuda"):
            return None
        index = text.partition(":")[2]
        return int(index) if index else backend.current_device()
    if dtype != "cuda":
        return None
    return device.index if device.index is not None else backend.current_device()
