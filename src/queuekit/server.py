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
"""

from __future__ import annotations

import queue as stdqueue
import threading
import time
import traceback
from multiprocessing import AuthenticationError, managers
from multiprocessing import connection as mpc
from typing import Any

from . import api, compat, logs, transport
from .broker import Broker
from .errors import QueuekitError
from .loop import Loop, Session
from .settings import ServerSettings

API_IDENT = transport.API_IDENT

_log = logs.get("server")


class QueuekitServer(managers.Server):
    """Serves ``broker`` on ``settings.bind``. ``info`` is what ``ping`` and ``stats`` report
    (the application: ``durable`` and ``stats()``)."""

    public = ["create", "accept_connection", "get_methods", "incref", "decref", "dummy"]

    def __init__(self, broker: Broker, settings: ServerSettings, info: Any):
        self.broker = broker
        self.settings = settings
        self.stopping = False
        self._conns: set[transport.Connection] = set()  # connections still in their handshake
        self._conns_lock = threading.Lock()
        self._stopped = threading.Event()
        self._accepter: threading.Thread | None = None
        self.loop = Loop(self.dispatch, _error_reply, broker)
        self._loop_thread: threading.Thread | None = None
        queues: dict[str, compat.CompatQueue] = {}

        def compat_queue(name: str) -> compat.CompatQueue:
            if name not in queues:
                queues[name] = compat.CompatQueue(broker, self.loop, name, lambda: self.stopping)
            return queues[name]

        proxy = managers.AutoProxy  # type: ignore[attr-defined]
        registry = {
            "get_task_queue": (lambda: compat_queue("tasks"), compat.METHODS, None, proxy),
            "get_result_queue": (lambda: compat_queue("results"), compat.METHODS, None, proxy),
            "get_queue": (compat_queue, compat.METHODS, None, proxy),
        }
        # typeshed types the registry and id_to_obj more narrowly than the standard library uses them.
        address, authkey = settings.bind.tuple(), settings.authkey.reveal()
        super().__init__(registry, address, authkey, transport.SERIALIZER)  # type: ignore[arg-type]
        api_object = api.QueueAPI(broker, self.loop, info)
        self.id_to_obj[API_IDENT] = (api_object, set(api.METHODS), None)  # type: ignore[assignment]

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._loop_thread = threading.Thread(target=self.loop.run, name="loop", daemon=True)
        self._loop_thread.start()
        self._accepter = threading.Thread(target=self.accepter, name="accepter", daemon=True)
        self._accepter.start()

    def stop(self, grace: float) -> None:
        """Stop accepting, answer waiting gets, give calls in progress ``grace`` seconds, hang up."""
        self.stopping = True
        self._stopped.set()
        if self._accepter is not None:
            self._accepter.join(timeout=2)
        self.listener.close()  # type: ignore[attr-defined]
        self.broker.close()  # parked gets are answered with nothing, new puts are refused
        self.loop.stop(grace)
        self.loop.wait_stopped(grace + 2.0)
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            conn.shutdown()

    def accepter(self) -> None:
        while not self._stopped.is_set():
            try:
                conn = self.listener.accept()  # type: ignore[attr-defined]
            except TimeoutError:
                continue
            except OSError as e:
                if self._stopped.is_set():
                    return
                _log.warning("accept_failed", error=e)
                time.sleep(0.05)  # e.g. EMFILE: do not spin
                continue
            with self._conns_lock:
                full = self.connection_count() >= self.settings.max_connections
                if not full:
                    self._conns.add(conn)
            if full:
                _log.warning(
                    "connection_refused", peer=conn.peer, reason="max_connections", limit=self.settings.max_connections
                )
                conn.close()
                continue
            threading.Thread(target=self.handle_request, args=(conn,), name=f"conn {conn.peer}", daemon=True).start()

    def connection_count(self) -> int:
        return len(self._conns) + self.loop.session_count()

    # -- per connection ---------------------------------------------------------------------

    def handle_request(self, conn: transport.Connection) -> None:  # type: ignore[override]
        """Authenticate a new connection and answer its first request (the manager's protocol);
        after ``accept_connection`` the connection is served by the loop."""
        served = False
        try:
            try:
                conn.set_recv_timeout(transport.HANDSHAKE_TIMEOUT)
                mpc.deliver_challenge(conn, self.authkey)  # type: ignore[attr-defined]
                mpc.answer_challenge(conn, self.authkey)  # type: ignore[attr-defined]
            except AuthenticationError as e:
                _log.warning("auth_failed", peer=conn.peer, reason=str(e))
                return
            except (OSError, EOFError, ValueError) as e:
                # Port scanners, garbage bytes, clients that hang up or stall mid-handshake.
                _log.warning("handshake_failed", peer=conn.peer, reason=type(e).__name__, detail=str(e)[:200])
                return
            try:
                request = conn.recv()
                conn.set_recv_timeout(None)
                _, funcname, args, kwds = request
            except (OSError, EOFError):
                return
            except Exception as e:  # unpicklable or malformed first request
                self._reply(conn, ("#ERROR", ValueError(f"malformed request: {type(e).__name__}: {e}")))
                return
            if funcname not in self.public:
                _log.warning("request_refused", peer=conn.peer, request=str(funcname)[:100])
                self._reply(conn, ("#ERROR", PermissionError(f"queuekit server does not serve {funcname!r}")))
                return
            if funcname == "accept_connection":
                if self._reply(conn, ("#RETURN", None)):
                    self.loop.add(conn, str(args[0]) if args else "?")
                    served = True
                return
            try:
                msg = ("#RETURN", getattr(self, funcname)(conn, *args, **kwds))
            except Exception as e:
                msg = _error_reply(e)
            self._reply(conn, msg)
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            if not served:
                conn.close()

    def dispatch(self, session: Session, request: Any) -> Any:
        """Answer one request of a served connection (on the loop thread): the exposed methods
        of the API and compat objects take the session first."""
        ident, methodname, args, kwds = request
        obj, exposed, _ = self.id_to_obj[ident]
        if methodname not in exposed:
            if methodname in ("__str__", "__repr__"):
                return f"<queuekit {type(obj).__name__}>"
            raise AttributeError(f"method {methodname!r} is not exposed by {type(obj).__name__}")
        return getattr(obj, methodname)(session, *args, **kwds)

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


def _error_reply(e: Exception) -> tuple:
    if isinstance(e, (QueuekitError, stdqueue.Empty, stdqueue.Full)) or type(e).__module__ == "builtins":
        return ("#ERROR", e)
    _log.error("internal_error", exc_info=e, error=repr(e)[:200])
    return ("#TRACEBACK", "".join(traceback.format_exception(e)))
