"""Nothing from the wire runs code (issue 11): hostile pickles from an authenticated client in every
position, hostile replies from a fake server to `queuekit check`, a worker and the Python client, a
relay that injects pickles both ways after relaying the handshake, an amplification payload, and a
bounded fuzz of frames and pickles against a live server (raw and through a stock client).

Every test checks that a marker file which each hostile pickle would create is never created."""

from __future__ import annotations

import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time
from multiprocessing import connection as mpc
from multiprocessing.managers import BaseManager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import queuekit
from queuekit.transport import API_IDENT
from support.procs import ROOT, Proc, ServerProc, base_env, wait_until, write_key
from support.threaded_server import ThreadedServer
from support.wire_attacks import Gadget, amplification_request, frame, fuzz_bodies, gadgets, raw_pickles

try:  # the server's handshake (HMAC-SHA256 for queuekit's own clients), when this tree has one
    from queuekit import handshake as _handshake
except ImportError:  # pragma: no cover - older trees: the stock functions
    _handshake = None


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One server for the module (each test checks it still serves); its marker directory."""
    base = tmp_path_factory.mktemp("wire")
    key_file = write_key(base / "authkey")
    proc = ServerProc(base, key_file)
    Proc.all.remove(proc)  # not the per-test reaper's: this module stops it
    yield proc, key_file, base
    proc.stop()
    proc.cleanup()


@pytest.fixture
def marker(shared, request):
    path = shared[2] / f"pwned-{request.node.name.replace('/', '_')}"
    yield path
    assert not path.exists(), "a pickle from the wire ran code"


def key_of(key_file) -> bytes:
    return key_file.read_bytes().strip()


def served(port: int, key: bytes, name: str = "wire-test"):
    conn = mpc.Client(("127.0.0.1", port), authkey=key)
    conn.send((None, "accept_connection", (name,), {}))
    assert conn.recv() == ("#RETURN", None)
    return conn


def refusals(server) -> int:
    return server.log().count("event=request_refused")


def closed_unanswered(conn, timeout: float = 10.0) -> bool:
    """True if the server hung up on ``conn`` without answering (False: it answered)."""
    assert conn.poll(timeout), "the server neither answered nor closed the connection"
    try:
        reply = conn.recv()
    except (EOFError, OSError):
        return True
    print("answered:", repr(reply)[:200])
    return False


def still_serving(server, key_file) -> None:
    with queuekit.connect(server.address, authkey=key_of(key_file), connect_timeout=5) as c:
        q = c.queue("after-attack")
        q.put({"ok": True})
        assert q.get().payload == {"ok": True}


class StockManager(BaseManager):
    pass


StockManager.register("get_task_queue")
StockManager.register("get_queue")


# -- hostile pickles from an authenticated client, in every position --------------------------

POSITIONS = ["put_many argument", "queue name", "method kwargs", "raw frame", "first request", "stock proxy put"]


@pytest.mark.parametrize("gadget_name", ["os.system", "subprocess.Popen", "builtins.eval", "builtins.exec"])
@pytest.mark.parametrize("position", POSITIONS)
def test_hostile_pickle_from_a_client_runs_nothing_and_is_refused(shared, marker, position, gadget_name):
    server, key_file, _ = shared
    key = key_of(key_file)
    gadget = gadgets(str(marker))[gadget_name]
    before = refusals(server)
    if position == "stock proxy put":
        manager = StockManager(address=("127.0.0.1", server.port), authkey=key)
        manager.connect()
        proxy = manager.get_task_queue()
        with pytest.raises((EOFError, OSError)):  # hung up on, not answered
            proxy.put(gadget)
    else:
        if position == "first request":
            conn = mpc.Client(("127.0.0.1", server.port), authkey=key)
            conn.send(gadget)
        else:
            conn = served(server.port, key)
            if position == "put_many argument":
                conn.send((API_IDENT, "put_many", ("wire", [gadget], 0.0), {}))
            elif position == "queue name":
                conn.send((API_IDENT, "qsize", (gadget,), {}))
            elif position == "method kwargs":
                conn.send((API_IDENT, "qsize", ("wire",), {"queue": gadget}))
            else:  # a raw frame: the pickle alone, not even a request tuple
                os.write(conn.fileno(), frame(pickle.dumps(gadget)))
        assert closed_unanswered(conn)
        conn.close()
    still_serving(server, key_file)
    assert not marker.exists(), f"{gadget_name} ran in the server"
    wait_until(lambda: refusals(server) == before + 1, timeout=5, what="one request_refused line")
    line = server.log().split("event=request_refused")[-1].splitlines()[0]
    assert "reason=unpickling" in line and "touch" not in line  # the peer and why, no payload
    assert "loop_error" not in server.log()


@pytest.mark.parametrize("name", sorted(raw_pickles("/m")))
def test_every_object_opcode_is_refused_on_a_served_connection(shared, marker, name):
    server, key_file, _ = shared
    conn = served(server.port, key_of(key_file))
    before = refusals(server)
    conn.send_bytes(raw_pickles(str(marker))[name])
    assert closed_unanswered(conn)
    wait_until(lambda: refusals(server) == before + 1, timeout=5, what="one request_refused line")
    still_serving(server, key_file)


def test_a_plain_undecodable_frame_is_still_answered_and_the_connection_kept(shared):
    server, key_file, _ = shared
    conn = served(server.port, key_of(key_file))
    conn.send_bytes(b"\x80\x04N\x8c")  # truncated: broken, not hostile
    kind, error = conn.recv()
    assert kind == "#ERROR" and "could not be decoded" in str(error)
    conn.send((API_IDENT, "qsize", ("kept",), {}))
    assert conn.recv() == ("#RETURN", 0)
    conn.close()


def test_stock_clients_still_work_unmodified(shared):
    server, key_file, _ = shared
    before = refusals(server)
    manager = StockManager(address=("127.0.0.1", server.port), authkey=key_of(key_file))
    manager.connect()
    proxy = manager.get_queue("stock-roundtrip")
    for item in ({"to": "a@example.org", "n": [1, 2.5, None]}, ["a", 1], "text", 7):
        proxy.put(item)
    got = [proxy.get() for _ in range(4)]
    assert got == [{"to": "a@example.org", "n": [1, 2.5, None]}, ["a", 1], "text", 7]
    assert refusals(server) == before


# -- amplification ----------------------------------------------------------------------------


def test_amplification_is_refused_in_milliseconds_and_nobody_else_waits(shared):
    server, key_file, _ = shared
    key = key_of(key_file)
    body = amplification_request(API_IDENT)  # ~45 KB that expand to ~230 MB of JSON text
    abusers = [served(server.port, key, "abuser") for _ in range(5)]
    with queuekit.connect(server.address, authkey=key, connect_timeout=5) as c:
        c.queue("bystander").qsize()  # connected and warm
        before = refusals(server)
        for conn in abusers:
            conn.send_bytes(body)
        started = time.perf_counter()
        c.queue("bystander").qsize()  # answered after (or between) the abusive requests
        elapsed = time.perf_counter() - started
    print(f"\nbystander's call during 5 amplification requests: {elapsed * 1000:.1f} ms")
    assert elapsed < 0.25
    for conn in abusers:
        assert closed_unanswered(conn)
    wait_until(lambda: refusals(server) == before + 5, timeout=5, what="five request_refused lines")
    assert server.log().count("reason=amplification") >= 5


# -- a malicious server: hostile replies to queuekit's clients -------------------------------


class FakeServer(ThreadedServer):
    """Completes the authkey handshake, answers ``accept_connection`` and ``ping`` like a queuekit
    server until the request named ``evil_from``; from then on every reply is ``evil``."""

    def __init__(self, key: bytes, evil_from: str, evil: bytes):
        self.key, self.evil_from, self.evil = key, evil_from, evil
        self.evil_sent = 0
        super().__init__()

    def handle(self, sock: socket.socket) -> None:
        conn = mpc.Connection(sock.detach())
        try:
            if _handshake is not None:
                _handshake.serve(conn, [self.key])
            else:
                mpc.deliver_challenge(conn, self.key)
                mpc.answer_challenge(conn, self.key)
            evil = False
            while True:
                _, method, _, _ = pickle.loads(conn.recv_bytes())
                evil = evil or method == self.evil_from
                if evil:
                    # Counted before sending: the client may read it, refuse it and the test check
                    # the count before this thread runs again.
                    self.evil_sent += 1
                    conn.send_bytes(self.evil)
                elif method == "ping":
                    conn.send(
                        ("#RETURN", {"server": "queuekit", "version": "0", "durable": False, "max_task_bytes": 1 << 20})
                    )
                else:
                    conn.send(("#RETURN", None))
        except (OSError, EOFError, Exception):
            pass
        finally:
            conn.close()


def evil_replies(marker) -> dict[str, bytes]:
    g = gadgets(str(marker))
    return {
        "os.system in #RETURN": pickle.dumps(("#RETURN", g["os.system"])),
        "builtins.eval in #ERROR": pickle.dumps(("#ERROR", g["builtins.eval"])),
        "raw GLOBAL pickle": raw_pickles(str(marker))["GLOBAL+REDUCE (protocol 0)"],
    }


@pytest.fixture
def fake_server(tmp_path):
    made = []

    def make(evil_from: str, evil: bytes) -> tuple[FakeServer, object]:
        key_file = write_key(tmp_path / "fake-authkey")
        server = FakeServer(key_of(key_file), evil_from, evil)
        made.append(server)
        return server, key_file

    yield make
    for server in made:
        server.close()


def run_command(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "queuekit", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=base_env(QK_RECORD=os.devnull),
        cwd=str(ROOT),
    )


@pytest.mark.parametrize("evil_name", ["os.system in #RETURN", "builtins.eval in #ERROR", "raw GLOBAL pickle"])
@pytest.mark.parametrize("evil_from", ["accept_connection", "ping"])
def test_queuekit_check_runs_nothing_from_a_malicious_server(fake_server, tmp_path, evil_from, evil_name):
    marker = tmp_path / "pwned"
    fake, key_file = fake_server(evil_from, evil_replies(marker)[evil_name])
    out = run_command(
        "check", "--server", f"127.0.0.1:{fake.port}", "--authkey-file", str(key_file), "--connect-timeout", "3"
    )
    assert fake.evil_sent >= 1
    assert not marker.exists(), "the server's reply ran code in queuekit check"
    assert out.returncode != 0, out
    assert "refused" in out.stderr, out.stderr


@pytest.mark.parametrize("evil_from", ["accept_connection", "ping", "take"])  # take: what a get sends
def test_a_worker_runs_nothing_from_a_malicious_server(fake_server, tmp_path, evil_from):
    marker = tmp_path / "pwned"
    fake, key_file = fake_server(evil_from, evil_replies(marker)["os.system in #RETURN"])
    out = run_command(
        "consume",
        "--server",
        f"127.0.0.1:{fake.port}",
        "--authkey-file",
        str(key_file),
        "--connect-timeout",
        "3",
        "--queue",
        "wire",
        "--handler",
        "handlers:record",
    )
    assert fake.evil_sent >= 1
    assert not marker.exists(), "the server's reply ran code in the worker"
    assert out.returncode != 0, out
    assert "refused" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("evil_name", ["os.system in #RETURN", "builtins.eval in #ERROR", "raw GLOBAL pickle"])
@pytest.mark.parametrize("evil_from", ["accept_connection", "ping", "take"])  # take: what a get sends
def test_the_python_client_runs_nothing_from_a_malicious_server(fake_server, tmp_path, evil_from, evil_name):
    marker = tmp_path / "pwned"
    fake, key_file = fake_server(evil_from, evil_replies(marker)[evil_name])
    with pytest.raises(queuekit.QueuekitError, match="refused"):
        client = queuekit.connect(f"127.0.0.1:{fake.port}", authkey_file=str(key_file), connect_timeout=3)
        try:
            client.queue("wire").get(timeout=0)
        finally:
            client.close()
    assert fake.evil_sent == 1  # refused once, never retried
    assert not marker.exists(), "the server's reply ran code in the client"


# -- the relay: handshake relayed to the real server, then pickles injected both ways ---------


class Relay:
    """Listens on loopback; for one client, relays the handshake frames (3 each way) and the
    client's first request and its answer to the real server, then injects ``to_server`` in place
    of the client's next request and answers the client with ``to_client``."""

    def __init__(self, server_port: int, to_server: bytes, to_client: bytes):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server_port, self.to_server, self.to_client = server_port, to_server, to_client
        self.injected = threading.Event()
        self.server_hung_up = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def _read_frame(sock: socket.socket) -> bytes:
        def exactly(n: int) -> bytes:
            data = b""
            while len(data) < n:
                chunk = sock.recv(n - len(data))
                if not chunk:
                    raise EOFError
                data += chunk
            return data

        header = exactly(4)
        return header + exactly(struct.unpack("!i", header)[0])

    def _run(self) -> None:
        client, _ = self.sock.accept()
        upstream = socket.create_connection(("127.0.0.1", self.server_port))
        try:
            # The handshake (challenge, response, welcome; then the client's challenge, the
            # server's response, welcome), accept_connection and its answer: relayed untouched.
            down, up = (upstream, client), (client, upstream)
            for src, dst in [down, up, down, up, down, up, up, down]:
                dst.sendall(self._read_frame(src))
            self._read_frame(client)  # the client's next request is swallowed...
            upstream.sendall(frame(self.to_server))  # ...the server gets the attacker's pickle
            client.sendall(frame(self.to_client))  # and the client the attacker's reply
            self.injected.set()
            try:
                self._read_frame(upstream)
            except (EOFError, OSError):
                self.server_hung_up.set()
        except (EOFError, OSError):
            pass
        finally:
            client.close()
            upstream.close()
            self.sock.close()


def test_a_relay_injects_nothing_that_runs(shared, tmp_path):
    server, key_file, _ = shared
    server_marker, client_marker = tmp_path / "pwned-server", tmp_path / "pwned-client"
    before = refusals(server)
    relay = Relay(
        server.port,
        to_server=pickle.dumps((API_IDENT, "qsize", (gadgets(str(server_marker))["os.system"],), {})),
        to_client=pickle.dumps(("#RETURN", gadgets(str(client_marker))["os.system"])),
    )
    with pytest.raises(queuekit.QueuekitError, match="refused"):
        queuekit.connect(f"127.0.0.1:{relay.port}", authkey=key_of(key_file), connect_timeout=3)  # pings
    assert relay.injected.wait(5)
    assert relay.server_hung_up.wait(5), "the server answered the injected pickle instead of hanging up"
    wait_until(lambda: refusals(server) == before + 1, timeout=5, what="the server's request_refused line")
    still_serving(server, key_file)
    assert not server_marker.exists(), "the relay's pickle ran code in the server"
    assert not client_marker.exists(), "the relay's pickle ran code in the client"


# -- bounded fuzz against the live server ----------------------------------------------------

FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


def _answered_or_closed(conn) -> None:
    assert conn.poll(10), "neither answered nor closed"
    try:
        kind, _ = conn.recv()
        assert kind in ("#ERROR", "#RETURN", "#TRACEBACK")
    except (EOFError, OSError):
        pass


@FUZZ
@given(body=fuzz_bodies())
def test_fuzz_frames_against_the_loop(shared, body):
    server, key_file, _ = shared
    conn = served(server.port, key_of(key_file), "fuzz")
    conn.send_bytes(body)
    _answered_or_closed(conn)
    conn.close()
    with queuekit.connect(server.address, authkey=key_of(key_file), connect_timeout=5) as c:
        assert c.queue("fuzz-check").qsize() == 0
    assert "loop_error" not in server.log()


@FUZZ
@given(body=fuzz_bodies())
def test_fuzz_frames_as_the_first_request(shared, body):
    server, key_file, _ = shared
    conn = mpc.Client(("127.0.0.1", server.port), authkey=key_of(key_file))
    conn.send_bytes(body)
    _answered_or_closed(conn)
    conn.close()
    with queuekit.connect(server.address, authkey=key_of(key_file), connect_timeout=5) as c:
        assert c.queue("fuzz-check").qsize() == 0


plain_items = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(
    item=st.one_of(plain_items, st.sampled_from(sorted(gadgets("/m"))), st.binary(max_size=50)),
    body=fuzz_bodies(),
)
def test_fuzz_the_same_corpus_through_a_stock_client(shared, item, body):
    """A stock BaseManager client puts fuzzed items (plain data, gadgets, bytes) through its proxy
    and sends the fuzz corpus as raw frames on its own connection: the server keeps serving and
    nothing runs."""
    server, key_file, base = shared
    marker = base / "pwned-stock-fuzz"
    if isinstance(item, str) and item in gadgets("/m"):
        item = gadgets(str(marker))[item]
    manager = StockManager(address=("127.0.0.1", server.port), authkey=key_of(key_file))
    manager.connect()
    proxy = manager.get_task_queue()
    try:
        proxy.put(item)
    except Exception:
        pass  # refused (hung up) or an error reply: either way the server must go on
    proxy = manager.get_task_queue()
    proxy.qsize()  # opens the proxy's connection
    conn = proxy._tls.connection  # the stock client's own connection
    conn.send_bytes(body)
    _answered_or_closed(conn)
    with queuekit.connect(server.address, authkey=key_of(key_file), connect_timeout=5) as c:
        c.queue("fuzz-check").qsize()
    assert not marker.exists()
    assert not isinstance(item, Gadget) or "event=request_refused" in server.log()
