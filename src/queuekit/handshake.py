"""The authkey handshake: a mutual HMAC challenge/response, on the manager's wire format.

The bytes are those of ``multiprocessing.connection`` (``#CHALLENGE#`` + message, the response,
``#WELCOME#`` / ``#FAILURE#``, each a length-prefixed frame), in the form Python 3.12 introduced:
the challenge carries a ``{sha256}`` prefix and the response names its digest. What differs from
the standard library's functions, and why:

- queuekit's server and clients use HMAC-SHA256 on every Python version (3.11's functions use
  HMAC-MD5), and a queuekit client refuses a challenge without the ``{sha256}`` prefix, so a fake
  server cannot make it compute an MD5 MAC for offline guessing;
- the server still accepts the unprefixed HMAC-MD5 response of a *stock* 3.11 ``BaseManager``
  client (those compute MD5 over the whole prefixed message; the key length rule makes guessing
  the key from a captured exchange hopeless);
- the server checks the response against several keys (key rotation: the old and the new key are
  both valid for a while) and answers the client's challenge with the key that matched.

The handshake proves that both ends hold a key; it does not protect what follows (no encryption,
no per-message MAC): see docs/SECURITY.md.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Sequence
from multiprocessing import AuthenticationError
from typing import Protocol

CHALLENGE = b"#CHALLENGE#"
WELCOME = b"#WELCOME#"
FAILURE = b"#FAILURE#"
# What a TLS server sends, in clear, to a peer that sent no TLS ClientHello (a plaintext client
# waiting for the challenge): queuekit's client names the fix; a stock client's error shows it.
TLS_REQUIRED_TAG = b"#TLS_REQUIRED#"
TLS_REQUIRED = TLS_REQUIRED_TAG + b" this queuekit server accepts TLS connections only"
DIGEST = "sha256"
NONCE_BYTES = 40  # as Python 3.12+
MAX_FRAME = 256  # a handshake frame is never longer
_PREFIX = b"{sha256}"
_LEGACY_CHALLENGE_LENGTHS = (16, 20)  # unprefixed nonces of older Pythons
_MD5_BYTES = 16


class TLSRequired(AuthenticationError):
    """The server answered with :data:`TLS_REQUIRED` instead of a challenge: it speaks TLS only."""


class Channel(Protocol):
    """What the handshake needs of a connection (``multiprocessing.connection.Connection``)."""

    def send_bytes(self, buf: bytes) -> None: ...

    def recv_bytes(self, maxlength: int | None = None) -> bytes: ...


def serve(conn: Channel, keys: Sequence[bytes], on_failure: Callable[[], None] | None = None) -> int:
    """Server side: challenge the client, then answer its challenge. Returns the index in
    ``keys`` of the key the client holds; raises ``AuthenticationError`` when it holds none.
    ``on_failure`` runs when the client's response matched no key, before the client is told:
    a throttle that counts failures must have counted this one before the client can try again."""
    message = _PREFIX + os.urandom(NONCE_BYTES)
    conn.send_bytes(CHALLENGE + message)
    response = conn.recv_bytes(MAX_FRAME)
    matched = _match(keys, message, response)
    if matched is None:
        if on_failure is not None:
            on_failure()
        _tell_failure(conn)
        raise AuthenticationError("digest received was wrong")
    conn.send_bytes(WELCOME)
    _answer(conn, keys[matched], allow_legacy=True)
    return matched


def connect(conn: Channel, key: bytes) -> None:
    """Client side: answer the server's challenge (SHA-256 only), then challenge the server."""
    _answer(conn, key, allow_legacy=False)
    message = _PREFIX + os.urandom(NONCE_BYTES)
    conn.send_bytes(CHALLENGE + message)
    response = conn.recv_bytes(MAX_FRAME)
    if _match([key], message, response, allow_legacy=False) is None:
        _tell_failure(conn)
        raise AuthenticationError("the server's digest was wrong: it does not hold our key")
    conn.send_bytes(WELCOME)


def _tell_failure(conn: Channel) -> None:
    try:  # a courtesy: the peer may be gone already
        conn.send_bytes(FAILURE)
    except OSError:
        pass


def _match(keys: Sequence[bytes], message: bytes, response: bytes, allow_legacy: bool = True) -> int | None:
    """Index of the key whose MAC of ``message`` is ``response``. Every key is tried (no early
    exit: the time taken does not tell which key matched)."""
    if response.startswith(_PREFIX):
        digest, mac = DIGEST, response[len(_PREFIX) :]
    elif allow_legacy and len(response) == _MD5_BYTES:
        digest, mac = "md5", response  # a stock client of Python 3.11 or older
    else:
        return None
    matched = None
    for index, key in enumerate(keys):
        if hmac.compare_digest(hmac.new(key, message, digest).digest(), mac) and matched is None:
            matched = index
    return matched


def _answer(conn: Channel, key: bytes, *, allow_legacy: bool) -> None:
    challenge = conn.recv_bytes(MAX_FRAME)
    if challenge.startswith(TLS_REQUIRED_TAG):
        raise TLSRequired("the server accepts TLS connections only")
    if not challenge.startswith(CHALLENGE):
        raise AuthenticationError("protocol error: expected a challenge")
    message = challenge[len(CHALLENGE) :]
    if message.startswith(_PREFIX) and len(message) >= len(_PREFIX) + 20:
        response = _PREFIX + hmac.new(key, message, DIGEST).digest()
    elif allow_legacy and len(message) in _LEGACY_CHALLENGE_LENGTHS:
        response = hmac.new(key, message, "md5").digest()  # a stock client of Python 3.11 or older
    else:
        raise AuthenticationError("the peer's challenge does not use HMAC-SHA256: refusing to answer it")
    conn.send_bytes(response)
    if conn.recv_bytes(MAX_FRAME) != WELCOME:
        raise AuthenticationError("digest sent was rejected")
