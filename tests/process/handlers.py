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
