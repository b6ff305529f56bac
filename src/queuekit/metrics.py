"""``/metrics``: the Prometheus text exposition format (0.0.4) of the server's state.

One job: turn what the server knows (the ``/stats`` object, the consumers' reports, this
process) into metric families. Names follow Prometheus' conventions: a ``queuekit_`` prefix,
base units in the name (``_seconds``, ``_bytes``), ``_total`` on counters, a ``# HELP`` and
``# TYPE`` line per family, every family written once. Series that must exist before anything
happened (refusal reasons, outcomes) are written at 0, so ``rate()`` and alerts see them from the
first scrape.

The process metrics use the names Prometheus' own client libraries use (``process_*``), read from
``/proc`` with the standard library; on a system without ``/proc`` the ones that need it are left
out rather than reported wrong.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from . import __version__
from .consumer_metrics import BUCKETS, OUTCOMES, Histogram, Reported
from .leader import STEPDOWN_REASONS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

GAUGES = (
    ("ready", "Tasks waiting to be delivered."),
    ("inflight", "Tasks leased to consumers and not yet acknowledged."),
    ("delayed", "Tasks waiting for their retry backoff to elapse."),
    ("dead", "Tasks in the dead-letter list."),
)
COUNTERS = (
    ("enqueued", "Tasks put since the server started."),
    ("acked", "Tasks acknowledged since the server started."),
    ("nacked", "Negative acknowledgements since the server started."),
    ("redelivered", "Leases that expired (task handed out again) since the server started."),
    ("dead_lettered", "Tasks moved to the dead-letter list since the server started."),
)

# Why the server closes a connection before authenticating it (server.QueuekitServer.refused):
# listed so that every series exists from the start, at 0.
REFUSAL_REASONS = (
    "max_connections",
    "max_handshakes",
    "max_handshakes_per_address",
    "auth_failures",
    "handshake_timeout",
)


class Sample(NamedTuple):
    """One line of a family: ``suffix`` is appended to the family name (``_bucket``, ``_sum``...)."""

    labels: tuple[tuple[str, str], ...]
    value: float | int
    suffix: str = ""


def family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> list[str]:
    """The lines of one metric family: HELP, TYPE, then its samples."""
    lines = [f"# HELP {name} {_help(help_text)}", f"# TYPE {name} {kind}"]
    for s in samples:
        labels = ",".join(f'{k}="{label_value(v)}"' for k, v in s.labels)
        lines.append(
            f"{name}{s.suffix}{{{labels}}} {_number(s.value)}" if labels else f"{name}{s.suffix} {_number(s.value)}"
        )
    return lines


def render(stats: dict, reported: Reported | None = None) -> str:
    """The whole ``/metrics`` page. ``stats`` is the (bounded) ``/stats`` object; ``reported``
    what consumers reported, listed only for the queues ``stats`` lists (same bound).

    A standby (``"role": "standby"``) holds no queues: its page has no queue families and no
    consumer-reported ones, only the server's, the leadership's, build and process families."""
    standby = stats.get("role") == "standby"
    lines = [] if standby else _queue_families(stats["queues"])
    lines += _server_families(stats, standby)
    lines += _leadership_families(stats)
    if reported is not None and not standby:
        lines += _reported_families(reported, set(stats["queues"]))
    lines += build_info()
    lines += process_families()
    return "\n".join(lines) + "\n"


def _queue_families(queues: dict) -> list[str]:
    names = sorted(queues)
    lines: list[str] = []
    for key, help_text in GAUGES:
        lines += family(f"queuekit_tasks_{key}", "gauge", help_text, (Sample(_q(q), queues[q][key]) for q in names))
    for key, help_text in COUNTERS:
        lines += family(
            f"queuekit_tasks_{key}_total", "counter", help_text, (Sample(_q(q), queues[q][key]) for q in names)
        )
    lines += family(
        "queuekit_gets_waiting",
        "gauge",
        "Gets parked on the server until a task is ready.",
        (Sample(_q(q), queues[q]["waiting"]) for q in names),
    )
    lines += family(
        "queuekit_queue_oldest_ready_age_seconds",
        "gauge",
        "Seconds since the task next in line (the front of the ready list) was enqueued; 0 when none is ready.",
        (Sample(_q(q), queues[q].get("oldest_ready_age_seconds", 0.0)) for q in names),
    )
    return lines


def _server_families(stats: dict, standby: bool) -> list[str]:
    refused = {**dict.fromkeys(REFUSAL_REASONS, 0), **stats.get("connections_refused", {})}
    omitted = family(
        "queuekit_queues_omitted",
        "gauge",
        "Queues left out of /metrics and /stats (QUEUEKIT_HTTP_MAX_QUEUES).",
        [Sample((), stats.get("omitted", 0))],
    )
    return [
        *([] if standby else omitted),
        *family("queuekit_connections", "gauge", "Open client connections.", [Sample((), stats["connections"])]),
        *family(
            "queuekit_durable", "gauge", "1 when tasks are journaled to disk.", [Sample((), int(stats["durable"]))]
        ),
        *family(
            "queuekit_journal_commits_total",
            "counter",
            "Journal transactions committed (group commits: many puts each).",
            [Sample((), stats["journal_commits"])],
        ),
        *family(
            "queuekit_auth_failures_total",
            "counter",
            "Handshakes refused because the peer's key did not match.",
            [Sample((), stats.get("auth_failures", 0))],
        ),
        *family(
            "queuekit_connections_refused_total",
            "counter",
            "Connections closed before authentication, by reason.",
            (Sample((("reason", r),), n) for r, n in sorted(refused.items())),
        ),
        *family(
            "queuekit_tls_handshakes_total",
            "counter",
            "TLS handshakes completed on the queue port.",
            [Sample((), stats.get("tls_handshakes", 0))],
        ),
        *family(
            "queuekit_tls_handshake_failures_total",
            "counter",
            "TLS handshakes that failed on the queue port, by reason (a fixed set: server.TLS_FAILURE_REASONS).",
            (Sample((("reason", r),), n) for r, n in sorted(stats.get("tls_handshake_failures", {}).items())),
        ),
        *family("queuekit_ready", "gauge", "1 when the server accepts work.", [Sample((), int(stats["ready"]))]),
        *family(
            "queuekit_uptime_seconds",
            "gauge",
            "Seconds since the server started.",
            [Sample((), stats["uptime_seconds"])],
        ),
    ]


def _leadership_families(stats: dict) -> list[str]:
    """Only with a shared journal (``stats["leadership"]``); a single server has none."""
    leadership = stats.get("leadership")
    if leadership is None:
        return []
    stepdowns = {**dict.fromkeys(STEPDOWN_REASONS, 0), **leadership["stepdowns"]}
    return [
        *family(
            "queuekit_leader",
            "gauge",
            "1 while this server leads the shared journal (a term whose lease has not passed), 0 as a standby.",
            [Sample((), int(leadership["leader"]))],
        ),
        *family(
            "queuekit_leader_elections_total",
            "counter",
            "Leadership terms this server won since it started.",
            [Sample((), leadership["elections"])],
        ),
        *family(
            "queuekit_leader_stepdowns_total",
            "counter",
            "Leadership terms this server stepped down from, by reason (a fixed set: leader.STEPDOWN_REASONS).",
            (Sample((("reason", r),), n) for r, n in sorted(stepdowns.items())),
        ),
        *family(
            "queuekit_journal_connected",
            "gauge",
            "1 while this server holds a working session to the shared journal (leading, or campaigning with it), "
            "0 while it cannot open one (it can neither lead nor take over).",
            [Sample((), int(leadership["journal_connected"]))],
        ),
        *family(
            "queuekit_journal_open_failures_total",
            "counter",
            "Attempts to open a new session to the shared journal that failed (database unreachable, login refused).",
            [Sample((), leadership["journal_open_failures"])],
        ),
    ]


def _reported_families(reported: Reported, listed: set[str]) -> list[str]:
    queues = {q: v for q, v in reported.queues.items() if q in listed}
    names = sorted(queues)
    lines = family(
        "queuekit_tasks_processed_total",
        "counter",
        "Tasks handled by consumers, by outcome (ok, failed, timeout), as the consumers reported them.",
        (Sample((("queue", q), ("outcome", o)), queues[q].outcomes.get(o, 0)) for q in names for o in OUTCOMES),
    )
    lines += family(
        "queuekit_task_duration_seconds",
        "histogram",
        "Handler run time of a task, as the consumers reported it.",
        (s for q in names for s in _histogram(_q(q), queues[q].duration)),
    )
    lines += family(
        "queuekit_task_wait_seconds",
        "histogram",
        "Time from a task's enqueue to the start of its handler (includes retry delays), as the consumers reported it.",
        (s for q in names for s in _histogram(_q(q), queues[q].wait)),
    )
    lines += family(
        "queuekit_consumer_tasks_processed_total",
        "counter",
        "Tasks handled per consumer (client name) and outcome; consumers past the cap are summed as other.",
        (
            Sample((("consumer", c), ("outcome", o)), counts.get(o, 0))
            for c, counts in sorted(reported.consumers.items())
            for o in OUTCOMES
        ),
    )
    lines += family(
        "queuekit_consumer_reports_total",
        "counter",
        "Reports received from consumers (a duplicate of a report already counted is dropped, not counted).",
        [Sample((), reported.reports)],
    )
    return lines


def _histogram(labels: tuple[tuple[str, str], ...], h: Histogram) -> Iterator[Sample]:
    cumulative = 0
    for bound, n in zip((*BUCKETS, float("inf")), h.counts, strict=True):
        cumulative += n
        yield Sample((*labels, ("le", _le(bound))), cumulative, "_bucket")
    yield Sample(labels, h.total, "_sum")
    yield Sample(labels, cumulative, "_count")


def build_info() -> list[str]:
    return family(
        "queuekit_build_info",
        "gauge",
        "Always 1; the labels say which queuekit and Python serve.",
        [Sample((("version", __version__), ("python", platform.python_version())), 1)],
    )


def process_families() -> list[str]:
    """The server process' CPU, memory, descriptors and start time (Prometheus' standard names)."""
    times = os.times()
    lines = family(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        [Sample((), round(times.user + times.system, 3))],
    )
    proc = read_proc()
    if proc.resident_bytes is not None:
        lines += family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            [Sample((), proc.resident_bytes)],
        )
    if proc.virtual_bytes is not None:
        lines += family(
            "process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", [Sample((), proc.virtual_bytes)]
        )
    if proc.open_fds is not None:
        lines += family("process_open_fds", "gauge", "Number of open file descriptors.", [Sample((), proc.open_fds)])
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        lines += family("process_max_fds", "gauge", "Maximum number of open file descriptors.", [Sample((), soft)])
    if proc.start_time_seconds is not None:
        lines += family(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            [Sample((), proc.start_time_seconds)],
        )
    return lines


class ProcStats(NamedTuple):
    """What ``/proc`` says about this process; None where it could not be read."""

    resident_bytes: int | None
    virtual_bytes: int | None
    open_fds: int | None
    start_time_seconds: float | None


def read_proc(proc: str = "/proc") -> ProcStats:
    page = os.sysconf("SC_PAGE_SIZE")
    resident = virtual = fds = None
    start = None
    try:
        with open(f"{proc}/self/statm") as f:
            size, rss = f.read().split()[:2]
        virtual, resident = int(size) * page, int(rss) * page
    except (OSError, ValueError):
        pass
    try:
        fds = len(os.listdir(f"{proc}/self/fd"))
    except OSError:
        pass
    try:
        # Field 22 of /proc/self/stat: start time in clock ticks after boot. The command name
        # (field 2) may hold spaces and parentheses, so count from its closing parenthesis.
        with open(f"{proc}/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()
        ticks = int(after_name[19])
        # Seconds since boot now, minus then: /proc/stat's btime is whole seconds and drifts from
        # the wall clock (seconds off on a long-running host), so it is not used.
        with open(f"{proc}/uptime") as f:
            uptime = float(f.read().split()[0])
        start = round(time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK")), 2)
    except (OSError, ValueError, IndexError):
        pass
    return ProcStats(resident, virtual, fds, start)


def label_value(value: str) -> str:
    """A label value escaped as the text format wants (backslash, double quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _q(queue: str) -> tuple[tuple[str, str], ...]:
    return (("queue", queue),)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _number(value: float | int) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return repr(float(value))
