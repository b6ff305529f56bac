"""The loop's TLS reads and writes when the TLS layer needs the other direction (a TLS 1.3 key
update, renegotiation): the session waits for the event the operation needs, then retries the
same operation; bytes decrypted inside the TLS object are drained without a selector event.

A scripted stand-in for the ``ssl.SSLSocket`` (on a real socketpair fd, so the selector works)
plays the TLS layer; the real process tests cover real TLS (tests/process/test_tls.py)."""

from __future__ import annotations

import selectors
import socket
import ssl

import pytest

from queuekit import transport
from queuekit.broker import Broker
from queuekit.keys import Grant
from queuekit.loop import IDLE, WRITING, Loop
from queuekit.settings import Secret


class ScriptedTLS:
    """``recv``/``send`` return or raise what the script says, in order."""

    def __init__(self, reads=(), writes=(), pending=()):
        self.reads, self.writes, self.pendings = list(reads), list(writes), list(pending)
        self.sent: list[bytes] = []
        self.send_args: list[bytes] = []

    def setblocking(self, flag):
        pass

    def pending(self):
        return self.pendings.pop(0) if self.pendings else 0

    def recv(self, n):
        step = self.reads.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step

    def send(self, data):
        self.send_args.append(bytes(data))
        step = self.writes.pop(0) if self.writes else None
        if isinstance(step, BaseException):
            raise step
        self.sent.append(bytes(data))
        return len(data)


class FakeConn:
    max_message_bytes = 1 << 20

    def __init__(self, fd, tls):
        self._fd, self.tls, self.peer = fd, tls, "test:1"

    def fileno(self):
        return self._fd

    def take_buffered(self):
        return b""

    def close(self):
        pass


@pytest.fixture
def opened():
    a, b = socket.socketpair()
    answered = []

    def dispatch(session, request):
        answered.append(request)
        return "ok"

    loop = Loop(dispatch, lambda e: ("#ERROR", e), Broker())
    grant = Grant("admin", "admin", Secret(b"k" * 32))

    def open_session(tls):
        loop._open(FakeConn(a.fileno(), tls), "t", grant)
        return loop._sessions[a.fileno()]

    yield loop, open_session, answered
    a.close()
    b.close()


REQUEST = transport.encode_message(("queuekit.v1", "ping", (), {}))


def test_a_read_that_needs_to_write_waits_for_writable_then_retries(opened):
    loop, open_session, answered = opened
    tls = ScriptedTLS(reads=[ssl.SSLWantWriteError(), REQUEST, ssl.SSLWantReadError()])
    session = open_session(tls)
    assert session.events == selectors.EVENT_READ and session.tls is tls
    session.on_read(session)  # the TLS layer must write first
    assert session.events == selectors.EVENT_WRITE and session.tls_retry is not None
    assert not answered
    session.on_write(session)  # writable: the read is retried, the request answered
    assert answered == [("queuekit.v1", "ping", (), {})]
    assert session.tls_retry is None and session.events == selectors.EVENT_READ and session.state is IDLE
    assert transport.decode_reply(tls.sent[0][4:]) == ("#RETURN", "ok")


def test_a_write_that_needs_to_read_waits_for_readable_then_retries_the_same_bytes(opened):
    loop, open_session, answered = opened
    tls = ScriptedTLS(reads=[REQUEST], writes=[ssl.SSLWantReadError(), ssl.SSLWantWriteError(), None])
    session = open_session(tls)
    session.on_read(session)  # the reply's write needs a read first
    assert session.state is WRITING and session.events == selectors.EVENT_READ and session.tls_retry is not None
    session.on_read(session)  # readable: the write is retried (and now waits for writable)
    assert session.state is WRITING and session.events == selectors.EVENT_WRITE and session.tls_retry is None
    session.on_write(session)
    assert session.state is IDLE and session.events == selectors.EVENT_READ
    assert len(set(tls.send_args)) == 1  # every attempt got the same bytes
    assert transport.decode_reply(tls.sent[0][4:]) == ("#RETURN", "ok")


def test_bytes_pending_inside_the_tls_object_are_drained_in_the_same_event(opened):
    loop, open_session, answered = opened
    half = len(REQUEST) // 2
    # One recv returns part of a record; pending() says the rest is decrypted already.
    tls = ScriptedTLS(reads=[REQUEST[:half], REQUEST[half:] + REQUEST], pending=[len(REQUEST) - half, 0])
    session = open_session(tls)
    session.on_read(session)
    assert not tls.reads  # nothing was left inside the TLS object
    assert answered == [("queuekit.v1", "ping", (), {})] * 2  # both requests answered in this event
