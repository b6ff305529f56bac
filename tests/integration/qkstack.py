"""A queuekit stack of real containers for one integration test: server, consumers, producers on
a user-defined bridge network of the test's own, plus host-side views (client, stats, logs).

Built on tests/support/dockerkit.py. Everything a ``Stack`` creates is labelled and removed by
``Stack.close()`` (the ``stack`` fixture calls it, also when the test fails).
"""

from __future__ import annotations

import calendar
import json
import re
import shutil
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import queuekit
from support import dockerkit as dk

QUEUE = "tasks"
# One line per task, logged by queuekit.examples:handle AFTER the work (before the ack).
EXAMPLE_RX = re.compile(r"^ts=(\S+) .*?\bevent=example_task n=(-?\d+) ", re.MULTILINE)
TS_RX = re.compile(r"^ts=(\S+) ", re.MULTILINE)


def parse_ts(stamp: str) -> float:
    """``2026-11-26T16:04:12.566Z`` (queuekit's log time, UTC) -> epoch seconds."""
    main, _, frac = stamp.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(main, "%Y-%m-%dT%H:%M:%S")) + (int(frac) / 1000 if frac else 0.0)


@dataclass(frozen=True)
class Done:
    """One ``event=example_task`` line: task ``n`` finished at ``ts`` (epoch s) in ``container``."""

    n: int
    ts: float
    container: str


def done_tasks(container) -> list[Done]:
    """The tasks a consumer container finished, in log order (works after the container exited)."""
    name = dk.name_of(container)
    return [Done(int(m.group(2)), parse_ts(m.group(1)), name) for m in EXAMPLE_RX.finditer(dk.logs(container))]


def done_by(containers: Iterable) -> dict[str, list[Done]]:
    return {dk.name_of(c): done_tasks(c) for c in containers}


def count_n(containers: Iterable) -> Counter:
    """How many times each task number was finished, over all the containers."""
    counts: Counter = Counter()
    for c in containers:
        counts.update(d.n for d in done_tasks(c))
    return counts


def tasks(ns: Iterable[int], ms: int) -> list[dict]:
    """Demo payloads for queuekit.examples:handle."""
    return [{"n": n, "ms": ms} for n in ns]


def parallel(fns: Sequence[Callable[[], object]]) -> list:
    """Run the callables concurrently (container starts, stops) and return their results in order."""
    if not fns:
        return []
    with ThreadPoolExecutor(max_workers=len(fns)) as pool:
        return [f.result() for f in [pool.submit(fn) for fn in fns]]


def http_json(port: int, path: str = "/stats", timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return json.loads(r.read().decode())


def http_status(port: int, path: str = "/healthz", timeout: float = 5.0) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return r.status


class Stack:
    """Containers of one test on one network of its own, with role keys as the Compose stack has
    them: the server reads the keys directory, each consumer holds only the consumer key, each
    producer only the producer key; the host-side client (``key_file``) holds the admin key."""

    def __init__(self, images: dict[str, str], workdir: Path, hint: str):
        self.images = images
        self.workdir = workdir
        self.hint = hint
        self.keys = dk.write_role_keys(workdir / "keys")
        self.keys_dir = workdir / "keys"
        self.key_file = self.keys["admin"]
        self.network = dk.create_network(hint)
        self.volume = dk.create_volume(f"{hint}-data")
        self.containers: list = []
        self.server_container = None
        self._clients: list = []

    # -- containers -----------------------------------------------------------------------------

    def server(self, *, durable: bool = True, env: dict | None = None, **kw):
        """The server, alias ``server`` on the network, data volume at /var/lib/queuekit, manager and
        HTTP ports published on 127.0.0.1. Returns once it logged ``event=server_ready``."""
        environment = {"QUEUEKIT_DATA_DIR": "/var/lib/queuekit" if durable else ""}
        environment.update(env or {})
        c = dk.start_container(
            self.images["server"],
            f"{self.hint}-server",
            network=self.network,
            aliases=["server"],
            env=environment,
            keys_dir=self.keys_dir,
            volumes={self.volume.name: "/var/lib/queuekit"},
            publish=[50000, 8080],
            wait_log=r"event=server_ready",
            **kw,
        )
        self.containers.append(c)
        self.server_container = c
        return c

    def consumer(self, name: str = "consumer", *, env: dict | None = None, key_file: Path | None = None, wait=True):
        """A consumer of the demo handler; returns once it logged ``event=consumer_started``."""
        environment = {"QUEUEKIT_SERVER": "server:50000", "QUEUEKIT_QUEUE": QUEUE}
        environment.update(env or {})
        c = dk.start_container(
            self.images["consumer"],
            f"{self.hint}-{name}",
            network=self.network,
            env=environment,
            authkey_file=key_file or self.keys["consumer"],
            wait_log=r"event=consumer_started" if wait else None,
        )
        self.containers.append(c)
        return c

    def consumers(self, count: int, *, env: dict | None = None, prefix: str = "consumer") -> list:
        """``count`` consumers started in parallel."""
        return parallel([lambda i=i: self.consumer(f"{prefix}{i + 1}", env=env) for i in range(count)])

    def producer(self, args: Sequence[str], *, env: dict | None = None, name: str = "producer"):
        """A one-shot producer container running ``queuekit <args>`` (not waited for)."""
        environment = {"QUEUEKIT_SERVER": "server:50000", "QUEUEKIT_QUEUE": QUEUE}
        environment.update(env or {})
        c = dk.start_container(
            self.images["producer"],
            f"{self.hint}-{name}",
            network=self.network,
            env=environment,
            command=list(args),
            authkey_file=self.keys["producer"],
        )
        self.containers.append(c)
        return c

    # -- host-side views ------------------------------------------------------------------------

    def port(self, container_port: int = 50000) -> int:
        return dk.host_port(self.server_container, container_port)

    def client(self, connect_timeout: float = 15.0, role: str = "admin"):
        """A host-side client through the published manager port (re-read: it changes on restart),
        with the admin key unless another ``role`` is asked for."""
        c = queuekit.connect(
            f"127.0.0.1:{self.port()}", authkey_file=str(self.keys[role]), connect_timeout=connect_timeout
        )
        self._clients.append(c)
        return c

    def stats(self) -> dict:
        """The ``tasks`` queue's counts, via HTTP ``/stats`` on the published port (no key needed)."""
        queues = http_json(self.port(8080))["queues"]
        return queues.get(
            QUEUE, {"ready": 0, "inflight": 0, "delayed": 0, "dead": 0, "enqueued": 0, "acked": 0, "redelivered": 0}
        )

    def wait_stats(self, predicate: Callable[[dict], bool], *, timeout: float, what: str) -> dict:
        """Poll the stats until ``predicate(stats)``; the failure message carries the logs."""
        last: dict = {}

        def check():
            nonlocal last
            last = self.stats()
            return last if predicate(last) else None

        return dk.wait_until(check, timeout=timeout, interval=0.2, message=lambda: f"{what}; stats={last}")

    def wait_settled(self, acked: int, *, timeout: float) -> dict:
        """Wait until ``acked`` tasks were acknowledged and nothing is ready, in flight or delayed."""
        return self.wait_stats(
            lambda s: s["acked"] >= acked and s["ready"] == 0 and s["inflight"] == 0 and s["delayed"] == 0,
            timeout=timeout,
            what=f"waiting for acked={acked} with an empty queue",
        )

    def dump(self, tail: int = 80) -> str:
        """State and last log lines of every container of the stack (for assertion messages)."""
        return dk.describe(self.containers, tail=tail)

    def close(self) -> None:
        for c in self._clients:
            try:
                c.close()
            except Exception:
                pass
        parallel([lambda c=c: dk.remove(c) for c in self.containers])
        for res in (self.network, self.volume):
            try:
                res.remove()
            except Exception:
                pass  # the session sweep retries
        shutil.rmtree(self.workdir, ignore_errors=True)
