"""W3C trace context across the queue, when OpenTelemetry's API is installed.

With ``opentelemetry-api`` importable (the optional extra ``queuekit[otel]``), a producer's put
carries the current trace context in the task's headers (``traceparent``, ``tracestate``: W3C
Trace Context, through OpenTelemetry's configured propagator), under a short ``PRODUCER`` span
``<queue> publish``; a consumer runs each handler call inside a ``CONSUMER`` span
``<queue> process`` whose parent is that context, so one trace goes from the request that put the
task to the handler that ran it, across processes and hosts. A failing handler's span records the
exception and has status ERROR.

Without the package nothing is imported and nothing is added: the first call finds out once,
later calls cost a global lookup. With the API but no SDK configured (no tracer provider), the
API's no-op tracer makes invalid spans and the propagator writes no headers. What gets exported
(and where) is the application's choice: queuekit never configures an SDK or an exporter.

Attributes follow OpenTelemetry's messaging conventions: ``messaging.system`` = ``queuekit``,
``messaging.destination.name`` (the queue), ``messaging.operation.type`` (``send`` /
``process``), ``messaging.message.id`` (the task id) and ``messaging.queuekit.attempt``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

TRACER_NAME = "queuekit"
SYSTEM = "queuekit"
CONTEXT_HEADERS = ("traceparent", "tracestate")

_api: Any = None  # None: not looked for yet; False: not installed; else the modules


def _otel() -> Any:
    global _api
    if _api is None:
        try:
            from opentelemetry import propagate, trace
        except ImportError:
            _api = False
        else:
            _api = (propagate, trace)
    return _api


def available() -> bool:
    """Whether ``opentelemetry-api`` is importable here."""
    return bool(_otel())


def inject(queue: str, headers: Mapping[str, str] | None) -> dict[str, str] | None:
    """The headers a put sends: ``headers`` plus the trace context of a ``<queue> publish`` span
    started (and ended) here as a child of the current span. Unchanged without OpenTelemetry or
    when no tracer provider is configured; a caller's own ``traceparent`` is kept."""
    api = _otel()
    if not api:
        return None if headers is None else dict(headers)
    propagate, trace = api
    carrier: dict[str, str] = {}
    span = trace.get_tracer(TRACER_NAME).start_span(
        f"{queue} publish",
        kind=trace.SpanKind.PRODUCER,
        attributes={
            "messaging.system": SYSTEM,
            "messaging.destination.name": queue,
            "messaging.operation.type": "send",
        },
    )
    try:
        propagate.inject(carrier, context=trace.set_span_in_context(span))
    finally:
        span.end()
    if not carrier:
        return None if headers is None else dict(headers)
    return {**carrier, **(headers or {})}


@contextlib.contextmanager
def process(task: Any, failed: list | None = None) -> Iterator[None]:
    """Around one handler call: a ``<queue> process`` span continuing the trace in the task's
    headers (a new trace when there is none). An exception is recorded, the status set to ERROR,
    and the exception goes on. ``failed``: the worker's list of ``(task, delay, error)`` nacks; a
    run that added this task to it without raising here (a process-pool child) is an error too."""
    api = _otel()
    if not api:
        yield
        return
    propagate, trace = api
    headers = getattr(task, "headers", None) or {}
    parent = propagate.extract({k: v for k, v in headers.items() if k in CONTEXT_HEADERS})
    attributes = {
        "messaging.system": SYSTEM,
        "messaging.destination.name": task.queue,
        "messaging.operation.type": "process",
        "messaging.message.id": str(task.id),
        "messaging.queuekit.attempt": task.attempts + 1,
    }
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        f"{task.queue} process", context=parent, kind=trace.SpanKind.CONSUMER, attributes=attributes
    ) as span:
        yield  # start_as_current_span records an exception and sets status ERROR before re-raising
        if failed and failed[-1][0] is task:
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(failed[-1][2])[:500]))
