"""A handler module for tests/process/test_tracing_e2e.py, run inside a real ``queuekit consume``.

At import it configures OpenTelemetry's SDK in the consumer process with the in-memory exporter
(queuekit itself never configures one); at exit it writes the finished spans as JSON lines to
$QK_SPANS for the test to read."""

import atexit
import json
import os

from metrics_handlers import work  # noqa: F401 (the handler: sleeps, fails on demand)
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

_exporter = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(_exporter))
trace.set_tracer_provider(_provider)


def _dump() -> None:
    with open(os.environ["QK_SPANS"], "w") as f:
        for span in _exporter.get_finished_spans():
            parent = span.parent
            f.write(
                json.dumps(
                    {
                        "name": span.name,
                        "kind": span.kind.name,
                        "trace_id": span.context.trace_id,
                        "span_id": span.context.span_id,
                        "parent_span_id": parent.span_id if parent else None,
                        "status": span.status.status_code.name,
                        "attributes": dict(span.attributes or {}),
                        "events": [e.name for e in span.events],
                    }
                )
                + "\n"
            )


atexit.register(_dump)
