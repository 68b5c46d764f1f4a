"""Storages in shared memory: one identity in every process, and their accesses streamed.

A storage in shared memory (``share_memory_()``, a tensor received through a queue, a pipe or a
pool's arguments, an inherited mapping after ``fork``) has a process-local address; its identity
across processes is its shared-memory file: ``fd:DEV:INODE`` for the file-descriptor strategy
(``os.fstat`` of the descriptor the storage keeps open), ``file:NAME`` for the file-system
strategy. A storage's identity is computed once per process (``is_shared()`` per accessed
storage decides whether to look: the only cost non-shared storages pay).

Each access to such a storage is checked by the process's own engine as usual (its threads) and
also sent to the supervisor, which checks pairs from different processes
(:mod:`.crosscheck`): the storage's identity, the byte range, read or write, the timeline's
global name and epoch, and the timeline's clock (sent once per change, then referred to by
number), with the report's view of the access and the resource's name sent once each.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from ..capture.naming import Resource
from ..capture.stacks import user_key
from ..capture.torch_ops import byte_ranges
from .clocks import ProcessClocks


# Python frames above the op that tell its line apart, cheaply (the site's user frames need
# symbolising, ten times the cost): frames of the dispatch itself are skipped.
_STACK_KEY_DEPTH = 8
_getframe = sys._getframe


def _python_stack_key() -> tuple:
    try:
        f = _getframe(3)  # above this observer, on_op and the dispatch mode
    except ValueError:
        return ()
    out = []
    while f is not None and len(out) < _STACK_KEY_DEPTH:
        out.append((f.f_code, f.f_lineno))
        f = f.f_back
    return tuple(out)


def shared_identity(storage: Any) -> str | None:
    """The storage's shared-memory identity, or None (not shared, or a kind not modelled)."""
    try:
        fd = storage._get_shared_fd()
    except Exception:
        fd = None
    if fd is not None and fd >= 0:
        st = os.fstat(fd)
        return f"fd:{st.st_dev}:{st.st_ino}"
    try:
        name = storage._get_filename()  # a mapped file (torch.from_file(shared=True))
    except Exception:
        name = None
    if name:
        return f"file:{name}"
    import torch.multiprocessing

    if torch.multiprocessing.get_sharing_strategy() != "file_system":
        return None
    # Neither: a storage managed by torch_shm_manager (the file-system strategy), for which
    # asking its handle again returns the one it has (no new segment, no copy).
    try:
        _manager, name, _size = storage._share_filename_cpu_()
    except Exception:
        return None
    return f"file:{name.decode() if isinstance(name, bytes) else name}"


class SharedAccesses:
    """The session's ``shared_access`` observer: streams accesses to shared storages."""

    def __init__(self, session: Any, clocks: ProcessClocks, send: Callable[[dict], None], label: Callable[[], str | None]) -> None:
        self.session = session
        self.clocks = clocks
        self.send = send
        self.label = label
        self.started_at: str | None = None  # where this process was started (Process.start())
        self.reset()

    def reset(self) -> None:
        """A new process (a fork): nothing sent yet on its connection."""
        self.keys: dict[int, str | None] = {}  # storage _cdata -> identity (None: not modelled)
        self.sent: set = set()
        self.sites: dict[tuple, int] = {}
        self.resources: dict[tuple, int] = {}
        self.clock_ids: dict[int, tuple[list, int, bool]] = {}  # tid -> (clock sent, its id, lost)
        self.next_id = 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    def __call__(self, session: Any, t: Any, st: Any, sh: Any, rec: Any) -> None:
        """One access of ``t`` (storage ``st``, shadow ``sh``) recorded as ``rec`` (under the
        session lock)."""
        cd = st._cdata
        key = self.keys.get(cd, False)
        if key is False:
            key = self.keys[cd] = shared_identity(st)
        if key is None:
            return
        if t.is_contiguous():
            es = t.element_size()
            lo = t.storage_offset() * es
            ranges = [(lo, lo + t.numel() * es)]
        else:
            ranges = byte_ranges(t)
        tid = rec.timeline
        where = _python_stack_key()
        site = None
        for lo, hi in ranges:
            dedup = (key, lo, hi, rec.is_write, tid, rec.epoch, where)
            if dedup in self.sent:
                continue
            self.sent.add(dedup)
            if site is None:
                site = user_key(rec.info.site)  # symbolises the site: only for what is sent
            self.send(
                {
                    "type": "mp-access",
                    "k": key,
                    "lo": lo,
                    "hi": hi,
                    "w": rec.is_write,
                    "t": self.clocks.global_name(tid),
                    "e": rec.epoch,
                    "c": self._clock_id(tid),
                    "s": self._site_id(rec, site),
                    "r": self._resource_id(st, key, lo, hi, sh),
                }
            )

    def _clock_id(self, tid: int) -> int:
        clock = self.session.hb.clock(tid)
        known = self.clock_ids.get(tid)
        if known is not None and known[0] == clock and not (self.session.ordering_lost and known[2] is False):
            return known[1]
        cid = self._id()
        self.clock_ids[tid] = (list(clock), cid, self.session.ordering_lost)
        # "lost": a synchronisation event of this process was lost to raceguard's own failure,
        # so races the supervisor finds with it are reported suppressed.
        self.send({"type": "mp-clock", "id": cid, "clock": self.clocks.export(tid), "lost": self.session.ordering_lost})
        return cid

    def _site_id(self, rec: Any, site: tuple) -> int:
        info = rec.info
        key = (site, rec.is_write, rec.timeline, info.op, info.locks, info.origin)
        sid = self.sites.get(key)
        if sid is None:
            sid = self.sites[key] = self._id()
            access = self.session._access(rec)
            access.process = self.label()
            if self.started_at:
                access.details["process_started_at"] = self.started_at
            self.send({"type": "mp-site", "id": sid, "access": access.to_dict()})
        return sid

    def _resource_id(self, st: Any, key: str, lo: int, hi: int, sh: Any) -> int:
        rid = self.resources.get((key, lo, hi))
        if rid is None:
            rid = self.resources[(key, lo, hi)] = self._id()
            try:
                resource = self.session.namer.name_storage(st, lo, hi, sh.meta)
            except Exception:
                resource = Resource(f"shared tensor {key}", "tensor", key)
            session = self.session
            # raceguard.benign() in this process (before its first access to the storage).
            benign = session._benign_reason(st) if session.benign_marks else None
            self.send(
                {"type": "mp-resource", "id": rid, "name": resource.name, "kind": resource.kind, "root": resource.root, "benign": benign}
            )
        return rid
