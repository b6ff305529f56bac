"""Metrics that only consumers can measure, reported to the server on their heartbeat.

A consumer knows how long its handler ran, how long a task waited between its enqueue and the
start of its handler, and how the handler ended (``ok``, ``failed``, ``timeout``). The worker's
:class:`Recorder` accumulates these per queue into fixed-bucket histograms; every heartbeat it
sends the *delta* since its last acknowledged report (``Client.report``); the server's
:class:`Store` adds deltas up, so ``/metrics`` shows counters and histograms over all consumers
(per queue; per consumer only for a bounded number of consumers).

Why deltas with a sequence number: deltas merge by addition whatever the number of consumers and
however they come and go (a cumulative report would need the server to remember every consumer's
last value, and break when a consumer restarts). A report is retried until the server acknowledged
it, always with the same ``(reporter, seq)``; the server drops a report whose ``seq`` it has
applied already, so a retry after a lost answer is not counted twice, and an unacknowledged
report is never lost while the consumer lives. New observations wait for the next report.

Every report also carries the consumer's ``info`` (host, pid, version, queues, concurrency,
pool, in flight, heartbeat period): a snapshot, not a delta, sent with every heartbeat's report
(an idle consumer sends one with no queues). The server keeps the latest per reporter for the
dashboard's consumers table and forgets it once older than ``STALE_HEARTBEATS`` of the periods
the consumer said it beats at: a stopped consumer leaves the table by itself. A report without
``info`` (a consumer of an earlier version) is still applied.

Everything on the wire is plain ``dict``/``list``/``int``/``float``/``str`` (the transport
unpickles nothing else); :func:`checked_report` checks a report where it enters the server.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import threading
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from . import __version__, logs
from .errors import InvalidRequest, ServerUnavailable
from .message import check_queue_name

# Upper bounds in seconds of the histogram buckets (+Inf is implicit): from 5 ms to 10 min, for
# handlers from a cache lookup to a report build, and waits from "picked up at once" to a backlog.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
OUTCOMES = ("ok", "failed", "timeout")
MAX_REPORT_QUEUES = 256  # queues in one report
MAX_REPORTER_CHARS = 64
MAX_COUNT = 10**12  # per field of one report: far above any real delta, below float trouble
MAX_CONSUMER_SERIES = 50  # consumers with series of their own; the rest are summed as "other"
MAX_CONSUMER_LABEL = 64
MAX_REPORTERS_REMEMBERED = 4096  # (reporter -> last seq) entries kept for duplicate detection
OTHER = "other"
# The info part of a report: a snapshot of the consumer, bounded field by field.
MAX_INFO_TEXT = 253  # host (a DNS name's length), version, pool
MAX_INFO_QUEUES = 64  # queues one consumer takes from
MAX_INFO_KEYS = 32  # fields of a newer consumer's info beyond the known ones are ignored, to a bound
MAX_CONCURRENCY = 100_000
MIN_HEARTBEAT, MAX_HEARTBEAT = 0.05, 3600.0
STALE_HEARTBEATS = 3  # a consumer's info is dropped after this many of its heartbeat periods
_log = logs.get("consumer")
TIMEOUT_ERROR = "timeout"  # the worker's nack error for a run past its time limit (worker.TIMEOUT_ERROR)


def _bucket(seconds: float) -> int:
    """Index of the first bucket whose upper bound is >= ``seconds`` (bounds are inclusive)."""
    return bisect_left(BUCKETS, seconds)


@dataclass
class Histogram:
    """Counts per bucket (not cumulative; the last one is +Inf) and the sum of the observations."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.counts[_bucket(seconds)] += 1
        self.total += seconds

    def add(self, counts: list[int], total: float) -> None:
        for i, n in enumerate(counts):
            self.counts[i] += n
        self.total += total

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass
class QueueMetrics:
    """What consumers reported for one queue."""

    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    duration: Histogram = field(default_factory=Histogram)
    wait: Histogram = field(default_factory=Histogram)

    def to_wire(self) -> dict[str, Any]:
        return {
            **self.outcomes,
            "duration": list(self.duration.counts),
            "duration_sum": self.duration.total,
            "wait": list(self.wait.counts),
            "wait_sum": self.wait.total,
        }

    def add_wire(self, item: dict[str, Any]) -> None:
        for o in OUTCOMES:
            self.outcomes[o] += item[o]
        self.duration.add(item["duration"], item["duration_sum"])
        self.wait.add(item["wait"], item["wait_sum"])


@dataclass
class Reported:
    """A copy of the server's totals for ``/metrics``."""

    queues: dict[str, QueueMetrics]
    consumers: dict[str, dict[str, int]]
    reports: int


# -- worker side ---------------------------------------------------------------------------


class Recorder:
    """The worker's accumulator: ``observe`` from handler threads, ``send`` from the heartbeat."""

    def __init__(self, info: Callable[[], dict[str, Any]] | None = None) -> None:
        """``info``: the consumer's snapshot for every report (:func:`consumer_info`); with it a
        report goes out on every heartbeat, without it only when there is a delta."""
        self._info = info
        self._lock = threading.Lock()
        self._queues: dict[str, QueueMetrics] = {}
        self._reporter = secrets.token_hex(8)  # this process, for the server's duplicate check
        self._seq = 0
        self._pending: dict[str, Any] | None = None  # sent, not yet acknowledged: resent as it is
        self._refused = False  # the server refused the call itself: stop reporting

    def observe(self, queue: str, outcome: str, duration: float, wait: float) -> None:
        """One handled task: ``duration`` its handler's run time, ``wait`` start - enqueued_at."""
        with self._lock:
            q = self._queues.get(queue)
            if q is None:
                q = self._queues[queue] = QueueMetrics()
            q.outcomes[outcome] += 1
            q.duration.observe(duration)
            q.wait.observe(wait)

    @staticmethod
    def begin() -> tuple[float, float]:
        """When a task's run starts: (wall clock, monotonic) for :meth:`end`."""
        return time.time(), time.monotonic()

    def end(self, task: Any, begun: tuple[float, float], failed: list, abandoned: Any = None) -> None:
        """A task's run ended; the worker's outcome lists say how: ``timeout`` when the worker
        gave up on it (``abandoned`` is the task, or its nack error is ``timeout``), ``failed``
        when it is the last entry of ``failed`` (``(task, delay, error)``), else ``ok``.
        On every task of a consumer: kept to a few attribute lookups and one lock round."""
        duration = time.monotonic() - begun[1]
        if abandoned is task:
            outcome = "timeout"
        elif failed and failed[-1][0] is task:
            outcome = "timeout" if failed[-1][2] == TIMEOUT_ERROR else "failed"
        else:
            outcome = "ok"
        wait = max(0.0, begun[0] - task.enqueued_at)
        with self._lock:
            q = self._queues.get(task.queue)
            if q is None:
                q = self._queues[task.queue] = QueueMetrics()
            q.outcomes[outcome] += 1
            h = q.duration
            h.counts[bisect_left(BUCKETS, duration)] += 1
            h.total += duration
            h = q.wait
            h.counts[bisect_left(BUCKETS, wait)] += 1
            h.total += wait

    def next_report(self) -> dict[str, Any] | None:
        """The report to send now: the unacknowledged one again, else the delta since the last
        (None when there is nothing to report), with the consumer's info as it is now."""
        with self._lock:
            if self._pending is None and (self._queues or self._info is not None):
                self._seq += 1
                queues, self._queues = self._queues, {}
                self._pending = {
                    "reporter": self._reporter,
                    "seq": self._seq,
                    "queues": {name: q.to_wire() for name, q in queues.items()},
                }
            pending = self._pending
        if pending is None or self._info is None:
            return pending
        # Outside the lock: the worker's info takes the worker's lock, handler threads hold it
        # while they call end().
        return {**pending, "info": self._info()}

    def acknowledged(self, report: dict[str, Any]) -> None:
        with self._lock:
            if self._pending is not None and self._pending["seq"] == report["seq"]:
                self._pending = None

    def send(self, client: Any) -> bool:
        """Report to the server through ``client.report``; False (and kept for the next call)
        when that failed. Never raises: metrics must not stop a worker's heartbeat. A server that
        refuses the call itself (one older than reports, or a key without the consumer role) is
        logged once (``metrics_report_refused``) and not asked again."""
        if self._refused:
            return False
        report = self.next_report()
        if report is None:
            return True
        try:
            client.report(report)
        except (ServerUnavailable, OSError, EOFError):
            return False  # the connection: resent on the next heartbeat
        except Exception as e:
            self._refused = True
            _log.warning("metrics_report_refused", error=f"{type(e).__name__}: {e}"[:300])
            return False
        self.acknowledged(report)
        return True


def consumer_info(queues: list[str], concurrency: int, pool: str, in_flight: int, heartbeat: float) -> dict[str, Any]:
    """The ``info`` of a report from this process (see :func:`check_info` for the bounds)."""
    return {
        "host": socket.gethostname()[:MAX_INFO_TEXT] or "unknown",
        "pid": os.getpid(),
        "version": __version__,
        "queues": list(queues),
        "concurrency": concurrency,
        "pool": pool,
        "in_flight": in_flight,
        "heartbeat": heartbeat,
    }


# -- server side ---------------------------------------------------------------------------


class ConsumerInfo(NamedTuple):
    """A checked ``info``: what the dashboard shows of one consumer."""

    host: str
    pid: int
    version: str
    queues: list[str]
    concurrency: int
    pool: str
    in_flight: int  # running + buffered (leased, not yet started)
    heartbeat: float  # seconds between its reports


class CheckedReport(NamedTuple):
    reporter: str
    seq: int
    queues: dict[str, dict[str, Any]]
    info: ConsumerInfo | None  # None: a consumer of a version before info


class SeenConsumer(NamedTuple):
    """The latest info of one reporter, where and when it came."""

    session: str
    info: ConsumerInfo
    arrived: float  # the Store's clock: time.monotonic()


def _count(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise InvalidRequest(f"report: {what} must be an int in 0..{MAX_COUNT}, got {value!r}")
    return value


def _seconds_sum(value: Any, what: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or not 0 <= value <= MAX_COUNT:
        raise InvalidRequest(f"report: {what} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def _counts(value: Any, what: str) -> list[int]:
    if type(value) is not list or len(value) != len(BUCKETS) + 1:
        raise InvalidRequest(f"report: {what} must be a list of {len(BUCKETS) + 1} bucket counts")
    return [_count(n, what) for n in value]


def _info_int(info: dict, name: str, low: int, high: int) -> int:
    value = info.get(name)
    if type(value) is not int or not low <= value <= high:
        raise InvalidRequest(f"report: info.{name} must be an int in {low}..{high}, got {value!r:.80}")
    return value


def _info_text(info: dict, name: str) -> str:
    value = info.get(name)
    if type(value) is not str or not 1 <= len(value) <= MAX_INFO_TEXT or not value.isprintable():
        raise InvalidRequest(
            f"report: info.{name} must be printable text of 1..{MAX_INFO_TEXT} chars, got {value!r:.80}"
        )
    return value


def check_info(info: Any) -> ConsumerInfo | None:
    """The checked ``info`` of a report (None when the report has none), or :class:`InvalidRequest`."""
    if info is None:
        return None
    if type(info) is not dict or len(info) > MAX_INFO_KEYS:
        raise InvalidRequest(f"report: info must be a dict of at most {MAX_INFO_KEYS} fields")
    queues = info.get("queues")
    if type(queues) is not list or not 1 <= len(queues) <= MAX_INFO_QUEUES:
        raise InvalidRequest(f"report: info.queues must be a list of 1..{MAX_INFO_QUEUES} queue names")
    for name in queues:
        check_queue_name(name)
    heartbeat: Any = info.get("heartbeat")
    if type(heartbeat) not in (int, float) or not MIN_HEARTBEAT <= heartbeat <= MAX_HEARTBEAT:
        raise InvalidRequest(
            f"report: info.heartbeat must be seconds in {MIN_HEARTBEAT}..{MAX_HEARTBEAT}, got {heartbeat!r:.80}"
        )
    return ConsumerInfo(
        host=_info_text(info, "host"),
        pid=_info_int(info, "pid", 1, 2**31 - 1),
        version=_info_text(info, "version"),
        queues=list(queues),
        concurrency=_info_int(info, "concurrency", 1, MAX_CONCURRENCY),
        pool=_info_text(info, "pool"),
        in_flight=_info_int(info, "in_flight", 0, MAX_COUNT),
        heartbeat=float(heartbeat),
    )


def checked_report(report: Any) -> CheckedReport:
    """A report a client sent, checked, or :class:`InvalidRequest`."""
    if type(report) is not dict:
        raise InvalidRequest(f"report must be a dict, got {type(report).__name__}")
    reporter, seq, queues = report.get("reporter"), report.get("seq"), report.get("queues")
    if type(reporter) is not str or not 1 <= len(reporter) <= MAX_REPORTER_CHARS:
        raise InvalidRequest(f"report: reporter must be a str of 1..{MAX_REPORTER_CHARS} chars")
    if type(seq) is not int or seq < 1:
        raise InvalidRequest(f"report: seq must be a positive int, got {seq!r}")
    if type(queues) is not dict or len(queues) > MAX_REPORT_QUEUES:
        raise InvalidRequest(f"report: queues must be a dict of at most {MAX_REPORT_QUEUES} queues")
    checked: dict[str, dict[str, Any]] = {}
    for name, item in queues.items():
        check_queue_name(name)
        if type(item) is not dict:
            raise InvalidRequest(f"report: queue {name!r}: expected a dict, got {type(item).__name__}")
        checked[name] = {
            **{o: _count(item.get(o, 0), f"{name}.{o}") for o in OUTCOMES},
            "duration": _counts(item.get("duration"), f"{name}.duration"),
            "duration_sum": _seconds_sum(item.get("duration_sum"), f"{name}.duration_sum"),
            "wait": _counts(item.get("wait"), f"{name}.wait"),
            "wait_sum": _seconds_sum(item.get("wait_sum"), f"{name}.wait_sum"),
        }
    return CheckedReport(reporter, seq, checked, check_info(report.get("info")))


class Store:
    """The server's totals of what consumers reported (thread-safe: the loop writes, HTTP reads)."""

    def __init__(self, max_consumers: int = MAX_CONSUMER_SERIES, clock: Callable[[], float] = time.monotonic):
        self._clock = clock  # ages of the consumers' info
        self._lock = threading.Lock()
        self._queues: dict[str, QueueMetrics] = {}
        self._consumers: dict[str, dict[str, int]] = {}
        self._max_consumers = max_consumers
        self._seen: OrderedDict[str, int] = OrderedDict()  # reporter -> last seq applied
        self._infos: OrderedDict[str, SeenConsumer] = OrderedDict()  # reporter -> latest info
        self._reports = 0

    def add(
        self,
        consumer: str,
        reporter: str,
        seq: int,
        queues: dict[str, dict[str, Any]],
        info: ConsumerInfo | None = None,
    ) -> bool:
        """Apply a checked report from the connection named ``consumer``. False: a duplicate
        (its info, fresh on a resend, is still kept)."""
        with self._lock:
            if info is not None:
                self._infos[reporter] = SeenConsumer(consumer, info, self._clock())
                self._infos.move_to_end(reporter)
                while len(self._infos) > MAX_REPORTERS_REMEMBERED:
                    self._infos.popitem(last=False)
            if self._seen.get(reporter, 0) >= seq:
                return False
            self._seen[reporter] = seq
            self._seen.move_to_end(reporter)
            while len(self._seen) > MAX_REPORTERS_REMEMBERED:
                self._seen.popitem(last=False)
            self._reports += 1
            if not queues:  # an idle consumer's info-only report: no series of its own
                return True
            label = consumer[:MAX_CONSUMER_LABEL] or "unnamed"
            if label not in self._consumers and len(self._consumers) >= self._max_consumers:
                label = OTHER
            per_consumer = self._consumers.setdefault(label, dict.fromkeys(OUTCOMES, 0))
            for name, item in queues.items():
                q = self._queues.get(name)
                if q is None:
                    q = self._queues[name] = QueueMetrics()
                q.add_wire(item)
                for o in OUTCOMES:
                    per_consumer[o] += item[o]
            return True

    def consumers(self, limit: int) -> list[dict[str, Any]]:
        """The latest info of up to ``limit`` consumers heard from within ``STALE_HEARTBEATS``
        of their heartbeat periods, most recent first; older ones are forgotten here."""
        now = self._clock()
        with self._lock:
            for reporter, seen in list(self._infos.items()):
                if now - seen.arrived > STALE_HEARTBEATS * seen.info.heartbeat:
                    del self._infos[reporter]
            latest = list(reversed(self._infos.values()))[:limit]
        return [
            {**s.info._asdict(), "session": s.session, "last_heartbeat_age": round(now - s.arrived, 3)} for s in latest
        ]

    def snapshot(self) -> Reported:
        with self._lock:
            return Reported(
                {
                    name: QueueMetrics(
                        dict(q.outcomes),
                        Histogram(list(q.duration.counts), q.duration.total),
                        Histogram(list(q.wait.counts), q.wait.total),
                    )
                    for name, q in self._queues.items()
                },
                {c: dict(v) for c, v in self._consumers.items()},
                self._reports,
            )
