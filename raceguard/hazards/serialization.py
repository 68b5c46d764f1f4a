"""Serialization: every tensor pickled (``torch.save``, ``pickle``: ``Tensor.__reduce_ex__``) is
a read of its memory, recorded as ``Session.on_op`` records an op's inputs.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ..engine.hb import Race, ShadowStorage
from ..capture.naming import OpInfo, StorageMeta, shape_of
from ..capture.torch_ops import byte_ranges
from . import _state
from ._state import _orig, _tls
from .locations import _site
from .reporting import _internal_error


# -- serialization -----------------------------------------------------------------------------
def record_tensor_reads(s: Any, state: Any, tensors: list, op: str) -> None:
    """Record reads of ``tensors``' memory made outside any aten op (serialization), exactly as
    ``Session.on_op`` records an op's inputs, and report the races through the session."""
    if not tensors or s.hb.timelines <= 1 or getattr(s, "closed", False):
        return
    site = _site()
    info = OpInfo(site, op, state.locks, state.origin)
    races: list[Race] = []
    hb = s.hb
    with s.lock:
        rec = None
        for t in tensors:
            try:
                st = t.untyped_storage()
                ranges = byte_ranges(t)
            except Exception:  # sparse, nested, meta: no plain storage to track
                continue
            cd = st._cdata
            sh = s.shadows.get(cd)
            if sh is None or sh.meta.ref() is not st:
                meta = StorageMeta(weakref.ref(st), t.dtype, shape_of(t), site, seen_only=True)
                sh = s.shadows[cd] = ShadowStorage(meta)
            rec = rec or hb.record(state.tid, False, info)
            hb.access(sh, ranges, rec, races)
    if races:
        s.report_races(races)


def _tensor_reduce_ex(self: Any, proto: Any) -> Any:
    s = _state._session
    if s is not None and s.hb.timelines > 1:
        try:
            if not getattr(self, "is_meta", False) and self.layout == torch.strided:
                op = "torch.save" if getattr(_tls, "saving", 0) else "pickle (Tensor.__reduce_ex__)"
                record_tensor_reads(s, s.current(), [self], op)
        except Exception as exc:
            _internal_error(s, "recording a serialization read", exc)
    return _orig["Tensor.__reduce_ex__"](self, proto)


def _torch_save(*args: Any, **kwargs: Any) -> Any:
    _tls.saving = getattr(_tls, "saving", 0) + 1
    try:
        return _orig["torch.save"](*args, **kwargs)
    finally:
        _tls.saving -= 1
