"""``queuekit produce``: JSON lines (or generated demo tasks) into a queue, in batches."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .client import Queue
from .errors import InputError, PayloadError
from .message import decode_payload, encode_payload


def read_json_lines(lines: Iterable[str], source: str, max_bytes: int) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, payload)``; blank lines are skipped. A bad line raises InputError."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = decode_payload(line)
            encode_payload(value, max_bytes)
        except (ValueError, PayloadError) as e:
            raise InputError(f"{source} line {number}: {e}") from None
        yield number, value


def generate(count: int, task_ms: int) -> Iterator[tuple[int, Any]]:
    for n in range(count):
        yield n + 1, {"n": n, "ms": task_ms}


def produce(
    queue: Queue,
    items: Iterator[tuple[int, Any]],
    *,
    batch: int = 100,
    rate: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Put everything ``items`` yields, ``batch`` per round trip, at most ``rate`` tasks/s;
    ``progress(count)`` after each round trip (the terminal's progress line).

    On a bad input line: what came before it is enqueued, then InputError says how many tasks
    were enqueued and that nothing from that line on was. Returns the number of tasks enqueued.
    """
    count = 0
    pending: list[Any] = []
    started = time.monotonic()

    def flush() -> None:
        nonlocal count, pending
        if pending:
            queue.put_many(pending)
            count += len(pending)
            pending = []
            if progress is not None:
                progress(count)
            if rate:
                ahead = count / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)

    step = max(1, min(batch, int(rate))) if rate else batch
    try:
        for _, payload in items:
            pending.append(payload)
            if len(pending) >= step:
                flush()
    except InputError as e:
        flush()
        raise InputError(f"{e}; {count} tasks from the lines before it were enqueued, none from it on") from None
    flush()
    return count
