"""TLS and mutual TLS on the queue port: real server processes, certificates made at test time
(trustme), clients over loopback.

What each test would catch if TLS broke: end to end traffic (the server logs ``tls=true`` per
connection, and a plaintext client is refused), every misconfiguration failing fast with its own
message on both sides, the loop's non-blocking TLS reads and writes (16 MB messages, 200 parked
gets), certificates reloaded from disk, and a capture of the bytes on the wire (the payload
marker seen in clear without TLS, nowhere with it).
"""

from __future__ import annotations

import datetime
import json
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import trustme

import queuekit
from queuekit import transport
from queuekit.errors import AuthenticationFailed, ExitCode, TLSError
from queuekit.server import TLS_FAILURE_REASONS, tls_failure_label
from queuekit.transport import API_IDENT
from support.procs import ROOT, Proc, ServerProc, base_env, wait_parked, wait_until, write_key

FAST = 2.0  # seconds any TLS misconfiguration may take to be reported


class Certs:
    """A CA with a server certificate for 127.0.0.1/localhost and a client certificate, written
    to ``directory``; ``issue`` writes more."""

    def __init__(self, directory, name="ca"):
        self.dir = directory
        self.ca = trustme.CA()
        self.ca_file = directory / f"{name}.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.name = name
        self.server_cert, self.server_key = self.issue("server", "127.0.0.1", "localhost")
        self.client_cert, self.client_key = self.issue("client", "client@example.org")

    def issue(self, stem, *names, **kw):
        cert = self.ca.issue_cert(*names, **kw)
        cert_file, key_file = self.dir / f"{self.name}-{stem}.crt", self.dir / f"{self.name}-{stem}.key"
        cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key_file))
        return cert_file, key_file


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory):
    """Another CA: its certificates must be refused where the first CA's are expected."""
    return Certs(tmp_path_factory.mktemp("other-certs"), name="other")


def tls_server(tmp_path, key_file, certs, *args, mutual=False, env=None):
    flags = ["--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.server_key), *args]
    if mutual:
        flags += ["--tls-client-ca-file", str(certs.ca_file)]
    return ServerProc(tmp_path, key_file, *flags, env=env)


@pytest.fixture
def server(tmp_path, key_file, certs):
    proc = tls_server(tmp_path, key_file, certs)
    yield proc
    proc.stop()


def connect(server, key_file, address=None, timeout=5.0, **tls):
    return queuekit.connect(address or server.address, authkey_file=str(key_file), connect_timeout=timeout, **tls)


def refused(server, key_file, error, match, address=None, **tls):
    """Connecting fails with ``error`` matching ``match``, within FAST seconds (connect_timeout
    is longer, so a retried failure would show)."""
    t0 = time.monotonic()
    with pytest.raises(error, match=match) as info:
        connect(server, key_file, address, timeout=10.0, **tls)
    elapsed = time.monotonic() - t0
    assert elapsed < FAST, f"took {elapsed:.2f} s: {info.value}"
    assert "\n" not in str(info.value)
    return info.value


def tls_failure_logged(server, reason, count=1):
    server.wait_for(rf"event=tls_handshake_failed peer=127\.0\.0\.1:\d+ reason={reason}\b", timeout=5, count=count)


def assert_all_tls(server, at_least=1):
    """Every connection the server served came over TLS."""
    lines = [line for line in server.log().splitlines() if "event=client_connected" in line]
    assert len(lines) >= at_least and all(line.endswith("tls=true") for line in lines), lines


# -- end to end -------------------------------------------------------------------------------


def test_tls_end_to_end_put_get_ack_and_a_worker(tmp_path, server, key_file, certs):
    with connect(server, key_file, tls_ca_file=str(certs.ca_file)) as client:
        jobs = client.queue("jobs")
        ids = jobs.put_many([{"n": i} for i in range(50)])
        tasks = jobs.get_many(10, timeout=5)
        assert [t.payload["n"] for t in tasks] == list(range(10))
        assert jobs.ack(tasks) == 10
        server.wait_for(r"event=client_connected peer=\S+ client=queuekit-client .*tls=true")
        argv = ["consume", "--server", server.address, "--authkey-file", str(key_file), "--handler", "handlers:record"]
        env = base_env(
            QK_RECORD=str(tmp_path / "record"), QUEUEKIT_QUEUE="jobs", QUEUEKIT_TLS_CA_FILE=str(certs.ca_file)
        )
        worker = Proc("tls-worker", argv, tmp_path, env)
        worker.wait_for("event=consumer_started")
        wait_until(lambda: client.stats()["queues"]["jobs"]["acked"] == len(ids), what="the worker acking 40 tasks")
        assert worker.stop() == 0
        name = f"client=consume@{socket.gethostname()}:{worker.pid}"  # consumers connect as consume@host:pid
        assert "tls=true" in server.log().split(name, 1)[1].splitlines()[0]


def test_the_authkey_handshake_still_runs_inside_tls(tmp_path, server, certs):
    wrong = write_key(tmp_path / "wrong")
    error = refused(server, wrong, AuthenticationFailed, "rejected our authkey", tls_ca_file=str(certs.ca_file))
    assert not isinstance(error, TLSError)
    server.wait_for(r"event=auth_failed peer=127\.0\.0\.1:\d+")


# -- clear errors, both sides, fast -----------------------------------------------------------


def test_plaintext_client_to_tls_server(server, key_file):
    refused(server, key_file, TLSError, "accepts TLS connections only: set QUEUEKIT_TLS_CA_FILE")
    tls_failure_logged(server, "no_client_hello")


def test_tls_client_to_plaintext_server(tmp_path, key_file, certs):
    plain = ServerProc(tmp_path, key_file)
    refused(
        plain, key_file, TLSError, "does not speak TLS .*unset QUEUEKIT_TLS_CA_FILE", tls_ca_file=str(certs.ca_file)
    )
    tls_failure_logged(plain, "tls_client_on_plaintext_server")
    plain.stop()


def test_server_certificate_from_an_unknown_ca(server, key_file, other_certs):
    error = refused(
        server,
        key_file,
        TLSError,
        "certificate is not trusted .*QUEUEKIT_TLS_CA_FILE",
        tls_ca_file=str(other_certs.ca_file),
    )
    assert str(other_certs.ca_file) in str(error)
    tls_failure_logged(server, "client_alert_unknown_ca")


def test_hostname_mismatch(server, key_file, certs):
    refused(
        server,
        key_file,
        TLSError,
        "not valid for 'queue.example.org'.*QUEUEKIT_TLS_SERVER_NAME",
        tls_ca_file=str(certs.ca_file),
        tls_server_name="queue.example.org",
    )
    tls_failure_logged(server, "client_alert_bad_certificate")
    # The name the certificate holds, given explicitly, works (and so does the default: the host).
    with connect(server, key_file, tls_ca_file=str(certs.ca_file), tls_server_name="localhost") as client:
        assert client.ping()["version"]


def test_expired_server_certificate(tmp_path, key_file, certs):
    now = datetime.datetime.now(datetime.UTC)
    cert, key = certs.issue(
        "expired", "127.0.0.1", not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1)
    )
    expired = ServerProc(tmp_path, key_file, "--tls-cert-file", str(cert), "--tls-key-file", str(key))
    refused(expired, key_file, TLSError, "certificate has expired", tls_ca_file=str(certs.ca_file))
    tls_failure_logged(expired, "client_alert_certificate_expired")
    expired.stop()


@pytest.fixture
def mtls_server(tmp_path, key_file, certs):
    proc = tls_server(tmp_path, key_file, certs, mutual=True)
    yield proc
    proc.stop()


def test_mutual_tls_admits_a_client_certificate_of_its_ca(mtls_server, key_file, certs):
    tls = dict(tls_ca_file=str(certs.ca_file), tls_cert_file=str(certs.client_cert), tls_key_file=str(certs.client_key))
    with connect(mtls_server, key_file, **tls) as client:
        client.queue("m").put("x")
        assert client.queue("m").get(timeout=5).payload == "x"
    assert_all_tls(mtls_server)


def test_mutual_tls_refuses_a_client_without_certificate(mtls_server, key_file, certs):
    refused(
        mtls_server,
        key_file,
        TLSError,
        "requires a client certificate .*QUEUEKIT_TLS_CLIENT_CERT_FILE",
        tls_ca_file=str(certs.ca_file),
    )
    tls_failure_logged(mtls_server, "no_client_certificate")


def refused_with_another_cas_certificate(server, key_file, certs, other_certs):
    refused(
        server,
        key_file,
        TLSError,
        "refused our client certificate .*QUEUEKIT_TLS_CLIENT_CA_FILE",
        tls_ca_file=str(certs.ca_file),
        tls_cert_file=str(other_certs.client_cert),
        tls_key_file=str(other_certs.client_key),
    )


def test_mutual_tls_refuses_a_certificate_from_another_ca(mtls_server, key_file, certs, other_certs):
    refused_with_another_cas_certificate(mtls_server, key_file, certs, other_certs)
    tls_failure_logged(mtls_server, "client_certificate_rejected")


def http_text(server, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}{path}", timeout=5) as r:
        return r.read().decode()


def test_tls_handshakes_and_their_failures_are_counted_by_reason(mtls_server, key_file, certs, other_certs):
    """/stats and /metrics count completed TLS handshakes and failed ones by a fixed set of reasons:
    a plaintext client (silent, as the manager protocol is) and one that sends HTTP are not_tls, a
    certificate from another CA client_certificate_rejected; a good client adds a handshake."""
    refused(mtls_server, key_file, TLSError, "accepts TLS connections only")  # a plaintext queuekit client
    with socket.create_connection(("127.0.0.1", mtls_server.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        try:
            while s.recv(1024):  # the server closes the connection (after an alert, which is no HTTP)
                pass
        except ConnectionResetError:
            pass
    refused_with_another_cas_certificate(mtls_server, key_file, certs, other_certs)
    tls_failure_logged(mtls_server, r"\S+", count=3)
    tls = dict(tls_ca_file=str(certs.ca_file), tls_cert_file=str(certs.client_cert), tls_key_file=str(certs.client_key))
    with connect(mtls_server, key_file, **tls) as client:
        assert client.ping() is not None

    stats = json.loads(http_text(mtls_server, "/stats"))
    assert stats["tls_handshake_failures"] == {
        **dict.fromkeys(TLS_FAILURE_REASONS, 0),
        "not_tls": 2,
        "client_certificate_rejected": 1,
    }, mtls_server.log()[-3000:]
    assert stats["tls_handshakes"] == 1
    metrics = http_text(mtls_server, "/metrics")
    assert "queuekit_tls_handshakes_total 1\n" in metrics
    assert 'queuekit_tls_handshake_failures_total{reason="not_tls"} 2\n' in metrics
    assert 'queuekit_tls_handshake_failures_total{reason="client_certificate_rejected"} 1\n' in metrics
    series = [line for line in metrics.splitlines() if line.startswith("queuekit_tls_handshake_failures_total{")]
    assert len(series) == len(TLS_FAILURE_REASONS), series  # every reason from the start, nothing else


@pytest.mark.parametrize(
    "logged, label",
    [
        ("no_client_hello", "not_tls"),
        ("wrong_version_number", "not_tls"),
        ("http_request", "not_tls"),
        ("no_client_certificate", "no_client_certificate"),
        ("client_certificate_rejected", "client_certificate_rejected"),
        ("client_alert_unknown_ca", "server_certificate_refused"),
        ("timeout", "timeout"),
        ("eof", "closed"),
        ("ConnectionResetError", "closed"),
        ("unsupported_protocol", "protocol"),
        ("no_shared_cipher", "protocol"),
        ("ValueError", "other"),
    ],
)
def test_the_logged_reasons_map_to_the_fixed_label_set(logged, label):
    assert tls_failure_label(logged) == label


def test_commands_and_the_worker_exit_with_the_auth_code(tmp_path, server, key_file, other_certs):
    common = ["--server", server.address, "--authkey-file", str(key_file)]
    for argv in (
        ["check", *common],
        ["stats", *common, "--tls-ca-file", str(other_certs.ca_file)],
        ["consume", *common, "--handler", "handlers:record"],
    ):
        t0 = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "queuekit", *argv],
            env=base_env(QK_RECORD=str(tmp_path / "record")),
            cwd=str(ROOT),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == ExitCode.AUTH, (argv, result.stderr)
        assert time.monotonic() - t0 < 5.0  # interpreter start included
        assert "TLS" in result.stderr and ("QUEUEKIT_TLS_CA_FILE" in result.stderr), result.stderr


def test_the_deadline_cuts_a_stalled_tls_handshake(tmp_path, key_file, certs):
    """A peer that trickles a ClientHello, a byte at a time, is cut by the whole-handshake deadline
    (each byte would renew a per-read timeout)."""
    slow = tls_server(tmp_path, key_file, certs, env=base_env(QUEUEKIT_HANDSHAKE_TIMEOUT="1"))
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", slow.port)) as s:
        s.settimeout(0.2)
        record = b"\x16\x03\x01\x02\x00" + b"\x01" * 512  # a handshake record header, then its body
        closed = False
        for byte in record:
            try:
                s.sendall(bytes([byte]))
                if s.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
            if time.monotonic() - t0 > 10:
                break
    assert closed, "the server kept a stalled TLS handshake open"
    assert time.monotonic() - t0 < 3.0
    assert slow.wait_for(r"event=tls_handshake_failed peer=\S+ reason=(eof|timeout)")
    slow.stop()


# -- the loop's non-blocking TLS reads and writes ---------------------------------------------


def test_large_messages_both_ways_over_tls(server, key_file, certs):
    # 16 tasks of ~1 MB: one put_many request and one get_many reply of ~16.6 MB each.
    payloads = [secrets.token_hex(8) + chr(65 + i) * 1_040_000 for i in range(16)]
    with connect(server, key_file, tls_ca_file=str(certs.ca_file)) as client:
        big = client.queue("big")
        assert len(big.put_many(payloads)) == 16
        assert big.qsize() == 16
        tasks = big.get_many(100, timeout=5)
        assert [t.payload for t in tasks] == payloads
        assert big.ack(tasks) == 16
        # The session still serves small calls after the large ones.
        big.put("small")
        assert big.get(timeout=5).payload == "small"
    assert_all_tls(server)


def test_many_parked_gets_over_tls_are_woken(server, key_file, certs):
    context = transport.client_tls_context(str(certs.ca_file))
    key = key_file.read_bytes().strip()
    waiters = []
    try:
        for i in range(200):
            conn = transport.Client(("127.0.0.1", server.port), authkey=key, tls=context)
            waiters.append(conn)
            conn.send((None, "accept_connection", (f"waiter-{i}",), {}))
            assert conn.recv() == ("#RETURN", None)
            conn.send((API_IDENT, "get_many", ("fanout", 1, 30.0, None, None), {}))
        with connect(server, key_file, tls_ca_file=str(certs.ca_file)) as client:
            wait_parked(client, "fanout", 200)
            ids = client.queue("fanout").put_many(range(200))
            got = []
            for conn in waiters:
                assert conn.poll(10), "a parked get was not answered"
                kind, items = conn.recv()
                assert kind == "#RETURN" and len(items) == 1
                got.append(items[0][0])
            assert sorted(got) == sorted(ids)
        assert_all_tls(server, at_least=201)
    finally:
        for conn in waiters:
            conn.close()


# -- certificates reloaded --------------------------------------------------------------------


def test_a_replaced_certificate_is_served_to_new_connections_old_ones_keep_working(
    tmp_path, key_file, certs, other_certs
):
    cert_file, key_path = tmp_path / "server.crt", tmp_path / "server.key"
    cert_file.write_bytes(certs.server_cert.read_bytes())
    key_path.write_bytes(certs.server_key.read_bytes())
    proc = ServerProc(tmp_path, key_file, "--tls-cert-file", str(cert_file), "--tls-key-file", str(key_path))
    old = connect(proc, key_file, tls_ca_file=str(certs.ca_file))
    old.queue("r").put(1)
    # Replace both files (the other CA's certificate): picked up without a signal.
    key_path.write_bytes(other_certs.server_key.read_bytes())
    cert_file.write_bytes(other_certs.server_cert.read_bytes())
    proc.wait_for("event=tls_reloaded why=files_changed")
    with connect(proc, key_file, tls_ca_file=str(other_certs.ca_file)) as new:
        new.queue("r").put(2)
    refused(proc, key_file, TLSError, "not trusted", tls_ca_file=str(certs.ca_file))
    # The connection made before the change still works, on its first certificate.
    assert [t.payload for t in old.queue("r").get_many(10, timeout=5)] == [1, 2]
    # SIGHUP re-reads them too.
    proc.signal(signal.SIGHUP)
    proc.wait_for("event=tls_reloaded why=sighup")
    old.close()
    proc.stop()


def test_certificate_files_that_do_not_load_leave_the_one_in_force(tmp_path, key_file, certs):
    cert_file = tmp_path / "server.crt"
    cert_file.write_bytes(certs.server_cert.read_bytes())
    proc = ServerProc(tmp_path, key_file, "--tls-cert-file", str(cert_file), "--tls-key-file", str(certs.server_key))
    cert_file.write_text("not a certificate\n")
    proc.wait_for("event=tls_reload_failed why=files_changed")
    with connect(proc, key_file, tls_ca_file=str(certs.ca_file)) as client:
        assert client.ping()["version"]
    assert_all_tls(proc)
    proc.stop()


# -- what a capture of the wire shows ---------------------------------------------------------


class RecordingProxy:
    """A TCP proxy on loopback that forwards one side to ``target`` and records every byte in
    both directions."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.recorded = bytearray()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while data := src.recv(65536):
                with self._lock:
                    self.recorded += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self):
        self.listener.close()
        for s in self._sockets:
            s.close()


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext-control", "tls"])
def test_a_capture_shows_the_payload_only_without_tls(tmp_path, key_file, certs, tls):
    proc = tls_server(tmp_path, key_file, certs) if tls else ServerProc(tmp_path, key_file)
    proxy = RecordingProxy(proc.port)
    marker = f"MARKER-{secrets.token_hex(8)}"
    try:
        options = {"tls_ca_file": str(certs.ca_file)} if tls else {}
        with connect(proc, key_file, f"127.0.0.1:{proxy.port}", **options) as client:
            client.queue("secret").put({"card": marker})
            assert client.queue("secret").get(timeout=5).payload == {"card": marker}
    finally:
        proxy.close()
    recorded = bytes(proxy.recorded)
    assert len(recorded) > 500  # the proxy saw the whole exchange
    if tls:
        assert recorded.startswith(b"\x16\x03")  # a TLS ClientHello opened it
        assert marker.encode() not in recorded
        assert b"secret" not in recorded  # nor the queue name
    else:
        assert marker.encode() in recorded  # the control: a capture does show payloads in clear
    proc.stop()
