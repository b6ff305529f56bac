"""Example handlers, used by the demo stack and the tests.

``handle`` is what the consumer image runs by default (``QUEUEKIT_HANDLER=queuekit.examples:handle``):
it sleeps ``payload["ms"]`` milliseconds, logs one ``event=example_task`` line, and raises when
``payload["fail"]`` is true so retries and dead letters can be seen.
"""

from __future__ import annotations

import os
import time
from typing import Any

from . import logs

_log = logs.get("example")


class ExampleFailure(Exception):
    """Raised on purpose by ``handle`` for tasks marked ``"fail": true``."""


def handle(payload: Any) -> None:
    fields = payload if isinstance(payload, dict) else {}
    n = fields.get("n")
    ms = fields.get("ms", 0)
    if fields.get("fail"):
        raise ExampleFailure(f"example task n={n} asked to fail")
    if isinstance(ms, (int, float)) and ms > 0:
        time.sleep(ms / 1000)
    _log.info("example_task", n=n, ms=ms, pid=os.getpid())


def noop(payload: Any) -> None:
    """Does nothing: for throughput benchmarks."""


def answer(payload: Any) -> Any:
    """Returns a small value (the payload's ``n``): a result to store, for throughput benchmarks."""
    return payload.get("n") if isinstance(payload, dict) else payload
