"""The worker's small parts: handler signature detection, the task context, result checks, the
consumer's health verdicts, the consume settings (queue lists, timeout, pool)."""

import threading
import time

import pytest

import queuekit
from queuekit import probe
from queuekit.context import Seat, TaskHost, bind_seat, takes_context
from queuekit.errors import ConfigError
from queuekit.message import Task
from queuekit.settings import WorkerSettings
from queuekit.worker import check_result


def test_takes_context_counts_required_positional_parameters():
    def one(payload): ...
    def two(payload, ctx): ...
    def defaulted(payload, retries=3): ...
    def star(*args): ...

    class Handler:
        def __call__(self, payload, ctx): ...

        def method(self, payload): ...

    assert not takes_context(one)
    assert takes_context(two)
    assert not takes_context(defaulted)  # an optional second parameter keeps getting nothing
    assert not takes_context(star)
    assert takes_context(Handler())
    assert not takes_context(Handler().method)
    assert not takes_context(len)  # a builtin: payload only


def _task(**fields):
    base = dict(queue="q", id=7, delivery=3, attempts=1, payload={"a": 1}, enqueued_at=1000.0)
    base.update(fields)
    return Task(**base)


class _Host(TaskHost):
    def __init__(self):
        self.cancelled = set()
        self.extended = []

    def is_cancelled(self, task_id):
        return task_id in self.cancelled

    def extend(self, task, seconds):
        self.extended.append((task.id, seconds))
        return True


def test_context_fields_and_current_task_in_the_seats_thread_only():
    host = _Host()
    seat = Seat(host, lambda task: 10.0)
    task = _task()
    seat.current = (task, time.monotonic())
    bind_seat(seat)
    try:
        ctx = queuekit.current_task()
        assert (ctx.id, ctx.queue, ctx.attempt, ctx.delivery, ctx.enqueued_at) == (7, "q", 2, 3, 1000.0)
        assert abs(ctx.deadline - (time.time() + 10)) < 1
        assert dict(ctx.headers) == {}
        assert queuekit.current_task() is ctx  # built once per task
        assert not ctx.cancelled
        host.cancelled.add(7)
        assert ctx.cancelled
        assert ctx.extend(5) and host.extended == [(7, 5)]
        errors = []
        thread = threading.Thread(target=lambda: _catch(errors, queuekit.current_task))
        thread.start()
        thread.join()
        assert isinstance(errors[0], queuekit.NoTaskContext)  # another thread has no task
        seat.current = None
        with pytest.raises(queuekit.NoTaskContext, match="outside a running handler"):
            queuekit.current_task()
    finally:
        bind_seat(None)
    with pytest.raises(queuekit.NoTaskContext, match="outside a queuekit handler"):
        queuekit.current_task()


def _catch(errors, call):
    try:
        call()
    except Exception as e:
        errors.append(e)


def test_context_headers_are_read_only_and_no_timeout_means_no_deadline():
    seat = Seat(TaskHost(), lambda task: None)
    seat.current = (_task(), time.monotonic())
    ctx = seat.context()
    assert ctx.deadline is None
    if "headers" in Task._fields:  # the lifecycle wire carries headers with the task
        seat.current = (_task(headers={"k": "v"}), time.monotonic())
        ctx = seat.context()
        assert ctx.headers == {"k": "v"}
        with pytest.raises(TypeError):
            ctx.headers["k"] = "w"  # type: ignore[index]


def test_check_result_names_the_problem():
    assert check_result(None, 10) is None
    assert check_result({"ok": [1, 2.5, "x"]}, 100) is None
    assert "got set" in check_result({1}, 100)
    assert "tuple" in check_result((1, 2), 100)
    assert "NaN" in check_result(float("nan"), 100) or "JSON" in check_result(float("nan"), 100)
    too_big = check_result("é" * 60, 100)
    assert too_big.startswith("unencodable result") and "122 bytes" in too_big and "limit is 100" in too_big


def test_health_verdicts():
    now = 1_000_000.0
    fine = probe.ConsumerHealth(pid=1, written_at=now, live=True, ready=True, reason="")
    assert probe.verdict(fine, "live", now) == (True, "live ok pid=1")
    assert probe.verdict(fine, "ready", now)[0]
    down = fine._replace(ready=False, reason="not connected to the server")
    assert probe.verdict(down, "live", now)[0]  # the server being down is not the consumer's fault
    assert probe.verdict(down, "ready", now) == (False, "ready failing: not connected to the server pid=1")
    stuck = fine._replace(live=False, reason="2 abandoned handler threads")
    assert not probe.verdict(stuck, "live", now)[0] and not probe.verdict(stuck, "ready", now)[0]
    stale = fine._replace(written_at=now - probe.STALE_SECONDS - 1)
    ok, message = probe.verdict(stale, "live", now)
    assert not ok and "has not updated its health" in message


def test_health_file_round_trip_and_missing(tmp_path):
    path = str(tmp_path / "h")
    with pytest.raises(probe.HealthUnknown, match="no consumer health file"):
        probe.read(path)
    health = probe.ConsumerHealth(pid=5, written_at=1.5, live=True, ready=False, reason="x")
    probe.write(path, health)
    assert probe.read(path) == health
    (tmp_path / "h").write_text("{not json")
    with pytest.raises(probe.HealthUnknown, match="unreadable"):
        probe.read(path)


def _settings(tmp_path, **env):
    key = tmp_path / "key"
    key.write_text("k" * 40)
    return WorkerSettings.load({}, {"QUEUEKIT_HANDLER": "m:f", "QUEUEKIT_AUTHKEY_FILE": str(key), **env})


def test_worker_settings_defaults_and_queue_lists(tmp_path):
    s = _settings(tmp_path)
    assert (s.queues, s.task_timeout, s.pool, s.health_file) == (("tasks",), 600.0, "thread", None)
    s = _settings(tmp_path, QUEUEKIT_QUEUE=" high, default ,low", QUEUEKIT_TASK_TIMEOUT="0", QUEUEKIT_POOL="Process")
    assert (s.queues, s.task_timeout, s.pool) == (("high", "default", "low"), 0.0, "process")
    assert _settings(tmp_path, QUEUEKIT_HEALTH_FILE="off").health_file is None
    assert _settings(tmp_path, QUEUEKIT_HEALTH_FILE="/tmp/h").health_file == "/tmp/h"
    for bad, message in [
        ({"QUEUEKIT_QUEUE": "a,,b"}, "empty queue name"),
        ({"QUEUEKIT_QUEUE": "a,b,a"}, "named twice"),
        ({"QUEUEKIT_QUEUE": "a,b c"}, "invalid queue name"),
        ({"QUEUEKIT_TASK_TIMEOUT": "-1"}, "QUEUEKIT_TASK_TIMEOUT"),
        ({"QUEUEKIT_POOL": "fibers"}, "must be one of thread, process"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _settings(tmp_path, **bad)
