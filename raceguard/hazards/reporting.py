"""Reporting hazard races: naming a location's slot (a module attribute by its path in the
target's models, an optimizer's state by parameter name, a generator), grouping races of the
same pair of code lines into one finding, the ``data-race`` / ``shared-rng`` finding with its
hint, and contained internal errors.
"""

from __future__ import annotations

from typing import Any

from ..engine.hb import Race
from ..report.finding import Access, Finding, compute_fingerprint
from ..capture.naming import Resource, race_finding
from ..capture.stacks import user_key
from ._state import _groups, _report_lock, _reported
from .locations import SWAP_FUNCTIONS, _slot_names


# -- reporting ------------------------------------------------------------------------------------
def _internal_error(s: Any, what: str, exc: BaseException, ordering: bool = False) -> None:
    """``Session.hook_failed`` on ``s`` (None: nothing to tell); never raises."""
    try:
        if s is not None:
            s._internal_error(what, exc, ordering)
    except Exception:
        pass


def _room(s: Any) -> bool:
    room = getattr(s, "_room_for_report", None)
    return room() if room is not None else True


def _module_path(s: Any, module: Any) -> tuple[str, str]:
    """``(qualified name, root)`` of a module: ``("model.0", "model")``."""
    modules, _ = s.namer.roots()
    best: tuple | None = None
    for order, (root, m) in enumerate(modules):
        for name, sub in m.named_modules(prefix=root):
            if sub is module:
                # Prefer the outermost container (model.attn over the attn module's own `self`
                # in a forward frame), then the best-ranked root.
                rank = (root == "self" or root.startswith("self."), name == root, order)
                if best is None or rank < best[0]:
                    best = (rank, name, root)
                break
    if best is not None:
        return best[1], best[2]
    name = type(module).__name__
    return name, name


def _param_name(s: Any, param: Any) -> str | None:
    modules, _ = s.namer.roots()
    for root, m in modules:
        for name, p in m.named_parameters(prefix=root, remove_duplicate=False):
            if p is param:
                return name
    return None


class _Named:
    __slots__ = ("kind", "name", "resource_kind", "root", "fingerprint_resource", "attr")

    def __init__(
        self, kind: str, name: str, resource_kind: str, root: str, fingerprint_resource: str, attr: str
    ) -> None:
        self.kind = kind  # finding kind
        self.name = name
        self.resource_kind = resource_kind
        self.root = root
        self.fingerprint_resource = fingerprint_resource
        self.attr = attr


def _name_location(s: Any, race: Race) -> _Named | None:
    meta = race.shadow.meta
    if meta.kind == "rng":
        if meta.label is not None:
            label = meta.label
        else:
            gen = meta.ref() if meta.ref is not None else None
            if gen is None:
                return None
            var = None
            try:
                var = s.namer.name_object(gen)
            except Exception:
                pass
            label = f"{var} (torch.Generator, {gen.device})" if var else f"torch.Generator ({gen.device})"
        return _Named("shared-rng", label, "rng", label, label, "")
    obj = meta.ref() if meta.ref is not None else None
    if obj is None:
        return None
    if meta.kind == "module":
        attr = _slot_names[race.lo] if race.lo < len(_slot_names) else f"slot{race.lo}"
        path, root = _module_path(s, obj)
        lazy = meta.lazy.get(race.lo)
        if lazy is not None and lazy[0] == attr:
            # A parameter or buffer the lazy module creates: named like any tensor race, so the
            # tensor engine's report of the same bug collapses into this one (same fingerprint).
            return _Named("data-race", f"{path}.{attr}", lazy[1], root, root, attr)
        return _Named("data-race", f"{path}.{attr}", "module-attribute", root, f"{root}|{attr}", attr)
    if meta.kind == "optimizer":
        ref = meta.params[race.lo] if race.lo < len(meta.params) else None
        param = ref() if ref is not None else None
        pname = (_param_name(s, param) if param is not None else None) or f"param{race.lo}"
        label = s.namer.optimizer_label(obj)
        return _Named("data-race", f"{label}.state[{pname}]", "optimizer-state", label, f"{label}.state", "state")
    return None


def _report_races(s: Any, races: list[Race]) -> None:
    for race in races:
        try:
            _report_race(s, race)
        except Exception as exc:
            _internal_error(s, "naming a hazard", exc)


def _report_race(s: Any, race: Race) -> None:
    e, l = race.earlier, race.later
    meta = race.shadow.meta
    pair = tuple(sorted([(user_key(e.info.site), e.is_write), (user_key(l.info.site), l.is_write)]))
    group_key = (meta.kind, pair)
    with _report_lock:
        group = _groups.get(group_key)
        slot_key = (id(race.shadow), race.lo)
        if group is not None and (slot_key in group["slots"] or len(group["slots"]) > 64):
            return
        if group is None:
            group = _groups[group_key] = {"slots": set(), "resources": set(), "fingerprint": None}
        group["slots"].add(slot_key)
    named = _name_location(s, race)
    if named is None:
        return
    if group["fingerprint"] is not None:
        if named.name not in group["resources"]:
            group["resources"].add(named.name)
            s.emit({"type": "also_on", "fingerprint": group["fingerprint"], "resource": named.name})
        return
    finding = _race_finding(s, race, named)
    group["fingerprint"] = finding.fingerprint
    group["resources"].add(named.name)
    _emit(s, finding)


def _emit(s: Any, finding: Finding) -> None:
    with _report_lock:
        if finding.fingerprint in _reported:
            return
        _reported.add(finding.fingerprint)
    if _room(s):
        s.emit({"type": "finding", "finding": finding.to_dict()})


def _why(first: Access, second: Access, race: Race) -> str:
    why = (
        f"'{second.thread}' had seen '{first.thread}' only up to its epoch {race.seen_epoch}, "
        f"but the {first.mode} happened in epoch {race.earlier.epoch}: no lock, join, event, "
        f"queue, barrier or future orders the two accesses"
    )
    if first.locks_held or second.locks_held:
        if not set(first.locks_held) & set(second.locks_held):
            why += " (they hold different locks)"
    return why


def _race_finding(s: Any, race: Race, named: _Named) -> Finding:
    first, second = s._access(race.earlier), s._access(race.later)
    details: dict[str, Any] = {"why": _why(first, second, race)}
    if named.kind == "shared-rng":
        threads = f"'{first.thread}' and '{second.thread}'"
        message = (
            f"random generator {named.name} used by {threads} with no order between them: "
            f"{_rng_what(first)} and {_rng_what(second)} interleave differently from run to run, "
            "so seeded results are not reproducible"
        )
        hint = (
            "give each thread its own torch.Generator (e.g. torch.Generator().manual_seed(seed + rank)) "
            "and pass generator=... to the random ops, or draw under one lock in a fixed order"
        )
        accesses = [first, second]
        return Finding(
            kind="shared-rng",
            severity="warning",
            resource=named.name,
            resource_kind="rng",
            message=message,
            accesses=accesses,
            fingerprint=compute_fingerprint("shared-rng", named.fingerprint_resource, accesses),
            hint=hint,
            details=details,
        )
    kind_word = named.resource_kind.replace("-", " ")
    message = (
        f"data race on {kind_word} {named.name}: "
        f"{first.mode} by '{first.thread}' vs {second.mode} by '{second.thread}'"
    )
    details["hazard"] = _hazard_name(named, race)
    resource = Resource(named.name, named.resource_kind, named.fingerprint_resource)
    return race_finding(resource, message, first, second, _hint(named, race), details)


def _rng_what(a: Access) -> str:
    op = a.op or "a draw"
    if op.startswith("torch."):
        return f"{op}() in '{a.thread}'"
    return f"{op} in '{a.thread}'"


def _hazard_name(named: _Named, race: Race) -> str:
    meta = race.shadow.meta
    if meta.kind == "optimizer":
        return "optimizer state initialisation"
    if named.resource_kind in ("parameter", "buffer"):
        return "lazy module initialisation"
    if named.attr == "training":
        return "training flag"
    if named.attr.startswith("_") and named.attr.endswith("hooks"):
        return "hook registration"
    if any(_is_swap(record.info) for record in (race.earlier, race.later)):
        return "parameter swap"
    return "module attribute"


def _is_swap(info: Any) -> bool:
    return getattr(info, "op", "").split(" ", 1)[0] in SWAP_FUNCTIONS


def _hint(named: _Named, race: Race) -> str:
    hazard = _hazard_name(named, race)
    if hazard == "training flag":
        return (
            "call model.train()/model.eval() once before starting the threads that run the model "
            "(or use a separate copy per mode); never switch modes while another thread runs forward"
        )
    if hazard == "hook registration":
        return (
            "register hooks before starting the threads that run the model, "
            "or guard registration and forward with one lock"
        )
    if hazard == "lazy module initialisation":
        return "materialise lazy modules with one dry-run forward before sharing the model between threads"
    if hazard == "optimizer state initialisation":
        return (
            "run the first optimizer.step() (which creates the state) before starting threads, "
            "or guard every step with one lock"
        )
    if hazard == "parameter swap":
        return (
            "torch.func.functional_call swaps the given tensors into the module itself: give each "
            "thread its own copy of the module (copy.deepcopy), or hold one lock around every call"
        )
    if named.attr == "forward":
        return (
            "patch forward before starting the threads that call the module, "
            "or guard the patch and every call with one lock"
        )
    return (
        "do not keep per-call results on a shared module (return them from forward instead), "
        "or guard every write and read of the attribute with one lock"
    )
