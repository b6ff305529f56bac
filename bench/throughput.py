#!/usr/bin/env python3
"""Throughput of queuekit against the classic BaseManager + queue.Queue recipe, in one run.

Every mode moves the same number of trivial tasks (small ints) from 1 producer process to 2
consumer processes over loopback, and is run several times, the modes interleaved; the table
shows the median and the ratios against the first two rows (the classic recipe, measured here,
in this run):

  1 classic, 1 item per put/get         stock BaseManager serving a queue.Queue (the recipe)
  2 classic, lists of 100 per put/get   the same, batching by hand (no acks, no redelivery)
  3 queuekit API, batch 1, acks         put / get(ack=previous): the ack rides on the next get
  4 queuekit API, batch 100, acks       put_many / get_many(100, ack=previous batch)
  5 end to end                          `queuekit produce` + 2 x `queuekit consume` (no-op handler)
  6.. durable modes                     rows 3/4 against a server with --data-dir, sync normal/full
  10, 11 TLS                            rows 3/4 over TLS (certificates made at bench time with the
                                        `openssl` command; without it these rows are skipped)
  12 end to end with TLS                row 5 over TLS (the producer and consumers verify the server)
  13, 14 PostgreSQL journal             rows 3/4 against a server with --journal-url: a throwaway
                                        PostgreSQL (tests/support/pg.py, fsync on), a new database
                                        per run; skipped with a note without PostgreSQL or psycopg
  15 PostgreSQL, fsync off              row 14 against a database with fsync=off: a diagnostic (the
                                        journal's cost without the disk flush), not a setting to use
  16 end to end with results            row 5 with a handler returning a small value (stored as the
                                        task's result; target >= 0.8x row 5)
  17 call() round trips                 put + result by one client while 2 consumers run; rate, and
                                        the median and p99 latency printed below the table

Usage: PYTHONPATH=src python3 bench/throughput.py [--tasks 100000] [--runs 5] [--quick] [--only 3,4]
Only loopback is used; every process is bounded by the task count and a timeout.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.managers import BaseManager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import queuekit  # noqa: E402

AUTHKEY = b"benchmark-key-0123456789abcdef-0123456789"
TIMEOUT = 300.0  # no single run may take longer than this
CONSUMERS = 2
ctx = mp.get_context("spawn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the classic recipe ---------------------------------------------------------------------


class ClassicManager(BaseManager):
    pass


def _serve_classic(port: int) -> None:
    q: queue.Queue = queue.Queue()
    ClassicManager.register("get_task_queue", callable=lambda: q)
    ClassicManager(address=("127.0.0.1", port), authkey=AUTHKEY).get_server().serve_forever()


def _classic_queue(port: int):
    ClassicManager.register("get_task_queue")
    m = ClassicManager(address=("127.0.0.1", port), authkey=AUTHKEY)
    for _ in range(100):
        try:
            m.connect()
            break
        except ConnectionRefusedError:
            time.sleep(0.05)
    return m.get_task_queue()


def classic_producer(port, n, batch, ready, start):
    q = _classic_queue(port)
    ready.release()
    start.wait()
    if batch == 1:
        for i in range(n):
            q.put(i)
    else:
        for i in range(0, n, batch):
            q.put(list(range(i, min(n, i + batch))))


def classic_consumer(port, n, batch, ready, start, total):
    q = _classic_queue(port)
    ready.release()
    start.wait()
    deadline = time.monotonic() + TIMEOUT
    while total.value < n and time.monotonic() < deadline:
        try:
            item = q.get(timeout=0.05)
        except queue.Empty:
            continue
        with total.get_lock():
            total.value += 1 if batch == 1 else len(item)


# -- queuekit ---------------------------------------------------------------------------------


def _qk_connect(address, keyfile, ca_file):
    return queuekit.connect(address, authkey_file=keyfile, tls_ca_file=ca_file)


def qk_producer(address, keyfile, ca_file, n, batch, ready, start):
    q = _qk_connect(address, keyfile, ca_file).queue("bench")
    ready.release()
    start.wait()
    if batch == 1:
        for i in range(n):
            q.put(i)
    else:
        for i in range(0, n, batch):
            q.put_many(range(i, min(n, i + batch)))


def qk_consumer(address, keyfile, ca_file, n, batch, ready, start, total):
    q = _qk_connect(address, keyfile, ca_file).queue("bench")
    ready.release()
    start.wait()
    deadline = time.monotonic() + TIMEOUT
    held = []
    while total.value < n and time.monotonic() < deadline:
        held = q.get_many(batch, timeout=0.05, ack=held)  # acks of the previous batch ride along
        if held:
            with total.get_lock():
                total.value += len(held)
    if held:
        q.ack(held)


def timed_run(producer, consumer, conn_args: tuple, n: int, batch: int) -> float:
    """Start 2 consumers and 1 producer, release them together, time until n tasks arrived."""
    ready = ctx.Semaphore(0)
    start = ctx.Event()
    total = ctx.Value("q", 0)
    consumers = [
        ctx.Process(target=consumer, args=(*conn_args, n, batch, ready, start, total)) for _ in range(CONSUMERS)
    ]
    prod = ctx.Process(target=producer, args=(*conn_args, n, batch, ready, start))
    procs = consumers + [prod]
    for p in procs:
        p.start()
    for _ in procs:
        if not ready.acquire(timeout=60):
            raise RuntimeError("benchmark processes did not get ready")
    t0 = time.perf_counter()
    start.set()
    for p in consumers:
        p.join(TIMEOUT)
    elapsed = time.perf_counter() - t0
    prod.join(10)
    for p in procs:
        if p.is_alive():
            p.kill()
    if total.value < n:
        raise RuntimeError(f"only {total.value} of {n} tasks arrived")
    return elapsed


def make_tls_files(directory: str) -> tuple[str, str, str] | None:
    """(CA file, server certificate, server key) for 127.0.0.1, made with the `openssl` command;
    None when it is missing or fails (the TLS rows are then skipped)."""
    if shutil.which("openssl") is None:
        return None
    d = Path(directory)
    names = ("ca.key", "ca.pem", "key.pem", "csr.pem", "cert.pem", "ext")
    ca_key, ca, key, csr, cert, ext = (str(d / name) for name in names)
    (d / "ext").write_text(  # what Python 3.13's strict verification asks of a leaf certificate
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=bench CA"]
        + ["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["openssl", "req", "-new", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert]
        + ["-days", "2", "-extfile", ext],
    ]
    for argv in steps:
        if subprocess.run(argv, capture_output=True).returncode != 0:
            return None
    return ca, cert, key


class QueuekitServer:
    def __init__(
        self,
        keyfile: str,
        data_dir: str | None = None,
        sync: str = "normal",
        tls: tuple[str, str, str] | None = None,
        journal_args: tuple[str, ...] = (),
    ):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        argv = [
            sys.executable,
            "-m",
            "queuekit",
            "server",
            "--bind",
            self.address,
            "--http",
            "off",
            "--authkey-file",
            keyfile,
            "--log-level",
            "warning",
        ]
        if data_dir:
            argv += ["--data-dir", data_dir, "--sync", sync]
        argv += journal_args  # the PostgreSQL journal's URL and password file
        if tls:  # (CA file, certificate, key)
            argv += ["--tls-cert-file", tls[1], "--tls-key-file", tls[2]]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        self.proc = subprocess.Popen(argv, env=env)
        ca_file = tls[0] if tls else None
        queuekit.connect(self.address, authkey_file=keyfile, connect_timeout=20, tls_ca_file=ca_file).close()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(20)


def end_to_end_run(
    keyfile: str, n: int, handler: str = "queuekit.examples:noop", tls: tuple[str, str, str] | None = None
) -> float:
    server = QueuekitServer(keyfile, tls=tls)
    ca_file = tls[0] if tls else None
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "QUEUEKIT_AUTHKEY_FILE": keyfile,
        "QUEUEKIT_SERVER": server.address,
        "QUEUEKIT_LOG_LEVEL": "warning",
        **({"QUEUEKIT_TLS_CA_FILE": ca_file} if ca_file else {}),
    }
    consumers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "queuekit",
                "consume",
                "--handler",
                handler,
                "--queue",
                "e2e",
                "--prefetch",
                "300",
            ],
            env=env,
        )
        for _ in range(CONSUMERS)
    ]
    client = queuekit.connect(server.address, authkey_file=keyfile, tls_ca_file=ca_file)
    time.sleep(1.0)  # consumers connected and waiting
    try:
        t0 = time.perf_counter()
        producer = subprocess.Popen(
            [sys.executable, "-m", "queuekit", "produce", "--queue", "e2e", "--generate", str(n), "--batch", "100"],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if client.stats()["queues"].get("e2e", {}).get("acked", 0) >= n:
                break
            time.sleep(0.01)
        elapsed = time.perf_counter() - t0
        if producer.wait(30) != 0:
            raise RuntimeError("queuekit produce failed")
        if client.stats()["queues"]["e2e"]["acked"] < n:
            raise RuntimeError("end-to-end run did not finish")
    finally:
        _stop_run(consumers, client, server)
    return elapsed


def _stop_run(consumers: list, client, server) -> None:
    """End a run with consumer processes: SIGTERM them all (they drain), wait, then close."""
    for c in consumers:
        c.send_signal(signal.SIGTERM)
    for c in consumers:
        c.wait(30)
    client.close()
    server.stop()


def start_postgres(fsync: bool):
    """A throwaway PostgreSQL (tests/support/pg.py); None, with a note, when this machine has no
    PostgreSQL or no psycopg (the PostgreSQL rows are then skipped). Rows 13 and 14 run with fsync
    on, as a real database does; row 15 with fsync off shows the journal's own cost without the
    disk's flush (what a disk with a fast or battery-backed write cache gets near)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support.pg import PgServer, PgUnavailable

    try:
        import psycopg  # noqa: F401

        return PgServer(fsync=fsync).start()
    except (PgUnavailable, ImportError, RuntimeError) as e:
        print(f"note: no PostgreSQL ({e}): the PostgreSQL rows are skipped", flush=True)
        return None


CALL_LATENCIES: list[float] = []  # row 17's call() latencies, all runs


def call_run(keyfile: str, n: int) -> float:
    """Row 17: one client's put + result round trips (``queue.call``) while 2 consumers run a
    handler that returns a small value. Returns the time for ``n`` tasks at the measured rate (the
    table's unit); the latencies go to CALL_LATENCIES."""
    calls = min(n, 2000)  # sequential round trips: bounded in count (and each by its timeout)
    server = QueuekitServer(keyfile)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "QUEUEKIT_AUTHKEY_FILE": keyfile,
        "QUEUEKIT_SERVER": server.address,
        "QUEUEKIT_LOG_LEVEL": "warning",
    }
    argv = [sys.executable, "-m", "queuekit", "consume", "--handler", "queuekit.examples:answer", "--queue", "calls"]
    consumers = [subprocess.Popen(argv, env=env) for _ in range(CONSUMERS)]
    client = queuekit.connect(server.address, authkey_file=keyfile)
    try:
        q = client.queue("calls")
        q.call({"n": -1}, timeout=30)  # consumers connected and serving
        t0 = time.perf_counter()
        for i in range(calls):
            start = time.perf_counter()
            if q.call({"n": i}, timeout=30) != i:
                raise RuntimeError("call() returned a wrong result")
            CALL_LATENCIES.append(time.perf_counter() - start)
        elapsed = time.perf_counter() - t0
    finally:
        _stop_run(consumers, client, server)
    return elapsed * n / calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="skip the slow durable batch-1 sync=full row")
    parser.add_argument("--only", help="comma-separated row numbers to run (rows 1 and 2 always run)")
    args = parser.parse_args()
    n = args.tasks
    tmp = tempfile.mkdtemp(prefix="qk-bench-")
    keyfile = os.path.join(tmp, "key")
    Path(keyfile).write_bytes(AUTHKEY)

    def classic(batch):
        def run():
            port = free_port()
            server = ctx.Process(target=_serve_classic, args=(port,), daemon=True)
            server.start()
            try:
                return timed_run(classic_producer, classic_consumer, (port,), n, batch)
            finally:
                server.kill()
                server.join(5)

        return run

    tls_files = make_tls_files(tmp)

    def api(batch, durable=False, sync="normal", tls=False, postgres=False):
        def run():
            data_dir = tempfile.mkdtemp(dir=tmp) if durable else None
            assert tls_files is not None or not tls
            journal: tuple[str, ...] = ()
            db_server = (pg_nofsync if postgres == "nofsync" else pg) if postgres else None
            if db_server is not None:  # a new database per run: every run starts from an empty journal
                database = db_server.database()
                url, password_file = db_server.url(database), str(db_server.password_file)
                journal = ("--journal-url", url, "--journal-password-file", password_file)
            server = QueuekitServer(keyfile, data_dir, sync, tls_files if tls else None, journal)
            ca_file = tls_files[0] if tls_files and tls else None
            try:
                return timed_run(qk_producer, qk_consumer, (server.address, keyfile, ca_file), n, batch)
            finally:
                server.stop()
                if data_dir:
                    shutil.rmtree(data_dir, ignore_errors=True)
                if db_server is not None:
                    db_server.drop(database)

        return run

    rows = [
        (1, "classic recipe, 1 item per put/get", classic(1)),
        (2, "classic recipe, lists of 100 per put/get", classic(100)),
        (3, "queuekit API, batch 1, with acks", api(1)),
        (4, "queuekit API, batch 100, with acks", api(100)),
        (5, "end to end: produce + 2 x consume (no-op handler)", lambda: end_to_end_run(keyfile, n)),
        (6, "durable sync=normal, batch 1, with acks", api(1, True, "normal")),
        (7, "durable sync=normal, batch 100, with acks", api(100, True, "normal")),
        (8, "durable sync=full, batch 1, with acks", api(1, True, "full")),
        (9, "durable sync=full, batch 100, with acks", api(100, True, "full")),
        (10, "TLS batch 1 with acks", api(1, tls=True)),
        (11, "TLS batch 100 with acks", api(100, tls=True)),
        (12, "end to end with TLS", lambda: end_to_end_run(keyfile, n, tls=tls_files)),
        (13, "PostgreSQL journal, batch 1 with acks", api(1, postgres="fsync")),
        (14, "PostgreSQL journal, batch 100 with acks", api(100, postgres="fsync")),
        (15, "PostgreSQL journal, batch 100, database fsync=off (diagnostic)", api(100, postgres="nofsync")),
        (
            16,
            "end to end with results stored (handler returns a small value)",
            lambda: end_to_end_run(keyfile, n, handler="queuekit.examples:answer"),
        ),
        (17, "call() round trips: put + result by 1 client, 2 consumers", lambda: call_run(keyfile, n)),
    ]
    wanted = {1, 2} | ({int(x) for x in args.only.split(",")} if args.only else {r[0] for r in rows})
    pg = pg_nofsync = None
    if wanted & {13, 14}:
        pg = start_postgres(fsync=True)
        if pg is None:
            wanted -= {13, 14}
    if 15 in wanted:
        pg_nofsync = start_postgres(fsync=False)
        if pg_nofsync is None:
            wanted -= {15}
    if args.quick:
        wanted.discard(8)
    if tls_files is None and wanted & {10, 11, 12}:
        print("note: no working `openssl` command: the TLS rows 10, 11 and 12 are skipped", flush=True)
        wanted -= {10, 11, 12}
    results = {}
    print(
        f"{n} tasks per run, {args.runs} runs per mode, 1 producer + {CONSUMERS} consumer processes, loopback; "
        f"python {sys.version.split()[0]}, {os.cpu_count()} cpus",
        flush=True,
    )
    # Runs are interleaved (round 1 of every mode, then round 2, ...) so that a slow spell of
    # the machine hits every mode alike instead of biasing the modes measured during it.
    chosen = [row for row in rows if row[0] in wanted]
    rates: dict[int, list[float]] = {number: [] for number, _, _ in chosen}
    try:
        for round_ in range(args.runs):
            for number, _, run in chosen:
                rates[number].append(n / run())
            print(f"  round {round_ + 1}/{args.runs} done", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for server in (pg, pg_nofsync):
            if server is not None:
                server.stop()
    for number, name, _ in chosen:
        results[number] = statistics.median(rates[number])
        print(f"  measured {number}: {name}: " + ", ".join(f"{r:,.0f}" for r in sorted(rates[number])) + " tasks/s")

    base1, base2 = results[1], results[2]
    print()
    print(f"| # | mode | tasks/s (median of {args.runs}) | vs row 1 | vs row 2 |")
    print("|---|---|---:|---:|---:|")
    for number, name, _ in rows:
        if number in results:
            r = results[number]
            print(f"| {number} | {name} | {r:,.0f} | {r / base1:.2f}x | {r / base2:.2f}x |")
    print()
    targets = [
        (3, 1, 1.0, "row 3 >= 1.0x row 1"),
        (4, 2, 0.5, "row 4 >= 0.5x row 2"),
        (5, 1, 5.0, "row 5 >= 5x row 1"),
        (7, 4, 0.5, "row 7 >= 0.5x row 4"),
        (10, 3, 0.6, "row 10 (TLS batch 1) >= 0.6x row 3"),
        (11, 4, 0.7, "row 11 (TLS batch 100) >= 0.7x row 4"),
        (14, 4, 0.25, "row 14 (PostgreSQL batch 100) >= 0.25x row 4"),
    ]
    for row, base, factor, text in targets:
        if row in results and base in results:
            ratio = results[row] / results[base]
            print(f"target {text}: {ratio:.2f}x {'met' if ratio >= factor else 'NOT met'}")
    if 12 in results and 5 in results:  # no target: what TLS costs the whole path
        print(f"row 12 (end to end with TLS): {results[12] / results[5]:.2f}x row 5")
    if 16 in results and 5 in results:
        ratio = results[16] / results[5]
        print(f"target row 16 (results stored) >= 0.8x row 5: {ratio:.2f}x {'met' if ratio >= 0.8 else 'NOT met'}")
    if CALL_LATENCIES:
        ms = sorted(x * 1000 for x in CALL_LATENCIES)
        print(
            f"row 17 call() latency over {len(ms)} calls: median {statistics.median(ms):.2f} ms, "
            f"p99 {ms[min(len(ms) - 1, int(len(ms) * 0.99))]:.2f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
