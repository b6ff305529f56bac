"""The server's HTTP side port: ``/healthz``, ``/readyz``, ``/metrics``, ``/stats``.

Counts only, never payloads. ``/stats`` is shaped for KEDA's ``metrics-api`` scaler:
``valueLocation: queues.<name>.ready``. Counters count since the server process started (they
do not continue from the journal after a restart; Prometheus' ``rate()`` handles the reset).

Bounded on purpose, because anything that can reach the port can open connections:

- one request per connection, and one deadline per connection (``DEADLINE_SECONDS``) for the
  request head to arrive *and* the response to leave: an idle or trickling peer (slowloris) is
  cut at the deadline, not after a per-read timeout that each byte renews;
- at most ``MAX_CONNECTIONS`` connections are served at once, one thread each; one more is
  answered ``503`` and closed at once by the acceptor, which never blocks on a peer;
- a listen backlog of ``BACKLOG``; a request head of at most ``MAX_HEAD_BYTES``; ``GET`` and
  ``HEAD`` only;
- ``/metrics`` and ``/stats`` list at most ``max_queues`` queues (the busiest first) and say how
  many they left out;
- with a bearer token configured, everything except the probes ``/healthz`` and ``/readyz``
  needs ``Authorization: Bearer <token>``.

The web dashboard (``/``, ``/api/...``, its POST actions) lives in :mod:`queuekit.dashboard`; the
app sets :attr:`HTTPPort.dashboard`, and the handler hands it the paths it serves.

The acceptor survives any failure to serve one connection (e.g. no thread can be started): that
connection is closed and logged, the next one is served.
"""

from __future__ import annotations

import hmac
import io
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import TYPE_CHECKING, Any

from . import logs, metrics
from .consumer_metrics import Reported
from .settings import Address, Secret

if TYPE_CHECKING:
    from .dashboard import Dashboard

DEADLINE_SECONDS = 5.0  # per connection: request head in and response out
MAX_CONNECTIONS = 64  # served at once (one thread each)
BACKLOG = 128  # listen(2) backlog
MAX_HEAD_BYTES = 16 * 1024  # request line + headers
DEFAULT_MAX_QUEUES = 1000
PROBES = ("/healthz", "/readyz")
TASKS_PREFIX = "/tasks/"  # GET /tasks/<id>: a task's status (same token rule as /stats)

_log = logs.get("http")

_BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
    b"Retry-After: 1\r\nConnection: close\r\n\r\nbusy\n"
)
_TOO_LARGE = (
    b"HTTP/1.0 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\nContent-Length: 17\r\n"
    b"Connection: close\r\n\r\nrequest too large\n"
)


def bounded_stats(stats: dict, max_queues: int) -> dict:
    """``stats`` with at most ``max_queues`` queues, the busiest (ready + inflight + dead) first, ties
    by name; ``omitted`` counts the queues left out."""
    queues = stats["queues"]
    if len(queues) <= max_queues:
        return {**stats, "omitted": 0}
    busiest = sorted(queues.items(), key=lambda kv: (-(kv[1]["ready"] + kv[1]["inflight"] + kv[1]["dead"]), kv[0]))
    return {**stats, "queues": dict(busiest[:max_queues]), "omitted": len(queues) - max_queues}


class _HeadTooLarge(Exception):
    pass


def _read_head(sock: socket.socket, deadline: float, limit: int) -> bytes:
    """The request line and headers, up to the blank line (or the peer's end of stream).

    Raises ``TimeoutError`` at ``deadline`` (however the bytes trickle in) and
    :class:`_HeadTooLarge` past ``limit`` bytes.
    """
    data = bytearray()
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request deadline")
        sock.settimeout(remaining)
        chunk = sock.recv(min(4096, limit + 1 - len(data)))
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise _HeadTooLarge
    return bytes(data)


class _Handler(BaseHTTPRequestHandler):
    """One request per connection (HTTP/1.0), read whole by :func:`_read_head` before parsing."""

    server: HTTPPort
    deadline = 0.0  # monotonic time this connection must be done by (set per connection in handle)
    server_version = "queuekit"
    sys_version = ""
    protocol_version = "HTTP/1.0"

    def handle(self) -> None:
        deadline = self.deadline = time.monotonic() + self.server.deadline_seconds
        try:
            head = _read_head(self.connection, deadline, MAX_HEAD_BYTES)
        except TimeoutError:
            return  # idle or trickling: cut at the deadline
        except _HeadTooLarge:
            self._write_raw(_TOO_LARGE, deadline)
            return
        except OSError:
            return
        if not head:
            return
        self.rfile.close()
        self.rfile = io.BytesIO(head)  # parsing reads from memory: no more reads from the peer
        # The response, too, must leave by the deadline (sendall's timeout is its total time).
        self.connection.settimeout(max(deadline - time.monotonic(), 0.001))
        self.handle_one_request()

    def _write_raw(self, data: bytes, deadline: float) -> None:
        try:
            self.connection.settimeout(max(deadline - time.monotonic(), 0.001))
            self.connection.sendall(data)
        except OSError:
            pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(with_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(with_body=False)

    def do_POST(self) -> None:  # noqa: N802
        """Only the dashboard's actions take a POST; anything else is 501 as before."""
        dashboard = self.server.dashboard
        if dashboard is None or not dashboard.takes_post(self.path.split("?", 1)[0]):
            self.send_error(501, "Unsupported method ('POST')")
            return
        dashboard.post(self, self.server.authorized(self.headers.get("Authorization")), self.deadline)

    def _answer(self, with_body: bool) -> None:
        port = self.server
        path = self.path.split("?", 1)[0]
        if port.dashboard is not None and port.dashboard.serves(path):  # it applies the token rule itself
            port.dashboard.get(self, port.authorized(self.headers.get("Authorization")), with_body)
            return
        if path not in PROBES and not port.authorized(self.headers.get("Authorization")):
            self._send(401, "text/plain", "unauthorized: send Authorization: Bearer <token>\n", with_body)
        elif path == "/healthz":
            self._send(200, "text/plain", "ok\n", with_body)
        elif path == "/readyz":
            ready = port.status.ready
            reason = None if ready else getattr(port.status, "not_ready_reason", None)  # e.g. standby
            body = "ready\n" if ready else f"not ready: {reason}\n" if reason else "not ready\n"
            self._send(200 if ready else 503, "text/plain", body, with_body)
        elif path in ("/metrics", "/stats"):
            stats = port.get_stats()
            if stats is None:
                self._send(503, "text/plain", "starting\n", with_body)
                return
            stats = bounded_stats(stats, port.max_queues)
            if path == "/metrics":
                reported = port.reported() if port.reported is not None else None
                self._send(200, metrics.CONTENT_TYPE, metrics.render(stats, reported), with_body)
            else:
                self._send(200, "application/json", json.dumps(stats, sort_keys=True) + "\n", with_body)
        elif path.startswith(TASKS_PREFIX):
            self._task_status(path[len(TASKS_PREFIX) :], with_body)
        else:
            self._send(404, "text/plain", "not found: try /healthz /readyz /metrics /stats\n", with_body)

    def _task_status(self, text: str, with_body: bool) -> None:
        """``GET /tasks/<id>``: the task's status as JSON (404 for an unknown task)."""
        task_status = getattr(self.server.status, "task_status", None)
        if not (text.isascii() and text.isdigit()) or len(text) > 20:
            self._send(400, "text/plain", "bad request: /tasks/<id> takes a task id (digits)\n", with_body)
            return
        found = task_status(int(text)) if task_status is not None else None
        if found is None:  # no state here: starting, or a standby (the leader holds it)
            reason = getattr(self.server.status, "not_ready_reason", None)
            if reason == "standby":
                body = "not the leader: this server is a standby; ask the leader (the server whose /readyz is 200)\n"
            else:
                body = "starting\n"
            self._send(503, "text/plain", body, with_body)
        elif found.state == "unknown":
            self._send(404, "application/json", json.dumps(found._asdict(), sort_keys=True) + "\n", with_body)
        else:
            self._send(200, "application/json", json.dumps(found._asdict(), sort_keys=True) + "\n", with_body)

    def _send(self, code: int, content_type: str, body: str, with_body: bool) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if code == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="queuekit"')
        self.end_headers()
        if with_body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: not worth a log line each
        pass


class _Throttle:
    """Counts events; :meth:`count` returns how many since the last log line, at most once per
    ``interval`` seconds (else 0), so a flood costs one log line per interval."""

    def __init__(self, interval: float = 10.0):
        self.interval = interval
        self._events = 0
        self._logged_at = float("-inf")

    def count(self) -> int:
        self._events += 1
        now = time.monotonic()
        if now - self._logged_at < self.interval:
            return 0
        events, self._events, self._logged_at = self._events, 0, now
        return events


class HTTPPort(HTTPServer):
    """Accepts on one thread; serves each connection on a thread of its own, at most
    ``max_connections`` at once; refuses the rest at once."""

    request_queue_size = BACKLOG
    daemon_threads = True
    dashboard: Dashboard | None = None  # the web dashboard, set by the app before it serves

    def __init__(
        self,
        address: Address,
        status: Any,
        get_stats: Callable[[], dict | None],
        *,
        token: Secret | None = None,
        max_queues: int = DEFAULT_MAX_QUEUES,
        max_connections: int = MAX_CONNECTIONS,
        deadline_seconds: float = DEADLINE_SECONDS,
        reported: Callable[[], Reported] | None = None,
    ):
        self.address_family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        self.status = status
        self.get_stats = get_stats
        self.max_queues = max_queues
        self.reported = reported  # what consumers reported, for /metrics
        self.deadline_seconds = deadline_seconds
        self._token = token
        self._slots = threading.BoundedSemaphore(max_connections)
        self._refusals = _Throttle()  # both used on the acceptor thread only
        self._accept_failures = _Throttle()
        super().__init__(address.tuple(), _Handler)

    def authorized(self, header: str | None) -> bool:
        if self._token is None:
            return True
        scheme, _, value = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode("latin-1", "replace"), self._token.reveal())

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as e:  # e.g. out of file descriptors: back off a little, keep accepting
            count = self._accept_failures.count()
            if count:
                _log.warning("http_accept_failed", error=e.strerror or str(e), count=count)
            time.sleep(0.1)
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        """On the acceptor thread: never blocks on a peer, never raises."""
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            threading.Thread(
                target=self._serve_one, args=(request, client_address), name="http-conn", daemon=True
            ).start()
        except Exception as e:  # e.g. "can't start new thread": close this one, keep accepting
            self._slots.release()
            _log.error("http_connection_dropped", reason="thread_start_failed", error=str(e)[:200])
            self.shutdown_request(request)

    def _refuse(self, request: socket.socket) -> None:
        try:
            request.setblocking(False)
            request.send(_BUSY)  # a fresh socket's send buffer takes it whole, or we give up
        except OSError:
            pass
        self.shutdown_request(request)
        count = self._refusals.count()
        if count:
            _log.warning("http_connection_refused", reason="max_connections", count=count)

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):  # a peer going away is not worth a line
            _log.error("http_error", exc_info=error)


def serve(
    address: Address,
    status: Any,
    get_stats: Callable[[], dict | None],
    *,
    token: Secret | None = None,
    max_queues: int = DEFAULT_MAX_QUEUES,
    reported: Callable[[], Reported] | None = None,
) -> HTTPPort:
    """Start the HTTP port's acceptor in a daemon thread; ``status.ready``, ``get_stats()`` and
    ``reported()`` feed it."""
    port = HTTPPort(address, status, get_stats, token=token, max_queues=max_queues, reported=reported)
    threading.Thread(target=port.serve_forever, kwargs={"poll_interval": 0.25}, name="http", daemon=True).start()
    return port
