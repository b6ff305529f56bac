"""One trace from a producer (this process, OpenTelemetry SDK with the in-memory exporter) through
a real server to a real ``queuekit consume`` process (the SDK configured by its handler module):
W3C trace context in the task headers, a consumer span per task continuing it, status ERROR on a
failing handler. Needs opentelemetry-sdk (requirements/dev.txt): skipped without it, except under
CI=true."""

from __future__ import annotations

import json
import os

import pytest

from support.procs import Proc, ServerProc, base_env, wait_until

pytestmark = pytest.mark.process

try:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
except ImportError:  # pragma: no cover - depends on the environment
    trace = None


@pytest.fixture
def exporter():
    """An SDK tracer provider with the in-memory exporter as the process' global one, for this
    test only: OpenTelemetry sets the global provider once per process, so it is reset afterwards
    the way OpenTelemetry's own test utilities do (private names, pinned version), or every later
    put in this pytest process would carry a traceparent."""
    if trace is None:
        if os.environ.get("CI") == "true":
            pytest.fail("opentelemetry-sdk is missing (pip install -r requirements/dev.txt)")
        pytest.skip("opentelemetry-sdk not installed")
    from opentelemetry.util._once import Once

    from queuekit import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    tracing._provider_set = False
    tracing._unset_seen_at = float("-inf")


def test_one_trace_from_producer_to_consumer(tmp_path, key_file, exporter):
    import queuekit

    server = ServerProc(tmp_path, key_file, "--max-attempts", "0")  # a failure is dead at once
    client = queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5)
    spans_file = tmp_path / "spans.jsonl"
    argv = ["consume", "--server", server.address, "--authkey-file", str(key_file)]
    argv += ["--handler", "otel_handlers:work", "--queue", "traced"]
    consumer = Proc("consumer", argv, tmp_path, base_env(QK_SPANS=str(spans_file)))
    consumer.wait_for("event=consumer_started")

    q = client.queue("traced")
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("checkout") as root:
        ok_id = q.put({"n": 1, "ms": 10}, headers={"tenant": "acme"})
        failed_id = q.put({"n": 2, "fail": True})
    untraced_id = client.call("put_many", "traced", ['{"n": 3}'])[0]  # raw call: no headers at all

    def settled():
        s = client.stats()["queues"].get("traced", {})
        return s.get("acked") == 2 and s.get("dead") == 1

    wait_until(settled, timeout=20, what="2 acked and 1 dead task")
    assert consumer.stop() == 0
    client.close()
    server.stop()

    mine = {s.name: s for s in exporter.get_finished_spans() if s.context.trace_id == root.get_span_context().trace_id}
    publish = [s for s in exporter.get_finished_spans() if s.name == "traced publish"]
    assert len(publish) == 2 and all(s.parent.span_id == root.get_span_context().span_id for s in publish)
    assert mine["traced publish"].kind == trace.SpanKind.PRODUCER
    assert mine["traced publish"].attributes["messaging.destination.name"] == "traced"

    spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
    process = {s["attributes"]["messaging.message.id"]: s for s in spans if s["name"] == "traced process"}
    assert set(process) == {str(ok_id), str(failed_id), str(untraced_id)}
    publish_ids = {s.context.span_id for s in publish}
    for task_id in (ok_id, failed_id):
        span = process[str(task_id)]
        assert span["trace_id"] == root.get_span_context().trace_id, "the consumer continues the producer's trace"
        assert span["parent_span_id"] in publish_ids
        assert span["kind"] == "CONSUMER"
        assert span["attributes"]["messaging.system"] == "queuekit"
        assert span["attributes"]["messaging.destination.name"] == "traced"
        assert span["attributes"]["messaging.queuekit.attempt"] == 1
    assert process[str(ok_id)]["status"] == "UNSET" and process[str(ok_id)]["events"] == []
    assert process[str(failed_id)]["status"] == "ERROR"
    assert process[str(failed_id)]["events"] == ["exception"]
    # A task put without headers starts a trace of its own in the consumer.
    untraced = process[str(untraced_id)]
    assert untraced["trace_id"] != root.get_span_context().trace_id and untraced["parent_span_id"] is None


def test_after_the_tracing_test_puts_carry_no_trace_context(tmp_path, server, client):
    """The reset above works: with no provider set, a put's headers are what the caller gave."""
    q = client.queue("plain")
    q.put({"n": 1}, headers={"a": "b"})
    (task,) = q.get_many(1, 5)
    assert task.headers == {"a": "b"}
