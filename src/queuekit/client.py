"""The client library: ``queuekit.connect(...)`` and queue handles.

    import queuekit
    client = queuekit.connect("queue-host:50000", authkey_file="/run/secrets/queuekit_authkey")
    jobs = client.queue("emails")
    jobs.put({"to": "a@example.org"})
    task = jobs.get(timeout=5)            # leased for 30 s (lease=... to change)
    ...                                   # do the work; jobs.extend(task) for long work
    jobs.ack(task)                        # or jobs.nack(task, error="...") to retry with backoff

A ``Client`` may be shared by threads: each thread gets its own connection (calls on one
connection are strictly request/response). Network trouble is retried: the client reconnects
with exponential backoff until ``connect_timeout`` has passed, then raises
:class:`ServerUnavailable`. A wrong authkey raises :class:`AuthenticationFailed` at once and is
never retried. A retried ``put`` whose first attempt reached the server before the connection
broke enqueues twice: delivery is at-least-once, end to end.

Several addresses (``connect("a:50000,b:50000")``, ``QUEUEKIT_SERVER=a:50000,b:50000``): servers
sharing a PostgreSQL journal, one leader and standbys. The client tries them in turn: an address
that cannot be reached, or a standby that refuses with :class:`NotLeader`, sends it to the next
one at once; the backoff applies after a whole round. A connection that breaks, or a leader that
steps down, starts the next attempt at the following address.

Every call has a reply deadline: ``call_timeout`` (``connect(..., call_timeout=)``,
``QUEUEKIT_CALL_TIMEOUT`` for the commands, default 10 s) for a call the server answers at once
(put, ack, nack, extend, heartbeat, stats, status, cancel, ping...), the server-side wait plus
``call_timeout`` for one that waits (``get``/``get_many`` with ``timeout=``, ``result``, ``call``;
a short wait may round the deadline up by at most a second, so that a consumer switching between
waits does not reset the socket's timeout per call). A call without a reply by then is treated
like a broken connection (``event=call_timeout`` at warning): dropped, and retried at the next
address within ``connect_timeout``. That is what gets a client off a frozen leader (SIGSTOP,
``docker pause``, a VM stall), whose kernel still acknowledges TCP so that no keepalive ever
fires: a standby takes over within the leader lease, and the client's pending call moves to it
``call_timeout`` after it was sent. A put retried this way may have been committed by the leader
before it froze: it is then enqueued twice (at least once, as above).

Sending a request has the same bound: a frozen server stops reading, and a large request (a
``put_many`` chunk, up to ``PUT_CHUNK_TASKS`` tasks or ``PUT_CHUNK_BYTES``) fills the socket
buffers of both ends; a send that then moves no byte for ``call_timeout`` seconds fails
(``SO_SNDTIMEO``, set once per connection; over TLS the socket's timeout). A slow link that keeps
taking bytes is waited for: the bound is on no progress, not on the whole request, and the reply
deadline of a request over ``DRAIN_BYTES`` starts once the server's kernel has acknowledged all of
it (``Connection.wait_sent``), not while megabytes of it still sit in our send buffer (a slow link
would otherwise look like a silent server, and the put go twice). Such a call is
logged ``event=send_timeout`` (warning) and handled like one without a reply: the connection is
dropped and the call retried at the next address within ``connect_timeout``. The request was left
half sent, so the server never runs it (it reads an incomplete message, then the end of the
connection): a put retried after a send timeout is enqueued once; only one whose request went
out whole and then got no reply (``call_timeout``) may be enqueued twice. The frozen server is
given up between ``call_timeout`` and twice that after its buffers filled (the write that filled
them returns after its own timeout with what it moved; the next one fails).

TLS: ``connect(..., tls_ca_file=...)`` (``QUEUEKIT_TLS_CA_FILE`` for the commands) verifies the
server's certificate against that CA and the name connected to (or ``tls_server_name``);
``tls_cert_file``/``tls_key_file`` present a client certificate (mutual TLS). A TLS failure that
retrying cannot fix (untrusted, expired or misnamed certificate, a refused client certificate, TLS
on one side only) raises :class:`TLSError` at once, naming the setting to fix.
"""

from __future__ import annotations

import math
import random
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from multiprocessing import AuthenticationError
from typing import Any

from . import handshake, logs, tracing, transport
from .errors import (
    AuthenticationFailed,
    ConfigError,
    NotLeader,
    QueuekitError,
    ResultExpired,
    ResultTimeout,
    ServerShuttingDown,
    ServerUnavailable,
    TaskCancelled,
    TaskDead,
    TLSError,
)
from .message import (
    Heartbeat,
    NackItem,
    Task,
    TaskStatus,
    check_headers,
    check_queue_name,
    check_task_timeout,
    decode_payload,
    encode_payload,
    encode_result,
)
from .settings import DEFAULT_CALL_TIMEOUT, Address, Secret, ServerList, load_authkey

# Seconds a reply may take beyond the call's server-side wait (10). A server answers a put within
# milliseconds (a COMMIT included); 10 s of silence means it is frozen or gone, and the call moves
# to the next address (a standby that took over). Longer only delays failover; shorter risks
# giving up on a server that is merely slow (and a retried put enqueues twice).
CALL_TIMEOUT = DEFAULT_CALL_TIMEOUT
MAX_WAIT_PER_CALL = 30.0  # server-side wait per call; longer waits are made of several calls
# A call's receive timeout is left as it is when it is already between the deadline the call
# needs and this much more: a consumer alternating waits of 0, 0.05 and 1 s pays no setsockopt
# per call.
DEADLINE_SLACK = 1.0
# A request larger than this may still sit in the send buffer (up to 4 MiB) when send returns: the
# reply deadline starts only once the server's kernel has all of it (Connection.wait_sent), or a
# slow link would time out a put the server is still reading, and retry it (enqueued twice).
DRAIN_BYTES = 256 * 1024
PUT_CHUNK_TASKS = 1000
PUT_CHUNK_BYTES = 16 * 1024 * 1024

_log = logs.get("client")
NOT_LEADER = "not the leader"  # in the builtin error a standby answers accept_connection with
# Errors after which the same call is retried on another connection (nothing was done).
_RETRY_ELSEWHERE = (ServerShuttingDown, NotLeader)


class RemoteError(QueuekitError):
    """The server failed unexpectedly while handling a call (its traceback is the message)."""


class Client:
    def __init__(
        self,
        address: Address | str | tuple | list,
        authkey: bytes | str | Secret,
        *,
        connect_timeout: float = 30.0,
        call_timeout: float = CALL_TIMEOUT,
        max_task_bytes: int | None = None,
        name: str = "queuekit-client",
        authkey_source: str = "authkey",
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        tls_server_name: str | None = None,
    ):
        self.addresses = parse_addresses(address)
        self.address = self.addresses[0]  # the one connected to last (or to try first)
        self._next = 0  # index of the address the next connection attempt starts with
        if isinstance(authkey, Secret):
            authkey = authkey.reveal()
        elif isinstance(authkey, str):
            authkey = authkey.encode()
        self._authkey = bytes(authkey)
        self._authkey_source = authkey_source
        if (tls_cert_file or tls_key_file) and not tls_ca_file:
            raise ConfigError(
                "a client certificate (QUEUEKIT_TLS_CLIENT_CERT_FILE, tls_cert_file=) needs TLS: "
                "set QUEUEKIT_TLS_CA_FILE (tls_ca_file=) to the CA that signed the server's certificate"
            )
        self._tls_files = (tls_ca_file, tls_cert_file)
        self._tls_context = (
            transport.client_tls_context(tls_ca_file, tls_cert_file, tls_key_file) if tls_ca_file else None
        )
        self._tls_server_name = tls_server_name
        if not 0 < call_timeout < float("inf"):  # also refuses NaN
            raise ConfigError(f"call_timeout must be a number of seconds > 0, got {call_timeout!r}")
        self.connect_timeout = connect_timeout
        self.call_timeout = float(call_timeout)
        self.name = name
        self.server_info: dict = {}
        self._max_task_bytes = max_task_bytes
        self._tls = threading.local()
        self._conns: set[transport.Connection] = set()
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"Client(address={format_addresses(self.addresses)!r}, authkey=<redacted>)"

    # -- public -----------------------------------------------------------------------------

    def queue(self, name: str) -> Queue:
        return Queue(self, check_queue_name(name))

    def queues(self, names: Iterable[str]) -> QueueSet:
        """Several queues consumed together, in strict order of priority (see :class:`QueueSet`)."""
        return QueueSet(self, [check_queue_name(n) for n in names])

    # Task lifecycle by id. ``queue`` None: any queue (only keys not limited to queues may).

    def status(self, task_id: int, queue: str | None = None) -> TaskStatus:
        """Where task ``task_id`` is in its life (state unknown when the server does not know it)."""
        return TaskStatus._make(self.call("status", queue, task_id))

    def result(self, task_id: int, timeout: float | None = None, queue: str | None = None) -> Any:
        """Wait up to ``timeout`` s (None: for ever) for the task to finish and return its result
        (None when its handler returned none). The server parks the wait (no polling). Raises
        :class:`TaskDead`, :class:`TaskCancelled`, :class:`ResultExpired` (unknown or evicted
        from the result store) or :class:`ResultTimeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = MAX_WAIT_PER_CALL if deadline is None else max(0.0, deadline - time.monotonic())
            wait = min(remaining, MAX_WAIT_PER_CALL)
            state, text, error = self.call("result", queue, task_id, wait, wait=wait)
            if state == "succeeded":
                return None if text is None else decode_payload(text)
            if state == "dead":
                raise TaskDead(f"task {task_id} was dead-lettered; its last error: {error}")
            if state == "cancelled":
                raise TaskCancelled(f"task {task_id} was cancelled")
            if state == "unknown":
                raise ResultExpired(
                    f"the server knows no task {task_id}{'' if queue is None else ' in queue ' + repr(queue)}: never "
                    "created, or finished longer ago than its result store keeps (QUEUEKIT_RESULT_TTL, "
                    "QUEUEKIT_RESULT_MAX_COUNT, QUEUEKIT_RESULT_MAX_BYTES)"
                )
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(f"task {task_id} did not finish within {timeout:g} s (it may still finish)")

    def cancel(self, task_id: int, queue: str | None = None) -> str:
        """Cancel a task: "cancelled" (it was waiting: removed), "cancelling" (in flight: flagged;
        its consumer sees it at its next heartbeat and its ack/nack records it cancelled), the
        state it had already finished in (succeeded, dead, cancelled), or "unknown"."""
        return self.call("cancel", queue, task_id)

    @property
    def max_result_bytes(self) -> int:
        info = self.server_info or self.ping()
        return int(info.get("max_result_bytes") or 64 * 1024)

    def ping(self) -> dict:
        self.server_info = self.call("ping")
        return self.server_info

    def stats(self) -> dict:
        return self.call("stats")

    def report(self, report: dict) -> bool:
        """Send consumer metrics (a :class:`queuekit.consumer_metrics.Recorder` report); False
        when the server had applied that report already (a retry). Not retried here: the
        heartbeat that sends it must not wait for a reconnect; the next one resends it."""
        return self.call("report", report, retry=False)

    @property
    def max_task_bytes(self) -> int:
        if self._max_task_bytes is None:
            self._max_task_bytes = int(self.server_info.get("max_task_bytes") or self.ping()["max_task_bytes"])
        return self._max_task_bytes

    def close(self) -> None:
        self._closed = True
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls ------------------------------------------------------------------------------

    def call(self, method: str, *args: Any, retry: bool = True, wait: float = 0.0) -> Any:
        """Call ``method`` on the server's API object; reconnect and retry on network errors.

        ``wait``: the seconds the server may hold the call before it answers (a blocking get's
        or a result's wait). A reply that has not come ``wait + call_timeout`` seconds after the
        call was sent counts as a broken connection: retried elsewhere (see the module docstring).
        """
        # Fast path first: an open connection, one send, one receive.
        conn = getattr(self._tls, "conn", None)
        if conn is not None:
            sending = True
            try:
                self._send_request(conn, method, args, wait)
                sending = False
                kind, result = conn.recv()
            except transport.UnpicklingRefused:
                self._drop(conn)  # not a queuekit server's reply: never retried
                raise
            except (OSError, EOFError) as e:
                why = self._call_failed(conn, method, e, sending)
                if not retry or self._closed:
                    raise ServerUnavailable(f"queuekit server at {self.address}: {method} failed: {why}") from e
            else:
                if kind == "#RETURN":
                    return result
                if kind != "#ERROR" or not isinstance(result, _RETRY_ELSEWHERE) or not retry:
                    raise result if kind == "#ERROR" else RemoteError(f"server error in {method}: {result}")
                self._drop(conn, failed=True)
        return self._call_retrying(method, args, retry, wait)

    def _call_retrying(self, method: str, args: tuple, retry: bool, wait: float = 0.0) -> Any:
        """The slow path: (re)connect with backoff until ``connect_timeout`` has passed."""
        deadline = time.monotonic() + self.connect_timeout
        delay = 0.05
        waited_out = False
        while True:
            conn = self._connection(deadline)
            sent = time.monotonic()
            sending = True
            try:
                self._send_request(conn, method, args, wait)
                sending = False
                kind, result = conn.recv()
            except transport.UnpicklingRefused:
                self._drop(conn)  # not a queuekit server's reply: never retried
                raise
            except (OSError, EOFError) as e:
                why = self._call_failed(conn, method, e, sending)
                if not waited_out:
                    # The first wait for a reply does not eat the reconnect budget (a get parked
                    # 30 s on a leader that froze would leave none): connect_timeout still runs
                    # from the failure, as after a failed call on the fast path.
                    deadline += time.monotonic() - sent
                    waited_out = True
                if not retry or self._closed or time.monotonic() >= deadline:
                    raise ServerUnavailable(f"queuekit server at {self.address}: {method} failed: {why}") from e
                _log.debug("call_retry", method=method, error=_describe(e))
            else:
                if kind == "#RETURN":
                    return result
                if kind == "#ERROR":
                    if isinstance(result, _RETRY_ELSEWHERE) and retry and time.monotonic() < deadline:
                        self._drop(conn, failed=True)  # it restarts or stepped down: try the next
                    else:
                        raise result
                else:
                    raise RemoteError(f"server error in {method}: {result}")
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 2.0)

    def _send_request(self, conn: transport.Connection, method: str, args: tuple, wait: float) -> None:
        """Send one call, with its reply deadline set. No poll() per call (it costs a selector per
        round trip): the socket's receive timeout bounds the wait for the reply instead, its send
        timeout (call_timeout, set once by _connect) a send the server does not read; a large
        request's deadline starts once the server's kernel has all of it."""
        self._reply_deadline(conn, wait)
        conn.send((transport.API_IDENT, method, args, {}))
        if conn.sent_bytes > DRAIN_BYTES:
            conn.wait_sent(self.call_timeout)

    def _reply_deadline(self, conn: transport.Connection, wait: float) -> None:
        """Make ``conn``'s receive timeout fit a call the server may hold ``wait`` seconds:
        between ``wait + call_timeout`` and ``DEADLINE_SLACK`` more. The value in force is
        cached beside the connection, so the common case costs no system call."""
        needed = self.call_timeout + wait
        current = self._tls.recv_timeout
        if not needed <= current <= needed + DEADLINE_SLACK:
            current = self.call_timeout + math.ceil(wait)  # whole seconds: fewer changes
            conn.set_recv_timeout(current)
            self._tls.recv_timeout = current

    def _call_failed(self, conn: transport.Connection, method: str, e: BaseException, sending: bool) -> str:
        """A call on ``conn`` got no reply: the connection is dropped (the next attempt starts
        at the following address); returns what went wrong, for an error message. A receive
        timeout (``BlockingIOError`` from SO_RCVTIMEO, ``TimeoutError`` over TLS) means the
        server went silent: frozen, or gone without a word. The same while ``sending``: the
        server stopped reading the request (its buffers are full) and it was left half sent, so
        the connection must go (the server, should it wake, reads an incomplete message and an
        end of stream: it never runs that request)."""
        why = _describe(e)
        if isinstance(e, (BlockingIOError, TimeoutError)):
            server = getattr(self._tls, "address", self.address)
            # Over TLS one timeout (the socket's) bounds the sends and the receives.
            after = round(getattr(self._tls, "recv_timeout", self.call_timeout), 3)
            if sending:
                after = round(self.call_timeout, 3) if self._tls_context is None else after
                _log.warning("send_timeout", server=server, method=method, after=after)
                why = f"the server took no byte of the request for {after:g} s (send_timeout)"
            else:
                _log.warning("call_timeout", server=server, method=method, after=after)
                why = f"no reply within {after:g} s (call_timeout)"
        self._drop(conn, failed=True)
        return why

    def _connection(self, deadline: float) -> transport.Connection:
        conn = getattr(self._tls, "conn", None)
        if conn is not None:
            return conn
        conn = self._connect(deadline)
        self._tls.conn = conn
        self._tls.recv_timeout = self.call_timeout  # set by _connect
        self._tls.address = self.address
        with self._lock:
            self._conns.add(conn)
        return conn

    def _connect(self, deadline: float) -> transport.Connection:
        """Connect and authenticate, retrying with backoff until ``deadline``: each address in
        turn, the backoff after each round."""
        delay = 0.1
        attempt = 0
        n = len(self.addresses)
        while True:
            if self._closed:
                raise ServerUnavailable("client is closed")
            attempt += 1
            remaining = deadline - time.monotonic()
            index = self._next % n
            address = self.address = self.addresses[index]
            try:
                conn = transport.Client(
                    address.tuple(),
                    authkey=self._authkey,
                    connect_timeout=max(0.5, min(remaining, 10.0)),
                    # A server that does not answer a handshake within call_timeout is as
                    # silent as one that does not answer a call (a frozen leader's kernel
                    # still accepts connections).
                    handshake_timeout=min(transport.HANDSHAKE_TIMEOUT, self.call_timeout),
                    # A request the server does not read (a frozen leader: full buffers) fails
                    # after call_timeout without a byte sent, like a call without a reply.
                    send_timeout=self.call_timeout,
                    tls=self._tls_context,
                    server_name=self._tls_server_name,
                )
                try:
                    conn.send((None, "accept_connection", (self.name,), {}))
                    if not conn.poll(min(transport.HANDSHAKE_TIMEOUT, self.call_timeout)):
                        raise TimeoutError("no answer to accept_connection")
                    kind, result = conn.recv()
                    if kind != "#RETURN":
                        if isinstance(result, ConnectionError) and NOT_LEADER in str(result):
                            raise NotLeader(f"{address} is a standby: {result}")
                        raise ConnectionError(f"server refused the connection: {result}")
                    conn.set_recv_timeout(self.call_timeout)
                except BaseException:
                    conn.close()
                    raise
                if attempt > 1:
                    _log.info("connected", server=address, attempts=attempt)
                self._tls.index = index
                return conn
            except handshake.TLSRequired:
                raise TLSError(
                    f"the queuekit server at {address} accepts TLS connections only: set QUEUEKIT_TLS_CA_FILE "
                    "(tls_ca_file=) to the CA file that signed its certificate"
                ) from None
            except AuthenticationError:
                raise AuthenticationFailed(
                    f"the queuekit server at {address} rejected our authkey ({self._authkey_source}): "
                    f"the keys do not match; give producers, consumers and the server the same key file"
                ) from None
            except (OSError, EOFError) as e:
                if isinstance(e, ssl.SSLError):
                    tls_error = self._tls_error(e, address)
                    if tls_error is not None:
                        raise tls_error from None
                self._next = index + 1
                round_done = self._next % n == 0
                if time.monotonic() + (delay if round_done else 0.0) >= deadline:
                    where = "server at" if n == 1 else "servers at"
                    # Only standbys answered (no leader yet): still NotLeader, a ServerUnavailable.
                    raise (NotLeader if isinstance(e, NotLeader) else ServerUnavailable)(
                        f"cannot reach the queuekit {where} {format_addresses(self.addresses)} within "
                        f"{self.connect_timeout:g} s ({attempt} attempts; last error: {_describe(e)})"
                    ) from e
                if attempt == 1 or attempt % 10 == 0:
                    _log.info("connect_retry", server=address, attempt=attempt, error=_describe(e))
                if not round_done:
                    continue  # the next address at once
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 2.0)

    def _tls_error(self, e: ssl.SSLError, address: Address) -> TLSError | None:
        """The one-line error for a TLS failure that retrying cannot fix; None for one that it
        may (the connection cut during the handshake)."""
        ca_file, cert_file = self._tls_files
        return tls_failure(e, address, ca_file, cert_file, self._tls_server_name)

    def _drop(self, conn: transport.Connection, failed: bool = False) -> None:
        """Forget ``conn``; ``failed``: its server broke it or refused (gone, draining, no longer
        the leader), so the next connection starts with the following address."""
        if getattr(self._tls, "conn", None) is conn:
            self._tls.conn = None
            if failed:
                self._next = getattr(self._tls, "index", 0) + 1
        with self._lock:
            self._conns.discard(conn)
        conn.close()


class _Taking:
    """What a queue and a queue set share: taking tasks (with acks and results riding along) and
    heartbeats, over ``names`` in their order of priority."""

    client: Client
    names: list[str]

    def get_many(
        self,
        max_n: int = 100,
        timeout: float = 0.0,
        *,
        lease: float | None = None,
        ack: Iterable[Task] = (),
        results: dict[int, Any] | None = None,
    ) -> list[Task]:
        """Lease up to ``max_n`` tasks, waiting up to ``timeout`` s for the first one.

        ``ack``: tasks to acknowledge in the same round trip (they are acked even if none arrive);
        ``results``: task id -> JSON-compatible return value stored with that ack.
        """
        return _take(self.client, self.names, max_n, timeout, lease, ack, results)

    def heartbeat(self, tasks: Iterable[Task], lease: float | None = None) -> Heartbeat:
        """Renew leases (like ``extend``) and learn which held tasks were cancelled."""
        return _heartbeat(self.client, self.names, tasks, lease)


class Queue(_Taking):
    """A handle on one named queue (queues exist on the server from their first use)."""

    def __init__(self, client: Client, name: str):
        self.client = client
        self.name = name
        self.names = [name]

    def __repr__(self) -> str:
        return f"Queue({self.name!r} on {self.client.address})"

    def put(
        self,
        payload: Any,
        *,
        delay: float = 0.0,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Enqueue one JSON-compatible payload; returns its task id once the server committed it.
        ``headers``: small str -> str metadata carried to the handler untouched (at most 64, names
        up to 128 characters, 8 KiB in all). ``timeout``: seconds the handler may run (else the
        consumer's default)."""
        text = encode_payload(payload, self.client.max_task_bytes)
        headers = tracing.inject(self.name, headers)  # W3C trace context, with opentelemetry-api
        return self.client.call("put_many", self.name, [text], delay, *_put_extras(headers, timeout))[0]

    def put_many(
        self,
        payloads: Iterable[Any],
        *,
        delay: float = 0.0,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> list[int]:
        """Enqueue many payloads, one round trip per chunk. Every payload is validated first:
        if one is invalid, :class:`PayloadError` names it and nothing is sent. ``headers`` and
        ``timeout`` apply to each task (see :meth:`put`)."""
        limit = self.client.max_task_bytes
        texts = [encode_payload(p, limit) for p in payloads]
        extras = _put_extras(tracing.inject(self.name, headers), timeout)
        ids: list[int] = []
        for chunk in _chunks(texts):
            ids.extend(self.client.call("put_many", self.name, chunk, delay, *extras))
        return ids

    def call(self, payload: Any, *, timeout: float | None, headers: dict[str, str] | None = None) -> Any:
        """Put one task and wait up to ``timeout`` s for its result (see :meth:`result`)."""
        return self.result(self.put(payload, headers=headers), timeout=timeout)

    def status(self, task_id: int) -> TaskStatus:
        return self.client.status(task_id, self.name)

    def result(self, task_id: int, timeout: float | None = None) -> Any:
        return self.client.result(task_id, timeout, self.name)

    def cancel(self, task_id: int) -> str:
        return self.client.cancel(task_id, self.name)

    def get(self, timeout: float = 0.0, *, lease: float | None = None, ack: Iterable[Task] = ()) -> Task | None:
        tasks = self.get_many(1, timeout, lease=lease, ack=ack)
        return tasks[0] if tasks else None

    def ack(self, task: Task | Iterable[Task], *, result: Any = None) -> int:
        """Acknowledge tasks as done; ``result`` (one task only): its return value, stored for
        ``result()`` (JSON-compatible, at most the server's QUEUEKIT_MAX_RESULT_BYTES)."""
        tasks = [task] if isinstance(task, Task) else list(task)
        if not tasks:
            return 0
        ids = [t.id for t in tasks]
        if result is None:
            return self.client.call("ack_many", self.name, ids)
        if len(tasks) != 1:
            raise TypeError("ack(result=...) takes one task; use get_many(results={id: value}) for several")
        text = encode_result(result, self.client.max_result_bytes)
        return self.client.call("ack_many", self.name, ids, {ids[0]: text})

    def nack(self, task: Task, *, delay: float | None = None, error: str | None = None) -> bool:
        """Give a task back as failed: retried after ``delay`` s (default: server backoff), or
        dead-lettered once it failed more than the server's ``max_attempts`` times."""
        return self.nack_many([(task, delay, error)]) == 1

    def nack_many(self, items: Iterable[tuple[Task, float | None, str | None]]) -> int:
        # Plain tuples on the wire (a NackItem would pickle as a class reference).
        wire = [tuple(NackItem(t.id, t.delivery, delay, error)) for t, delay, error in items]
        return self.client.call("nack_many", self.name, wire) if wire else 0

    def extend(self, task: Task | Iterable[Task], lease: float | None = None) -> list[int]:
        """Renew leases (heartbeat). Returns ids of tasks whose lease was already lost."""
        tasks = [task] if isinstance(task, Task) else list(task)
        return self.client.call("extend_many", self.name, [t.receipt for t in tasks], lease) if tasks else []

    def release(self, task: Task | Iterable[Task]) -> int:
        """Give back tasks not started: ready again at once, no attempt charged."""
        tasks = [task] if isinstance(task, Task) else list(task)
        return self.client.call("release_many", self.name, [t.receipt for t in tasks]) if tasks else 0

    def qsize(self) -> int:
        return self.client.call("qsize", self.name)

    def dead_list(self, limit: int = 100) -> list[dict]:
        return self.client.call("dead_list", self.name, limit)

    def dead_requeue(self, ids: Iterable[int] | None = None) -> int:
        return self.client.call("dead_requeue", self.name, None if ids is None else list(ids))

    def dead_purge(self, ids: Iterable[int] | None = None) -> int:
        return self.client.call("dead_purge", self.name, None if ids is None else list(ids))


class QueueSet(_Taking):
    """Several queues consumed as one, in strict order of priority: a get takes every ready task
    of the first queue before any of the second, in one round trip, and waits on all of them at
    once (the server parks one waiter that a task of any of them wakes). Each :class:`Task`
    carries its own ``queue``; the other calls accept tasks of any of the queues."""

    def __init__(self, client: Client, names: list[str]):
        if not names or len(set(names)) != len(names):
            raise ValueError(f"a queue set needs distinct queue names, got {names!r}")
        self.client = client
        self.names = names

    def __repr__(self) -> str:
        return f"QueueSet({self.names!r} on {self.client.address})"

    def nack_many(self, items: Iterable[tuple[Task, float | None, str | None]]) -> int:
        """``Queue.nack_many`` for tasks of any of the queues (one round trip per queue)."""
        by_queue: dict[str, list] = {}
        for item in items:
            by_queue.setdefault(item[0].queue, []).append(item)
        return sum(self.client.queue(name).nack_many(group) for name, group in by_queue.items())

    def release(self, tasks: Task | Iterable[Task]) -> int:
        by_queue: dict[str, list[Task]] = {}
        for t in [tasks] if isinstance(tasks, Task) else tasks:
            by_queue.setdefault(t.queue, []).append(t)
        return sum(self.client.queue(name).release(group) for name, group in by_queue.items())


def _put_extras(headers: dict[str, str] | None, timeout: float | None) -> tuple:
    """The optional trailing arguments of put_many, checked here too (the error where the value
    was made); none when unused, so that the call also works against older servers."""
    headers, timeout = check_headers(headers), check_task_timeout(timeout)
    if headers is None and timeout is None:
        return ()
    return (headers, timeout)


def _take(
    client: Client,
    names: list[str],
    max_n: int,
    timeout: float,
    lease: float | None,
    ack: Iterable[Task],
    results: dict[int, Any] | None,
) -> list[Task]:
    acks = [t.id for t in ack] or None
    texts = None
    if results:
        limit = client.max_result_bytes
        texts = {task_id: encode_result(value, limit) for task_id, value in results.items() if value is not None}
    remaining = float(timeout)
    while True:
        wait = min(remaining, MAX_WAIT_PER_CALL)
        items = client.call("take", names, max_n, wait, lease, acks, texts or None, wait=wait)
        acks = texts = None
        remaining -= wait
        if items or remaining <= 0:
            return Task.many_from_take(items)


def _heartbeat(client: Client, names: list[str], tasks: Iterable[Task], lease: float | None) -> Heartbeat:
    wire = [t.receipt for t in tasks]
    if not wire:
        return Heartbeat([], [])
    lost, cancelled = client.call("heartbeat", names, wire, lease)
    return Heartbeat(lost, cancelled)


# OpenSSL's verify codes (X509_V_ERR_*) that get their own message.
_X509_CERT_HAS_EXPIRED = 10
_X509_HOSTNAME_MISMATCH = 62
_X509_IP_MISMATCH = 64
# Alerts a server sends when it does not accept our client certificate.
_CLIENT_CERT_REFUSED = frozenset(
    {
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV1_ALERT_DECRYPT_ERROR",
    }
)
# What OpenSSL says when the bytes it got back are not TLS at all.
_NOT_TLS = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "RECORD_LAYER_FAILURE",
        "PACKET_LENGTH_TOO_LONG",
        "UNKNOWN_PROTOCOL",
        "HTTP_REQUEST",
        "UNEXPECTED_MESSAGE",
        "UNEXPECTED_RECORD",
    }
)


def tls_failure(
    e: ssl.SSLError, address: Address, ca_file: str | None, cert_file: str | None, server_name: str | None
) -> TLSError | None:
    """The one-line :class:`TLSError` for a TLS handshake with the server at ``address`` that
    failed in a way retrying cannot fix, naming the cause and the setting to fix; None for a
    failure that retrying may fix (the connection cut during the handshake). Also used by
    ``queuekit tunnel`` for its log line."""
    where = f"TLS with the queuekit server at {address}"
    if isinstance(e, ssl.SSLCertVerificationError):
        code, why = e.verify_code, e.verify_message
        if code in (_X509_HOSTNAME_MISMATCH, _X509_IP_MISMATCH):
            name = server_name or address.host
            return TLSError(
                f"{where}: its certificate is not valid for {name!r} ({why}): connect by a name the certificate "
                "holds or set QUEUEKIT_TLS_SERVER_NAME (tls_server_name=) to one"
            )
        if code == _X509_CERT_HAS_EXPIRED:
            return TLSError(
                f"{where}: its certificate has expired ({why}): renew the server's certificate "
                "(the server's QUEUEKIT_TLS_CERT_FILE)"
            )
        return TLSError(
            f"{where}: its certificate is not trusted ({why}): set QUEUEKIT_TLS_CA_FILE (tls_ca_file=, now "
            f"{ca_file}) to the CA that signed it"
        )
    reason = e.reason or ""
    if reason in ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_HANDSHAKE_FAILURE") and not cert_file:
        return TLSError(
            f"{where}: the server requires a client certificate (mutual TLS): set QUEUEKIT_TLS_CLIENT_CERT_FILE "
            "and QUEUEKIT_TLS_CLIENT_KEY_FILE (tls_cert_file=, tls_key_file=)"
        )
    if reason in _CLIENT_CERT_REFUSED:
        return TLSError(
            f"{where}: the server refused our client certificate {cert_file} ({reason}): use one signed by the CA "
            "the server trusts (its QUEUEKIT_TLS_CLIENT_CA_FILE), valid now, via QUEUEKIT_TLS_CLIENT_CERT_FILE"
        )
    if reason in _NOT_TLS:
        return TLSError(
            f"{where}: the server does not speak TLS ({reason}): enable TLS on the server "
            "(QUEUEKIT_TLS_CERT_FILE/QUEUEKIT_TLS_KEY_FILE) or unset QUEUEKIT_TLS_CA_FILE"
        )
    if "ALERT" in reason:
        return TLSError(f"{where} failed: the server sent {reason}; see the server's tls_handshake_failed log line")
    return None


def parse_addresses(address: Address | str | tuple | list) -> tuple[Address, ...]:
    """One or more server addresses: ``"host:port"``, ``"a:50000,b:50000"``, an :class:`Address`,
    a ``(host, port)`` tuple, or a list of those. Raises ``ValueError`` naming a bad one."""
    if isinstance(address, Address):
        return (address,)
    if isinstance(address, str):
        return tuple(ServerList.parse(address))
    if isinstance(address, tuple) and len(address) == 2 and isinstance(address[1], int):
        return (Address(str(address[0]), address[1]),)
    found = tuple(a for item in address for a in parse_addresses(item))
    if not found:
        raise ValueError("no server address given")
    return found


def format_addresses(addresses: tuple[Address, ...]) -> str:
    return str(ServerList(addresses))


def _chunks(texts: list[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for text in texts:
        if chunk and (len(chunk) >= PUT_CHUNK_TASKS or size + len(text) > PUT_CHUNK_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(text)
        size += len(text)
    if chunk:
        yield chunk


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def connect(
    address: Address | str | tuple | list = "localhost:50000",
    *,
    authkey: bytes | str | Secret | None = None,
    authkey_file: str | None = None,
    connect_timeout: float = 30.0,
    call_timeout: float = CALL_TIMEOUT,
    name: str = "queuekit-client",
    max_task_bytes: int | None = None,
    tls_ca_file: str | None = None,
    tls_cert_file: str | None = None,
    tls_key_file: str | None = None,
    tls_server_name: str | None = None,
) -> Client:
    """Connect to a queuekit server (retrying until ``connect_timeout``) and check the key.

    ``address``: one server, or several separated by commas (a leader and its standbys: tried in
    turn, see the module's docstring). ``call_timeout``: seconds a reply may take beyond the
    call's server-side wait before the call is retried elsewhere (module docstring). Pass
    ``authkey`` or ``authkey_file``. With
    ``tls_ca_file`` the connection uses TLS and the server's certificate must be signed by that
    CA and valid for the address's host (or ``tls_server_name``); ``tls_cert_file``/
    ``tls_key_file``: the client certificate for mutual TLS. Raises :class:`AuthenticationFailed`
    for a wrong key, :class:`TLSError` for a TLS setup that cannot work,
    :class:`ServerUnavailable` when the server cannot be reached in time.
    """
    if (authkey is None) == (authkey_file is None):
        raise TypeError("pass exactly one of authkey= or authkey_file=")
    source = "authkey"
    if authkey_file is not None:
        authkey = load_authkey(authkey_file)
        source = f"key file {authkey_file}"
    assert authkey is not None
    client = Client(
        address,
        authkey,
        connect_timeout=connect_timeout,
        call_timeout=call_timeout,
        name=name,
        max_task_bytes=max_task_bytes,
        authkey_source=source,
        tls_ca_file=tls_ca_file,
        tls_cert_file=tls_cert_file,
        tls_key_file=tls_key_file,
        tls_server_name=tls_server_name,
    )
    try:
        client.ping()
    except BaseException:
        client.close()
        raise
    return client
