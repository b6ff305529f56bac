"""Two server containers on a PostgreSQL container: a bounded nemesis run (issue 14).

A producer and a consumer (threads on the host, both server addresses, through ports published on
127.0.0.1) run throughout, while a nemesis, at random intervals, SIGKILLs the leader container (and
starts it again), freezes it with ``docker pause`` beyond the lease (and thaws it), or restarts it
(SIGTERM). Checker: every put acknowledged is consumed (lost = 0), nothing is consumed that was
never put (unexpected = 0); duplicates and every failover time are printed.

Duration: QK_NEMESIS_SECONDS (default 90). Images: this session's server image (with psycopg) and
queuekit/postgres:trixie (``make postgres-image``).
"""

from __future__ import annotations

import os
import random
import threading
import time
import urllib.error
import urllib.request

import pytest

import queuekit
from conftest import METRICS
from queuekit.errors import QueuekitError
from support import dockerkit as dk

PG_IMAGE = os.environ.get("QUEUEKIT_POSTGRES_IMAGE", "queuekit/postgres:trixie")
DURATION = float(os.environ.get("QK_NEMESIS_SECONDS", "90"))
PROBE, LEASE = 0.5, 3.0
MAX_PUTS = 200_000  # the producer's bound (count), besides the duration
# The server image may be built first (minutes on a loaded machine), then the run itself.
pytestmark = pytest.mark.timeout(int(DURATION) + 900)


@pytest.fixture(scope="module")
def server_image(docker_ready) -> str:
    """This session's server image only (the clients here are host threads)."""
    return dk.build_images(("server",), context=os.environ.get("QUEUEKIT_TEST_BUILD_CONTEXT") or None)["server"]


@pytest.fixture
def pg_image(docker_ready):
    try:
        dk.client().images.get(PG_IMAGE)
    except Exception:
        message = f"{PG_IMAGE} is missing: make postgres-image"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return PG_IMAGE


class Box:
    """A server container with fixed host ports, so that a restart keeps its address."""

    def __init__(self, image: str, name: str, network, env: dict, key_file, password_file):
        self.port, self.http = dk.free_port(), dk.free_port()
        self.container = dk.client().containers.run(
            image,
            detach=True,
            name=dk.short_name(name),
            labels=dk.labels(),
            network=network.name,
            environment=env,
            ports={"50000/tcp": ("127.0.0.1", self.port), "8080/tcp": ("127.0.0.1", self.http)},
            volumes={
                str(key_file): {"bind": dk.AUTHKEY_PATH, "mode": "ro"},
                str(password_file): {"bind": "/run/secrets/journal_password", "mode": "ro"},
            },
            tmpfs={"/tmp": "size=16m,mode=1777"},
            **dk.hardened(),
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/readyz", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def status(self) -> str:
        self.container.reload()
        return self.container.status


class Workload:
    """Producer and consumer threads; what each put and took."""

    def __init__(self, addresses: str, key_file):
        self.addresses, self.key_file = addresses, str(key_file)
        self.stop = threading.Event()
        self.acked: set[int] = set()  # puts acknowledged
        self.unsure: set[int] = set()  # puts that failed: stored or not
        self.taken: list[int] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._produce), threading.Thread(target=self._consume)]

    def _client(self):
        return queuekit.connect(self.addresses, authkey_file=self.key_file, connect_timeout=120)

    def _produce(self) -> None:
        client = self._client()
        q = client.queue("nemesis")
        n = 0
        while not self.stop.is_set() and n < MAX_PUTS:
            batch = list(range(n, n + 10))
            n += 10
            try:
                q.put_many(batch)
                self.acked.update(batch)
            except QueuekitError as e:  # JournalError, ServerUnavailable: maybe stored, maybe not
                self.unsure.update(batch)
                self.errors.append(type(e).__name__)
            time.sleep(0.01)
        client.close()

    def _consume(self, until_empty: bool = False) -> None:
        client = self._client()
        q = client.queue("nemesis")
        while not self.stop.is_set() or until_empty:
            try:
                tasks = q.get_many(100, timeout=1)
                if not tasks and until_empty:
                    break
                self.taken += [t.payload for t in tasks]
                if tasks:
                    q.ack(tasks)
            except QueuekitError as e:
                self.errors.append(type(e).__name__)
        client.close()

    def drain(self) -> None:
        self._consume(until_empty=True)


def test_nemesis_kills_freezes_restarts_lose_nothing(server_image, pg_image, tmp_path):
    rng = random.Random(os.environ.get("QK_NEMESIS_SEED") or time.time_ns())
    network = dk.create_network("ha")
    key_file = dk.write_authkey(tmp_path)
    password_file = tmp_path / "journal_password"
    password_file.write_text(dk.new_authkey() + "\n")
    password_file.chmod(0o644)  # read by uid 999 (postgres) and 10001 (the servers)
    pg = dk.client().containers.run(
        pg_image,
        detach=True,
        name=dk.short_name("pg"),
        labels=dk.labels(),
        network=network.name,
        environment={"POSTGRES_PASSWORD_FILE": "/run/secrets/journal_password"},
        volumes={str(password_file): {"bind": "/run/secrets/journal_password", "mode": "ro"}},
    )
    network.disconnect(pg)
    network.connect(pg, aliases=["postgres"])
    boxes: list[Box] = []
    try:
        dk.wait_until(lambda: b"ready to accept connections" in pg.logs(), timeout=60, message="PostgreSQL")
        env = {
            "QUEUEKIT_DATA_DIR": "",
            "QUEUEKIT_JOURNAL_URL": "postgresql://queuekit@postgres:5432/queuekit",
            "QUEUEKIT_JOURNAL_PASSWORD_FILE": "/run/secrets/journal_password",
            "QUEUEKIT_LEADER_PROBE_INTERVAL": str(PROBE),
            "QUEUEKIT_LEADER_LEASE": str(LEASE),
        }
        for name in ("srv-a", "srv-b"):
            boxes.append(Box(server_image, name, network, env, key_file, password_file))
        dk.wait_until(lambda: sum(b.ready() for b in boxes) == 1, timeout=60, message="one leader")
        work = Workload(",".join(b.address for b in boxes), key_file)
        for thread in work.threads:
            thread.start()
        failovers: list[tuple[str, float]] = []
        end = time.monotonic() + DURATION
        while time.monotonic() < end - 10:
            time.sleep(rng.uniform(3, 8))
            (leader,) = [b for b in boxes if b.ready()] or [None]
            if leader is None:
                continue
            (standby,) = [b for b in boxes if b is not leader]
            fault = rng.choice(["kill", "pause", "restart"])
            t0 = time.monotonic()
            if fault == "kill":
                leader.container.kill()
            elif fault == "pause":
                leader.container.pause()
            else:
                threading.Thread(target=leader.container.restart, kwargs={"timeout": 10}).start()
            dk.wait_until(standby.ready, timeout=20, interval=0.02, message=f"the standby after {fault}")
            failovers.append((fault, time.monotonic() - t0))
            if fault == "kill":
                leader.container.start()
            elif fault == "pause":
                time.sleep(rng.uniform(0, 2))
                leader.container.unpause()
            dk.wait_until(lambda b=leader: b.status() == "running" and not b.ready(), timeout=30, message="new standby")
        work.stop.set()
        for thread in work.threads:
            thread.join(150)
        work.drain()
    finally:
        logs = {b.container.name: dk.logs(b.container, tail=40) for b in boxes}
        for box in boxes:
            dk.remove(box.container)
        dk.remove(pg)
        network.remove()
    taken = set(work.taken)
    lost = sorted(work.acked - taken)
    unexpected = sorted(taken - work.acked - work.unsure)
    duplicates = len(work.taken) - len(taken)
    summary = (
        f"puts acknowledged {len(work.acked)}, failed {len(work.unsure)}, taken {len(work.taken)}, "
        f"lost {len(lost)}, unexpected {len(unexpected)}, duplicates {duplicates}; failovers "
        + ", ".join(f"{fault} {seconds:.2f} s" for fault, seconds in failovers)
    )
    print("\n" + summary)
    METRICS["nemesis"] = summary
    assert failovers, "the nemesis did nothing"
    assert len(work.acked) > 1000, "the producer barely ran"
    assert lost == [], f"lost acknowledged tasks: {lost[:20]}\n{logs}"
    assert unexpected == [], f"tasks nobody put: {unexpected[:20]}"
    assert all(seconds < 5 for fault, seconds in failovers if fault == "kill"), failovers
    assert all(seconds < 15 for _, seconds in failovers), failovers
