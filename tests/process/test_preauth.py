"""Before authentication: unauthenticated peers get a deadline and a small budget of their own.

Real server processes on loopback; the "attackers" are raw sockets bound to other loopback
addresses (127.0.0.2 ...), so per-address limits can be told apart from the real client's 127.0.0.1.
"""

import json
import re
import resource
import socket
import struct
import time
import urllib.error
import urllib.request
from multiprocessing import AuthenticationError
from multiprocessing import connection as mpc

import pytest

import queuekit
from queuekit import handshake
from queuekit.errors import ServerUnavailable
from support.procs import ServerProc, base_env, wait_until

DEADLINE = 2.0
LIMITS = {
    "QUEUEKIT_HANDSHAKE_TIMEOUT": str(DEADLINE),
    "QUEUEKIT_MAX_HANDSHAKES": "6",
    "QUEUEKIT_MAX_HANDSHAKES_PER_ADDRESS": "3",
    "QUEUEKIT_AUTH_FAILURES_PER_MINUTE": "3",
}


@pytest.fixture
def server(tmp_path, key_file):
    proc = ServerProc(tmp_path, key_file, env=base_env(**LIMITS))
    yield proc
    proc.stop()


def raw(server, source: str) -> socket.socket:
    """A TCP connection from ``source`` (a loopback address) that never authenticates."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5, source_address=(source, 0))
    s.settimeout(3)
    return s


def got_challenge(s: socket.socket) -> bool:
    """True when the server sent its challenge frame; False when it hung up first."""
    try:
        header = s.recv(4, socket.MSG_WAITALL)
    except (ConnectionResetError, TimeoutError):
        return False
    if len(header) < 4:
        return False
    body = s.recv(struct.unpack("!i", header)[0], socket.MSG_WAITALL)
    return body.startswith(b"#CHALLENGE#")


def closed_by_server(s: socket.socket, timeout: float) -> bool:
    """Wait up to ``timeout`` for the server to hang up (EOF or reset)."""
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def stats(server) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/stats", timeout=5) as r:
        return json.load(r)


def works(server, key_file) -> bool:
    with queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5) as c:
        q = c.queue("preauth")
        q.put({"ok": 1})
        task = q.get(timeout=5)
        q.ack(task)
        return task.payload == {"ok": 1}


def test_a_trickling_handshake_is_cut_at_the_whole_handshake_deadline(server):
    s = raw(server, "127.0.0.2")
    assert got_challenge(s)
    t0 = time.monotonic()
    cut = False
    # The trickle is the workload: a response announced as 200 bytes, sent one byte every 0.5 s,
    # each read by the server well within any per-read timeout. Bounded: 20 bytes, about 10 s.
    for byte in (struct.pack("!i", 200) + b"x" * 16)[:20]:
        try:
            s.sendall(bytes([byte]))
        except OSError:
            cut = True
            break
        if closed_by_server(s, 0.5):
            cut = True
            break
    elapsed = time.monotonic() - t0
    s.close()
    assert cut, "a peer trickling one byte every 0.5 s kept its handshake open for 10 s"
    assert elapsed < DEADLINE + 1.5, elapsed
    assert stats(server)["connections_refused"].get("handshake_timeout", 0) >= 1


def test_one_address_cannot_hold_more_than_its_share_of_handshakes(server, key_file):
    attackers = [raw(server, "127.0.0.3") for _ in range(10)]
    try:
        challenged = sum(got_challenge(s) for s in attackers)
        assert challenged == 3, f"{challenged} of 10 idle connections from one address were let in (limit 3)"
        assert works(server, key_file)  # another address is served while those 3 still wait
        assert stats(server)["connections_refused"]["max_handshakes_per_address"] == 7
        server.wait_for(r"event=connection_refused peer=127\.0\.0\.3:\d+ reason=max_handshakes_per_address")
    finally:
        for s in attackers:
            s.close()


def test_handshake_slots_are_capped_and_come_back_at_the_deadline(server, key_file):
    held = [raw(server, f"127.0.0.{10 + i}") for i in range(6)]  # one per address: the global cap
    try:
        assert all(got_challenge(s) for s in held)
        late = raw(server, "127.0.0.30")
        assert not got_challenge(late), "a 7th connection in its handshake was let in (limit 6)"
        late.close()
        server.wait_for(r"event=connection_refused peer=127\.0\.0\.30:\d+ reason=max_handshakes")
        # The idle ones are cut at their deadline; then a real client gets in again.
        assert all(closed_by_server(s, DEADLINE + 3) for s in held), "idle handshakes outlived their deadline"
        assert works(server, key_file)
    finally:
        for s in held:
            s.close()


def wrong_key_attempt(server, source: str) -> str:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5, source_address=(source, 0))
    sock.setblocking(True)  # multiprocessing's Connection reads blocking
    conn = mpc.Connection(sock.detach())
    try:
        handshake.connect(conn, b"w" * 32)
        return "authenticated"
    except AuthenticationError:
        return "wrong key"
    except (EOFError, OSError) as e:
        return f"refused ({type(e).__name__})"
    finally:
        conn.close()


def test_wrong_key_attempts_are_throttled_per_address(server, key_file):
    outcomes = [wrong_key_attempt(server, "127.0.0.40") for _ in range(5)]
    assert outcomes == ["wrong key"] * 3 + ["refused (EOFError)"] * 2, outcomes
    assert works(server, key_file)  # other addresses are not affected
    s = stats(server)
    assert s["auth_failures"] == 3 and s["connections_refused"]["auth_failures"] == 2
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert "queuekit_auth_failures_total 3\n" in metrics
    assert 'queuekit_connections_refused_total{reason="auth_failures"} 2\n' in metrics
    assert 'queuekit_connections_refused_total{reason="max_handshakes"} 0\n' in metrics
    server.wait_for(r"event=auth_failed peer=127\.0\.0\.40:\d+")


def vm_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmSize:\s+(\d+) kB", f.read()).group(1)) * 1024


def test_the_acceptor_survives_a_failed_thread_start_and_readiness_tells(tmp_path, key_file):
    """No thread can start while the server's address space is capped just above what it uses
    (a thread's stack does not fit): each new connection is dropped, the acceptor lives on,
    /readyz says 503, and once threads can start again clients are served."""
    server = ServerProc(tmp_path, key_file, env=base_env(**LIMITS))
    try:
        cap = vm_size(server.pid) + 4 * 1024 * 1024
        resource.prlimit(server.pid, resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
        try:
            with pytest.raises(ServerUnavailable):
                queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=1)
            server.wait_for(r"event=connection_dropped peer=127\.0\.0\.1:\d+ reason=thread_start_failed")
        finally:
            resource.prlimit(server.pid, resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert readyz(server) == 503  # it could not accept a moment ago
        wait_until(lambda: readyz(server) == 200, timeout=10, what="/readyz to say 200 again")
        assert works(server, key_file)
    finally:
        server.stop()


def readyz(server) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/readyz", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
