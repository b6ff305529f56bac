"""The wire transport: the Listener/Client pair registered with ``multiprocessing.managers``.

The bytes on the wire are exactly the stock ``'pickle'`` serializer's (4-byte length prefix, a
pickle, the HMAC challenge/response handshake), so stock ``BaseManager`` clients interoperate.
What this module adds, all on the socket:

- ``TCP_NODELAY`` on every connection: without it the first call after the handshake stalls on
  Nagle + delayed ACK (~40 ms);
- TCP keepalive and ``TCP_USER_TIMEOUT``, so a peer that vanished (network cut, host down) is
  detected in about a minute instead of the kernel's ~15;
- a per-read timeout during the handshake (the server adds a whole-handshake deadline and caps on
  connections still in their handshake, see ``server.py``);
- a maximum message size: a length prefix larger than the limit closes the connection instead of
  allocating whatever a peer claims. The server's connections take theirs from
  ``QUEUEKIT_MAX_MESSAGE_BYTES`` (``Listener.max_message_bytes``; the loop reads it per session),
  connections made by :func:`Client` keep ``DEFAULT_MAX_MESSAGE_BYTES`` for the replies they read.

The framing and (un)pickling of messages live here too (``frame_bounds``, ``encode_message``,
``decode_message`` / ``decode_reply``), shared by ``Connection`` and the server's event loop
(``queuekit.loop``), which reads and writes non-blocking sockets itself.

TLS (optional, both ends): :func:`server_tls_context` / :func:`client_tls_context` build the
contexts (TLS 1.2 minimum, no compression, no renegotiation, the ``ssl`` module's default
ciphers); :class:`TLSConnection` is a ``Connection`` whose bytes go through an ``ssl.SSLSocket``
on the same file descriptor. The server moves an accepted connection under TLS on its handshake
thread (:func:`start_tls_server`, then ``do_handshake`` under the handshake deadline); the loop
then reads and writes that socket non-blocking (``queuekit.loop``).

Restricted unpickling: nothing that arrives on the wire can run code.

- What a server reads (``decode_message``: the loop, the handshake thread, every ``Listener``
  connection) resolves no global at all: a request is plain data (tuples, lists, dicts, str, bytes,
  numbers, bool, None). A global, a persistent id, or any opcode that builds or calls an object
  raises :class:`UnpicklingRefused`. The decoded request is then measured (a walk that stops
  early): its objects and str/bytes lengths must stay within a bound derived from the frame's
  size, so a pickle that references one big string many times is refused before anything expands
  it (:class:`RequestTooExpanded`).
- What a client reads (``decode_reply``: connections made by :func:`Client`, i.e. queuekit's
  client, worker and ``queuekit check``) resolves only the types the protocol returns: the
  manager's ``Token``, ``queue.Empty``/``queue.Full``, the builtin exceptions in
  ``REPLY_BUILTINS`` and queuekit's own errors.
"""

from __future__ import annotations

import builtins
import fcntl
import io
import itertools
import os
import pickle
import pickletools
import queue
import select
import socket
import ssl
import struct
import termios
import time
from multiprocessing import connection as mpc
from multiprocessing import managers

from . import errors, handshake, journal
from .errors import ConfigError, QueuekitError

SERIALIZER = "queuekit"
API_IDENT = "queuekit.v1"  # the server-side id of the queuekit API object (see server.QueueAPI)
HANDSHAKE_TIMEOUT = 10.0
# The limit of a Connection that was given none: what queuekit's clients accept in a reply (a
# get_many of large tasks). A server's connections get QUEUEKIT_MAX_MESSAGE_BYTES instead.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 30, 10, 3
USER_TIMEOUT_MS = 60_000

_dumps = pickle.dumps  # the stock serializer's bytes for the plain data queuekit sends
_HEADER = struct.Struct("!i")
_HEADER64 = struct.Struct("!Q")


def frame_bounds(buf) -> tuple[int, int] | None:
    """``(start, size)`` of the first message in ``buf``, or None while its header is incomplete."""
    if len(buf) < 4:
        return None
    (size,) = _HEADER.unpack_from(buf)
    if size != -1:
        return 4, size
    if len(buf) < 12:
        return None
    return 12, _HEADER64.unpack_from(buf, 4)[0]


def encode_message(obj) -> bytes:
    """A message as it goes on the wire: length header and pickle (the stock serializer's bytes)."""
    body = _dumps(obj, pickle.DEFAULT_PROTOCOL)
    n = len(body)
    return (_HEADER.pack(n) if n <= 0x7FFFFFFF else _HEADER.pack(-1) + _HEADER64.pack(n)) + body


class UnpicklingRefused(QueuekitError, pickle.UnpicklingError):
    """A message asked the unpickler for something it does not make (a global, a persistent id,
    an object built by a call): nothing was run. The peer is hostile or broken; close the
    connection."""

    reason = "unpickling"


class RequestTooExpanded(UnpicklingRefused):
    """A request decodes to far more data than its frame carries (pickle references repeating
    one object): refused before anything walks or validates the expansion."""

    reason = "amplification"


# Opcodes that reach a global, a persistent id or out-of-band data, or build/call an object. Used
# only to name why a message that failed to decode failed (never on the hot path): the unpickler
# itself refuses globals and persistent ids, and without a global there is nothing to call.
_OBJECT_OPCODES = frozenset(
    {
        "GLOBAL",
        "STACK_GLOBAL",
        "INST",
        "OBJ",
        "NEWOBJ",
        "NEWOBJ_EX",
        "REDUCE",
        "BUILD",
        "PERSID",
        "BINPERSID",
        "EXT1",
        "EXT2",
        "EXT4",
        "NEXT_BUFFER",
        "READONLY_BUFFER",
    }
)


_CLASSIFY_OPCODES = 10_000


class _RequestUnpickler(pickle.Unpickler):
    """Plain data only: no global, no persistent id (the C unpickler stays C-speed: only these
    two hooks are Python)."""

    def find_class(self, module, name):
        raise UnpicklingRefused(f"global {str(module)[:60]}.{str(name)[:60]} refused (requests are plain data)")

    def persistent_load(self, pid):
        raise UnpicklingRefused("persistent id refused (requests are plain data)")


# The builtin exceptions a server forwards to a queuekit client as ``#ERROR`` (server._error_reply
# forwards builtin exceptions raised while answering a call): argument errors of the manager's own
# requests (create, incref, ...), of the API's dispatch and of the compat queues.
REPLY_BUILTINS = frozenset(
    {
        "ArithmeticError",
        "AttributeError",
        "ConnectionError",
        "IndexError",
        "KeyError",
        "LookupError",
        "MemoryError",
        "NotImplementedError",
        "OSError",
        "OverflowError",
        "PermissionError",
        "RecursionError",
        "RuntimeError",
        "TimeoutError",
        "TypeError",
        "UnicodeDecodeError",
        "UnicodeEncodeError",
        "ValueError",
    }
)


def _reply_type_table() -> dict[tuple[str, str], type]:
    """``(module, name) -> type`` of everything a reply may name."""
    table: dict[tuple[str, str], type] = {
        ("multiprocessing.managers", "Token"): managers.Token,
        (queue.Empty.__module__, queue.Empty.__name__): queue.Empty,
        (queue.Full.__module__, queue.Full.__name__): queue.Full,
        (journal.__name__, "JournalError"): journal.JournalError,
    }
    for name in REPLY_BUILTINS:
        table["builtins", name] = getattr(builtins, name)
    for name, value in vars(errors).items():
        if isinstance(value, type) and issubclass(value, QueuekitError) and value.__module__ == errors.__name__:
            table[errors.__name__, name] = value
    return table


REPLY_TYPES = _reply_type_table()


class _ReplyUnpickler(pickle.Unpickler):
    """What a server's reply may contain: plain data, the manager's Token, queue.Empty/Full, the
    builtin exceptions in ``REPLY_BUILTINS`` and queuekit's errors. Nothing else is resolved."""

    def find_class(self, module, name):
        found = REPLY_TYPES.get((module, name))
        if found is None:
            raise UnpicklingRefused(f"global {str(module)[:60]}.{str(name)[:60]} refused (not a queuekit reply type)")
        return found

    def persistent_load(self, pid):
        raise UnpicklingRefused("persistent id refused (not a queuekit reply)")


# A request's decoded size is bounded by its frame: every object in a pickle takes at least one
# byte and every str/bytes is in it once, unless a memo reference repeats it. The slack admits
# stock clients that reference a small object twice.
EXPANSION_FACTOR = 2
EXPANSION_SLACK_OBJECTS = 1024
EXPANSION_SLACK_BYTES = 1024 * 1024


_SCALARS = frozenset({int, float, bool, type(None)})


def _check_expansion(obj, frame_size: int) -> None:
    """Refuse a request whose objects or str/bytes lengths add up to more than its frame allows."""
    if type(obj) is tuple and len(obj) == 4 and not obj[3] and type(obj[2]) is tuple:
        # The usual request, (ident, method, args, {}) with flat args: measured without the
        # general walk (this runs for every request). Anything else takes the walk.
        chars = 0
        objects = len(obj[2])
        for arg in obj[2]:
            kind = type(arg)
            if kind in _SCALARS:
                continue
            if kind is str or kind is bytes:
                chars += len(arg)
            elif kind is list or kind is tuple:
                kinds = set(map(type, arg))
                if kinds <= _TEXTS:
                    chars += sum(map(len, arg))
                elif not kinds <= _SCALARS:
                    break
                objects += len(arg)
            else:
                break
        else:
            if type(obj[0]) is str and type(obj[1]) is str:
                chars += len(obj[0]) + len(obj[1])
                if chars <= EXPANSION_FACTOR * frame_size + EXPANSION_SLACK_BYTES and objects <= (
                    EXPANSION_FACTOR * frame_size + EXPANSION_SLACK_OBJECTS
                ):
                    return
    _walk_expansion(obj, frame_size)


_TEXTS = frozenset({str, bytes})


def _walk_expansion(obj, frame_size: int) -> None:
    """The general measure of :func:`_check_expansion`.

    Every container's members are counted when it is opened, before any of them is visited, so
    the walk ends as soon as the object budget runs out: its cost is bounded by the frame's size.
    A long run of only texts or only scalars (a batch of payloads, a list of ids) is measured in C.
    Text lengths cost nothing to add up, so they are compared once, at the end."""
    objects = EXPANSION_FACTOR * frame_size + EXPANSION_SLACK_OBJECTS
    chars = EXPANSION_FACTOR * frame_size + EXPANSION_SLACK_BYTES
    stack = [obj]
    pop = stack.pop
    while stack:
        item = pop()
        kind = type(item)
        if kind is str or kind is bytes or kind is bytearray:
            chars -= len(item)
        elif kind is tuple or kind is list or kind is dict or kind is set or kind is frozenset:
            n = len(item)
            objects -= 2 * n if kind is dict else n
            if objects < 0:
                break
            if kind is dict:
                stack += item.keys()
                stack += item.values()
            elif n > 16 and (kinds := set(map(type, item))) <= _SCALARS:
                continue
            elif n > 16 and kinds == {str}:
                chars -= sum(map(len, item))
            else:
                stack += item
    if objects < 0 or chars < 0:
        raise RequestTooExpanded(
            f"a request of {frame_size} bytes decodes to more than "
            f"{EXPANSION_FACTOR * frame_size + EXPANSION_SLACK_BYTES} bytes of text or "
            f"{EXPANSION_FACTOR * frame_size + EXPANSION_SLACK_OBJECTS} objects (pickle references)"
        )


def _classify_failure(data: bytes, error: Exception) -> Exception:
    """Why a message did not decode: an :class:`UnpicklingRefused` if it uses an object-building
    opcode (the failure path only), else a ``pickle.UnpicklingError`` naming the decoder's error."""
    try:
        # At most the first _CLASSIFY_OPCODES opcodes (a few ms): a huge frame that fails near
        # its end must not hold the loop thread for seconds. Past that it is a plain decode error.
        for opcode, _, _ in itertools.islice(pickletools.genops(data), _CLASSIFY_OPCODES):
            if opcode.name in _OBJECT_OPCODES:
                return UnpicklingRefused(f"opcode {opcode.name} refused ({type(error).__name__}: {str(error)[:100]})")
    except Exception:
        pass  # a malformed stream: what was read so far had no object opcode
    if isinstance(error, pickle.UnpicklingError):
        return error
    return pickle.UnpicklingError(f"{type(error).__name__}: {str(error)[:200]}")


# The C unpickler reads a file object per opcode unless the file has ``peek`` (then it prefetches);
# an attacker's pickle without FRAME opcodes would make that one Python call per byte. Small
# messages (bounded cost, the hot path) are read from a BytesIO; larger ones through a
# BufferedReader, whose peek lets the unpickler read them in bulk.
_BULK_READ_FROM = 16 * 1024
_BULK_BUFFER = 128 * 1024


def _source(data: bytes):
    if len(data) < _BULK_READ_FROM:
        return io.BytesIO(data)
    return io.BufferedReader(io.BytesIO(data), _BULK_BUFFER)


def decode_message(data: bytes):
    """The request in a message body, for a server: plain data only (see the module docstring).
    Raises :class:`UnpicklingRefused` (a hostile or broken peer: close the connection), or
    ``pickle.UnpicklingError`` for bytes that are not a pickle of plain data."""
    try:
        obj = _RequestUnpickler(_source(data)).load()
    except UnpicklingRefused:
        raise
    except Exception as e:
        raise _classify_failure(data, e) from None
    _check_expansion(obj, len(data))
    return obj


def decode_reply(data: bytes):
    """The reply in a message body, for a client: plain data and the protocol's reply types.
    Raises :class:`UnpicklingRefused` for anything else, ``pickle.UnpicklingError`` for bytes
    that are not a pickle."""
    try:
        return _ReplyUnpickler(_source(data)).load()
    except UnpicklingRefused:
        raise
    except Exception as e:
        raise _classify_failure(data, e) from None


class MessageTooLarge(OSError):
    """A peer announced a message larger than the limit; the connection is unusable after this."""


class Connection(mpc.Connection):
    """A ``multiprocessing`` connection with a message size limit, the peer's address, and a
    receive buffer: one ``read`` usually brings a whole message (the stock class makes two, one
    for the 4-byte length and one for the body), which saves a system call per message."""

    max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
    peer = "?"
    _READ_SIZE = 65536
    # How recv turns a message into an object: requests (the server's side, the default) or
    # replies (connections made by Client).
    decode = staticmethod(decode_message)

    def __init__(self, handle, readable=True, writable=True):
        super().__init__(handle, readable, writable)
        self._rbuf = bytearray()

    def _fill(self, n: int) -> None:
        rbuf, fd = self._rbuf, self.fileno()
        while len(rbuf) < n:
            chunk = os.read(fd, max(self._READ_SIZE, n - len(rbuf)))
            if not chunk:
                raise EOFError("connection closed by peer" if not rbuf else "connection closed mid-message")
            rbuf += chunk

    def _recv_bytes(self, maxsize=None):
        data = self._recv_frame(maxsize)
        return None if data is None else io.BytesIO(data)

    def _recv_frame(self, maxsize):
        """The next message's bytes, or None when it is larger than ``maxsize`` (left unread)."""
        self._fill(4)
        bounds = frame_bounds(self._rbuf)
        if bounds is None:
            self._fill(12)
            bounds = frame_bounds(self._rbuf)
        assert bounds is not None  # 12 bytes always hold a header
        start, size = bounds
        if maxsize is not None and size > maxsize:
            return None
        self._fill(start + size)
        data = bytes(self._rbuf[start : start + size])
        del self._rbuf[: start + size]
        return data

    def _poll(self, timeout):
        return bool(self._rbuf) or super()._poll(timeout)  # type: ignore[misc]

    def take_buffered(self) -> bytes:
        """The bytes read from the socket but not yet consumed as a message (for whoever reads
        the socket next: the server's loop takes over after the handshake thread)."""
        data = bytes(self._rbuf)
        self._rbuf.clear()
        return data

    def recv(self):
        self._check_closed()  # type: ignore[attr-defined]
        self._check_readable()  # type: ignore[attr-defined]
        data = self._recv_frame(self.max_message_bytes)
        if data is None:
            raise MessageTooLarge(f"message from {self.peer} exceeds {self.max_message_bytes} bytes")
        try:
            return self.decode(data)
        except UnpicklingRefused as e:
            raise type(e)(f"message from {self.peer} refused: {e}") from None

    sent_bytes = 0  # the size of the last message sent

    def send(self, obj) -> None:
        # Plain pickle.dumps writes the same bytes as ForkingPickler for the plain data queuekit
        # sends (ForkingPickler only adds reducers for sockets, fds and the like), without a
        # BytesIO and a pickler object per message.
        self._check_closed()  # type: ignore[attr-defined]
        self._check_writable()  # type: ignore[attr-defined]
        data = _dumps(obj, pickle.DEFAULT_PROTOCOL)
        self.sent_bytes = len(data)
        self._send_bytes(data)  # type: ignore[attr-defined]

    def wait_sent(self, no_progress_timeout: float) -> None:
        """Return once the peer's kernel has acknowledged every byte sent (the send queue is
        empty: Linux's SIOCOUTQ), so that a reply deadline starts when the server can read the
        whole request, not while megabytes of it still wait in our send buffer on a slow link.
        Raises ``BlockingIOError`` when no byte is acknowledged for ``no_progress_timeout`` s (a
        peer that stopped reading). Polls (no event tells that a send queue emptied): for large
        messages only. Returns at once where the queue cannot be read."""
        left = self._unsent()
        progress = time.monotonic()
        pause = 0.001
        while left:
            time.sleep(pause)  # polling a kernel counter that no event announces
            pause = min(pause * 2, 0.02)
            now = self._unsent()
            if now < left:
                left, progress = now, time.monotonic()
            elif time.monotonic() - progress >= no_progress_timeout:
                raise BlockingIOError(f"the peer acknowledged none of {left} bytes for {no_progress_timeout:g} s")

    def _unsent(self) -> int:
        try:
            raw = fcntl.ioctl(self.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")  # == SIOCOUTQ on a socket
        except OSError:
            return 0
        return int(struct.unpack("i", raw)[0])

    def set_recv_timeout(self, seconds: float | None) -> None:
        """Make blocking reads fail with ``BlockingIOError`` after ``seconds`` (None: wait forever)."""
        _setsockopt_fd(self.fileno(), socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))

    def shutdown(self) -> None:
        """Wake any thread blocked reading this connection (it sees EOF); ``close`` comes later."""
        try:
            with socket.socket(fileno=os.dup(self.fileno())) as s:
                s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class TLSConnection(Connection):
    """A :class:`Connection` over TLS: the same framing, the bytes go through ``tls`` (an
    ``ssl.SSLSocket`` on the connection's file descriptor, which it owns). Timeouts are the
    socket's own (``settimeout``): OpenSSL's blocking reads do not honour ``SO_RCVTIMEO``."""

    def __init__(self, tls: ssl.SSLSocket):
        super().__init__(tls.fileno())
        self.tls = tls

    def _fill(self, n: int) -> None:
        rbuf = self._rbuf
        want = n - len(rbuf)
        if want <= 0:
            return
        # One buffer for the whole rest (a TLS read returns at most one record, 16 KiB): no
        # allocation per record, one copy into the read buffer at the end.
        buf = memoryview(bytearray(max(self._READ_SIZE, want)))
        got = 0
        recv_into = self.tls.recv_into
        try:
            while got < want:
                k = recv_into(buf[got:])
                if not k:
                    raise EOFError("connection closed mid-message" if rbuf or got else "connection closed by peer")
                got += k
        finally:
            rbuf += buf[:got]

    # The socket's timeout is a deadline for one whole SSL write (CPython's SSLSocket.write; no
    # partial writes), so a message goes in slices of this size: the timeout then bounds a slice
    # (a slow link that keeps taking bytes is waited for), not a whole 16 MiB put_many chunk.
    _WRITE_SLICE = 256 * 1024

    def _send(self, buf, write=None) -> None:
        sendall, step = self.tls.sendall, self._WRITE_SLICE
        if len(buf) <= step:
            sendall(buf)
            return
        with memoryview(buf) as view:
            for start in range(0, len(view), step):
                sendall(view[start : start + step])

    def _close(self, _close=None) -> None:
        self.tls.close()

    def _poll(self, timeout):
        return self.tls.pending() > 0 or super()._poll(timeout)

    def set_recv_timeout(self, seconds: float | None) -> None:
        self.tls.settimeout(seconds)

    def do_handshake(self) -> None:
        """The TLS handshake (bounded by the socket's timeout)."""
        self.tls.do_handshake()


def _require_file(path: str, setting: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"{setting}={path}: no such file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{setting}={path} is not readable by uid {os.getuid()}: fix its mode/owner")


def _secure(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def server_tls_context(cert_file: str, key_file: str, client_ca_file: str | None = None) -> ssl.SSLContext:
    """The server's context: its certificate chain and key; with ``client_ca_file``, mutual TLS
    (a client must present a certificate signed by that CA, and only that CA: the system's CA
    store is not loaded). Raises :class:`ConfigError` naming the setting to fix."""
    _require_file(cert_file, "QUEUEKIT_TLS_CERT_FILE/--tls-cert-file")
    _require_file(key_file, "QUEUEKIT_TLS_KEY_FILE/--tls-key-file")
    context = _secure(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(
            f"cannot load the TLS certificate {cert_file} with key {key_file} ({_ssl_reason(e)}): "
            "QUEUEKIT_TLS_CERT_FILE must hold the PEM certificate chain and QUEUEKIT_TLS_KEY_FILE its key"
        ) from None
    if client_ca_file:
        _require_file(client_ca_file, "QUEUEKIT_TLS_CLIENT_CA_FILE/--tls-client-ca-file")
        try:
            context.load_verify_locations(cafile=client_ca_file)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(
                f"cannot load the client CA file {client_ca_file} ({_ssl_reason(e)}): "
                "QUEUEKIT_TLS_CLIENT_CA_FILE must hold PEM CA certificates"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_tls_context(ca_file: str, cert_file: str | None = None, key_file: str | None = None) -> ssl.SSLContext:
    """A client's context: the server's certificate must be signed by ``ca_file`` and valid for
    the name connected to (checked by ``wrap_socket``); with ``cert_file``/``key_file`` the client
    presents that certificate (mutual TLS). Raises :class:`ConfigError` naming the setting."""
    _require_file(ca_file, "QUEUEKIT_TLS_CA_FILE/--tls-ca-file")
    try:
        context = _secure(ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file))
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(
            f"cannot load the TLS CA file {ca_file} ({_ssl_reason(e)}): "
            "QUEUEKIT_TLS_CA_FILE must hold PEM CA certificates"
        ) from None
    if cert_file or key_file:
        if not (cert_file and key_file):
            raise ConfigError(
                "mutual TLS needs both QUEUEKIT_TLS_CLIENT_CERT_FILE and QUEUEKIT_TLS_CLIENT_KEY_FILE "
                "(--tls-client-cert-file, --tls-client-key-file)"
            )
        _require_file(cert_file, "QUEUEKIT_TLS_CLIENT_CERT_FILE/--tls-client-cert-file")
        _require_file(key_file, "QUEUEKIT_TLS_CLIENT_KEY_FILE/--tls-client-key-file")
        try:
            context.load_cert_chain(cert_file, key_file)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(
                f"cannot load the client certificate {cert_file} with key {key_file} ({_ssl_reason(e)}): "
                "QUEUEKIT_TLS_CLIENT_CERT_FILE must hold the PEM certificate and QUEUEKIT_TLS_CLIENT_KEY_FILE its key"
            ) from None
    return context


def _ssl_reason(e: BaseException) -> str:
    reason = getattr(e, "verify_message", None) or getattr(e, "reason", None) or getattr(e, "strerror", None)
    return str(reason or type(e).__name__)


def wait_readable(conn: Connection, timeout: float) -> bool:
    """Whether ``conn`` has bytes (or an end of stream) to read within ``timeout`` seconds."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def looks_like_tls(conn: Connection) -> bool:
    """The bytes read so far start like a TLS handshake record (a TLS client on a plaintext port)."""
    return bytes(conn._rbuf[:2]) == b"\x16\x03"


def start_tls_server(conn: Connection, context: ssl.SSLContext) -> TLSConnection:
    """Move an accepted connection's socket under TLS, server side (no I/O: the caller runs
    ``do_handshake``). ``conn`` no longer owns the file descriptor afterwards."""
    sock = socket.socket(fileno=conn.fileno())
    conn._handle = None  # type: ignore[attr-defined]  # the socket owns the fd now
    try:
        tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    new = TLSConnection(tls)
    new.peer, new.max_message_bytes, new.decode = conn.peer, conn.max_message_bytes, conn.decode
    return new


def _timeval(seconds: float | None) -> bytes:
    seconds = seconds or 0.0
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))


def _setsockopt_fd(fd: int, level: int, option: int, value) -> None:
    # A socket object made from a dup of the fd shares the socket, so options set on it stick.
    with socket.socket(fileno=os.dup(fd)) as s:
        s.setsockopt(level, option, value)


def tune_socket(sock: socket.socket) -> None:
    """Options every queuekit connection gets (both ends)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (
            ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
            ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
            ("TCP_KEEPCNT", KEEPALIVE_COUNT),
            ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS),
        ):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _wrap(sock: socket.socket, peer: str, max_message_bytes: int | None) -> Connection:
    sock.setblocking(True)
    conn = Connection(sock.detach())
    conn.peer = peer
    if max_message_bytes:
        conn.max_message_bytes = max_message_bytes
    return conn


def format_peer(addr) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


class Listener:
    """TCP listener handing out :class:`Connection` objects. Authentication is the server's job.

    ``accept`` waits at most ``accept_timeout`` seconds and then raises ``socket.timeout`` so the
    accept loop can notice a shutdown request.
    """

    def __init__(
        self,
        address=None,
        family=None,
        backlog=128,
        authkey=None,
        *,
        accept_timeout: float = 0.5,
        max_message_bytes: int | None = None,
    ):
        if authkey is not None:
            raise ValueError("queuekit's Listener does not authenticate; the server does, per connection")
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # create_server sets SO_REUSEADDR, so a restarted server can rebind at once.
        self._sock = socket.create_server((host, port), family=family, backlog=max(backlog, 128))
        self._sock.settimeout(accept_timeout)
        self.address = self._sock.getsockname()[:2]
        self.last_accepted = None
        # The limit of the connections accepted from now on; public because the stock
        # managers.Server makes the Listener itself (the server sets it after that).
        self.max_message_bytes = max_message_bytes

    def accept(self) -> Connection:
        sock, addr = self._sock.accept()
        try:
            tune_socket(sock)
        except OSError:
            sock.close()
            raise
        self.last_accepted = addr
        return _wrap(sock, format_peer(addr), self.max_message_bytes)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def Client(
    address,
    family=None,
    authkey=None,
    *,
    connect_timeout: float | None = HANDSHAKE_TIMEOUT,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    send_timeout: float | None = None,
    max_message_bytes: int | None = None,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> Connection:
    """Connect, tune the socket and run the manager's HMAC handshake (mutual, like the stock Client).
    With ``tls``, the TLS handshake comes first (the server's certificate checked against
    ``server_name``, default the address's host) and the HMAC handshake runs inside TLS.

    ``send_timeout`` (plaintext): the socket's ``SO_SNDTIMEO``, set once here, for the life of the
    connection. A write that moves no byte for that long raises ``BlockingIOError``; one that
    moved some returns their count and the send loop goes on, so a slow peer that keeps reading
    is waited for, a peer that stopped reading (a frozen server with full buffers) is not. A
    message whose send failed is left half written: close the connection. Over TLS the socket's
    own timeout (``set_recv_timeout``) bounds each write instead (see :class:`TLSConnection`).

    Raises ``OSError`` subclasses for network trouble (``ssl.SSLError`` for TLS failures),
    ``EOFError`` when the server drops the connection, and ``multiprocessing.AuthenticationError``
    when the keys differ (``handshake.TLSRequired`` from a TLS-only server to a plaintext client).
    """
    host, port = address
    sock = socket.create_connection((host, port), timeout=connect_timeout)
    conn: Connection
    try:
        tune_socket(sock)
        if send_timeout is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(send_timeout))
        if tls is not None:
            sock.settimeout(handshake_timeout)
            # wrap_socket takes the fd over (and closes it if the handshake fails).
            conn = TLSConnection(tls.wrap_socket(sock, server_hostname=server_name or host))
            conn.peer = format_peer((host, port))
            if max_message_bytes:
                conn.max_message_bytes = max_message_bytes
        else:
            conn = _wrap(sock, format_peer((host, port)), max_message_bytes)
        conn.decode = decode_reply
    except BaseException:
        sock.close()
        raise
    try:
        if authkey is not None:
            conn.set_recv_timeout(handshake_timeout)
            handshake.connect(conn, authkey)
            conn.set_recv_timeout(None)
    except BaseException:
        conn.close()
        raise
    return conn


# Register the pair under its own serializer name: BaseManager(serializer="queuekit") and the
# server both look it up here.
managers.listener_client[SERIALIZER] = (Listener, Client)  # type: ignore[attr-defined]
