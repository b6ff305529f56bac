"""W3C trace context across the queue, when OpenTelemetry's API is installed.

With ``opentelemetry-api`` in use (the optional extra ``queuekit[otel]``), a producer's put
carries the current trace context in the task's headers (``traceparent``, ``tracestate``: W3C
Trace Context, through OpenTelemetry's configured propagator), under a short ``PRODUCER`` span
``<queue> publish``; a consumer runs each handler call inside a ``CONSUMER`` span
``<queue> process`` whose parent is that context, so one trace goes from the request that put the
task to the handler that ran it, across processes and hosts. A failing handler's span records the
exception and has status ERROR.

queuekit never imports OpenTelemetry itself: it acts once the application has imported the API
(setting a tracer provider does, as do auto-instrumentation and instrumented frameworks), so an
install without the extra, or with it but unused, pays a dictionary lookup per put and per task.
With the API imported but no tracer provider set, nothing is done either (no no-op spans: they
cost a consumer tens of microseconds a task). What gets exported
(and where) is the application's choice: queuekit never configures an SDK or an exporter.

Attributes follow OpenTelemetry's messaging conventions: ``messaging.system`` = ``queuekit``,
``messaging.destination.name`` (the queue), ``messaging.operation.type`` (``send`` /
``process``), ``messaging.message.id`` (the task id) and ``messaging.queuekit.attempt``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

TRACER_NAME = "queuekit"
SYSTEM = "queuekit"
CONTEXT_HEADERS = ("traceparent", "tracestate")

_api: Any = None  # None: the application has not imported OpenTelemetry (yet); else the modules
_NOTHING = contextlib.nullcontext()  # reusable: enters and exits doing nothing


def _otel() -> Any:
    """OpenTelemetry's ``propagate`` and ``trace`` modules once the application has imported the
    API (configuring a tracer provider does, so do auto-instrumentation and instrumented
    frameworks), else None. queuekit never imports it first: the import takes most of a second,
    which a `queuekit produce` or a consumer's first task should not pay when nobody traces
    (and without an imported API there is no span to continue and no provider to record one)."""
    global _api
    if _api is None:
        trace = sys.modules.get("opentelemetry.trace")
        if trace is None:
            return None
        from opentelemetry import propagate

        _api = (propagate, trace)
    return _api


_provider_set = False  # once the application sets a tracer provider it stays set
_unset_seen_at = float("-inf")  # monotonic time the provider was last seen unset
RECHECK_SECONDS = 1.0


def _configured(trace: Any, cached: bool = False) -> bool:
    """Whether the application set a tracer provider. Until it does, the API hands out its proxy,
    whose spans are no-ops: skipping them keeps a consumer's per-task cost near zero (a no-op span
    costs tens of microseconds, and even asking the API costs an environment lookup). ``cached``
    (per task): an unset provider is asked about again only after ``RECHECK_SECONDS``."""
    global _provider_set, _unset_seen_at
    if _provider_set:
        return True
    now = time.monotonic()
    if cached and now - _unset_seen_at < RECHECK_SECONDS:
        return False
    _provider_set = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    if not _provider_set:
        _unset_seen_at = now
    return _provider_set


def available() -> bool:
    """Whether the application has imported OpenTelemetry's API (see :func:`_otel`)."""
    return _otel() is not None


def inject(queue: str, headers: Mapping[str, str] | None) -> dict[str, str] | None:
    """The headers a put sends: ``headers`` plus the trace context of a ``<queue> publish`` span
    started (and ended) here as a child of the current span. Unchanged without OpenTelemetry or
    when no tracer provider is configured; a caller's own ``traceparent`` is kept."""
    api = _otel()
    if not api:
        return None if headers is None else dict(headers)
    propagate, trace = api
    if not _configured(trace):
        return None if headers is None else dict(headers)
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


def process(task: Any, failed: list | None = None) -> contextlib.AbstractContextManager[Any]:
    """Around one handler call: a ``<queue> process`` span continuing the trace in the task's
    headers (a new trace when there is none). An exception is recorded, the status set to ERROR,
    and the exception goes on. ``failed``: the worker's list of ``(task, delay, error)`` nacks; a
    run that added this task to it without raising here (a process-pool child) is an error too."""
    api = _otel()
    if not api or not _configured(api[1], cached=True):
        return _NOTHING
    return _process(api, task, failed)


@contextlib.contextmanager
def _process(api: Any, task: Any, failed: list | None) -> Iterator[None]:
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
