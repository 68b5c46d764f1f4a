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
import weakref
from typing import Any, Callable

from ..capture.naming import Resource
from ..capture.stacks import user_key
from ..capture.torch_ops import byte_ranges
from .clocks import ProcessClocks


# Python frames above the op that tell its line apart, cheaply (the site's user frames need
# symbolising, ten times the cost): frames of the dispatch itself are skipped.
_STACK_KEY_DEPTH = 8
_getframe = sys._getframe


# Accesses held back before they are sent (see SharedAccesses.__call__).
PENDING_LIMIT = 512


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


def _tensors_in(obj: Any, depth: int = 3, limit: int = 64) -> list:
    """Tensors in ``obj`` itself or in its lists, tuples and dicts, ``depth`` levels down, at most
    ``limit`` of them (the payloads of queues are small structures)."""
    import torch

    found: list = []
    todo = [(obj, 0)]
    while todo and len(found) < limit:
        item, level = todo.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif level < depth and isinstance(item, (list, tuple)):
            todo.extend((x, level + 1) for x in item[:limit])
        elif level < depth and isinstance(item, dict):
            todo.extend((x, level + 1) for x in list(item.values())[:limit])
    return found


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
        self.pending: dict[tuple, dict] = {}  # accesses held back, see __call__
        # Storages sent through a queue or pipe that its feeder has not moved into shared memory
        # yet: _cdata -> (weak reference, provisional identity), see will_be_shared.
        self.awaiting: dict[int, tuple[Any, str]] = {}
        self.sites: dict[tuple, int] = {}
        self.resources: dict[tuple, int] = {}
        # tid -> (its clock, what it knows of other processes, that knowledge's id, ordering lost)
        self.clock_ids: dict[int, tuple[list, dict, int, bool]] = {}
        self.next_id = 0

    def _send(self, event: dict) -> None:
        # A worker's records share its connection with its findings: one line at a time.
        with self.session._emit_lock:
            self.send(event)

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    def __call__(self, session: Any, t: Any, st: Any, sh: Any, rec: Any) -> None:
        """One access of ``t`` (storage ``st``, shadow ``sh``) recorded as ``rec`` (under the
        session lock)."""
        cd = st._cdata
        key = self.keys.get(cd, False)
        if key is False:
            if not st.is_shared():  # only here while tensors sent to a queue await their move
                waiting = self.awaiting.get(cd)
                if waiting is None or waiting[0]() is not st:
                    return
                key = waiting[1]
            else:
                key = self.keys[cd] = shared_identity(st)
                waiting = self.awaiting.pop(cd, None)
                if waiting is not None and key is not None:
                    self._send({"type": "mp-alias", "from": waiting[1], "to": key})
        if key is None:
            return
        if t.is_contiguous():
            es = t.element_size()
            lo = t.storage_offset() * es
            ranges = [(lo, lo + t.numel() * es)]
        else:
            ranges = byte_ranges(t)
        tid = rec.timeline
        cid = self._clock_id(tid)
        # Under the native recorder the op's own site (its frames and offsets, recorded when it
        # ran) tells lines apart: its records are applied later by whichever thread drains them.
        where = rec.info.site if session.native is not None else _python_stack_key()
        pending = self.pending
        for lo, hi in ranges:
            # Accesses of one timeline that differ only in their epoch, while what the timeline
            # knows of other processes stays the same (``cid``), race with the same accesses of
            # other processes, except that a later epoch is seen by fewer of them: keeping the
            # latest epoch keeps every race (see crosscheck).
            dedup = (key, lo, hi, rec.is_write, tid, where, cid)
            event = pending.get(dedup)
            if event is not None:
                event["e"] = rec.epoch
                continue
            pending[dedup] = {
                "type": "mp-access",
                "k": key,
                "lo": lo,
                "hi": hi,
                "w": rec.is_write,
                "t": self.clocks.global_name(tid),
                "e": rec.epoch,
                "c": cid,
                "s": self._site_id(rec, user_key(rec.info.site)),
                "r": self._resource_id(st, key, lo, hi, sh),
            }
            if len(pending) >= PENDING_LIMIT:
                self.flush()

    def will_be_shared(self, obj: Any) -> None:
        """``obj`` is on its way to another process (a queue's ``put``, a pipe's ``send``): the
        storages of the tensors in it move into shared memory when it is pickled, which for a
        queue happens later, in its feeder thread. Accesses made meanwhile are streamed under a
        provisional identity, which the supervisor merges into the real one once known."""
        if self.awaiting:
            self.resolve_awaiting()
        for t in _tensors_in(obj):
            try:
                if t.device.type != "cpu":
                    continue
                st = t.untyped_storage()
                if st.is_shared() or st.nbytes() == 0:
                    continue
                cd = st._cdata
                self.keys.pop(cd, None)
                self.awaiting[cd] = (weakref.ref(st), f"pending:{os.getpid()}:{cd}")
            except Exception:  # not a plain storage (sparse, nested): it is not sent as one
                continue

    def flush(self) -> None:
        """Send the accesses held back (under the session lock): at process end, from a fork's
        heartbeat, and whenever :data:`PENDING_LIMIT` of them are waiting."""
        self.resolve_awaiting()
        pending, self.pending = self.pending, {}
        for event in pending.values():
            self._send(event)

    def resolve_awaiting(self) -> None:
        """Storages sent earlier that moved into shared memory since (or died): their
        provisional identity is named (or forgotten), so accesses stop paying for the wait."""
        for cd, (ref, provisional) in list(self.awaiting.items()):
            st = ref()
            if st is None:
                del self.awaiting[cd]
            elif st.is_shared():  # moved since, and not accessed here again: name it now
                del self.awaiting[cd]
                key = self.keys[cd] = shared_identity(st)
                if key is not None:
                    self._send({"type": "mp-alias", "from": provisional, "to": key})

    def _clock_id(self, tid: int) -> int:
        """The number of what timeline ``tid`` knows of other processes; a new number (and an
        ``mp-clock`` message) only when that changes, not at each local epoch."""
        clock = self.session.hb.clock(tid)
        known = self.clock_ids.get(tid)
        lost = self.session.ordering_lost
        if known is not None and known[0] == clock and known[3] == lost:
            return known[2]
        name_of = self.clocks.name_of
        foreign = {name: clock[i] for i, name in name_of.items() if i < len(clock) and clock[i]}
        if known is not None and known[1] == foreign and known[3] == lost:
            cid = known[2]
        else:
            cid = self._id()
            # "lost": a synchronisation event of this process was lost to raceguard's own failure,
            # so races the supervisor finds with it are reported suppressed.
            self._send({"type": "mp-clock", "id": cid, "clock": foreign, "lost": lost})
        self.clock_ids[tid] = (list(clock), foreign, cid, lost)
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
            self._send({"type": "mp-site", "id": sid, "access": access.to_dict()})
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
            self._send(
                {"type": "mp-resource", "id": rid, "name": resource.name, "kind": resource.kind, "root": resource.root, "benign": benign}
            )
        return rid
