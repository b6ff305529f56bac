"""Failover times of two queuekit servers on one PostgreSQL journal (issue 14).

    PYTHONPATH=src python3 bench/failover.py [--kills 10] [--freezes 3] [--probe 1] [--lease 5]

Starts a throwaway PostgreSQL (tests/support/pg.py, fsync on) and two servers on loopback. Each
round faults the leader (SIGKILL, or SIGSTOP for a freeze), measures from the fault to

- ``ready``: the other server's ``/readyz`` answering 200 (polled every 10 ms), and
- ``put``: the first put acknowledged to a client that holds both addresses,

then restarts the killed server (or thaws the frozen one, which must step down) as the new
standby. Prints every round and a markdown table of the median and the maximum per fault. A
producer and a consumer are not running during the faults: this measures the servers, not the
client's retry backoff (which ``put`` includes).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import queuekit  # noqa: E402

ROUND_TIMEOUT = 30.0  # seconds a round may take before the bench gives up


class Server:
    """One ``queuekit server`` on the shared database; ``start`` waits for its ports."""

    def __init__(self, work: Path, name: str, args: list[str]):
        self.log_path = work / f"{name}.log"
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.port = self.http = 0

    def start(self, port: int = 0) -> Server:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0  # a restart's own lines
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "queuekit", "server", "--bind", f"127.0.0.1:{port}", "--http", "127.0.0.1:0",
             *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + ROUND_TIMEOUT
        pattern = re.compile(r"event=server_ready bind=127\.0\.0\.1:(\d+) http=127\.0\.0\.1:(\d+)")
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            m = pattern.search(text)
            if m:
                self.port, self.http = int(m.group(1)), int(m.group(2))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{text[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"server did not start:\n{self.log_path.read_text(errors='replace')[-2000:]}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/readyz", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


def wait(predicate: Callable[[], bool], what: str) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > ROUND_TIMEOUT:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return time.monotonic()


def fault_round(leader: Server, standby: Server, key_file: str, signum: int) -> tuple[float, float]:
    """Fault the leader; returns (seconds to the standby ready, seconds to a put acknowledged)."""
    addresses = f"127.0.0.1:{leader.port},127.0.0.1:{standby.port}"
    client = queuekit.connect(addresses, authkey_file=key_file, connect_timeout=ROUND_TIMEOUT)
    try:
        client.queue("bench").put("before")
        t0 = time.monotonic()
        leader.signal(signum)
        ready = wait(standby.ready, "the standby to become ready") - t0
        client.queue("bench").put("after")
        put = time.monotonic() - t0
    finally:
        client.close()
    return ready, put


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10, help="SIGKILL rounds (default 10)")
    parser.add_argument("--freezes", type=int, default=3, help="SIGSTOP rounds (default 3)")
    parser.add_argument("--probe", type=float, default=1.0, help="QUEUEKIT_LEADER_PROBE_INTERVAL (default 1)")
    parser.add_argument("--lease", type=float, default=5.0, help="QUEUEKIT_LEADER_LEASE (default 5)")
    opts = parser.parse_args()

    from support.pg import PgServer

    pg = PgServer(fsync=True).start()
    work = Path(tempfile.mkdtemp(prefix="qk-failover-"))
    servers: list[Server] = []
    results: dict[str, list[tuple[float, float]]] = {"SIGKILL": [], "SIGSTOP": []}
    try:
        key_file = work / "authkey"
        key_file.write_text(os.urandom(32).hex() + "\n")
        database = pg.database()
        args = [
            "--authkey-file", str(key_file), "--journal-url", pg.url(database),
            "--journal-password-file", str(pg.password_file),
            "--leader-probe-interval", str(opts.probe), "--leader-lease", str(opts.lease),
        ]  # fmt: skip
        a = Server(work, "a", args).start()
        servers.append(a)
        wait(a.ready, "the first leader")
        b = Server(work, "b", args).start()
        servers.append(b)
        leader, standby = a, b
        plan = ["SIGKILL"] * opts.kills + ["SIGSTOP"] * opts.freezes
        for n, fault in enumerate(plan, 1):
            signum = signal.SIGKILL if fault == "SIGKILL" else signal.SIGSTOP
            ready, put = fault_round(leader, standby, str(key_file), signum)
            results[fault].append((ready, put))
            print(f"round {n:2d} {fault}: standby ready after {ready:.3f} s, put acknowledged after {put:.3f} s")
            if fault == "SIGKILL":
                leader.proc.wait(10)  # type: ignore[union-attr]
                leader.start(leader.port)  # the same port: back as the standby
            else:
                leader.signal(signal.SIGCONT)
                wait(lambda s=leader: "event=leader_lost" in s.log_path.read_text(errors="replace"), "the step-down")
                leader.log_path.write_text("")  # the next round looks for its own lines
            wait(lambda s=leader: s.proc.poll() is None and not s.ready(), "the new standby")
            leader, standby = standby, leader
    finally:
        for server in servers:
            server.stop()
        pg.stop()
    print()
    print(f"probe interval {opts.probe:g} s, lease {opts.lease:g} s, {time.strftime('%Y-%m-%d')}")
    print()
    print("| fault | rounds | standby ready: median | max | put acknowledged: median | max |")
    print("|---|---|---|---|---|---|")
    for fault, rows in results.items():
        if rows:
            readies = [r for r, _ in rows]
            puts = [p for _, p in rows]
            print(
                f"| {fault} | {len(rows)} | {statistics.median(readies):.2f} s | {max(readies):.2f} s "
                f"| {statistics.median(puts):.2f} s | {max(puts):.2f} s |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
