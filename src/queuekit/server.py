"""The manager server: accepts connections, runs the handshake, dispatches requests.

A ``multiprocessing.managers.Server`` with our own per-connection code (same wire protocol as the
stock server). What a client can reach, and nothing else:

- the queuekit API object under the well-known ident ``API_IDENT`` (:class:`~queuekit.api.QueueAPI`);
- for stock ``BaseManager`` clients, the typeids ``get_task_queue`` / ``get_result_queue`` (queues
  ``tasks`` / ``results``) and ``get_queue(name)``, returning :class:`~queuekit.compat.CompatQueue`;
- of the manager's own requests only ``create``, ``accept_connection``, ``get_methods``,
  ``incref``, ``decref`` and ``dummy``: no ``shutdown``, no ``debug_info``.

A short-lived thread per new connection runs the handshake (with a timeout, logging
authentication failures with the peer's address) and answers its first request; a connection
that asks to be served (``accept_connection``) then joins the event loop of :mod:`queuekit.loop`,
where one thread serves every client and :meth:`QueuekitServer.dispatch` answers each request.

With TLS (``tls_context`` set), the handshake thread first runs the TLS handshake, under the same
whole-handshake deadline (the accepter hangs up on a connection past it, whatever stage it is
in), then the authkey handshake inside TLS. A peer that sends no TLS ClientHello within
``TLS_HELLO_WAIT`` seconds (a plaintext client waits for the challenge) is told, in clear,
that TLS is required (``handshake.TLS_REQUIRED``) and dropped.

With ``settings.plaintext_bind`` (only beside TLS, for stock clients that cannot speak it), a
second listener accepts plaintext connections: its own accepter thread, the same handshake,
limits and caps (connections, handshakes, per-address budgets are shared with the TLS port).
"""

from __future__ import annotations

import collections
import functools
import math
import queue as stdqueue
import ssl
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing import AuthenticationError, managers
from typing import Any

from . import api, compat, handshake, logs, transport
from .broker import Broker
from .errors import ConfigError, PermissionDenied, QueuekitError
from .keys import Grant
from .loop import Loop, Session
from .message import check_queue_name, printable_text
from .settings import ServerSettings

API_IDENT = transport.API_IDENT
ACCEPT_FAILURE_UNREADY_SECONDS = 5.0  # readiness is false this long after the acceptor failed
MAX_TRACKED_HOSTS = 4096  # hosts whose recent authentication failures are remembered
TLS_HELLO_WAIT = 1.0  # seconds a TLS server waits for the ClientHello before telling a plaintext client
# What /metrics and /stats count failed TLS handshakes by: a fixed set whatever OpenSSL says, so
# that no peer can grow the label set (the log line keeps the detail). tls_failure_label maps.
TLS_FAILURE_REASONS = (
    "no_client_certificate",  # mutual TLS, the client sent none
    "client_certificate_rejected",  # not signed by QUEUEKIT_TLS_CLIENT_CA_FILE, expired, wrong usage
    "server_certificate_refused",  # the client's alert: it does not trust our certificate
    "not_tls",  # a plaintext client (silent, or bytes that are no TLS record)
    "timeout",  # the handshake deadline
    "closed",  # the peer closed or reset the connection mid-handshake
    "protocol",  # any other TLS-level refusal (version, ciphers, malformed messages)
    "other",
)
_NOT_TLS_REASONS = frozenset(
    {"no_client_hello", "wrong_version_number", "http_request", "https_proxy_request", "unknown_protocol"}
)

_log = logs.get("server")


class QueuekitServer(managers.Server):
    """Serves ``broker`` on ``settings.bind``. ``info`` is what ``ping`` and ``stats`` report
    (the application: ``durable`` and ``stats()``)."""

    # ``dummy`` does nothing, and stock clients need it: BaseManager.connect() sends it (3.11 to
    # 3.13) before anything else. ``create`` reaches only the registry below.
    public = ["create", "accept_connection", "get_methods", "incref", "decref", "dummy"]

    def __init__(
        self,
        broker: Broker,
        settings: ServerSettings,
        info: Any,
        grants: list[Grant],
        tls_context: ssl.SSLContext | None = None,
    ):
        self.broker = broker
        self.settings = settings
        # New connections speak TLS with this context (None: plaintext); replaced on reload.
        self.tls_context = tls_context
        self.tls_handshakes = 0  # completed (/metrics queuekit_tls_handshakes_total)
        self.tls_failures: collections.Counter[str] = collections.Counter()  # by tls_failure_label
        self.stopping = False
        # Leadership (queuekit.leader): returns the error every request gets while this server must
        # not serve (a standby, a leader past its deadline), None while it may. None: always serve.
        self.gate: Callable[[], Exception | None] | None = None
        # Connections still in their handshake, with the monotonic time each must be done by.
        self._conns: dict[transport.Connection, float] = {}
        self._conns_lock = threading.Lock()
        self._grants: tuple[Grant, ...] = tuple(grants)
        self._keys: tuple[bytes, ...] = tuple(g.key.reveal() for g in grants)  # the same order
        self._auth_failures: dict[str, collections.deque[float]] = {}  # host -> failure times, last minute
        self.refused: collections.Counter[str] = collections.Counter()  # connections refused, by reason
        self.auth_failures = 0
        self._last_accept_failure = -math.inf
        self._log_limiter = _LogLimiter()
        self._stopped = threading.Event()
        self._accepters: list[threading.Thread] = []
        self.loop = Loop(self.dispatch, _error_reply, broker)
        self._loop_thread: threading.Thread | None = None
        # One CompatQueue per queue, made by `create` (on handshake threads). Bounded: an entry is
        # made only for a valid name whose queue exists or is created here within
        # QUEUEKIT_MAX_QUEUES, and queues are never removed.
        queues: dict[str, compat.CompatQueue] = {}

        def compat_queue(name: Any) -> compat.CompatQueue:
            found = queues.get(name) if type(name) is str else None
            if found is not None:
                return found
            try:  # builtin errors: a stock client cannot unpickle queuekit's own
                check_queue_name(name)
                if not broker.has_queue(name):
                    api.create_queue(broker, name)
            except QueuekitError as e:
                raise ValueError(f"queuekit: {e}") from None
            return queues.setdefault(name, compat.CompatQueue(broker, self.loop, name, lambda: self.stopping))

        proxy = managers.AutoProxy  # type: ignore[attr-defined]
        registry = {
            "get_task_queue": (lambda: compat_queue("tasks"), compat.METHODS, None, proxy),
            "get_result_queue": (lambda: compat_queue("results"), compat.METHODS, None, proxy),
            "get_queue": (compat_queue, compat.METHODS, None, proxy),
        }
        # typeshed types the registry and id_to_obj more narrowly than the standard library uses them.
        address, authkey = settings.bind.tuple(), settings.authkey.reveal()
        super().__init__(registry, address, authkey, transport.SERIALIZER)  # type: ignore[arg-type]
        # After authentication, bounded: the stock Server made the Listener, so its limit is set here.
        self.listener.max_message_bytes = settings.max_message_bytes  # type: ignore[attr-defined]
        self.plaintext_listener: transport.Listener | None = None
        if settings.plaintext_bind is not None:
            try:
                self.plaintext_listener = transport.Listener(
                    settings.plaintext_bind.tuple(), max_message_bytes=settings.max_message_bytes
                )
            except OSError as e:
                self.listener.close()  # type: ignore[attr-defined]
                raise ConfigError(
                    f"cannot listen on {settings.plaintext_bind} (QUEUEKIT_PLAINTEXT_BIND): {e.strerror or e}"
                ) from None
        self.loop.frame_timeout = settings.frame_timeout
        api_object = api.QueueAPI(broker, self.loop, info)
        self.id_to_obj[API_IDENT] = (api_object, set(api.METHODS), None)  # type: ignore[assignment]

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._loop_thread = threading.Thread(target=self.loop.run, name="loop", daemon=True)
        self._loop_thread.start()
        listeners = [(self.listener, False)]  # type: ignore[attr-defined]
        if self.plaintext_listener is not None:
            listeners.append((self.plaintext_listener, True))
        for listener, plaintext in listeners:
            name = "accepter plaintext" if plaintext else "accepter"
            thread = threading.Thread(target=self.accepter, args=(listener, plaintext), name=name, daemon=True)
            thread.start()
            self._accepters.append(thread)

    @property
    def plaintext_address(self) -> tuple | None:
        return self.plaintext_listener.address if self.plaintext_listener is not None else None

    def stop(self, grace: float) -> None:
        """Stop accepting, answer waiting gets, give calls in progress ``grace`` seconds, hang up."""
        self.stopping = True
        self._stopped.set()
        for thread in self._accepters:
            thread.join(timeout=2)
        self.listener.close()  # type: ignore[attr-defined]
        if self.plaintext_listener is not None:
            self.plaintext_listener.close()
        self.broker.close()  # parked gets are answered with nothing, new puts are refused
        self.loop.stop(grace)
        self.loop.wait_stopped(grace + 2.0)
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            conn.shutdown()

    @property
    def accepting(self) -> bool:
        """The acceptors run and accepted without failing for the last few seconds (readiness)."""
        alive = bool(self._accepters) and all(thread.is_alive() for thread in self._accepters)
        return alive and time.monotonic() - self._last_accept_failure > ACCEPT_FAILURE_UNREADY_SECONDS

    def accepter(self, listener: Any = None, plaintext: bool = False) -> None:
        """Accept connections on ``listener`` (default: the main one) until stopped. Nothing ends
        this loop but ``stop``: a failure costs the connection involved, never the acceptor (the
        only way in). ``plaintext``: the explicit plaintext listener beside TLS."""
        listener = self.listener if listener is None else listener  # type: ignore[attr-defined]
        while not self._stopped.is_set():
            try:
                self._accept_one(listener, plaintext)
                self._expire_handshakes(time.monotonic())
            except Exception as e:
                self._last_accept_failure = time.monotonic()
                _log.error("accepter_error", exc_info=e, error=repr(e)[:200])
                self._stopped.wait(0.05)

    def _accept_one(self, listener: Any, plaintext: bool) -> None:
        try:
            conn = listener.accept()
        except TimeoutError:
            return
        except OSError as e:
            if self._stopped.is_set():
                return
            self._last_accept_failure = time.monotonic()
            _log.warning("accept_failed", error=e)
            self._stopped.wait(0.05)  # e.g. EMFILE: do not spin
            return
        now = time.monotonic()
        with self._conns_lock:
            reason = self._refusal(conn, now)
            if reason is None:
                self._conns[conn] = now + self.settings.handshake_timeout
        if reason is not None:
            self.refused[reason] += 1
            if self._log_limiter.allow(reason, now):
                _log.warning("connection_refused", peer=conn.peer, reason=reason, **self._log_limiter.take(reason))
            conn.close()
            return
        try:
            threading.Thread(
                target=self.handle_request, args=(conn, plaintext), name=f"conn {conn.peer}", daemon=True
            ).start()
        except RuntimeError as e:  # can't start new thread (a process or memory limit)
            with self._conns_lock:
                self._conns.pop(conn, None)
            conn.close()
            self._last_accept_failure = time.monotonic()
            _log.error("connection_dropped", peer=conn.peer, reason="thread_start_failed", error=str(e)[:200])

    def _refusal(self, conn: transport.Connection, now: float) -> str | None:
        """Why a new connection is refused before its handshake, or None (lock held).
        Unauthenticated peers get their own small budget, so they cannot take the slots of
        authenticated clients."""
        settings = self.settings
        if self.connection_count() >= settings.max_connections:
            return "max_connections"
        if len(self._conns) >= settings.max_handshakes:
            return "max_handshakes"
        host = _host(conn.peer)
        if sum(1 for c in self._conns if _host(c.peer) == host) >= settings.max_handshakes_per_address:
            return "max_handshakes_per_address"
        failures = self._auth_failures.get(host)
        if failures:
            while failures and failures[0] <= now - 60.0:
                failures.popleft()
            if len(failures) >= settings.auth_failures_per_minute:
                return "auth_failures"
        return None

    def _expire_handshakes(self, now: float) -> None:
        """Hang up on connections still in their handshake past its deadline (one byte every few
        seconds must not hold a slot for long): their thread sees the end of the stream."""
        with self._conns_lock:
            late = [conn for conn, deadline in self._conns.items() if deadline <= now]
        for conn in late:
            self.refused["handshake_timeout"] += 1
            conn.shutdown()

    def _count_auth_failure(self, conn: transport.Connection) -> None:
        now = time.monotonic()
        host = _host(conn.peer)
        with self._conns_lock:
            self.auth_failures += 1
            if host not in self._auth_failures and len(self._auth_failures) >= MAX_TRACKED_HOSTS:
                # Bounded: forget hosts whose failures are all older than the window.
                for known in [h for h, times in self._auth_failures.items() if not times or times[-1] <= now - 60]:
                    del self._auth_failures[known]
                if len(self._auth_failures) >= MAX_TRACKED_HOSTS:
                    self._auth_failures.clear()
            self._auth_failures.setdefault(host, collections.deque()).append(now)

    def connection_count(self) -> int:
        return len(self._conns) + self.loop.session_count()

    # -- per connection ---------------------------------------------------------------------

    def handle_request(self, conn: transport.Connection, plaintext: bool = False) -> None:  # type: ignore[override]
        """Authenticate a new connection and answer its first request (the manager's protocol);
        after ``accept_connection`` the connection is served by the loop. ``plaintext``: accepted
        on the plaintext listener (no TLS, whatever the main port does)."""
        served = False
        try:
            context = None if plaintext else self.tls_context
            if context is not None:
                tls_conn = self._start_tls(conn, context)
                if tls_conn is None:
                    return
                conn = tls_conn
            try:
                conn.set_recv_timeout(self.settings.handshake_timeout)
                grants, keys = self._grants, self._keys  # one consistent set, even during a reload
                # A wrong key is counted before the peer hears "#FAILURE#", so its next try
                # already meets the throttle (counted after, a fast client got in once more).
                fail = functools.partial(self._count_auth_failure, conn)
                grant = grants[handshake.serve(conn, keys, on_failure=fail)]
            except AuthenticationError as e:
                _log.warning("auth_failed", peer=conn.peer, reason=str(e))
                return
            except (OSError, EOFError, ValueError) as e:
                if context is None and transport.looks_like_tls(conn):
                    self._tls_failed(conn, "tls_client_on_plaintext_server", "a TLS ClientHello on a plaintext port")
                    return
                # Port scanners, garbage bytes, clients that hang up or stall mid-handshake.
                _log.warning("handshake_failed", peer=conn.peer, reason=type(e).__name__, detail=str(e)[:200])
                return
            try:
                request = conn.recv()
                conn.set_recv_timeout(None)
                _, funcname, args, kwds = request
            except transport.MessageTooLarge as e:
                _log.warning("message_too_large", peer=conn.peer, limit=conn.max_message_bytes, detail=str(e)[:200])
                return
            except (OSError, EOFError):
                return
            except transport.UnpicklingRefused as e:  # hostile: no answer, the connection is closed
                _log.warning("request_refused", peer=conn.peer, reason=e.reason, detail=str(e)[:200])
                return
            except Exception as e:  # unpicklable or malformed first request
                self._reply(conn, ("#ERROR", ValueError(f"malformed request: {type(e).__name__}: {e}")))
                return
            if funcname not in self.public:
                _log.warning("request_refused", peer=conn.peer, request=str(funcname)[:100])
                self._reply(conn, ("#ERROR", PermissionError(f"queuekit server does not serve {funcname!r}")))
                return
            refusal = self.gate() if self.gate is not None and funcname != "dummy" else None
            if refusal is not None:  # a builtin error: stock clients read it too
                self._reply(conn, ("#ERROR", ConnectionError(f"queuekit: {refusal}")))
                return
            if funcname == "accept_connection":
                if self._reply(conn, ("#RETURN", None)):
                    with self._conns_lock:  # no handshake deadline from here on
                        self._conns.pop(conn, None)
                    self.loop.add(conn, client_name(args), grant)
                    served = True
                return
            try:
                msg = ("#RETURN", getattr(self, funcname)(conn, *args, **kwds))
            except Exception as e:
                msg = _error_reply(e)
            self._reply(conn, msg)
        finally:
            with self._conns_lock:
                self._conns.pop(conn, None)
            if not served:
                conn.close()

    def _start_tls(self, conn: transport.Connection, context: ssl.SSLContext) -> transport.TLSConnection | None:
        """Run the TLS handshake of a new connection (on its handshake thread). Returns the TLS
        connection, which takes ``conn``'s place (and deadline) among the connections in their
        handshake; or None after logging why the handshake failed (the caller closes)."""
        timeout = self.settings.handshake_timeout
        if not transport.wait_readable(conn, min(TLS_HELLO_WAIT, timeout)):
            self._tls_failed(conn, "no_client_hello", f"nothing sent for {TLS_HELLO_WAIT:g} s: a plaintext client?")
            try:
                conn.send_bytes(handshake.TLS_REQUIRED)
            except OSError:
                pass
            return None
        with self._conns_lock:
            deadline = self._conns.pop(conn, None)
            tls_conn = transport.start_tls_server(conn, context)
            if deadline is not None:
                self._conns[tls_conn] = deadline
        try:
            tls_conn.set_recv_timeout(timeout)
            tls_conn.do_handshake()
            self.tls_handshakes += 1
            return tls_conn
        except ssl.SSLError as e:
            self._tls_failed(tls_conn, _tls_reason(e), str(e))
        except (OSError, ValueError) as e:
            self._tls_failed(tls_conn, "timeout" if isinstance(e, TimeoutError) else type(e).__name__, str(e))
        with self._conns_lock:
            self._conns.pop(tls_conn, None)
        tls_conn.close()
        return None

    def _tls_failed(self, conn: transport.Connection, reason: str, detail: str) -> None:
        self.tls_failures[tls_failure_label(reason)] += 1
        _log.warning("tls_handshake_failed", peer=conn.peer, reason=reason, detail=detail[:200])

    def set_tls_context(self, context: ssl.SSLContext | None) -> None:
        """New connections use ``context`` from now on; connections made already keep theirs."""
        self.tls_context = context

    def dispatch(self, session: Session, request: Any) -> Any:
        """Answer one request of a served connection (on the loop thread): the exposed methods
        of the API and compat objects take the session first."""
        ident, methodname, args, kwds = request
        obj, exposed, _ = self.id_to_obj[ident]
        if self.gate is not None:
            refusal = self.gate()
            if refusal is not None:
                raise ConnectionError(str(refusal)) if isinstance(obj, compat.CompatQueue) else refusal
        if methodname not in exposed:
            if methodname in ("__str__", "__repr__"):
                return f"<queuekit {type(obj).__name__}>"
            raise AttributeError(f"method {methodname!r} is not exposed by {type(obj).__name__}")
        grant = session.grant
        if not grant.unrestricted:
            self._authorize(grant, obj, methodname, args, kwds)
        return getattr(obj, methodname)(session, *args, **kwds)

    @staticmethod
    def _authorize(grant: Grant, obj: Any, methodname: str, args: Any, kwds: Any) -> None:
        """Refuse a call the session's key does not grant: ``PermissionDenied`` for queuekit
        clients, the builtin ``PermissionError`` for stock clients (they cannot unpickle ours)."""
        if isinstance(obj, compat.CompatQueue):
            try:
                grant.check(methodname, obj.name)
            except PermissionDenied as e:
                raise PermissionError(str(e)) from None
            return
        queue = None
        if methodname in api.QUEUE_METHODS:
            queue = args[0] if args else kwds.get("queue") if isinstance(kwds, dict) else None
            if isinstance(queue, (list, tuple)):  # take/heartbeat name several queues: each must be granted
                for name in queue:
                    grant.check(methodname, name if isinstance(name, str) else None)
                return
            if queue is None and grant.queues:  # status/result/cancel of any queue
                grant.check(methodname, None)
                raise PermissionDenied(
                    f"key {grant.name!r} is limited to queues {', '.join(grant.queues)}: name the task's queue"
                )
        grant.check(methodname, queue if isinstance(queue, str) else None)

    def set_grants(self, grants: list[Grant]) -> None:
        """The keys accepted from now on; sessions of keys no longer among them are closed."""
        self._grants, self._keys = tuple(grants), tuple(g.key.reveal() for g in grants)
        self.loop.revoke(frozenset(grants))

    @staticmethod
    def _reply(conn: transport.Connection, msg: tuple) -> bool:
        try:
            conn.send(msg)
            return True
        except Exception:
            try:  # the stock server does the same for results that do not pickle
                conn.send(("#UNSERIALIZABLE", traceback.format_exc()))
            except Exception:
                pass
            return False


def _tls_reason(e: ssl.SSLError) -> str:
    """A short token for why a TLS handshake failed (the log's ``reason``)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return "client_certificate_rejected"  # the detail names OpenSSL's verify error
    if isinstance(e, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError):
        return "eof"
    reason = e.reason or type(e).__name__
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "no_client_certificate"
    for prefix in ("TLSV13_ALERT_", "TLSV1_ALERT_", "SSLV3_ALERT_"):
        if reason.startswith(prefix):  # the client refused the handshake (e.g. our certificate)
            return "client_alert_" + reason[len(prefix) :].lower()
    return reason.lower()


def tls_failure_label(reason: str) -> str:
    """The TLS_FAILURE_REASONS entry for a ``tls_handshake_failed`` reason (_tls_reason, or the
    name of the OSError that ended the handshake)."""
    if reason in TLS_FAILURE_REASONS:
        return reason
    if reason in _NOT_TLS_REASONS:
        return "not_tls"
    if reason.startswith("client_alert_"):
        return "server_certificate_refused"
    if reason == "eof" or reason in ("ConnectionResetError", "ConnectionAbortedError", "BrokenPipeError"):
        return "closed"
    if reason.islower():  # an OpenSSL reason (_tls_reason lowers them); OSError names are CamelCase
        return "protocol"
    return "other"


def _host(peer: str) -> str:
    """The address part of ``host:port`` / ``[v6]:port``."""
    return peer.rsplit(":", 1)[0]


class _LogLimiter:
    """At most one log line per reason a second; the lines say how many were not logged."""

    def __init__(self) -> None:
        self._next: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()

    def allow(self, reason: str, now: float) -> bool:
        if now < self._next.get(reason, 0.0):
            self._suppressed[reason] += 1
            return False
        self._next[reason] = now + 1.0
        return True

    def take(self, reason: str) -> dict[str, int]:
        n = self._suppressed.pop(reason, 0)
        return {"suppressed": n} if n else {}


MAX_CLIENT_NAME_CHARS = 128


def client_name(args: tuple) -> str:
    """The name a client gave in ``accept_connection`` (shown in logs, the dashboard and a task's
    status, and journaled with the tasks it takes): cut to MAX_CLIENT_NAME_CHARS, and what is not
    valid UTF-8 escaped, since any peer with a key chooses it."""
    return printable_text(str(args[0])[:MAX_CLIENT_NAME_CHARS]) if args else "?"


def _error_reply(e: Exception) -> tuple:
    if isinstance(e, (QueuekitError, stdqueue.Empty, stdqueue.Full)) or type(e).__module__ == "builtins":
        return ("#ERROR", e)
    _log.error("internal_error", exc_info=e, error=repr(e)[:200])
    return ("#TRACEBACK", "".join(traceback.format_exception(e)))
