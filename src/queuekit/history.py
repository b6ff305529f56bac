"""The dashboard's last hour: per queue, a fixed-size ring of samples of its gauges and rates.

:class:`History` takes one sample of ``/stats``' queues every ``interval`` seconds (the dashboard's
sampler thread calls :meth:`History.sample`); ``points`` samples are kept (360 at 10 s: one hour).
Rates are the counters' differences between two samples divided by the time between them, so a
counter reset (a server restart) costs one sample, never a negative rate.

Bounded: every series of every queue is an ``array('d')`` of ``points`` slots allocated when the
queue first appears (8 bytes a slot, ~20 KiB a queue), and at most ``max_queues`` queues get one;
the queues seen after that are counted in ``omitted``. Slots a queue had no sample for (it did not
exist yet) are NaN, sent as ``null``.
"""

from __future__ import annotations

import math
import threading
from array import array
from collections.abc import Mapping
from typing import NamedTuple

DEFAULT_INTERVAL = 10.0  # seconds between samples
DEFAULT_POINTS = 360  # samples kept: an hour at the default interval

# The series kept per queue: the gauges as sampled, then the rates (per second) derived from counters.
GAUGES = ("ready", "inflight", "delayed", "dead")
RATES = ("put", "ack", "fail")
SERIES = GAUGES + RATES


def _counters(q: Mapping[str, int]) -> tuple[int, int, int]:
    """(put, ack, fail) counters of one queue's stats: a failure is a nack or an expired lease."""
    return q["enqueued"], q["acked"], q["nacked"] + q["redelivered"]


class _Ring(NamedTuple):
    series: dict[str, array]  # name -> ``points`` slots, indexed by tick % points
    last: list[tuple[int, int, int]]  # the counters at the previous sample (one element)


class History:
    """Samples of every queue's gauges and rates, the newest ``points``; thread-safe."""

    def __init__(self, *, interval: float = DEFAULT_INTERVAL, points: int = DEFAULT_POINTS, max_queues: int = 1000):
        self.interval = interval
        self.points = points
        self.max_queues = max_queues
        self._lock = threading.Lock()
        self._rings: dict[str, _Ring] = {}
        self._times = array("d", [math.nan] * points)  # wall time of each sample, same indexing
        self._tick = 0  # samples taken so far
        self._last_time = math.nan
        self.omitted = 0  # queues seen without a ring (over max_queues) at the last sample

    def sample(self, queues: Mapping[str, Mapping[str, int]], now: float) -> None:
        """Record one sample at wall time ``now`` of ``queues`` (``/stats``' ``queues``)."""
        with self._lock:
            slot = self._tick % self.points
            elapsed = now - self._last_time
            self._times[slot] = now
            omitted = 0
            for name, q in queues.items():
                ring = self._rings.get(name)
                if ring is None:
                    if len(self._rings) >= self.max_queues:
                        omitted += 1
                        continue
                    ring = self._rings[name] = _Ring({s: array("d", [math.nan] * self.points) for s in SERIES}, [])
                for gauge in GAUGES:
                    ring.series[gauge][slot] = q[gauge]
                counters = _counters(q)
                previous = ring.last[0] if ring.last else None
                for i, rate in enumerate(RATES):
                    delta = counters[i] - previous[i] if previous is not None else -1
                    ring.series[rate][slot] = delta / elapsed if delta >= 0 and elapsed > 0 else math.nan
                ring.last[:] = [counters]
            # A queue missing from this sample (not expected: queues are never removed) gets gaps.
            for name, ring in self._rings.items():
                if name not in queues:
                    for values in ring.series.values():
                        values[slot] = math.nan
            self.omitted = omitted
            self._last_time = now
            self._tick += 1

    def names(self) -> list[str]:
        with self._lock:
            return list(self._rings)

    def snapshot(self, names: list[str]) -> dict:
        """The samples of the queues ``names`` (those with a ring), oldest first, as JSON-ready
        columns: ``{"interval", "points", "t": [...], "queues": {name: {series: [...]}}}``."""
        with self._lock:
            count = min(self._tick, self.points)
            start = self._tick - count
            order = [(start + i) % self.points for i in range(count)]
            return {
                "interval": self.interval,
                "points": self.points,
                "omitted": self.omitted,
                "t": [round(self._times[i], 3) for i in order],
                "queues": {
                    name: {s: [_number(ring.series[s][i]) for i in order] for s in SERIES}
                    for name in names
                    if (ring := self._rings.get(name)) is not None
                },
            }


def _number(value: float) -> float | None:
    """JSON has no NaN: a missing sample is ``null``; rates keep 3 decimals."""
    return None if math.isnan(value) else round(value, 3)
