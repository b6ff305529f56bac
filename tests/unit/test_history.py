"""The dashboard's history ring (queuekit.history): fixed size, rates from counter differences,
oldest first after wrapping, gaps as null, bounded number of queues."""

import json

from queuekit.history import History


def q(ready=0, inflight=0, delayed=0, dead=0, enqueued=0, acked=0, nacked=0, redelivered=0):
    return {
        "ready": ready,
        "inflight": inflight,
        "delayed": delayed,
        "dead": dead,
        "waiting": 0,
        "enqueued": enqueued,
        "acked": acked,
        "nacked": nacked,
        "redelivered": redelivered,
        "dead_lettered": 0,
    }


def test_rates_are_counter_differences_per_second():
    h = History(interval=10, points=5)
    h.sample({"a": q(ready=3, enqueued=100, acked=40)}, now=1000.0)
    h.sample({"a": q(ready=5, enqueued=150, acked=60, nacked=4, redelivered=1)}, now=1010.0)
    snap = h.snapshot(["a"])
    assert snap["t"] == [1000.0, 1010.0]
    a = snap["queues"]["a"]
    assert a["ready"] == [3, 5]
    assert a["put"] == [None, 5.0]  # the first sample has no rate
    assert a["ack"] == [None, 2.0]
    assert a["fail"] == [None, 0.5]  # nacks and expired leases
    json.dumps(snap, allow_nan=False)  # no NaN reaches JSON


def test_a_counter_reset_is_a_gap_not_a_negative_rate():
    h = History(points=4)
    h.sample({"a": q(enqueued=100)}, now=0.0)
    h.sample({"a": q(enqueued=10)}, now=10.0)  # the server restarted
    h.sample({"a": q(enqueued=30)}, now=20.0)
    assert h.snapshot(["a"])["queues"]["a"]["put"] == [None, None, 2.0]


def test_the_ring_keeps_the_newest_points_oldest_first():
    h = History(points=3)
    for i in range(7):
        h.sample({"a": q(ready=i)}, now=float(i))
    snap = h.snapshot(["a"])
    assert snap["t"] == [4.0, 5.0, 6.0]
    assert snap["queues"]["a"]["ready"] == [4, 5, 6]


def test_a_queue_that_appears_later_has_nulls_before_it():
    h = History(points=4)
    h.sample({"a": q(ready=1)}, now=0.0)
    h.sample({"a": q(ready=1), "b": q(ready=7)}, now=1.0)
    snap = h.snapshot(["a", "b", "missing"])
    assert snap["queues"]["b"]["ready"] == [None, 7]
    assert set(snap["queues"]) == {"a", "b"}


def test_queues_beyond_the_bound_are_counted_not_kept():
    h = History(points=2, max_queues=2)
    h.sample({"a": q(), "b": q(), "c": q(), "d": q()}, now=0.0)
    assert h.names() == ["a", "b"]
    assert h.omitted == 2
    assert h.snapshot(["c"])["queues"] == {}
