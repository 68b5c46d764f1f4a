"""Unit tests of raceguard.hazards, in process.

A real :class:`Session` with the instrumented primitives and the hazard patches installed (as
``raceguard check`` does), findings collected from its sink. The hooks the session itself calls
(``on_rng_op``, ``on_thread_start``, ``on_submit``) are called explicitly here, so these tests
do not depend on how they are wired into ``Session.on_op`` and ``sync``.
"""

from __future__ import annotations

import io
import pickle
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any, Callable

import pytest
import torch
from torch import nn

from raceguard import hazards
from raceguard import sync
from raceguard.capture import session as session_mod
from raceguard.capture.session import Session
from raceguard.engine.hb import ShadowStorage
from raceguard.report.finding import Finding


class Run:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.session = Session(self.events.append)

    @property
    def findings(self) -> list[Finding]:
        """Findings as the supervisor keeps them: the first of each fingerprint."""
        seen: dict[str, Finding] = {}
        for e in self.events:
            if e["type"] == "finding":
                f = Finding.from_dict(e["finding"])
                seen.setdefault(f.fingerprint, f)
        return list(seen.values())

    def also_on(self) -> list[str]:
        return [e["resource"] for e in self.events if e["type"] == "also_on"]

    def errors(self) -> list[str]:
        return [e["message"] + "\n" + e.get("traceback", "") for e in self.events if e["type"] in ("internal-error", "hook-error")]


@pytest.fixture
def run():
    r = Run()
    sync.install()
    session_mod.ACTIVE = r.session
    hazards.install(r.session)
    state = r.session.enter_thread(threading.main_thread(), None)
    try:
        yield r
    finally:
        r.session.leave_thread(state, None)
        hazards.uninstall()
        session_mod.ACTIVE = None
        sync.uninstall()
    assert not r.errors(), r.errors()


def unordered(*fns: Callable[[], Any], names: tuple[str, ...] = ()) -> None:
    """Run each function in its own thread, all started before any is joined: no order between them."""
    threads = [threading.Thread(target=f, name=names[i] if i < len(names) else f"t{i}") for i, f in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def lines_of(finding: Finding) -> set[int]:
    return {a.user_frame.line for a in finding.accesses if a.user_frame is not None}


# -- the RNG op table -------------------------------------------------------------------------
def test_rng_table_covers_every_schema_with_a_generator_argument() -> None:
    with_generator = {
        s.name
        for s in torch._C._jit_get_all_schemas()
        if s.name.startswith("aten::") and any("Generator" in str(a.type) for a in s.arguments)
    }
    assert with_generator - {"aten::initial_seed"} <= hazards.RNG_OPS
    for name in hazards.RNG_ALWAYS_DEFAULT:
        assert name in hazards.RNG_OPS and name not in with_generator


@pytest.mark.parametrize(
    "op, args, kwargs, expected",
    [
        (torch.ops.aten.randn.default, ([3],), {"device": torch.device("cpu")}, ("default", "cpu")),
        (torch.ops.aten.normal_.default, (torch.empty(3),), {}, ("default", "cpu")),
        (torch.ops.aten.uniform_.default, (torch.empty(3), 0.0, 1.0), {"generator": None}, ("default", "cpu")),
        (torch.ops.aten.native_dropout.default, (torch.ones(3), 0.5, True), {}, ("default", "cpu")),
        (torch.ops.aten.native_dropout.default, (torch.ones(3), 0.5, False), {}, None),
        # rrelu in eval mode: training=False, its default, is left out of what a mode gets
        (torch.ops.aten.rrelu_with_noise.default, (torch.ones(3), torch.zeros(3)), {}, None),
        (torch.ops.aten.rrelu_with_noise.default, (torch.ones(3), torch.zeros(3), 0.1, 0.3, True), {}, ("default", "cpu")),
        # dropout as a mode sees it whole, under inference mode: draws when train and p > 0
        (torch.ops.aten.dropout.default, (torch.ones(3), 0.5, True), {}, ("default", "cpu")),
        (torch.ops.aten.dropout.default, (torch.ones(3), 0.5, False), {}, None),
        (torch.ops.aten.dropout.default, (torch.ones(3), 0.0, True), {}, None),
        (torch.ops.aten.feature_alpha_dropout_.default, (torch.ones(2, 3), 0.2, True), {}, ("default", "cpu")),
        (torch.ops.aten.add.Tensor, (torch.ones(3), torch.ones(3)), {}, "not-rng"),
    ],
)
def test_rng_generator_of_an_op(op: Any, args: tuple, kwargs: dict, expected: Any) -> None:
    if expected == "not-rng":
        assert not hazards.is_rng_op(op)
        assert hazards.rng_generator(op, args, kwargs) is None
        return
    assert hazards.is_rng_op(op)
    which = hazards.rng_generator(op, args, kwargs)
    assert (which[0] if which else None) == expected
    if which:
        assert which[1] is None  # the default generator


def test_rng_generator_explicit_generator_is_its_own_location() -> None:
    gen = torch.Generator()
    key, found = hazards.rng_generator(torch.ops.aten.randn.generator, ([3],), {"generator": gen})
    assert found is gen and key == id(gen)


def test_covered_is_the_same_epoch_rule() -> None:
    from raceguard.engine.hb import HappensBefore

    hb = HappensBefore()
    t0 = hb.new_timeline()
    t1 = hb.new_timeline(t0)
    sh = ShadowStorage()
    races: list = []
    assert not hazards._covered(sh, 0, 6, t1, hb.epoch(t1), False)
    hb.access(sh, [(0, 6)], hb.record(t1, False, None), races)
    assert hazards._covered(sh, 0, 6, t1, hb.epoch(t1), False)
    assert not hazards._covered(sh, 0, 6, t0, hb.epoch(t0), False)
    hb.access(sh, [(0, 1)], hb.record(t0, True, None), races)  # another timeline wrote slot 0
    assert not hazards._covered(sh, 0, 6, t1, hb.epoch(t1), False)
    assert hazards._covered(sh, 1, 6, t1, hb.epoch(t1), False)
    assert hazards._covered(sh, 0, 1, t0, hb.epoch(t0), True)
    assert hazards._runs([3, 0, 1, 5, 2]) == [(0, 4), (5, 6)]


# -- module flags and attributes ----------------------------------------------------------------
def _mlp() -> nn.Module:
    return nn.Sequential(OrderedDict(fc1=nn.Linear(4, 8), act=nn.ReLU(), fc2=nn.Linear(8, 2)))


def test_eval_while_another_thread_runs_forward(run: Run) -> None:
    model = _mlp()
    x = torch.randn(2, 4)
    unordered(lambda: model(x), lambda: model.eval(), names=("server", "evaluator"))
    [f] = run.findings
    assert (f.kind, f.resource, f.resource_kind) == ("data-race", "model.training", "module-attribute")
    assert f.severity == "error"
    assert {a.thread: a.mode for a in f.accesses} == {"server": "read", "evaluator": "write"}
    assert set(run.also_on()) == {"model.fc1.training", "model.act.training", "model.fc2.training"}
    assert "train()/model.eval() once before" in f.hint


def test_mode_set_before_threads_start_is_clean(run: Run) -> None:
    model = _mlp()
    model.eval()
    x = torch.randn(2, 4)
    unordered(lambda: model(x), lambda: model(x))
    assert run.findings == []


def test_eval_on_a_model_already_in_eval_mode_is_not_a_write(run: Run) -> None:
    model = _mlp().eval()
    x = torch.randn(2, 4)
    unordered(lambda: model(x), lambda: model.eval())
    assert run.findings == []


def test_mode_switch_and_forward_under_one_lock_is_clean(run: Run) -> None:
    model = _mlp()
    lock = threading.Lock()
    x = torch.randn(2, 4)

    def serve():
        with lock:
            model(x)

    def evaluate():
        with lock:
            model.eval()

    unordered(serve, evaluate)
    assert run.findings == []


def test_attribute_written_in_forward_by_two_threads(run: Run) -> None:
    class Keeps(nn.Module):
        def forward(self, x):
            self.last = x.sum()
            return x

    model = nn.Sequential(OrderedDict(keep=Keeps()))
    x = torch.randn(2)
    unordered(lambda: model(x), lambda: model(x))
    [f] = run.findings
    assert (f.resource, f.resource_kind) == ("model.keep.last", "module-attribute")
    assert [a.mode for a in f.accesses] == ["write", "write"]


def test_hook_registration_and_removal_race_with_forward(run: Run) -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    x = torch.randn(2, 4)
    handle = model[0].register_forward_pre_hook(lambda m, a: None)  # before threads: ordered
    unordered(lambda: model(x), lambda: handle.remove())
    [f] = run.findings
    assert f.resource == "model.0._forward_pre_hooks"
    assert any(a.op == "RemovableHandle.remove" for a in f.accesses)


def test_hooks_registered_before_threads_are_clean(run: Run) -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].register_forward_hook(lambda m, a, o: None)
    model[0].register_full_backward_hook(lambda m, gi, go: None)
    x = torch.randn(2, 4)
    unordered(lambda: model(x), lambda: model(x))
    assert run.findings == []


def test_single_thread_records_nothing(run: Run) -> None:
    model = _mlp()
    for _ in range(3):
        model.train()
        model(torch.randn(2, 4))
        model.eval()
    assert hazards._locs == {}
    assert run.findings == []


# -- serialization ------------------------------------------------------------------------------
def test_torch_save_reads_the_parameters(run: Run) -> None:
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 4, bias=False)))

    def update():
        with torch.no_grad():
            model.fc1.weight.add_(1.0)

    unordered(update, lambda: torch.save(model.state_dict(), io.BytesIO()), names=("trainer", "checkpointer"))
    [f] = run.findings
    assert (f.resource, f.resource_kind) == ("model.fc1.weight", "parameter")
    ops = {a.thread: (a.mode, a.op) for a in f.accesses}
    assert ops == {"trainer": ("write", "aten::add_.Tensor"), "checkpointer": ("read", "torch.save")}


def test_pickle_of_a_tensor_is_a_read(run: Run) -> None:
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 4, bias=False)))

    def update():
        with torch.no_grad():
            model.fc1.weight.mul_(0.5)

    unordered(update, lambda: pickle.dumps(model.fc1.weight.detach()))
    [f] = run.findings
    assert f.resource == "model.fc1.weight"
    assert any(a.op == "pickle (Tensor.__reduce_ex__)" for a in f.accesses)


def test_save_of_a_snapshot_cloned_under_the_lock_is_clean(run: Run) -> None:
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 4, bias=False)))
    lock = threading.Lock()
    snapshots: list = []

    def update():
        with lock:
            with torch.no_grad():
                model.fc1.weight.add_(1.0)

    def checkpoint():
        with lock:
            snapshot = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(snapshot, io.BytesIO())
        snapshots.append(snapshot)

    unordered(update, checkpoint)
    assert run.findings == []


def test_save_still_works(run: Run) -> None:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(3.0)}, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf)["w"], torch.arange(3.0))


# -- the global RNG -----------------------------------------------------------------------------
def _draw(run: Run, op: Any = torch.ops.aten.randn.default, **kwargs: Any) -> Callable[[], None]:
    def draw():
        # What Session.on_op does before an RNG op runs (the op itself is not run: once the hook
        # is wired, the dispatch mode would report the same draw again from another line).
        s = run.session
        hazards.on_rng_op(s, s.current(), op, ([3],), {"device": torch.device("cpu"), **kwargs})

    return draw


def test_two_threads_drawing_from_the_default_generator(run: Run) -> None:
    unordered(_draw(run), _draw(run), names=("augment-a", "augment-b"))
    [f] = run.findings
    assert (f.kind, f.severity, f.resource_kind) == ("shared-rng", "warning", "rng")
    assert f.resource == "torch.default_generator (cpu)"
    assert {a.thread for a in f.accesses} == {"augment-a", "augment-b"}
    assert "torch.Generator" in f.hint


def test_reseed_while_another_thread_draws(run: Run) -> None:
    unordered(lambda: torch.manual_seed(3), _draw(run))
    [f] = run.findings
    assert f.kind == "shared-rng"
    assert {a.op for a in f.accesses} == {"torch.manual_seed", "aten::randn"}


def test_per_thread_generators_are_clean(run: Run) -> None:
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    unordered(
        _draw(run, torch.ops.aten.randn.generator, generator=gens[0]),
        _draw(run, torch.ops.aten.randn.generator, generator=gens[1]),
    )
    assert run.findings == []


def test_one_generator_shared_by_two_threads_is_named(run: Run) -> None:
    shared_gen = torch.Generator().manual_seed(0)
    unordered(
        _draw(run, torch.ops.aten.randn.generator, generator=shared_gen),
        _draw(run, torch.ops.aten.randn.generator, generator=shared_gen),
    )
    [f] = run.findings
    assert f.resource == "shared_gen (torch.Generator, cpu)"


def test_draws_under_one_lock_are_clean(run: Run) -> None:
    lock = threading.Lock()
    draw = _draw(run)

    def locked():
        with lock:
            draw()

    unordered(locked, locked)
    assert run.findings == []


# -- thread-local modes -------------------------------------------------------------------------
def _start_with_hook(run: Run, thread: threading.Thread) -> None:
    hazards.on_thread_start(run.session, thread)  # what Thread.start() does once wired
    thread.start()


def test_thread_started_under_no_grad_runs_forward_with_grad(run: Run) -> None:
    model = _mlp()
    x = torch.randn(2, 4)
    worker = threading.Thread(target=lambda: model(x), name="worker")
    with torch.no_grad():
        _start_with_hook(run, worker)
    worker.join()
    [f] = run.findings
    assert (f.kind, f.severity) == ("thread-local-mode", "warning")
    assert (f.resource, f.resource_kind) == ("model.forward", "module-attribute")
    assert [a.thread for a in f.accesses] == ["MainThread", "worker"]
    assert f.details["modes"] == {"grad mode": {"submitter": False, "worker": True}}
    assert "torch.no_grad()" in f.hint


def test_mode_entered_inside_the_worker_is_clean(run: Run) -> None:
    model = _mlp()
    x = torch.randn(2, 4)

    def work():
        with torch.no_grad():
            model(x)

    worker = threading.Thread(target=work, name="worker")
    with torch.no_grad():
        _start_with_hook(run, worker)
    worker.join()
    plain = threading.Thread(target=work, name="plain")  # default modes at start: nothing to compare
    _start_with_hook(run, plain)
    plain.join()
    assert run.findings == []


def test_worker_that_sets_the_mode_itself_is_trusted(run: Run) -> None:
    model = _mlp()
    x = torch.randn(2, 4)

    def train_step():
        with torch.enable_grad():  # deliberately the opposite of the starting thread's mode
            model(x).sum().backward()

    worker = threading.Thread(target=train_step, name="worker")
    with torch.no_grad():
        _start_with_hook(run, worker)
    worker.join()
    assert run.findings == []


def test_work_submitted_under_inference_mode(run: Run) -> None:
    model = _mlp()
    x = torch.randn(2, 4)

    class WorkItem:  # what concurrent.futures builds: on_submit wraps its fn
        fn = staticmethod(lambda: model(x))

    item = WorkItem()
    with torch.inference_mode():
        hazards.on_submit(run.session, item)  # what _WorkItem.__init__ does once wired
    plain = WorkItem()
    hazards.on_submit(run.session, plain)  # default modes: left alone
    assert plain.fn is WorkItem.fn
    unordered(item.fn, plain.fn, names=("pool-0", "pool-1"))
    [f] = run.findings
    assert f.kind == "thread-local-mode"
    assert set(f.details["modes"]) == {"grad mode", "inference mode"}
    assert f.accesses[0].op.startswith("executor.submit() with")
    assert f.accesses[1].thread == "pool-0"


# -- lazy initialisation ------------------------------------------------------------------------
def test_lazy_module_materialised_while_another_thread_calls_it(run: Run) -> None:
    import time

    model = nn.Sequential(OrderedDict(fc1=nn.LazyLinear(3)))
    x = torch.randn(2, 5)

    def later():
        time.sleep(0.1)  # real-time order only: two concurrent materialisations really crash
        model(x)

    unordered(lambda: model(x), later)
    data_races = [f for f in run.findings if f.kind == "data-race"]
    assert {f.resource for f in data_races} == {"model.fc1.weight"}
    [f] = data_races
    assert f.resource_kind == "parameter"
    assert "model.fc1.bias" in run.also_on()
    assert any(a.op == "LazyLinear.initialize_parameters" and a.mode == "write" for a in f.accesses)


def test_lazy_module_dry_run_before_threads_is_clean(run: Run) -> None:
    model = nn.Sequential(OrderedDict(fc1=nn.LazyLinear(3)))
    model(torch.zeros(1, 5))
    x = torch.randn(2, 5)
    unordered(lambda: model(x), lambda: model(x))
    assert run.findings == []


def test_first_optimizer_step_in_two_threads(run: Run) -> None:
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 2, bias=False)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()

    def step():
        opt.step()  # SGD with momentum creates state["momentum_buffer"] on the first step

    unordered(step, step)
    [f] = [f for f in run.findings if f.resource == "optimizer[SGD].state[model.fc1.weight]"]
    assert f.resource_kind == "optimizer-state"
    assert any(a.op == "SGD.step (state initialisation)" for a in f.accesses)


def test_optimizer_state_created_before_threads_is_only_read(run: Run) -> None:
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 2, bias=False)))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    lock = threading.Lock()

    def step():
        with lock:
            opt.step()

    unordered(step, step)
    assert run.findings == []


# -- stores that change nothing (issue 13) -----------------------------------------------------------
def test_equal_values_stored_by_every_request_are_clean(run: Run) -> None:
    model = _mlp().eval()
    model.pooling = ("mean", 2)
    x = torch.randn(2, 4)

    def request():
        model.eval()  # libraries call it on every request
        model.pooling = ("mean", x.shape[0])  # built anew: equal, not the same object
        model.name = "".join(["mlp", "-", "v1"]) if hasattr(model, "name") else "mlp-v1"
        model(x)

    model.name = "mlp-v1"
    unordered(request, request, request, request)
    assert run.findings == []


def test_same_value_store_races_with_a_store_that_changes_it(run: Run) -> None:
    model = _mlp().eval()

    def train_later():
        time.sleep(0.2)  # only so that the server's store comes first in real time: no ordering
        model.train()

    unordered(lambda: model.eval(), train_later, names=("server", "trainer"))
    f = next(f for f in run.findings if f.resource == "model.training")
    modes = {a.thread: (a.mode, a.op) for a in f.accesses}
    assert modes == {"server": ("read", "setattr training (same value)"), "trainer": ("write", "setattr training")}


def test_changed_value_still_races_with_an_equal_store(run: Run) -> None:
    model = _mlp()
    model.threshold = 0.5
    unordered(lambda: setattr(model, "threshold", 0.25 * 2), lambda: setattr(model, "threshold", 0.75))
    [f] = run.findings
    assert f.resource == "model.threshold"
    assert "write" in {a.mode for a in f.accesses}  # read-write or write-write: whichever came first


def test_signed_zero_and_other_types_are_changes(run: Run) -> None:
    assert hazards._unchanged(("a", 1, None, (2.5,)), ("a", 1, None, (2.5,)))
    assert hazards._unchanged(float("nan"), float("nan"))
    assert not hazards._unchanged(0.0, -0.0)
    assert not hazards._unchanged(1, True)  # equal, but a different value to the reader
    assert not hazards._unchanged([1], [1])  # mutable: the reader may hold the old list
    assert not hazards._unchanged(torch.tensor(1.0), torch.tensor(1.0))  # never compared by value


def test_parameter_reassigned_to_itself_is_clean_and_replaced_races(run: Run) -> None:
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 4)))
    weight = model.fc1.weight
    unordered(lambda: setattr(model.fc1, "weight", weight), lambda: setattr(model.fc1, "weight", weight))
    assert run.findings == []
    unordered(
        lambda: setattr(model.fc1, "weight", nn.Parameter(torch.zeros(4, 4))),
        lambda: setattr(model.fc1, "weight", weight),
    )
    [f] = run.findings
    assert f.resource == "model.fc1.weight"
    assert "write" in {a.mode for a in f.accesses}


def test_property_store_is_judged_by_the_setter_own_stores(run: Run) -> None:
    class Kernelised(nn.Module):
        """transformers' PreTrainedModel.kernels_mode: the setter acts only on a change."""

        def __init__(self) -> None:
            super().__init__()
            self._mode = "inference"

        @property
        def mode(self) -> str:
            return self._mode

        @mode.setter
        def mode(self, value: str) -> None:
            if value != self._mode:
                self._mode = value

    model = nn.Sequential(OrderedDict(inner=Kernelised()))
    unordered(lambda: setattr(model.inner, "mode", "inference"), lambda: setattr(model.inner, "mode", "inference"))
    assert run.findings == []
    unordered(lambda: setattr(model.inner, "mode", "training"), lambda: setattr(model.inner, "mode", "inference"))
    [f] = run.findings
    assert f.resource == "model.inner._mode"


def test_slots_store_compares_the_slot_value(run: Run) -> None:
    class Slotted(nn.Module):
        __slots__ = ("scale",)

    model = nn.Sequential(OrderedDict(s=Slotted()))
    model.s.scale = 3
    unordered(lambda: setattr(model.s, "scale", 3), lambda: setattr(model.s, "scale", 3))
    assert run.findings == []
    unordered(lambda: setattr(model.s, "scale", 4), lambda: setattr(model.s, "scale", 5))
    [f] = run.findings
    assert f.resource == "model.s.scale"


# -- bookkeeping that must not pile up ------------------------------------------------------------
def test_a_dead_storages_shadow_is_dropped_at_the_next_op(run: Run) -> None:
    # Kept until a sweep, 4,096 dead shadows drove the target into full garbage collections.
    x = torch.ones(64)
    for _ in range(500):
        (x * 2).sum()  # two fresh storages per iteration, both dead by the next one
    assert len(run.session.shadows) < 20, len(run.session.shadows)


# -- the autograd engine's accumulation into .grad (issue 13) --------------------------------------
def _backward(model: nn.Module, x: torch.Tensor) -> None:
    model(x).pow(2).sum().backward()


def test_concurrent_backward_on_shared_parameters_is_clean(run: Run) -> None:
    model = _mlp()
    xs = [torch.randn(3, 4) for _ in range(4)]
    for _ in range(2):  # first round installs .grad (no op of its own), second accumulates
        unordered(*[lambda x=x: _backward(model, x) for x in xs])
    assert run.findings == []
    assert model.fc1.weight.grad is not None


def test_reading_grad_during_another_threads_backward_races(run: Run) -> None:
    model = _mlp()
    _backward(model, torch.randn(3, 4))  # the grads exist before the threads start
    x = torch.randn(3, 4)
    norms = []
    unordered(
        lambda: _backward(model, x),
        lambda: _backward(model, x),
        lambda: norms.append(model.fc1.weight.grad.norm()),
        names=("worker-0", "worker-1", "monitor"),
    )
    grad_races = [f for f in run.findings if f.resource.endswith(".grad")]
    assert grad_races and all(f.kind == "data-race" for f in grad_races)
    assert any(
        {a.thread for a in f.accesses} in ({"monitor", "worker-0"}, {"monitor", "worker-1"})
        for f in grad_races
    ), [f.message for f in run.findings]
    assert not any({a.thread for a in f.accesses} == {"worker-0", "worker-1"} for f in run.findings)


def test_without_the_autograd_node_binding_accumulations_stay_unordered(run: Run, monkeypatch) -> None:
    # torch without torch._C._current_autograd_node: no modelling, so concurrent backward is
    # reported as before rather than raceguard failing.
    monkeypatch.setattr(hazards.grads, "_current_node", None)
    model = _mlp()
    _backward(model, torch.randn(3, 4))
    xs = [torch.randn(3, 4) for _ in range(2)]
    unordered(*[lambda x=x: _backward(model, x) for x in xs])
    assert any(f.resource.endswith(".grad") for f in run.findings)


# -- install / uninstall --------------------------------------------------------------------------
def _patched() -> tuple:
    return (
        nn.Module.__call__, nn.Module.__setattr__, nn.Module.__delattr__, nn.Module.register_forward_hook,
        torch.save, torch.serialization.save, torch.manual_seed, torch.random.manual_seed,
        torch.Tensor.__reduce_ex__, torch._C._set_grad_enabled, torch.set_autocast_enabled,
        torch.autograd.grad_mode.inference_mode.__enter__, torch.utils.hooks.RemovableHandle.remove,
    )


def test_uninstall_restores_torch() -> None:
    before = _patched()
    s = Session(lambda e: None)
    hazards.install(s)
    # Module calls are wrapped only from the first thread start on.
    assert nn.Module.__call__ is before[0] and torch.save is not before[2]
    hazards.watch_module_calls()
    assert nn.Module.__call__ is not before[0]
    hazards.uninstall()
    after = _patched()
    assert after == before
    assert not hazards.installed()


def test_locations_of_objects_that_cannot_be_weakly_referenced():
    """torch 2.11's ``torch._C.Generator`` cannot be weakly referenced: its location holds it."""

    class NoWeakref:
        __slots__ = ()

    obj = NoWeakref()
    with pytest.raises(TypeError):
        weakref.ref(obj)
    ref = hazards._ref(obj)
    assert ref() is obj
    shadow = hazards._loc(("test-no-weakref", id(obj)), obj, "rng", "generator")
    assert shadow.meta.ref() is obj
    assert hazards._loc(("test-no-weakref", id(obj)), obj, "rng", "generator") is shadow
