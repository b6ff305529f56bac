"""Consumer-reported metrics: the worker's accumulator, the report checks, the server's totals."""

from __future__ import annotations

import math
import os

import pytest

from queuekit import __version__
from queuekit.consumer_metrics import (
    BUCKETS,
    OTHER,
    ConsumerInfo,
    Histogram,
    Recorder,
    Store,
    checked_report,
    consumer_info,
)
from queuekit.errors import InvalidRequest, ServerUnavailable


class FlakyClient:
    """Client.report stand-in for the Recorder (the Recorder's own logic is under test here;
    the real call is exercised against a server process in tests/process/test_metrics_scrape.py)."""

    def __init__(self, store: Store, fail: int = 0, lose_answer: int = 0):
        self.store, self.fail, self.lose_answer, self.calls = store, fail, lose_answer, 0

    def report(self, report):
        self.calls += 1
        if self.fail:
            self.fail -= 1
            raise ServerUnavailable("down")
        reporter, seq, queues, _ = checked_report(report)
        applied = self.store.add("worker-1", reporter, seq, queues)
        if self.lose_answer:  # applied on the server, answer lost on the way back
            self.lose_answer -= 1
            raise ServerUnavailable("connection lost after the call")
        return applied


def test_histogram_buckets_edges_and_sum():
    h = Histogram()
    for s in (0.0, BUCKETS[0], BUCKETS[0] + 1e-9, BUCKETS[-1], BUCKETS[-1] * 2, -1.0):
        h.observe(s)
    assert h.counts[0] == 3  # 0, the bound itself (le is inclusive), and a negative clamped to 0
    assert h.counts[1] == 1
    assert h.counts[len(BUCKETS) - 1] == 1
    assert h.counts[-1] == 1  # +Inf
    assert h.count == 6
    assert h.total == pytest.approx(BUCKETS[0] * 2 + 1e-9 + BUCKETS[-1] * 3)


def test_recorder_reports_deltas_once_even_when_answers_are_lost():
    store = Store()
    rec = Recorder()
    rec.observe("q", "ok", 0.02, 1.5)
    rec.observe("q", "failed", 0.2, 0.001)
    client = FlakyClient(store, fail=1)
    assert rec.send(client) is False  # server down: kept
    rec.observe("q", "timeout", 30.0, 0.0)  # new work waits for the next report
    client.lose_answer = 1
    assert rec.send(client) is False  # applied, but we do not know: resent as it is
    assert rec.send(client) is True  # the duplicate is dropped by the server
    totals = store.snapshot()
    assert totals.queues["q"].outcomes == {"ok": 1, "failed": 1, "timeout": 0}
    assert totals.reports == 1
    assert rec.send(client) is True  # now the third observation, in a report of its own
    totals = store.snapshot()
    assert totals.queues["q"].outcomes == {"ok": 1, "failed": 1, "timeout": 1}
    assert totals.queues["q"].duration.count == 3 and totals.queues["q"].wait.count == 3
    assert totals.queues["q"].duration.total == pytest.approx(30.22)
    assert totals.consumers == {"worker-1": {"ok": 1, "failed": 1, "timeout": 1}}
    calls = client.calls
    assert rec.send(client) is True and client.calls == calls  # nothing new: no call


def test_a_refused_report_is_logged_once_and_not_sent_again(caplog):
    rec = Recorder()
    rec.observe("q", "ok", 0.1, 0.1)

    class OldServer:
        calls = 0

        def report(self, report):
            self.calls += 1
            raise AttributeError("method 'report' is not exposed by QueueAPI")  # what a server before reports says

    server = OldServer()
    assert rec.send(server) is False
    rec.observe("q", "ok", 0.1, 0.1)
    assert rec.send(server) is False and server.calls == 1
    assert sum("metrics_report_refused" in r.getMessage() for r in caplog.records) == 1


def test_store_caps_consumer_series():
    store = Store(max_consumers=2)
    item = checked_report({"reporter": "r", "seq": 1, "queues": {"q": _item(ok=1)}}).queues
    for i, name in enumerate(("a", "b", "c", "d", "a")):
        assert store.add(name, f"r{i}", 1, item)
    consumers = store.snapshot().consumers
    assert set(consumers) == {"a", "b", OTHER}
    assert consumers["a"]["ok"] == 2 and consumers[OTHER]["ok"] == 2


def test_store_drops_old_and_repeated_sequence_numbers():
    store = Store()
    item = checked_report({"reporter": "r", "seq": 1, "queues": {"q": _item(ok=1)}}).queues
    assert store.add("c", "r", 2, item)
    assert not store.add("c", "r", 2, item)
    assert not store.add("c", "r", 1, item)
    assert store.add("c", "other-process", 1, item)
    assert store.snapshot().queues["q"].outcomes["ok"] == 2


def _item(**outcomes):
    return {
        **outcomes,
        "duration": [0] * (len(BUCKETS) + 1),
        "duration_sum": 0.0,
        "wait": [0] * (len(BUCKETS) + 1),
        "wait_sum": 0.0,
    }


@pytest.mark.parametrize(
    "report, message",
    [
        ([], "must be a dict"),
        ({"reporter": "", "seq": 1, "queues": {}}, "reporter"),
        ({"reporter": "x" * 65, "seq": 1, "queues": {}}, "reporter"),
        ({"reporter": "r", "seq": 0, "queues": {}}, "seq"),
        ({"reporter": "r", "seq": True, "queues": {}}, "seq"),
        ({"reporter": "r", "seq": 1, "queues": []}, "queues"),
        ({"reporter": "r", "seq": 1, "queues": {f"q{i}": _item() for i in range(257)}}, "at most 256"),
        ({"reporter": "r", "seq": 1, "queues": {"bad name!": _item()}}, "queue"),
        ({"reporter": "r", "seq": 1, "queues": {"q": "x"}}, "expected a dict"),
        ({"reporter": "r", "seq": 1, "queues": {"q": _item(ok=-1)}}, "q.ok"),
        ({"reporter": "r", "seq": 1, "queues": {"q": _item(ok=1.0)}}, "q.ok"),
        ({"reporter": "r", "seq": 1, "queues": {"q": {**_item(), "duration": [0] * 3}}}, "bucket counts"),
        ({"reporter": "r", "seq": 1, "queues": {"q": {**_item(), "wait_sum": math.nan}}}, "wait_sum"),
        ({"reporter": "r", "seq": 1, "queues": {"q": {**_item(), "duration_sum": -1.0}}}, "duration_sum"),
        ({"reporter": "r", "seq": 1, "queues": {"q": {**_item(), "wait": [True] + [0] * len(BUCKETS)}}}, "q.wait"),
    ],
)
def test_bad_reports_are_refused_with_a_clear_error(report, message):
    with pytest.raises(InvalidRequest, match=message):
        checked_report(report)


def test_end_classifies_outcomes_from_the_worker_lists():
    from types import SimpleNamespace

    rec = Recorder()
    tasks = [SimpleNamespace(queue="q", enqueued_at=0.0) for _ in range(5)]
    failed: list = []
    rec.end(tasks[0], rec.begin(), failed)  # nothing failed: ok
    failed.append((tasks[1], None, "ValueError: no"))
    rec.end(tasks[1], rec.begin(), failed)
    failed.append((tasks[2], None, "timeout"))  # a process-pool child ended at its time limit
    rec.end(tasks[2], rec.begin(), failed)
    rec.end(tasks[3], rec.begin(), failed)  # the last failure is another task's: this one is ok
    rec.end(tasks[4], rec.begin(), failed, abandoned=tasks[4])  # a thread the worker gave up on
    report = rec.next_report()["queues"]["q"]
    assert (report["ok"], report["failed"], report["timeout"]) == (2, 1, 2)
    assert sum(report["wait"]) == 5 and report["wait_sum"] > 1e9  # enqueued at the epoch: long ago


# -- the consumer's info -------------------------------------------------------------------


def _info(**changes):
    info = {
        "host": "node-1",
        "pid": 4321,
        "version": "0.1.0",
        "queues": ["jobs", "mail"],
        "concurrency": 4,
        "pool": "thread",
        "in_flight": 3,
        "heartbeat": 10.0,
    }
    info.update(changes)
    return {k: v for k, v in info.items() if v is not ...}


def test_info_is_checked_and_old_reports_without_it_still_apply():
    report = {"reporter": "r", "seq": 1, "queues": {"q": _item(ok=1)}}
    old = checked_report(report)
    assert old.info is None and checked_report(report).queues["q"]["ok"] == 1
    new = checked_report({**report, "info": _info(extra_field_of_a_newer_consumer=1)})
    assert new.info == ConsumerInfo("node-1", 4321, "0.1.0", ["jobs", "mail"], 4, "thread", 3, 10.0)


@pytest.mark.parametrize(
    "info, message",
    [
        ([], "info must be a dict"),
        ({**_info(), **{f"k{i}": 0 for i in range(30)}}, "at most 32 fields"),
        (_info(host=...), "info.host"),
        (_info(host=""), "info.host"),
        (_info(host="h" * 254), "info.host"),
        (_info(host="a\nb"), "info.host"),
        (_info(host=7), "info.host"),
        (_info(pid=0), "info.pid"),
        (_info(pid="1"), "info.pid"),
        (_info(pid=True), "info.pid"),
        (_info(version=...), "info.version"),
        (_info(version="\x1b[31m"), "info.version"),
        (_info(queues=[]), "info.queues"),
        (_info(queues="jobs"), "info.queues"),
        (_info(queues=[f"q{i}" for i in range(65)]), "info.queues"),
        (_info(queues=["bad name!"]), "queue"),
        (_info(concurrency=0), "info.concurrency"),
        (_info(concurrency=100_001), "info.concurrency"),
        (_info(pool=""), "info.pool"),
        (_info(pool=None), "info.pool"),
        (_info(in_flight=-1), "info.in_flight"),
        (_info(in_flight=1.5), "info.in_flight"),
        (_info(heartbeat=0.0), "info.heartbeat"),
        (_info(heartbeat=math.inf), "info.heartbeat"),
        (_info(heartbeat="10"), "info.heartbeat"),
        (_info(heartbeat=...), "info.heartbeat"),
    ],
)
def test_bad_info_is_refused_with_a_clear_error(info, message):
    with pytest.raises(InvalidRequest, match=message):
        checked_report({"reporter": "r", "seq": 1, "queues": {}, "info": info})


def test_recorder_with_info_reports_every_heartbeat_and_the_store_ages_it_out():
    now = [100.0]
    store = Store(clock=lambda: now[0])
    in_flight = [2]
    rec = Recorder(lambda: consumer_info(["jobs"], 2, "thread", in_flight[0], 1.0))

    class Client:
        def report(self, report):
            c = checked_report(report)
            return store.add("queuekit-worker", c.reporter, c.seq, c.queues, c.info)

    assert rec.send(Client()) is True  # nothing handled yet: an info-only report all the same
    assert store.snapshot().consumers == {}  # and no per-consumer series for it
    [seen] = store.consumers(10)
    assert seen["pid"] == os.getpid() and seen["version"] == __version__ and seen["in_flight"] == 2
    assert seen["session"] == "queuekit-worker" and seen["last_heartbeat_age"] == 0
    now[0] += 2.0
    in_flight[0] = 0
    rec.observe("jobs", "ok", 0.1, 0.1)
    assert rec.send(Client()) is True
    assert store.consumers(10)[0]["in_flight"] == 0 and store.snapshot().queues["jobs"].outcomes["ok"] == 1
    now[0] += 2.9  # within 3 heartbeats of 1 s
    assert store.consumers(10)[0]["last_heartbeat_age"] == pytest.approx(2.9)
    now[0] += 0.2
    assert store.consumers(10) == []


def test_a_resent_report_refreshes_the_info_without_counting_twice():
    store = Store()
    rec = Recorder(lambda: consumer_info(["q"], 1, "process", 1, 1.0))
    rec.observe("q", "ok", 0.1, 0.1)
    first = rec.next_report()
    c = checked_report(first)
    assert store.add("w", c.reporter, c.seq, c.queues, c.info) is True
    c = checked_report(rec.next_report())  # the answer was lost: the same seq again
    assert store.add("w", c.reporter, c.seq, c.queues, c.info) is False
    assert store.snapshot().queues["q"].outcomes["ok"] == 1 and store.consumers(5)[0]["pool"] == "process"
    rec.acknowledged(first)  # the first copy's answer arrives: the one pending is the same report
    assert rec.next_report()["seq"] == c.seq + 1
