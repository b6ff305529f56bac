"""The consumer's health file and the probes that read it (``queuekit consume --probe live|ready``).

A consumer has no port of its own. Its monitor thread writes one small JSON file
(``QUEUEKIT_HEALTH_FILE``) about once a second, replaced atomically; the probes are separate
processes (Kubernetes exec probes, Docker HEALTHCHECK) that read it:

- *live*: the consumer itself can make progress. It fails when the file is stale (the monitor
  thread, or the whole process, stopped), when abandoned handler threads (timed out, cannot be
  killed) reached the concurrency, when a worker thread died, or when a running task is past its
  timeout by more than a margin and nothing freed its seat. It does NOT depend on the server: a
  server outage must not restart every consumer.
- *ready*: the consumer is connected: its last call to the server succeeded and none has been
  waiting for longer than its server-side wait plus a slack.
"""

from __future__ import annotations

import json
import os
import time
from typing import NamedTuple

from .errors import ExitCode, QueuekitError

STALE_SECONDS = 30.0  # a file older than this: the consumer's monitor is not running


class HealthUnknown(QueuekitError):
    """The health file is missing or unreadable: no consumer reports here (a failing probe)."""

    exit_code = ExitCode.UNAVAILABLE


class ConsumerHealth(NamedTuple):
    pid: int
    written_at: float  # time.time()
    live: bool
    ready: bool
    reason: str  # why not live / not ready; "" when both hold


def write(path: str, health: ConsumerHealth) -> None:
    """Replace ``path`` atomically (write a temporary file, rename over): a probe never reads half."""
    tmp = f"{path}.{health.pid}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(health._asdict(), f)
    os.replace(tmp, path)


def read(path: str) -> ConsumerHealth:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return ConsumerHealth(**{field: data[field] for field in ConsumerHealth._fields})
    except FileNotFoundError:
        raise HealthUnknown(
            f"no consumer health file at {path}: the consumer has not started (or runs elsewhere)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HealthUnknown(f"consumer health file {path} is unreadable: {type(e).__name__}: {e}") from None


def verdict(health: ConsumerHealth, which: str, now: float | None = None) -> tuple[bool, str]:
    """(ok, one-line explanation) of probe ``which`` ("live" or "ready") for ``health``."""
    age = (time.time() if now is None else now) - health.written_at
    if age > STALE_SECONDS:
        return False, f"consumer pid {health.pid} has not updated its health for {age:.0f} s (stuck or gone)"
    ok = health.live if which == "live" else health.ready and health.live
    state = "ok" if ok else f"failing: {health.reason}"
    return ok, f"{which} {state} pid={health.pid}"
