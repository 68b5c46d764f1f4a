"""The pure model of asynchronous collectives (raceguard.engine.collectives), with synthetic events."""

from __future__ import annotations

from raceguard.engine.collectives import CollectiveModel
from raceguard.engine.hb import HappensBefore, ShadowStorage


def _setup():
    hb = HappensBefore()
    host = hb.new_timeline(None)
    return hb, CollectiveModel(hb), host, ShadowStorage(hi=64)


def _launch(hb, model, host, shadow, group="default", write=True):
    races = []
    pending = model.launch(host, group, "all_reduce")
    hb.access_range(shadow, 0, 64, hb.record(pending.lane.tid, write, "coll"), races)
    model.launched(pending)
    assert races == []  # the launch orders everything the host did before it
    return pending


def _host_access(hb, host, shadow, write=False):
    races = []
    hb.access_range(shadow, 0, 64, hb.record(host, write, "host"), races)
    return races


def test_host_access_before_wait_races_after_wait_does_not():
    hb, model, host, shadow = _setup()
    _host_access(hb, host, shadow, write=True)
    pending = _launch(hb, model, host, shadow)
    assert len(_host_access(hb, host, shadow)) == 1
    model.complete(host, pending)
    assert _host_access(hb, host, shadow, write=True) == []


def test_waiting_one_op_says_nothing_about_an_earlier_one_still_pending():
    hb, model, host, a = _setup()
    b = ShadowStorage(hi=64)
    first = _launch(hb, model, host, a)
    second = _launch(hb, model, host, b)
    assert first.lane is not second.lane  # pending together: separate lanes
    model.complete(host, second)
    assert _host_access(hb, host, b) == []
    assert len(_host_access(hb, host, a)) == 1


def test_lane_reused_once_its_op_was_waited():
    hb, model, host, a = _setup()
    first = _launch(hb, model, host, a)
    model.complete(host, first)
    second = _launch(hb, model, host, a)
    assert second.lane is first.lane


def test_barrier_completes_every_pending_op_of_its_group_only():
    hb, model, host, a = _setup()
    b = ShadowStorage(hi=64)
    _launch(hb, model, host, a, group="default")
    _launch(hb, model, host, b, group="group 1")
    model.complete_group(host, "default")
    assert _host_access(hb, host, a) == []
    assert len(_host_access(hb, host, b)) == 1


def test_async_barrier_covers_ops_pending_at_its_launch():
    hb, model, host, a = _setup()
    _launch(hb, model, host, a)
    barrier = model.barrier("default", None)
    model.complete(host, barrier)
    assert _host_access(hb, host, a, write=True) == []


def test_other_thread_learns_nothing_from_the_waiter():
    hb, model, host, a = _setup()
    other = hb.new_timeline(host)
    pending = _launch(hb, model, host, a)
    model.complete(host, pending)
    assert len(_host_access(hb, other, a)) == 1
