"""Gradients are named without raceguard reading ``.grad`` while another thread runs backward.

The autograd engine swaps a parameter's gradient in C++ without the GIL; a Python read of
``param.grad`` on another thread at that moment is a use-after-free (a checked target died of
SIGSEGV when raceguard's naming did it). ``capture/backward.py`` knows which threads are inside
backward; ``Namer.note_grad`` learns each gradient's storage from the engine's own ops.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import pytest
import torch
from torch import nn

import raceguard
from raceguard.capture import backward, naming

# These tests open their own watch() blocks: opt out when the suite itself runs under --raceguard.
pytestmark = pytest.mark.raceguard(enabled=False)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(4, 8), act=nn.ReLU(), fc2=nn.Linear(8, 2)))


@pytest.fixture
def bracketed():
    assert backward.install()
    try:
        yield
    finally:
        backward.uninstall()


def _backward_held_inside(started: threading.Event, release: threading.Event) -> None:
    x = torch.randn(3, 4, requires_grad=True)

    def hold(grad: torch.Tensor) -> torch.Tensor:
        started.set()
        release.wait(10)
        return grad

    y = (x * 2).sum()
    x.register_hook(hold)  # runs inside the engine, during backward
    y.backward()


def test_grads_are_unreadable_while_another_thread_is_inside_backward(bracketed) -> None:
    assert backward.grads_readable()
    started, release = threading.Event(), threading.Event()
    worker = threading.Thread(target=_backward_held_inside, args=(started, release))
    worker.start()
    try:
        assert started.wait(10)
        assert not backward.grads_readable()
        assert not backward.grads_readable(own_backward=False)
    finally:
        release.set()
        worker.join(10)
    assert backward.grads_readable()


def test_own_backward_leaves_grads_readable_unless_device_threads_may_run_it(bracketed) -> None:
    seen = []
    x = torch.randn(3, requires_grad=True)
    x.register_hook(lambda g: seen.append((backward.grads_readable(), backward.grads_readable(own_backward=False))))
    (x * 3).sum().backward()
    assert seen == [(True, False)]


def test_without_the_bracket_grads_are_never_read() -> None:
    backward.uninstall()
    assert not backward.grads_readable()


def test_uninstall_restores_torch() -> None:
    import torch.autograd as autograd
    import torch.autograd.graph as graph

    original = graph._engine_run_backward
    assert backward.install()
    assert graph._engine_run_backward is not original
    assert autograd._engine_run_backward is graph._engine_run_backward
    backward.uninstall()
    assert graph._engine_run_backward is original and autograd._engine_run_backward is original


def test_a_gradient_race_is_named_from_the_engines_ops_when_grad_is_unreadable(monkeypatch) -> None:
    # As if another thread were always inside backward: naming may not read .grad at all.
    reads = []
    monkeypatch.setattr(naming.backward, "grads_readable", lambda own_backward=True: reads.append(1) and False)
    model = _mlp()
    model(torch.randn(3, 4)).sum().backward()  # the gradients exist before the threads start
    with raceguard.watch() as session:
        x = torch.randn(3, 4)
        norms = []
        threads = [
            threading.Thread(target=lambda: model(x).sum().backward(), name="worker"),
            threading.Thread(target=lambda: norms.append(model.fc1.weight.grad.norm()), name="monitor"),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    grads = [f for f in session.findings if f.resource_kind == "grad"]
    assert grads, [f.message for f in session.findings]
    assert {f.resource for f in grads} <= {f"{p}.grad" for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")} | {
        f"model.{p}.grad" for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    }
    assert any(f.resource.endswith("fc1.weight.grad") for f in grads)
    assert reads, "naming asked whether .grad was readable"


def test_noted_gradients_follow_their_storage() -> None:
    namer = naming.Namer(lambda: None)
    p = nn.Parameter(torch.randn(4))
    grad = torch.zeros(8)[2:6]
    namer.note_grad(p, "aten::add_.Tensor", [(grad, True), (torch.ones(4), False)], grad)
    spans = namer._noted_grads(grad.untyped_storage())
    assert spans == {id(p): (p, 8, 24)}
    namer.note_grad(p, "aten::mul_.Tensor", [(torch.ones(4), True)], None)  # not an accumulation op
    assert namer._noted_grads(torch.ones(4).untyped_storage()) == {}
    fresh = torch.ones(4)
    namer.note_grad(p, "aten::detach", [(torch.ones(4), False)], fresh)
    assert namer._noted_grads(fresh.untyped_storage()) == {id(p): (p, 0, 16)}
