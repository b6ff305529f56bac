"""The API boundary: every argument a client sends is checked here, before the broker sees it.

These call :class:`queuekit.api.QueueAPI` directly on a real broker (no network). Calls that would
park or wait for a commit need the server's loop and are covered by tests/process.
"""

import json
import types

import pytest

from queuekit.api import MAX_BATCH, QueueAPI
from queuekit.broker import Broker
from queuekit.errors import InvalidRequest, PayloadError, PayloadTooLarge
from queuekit.journal import Journal


@pytest.fixture
def broker():
    return Broker(max_task_bytes=1000, max_attempts=2)


@pytest.fixture
def api(broker):
    info = types.SimpleNamespace(durable=False, stats=lambda: {"queues": broker.stats()})
    return QueueAPI(broker, loop=None, info=info)


class FakeSession:
    """Only what the API touches on a session for calls that are answered at once."""

    name = "test-client"

    def __init__(self):
        self.hooks = []

    def deliver(self, items):  # pragma: no cover - only a parked get would call it
        raise AssertionError("nothing may park in these tests")

    def after_reply(self, hook):
        self.hooks.append(hook)


@pytest.fixture
def session():
    return FakeSession()


def texts(*values):
    return [json.dumps(v) for v in values]


def test_put_get_ack_through_the_api(api, session, broker):
    ids = api.put_many(session, "q", texts("a", "b"))
    items = api.get_many(session, "q", 5, 0)
    assert [i[0] for i in items] == ids
    assert api.ack_many(session, "q", ids) == 2
    assert broker.stats()["q"]["acked"] == 2


def test_tasks_of_a_reply_that_was_not_written_are_released(api, session, broker):
    api.put_many(session, "q", texts("a"))
    api.get_many(session, "q", 1, 0)
    (hook,) = session.hooks
    hook(False)  # the connection died before the reply was written
    s = broker.stats()["q"]
    assert (s["ready"], s["inflight"]) == (1, 0)


def test_bad_payloads_are_refused_and_nothing_is_enqueued(api, session, broker):
    with pytest.raises(PayloadError, match="payload 1 is not valid JSON"):
        api.put_many(session, "q", ['"ok"', "{not json"])
    with pytest.raises(PayloadError, match="must be JSON text"):
        api.put_many(session, "q", ['"ok"', b"bytes"])
    with pytest.raises(PayloadError, match="not valid JSON"):
        api.put_many(session, "q", ["NaN"])
    with pytest.raises(PayloadTooLarge, match="the limit is 1000"):
        api.put_many(session, "q", ['"ok"', json.dumps("x" * 1000)])
    with pytest.raises(InvalidRequest):
        api.put_many(session, "q", "not a list")
    with pytest.raises(InvalidRequest, match="at most"):
        api.put_many(session, "q", ["1"] * (MAX_BATCH + 1))
    with pytest.raises(InvalidRequest, match="delay"):
        api.put_many(session, "q", ["1"], delay=-1)
    assert broker.qsize("q") == 0
    assert "q" not in broker.stats()  # not even created


@pytest.mark.parametrize("name", ["", "has space", "a/b", "x" * 200, None, 5, "-leading"])
@pytest.mark.parametrize("call", ["put_many", "get_many", "ack_many", "qsize", "dead_list"])
def test_bad_queue_names_are_refused_everywhere(api, session, broker, name, call):
    args = {"put_many": (texts(1),), "get_many": (1, 0), "ack_many": ([1],), "qsize": (), "dead_list": ()}[call]
    with pytest.raises(InvalidRequest, match="invalid queue name"):
        getattr(api, call)(session, name, *args)
    assert broker.stats() == {}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_n": 0},
        {"max_n": 10**6},
        {"max_n": "3"},
        {"max_n": True},
        {"timeout": -1},
        {"timeout": float("nan")},
        {"timeout": "1"},
        {"lease": 0},
        {"lease": 10**9},
        {"acks": "1,2"},
        {"acks": [1, "2"]},
    ],
)
def test_bad_get_arguments_are_refused(api, session, broker, kwargs):
    api.put_many(session, "q", texts(1))
    with pytest.raises(InvalidRequest):
        api.get_many(session, "q", **{"max_n": 1, "timeout": 0, **kwargs})
    assert broker.stats()["q"]["ready"] == 1  # nothing was taken


@pytest.mark.parametrize(
    "call,args",
    [
        ("nack_many", ("not a list",)),
        ("nack_many", ([(1, 1, None)],)),  # three fields, not four
        ("nack_many", ([("1", 1, None, None)],)),
        ("nack_many", ([(1, 1, -5, None)],)),  # negative delay
        ("nack_many", ([(1, 1, float("nan"), None)],)),
        ("extend_many", ([(1,)],)),
        ("extend_many", ([(1, 1)], -1)),  # bad lease
        ("release_many", ([(1, "1")],)),
        ("ack_many", ({"1": 1},)),
        ("dead_list", (0,)),
        ("dead_requeue", ("all",)),
        ("dead_purge", ([1.5],)),
    ],
)
def test_malformed_items_are_refused(api, session, call, args):
    with pytest.raises(InvalidRequest):
        getattr(api, call)(session, "q", *args)


def test_long_waits_are_cut_to_the_server_maximum(broker, session):
    class Loop:
        def park(self, session, waiter, timeout, finish):
            self.timeout = timeout
            return "PENDING"

    loop = Loop()
    api = QueueAPI(broker, loop, types.SimpleNamespace(durable=False))
    assert api.get_many(session, "q", 1, float("inf")) == "PENDING"
    assert loop.timeout == 60.0


def test_ping_reports_durability_and_the_task_limit(broker, session):
    info = types.SimpleNamespace(durable=Journal.durable)
    assert QueueAPI(broker, None, info).ping(session)["max_task_bytes"] == 1000
