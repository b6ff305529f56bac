"""The durable server as real processes: SIGKILL crash points, graceful restarts, bad data dirs."""

import hashlib
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from handlers import read_record

import queuekit
from queuekit.errors import ServerUnavailable
from queuekit.journal_sqlite import APPLICATION_ID
from support.procs import ROOT, Proc, ServerProc, base_env, wait_until, write_key


class Producer(threading.Thread):
    """Streams put_many batches of unique numbers; records what was attempted and acknowledged."""

    def __init__(self, address, key_file, batch=20, pause=0.005):
        super().__init__(daemon=True)
        self.client = queuekit.connect(address, authkey_file=str(key_file), connect_timeout=60)
        self.batch, self.pause = batch, pause
        self.attempted, self.acked = set(), set()
        self.stop = threading.Event()
        self.errors = []

    def run(self):
        q = self.client.queue("tasks")
        n = 0
        while not self.stop.is_set():
            numbers = list(range(n, n + self.batch))
            n += self.batch
            self.attempted.update(numbers)
            try:
                q.put_many([{"n": k} for k in numbers])
            except ServerUnavailable as e:
                self.errors.append(str(e))
                continue
            self.acked.update(numbers)
            time.sleep(self.pause)  # the load's pacing (workload), not synchronisation
        self.client.close()

    def wait_progress(self, n: int, timeout: float = 60.0) -> None:
        """Wait until ``n`` more puts than now were acknowledged (e.g. through a restarted server)."""
        target = len(self.acked) + n
        wait_until(
            lambda: len(self.acked) >= target,
            timeout=timeout,
            interval=0.05,
            what=lambda: f"{n} more acknowledged puts ({len(self.acked)} of {target}; errors: {self.errors[-3:]})",
        )


def start_consumers(tmp_path, address, key_file, count=2):
    procs = []
    for i in range(count):
        argv = [
            "consume",
            "--server",
            address,
            "--authkey-file",
            str(key_file),
            "--handler",
            "handlers:record",
            "--concurrency",
            "2",
            "--prefetch",
            "8",
            "--lease",
            "5",
        ]
        env = base_env(QK_RECORD=str(tmp_path / "record"), QUEUEKIT_CONNECT_TIMEOUT="120")
        procs.append(Proc(f"consumer{i}", argv, tmp_path, env))
    for p in procs:
        p.wait_for("event=consumer_started")
    return procs


def drain(tmp_path, client, expected, timeout=90):
    state = {}

    def drained():
        done = {n for what, _, n in read_record(tmp_path / "record") if what == "done"}
        state["missing"], state["stats"] = len(expected - done), client.stats()["queues"].get("tasks", {})
        s = state["stats"]
        return not state["missing"] and not (s.get("ready") or s.get("inflight") or s.get("delayed"))

    wait_until(drained, timeout=timeout, interval=0.2, what=lambda: f"the consumers to drain the queue: {state}")


def classify(tmp_path, producer):
    delivered = Counter(n for what, _, n in read_record(tmp_path / "record") if what == "done")
    lost = producer.acked - set(delivered)
    unexpected = set(delivered) - producer.attempted
    duplicated = {n: c for n, c in delivered.items() if c > 1}
    return lost, unexpected, duplicated, delivered


def restarts_under_load(tmp_path, key_file, server_args, restarts, restart):
    """Stream puts into a durable server while 2 consumers drain it; ``restart(server, producer)``
    returns the next server, ``restarts`` times; then drain and classify what was delivered."""
    server = ServerProc(tmp_path, key_file, *server_args)
    consumers = start_consumers(tmp_path, server.address, key_file)
    producer = Producer(server.address, key_file)
    producer.start()
    for _ in range(restarts):
        server = restart(server, producer)
    producer.wait_progress(200)  # puts through the last server too
    producer.stop.set()
    producer.join(90)
    client = queuekit.connect(server.address, authkey_file=str(key_file))
    drain(tmp_path, client, producer.acked)
    lost, unexpected, duplicated, delivered = classify(tmp_path, producer)
    print(
        f"\n{' '.join(server_args[::2])} {server_args[-1]} restarts={restarts} acked_puts={len(producer.acked)} "
        f"attempted={len(producer.attempted)} delivered={len(delivered)} lost={len(lost)} "
        f"unexpected={len(unexpected)} duplicated={len(duplicated)}"
    )
    for c in consumers:
        assert c.stop() == 0
    client.close()
    server.stop()
    return producer, lost, unexpected, duplicated


@pytest.mark.parametrize("journal", ["full", "normal", "postgres"])
def test_sigkill_at_random_moments_loses_nothing_acknowledged(request, tmp_path, key_file, journal):
    """SQLite with each sync mode, and the PostgreSQL journal (a throwaway server, tests/support/pg.py)."""
    if journal == "postgres":
        db = request.getfixturevalue("pg_db")
        args = ("--journal-url", db.url, "--journal-password-file", db.password_file)
    else:
        args = ("--data-dir", str(tmp_path / "data"), "--sync", journal)
    rng = random.Random(int(os.environ.get("QK_CRASH_SEED", "20261126")))
    kills = []

    def crash(server, producer):
        time.sleep(rng.uniform(0.1, 0.8))  # the crash moment is the workload: random, not a condition
        server.signal(signal.SIGKILL)
        server.wait(10)
        kills.append(server.port)
        return ServerProc(tmp_path, key_file, *args, port=server.port)

    producer, lost, unexpected, _ = restarts_under_load(tmp_path, key_file, args, 12, crash)
    assert len(kills) >= 10 and len(producer.acked) > 500
    assert lost == set(), f"lost {len(lost)}: {sorted(lost)[:20]}"
    assert unexpected == set()


def test_graceful_restarts_lose_nothing_and_duplicate_nothing(tmp_path, key_file):
    args = ("--data-dir", str(tmp_path / "data"), "--sync", "full")

    def graceful(server, producer):
        producer.wait_progress(1000)  # under load: puts go through this server before it stops
        t0 = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - t0 < 5
        assert "leases_saved=" in server.log()
        restarted = ServerProc(tmp_path, key_file, *args, port=server.port)
        restarted.wait_for(r"event=recovered tasks=\d+")
        return restarted

    producer, lost, unexpected, duplicated = restarts_under_load(tmp_path, key_file, args, 3, graceful)
    assert len(producer.acked) > 200
    assert lost == set() and unexpected == set()
    assert duplicated == {}, f"duplicated: {dict(list(duplicated.items())[:20])}"
    assert producer.attempted == producer.acked  # every put eventually succeeded: no put was lost either


def test_journal_space_is_reclaimed_after_acks(tmp_path, key_file):
    data = tmp_path / "data"
    server = ServerProc(tmp_path, key_file, "--data-dir", str(data), "--sync", "normal")
    c = queuekit.connect(server.address, authkey_file=str(key_file))
    q = c.queue("big")
    payload = {"blob": "x" * 2000}
    for _ in range(20):
        q.put_many([payload] * 500)
    grown = (data / "queuekit.db").stat().st_size + (data / "queuekit.db-wal").stat().st_size
    while True:
        tasks = q.get_many(1000)
        if not tasks:
            break
        q.ack(tasks)
    assert server.stop() == 0  # a graceful stop vacuums, checkpoints and truncates the WAL
    size = (data / "queuekit.db").stat().st_size
    wal = data / "queuekit.db-wal"
    print(f"\njournal bytes with 10000 x 2 KB tasks: {grown}; after acking all and vacuum: {size}")
    assert grown > 20_000_000
    assert size < grown / 10 and (not wal.exists() or wal.stat().st_size == 0)


def test_concurrent_producers_share_group_commits(tmp_path, key_file):
    """Single puts from 6 producer processes at once: the server's loop commits once per turn for
    every put it read in that turn, so there are far fewer commits (fsyncs) than puts."""
    server = ServerProc(tmp_path, key_file, "--data-dir", str(tmp_path / "data"), "--sync", "full")
    c = queuekit.connect(server.address, authkey_file=str(key_file))
    before = c.stats()["journal_commits"]
    argv = [sys.executable, "-m", "queuekit", "produce", "--queue", "grouped", "--generate", "150", "--batch", "1"]
    argv += ["--server", server.address, "--authkey-file", str(key_file)]
    producers = [subprocess.Popen(argv, env=base_env(), stdout=subprocess.DEVNULL) for _ in range(6)]
    try:
        assert [p.wait(60) for p in producers] == [0] * 6
    finally:
        for p in producers:
            if p.poll() is None:
                p.kill()
    stats = c.stats()
    commits = stats["journal_commits"] - before
    print(f"\ngroup commit: 900 single puts from 6 producers in {commits} commits (sync=full)")
    assert stats["queues"]["grouped"]["enqueued"] == 900
    assert 0 < commits < 900 * 0.8
    c.close()


# -- bad data directories: a clear one-line error, exit code 6, the files untouched --------------


def digest_tree(path: Path) -> dict:
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(path.rglob("*"))
    }


def start_expecting_failure(key_file, data_dir, user=None, python=sys.executable, env=None, journal_args=()):
    """Run a server that must stop at start: (exit code, its event=fatal lines, stderr). ``data_dir``
    None: no --data-dir (``journal_args`` name the PostgreSQL journal instead)."""
    argv = [
        python,
        "-m",
        "queuekit",
        "server",
        "--bind",
        "127.0.0.1:0",
        "--http",
        "off",
        "--authkey-file",
        str(key_file),
        *(("--data-dir", str(data_dir)) if data_dir is not None else ()),
        *journal_args,
    ]
    out = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=30,
        env=env or base_env(),
        cwd="/" if user else str(ROOT),
        user=user,
    )
    lines = [line for line in out.stderr.splitlines() if "event=fatal" in line]
    return out.returncode, lines, out.stderr


def make_foreign_db(d):
    d.mkdir()
    db = sqlite3.connect(d / "queuekit.db")
    db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount REAL)")
    db.execute("INSERT INTO invoices VALUES (1, 9.99)")
    db.commit()
    db.close()


def make_newer_journal(d, key_file, tmp_path):
    server = ServerProc(tmp_path, key_file, "--data-dir", str(d))
    queuekit.connect(server.address, authkey_file=str(key_file)).queue("q").put("kept")
    server.stop()
    db = sqlite3.connect(d / "queuekit.db")
    db.execute("PRAGMA user_version=99")
    db.commit()
    db.close()


def make_corrupt_db(d):
    d.mkdir()
    (d / "queuekit.db").write_bytes(b"SQLite format 3\x00" + os.urandom(8192))


def make_truncated_journal(d, key_file, tmp_path):
    server = ServerProc(tmp_path, key_file, "--data-dir", str(d))
    queuekit.connect(server.address, authkey_file=str(key_file)).queue("q").put_many([{"x": "y" * 500}] * 2000)
    server.stop()
    path = d / "queuekit.db"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] + os.urandom(4096) + data[len(data) // 2 + 4096 :])


@pytest.mark.parametrize(
    "case, message",
    [
        ("file", "is a file, not a directory"),
        ("foreign", "not a queuekit journal"),
        ("newer", "written by a newer queuekit"),
        ("corrupt", "not an SQLite database or is corrupt"),
        ("damaged", "corrupt|integrity check"),
    ],
)
def test_bad_data_directory_is_refused_and_left_untouched(tmp_path, key_file, case, message):
    d = tmp_path / "data"
    if case == "file":
        d.write_text("I am not a directory\n")
    elif case == "foreign":
        make_foreign_db(d)
    elif case == "newer":
        make_newer_journal(d, key_file, tmp_path)
    elif case == "corrupt":
        make_corrupt_db(d)
    elif case == "damaged":
        make_truncated_journal(d, key_file, tmp_path)
    before = digest_tree(d)
    code, fatal, stderr = start_expecting_failure(key_file, d)
    assert code == 6, stderr
    assert len(fatal) == 1 and str(d) in fatal[0], stderr
    assert re.search(message, fatal[0]), fatal[0]
    strip = lambda tree: {k: v for k, v in tree.items() if k != "queuekit.lock"}  # noqa: E731
    assert strip(digest_tree(d)) == strip(before)  # nothing written


def test_second_server_on_the_same_data_directory_is_refused(tmp_path, key_file):
    d = tmp_path / "data"
    server = ServerProc(tmp_path, key_file, "--data-dir", str(d))
    code, fatal, stderr = start_expecting_failure(key_file, d)
    assert code == 6 and "another queuekit server is using" in fatal[0], stderr
    server.stop()


SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
    reason="needs root (to run the server as another user) and a python3 that user can run",
)
def test_data_directory_not_writable_by_the_server_user(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="qk-perm-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        shutil.copytree(ROOT / "src", base / "src")  # readable by uid 65534, wherever the checkout is
        key = write_key(base / "key")
        os.chmod(key, 0o644)
        d = base / "data"
        d.mkdir(mode=0o755)  # owned by root: uid 65534 cannot write
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(base / "src")}
        code, fatal, stderr = start_expecting_failure(key, d, user=65534, python=SYSTEM_PYTHON, env=env)
        assert code == 6 and "is not writable by uid 65534" in fatal[0], stderr
        assert list(d.iterdir()) == []
    finally:
        shutil.rmtree(base)


def test_journal_from_a_development_schema_is_refused(tmp_path, key_file):
    d = tmp_path / "data"
    d.mkdir()
    db = sqlite3.connect(d / "queuekit.db")
    db.execute(f"PRAGMA application_id={APPLICATION_ID}")
    db.execute("PRAGMA user_version=1")
    db.execute("CREATE TABLE tasks (id INTEGER PRIMARY KEY, queue TEXT, payload TEXT)")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER)")
    db.commit()
    db.close()
    before = digest_tree(d)
    code, fatal, stderr = start_expecting_failure(key_file, d)
    assert code == 6 and "lacks columns" in fatal[0], stderr
    assert {k: v for k, v in digest_tree(d).items() if k != "queuekit.lock"} == before
