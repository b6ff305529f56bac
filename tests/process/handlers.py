"""Handlers the process tests run inside real ``queuekit consume`` processes.

``record`` appends ``start <pid> <n>`` before and ``done <pid> <n>`` after the work to the file
named by $QK_RECORD (one short O_APPEND write per line, so lines from several processes do not
interleave). The work is ``payload["ms"]`` of sleep; with $QK_HANG set it sleeps for ten minutes
instead (a consumer that will be killed mid-task).
"""

import os
import time


def _note(what: str, payload) -> None:
    n = payload.get("n") if isinstance(payload, dict) else payload
    fd = os.open(os.environ["QK_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{what} {os.getpid()} {n}\n".encode())
    finally:
        os.close(fd)


def record(payload):
    _note("start", payload)
    if os.environ.get("QK_HANG"):
        time.sleep(600)
    ms = payload.get("ms", 0) if isinstance(payload, dict) else 0
    if ms:
        time.sleep(ms / 1000)
    _note("done", payload)


def always_fail(payload):
    raise RuntimeError(f"handler refuses {payload!r}")


def read_record(path):
    """[(what, pid, n)] from a record file."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            what, pid, n = line.split()
            out.append((what, int(pid), int(n) if n.lstrip("-").isdigit() else n))
    return out


# -- task lifecycle (tests/process/test_worker_lifecycle.py) ---------------------------------------


def sleepy(payload):
    """Record start, sleep payload["s"] seconds, record done; returns this process's pid (the
    process pool's child: the tests see which child ran it)."""
    _note("start", payload)
    if payload.get("crash"):
        os._exit(3)
    time.sleep(payload.get("s", 0))
    _note("done", payload)
    return os.getpid()


def with_context(payload, ctx):
    """Two parameters: gets the context. Fails the first attempt when asked (to see attempt 2)."""
    import queuekit

    _note(f"ctx-{ctx.queue}", payload)
    if payload.get("fail_first") and ctx.attempt == 1:
        raise RuntimeError("first attempt fails on purpose")
    return {
        "id": ctx.id,
        "queue": ctx.queue,
        "attempt": ctx.attempt,
        "delivery": ctx.delivery,
        "enqueued_at": ctx.enqueued_at,
        "deadline": ctx.deadline,
        "headers": dict(ctx.headers),
        "same_as_current_task": queuekit.current_task() is ctx,
    }


def via_current_task(payload):
    """One parameter: reads the context through queuekit.current_task()."""
    import queuekit

    ctx = queuekit.current_task()
    return {"id": ctx.id, "attempt": ctx.attempt, "headers": dict(ctx.headers)}


def bad_result(payload):
    """Returns what cannot be a result: a set, or a string longer than the server's limit."""
    if payload.get("big"):
        return "x" * payload["big"]
    return {1, 2, 3}


def until_cancelled(payload, ctx):
    """Waits (bounded) for ctx.cancelled, then records it."""
    _note("start", payload)
    deadline = time.monotonic() + 60
    while not ctx.cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    _note("cancelled" if ctx.cancelled else "not-cancelled", payload)
    return "stopped early"


def until_file(payload):
    """Notes ``start``, holds its seat until the file ``payload["file"]`` exists (bounded), then
    returns ``n``."""
    _note("start", payload)
    deadline = time.monotonic() + 60
    while not os.path.exists(payload["file"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return payload["n"]


def parked_gets(payload):
    """Returns how many gets are parked on the server for the task's queue while it runs (read
    from /stats on ``payload["http"]``, the server's HTTP port)."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{payload['http']}/stats", timeout=10) as r:
        return json.load(r)["queues"][payload["queue"]]["waiting"]
