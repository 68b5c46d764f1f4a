"""Asynchronous collectives as timelines, in one process (a world of one, gloo on CPU), through
the Python API: every way the program can learn that the op finished orders it, and a host
access before any of them is a data race with the launch line and the access line."""

from __future__ import annotations

import os
import socket

import pytest
import torch

import raceguard

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover - torch built without distributed
    pytest.skip("torch.distributed is not available", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _races(findings):
    return [f for f in findings if f.kind == "data-race"]


def _run(body):
    grad = torch.ones(64)
    weight = torch.zeros(64)
    with raceguard.watch() as session:
        body(grad, weight)
    return _races(session.findings)


def test_access_before_wait_races_with_the_launch():
    def body(grad, weight):
        work = dist.all_reduce(grad, async_op=True)
        weight.sub_(grad)
        work.wait()

    races = _run(body)
    assert len(races) == 1
    race = races[0]
    coll = next(a for a in race.accesses if a.timeline.startswith("collective:"))
    host = next(a for a in race.accesses if a.timeline.startswith("thread:"))
    assert coll.timeline == "collective:default" and coll.mode == "write"
    assert coll.op == "all_reduce (async_op=True)"
    assert coll.stack[0].function == "body" and host.op == "aten::sub_.Tensor"
    assert host.stack[0].line == coll.stack[0].line + 1


@pytest.mark.parametrize(
    "complete",
    [
        lambda work: work.wait(),
        lambda work: [None for _ in iter(lambda: work.is_completed(), True)],
        lambda work: work.get_future().wait(),
        lambda work: work.get_future().value() if work.get_future().wait() is not None else None,
        lambda work: dist.barrier(),
        lambda work: dist.barrier(async_op=True).wait(),
        lambda work: work.get_future().then(lambda fut: None).wait(),
    ],
    ids=["wait", "is_completed", "future_wait", "future_value", "barrier", "async_barrier", "then_wait"],
)
def test_every_way_of_learning_completion_orders_the_op(complete):
    def body(grad, weight):
        work = dist.all_reduce(grad, async_op=True)
        complete(work)
        weight.sub_(grad)
        grad.zero_()

    assert _run(body) == []


def test_blocking_collective_orders_what_it_touches():
    def body(grad, weight):
        dist.all_reduce(grad)
        weight.sub_(grad)

    assert _run(body) == []


def test_callback_of_then_runs_after_the_op():
    def body(grad, weight):
        work = dist.all_reduce(grad, async_op=True)
        fut = work.get_future().then(lambda f: weight.add_(grad))
        fut.wait()
        weight.mul_(2)

    assert _run(body) == []


def test_read_only_input_of_a_gather_may_be_read_but_not_written():
    def body(grad, weight):
        out = [torch.empty(64)]
        work = dist.all_gather(out, grad, async_op=True)
        weight.add_(grad)  # reading an input the collective only reads: fine
        grad.zero_()  # writing it: a race
        work.wait()

    races = _run(body)
    assert len(races) == 1
    assert {a.mode for a in races[0].accesses} == {"read", "write"}


def test_waiting_in_another_thread_orders_only_through_that_thread():
    import threading

    def body(grad, weight):
        work = dist.all_reduce(grad, async_op=True)
        waited = threading.Event()

        def waiter():
            work.wait()
            waited.set()

        t = threading.Thread(target=waiter)
        t.start()
        waited.wait()  # the Event hands the waiter's knowledge over
        weight.sub_(grad)
        t.join()

    assert _run(body) == []
