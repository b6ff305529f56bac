"""A request the server does not read (issue 14): the client's send timeout.

A frozen server (SIGSTOP, ``docker pause``) still has a kernel that accepts and acknowledges TCP,
but nothing reads: a large request (a put_many chunk of several MiB) fills the client's send
buffer and the server's receive buffer, and the client's send blocks. Without a send timeout it
blocked for ever (the reply deadline, SO_RCVTIMEO, starts only once the request is out). Now a
send that moves no byte for ``call_timeout`` fails and the call moves to the next address.

Fake servers here are real sockets on loopback that this test runs: they do queuekit's authkey
handshake (and TLS), answer ``accept_connection`` and ``ping``, then read a large request never
(a frozen server) or slowly (a slow link, which must be waited for). The last test freezes a
real leader of two servers on one PostgreSQL database.
"""

from __future__ import annotations

import pickle
import signal
import socket
import ssl
import struct
import threading
import time

import pytest
from test_failover import LEASE, drain, freeze, is_ready, leader_pair

import queuekit
from queuekit import handshake
from queuekit.errors import ServerUnavailable
from support.threaded_server import ThreadedServer

TASK_CHARS = 1_000_000  # a task just under the default 1 MiB limit (QUEUEKIT_MAX_TASK_BYTES)
# 12 of them in one put_many chunk (client.PUT_CHUNK_BYTES 16 MiB): 12 MB, more than the socket
# buffers of both ends hold on loopback (the client's send buffer grows to net.ipv4.tcp_wmem's
# 4 MiB at most; the fake server's receive buffer is set to RCVBUF).
TASKS = 12
RCVBUF = 128 * 1024
LARGE = 64 * 1024  # a request at least this large is "the put_many" for the fake servers


def payloads(tag: str = "", count: int = TASKS) -> list[str]:
    return [f"{tag}{i:02d}" + "x" * TASK_CHARS for i in range(count)]


def send_timeouts(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "event=send_timeout" in r.getMessage()]


class _Frames:
    """The wire's framing (4-byte length, or -1 and 8 bytes) on a plain or TLS socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def read_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 65536))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def header(self) -> int:
        (size,) = struct.unpack("!i", self.read_exact(4))
        return struct.unpack("!Q", self.read_exact(8))[0] if size == -1 else size

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        return self.read_exact(self.header())

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(struct.pack("!i", len(data)) + data)

    def send(self, obj) -> None:
        self.send_bytes(pickle.dumps(obj))


class FakeServer(ThreadedServer):
    """A queuekit server as far as the handshake, ``accept_connection`` and ``ping`` go. A large
    request (a put_many) is then read never (``read_rate`` None: a frozen server) or at
    ``read_rate`` bytes a second (a slow link), then answered with task ids.

    ``partial``: per frozen connection, (the size the request announced, the bytes of it that
    reached this end), read to the end of the stream once the client closed it (``drain``)."""

    def __init__(self, key: bytes, *, read_rate: float | None = None, tls: ssl.SSLContext | None = None):
        self.key, self.read_rate, self.tls = key, read_rate, tls
        self.stalled: list[tuple[_Frames, int]] = []
        self.partial: list[tuple[int, int]] = []
        self.answered_puts = 0
        self.read_done = 0.0
        # A fixed, small receive buffer (no autotuning): the client's sends block once it is full.
        super().__init__(rcvbuf=RCVBUF)

    def handle(self, sock: socket.socket) -> None:
        sock.settimeout(30)  # no thread of this test waits for ever
        try:
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True)
            frames = _Frames(sock)
            handshake.serve(frames, [self.key])
            while True:
                size = frames.header()
                if size >= LARGE and self.read_rate is None:
                    self.stalled.append((frames, size))  # the rest stays unread: frozen
                    return
                body = frames.read_exact(size) if size < LARGE else self._read_slowly(frames, size)
                _, method, args, _ = pickle.loads(body)
                if method == "ping":
                    frames.send(("#RETURN", {"server": "queuekit", "version": "0", "max_task_bytes": 1 << 20}))
                elif method == "put_many":
                    self.read_done = time.monotonic()
                    self.answered_puts += 1
                    frames.send(("#RETURN", list(range(len(args[1])))))
                else:
                    frames.send(("#RETURN", None))
        except (OSError, EOFError):
            sock.close()

    def _read_slowly(self, frames: _Frames, size: int) -> bytes:
        assert self.read_rate is not None
        piece = 32 * 1024
        body = bytearray()
        while len(body) < size:
            body += frames.read_exact(min(piece, size - len(body)))
            time.sleep(piece / self.read_rate)  # the link's pace, not a wait for a condition
        return bytes(body)

    def drain(self) -> None:
        """Read every stalled request to the end of its stream (the client closed it)."""
        for frames, size in self.stalled:
            got = 0
            try:
                while chunk := frames.sock.recv(1 << 20):
                    got += len(chunk)
            except OSError:
                got = -1
            self.partial.append((size, got))
            frames.sock.close()

    def close(self) -> None:
        super().close()
        for thread in self.threads:
            thread.join(timeout=5)


@pytest.fixture
def fakes():
    made: list[FakeServer] = []

    def make(key_file, **kw) -> FakeServer:
        server = FakeServer(key_file.read_bytes().strip(), **kw)
        made.append(server)
        return server

    yield make
    for server in made:
        for frames, _ in server.stalled:
            frames.sock.close()
        server.close()


def in_thread(target, timeout: float, meanwhile=lambda: None) -> tuple[list, float]:
    """Run ``target`` in a thread, then ``meanwhile`` here, then wait at most ``timeout`` s;
    (its outcome, seconds from the end of ``meanwhile``). The outcome is ``[("ok", value)]``,
    ``[("raised", exception)]``, or ``[]`` if it still runs."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(("ok", target()))
        except BaseException as e:
            outcome.append(("raised", e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    meanwhile()
    t0 = time.monotonic()
    thread.join(timeout)
    return outcome, time.monotonic() - t0


def test_a_put_many_a_server_does_not_read_raises_server_unavailable(key_file, fakes, caplog):
    """One server that stops reading (frozen): the put_many of 12 MB fails after its sends
    stalled for call_timeout on each attempt (the first connection, then reconnects within
    connect_timeout), with ``send_timeout`` logged, instead of blocking for ever. The server got
    only a part of each request: it could never have run one."""
    call_timeout, connect_timeout = 1.0, 2.0
    frozen = fakes(key_file)
    client = queuekit.connect(
        frozen.address, authkey_file=str(key_file), call_timeout=call_timeout, connect_timeout=connect_timeout
    )
    try:
        outcome, took = in_thread(lambda: client.queue("big").put_many(payloads()), timeout=60.0)
        print(f"\nput_many to a server that does not read: {outcome and outcome[0][0]} after {took:.2f} s")
        print("\n".join(send_timeouts(caplog)))
        assert outcome, "the put_many is still blocked in send after 60 s"
        kind, error = outcome[0]
        assert kind == "raised" and isinstance(error, ServerUnavailable), outcome
        assert "put_many failed: the server took no byte of the request for 1 s (send_timeout)" in str(error)
        timeouts = send_timeouts(caplog)
        assert timeouts and all(f"server={frozen.address} method=put_many after=1" in t for t in timeouts), timeouts
        # Each attempt stalls between call_timeout and twice that (the write that filled the
        # buffers returns after its own timeout with what it moved; the next one fails); the
        # retries stop once connect_timeout has passed since the first failure.
        assert call_timeout <= took < 2 * call_timeout + connect_timeout + 2 * 2 * call_timeout + 2.0, took
    finally:
        client.close()
    frozen.drain()
    print(f"requests announced / bytes of them the server got: {frozen.partial}")
    assert frozen.partial and len(frozen.partial) == len(timeouts)
    assert all(0 <= got < size for size, got in frozen.partial), frozen.partial
    assert frozen.answered_puts == 0


@pytest.mark.parametrize("use_tls", [False, True], ids=["plain", "tls"])
def test_a_slow_link_that_keeps_reading_is_waited_for(tmp_path, key_file, fakes, use_tls, caplog):
    """The send timeout bounds a send that makes no progress, not a whole request: a server that
    reads a 16 MB put_many at ~3 MB/s (longer than call_timeout in all) gets it and answers.
    Over TLS the socket's timeout is a deadline per SSL write, so the transport writes in slices;
    one sendall of the whole message failed after call_timeout here."""
    from test_tls import Certs

    tls_options: dict = {}
    server_tls = None
    if use_tls:
        certs = Certs(tmp_path)
        server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_tls.load_cert_chain(str(certs.server_cert), str(certs.server_key))
        tls_options = {"tls_ca_file": str(certs.ca_file)}
    slow = fakes(key_file, read_rate=3_000_000, tls=server_tls)
    client = queuekit.connect(
        slow.address, authkey_file=str(key_file), call_timeout=3.0, connect_timeout=2.0, **tls_options
    )
    try:
        t0 = time.monotonic()
        outcome, took = in_thread(lambda: client.queue("big").put_many(payloads(count=16)), timeout=60.0)
        print(f"\nput_many of 16 MB over a ~3 MB/s link: {outcome and outcome[0][0]} after {took:.2f} s")
        print(f"request fully read by the server after {slow.read_done - t0:.2f} s")
        assert outcome == [("ok", list(range(16)))], outcome
        assert took > 2.0, f"the link was not slow ({took:.2f} s): the test proves nothing"
        assert not send_timeouts(caplog)
        assert slow.answered_puts == 1
    finally:
        client.close()


def test_a_request_still_in_the_send_buffer_does_not_start_the_reply_deadline(key_file, fakes, caplog):
    """send() returns once the request is in our send buffer (up to 4 MiB on loopback), not once
    the server has it: on a link slower than that buffer drains within call_timeout, the reply
    deadline fired while the server was still reading, and the put went again (enqueued twice).
    The deadline starts once the server's kernel has acknowledged the whole request."""
    slow = fakes(key_file, read_rate=1_000_000)
    client = queuekit.connect(slow.address, authkey_file=str(key_file), call_timeout=2.0, connect_timeout=2.0)
    try:
        outcome, took = in_thread(lambda: client.queue("big").put_many(payloads(count=8)), timeout=60.0)
        print(f"\nput_many of 8 MB at ~1 MB/s, call_timeout 2 s: {outcome and outcome[0][0]} after {took:.2f} s")
        assert outcome == [("ok", list(range(8)))], outcome
        assert took > 4.0, f"the link was not slow ({took:.2f} s): the test proves nothing"
        assert not [r.getMessage() for r in caplog.records if "event=call_timeout" in r.getMessage()]
        assert slow.answered_puts == 1
    finally:
        client.close()


def test_put_many_sent_to_a_frozen_leader_completes_on_the_new_leader(tmp_path, key_file, pg_db, caplog):
    """The HA case: a client with an open connection to the leader sends a 12 MB put_many after
    the leader froze. The send stalls; after call_timeout without progress the client drops the
    connection and sends the put_many to the new leader: takeover plus at most twice
    call_timeout. Every task is there once (the frozen leader got part of the request only)."""
    call_timeout = 3.0
    a, b = leader_pair(tmp_path, key_file, pg_db)
    client = queuekit.connect(
        f"{a.address},{b.address}", authkey_file=str(key_file), connect_timeout=30, call_timeout=call_timeout
    )
    q = client.queue("jobs")
    connected, frozen = threading.Event(), threading.Event()

    def producer() -> list[int]:
        q.put("before")  # this thread's connection to the leader is open (connections are per thread)
        assert str(client.address) == a.address
        connected.set()
        assert frozen.wait(30)
        return q.put_many(payloads("p"))  # sent to the frozen leader on that connection

    def freeze_the_leader() -> None:
        assert connected.wait(30)
        freeze(a)
        frozen.set()

    try:
        try:
            outcome, took = in_thread(producer, timeout=LEASE + 2 * call_timeout + 30.0, meanwhile=freeze_the_leader)
            print(f"\nput_many of 12 MB to a frozen leader: {outcome and outcome[0][0]} after {took:.2f} s")
            print("\n".join(send_timeouts(caplog)))
            assert outcome, f"the put_many is still blocked in send after {took:.0f} s"
            assert outcome[0][0] == "ok", outcome
            assert len(outcome[0][1]) == TASKS
            assert any(f"server={a.address} method=put_many after=3" in t for t in send_timeouts(caplog))
            assert str(client.address) == b.address and is_ready(b)
            assert took < LEASE + 2 * call_timeout + 10.0, f"the put_many took {took:.1f} s"
            with queuekit.connect(b.address, authkey_file=str(key_file), connect_timeout=5) as reader:
                left = drain(reader, "jobs")
        finally:
            a.signal(signal.SIGCONT)
    finally:
        client.close()
    assert sorted(p[:3] for p in left) == ["bef"] + [f"p{i:02d}" for i in range(TASKS)]
