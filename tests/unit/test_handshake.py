"""The authkey handshake over a real socket pair: SHA-256 for queuekit, MD5 only from stock clients."""

import hmac
import threading
from multiprocessing import AuthenticationError
from multiprocessing import connection as mpc

import pytest

from queuekit import handshake

OLD, NEW, OTHER = b"o" * 32, b"n" * 32, b"x" * 32


def run_pair(server_side, client_side):
    """Run both ends on a connected pair of ``multiprocessing`` connections; return both outcomes."""
    a, b = mpc.Pipe()  # a socket pair on Unix: the same framing as TCP
    out = {}

    def side(name, fn, conn):
        try:
            out[name] = fn(conn)
        except Exception as e:  # the test inspects it
            out[name] = e
        finally:
            conn.close()  # the other side then sees EOF instead of hanging

    t = threading.Thread(target=side, args=("server", server_side, a))
    t.start()
    side("client", client_side, b)
    t.join(10)
    assert not t.is_alive()
    return out["server"], out["client"]


def test_queuekit_ends_authenticate_with_sha256_and_the_server_learns_which_key():
    frames = []

    def client(conn):
        orig = conn.send_bytes

        def record(data):
            frames.append(bytes(data))
            orig(data)

        conn.send_bytes = record
        return handshake.connect(conn, NEW)

    server, client_result = run_pair(lambda c: handshake.serve(c, [OLD, NEW]), client)
    assert server == 1 and client_result is None  # the new key of a rotation pair
    response = frames[0]
    assert response.startswith(b"{sha256}") and len(response) == len(b"{sha256}") + 32


def test_wrong_key_fails_on_both_ends():
    server, client = run_pair(lambda c: handshake.serve(c, [OLD]), lambda c: handshake.connect(c, OTHER))
    assert isinstance(server, AuthenticationError)
    assert isinstance(client, AuthenticationError | EOFError | OSError)


def test_stock_client_of_an_older_python_is_served_with_md5():
    """Python 3.11's stock client answers with a raw HMAC-MD5 and sends a 20-byte challenge."""

    def stock_311_client(conn):
        message = conn.recv_bytes(256)[len(b"#CHALLENGE#") :]
        conn.send_bytes(hmac.new(NEW, message, "md5").digest())
        assert conn.recv_bytes(256) == b"#WELCOME#"
        nonce = b"n" * 20
        conn.send_bytes(b"#CHALLENGE#" + nonce)
        assert conn.recv_bytes(256) == hmac.new(NEW, nonce, "md5").digest()
        conn.send_bytes(b"#WELCOME#")
        return "ok"

    assert run_pair(lambda c: handshake.serve(c, [OLD, NEW]), stock_311_client) == (1, "ok")


def test_queuekit_client_refuses_an_md5_challenge_from_a_fake_server():
    """A fake server must not get an MD5 MAC of a message it chose (offline guessing material)."""
    sent = []

    def fake_server(conn):
        conn.send_bytes(b"#CHALLENGE#" + b"z" * 20)  # legacy, unprefixed
        try:
            sent.append(conn.recv_bytes(256))
        except EOFError:
            pass

    _, client = run_pair(fake_server, lambda c: handshake.connect(c, NEW))
    assert isinstance(client, AuthenticationError) and "HMAC-SHA256" in str(client)
    assert sent == []  # nothing was answered


def test_queuekit_client_refuses_a_server_that_answers_with_md5():
    def downgrading_server(conn):
        message = _PREFIXED = b"{sha256}" + b"s" * 40
        conn.send_bytes(b"#CHALLENGE#" + _PREFIXED)
        conn.recv_bytes(256)
        conn.send_bytes(b"#WELCOME#")
        challenge = conn.recv_bytes(256)[len(b"#CHALLENGE#") :]
        conn.send_bytes(hmac.new(NEW, challenge, "md5").digest())  # right key, weak digest
        return message

    _, client = run_pair(downgrading_server, lambda c: handshake.connect(c, NEW))
    assert isinstance(client, AuthenticationError)


@pytest.mark.parametrize("garbage", [b"", b"#CHALLENGE#", b"hello", b"#CHALLENGE#{sha256}short"])
def test_malformed_challenges_are_refused(garbage):
    def server(conn):
        conn.send_bytes(garbage)

    _, client = run_pair(server, lambda c: handshake.connect(c, NEW))
    assert isinstance(client, AuthenticationError | EOFError)


def test_a_wrong_key_is_counted_before_the_client_is_told():
    """The server's throttle counts failures in ``on_failure``: had the client been told first, it
    could connect again before its failure was counted and get one try more than the limit."""
    told = threading.Event()
    seen_before_count = []

    def count():
        seen_before_count.append(told.wait(0.5))  # the client must not have its answer yet

    def client(conn):
        try:
            handshake.connect(conn, OTHER)
        finally:
            told.set()

    server, client_result = run_pair(lambda c: handshake.serve(c, [OLD], on_failure=count), client)
    assert isinstance(server, AuthenticationError)
    assert isinstance(client_result, AuthenticationError)
    assert seen_before_count == [False]
