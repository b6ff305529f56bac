"""The web dashboard on the HTTP port: a static page and the JSON it reads, and its two actions.

Routes (the page and its script and style are static and hold no data, so they need no token;
everything under ``/api/`` follows the ``/stats`` rule: with a bearer token configured, it needs
``Authorization: Bearer <token>``)::

    GET  /  /dashboard.js  /dashboard.css     the page (package resources queuekit/web/*)
    GET  /api/overview                        /stats (bounded), the connected clients, the consumers'
                                              latest reported info, what the page may do
    GET  /api/history[?queue=NAME ...]        the last hour of gauges and rates (history.History)
    GET  /api/dead?queue=NAME[&limit=N]       dead letters: id, attempts, error, payload preview (*)
    GET  /api/task?id=N[&queue=NAME]          a task's status (queuekit.message.TaskStatus; error (*))
    POST /api/dead/requeue  {"queue", "ids"}  dead -> ready (ids: a list, or null for all)
    POST /api/dead/purge    {"queue", "ids"}  dead -> gone (ids: a list, or "all": true)
    POST /api/task/cancel   {"id", "queue"}   cancel a task (queue: a name, or null for any)

(*) The HTTP port used to show counts only. Payload and error texts are shown only to a reader
who holds a token: the port's read token when it has one, else the admin token (``X-Queuekit-Admin``
on the GET); otherwise they are null and the page says why.

Actions are off unless the server has an admin token (``QUEUEKIT_DASHBOARD_ADMIN_TOKEN_FILE``);
a POST must carry it in ``X-Queuekit-Admin``, a custom header that a cross-site page cannot send
without a CORS preflight, which is never answered. Browsers also say where a request comes from:
a POST whose ``Sec-Fetch-Site`` is not ``same-origin`` or whose ``Origin`` is not this host is
refused before the token is looked at. The credential never lives in a cookie, so nothing is sent
on its own. Every dashboard response carries a Content-Security-Policy without inline script,
``frame-ancestors 'none'`` and ``nosniff``; payloads are JSON strings the page sets as text, never
as markup.

Bounded: a POST body of at most ``MAX_BODY_BYTES``, read by the connection's deadline; at most
``MAX_DEAD_LIMIT`` dead letters a request, each payload cut to ``PREVIEW_CHARS``; at most
``MAX_HISTORY_QUEUES`` queues of history a request; at most ``MAX_CLIENTS`` clients and as many
consumers listed.
"""

from __future__ import annotations

import hmac
import json
import math
import threading
import time
import urllib.parse
from importlib import resources
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from . import __version__, logs
from .errors import QueuekitError
from .history import History
from .message import TaskStatus, check_queue_name
from .settings import Secret

if TYPE_CHECKING:
    from http.server import BaseHTTPRequestHandler

MAX_BODY_BYTES = 16 * 1024
MAX_DEAD_LIMIT = 200
DEFAULT_DEAD_LIMIT = 50
PREVIEW_CHARS = 300
MAX_HISTORY_QUEUES = 12
MAX_CLIENTS = 500
MAX_IDS = 1000  # task ids one action names
ADMIN_HEADER = "X-Queuekit-Admin"
SLOW_ANSWER_SECONDS = 0.5  # to send the 408 of a body that missed the connection's deadline

SECURITY_HEADERS = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
)

ASSETS = {
    "/": ("dashboard.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
API_GET = ("/api/overview", "/api/history", "/api/dead", "/api/task")
API_POST = ("/api/dead/requeue", "/api/dead/purge", "/api/task/cancel")

_log = logs.get("dashboard")


class Source(Protocol):
    """What the dashboard reads and changes: the server application (:class:`AppSource`)."""

    def stats(self) -> dict | None: ...
    def clients(self) -> list[dict]: ...
    def consumers(self) -> list[dict]: ...
    def dead_list(self, queue: str, limit: int) -> list[dict]: ...
    def dead_requeue(self, queue: str, ids: list[int] | None) -> int: ...
    def dead_purge(self, queue: str, ids: list[int] | None) -> int: ...
    def task_status(self, queue: str | None, task_id: int) -> TaskStatus: ...
    def cancel_task(self, queue: str | None, task_id: int) -> str: ...


class AppSource:
    """:class:`Source` over a running :class:`~queuekit.app.ServerApp` (its broker and server)."""

    def __init__(self, app: Any):
        self._app = app

    def stats(self) -> dict | None:
        return self._app.stats()

    def clients(self) -> list[dict]:
        server = self._app.server
        if server is None:
            return []
        out = []
        for s in server.loop.sessions()[:MAX_CLIENTS]:
            waiter = s.waiter
            out.append(
                {
                    "name": s.name,
                    "peer": s.peer,
                    "key": s.grant.name,
                    "role": s.grant.role,
                    "state": s.state.value,
                    # A parked get says which queue the client waits on right now.
                    "waiting_on": waiter.queue.name if waiter is not None and s.state.value == "parked" else None,
                    "tls": s.tls is not None,
                }
            )
        return out

    def consumers(self) -> list[dict]:
        """What the consumers said of themselves on their last heartbeat (consumer_metrics.Store)."""
        return self._app.reports.consumers(MAX_CLIENTS)

    def _broker(self) -> Any:
        broker = self._app.broker
        if broker is None:
            raise _Refused(503, "starting")
        return broker

    def dead_list(self, queue: str, limit: int) -> list[dict]:
        return self._broker().dead_list(queue, limit)

    def dead_requeue(self, queue: str, ids: list[int] | None) -> int:
        return self._broker().dead_requeue(queue, ids)

    def dead_purge(self, queue: str, ids: list[int] | None) -> int:
        return self._broker().dead_purge(queue, ids)

    def task_status(self, queue: str | None, task_id: int) -> TaskStatus:
        return self._broker().status(queue, task_id)

    def cancel_task(self, queue: str | None, task_id: int) -> str:
        return self._broker().cancel_task(queue, task_id)


class _Refused(Exception):
    """A request the dashboard answers with ``code`` and a one-line ``message``."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class Request(NamedTuple):
    method: str
    path: str
    query: dict[str, list[str]]


class Dashboard:
    """Routes of the page and its API; samples ``source.stats()`` into ``history`` on a thread."""

    def __init__(
        self,
        source: Source,
        *,
        admin_token: Secret | None = None,
        read_token: bool = False,
        history: History | None = None,
        max_queues: int = 1000,
    ):
        self.source = source
        # Payloads and errors leave only to a reader who proved something: the port's read token
        # (when it has one: then every API request needs it) or the admin token.
        self._read_token = read_token
        self.history = history or History()
        self.max_queues = max_queues
        self._admin_token = admin_token
        self._assets = {path: _load_asset(name) for path, (name, _) in ASSETS.items()}
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    @property
    def actions(self) -> bool:
        return self._admin_token is not None

    # -- the sampler ------------------------------------------------------------------------

    def start(self) -> None:
        self._sampler = threading.Thread(target=self._sample_loop, name="dashboard-history", daemon=True)
        self._sampler.start()

    def stop(self) -> None:
        self._stop.set()

    def _sample_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample_once()
            except Exception as e:  # never let the history die silently
                _log.error("history_sample_failed", exc_info=e)
            self._stop.wait(self.history.interval)

    def sample_once(self) -> None:
        stats = self.source.stats()
        if stats is not None:
            self.history.sample(stats["queues"], time.time())

    # -- HTTP -------------------------------------------------------------------------------

    def serves(self, path: str) -> bool:
        """Answers GET/HEAD of ``path`` (the page, its assets, the API)."""
        return path in ASSETS or path in API_GET or path in API_POST

    def takes_post(self, path: str) -> bool:
        return path in API_POST

    def get(self, handler: BaseHTTPRequestHandler, authorized: bool, with_body: bool) -> None:
        """Answer a GET/HEAD of a path :meth:`serves`."""
        request = _parse(handler)
        try:
            if request.path in ASSETS:
                self._send(handler, 200, ASSETS[request.path][1], self._assets[request.path], with_body)
                return
            if not authorized:
                raise _Refused(401, "unauthorized: send Authorization: Bearer <token>")
            if request.path not in API_GET:
                raise _Refused(405, "method not allowed: POST")
            body = self._api_get(request, self._read_token or self._admin(handler.headers.get(ADMIN_HEADER)))
        except _Refused as e:
            self._error(handler, e, with_body)
            return
        self._json(handler, 200, body, with_body)

    def post(self, handler: BaseHTTPRequestHandler, authorized: bool, deadline: float) -> None:
        """Answer a POST: the checks in the order the module docstring gives them."""
        request = _parse(handler)
        try:
            if request.path not in API_POST:
                raise _Refused(405 if self.serves(request.path) else 404, "no action here")
            if not self.actions:
                raise _Refused(403, "dashboard actions are off: the server has no QUEUEKIT_DASHBOARD_ADMIN_TOKEN_FILE")
            _check_same_origin(handler)
            if not authorized:
                raise _Refused(401, "unauthorized: send Authorization: Bearer <token>")
            if not self._admin(handler.headers.get(ADMIN_HEADER)):
                raise _Refused(403, f"admin token required: send {ADMIN_HEADER}")
            body = _read_json_body(handler, deadline)
            result = self._act(request.path, body)
        except _Refused as e:
            _log.warning("dashboard_refused", path=request.path, code=e.code, reason=e.message, peer=_peer(handler))
            self._error(handler, e, True)
            return
        _log.info("dashboard_action", peer=_peer(handler), **result)
        self._json(handler, 200, result, True)

    def _admin(self, value: str | None) -> bool:
        token = self._admin_token
        if token is None or not value:
            return False
        return hmac.compare_digest(value.strip().encode("latin-1", "replace"), token.reveal())

    def _api_get(self, request: Request, trusted: bool) -> dict:
        source = self.source
        if request.path == "/api/overview":
            stats = source.stats()
            if stats is None:
                raise _Refused(503, "starting")
            from .http import bounded_stats  # the same bound as /stats

            return {
                "stats": bounded_stats(stats, self.max_queues),
                "clients": source.clients(),
                "consumers": source.consumers(),
                "actions": self.actions,
                "version": __version__,
                "history_interval": self.history.interval,
            }
        if request.path == "/api/history":
            names = request.query.get("queue") or self._busiest()
            for name in names:
                _queue_name(name)
            return self.history.snapshot(names[:MAX_HISTORY_QUEUES])
        if request.path == "/api/task":
            task_id = _int(_one(request.query, "id"), "id", 0, 2**63 - 1)
            given = request.query.get("queue")
            status = source.task_status(_queue_name(given[0]) if given else None, task_id)._asdict()
            if not trusted:  # an error message may quote the payload
                status["last_error"] = None
            return {"contents": trusted, "task": status}
        queue = _queue_name(_one(request.query, "queue"))
        limit = _int(request.query.get("limit", [str(DEFAULT_DEAD_LIMIT)])[0], "limit", 1, MAX_DEAD_LIMIT)
        items = source.dead_list(queue, limit)
        return {"queue": queue, "limit": limit, "contents": trusted, "items": [_preview(i, trusted) for i in items]}

    def _busiest(self) -> list[str]:
        stats = self.source.stats()
        if stats is None:
            return []
        queues = stats["queues"]
        known = set(self.history.names())

        def activity(name: str) -> tuple[int, str]:
            q = queues[name]
            return -(q["ready"] + q["inflight"] + q["dead"] + q["enqueued"]), name

        ranked = sorted((n for n in queues if n in known), key=activity)
        return ranked[:MAX_HISTORY_QUEUES]

    def _act(self, path: str, body: Any) -> dict:
        if not isinstance(body, dict):
            raise _Refused(400, 'the body must be a JSON object {"queue": ..., "ids": [...]}')
        if path == "/api/task/cancel":
            task_id = body.get("id")
            if type(task_id) is not int or not 0 <= task_id < 2**63:
                raise _Refused(400, "id must be a task id (an integer)")
            name = body.get("queue")
            queue_or_any = None if name is None else _queue_name(name)
            state = self.source.cancel_task(queue_or_any, task_id)
            return {"action": "cancel", "queue": queue_or_any, "id": task_id, "state": state}
        queue = _queue_name(body.get("queue"))
        ids = _ids(body.get("ids"))
        if path == "/api/dead/requeue":
            return {"action": "requeue", "queue": queue, "count": self.source.dead_requeue(queue, ids)}
        if ids is None and body.get("all") is not True:
            raise _Refused(400, 'purging every dead letter of a queue needs "all": true (or name the ids)')
        return {"action": "purge", "queue": queue, "count": self.source.dead_purge(queue, ids)}

    # -- responses --------------------------------------------------------------------------

    def _json(self, handler: BaseHTTPRequestHandler, code: int, body: dict, with_body: bool) -> None:
        data = (json.dumps(body, sort_keys=True, allow_nan=False) + "\n").encode()
        self._send(handler, code, "application/json", data, with_body)

    def _error(self, handler: BaseHTTPRequestHandler, e: _Refused, with_body: bool) -> None:
        self._json(handler, e.code, {"error": e.message}, with_body)

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, code: int, content_type: str, data: bytes, with_body: bool) -> None:
        handler.send_response(code)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        for name, value in SECURITY_HEADERS:
            handler.send_header(name, value)
        if code == 401:
            handler.send_header("WWW-Authenticate", 'Bearer realm="queuekit"')
        handler.end_headers()
        if with_body:
            handler.wfile.write(data)


def _load_asset(name: str) -> bytes:
    return resources.files("queuekit").joinpath("web", name).read_bytes()


def _parse(handler: BaseHTTPRequestHandler) -> Request:
    parts = urllib.parse.urlsplit(handler.path)
    query = urllib.parse.parse_qs(parts.query, max_num_fields=MAX_HISTORY_QUEUES + 4)
    return Request(handler.command, parts.path, query)


def _peer(handler: BaseHTTPRequestHandler) -> str:
    host, port = handler.client_address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_same_origin(handler: BaseHTTPRequestHandler) -> None:
    """Refuse what a browser says came from another site. Clients that are not browsers (curl)
    send neither header; they still need the admin token."""
    headers = handler.headers
    site = headers.get("Sec-Fetch-Site")
    if site is not None and site != "same-origin":
        raise _Refused(403, f"cross-site request refused (Sec-Fetch-Site: {site[:40]})")
    origin = headers.get("Origin")
    if origin is not None:
        host = headers.get("Host", "")
        if origin not in (f"http://{host}", f"https://{host}"):
            raise _Refused(403, "cross-origin request refused (Origin is not this host)")
    content_type = (headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
    if content_type != "application/json":
        raise _Refused(415, "send the body as Content-Type: application/json")


def _read_json_body(handler: BaseHTTPRequestHandler, deadline: float) -> Any:
    """The request body (``Content-Length`` bytes, at most ``MAX_BODY_BYTES``) by ``deadline``."""
    length_text = handler.headers.get("Content-Length")
    if length_text is None or not length_text.strip().isdigit():
        raise _Refused(411, "Content-Length required")
    length = int(length_text)
    if length > MAX_BODY_BYTES:
        raise _Refused(413, f"body larger than {MAX_BODY_BYTES} bytes")
    data = bytearray(handler.rfile.read(length))  # what came with the head (rfile is in memory)
    sock = handler.connection
    while len(data) < length:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = sock.recv(min(65536, length - len(data)))
        except TimeoutError:
            sock.settimeout(SLOW_ANSWER_SECONDS)  # past the deadline: a short while for the 408 to leave
            raise _Refused(408, "request body too slow") from None
        if not chunk:
            raise _Refused(400, "request body cut short")
        data += chunk
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise _Refused(400, "the body is not JSON") from None


def _one(query: dict[str, list[str]], name: str) -> str:
    values = query.get(name)
    if not values:
        raise _Refused(400, f"missing ?{name}=")
    return values[0]


def _int(text: str, name: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _Refused(400, f"{name} must be an integer") from None
    if not low <= value <= high:
        raise _Refused(400, f"{name} must be in {low}..{high}")
    return value


def _queue_name(name: Any) -> str:
    try:
        return check_queue_name(name)
    except QueuekitError as e:
        raise _Refused(400, str(e)[:300]) from None


def _ids(ids: Any) -> list[int] | None:
    if ids is None:
        return None
    if not isinstance(ids, list) or len(ids) > MAX_IDS or not all(type(i) is int and 0 <= i < 2**63 for i in ids):
        raise _Refused(400, f"ids must be a list of at most {MAX_IDS} task ids (integers), or null")
    return ids


def _preview(item: dict, contents: bool) -> dict:
    """A dead letter for the page: the payload's JSON text cut to ``PREVIEW_CHARS`` (the page
    shows it as text; nothing here is markup). Without ``contents``, neither payload nor error
    (an error message may quote the payload): None."""
    payload = item["payload"]
    return {
        "id": item["id"],
        "attempts": item["attempts"],
        "enqueued_at": item["enqueued_at"] if math.isfinite(item["enqueued_at"]) else None,
        "error": (item.get("last_error") or "")[: PREVIEW_CHARS * 2] if contents else None,
        "payload": payload[:PREVIEW_CHARS] if contents else None,
        "payload_chars": len(payload),
    }


def for_app(app: Any) -> Dashboard:
    """The dashboard of a starting :class:`~queuekit.app.ServerApp`, its sampler running."""
    settings = app.settings
    history = History(interval=settings.dashboard_sample_seconds, max_queues=settings.http_max_queues)
    board = Dashboard(
        AppSource(app),
        admin_token=settings.dashboard_admin_token,
        read_token=settings.http_token is not None,
        history=history,
        max_queues=settings.http_max_queues,
    )
    board.start()
    return board
