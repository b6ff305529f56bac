"""/metrics of a real server with real consumers, read with the official Prometheus text parser
(prometheus_client.parser, a pinned test dependency): types, units, consumer-reported histograms
and counters that only grow between two scrapes."""

from __future__ import annotations

import http.client
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from queuekit.consumer_metrics import BUCKETS
from queuekit.errors import InvalidRequest
from support.procs import Proc, ServerProc, base_env, wait_until

pytestmark = pytest.mark.process

OK_MS = 40  # what each successful handler sleeps: the duration histogram must say 0.04 s, not 40


def scrape(server) -> dict:
    """{family name: Metric} parsed by Prometheus' own parser (raises on anything it cannot read)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        body = r.read().decode()
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    finally:
        conn.close()
    families = {}
    for f in text_string_to_metric_families(body):
        assert f.name not in families, f"family {f.name} written twice"
        families[f.name] = f
    return families


def value(families, name, suffix="", **labels) -> float:
    for s in families[name].samples:
        if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError(f"{name}{suffix} {labels}")


def processed(server, queue) -> float:
    try:
        f = scrape(server)
        return sum(value(f, "queuekit_tasks_processed", "_total", queue=queue, outcome=o) for o in ("ok", "failed"))
    except KeyError:
        return 0


@pytest.fixture
def metrics_server(tmp_path, key_file):
    # --max-attempts 0: a failed task is dead at once (no retry waits in this test).
    proc = ServerProc(tmp_path, key_file, "--max-attempts", "0")
    yield proc
    proc.stop()


def start_consumer(tmp_path, server, key_file, name):
    argv = ["consume", "--server", server.address, "--authkey-file", str(key_file)]
    argv += ["--handler", "metrics_handlers:work", "--queue", "jobs", "--concurrency", "2", "--lease", "1"]
    proc = Proc(name, argv, tmp_path, base_env())
    proc.wait_for("event=consumer_started")
    return proc


def put_batch(client, ok: int, failing: int, start: int) -> None:
    q = client.queue("jobs")
    q.put_many([{"n": start + i, "ms": OK_MS} for i in range(ok)])
    q.put_many([{"n": start + ok + i, "fail": True} for i in range(failing)])


def test_metrics_parse_with_prometheus_parser_and_counters_only_grow(tmp_path, metrics_server, key_file):
    import queuekit

    server = metrics_server
    client = queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5)
    workers = [start_consumer(tmp_path, server, key_file, f"consumer{i}") for i in range(2)]
    put_batch(client, ok=20, failing=4, start=0)
    wait_until(lambda: processed(server, "jobs") == 24, timeout=30, what="24 reported tasks")
    first = scrape(server)

    # Types as Prometheus reads them (the parser strips _total from a counter's family name).
    kinds = {name: f.type for name, f in first.items()}
    for name in ("queuekit_task_duration_seconds", "queuekit_task_wait_seconds"):
        assert kinds[name] == "histogram", name
    for name in (
        "queuekit_tasks_processed",
        "queuekit_tasks_enqueued",
        "queuekit_consumer_tasks_processed",
        "process_cpu_seconds",
    ):
        assert kinds[name] == "counter", name
    for name in (
        "queuekit_tasks_ready",
        "queuekit_queue_oldest_ready_age_seconds",
        "queuekit_build_info",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ):
        assert kinds[name] == "gauge", name
    assert value(first, "queuekit_build_info", version=queuekit.__version__) == 1

    # Units: seconds and bytes, not milliseconds or kilobytes.
    ok = value(first, "queuekit_tasks_processed", "_total", queue="jobs", outcome="ok")
    assert ok == 20 and value(first, "queuekit_tasks_processed", "_total", queue="jobs", outcome="failed") == 4
    assert value(first, "queuekit_task_duration_seconds", "_count", queue="jobs") == 24
    duration_sum = value(first, "queuekit_task_duration_seconds", "_sum", queue="jobs")
    assert 20 * OK_MS / 1000 <= duration_sum < 20 * OK_MS / 1000 + 5, duration_sum
    assert value(first, "queuekit_task_duration_seconds", "_bucket", queue="jobs", le="0.025") <= 4
    assert value(first, "queuekit_task_duration_seconds", "_bucket", queue="jobs", le="+Inf") == 24
    assert value(first, "queuekit_task_wait_seconds", "_count", queue="jobs") == 24
    buckets = [s for s in first["queuekit_task_wait_seconds"].samples if s.name.endswith("_bucket")]
    assert len(buckets) == len(BUCKETS) + 1
    assert [s.value for s in buckets] == sorted(s.value for s in buckets)  # cumulative
    assert value(first, "process_resident_memory_bytes") > 5 * 1024 * 1024
    assert abs(value(first, "process_start_time_seconds") - time.time()) < 600
    per_consumer = [s for s in first["queuekit_consumer_tasks_processed"].samples if s.labels["outcome"] == "ok"]
    assert sum(s.value for s in per_consumer) == 20

    # More traffic: every counter, bucket, count and sum is at least what it was.
    put_batch(client, ok=10, failing=2, start=100)
    wait_until(lambda: processed(server, "jobs") == 36, timeout=30, what="36 reported tasks")
    second = scrape(server)
    grew = 0
    for name, f in first.items():
        if f.type not in ("counter", "histogram"):
            continue
        later = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in second[name].samples}
        for s in f.samples:
            now = later[(s.name, tuple(sorted(s.labels.items())))]
            assert now >= s.value, f"{s.name}{s.labels} went from {s.value} down to {now}"
            grew += now > s.value
    assert grew >= 10
    assert value(second, "queuekit_task_duration_seconds", "_count", queue="jobs") == 36
    for w in workers:
        assert w.stop() == 0
    client.close()


def test_bad_and_foreign_reports(tmp_path, server, client):
    with pytest.raises(InvalidRequest, match="bucket counts"):
        client.call("report", {"reporter": "r", "seq": 1, "queues": {"x": {"duration": [1]}}})
    counts = [0] * (len(BUCKETS) + 1)
    item = {"ok": 3, "duration": counts, "duration_sum": 0.0, "wait": counts, "wait_sum": 0.0}
    client.queue("real").put({"x": 1})
    assert client.call("report", {"reporter": "r", "seq": 1, "queues": {"real": item, "never-made": item}}) is True
    assert client.call("report", {"reporter": "r", "seq": 1, "queues": {"real": item}}) is False  # duplicate
    families = scrape(server)
    assert value(families, "queuekit_tasks_processed", "_total", queue="real", outcome="ok") == 3
    assert value(families, "queuekit_consumer_reports", "_total") == 1
    assert not any(s.labels.get("queue") == "never-made" for f in families.values() for s in f.samples)
