"""The manager server: a ``multiprocessing.managers.Server`` that serves the broker over TCP.

What a client can reach, and nothing else:

- the queuekit API object under the well-known ident ``API_IDENT`` (``QueueAPI``'s methods);
- for stock ``BaseManager`` clients, the typeids ``get_task_queue`` / ``get_result_queue`` (queues
  ``tasks`` / ``results``) and ``get_queue(name)``, returning ``queue.Queue`` look-alikes
  (``CompatQueue``);
- of the manager's own requests only ``create``, ``accept_connection``, ``get_methods``,
  ``incref``, ``decref`` and ``dummy``: no ``shutdown``, no ``debug_info``.

The per-connection code is ours (same wire protocol as the stock server): a short-lived thread
per new connection runs the handshake (with a timeout, logging authentication failures with the
peer's address) and answers its first request; a connection that asks to be served
(``accept_connection``) then joins the event loop of :mod:`queuekit.loop`, where one thread serves
every client, a waiting get costs no thread, and a hook runs once a reply was actually written.
"""

from __future__ import annotations

import os
import queue as stdqueue
import signal
import threading
import time
import traceback
from multiprocessing import AuthenticationError, managers
from multiprocessing import connection as mpc

from . import __version__, logs, transport
from .broker import Broker, receipts
from .errors import ConfigError, ExitCode, QueuekitError, ServerShuttingDown
from .loop import Loop, Session
from .message import decode_payload, encode_payload
from .settings import ServerSettings

API_IDENT = transport.API_IDENT
API_METHODS = (
    "ping",
    "put_many",
    "get_many",
    "ack_many",
    "nack_many",
    "extend_many",
    "release_many",
    "dead_list",
    "dead_requeue",
    "dead_purge",
    "stats",
    "qsize",
)
COMPAT_METHODS = ("put", "put_nowait", "get", "get_nowait", "qsize", "empty", "full", "task_done")
MAX_SERVER_WAIT = 60.0  # one get_many call waits at most this long (the client library loops)
COMPAT_LEASE = 60.0
REAPER_INTERVAL = 0.2

_log = logs.get("server")


class Status:
    """What the health endpoints report."""

    def __init__(self, journal):
        self.started = time.monotonic()
        self.journal = journal
        self.durable = journal.durable
        self.serving = False

    @property
    def ready(self) -> bool:
        """Listening, state loaded, and the journal (if any) still commits."""
        return self.serving and self.journal.healthy


class QueueAPI:
    """The calls a queuekit client makes (``queuekit.client``). Arguments are validated by the broker.

    Called on the loop thread; ``get_many`` may park and a durable ``put_many`` is answered after
    the loop's group commit."""

    def __init__(self, broker: Broker, server: QueuekitServer):
        self._broker = broker
        self._server = server
        self._loop = server.loop

    def ping(self) -> dict:
        return {
            "server": "queuekit",
            "version": __version__,
            "durable": self._server.status.durable,
            "max_task_bytes": self._broker.max_task_bytes,
        }

    def put_many(self, queue, texts, delay=0.0):
        broker = self._broker
        put = broker.begin_put(queue, texts, delay)
        if not put.seq:  # memory mode: visible already
            return broker.finish_put(put)

        def finish(error: BaseException | None) -> list[int]:
            if error is not None:
                raise error
            return broker.finish_put(put)

        return self._loop.after_commit(self._loop.current, put.seq, finish)

    def get_many(self, queue, max_n=1, timeout=0.0, lease=None, acks=None):
        if type(timeout) in (int, float) and timeout > MAX_SERVER_WAIT:
            timeout = MAX_SERVER_WAIT  # the client library loops for longer waits
        loop = self._loop
        session = loop.current
        result = self._broker.get_or_wait(queue, max_n, timeout, lease, acks, session.deliver)
        if type(result) is list:
            return self._answer(session, queue, result)
        return loop.park(session, result, timeout, lambda items: self._answer(session, queue, items))

    def _answer(self, session: Session, queue: str, items: list) -> list:
        if items:
            broker = self._broker

            def release_unsent(sent: bool) -> None:
                if not sent:  # the client never got them: ready again at once, no attempt charged
                    broker.release_many(queue, receipts(items))

            session.hook = release_unsent
        return items

    def ack_many(self, queue, ids):
        return self._broker.ack_many(queue, ids)

    def nack_many(self, queue, items):
        return self._broker.nack_many(queue, items)

    def extend_many(self, queue, receipts, lease=None):
        return self._broker.extend_many(queue, receipts, lease)

    def release_many(self, queue, receipts):
        return self._broker.release_many(queue, receipts)

    def dead_list(self, queue, limit=100):
        return self._broker.dead_list(queue, limit)

    def dead_requeue(self, queue, ids=None):
        return self._broker.dead_requeue(queue, ids)

    def dead_purge(self, queue, ids=None):
        return self._broker.dead_purge(queue, ids)

    def stats(self):
        return self._server.stats()

    def qsize(self, queue):
        return self._broker.qsize(queue)


class CompatQueue:
    """A ``queue.Queue`` look-alike over one named queue, for stock ``BaseManager`` clients.

    At-most-once: a task taken with ``get`` is acknowledged as soon as the reply carrying it has
    been written to the client's socket (if that write fails it is released, not lost). A blocking
    ``get`` parks in the event loop like the queuekit API's (no thread, no time limit). Errors are
    builtin exceptions (``queue.Empty``, ``ValueError``, ``ConnectionError``) because a stock client
    cannot unpickle queuekit's own.
    """

    def __init__(self, broker: Broker, server: QueuekitServer, name: str):
        self._broker = broker
        self._server = server
        self._name = name

    def put(self, item, block=True, timeout=None):
        broker = self._broker
        try:
            put = broker.begin_put(self._name, [encode_payload(item, broker.max_task_bytes)])
        except ServerShuttingDown as e:
            raise ConnectionError(str(e)) from None
        except QueuekitError as e:
            raise ValueError(f"queuekit: {e}") from None
        if not put.seq:
            return None

        def finish(error: BaseException | None) -> None:
            if error is not None:  # the journal failed: a server problem, not bad input
                raise OSError(f"queuekit: {error}")
            broker.finish_put(put)

        loop = self._server.loop
        return loop.after_commit(loop.current, put.seq, finish)

    def put_nowait(self, item):
        return self.put(item, block=False)

    def get(self, block=True, timeout=None):
        if not block:
            wait = 0.0
        elif timeout is None:
            wait = None
        elif type(timeout) not in (int, float) or not timeout >= 0:
            raise ValueError("'timeout' must be a non-negative number")
        else:
            wait = float(timeout)
        loop = self._server.loop
        session = loop.current
        result = self._broker.get_or_wait(
            self._name, 1, float("inf") if wait is None else wait, COMPAT_LEASE, None, session.deliver
        )
        if type(result) is list:
            return self._answer(session, result)
        return loop.park(session, result, wait, lambda items: self._answer(session, items))

    def _answer(self, session: Session, items: list):
        if not items:
            if self._server.stopping:
                raise ConnectionError("queuekit server is shutting down")
            raise stdqueue.Empty
        task_id, delivery, _, text, _ = items[0]
        name, broker = self._name, self._broker

        def settle(sent: bool) -> None:
            if sent:
                broker.ack_many(name, [task_id])
            else:
                broker.release_many(name, [(task_id, delivery)])

        session.hook = settle
        return decode_payload(text)

    def get_nowait(self):
        return self.get(block=False)

    def qsize(self):
        return self._broker.qsize(self._name)

    def empty(self):
        return self.qsize() == 0

    def full(self):
        return False

    def task_done(self):
        """Accepted for compatibility; delivery already acknowledged the task."""


class QueuekitServer(managers.Server):
    public = ["create", "accept_connection", "get_methods", "incref", "decref", "dummy"]

    def __init__(self, broker: Broker, settings: ServerSettings, status: Status):
        self.broker = broker
        self.settings = settings
        self.status = status
        self.stopping = False
        self._conns: set[transport.Connection] = set()  # connections still in their handshake
        self._conns_lock = threading.Lock()
        self._stopped = threading.Event()
        self._accepter: threading.Thread | None = None
        self.loop = Loop(self.dispatch, _error_reply, broker)
        self._loop_thread: threading.Thread | None = None
        compat = {}

        def compat_queue(name: str) -> CompatQueue:
            if name not in compat:
                compat[name] = CompatQueue(broker, self, name)
            return compat[name]

        registry = {
            "get_task_queue": (lambda: compat_queue("tasks"), COMPAT_METHODS, None, managers.AutoProxy),
            "get_result_queue": (lambda: compat_queue("results"), COMPAT_METHODS, None, managers.AutoProxy),
            "get_queue": (compat_queue, COMPAT_METHODS, None, managers.AutoProxy),
        }
        super().__init__(registry, settings.bind.tuple(), settings.authkey.reveal(), transport.SERIALIZER)
        self.id_to_obj[API_IDENT] = (QueueAPI(broker, self), set(API_METHODS), None)

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
        self.listener.close()
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
                conn = self.listener.accept()
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

    def stats(self) -> dict:
        return {
            "queues": self.broker.stats(),
            "connections": self.connection_count(),
            "durable": self.status.durable,
            "journal_commits": self.status.journal.commits,
            "ready": self.status.ready,
            "uptime_seconds": round(time.monotonic() - self.status.started, 3),
        }

    # -- per connection ---------------------------------------------------------------------

    def handle_request(self, conn: transport.Connection) -> None:
        """Authenticate a new connection and answer its first request (the manager's protocol);
        after ``accept_connection`` the connection is served by the loop."""
        served = False
        try:
            try:
                conn.set_recv_timeout(transport.HANDSHAKE_TIMEOUT)
                mpc.deliver_challenge(conn, self.authkey)
                mpc.answer_challenge(conn, self.authkey)
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

    def dispatch(self, session: Session, request) -> object:
        """Answer one request of a served connection (on the loop thread)."""
        ident, methodname, args, kwds = request
        obj, exposed, _ = self.id_to_obj[ident]
        if methodname not in exposed:
            if methodname in ("__str__", "__repr__"):
                return f"<queuekit {type(obj).__name__}>"
            raise AttributeError(f"method {methodname!r} is not exposed by {type(obj).__name__}")
        return getattr(obj, methodname)(*args, **kwds)

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


def _open_journal(settings: ServerSettings):
    if not settings.data_dir:
        from .journal import Journal

        return Journal()
    from .journal_sqlite import SqliteJournal

    return SqliteJournal(settings.data_dir, sync=settings.sync)


def run(settings: ServerSettings) -> int:
    """Run the server until SIGTERM/SIGINT; return the exit code."""
    stop = threading.Event()
    signals = {"count": 0}

    def on_signal(signum, frame):  # only set flags: the main loop does the work
        signals["count"] += 1
        if signals["count"] > 1:
            os._exit(ExitCode.ERROR)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    journal = _open_journal(settings)
    status = Status(journal)
    _log.info(
        "server_starting",
        version=__version__,
        pid=os.getpid(),
        bind=settings.bind,
        http=settings.http or "off",
        journal=journal.description,
        sync=settings.sync if journal.durable else None,
        max_attempts=settings.max_attempts,
        max_task_bytes=settings.max_task_bytes,
    )
    if not journal.durable:
        _log.warning(
            "not_durable", detail="no --data-dir/QUEUEKIT_DATA_DIR: queued tasks are lost when the server stops"
        )
    broker = Broker(
        journal=journal,
        max_task_bytes=settings.max_task_bytes,
        max_attempts=settings.max_attempts,
        retry_base=settings.retry_base_seconds,
        retry_max=settings.retry_max_seconds,
        default_lease=settings.lease_seconds,
    )

    from . import http

    web = None
    if settings.http:
        try:
            web = http.serve(settings.http, status, lambda: server.stats() if server else None)
        except OSError as e:
            raise ConfigError(f"cannot listen for HTTP on {settings.http}: {e.strerror or e}") from None

    server = None
    started = time.monotonic()
    counts = broker.recover()
    if journal.durable:
        _log.info(
            "recovered",
            tasks=sum(counts.values()),
            seconds=round(time.monotonic() - started, 3),
            **{f"queue.{name}": n for name, n in sorted(counts.items())},
        )
    try:
        server = QueuekitServer(broker, settings, status)
    except OSError as e:
        raise ConfigError(f"cannot listen on {settings.bind}: {e.strerror or e}") from None
    server.start()
    reaper = threading.Thread(target=_reap, args=(broker, stop), name="reaper", daemon=True)
    reaper.start()
    status.serving = True
    host, port = server.address[:2]
    _log.info(
        "server_ready",
        bind=transport.format_peer((host, port)),
        http=transport.format_peer(web.server_address[:2]) if web else "off",
        durable=journal.durable,
    )
    while not stop.wait(0.5):
        pass
    t0 = time.monotonic()
    _log.info("server_stopping", connections=server.connection_count())
    status.serving = False
    server.stop(settings.shutdown_grace_seconds)
    saved = broker.save_leases()
    journal.flush(timeout=2.0)
    journal.close()
    if web:
        web.shutdown()
    _log.info(
        "server_stopped", seconds=round(time.monotonic() - t0, 3), leases_saved=saved if journal.durable else None
    )
    return ExitCode.OK


def _reap(broker: Broker, stop: threading.Event) -> None:
    while not stop.wait(REAPER_INTERVAL):
        try:
            broker.tick()
        except Exception as e:  # never let housekeeping die silently
            _log.error("reaper_failed", exc_info=e)
