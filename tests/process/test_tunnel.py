"""``queuekit tunnel``: the seed's unmodified stock ``BaseManager`` client reaches a TLS server
through it (real processes on loopback, certificates made at test time with trustme).

What each test would catch: a tunnel that does not relay (or corrupts) the manager protocol, one
that forwards in clear, one that hides or hangs on a TLS failure, one that listens beyond loopback
without being told to, and one that is unbounded or does not stop cleanly.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time

import pytest
from test_server import STOCK_CLIENT
from test_tls import Certs, RecordingProxy, assert_all_tls, tls_server

import queuekit
from queuekit.errors import ExitCode
from queuekit.tunnel import is_loopback
from support.procs import ROOT, Proc, base_env, wait_until

FAST = 5.0  # seconds (interpreter start included) a refused tunnel connection may take to end the client


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory):
    return Certs(tmp_path_factory.mktemp("other-certs"), name="other")


@pytest.fixture
def server(tmp_path, key_file, certs):
    proc = tls_server(tmp_path, key_file, certs)
    yield proc
    proc.stop()


class TunnelProc(Proc):
    """``queuekit tunnel`` on an ephemeral loopback port, forwarding to ``server_port``."""

    def __init__(self, log_dir, server_port: int, ca_file, *args: str):
        argv = ["tunnel", "--listen", "127.0.0.1:0", "--server", f"127.0.0.1:{server_port}"]
        argv += ["--tls-ca-file", str(ca_file), *args]
        super().__init__("tunnel", argv, log_dir)
        self.port = int(self.wait_for(r"event=tunnel_ready listen=127\.0\.0\.1:(\d+) ").group(1))


def stock(tunnel_port: int, key_file, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The seed's stock client script, unmodified, pointed at the tunnel's port."""
    script = key_file.parent / "stock.py"
    script.write_text(STOCK_CLIENT)
    return subprocess.run(
        [sys.executable, str(script), str(tunnel_port), str(key_file), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=base_env(),
    )


def tls_client(server, key_file, certs):
    return queuekit.connect(
        server.address, authkey_file=str(key_file), connect_timeout=5, tls_ca_file=str(certs.ca_file)
    )


def test_a_stock_client_reaches_a_tls_server_through_the_tunnel(tmp_path, server, key_file, certs):
    tunnel = TunnelProc(tmp_path, server.port, certs.ca_file)
    out = stock(tunnel.port, key_file, "put", "50")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["put", "51"]
    with tls_client(server, key_file, certs) as client:
        assert client.queue("tasks").qsize() == 51
        client.queue("tasks").put("from queuekit")
        out = stock(tunnel.port, key_file, "get")
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["empty True", "got 52 {'i': 0} from queuekit"]
        # What the stock client puts, a queuekit worker on the TLS side consumes.
        out = stock(tunnel.port, key_file, "put", "20")
        assert out.returncode == 0, out.stderr
        record = tmp_path / "record"
        argv = ["consume", "--server", server.address, "--authkey-file", str(key_file), "--handler", "handlers:record"]
        env = base_env(QK_RECORD=str(record), QUEUEKIT_TLS_CA_FILE=str(certs.ca_file))
        worker = Proc("tls-worker", argv, tmp_path, env)
        wait_until(lambda: client.stats()["queues"]["tasks"]["acked"] == 52 + 21, what="the worker acking 21 tasks")
        assert worker.stop() == 0
    done = [line.split()[2] for line in record.read_text().splitlines() if line.startswith("done")]
    assert len(done) == 21 and "last" in done  # handlers:record notes payload["n"]: None for {"i": i}
    # Every connection the server saw came over TLS, the stock client's included.
    assert_all_tls(server, at_least=3)
    assert "client=stock" not in server.log()  # (the stock client does not name itself)
    closed = re.findall(r"event=tunnel_closed peer=\S+ bytes_in=(\d+) bytes_out=(\d+) ", tunnel.log())
    assert closed and all(int(i) > 0 and int(o) > 0 for i, o in closed), tunnel.log()
    assert tunnel.log().count("event=tunnel_connected") == len(closed)
    assert tunnel.stop() == 0


def test_a_capture_between_tunnel_and_server_shows_no_payload(tmp_path, server, key_file, certs):
    wire = RecordingProxy(server.port)  # tunnel -> server: TLS
    tunnel = TunnelProc(tmp_path, wire.port, certs.ca_file)
    local = RecordingProxy(tunnel.port)  # stock client -> tunnel: the plaintext side, the control
    marker = f"MARKER-{secrets.token_hex(8)}"
    script = tmp_path / "marker.py"
    script.write_text(
        STOCK_CLIENT.split("q = m.get_task_queue()")[0] + f"m.get_task_queue().put({{'card': {marker!r}}})\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, str(script), str(local.port), str(key_file)],
            capture_output=True,
            text=True,
            timeout=60,
            env=base_env(),
        )
        assert out.returncode == 0, out.stderr
        with tls_client(server, key_file, certs) as client:
            assert client.queue("tasks").get(timeout=5).payload == {"card": marker}
    finally:
        local.close()
        wire.close()
    plain, encrypted = bytes(local.recorded), bytes(wire.recorded)
    assert marker.encode() in plain  # the control: the stock client did send the marker
    assert len(encrypted) > 500 and encrypted.startswith(b"\x16\x03")  # a TLS ClientHello opened it
    assert marker.encode() not in encrypted
    assert b"get_task_queue" not in encrypted and b"#CHALLENGE#" not in encrypted


def test_an_unknown_server_ca_is_refused_clearly_and_fast(tmp_path, server, key_file, other_certs):
    tunnel = TunnelProc(tmp_path, server.port, other_certs.ca_file)
    t0 = time.monotonic()
    out = stock(tunnel.port, key_file, "put", "1", timeout=30)
    assert time.monotonic() - t0 < FAST
    assert out.returncode != 0
    # The stock client sees its connection closed (not a hang, not a traceback from the tunnel).
    assert re.search(r"(EOFError|ConnectionResetError|ConnectionAbortedError)", out.stderr), out.stderr
    line = tunnel.wait_for(r"level=warning component=tunnel event=tunnel_upstream_failed .*").group(0)
    assert "reason=certificate_not_trusted" in line
    assert "QUEUEKIT_TLS_CA_FILE" in line and str(other_certs.ca_file) in line
    assert "event=tunnel_connected" not in tunnel.log()
    # asyncio drops the connection without sending the alert: the server sees an EOF mid-handshake.
    server.wait_for(r"event=tls_handshake_failed peer=127\.0\.0\.1:\d+ reason=(client_alert_unknown_ca|eof)")
    assert tunnel.stop() == 0  # it keeps running, and stops cleanly


def test_a_name_mismatch_names_the_setting(tmp_path, server, key_file, certs):
    tunnel = TunnelProc(tmp_path, server.port, certs.ca_file, "--tls-server-name", "queue.example.org")
    out = stock(tunnel.port, key_file, "put", "1", timeout=30)
    assert out.returncode != 0
    line = tunnel.wait_for(r"event=tunnel_upstream_failed .*").group(0)
    assert "reason=certificate_name_mismatch" in line and "QUEUEKIT_TLS_SERVER_NAME" in line


def test_a_plaintext_server_is_reported(tmp_path, key_file, certs):
    from support.procs import ServerProc

    plain = ServerProc(tmp_path, key_file)
    tunnel = TunnelProc(tmp_path, plain.port, certs.ca_file)
    out = stock(tunnel.port, key_file, "put", "1", timeout=30)
    assert out.returncode != 0
    assert "reason=server_not_tls" in tunnel.wait_for(r"event=tunnel_upstream_failed .*").group(0)
    plain.stop()


def run_tunnel(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "queuekit", "tunnel", *args],
        env=base_env(),
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_listening_beyond_loopback_needs_allow_remote(tmp_path, certs):
    for listen in ("0.0.0.0:0", ":0", "[::]:0"):
        out = run_tunnel("--listen", listen, "--server", "127.0.0.1:1", "--tls-ca-file", str(certs.ca_file))
        assert out.returncode == ExitCode.CONFIG, out
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "--allow-remote" in lines[0] and "plaintext" in lines[0], lines
    help_text = run_tunnel("--help").stdout
    assert "--allow-remote" in help_text and "in clear" in " ".join(help_text.split())


def test_a_tunnel_without_a_ca_file_does_not_start(certs):
    out = run_tunnel("--server", "127.0.0.1:1")
    assert out.returncode == ExitCode.CONFIG
    assert "QUEUEKIT_TLS_CA_FILE" in out.stderr


def test_which_addresses_count_as_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.1")
    assert not is_loopback("name.invalid")


def handshake_started(sock: socket.socket) -> bytes:
    """The first bytes the server sends through the tunnel (its challenge)."""
    sock.settimeout(5)
    return sock.recv(100)


def test_bounded_connections_and_idle_timeout(tmp_path, server, key_file, certs):
    tunnel = TunnelProc(tmp_path, server.port, certs.ca_file, "--max-connections", "1", "--idle-timeout", "1")
    with socket.create_connection(("127.0.0.1", tunnel.port)) as first:
        assert b"#CHALLENGE#" in handshake_started(first)  # relayed from the server
        with socket.create_connection(("127.0.0.1", tunnel.port)) as second:
            second.settimeout(5)
            try:
                assert second.recv(100) == b""
            except ConnectionResetError:
                pass
        tunnel.wait_for(r"event=tunnel_refused peer=127\.0\.0\.1:\d+ reason=max_connections")
        # Then nothing moves on the first one: closed after the idle timeout.
        t0 = time.monotonic()
        try:
            assert first.recv(100) == b""
        except ConnectionResetError:
            pass
        assert 0.5 < time.monotonic() - t0 < 5
    tunnel.wait_for(r"event=tunnel_closed peer=\S+ bytes_in=0 bytes_out=\d+ seconds=\S+ reason=idle_timeout")


def test_sigterm_closes_connections_and_exits_zero(tmp_path, server, key_file, certs):
    tunnel = TunnelProc(tmp_path, server.port, certs.ca_file)
    with socket.create_connection(("127.0.0.1", tunnel.port)) as open_conn:
        assert handshake_started(open_conn)
        tunnel.wait_for("event=tunnel_connected")
        tunnel.signal(signal.SIGTERM)
        assert tunnel.wait(10) == 0
        try:
            assert open_conn.recv(100) == b""
        except ConnectionResetError:
            pass
    log = tunnel.log()
    assert "event=tunnel_stopping connections=1" in log
    assert re.search(r"event=tunnel_closed .*reason=shutdown", log)
    assert log.rstrip().endswith("event=tunnel_stopped")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", tunnel.port), timeout=2).close()


# -- the explicit plaintext listener of a TLS server (QUEUEKIT_PLAINTEXT_BIND) -----------------


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on (from /proc: its socket inodes in LISTEN state)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_a_stock_client_works_on_the_explicit_plaintext_port_of_a_tls_server(tmp_path, key_file, certs):
    proc = tls_server(tmp_path, key_file, certs, "--plaintext-bind", "0")  # a port alone: loopback
    ready = proc.wait_for(r"event=server_ready .* plaintext=(\S+)")
    host, port = ready.group(1).rsplit(":", 1)
    assert host == "127.0.0.1"
    warning = proc.wait_for(r"level=warning component=server event=plaintext_listener bind=(\S+) .*").group(0)
    assert f"bind=127.0.0.1:{port}" in warning and "not encrypted" in warning
    assert listening_ports(proc.pid) == {proc.port, proc.http_port, int(port)}
    out = stock(int(port), key_file, "put", "5")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["put", "6"]
    # The main port still speaks TLS only: the same stock client is refused there.
    refused = stock(proc.port, key_file, "put", "1", timeout=30)
    assert refused.returncode != 0
    proc.wait_for(r"event=tls_handshake_failed peer=\S+ reason=no_client_hello")
    with tls_client(proc, key_file, certs) as client:
        assert client.queue("tasks").qsize() == 6
    tls_lines = [line for line in proc.log().splitlines() if "event=client_connected" in line]
    assert any(line.endswith("tls=false") for line in tls_lines)  # the stock client, on the plaintext port
    assert any(line.endswith("tls=true") for line in tls_lines)  # ours, on the TLS port
    proc.stop()


def test_without_the_setting_a_tls_server_has_no_plaintext_port(server):
    assert listening_ports(server.pid) == {server.port, server.http_port}
    ready = server.wait_for(r"event=server_ready .*").group(0)
    assert "plaintext=" not in ready and "event=plaintext_listener" not in server.log()


def test_the_plaintext_port_needs_tls(tmp_path, key_file):
    out = subprocess.run(
        [sys.executable, "-m", "queuekit", "server", "--authkey-file", str(key_file), "--bind", "127.0.0.1:0"]
        + ["--http", "off", "--plaintext-bind", "0"],
        env=base_env(),
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == ExitCode.CONFIG
    assert "QUEUEKIT_PLAINTEXT_BIND" in out.stderr and "QUEUEKIT_TLS_CERT_FILE" in out.stderr
