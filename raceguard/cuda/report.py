"""Turning the CUDA tracker's races into findings: which stream ran what, for whom, and why
nothing ordered it (a missing wait, a reused block, or launches no host order fixed)."""

from __future__ import annotations

from typing import Any

from ..engine.hb import AccessRecord, Race
from ..report.finding import Access, Finding
from ..capture.naming import Resource, describe_tensor, race_finding
from ..capture.stacks import first_user_location, render_site, user_key


class CudaReporter:
    """Names and reports the races a :class:`~raceguard.cuda.tracker.CudaTracker` owns; groups
    them so that one pair of lines is one finding (a stream race and a launch-order race on the
    same two accesses included)."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker
        self.groups: dict[tuple, dict] = {}

    def _access(self, rec: AccessRecord, launch: bool = False) -> Access:
        """The report's view of one access; ``launch``: a host record of a kernel launch (its
        timeline is the stream it was launched on, its locks those held at the launch)."""
        stream = self.tracker.model.by_tid.get(rec.timeline)
        mode = "write" if rec.is_write else "read"
        if stream is not None:
            info = rec.info
            thread = self.tracker.session.thread_name(info.host) if info.host is not None else "<torch thread>"
            details = {"cuda_stream": hex(stream.handle)}
            if info.alloc:
                details["allocation"] = True
            return Access(
                thread=thread,
                timeline=stream.label,
                mode=mode,
                op=info.op,
                locks_held=[],
                stack=render_site(info.site),
                details=details,
                origin=self.tracker.session.origin_of(None, info.host),  # the launching thread's start
            )
        name = self.tracker.session.thread_name(rec.timeline)
        launched_on = getattr(rec.info, "stream", None) if launch else None
        return Access(
            thread=name,
            timeline=launched_on.label if launched_on is not None else f"thread:{name}",
            mode=mode,
            op=rec.info.op,
            locks_held=[self.tracker.session.lock_name(lk) for lk in rec.info.locks],
            stack=render_site(rec.info.site),
            details={"cuda_stream": hex(launched_on.handle), "launch_order": True} if launched_on is not None else {},
            origin=self.tracker.session.origin_of(rec.info, rec.timeline),
        )

    def report(self, race: Race) -> None:
        e, l = race.earlier, race.later
        reuse = None
        offset = 0
        launch = False
        storage = None
        if race.shadow is self.tracker.memory.shadow:
            eb, lb = e.info.block, l.info.block
            block = lb or eb
            offset = block.lo
            if eb is not None and lb is not None and eb is not lb:
                reuse = (eb, lb)
                old_desc, new_desc = describe_tensor(eb.meta), describe_tensor(lb.meta)
                resource = Resource(f"memory of {old_desc}, reused by {new_desc}", "tensor", old_desc)
            else:
                storage = block.meta.ref()
                if storage is not None:
                    resource = self.tracker.session.namer.name_storage(
                        storage, race.lo - block.lo, race.hi - block.lo, block.meta
                    )
                else:
                    desc = describe_tensor(block.meta)
                    resource = Resource(desc, "tensor", desc)
        else:
            storage = race.shadow.meta.ref()
            if storage is None:
                return
            launch = not (e.timeline in self.tracker.model.by_tid or l.timeline in self.tracker.model.by_tid)
            resource = self.tracker.session.namer.name_storage(storage, race.lo, race.hi, race.shadow.meta)
        benign = None
        if storage is not None and getattr(self.tracker.session, "benign_marks", None):
            benign = self.tracker.session._benign_reason(storage)
        pair = tuple(sorted([(user_key(e.info.site), e.is_write), (user_key(l.info.site), l.is_write)]))
        # A launch-order race and a stream race on the same two accesses are one finding.
        key = ("reuse" if reuse else "race", pair, benign)
        with self.tracker.session.lock:
            group = self.groups.get(key)
            if group is None:
                group = self.groups[key] = {"resources": set(), "fingerprint": None}
            if resource.name in group["resources"]:
                return
            group["resources"].add(resource.name)
            first_time = group["fingerprint"] is None
            if first_time:
                group["fingerprint"] = "pending"
        if not first_time:
            fp = group["fingerprint"]
            if fp != "pending":
                self.tracker.session.emit({"type": "also_on", "fingerprint": fp, "resource": resource.name})
            return
        finding = self._finding(race, resource, reuse, offset, launch)
        if benign is not None:
            finding.suppressed = f"raceguard.benign: {benign}"
        group["fingerprint"] = finding.fingerprint
        room = getattr(self.tracker.session, "_room_for_report", None)
        if room is None or room():
            self.tracker.session.emit({"type": "finding", "finding": finding.to_dict()})

    def _finding(self, race: Race, resource: Resource, reuse: tuple | None, offset: int, launch: bool = False) -> Finding:
        first, second = self._access(race.earlier, launch), self._access(race.later, launch)

        def who(a: Access) -> str:
            if a.timeline.startswith("thread:"):
                return f"{a.mode} by '{a.thread}' on the host"
            return f"{a.mode} on {a.timeline} (launched by '{a.thread}')"

        kind_word = resource.kind.replace("-", " ")
        what = resource.name if resource.kind == "tensor" else f"{kind_word} {resource.name}"
        details: dict[str, Any] = {}
        if reuse is not None:
            old, new = reuse
            old_desc, new_desc = describe_tensor(old.meta), describe_tensor(new.meta)
            freed_at = first_user_location(old.freed_site) if old.freed_site else None
            message = (
                f"data race on reused CUDA memory: {old_desc} was freed"
                + (f" at {freed_at}" if freed_at else "")
                + f" while its {who(first)} was not ordered before the free, and the memory was "
                f"handed to {new_desc} ({who(second)})"
            )
            why = (
                f"the caching allocator reuses a freed block for the next allocation on "
                f"{second.timeline} without waiting for other streams; {first.timeline} used the "
                f"old tensor and nothing ordered that use before the reuse (no record_stream, "
                f"wait_stream, event wait or synchronize)"
            )
            hint = (
                f"call tensor.record_stream(<{first.timeline} stream>) on the tensor allocated at "
                f"{first_user_location(old.meta.site) or 'its allocation'} after using it there, or "
                f"make the allocating stream wait for that stream (wait_stream / event) before "
                f"freeing it"
            )
            details["reuse"] = {
                "freed_tensor": old_desc,
                "allocation_stack": [f.to_dict() for f in render_site(old.meta.site)],
                "freed_at": [f.to_dict() for f in render_site(old.freed_site)] if old.freed_site else [],
                "reused_by": new_desc,
                "reused_allocation_stack": [f.to_dict() for f in render_site(new.meta.site)],
                "record_stream": [s.label for s in old.users],
            }
        elif launch:
            message = f"data race on {what}: {who(first)} vs {who(second)}"
            why = _launch_why(first, second, race)
            hint = _launch_hint(first, second, resource)
        else:
            message = f"data race on {what}: {who(first)} vs {who(second)}"
            why = (
                f"'{second.timeline}' had seen '{first.timeline}' only up to its epoch "
                f"{race.seen_epoch}, but the {first.mode} happened in epoch {race.earlier.epoch}: "
                f"no wait_stream, event record/wait or synchronize orders the two accesses"
            )
            hint = _hint(first, second)
        details["why"] = why
        details["bytes"] = [race.lo - offset, race.hi - offset]
        return race_finding(resource, message, first, second, hint, details)


def _launch_why(first: Access, second: Access, race: Race) -> str:
    """Why two kernels launched by unordered host threads race, even on one stream."""
    order = (
        f"'{second.thread}' had synchronised with '{first.thread}' only up to that thread's epoch "
        f"{race.seen_epoch}, and the {first.mode} was launched in epoch {race.earlier.epoch} (no lock, "
        f"join, event, queue, barrier or future in between)"
    )
    if first.timeline == second.timeline and not first.timeline.startswith("thread:"):
        return (
            f"both kernels ran on {first.timeline} in launch order, but nothing on the host fixed "
            f"that order: {order}, so in another run the other thread launches first"
        )
    return f"nothing on the host orders the two launches: {order}"


def _launch_hint(first: Access, second: Access, resource: Resource) -> str:
    from ..capture.session import _race_hint

    return _race_hint(first, second, resource) + (
        " (a CUDA stream orders kernels only in the order the host launched them)"
    )


def _hint(first: Access, second: Access) -> str:
    first_host = first.timeline.startswith("thread:")
    second_host = second.timeline.startswith("thread:")
    if second_host and not first_host:
        return (
            f"the {first.op or 'copy'} on {first.timeline} runs asynchronously: synchronise before "
            f"the host touches this memory (stream.synchronize(), event.synchronize() or "
            f"torch.cuda.synchronize()), or use a blocking copy"
        )
    if first_host and not second_host:
        return (
            f"order the host access before the launch on {second.timeline}: do it in the launching "
            f"thread before the launch, or hand over through a lock/queue/event the launcher waits on"
        )
    return (
        f"make {second.timeline} wait for {first.timeline} before it touches this memory: "
        f"<stream>.wait_stream(<other stream>) or an event recorded after the {first.mode} and "
        f"waited on with event.wait(<stream>)"
    )
