"""The connection loop: one thread serves every authenticated connection.

Why one thread: with a thread per connection, every request wakes its own thread and every
waiting get sleeps on a condition that a put must wake, so each task crossed three threads, and on
CPython those threads spent most of the server's time handing the GIL to each other (strace: 27
futex calls per task, against 4 reads and writes). Here one thread waits on a selector, reads requests,
calls the API and writes replies; a get that has to wait parks a :class:`~queuekit.broker.Waiter`
in the broker, which costs no thread, and the thread that makes a task ready hands it over.

What runs elsewhere: the handshake of a new connection (its own short-lived thread, because the
HMAC challenge is a blocking exchange with a timeout; the connection joins the loop after
``accept_connection``).

Durable puts are answered after their journal commit, and the loop commits once per turn: the
puts read in one turn are journaled as they come, then one group commit covers them all, then they
become visible and are answered (the way an event-loop database syncs its log before it replies).
Gets need no commit and are answered at once. With a journal whose commits are fast (SQLite) the
loop commits inline: a request that arrives during a commit (an fsync with ``sync=full``) waits
for it, and is answered in the next turn together with everything else that arrived meanwhile.
With a journal that ``commits_in_background`` (PostgreSQL: a round trip to the database and its
WAL flush, milliseconds) the loop hands the turn's commit to the journal's writer thread and goes
on serving: gets and acks are answered during the commit, and the puts read meanwhile form the
next group commit. The writer posts the outcome back ("committed"), and the loop then publishes
those puts and answers them, in the order they were committed.

Per connection the protocol is strictly request/response (the manager's). While a request is
being answered (a parked get, a put waiting for the commit, a reply not yet fully written) the
loop answers nothing else from that connection; a pipelining client's next requests wait in its
buffer. A parked get keeps watching for the client hanging up: its waiter is then withdrawn, so a
task is never handed to a client that is gone. A client that sends anything while its get is
parked is breaking the protocol and is disconnected.

A request that has started to arrive must be complete within ``frame_timeout`` seconds
(QUEUEKIT_FRAME_TIMEOUT): a client that sends part of a large message and stalls would otherwise
hold that much memory for as long as it likes. The deadline is one entry in the loop's timer heap
per partly received message; a request that arrives in one read costs nothing.

TLS sessions (a :class:`~queuekit.transport.TLSConnection`) are read and written through their
non-blocking ``ssl.SSLSocket``; each session carries the loop methods that read and write it
(``on_read``/``on_write``, chosen once when it joins), so a plaintext session keeps its bare
``os.read``/``os.write`` with no test per call. A TLS read drains the bytes already decrypted
inside the TLS object (``pending()``: the selector cannot see them); a read that needs to write
(a TLS 1.3 key update answered) or a write that needs to read waits for the other event, then
the same operation is retried (OpenSSL requires the same arguments for a retried write).
"""

from __future__ import annotations

import enum
import heapq
import itertools
import os
import selectors
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from . import logs, transport
from .broker import Broker, ResultWaiter, Waiter
from .keys import Grant
from .settings import DEFAULT_FRAME_TIMEOUT

_log = logs.get("server")
READ_SIZE = 65536
TLS_RECORD = 16384  # the largest TLS record's plaintext: a read that returns this much may have more behind it
TLS_READ_BUDGET = 1024 * 1024  # bytes one TLS read event takes at most (then the next event, fairness)
TLS_WRITE_CHUNK = 1024 * 1024  # bytes one TLS write call encrypts at most


class _Pending:
    def __repr__(self) -> str:
        return "PENDING"


PENDING = _Pending()  # returned by a call that will be answered later (parked, or after the commit)


class State(enum.Enum):
    """Where a session is in the request/response cycle."""

    IDLE = "idle"  # waiting for (or reading) the next request
    ANSWERING = "answering"  # a request is being answered: dispatched, or its put awaits the commit
    PARKED = "parked"  # a get waits for tasks (a broker Waiter); any byte from the client now is an error
    WRITING = "writing"  # the reply is partly written; the rest waits until the socket takes it
    CLOSED = "closed"


IDLE, ANSWERING, PARKED, WRITING, CLOSED = State.IDLE, State.ANSWERING, State.PARKED, State.WRITING, State.CLOSED


class Session:
    """One authenticated connection in the loop: its buffers and the request being answered."""

    __slots__ = (
        "conn",
        "fd",
        "peer",
        "name",
        "grant",
        "rbuf",
        "wbuf",
        "hook",
        "waiter",
        "finish",
        "deliver",
        "state",
        "events",
        "frame_timer",
        "on_read",
        "on_write",
        "tls",
        "tls_retry",
    )

    def __init__(
        self,
        conn: transport.Connection,
        name: str,
        grant: Grant,
        deliver: Callable[[Session, Any], None],
    ):
        self.conn = conn
        self.fd = conn.fileno()
        self.peer = conn.peer
        self.name = name
        self.grant = grant  # the key this connection authenticated with: what it may call
        # Bytes the handshake thread already read past accept_connection belong to us.
        self.rbuf = bytearray(conn.take_buffered())
        self.wbuf: memoryview | None = None  # the unwritten rest of the current reply
        self.hook: Callable[[bool], None] | None = None  # runs once the reply was (not) written
        # The broker Waiter of a parked get; kept after a close that came too late to withdraw
        # it, so that the tasks delivered to it are given back.
        self.waiter: Waiter | ResultWaiter | None = None
        self.finish: Callable[[Any], Any] | None = None  # delivered items (or outcome) -> the result
        self.deliver = lambda items: deliver(self, items)  # the deliver callback of its waiters
        self.state = IDLE
        self.events = 0  # selector events registered
        self.frame_timer: _FrameTimer | None = None  # the deadline of a partly received request
        # How the loop reads and writes this session (plaintext or TLS), set when it joins.
        self.on_read: Callable[[Session], None] = _unset
        self.on_write: Callable[[Session], None] = _unset
        self.tls: ssl.SSLSocket | None = getattr(conn, "tls", None)
        # A TLS read or write that waits for the other direction (read wants write, or the reverse).
        self.tls_retry: Callable[[Session], None] | None = None

    def after_reply(self, hook: Callable[[bool], None]) -> None:
        """Run ``hook(True)`` once the reply being answered was written to the socket, or
        ``hook(False)`` if the connection closed before (the client never got it)."""
        self.hook = hook


def _unset(session: Session) -> None:
    raise RuntimeError("session not opened by the loop")


class _FrameTimer:
    """The timer-heap entry of one partly received request: still due while it is its session's
    ``frame_timer``."""

    __slots__ = ()


class Loop:
    """Serves sessions until :meth:`stop`. ``dispatch(session, request)`` answers one request:
    it returns the result (sent as ``#RETURN``), raises (sent as an error reply built by
    ``error_reply``) or returns :data:`PENDING` after :meth:`park` or :meth:`after_commit`."""

    frame_timeout = DEFAULT_FRAME_TIMEOUT  # seconds for the rest of a started request (the server sets it)

    def __init__(
        self,
        dispatch: Callable[[Session, Any], Any],
        error_reply: Callable[[Exception], tuple],
        broker: Broker,
    ):
        self._dispatch = dispatch
        self._error_reply = error_reply
        self._broker = broker
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._inbox: deque[tuple] = deque()  # work handed over by other threads
        self._sessions: dict[int, Session] = {}
        # (deadline, seq, session, waiter of a parked get or the _FrameTimer of a partial request)
        self._timers: list[tuple[float, int, Session, Waiter | ResultWaiter | _FrameTimer]] = []
        self._timer_seq = itertools.count()
        self._uncommitted: list[tuple[Session, Callable[[BaseException | None], Any]]] = []
        self._commit_seq = 0  # the journal sequence number this turn's commit must reach
        self._thread_id: int | None = None
        self._stop_at: float | None = None  # monotonic deadline once stop() was called
        self._done = threading.Event()
        self.current: Session | None = None  # the session whose request is being dispatched

    # -- other threads ----------------------------------------------------------------------

    def add(self, conn: transport.Connection, name: str, grant: Grant) -> None:
        """Hand over an authenticated connection (called by the handshake thread)."""
        if self._done.is_set():
            conn.close()
            return
        self._post(("add", conn, name, grant))

    def revoke(self, valid: frozenset[Grant]) -> None:
        """Close the sessions whose key is no longer in ``valid`` (keys reloaded)."""
        self._post(("revoke", valid))

    def stop(self, grace: float) -> None:
        """Stop reading requests; answer the ones in progress for up to ``grace`` s; hang up."""
        self._post(("stop", time.monotonic() + grace))

    def wait_stopped(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    def session_count(self) -> int:
        return len(self._sessions)

    def sessions(self) -> list[Session]:
        """The sessions served now, for the dashboard (other threads): a copy made in one step,
        so the loop adding or closing one meanwhile cannot break it."""
        return list(self._sessions.values())

    def _post(self, item: tuple) -> None:
        self._inbox.append(item)
        if threading.get_ident() != self._thread_id:
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already

    # -- called by dispatch (loop thread) ---------------------------------------------------

    def park(
        self,
        session: Session,
        waiter: Waiter | ResultWaiter,
        timeout: float | None,
        finish: Callable[[Any], Any],
    ) -> Any:
        """Answer ``session`` later: with ``finish(items)`` when the waiter is delivered (tasks,
        or a result waiter's outcome), or ``finish([])`` when ``timeout`` passes first (None: no
        timeout)."""
        session.state = PARKED
        session.waiter = waiter
        session.finish = finish
        if timeout is not None:
            heapq.heappush(self._timers, (time.monotonic() + timeout, next(self._timer_seq), session, waiter))
        return PENDING

    def after_commit(self, session: Session, seq: int, finish: Callable[[BaseException | None], Any]) -> Any:
        """Answer ``session`` with ``finish(None)`` once the journal committed up to ``seq`` (at
        the end of this turn), or with ``finish(error)`` if the commit failed. ``finish`` runs
        even when the client hung up meanwhile: committed tasks must become visible."""
        self._uncommitted.append((session, finish))
        self._commit_seq = max(self._commit_seq, seq)
        return PENDING

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        self._thread_id = threading.get_ident()
        try:
            while True:
                timeout = self._next_timeout()
                for key, mask in self._sel.select(timeout):
                    session = key.data
                    if session is None:
                        self._drain_wakeups()
                        continue
                    try:
                        if mask & selectors.EVENT_WRITE:
                            session.on_write(session)
                        if mask & selectors.EVENT_READ and session.state is not CLOSED:
                            session.on_read(session)
                    except Exception as e:
                        self._failed(session, e)
                self._run_inbox()
                if self._uncommitted:
                    self._commit()
                if self._timers:
                    self._expire(time.monotonic())
                if self._stop_at is not None and self._stopped():
                    return
        finally:
            for session in list(self._sessions.values()):
                self._close(session, "server_stopping")
            self._sel.close()
            # The wake-up pipe stays open: a handshake thread may still post to it (a closed fd
            # number could already belong to something else). The process is ending anyway.
            self._done.set()

    def _next_timeout(self) -> float | None:
        if self._inbox:
            return 0
        timeout = None
        if self._timers:
            timeout = max(0.0, self._timers[0][0] - time.monotonic())
        if self._stop_at is not None:
            timeout = min(timeout if timeout is not None else 0.05, 0.05)
        return timeout

    def _stopped(self) -> bool:
        if self._stop_at is None or time.monotonic() >= self._stop_at:
            return True
        return all(s.state is IDLE for s in self._sessions.values())

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _run_inbox(self) -> None:
        inbox = self._inbox
        while inbox:
            item = inbox.popleft()
            try:
                self._run_item(item)
            except Exception as e:
                self._failed(item[1] if isinstance(item[1], Session) else None, e)

    def _failed(self, session: Session | None, e: Exception) -> None:
        """A bug, not a client's doing: log it, drop the connection involved, keep serving the rest."""
        _log.error("loop_error", exc_info=e, peer=session.peer if session else None, error=repr(e)[:200])
        if session is not None:
            try:
                self._close(session, "server_error")
            except Exception as e2:
                _log.error("loop_error", exc_info=e2, peer=session.peer, error=repr(e2)[:200])

    def _run_item(self, item: tuple) -> None:
        kind = item[0]
        if kind == "items":
            self._delivered(item[1], item[2])
        elif kind == "committed":
            self._committed(item[1], item[2])
        elif kind == "process":
            self._process(item[1])
        elif kind == "add":
            self._open(item[1], item[2], item[3])
        elif kind == "revoke":
            for session in [s for s in self._sessions.values() if s.grant not in item[1]]:
                self._close(session, "key_revoked")
        elif kind == "stop":
            self._begin_stop(item[1])

    def _open(self, conn: transport.Connection, name: str, grant: Grant) -> None:
        if self._stop_at is not None:
            conn.close()
            return
        session = Session(conn, name, grant, lambda s, items: self._post(("items", s, items)))
        tls = session.tls
        if tls is None:
            os.set_blocking(session.fd, False)
            session.on_read, session.on_write = self._read, self._flush
        else:
            tls.setblocking(False)
            session.on_read, session.on_write = self._tls_readable, self._tls_writable
        self._sessions[session.fd] = session
        _log.info(
            "client_connected", peer=session.peer, client=name, key=grant.name, role=grant.role, tls=tls is not None
        )
        self._set_events(session, selectors.EVENT_READ)
        if session.rbuf:
            self._process(session)
        if tls is not None and tls.pending() and session.state is not CLOSED:
            self._read_tls(session)  # decrypted on the handshake thread, not yet taken

    def _begin_stop(self, deadline: float) -> None:
        self._stop_at = deadline
        for session in self._sessions.values():
            if session.state is IDLE:
                self._set_events(session, 0)  # read nothing more: clients see the hang-up later

    def _set_events(self, session: Session, events: int) -> None:
        if events == session.events:
            return
        if session.events == 0:
            self._sel.register(session.fd, events, session)
        elif events == 0:
            self._sel.unregister(session.fd)
        else:
            self._sel.modify(session.fd, events, session)
        session.events = events

    # -- reading ----------------------------------------------------------------------------

    def _read(self, session: Session) -> None:
        try:
            data = os.read(session.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            self._close(session, f"error:{type(e).__name__}")
            return
        if not data:
            self._close(session, "gone_while_waiting" if session.state is PARKED else "closed")
            return
        if session.state is PARKED:
            self._close(session, "protocol_error:request_while_waiting")
            return
        session.rbuf += data
        self._process(session)

    # -- TLS sessions -----------------------------------------------------------------------

    def _tls_readable(self, session: Session) -> None:
        if session.tls_retry is not None:
            self._tls_retry(session)
        else:
            self._read_tls(session)

    def _tls_writable(self, session: Session) -> None:
        if session.tls_retry is not None:
            self._tls_retry(session)
        else:
            self._flush_tls(session)

    def _tls_retry(self, session: Session) -> None:
        """The event a blocked TLS operation waited for came: back to its own event, retry it."""
        op, session.tls_retry = session.tls_retry, None
        assert op is not None
        self._set_events(session, selectors.EVENT_READ if op == self._read_tls else selectors.EVENT_WRITE)
        op(session)

    def _read_tls(self, session: Session) -> None:
        tls = session.tls
        assert tls is not None
        recv = tls.recv
        data = bytearray()
        eof = False
        try:
            while True:
                chunk = recv(READ_SIZE)
                if not chunk:
                    eof = True
                    break
                data += chunk
                # Decrypted bytes left inside the TLS object are never reported by the selector:
                # take them now. A full record may have more behind it (a large message): read on
                # up to a budget; anything still in the socket is reported again (level-triggered).
                if not tls.pending() and (len(chunk) < TLS_RECORD or len(data) >= TLS_READ_BUDGET):
                    break
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLWantWriteError:  # the TLS layer must write first (e.g. a key update answered)
            session.tls_retry = self._read_tls
            self._set_events(session, selectors.EVENT_WRITE)
        except OSError as e:  # ssl.SSLError included: a broken record, an alert
            self._close(session, f"error:{type(e).__name__}")
            return
        if not data:
            if eof:
                self._close(session, "gone_while_waiting" if session.state is PARKED else "closed")
            elif session.rbuf and session.state is IDLE and session.tls_retry is None:
                self._process(session)  # kept when a read had to wait for a write
            return
        if session.state is PARKED:
            self._close(session, "protocol_error:request_while_waiting")
            return
        session.rbuf += data
        if session.tls_retry is None:
            self._process(session)

    def _flush_tls(self, session: Session) -> None:
        tls = session.tls
        assert tls is not None
        send = tls.send
        try:
            wbuf = session.wbuf
            while wbuf:
                # A write that raised must be retried with the same bytes: wbuf is unchanged then.
                wbuf = wbuf[send(wbuf[:TLS_WRITE_CHUNK]) :]
                session.wbuf = wbuf
        except ssl.SSLWantWriteError:
            session.state = WRITING
            self._set_events(session, selectors.EVENT_WRITE)
            return
        except ssl.SSLWantReadError:  # the TLS layer must read first
            session.state = WRITING
            session.tls_retry = self._flush_tls
            self._set_events(session, selectors.EVENT_READ)
            return
        except OSError as e:
            self._close(session, f"send_failed:{type(e).__name__}")
            return
        self._written(session)

    def _process(self, session: Session) -> None:
        """Answer the complete requests in the read buffer, one at a time."""
        rbuf = session.rbuf
        while session.state is IDLE:
            bounds = transport.frame_bounds(rbuf)
            if bounds is None:
                if rbuf and session.frame_timer is None:
                    self._start_frame_timer(session)
                return
            start, size = bounds
            limit = session.conn.max_message_bytes
            if size > limit or size < 0:
                _log.warning("message_too_large", peer=session.peer, bytes=size, limit=limit)
                self._close(session, "message_too_large")
                return
            end = start + size
            if len(rbuf) < end:
                if session.frame_timer is None:
                    self._start_frame_timer(session)
                return
            session.frame_timer = None
            data = bytes(rbuf[start:end])
            del rbuf[:end]
            self._handle(session, data)

    def _start_frame_timer(self, session: Session) -> None:
        timer = session.frame_timer = _FrameTimer()
        deadline = time.monotonic() + self.frame_timeout
        heapq.heappush(self._timers, (deadline, next(self._timer_seq), session, timer))

    def _frame_timed_out(self, session: Session) -> None:
        _log.warning(
            "frame_timeout",
            peer=session.peer,
            client=session.name,
            received=len(session.rbuf),
            seconds=self.frame_timeout,
        )
        self._close(session, "frame_timeout")

    def _handle(self, session: Session, data: bytes) -> None:
        session.state = ANSWERING
        try:
            request = transport.decode_message(data)
        except transport.UnpicklingRefused as e:  # a global, a call, an amplification: hostile, hang up
            _log.warning(
                "request_refused",
                peer=session.peer,
                client=session.name,
                reason=e.reason,
                bytes=len(data),
                detail=str(e)[:200],
            )
            self._close(session, f"refused:{e.reason}")
            return
        except Exception as e:  # the bytes arrived but do not unpickle: answer, keep going
            self._send(session, ("#ERROR", ValueError(f"request could not be decoded: {e}")))
            return
        self.current = session
        try:
            result = self._dispatch(session, request)
        except Exception as e:
            msg = self._error_reply(e)
        else:
            if result is PENDING:
                return
            msg = ("#RETURN", result)
        finally:
            self.current = None
        self._send(session, msg)

    # -- answering --------------------------------------------------------------------------

    def _delivered(self, session: Session, items: Any) -> None:
        """The broker took tasks for a parked get, or a parked result's task ended (or the
        broker closed): answer it."""
        waiter, finish = session.waiter, session.finish
        session.waiter = session.finish = None
        if session.state is CLOSED or finish is None:
            # The client hung up after the tasks were taken for it: nobody got them.
            if items and type(waiter) is Waiter:
                self._broker.release_taken(waiter.queue.name, items)
            return
        session.state = ANSWERING
        try:
            msg = ("#RETURN", finish(items))
        except Exception as e:
            msg = self._error_reply(e)
        self._send(session, msg)

    def _commit(self) -> None:
        """One group commit for the puts of this turn, then answer them (now, or in the turn
        after the writer thread posted that the commit is done)."""
        waiting, self._uncommitted = self._uncommitted, []
        seq, self._commit_seq = self._commit_seq, 0
        if self._broker.commits_in_background:
            self._broker.when_committed(seq, lambda error: self._post(("committed", waiting, error)))
            return
        error = None
        try:
            self._broker.wait_committed(seq)
        except Exception as e:  # JournalError: nothing of these puts becomes visible
            error = e
        self._committed(waiting, error)

    def _committed(
        self, waiting: list[tuple[Session, Callable[[BaseException | None], Any]]], error: BaseException | None
    ) -> None:
        """Answer the puts of one group commit (``error``: it failed, nothing became visible)."""
        for session, finish in waiting:
            try:
                msg = ("#RETURN", finish(error))
            except Exception as e:
                msg = self._error_reply(e)
            if session.state is CLOSED:
                continue
            try:
                self._send(session, msg)
            except Exception as e:
                self._failed(session, e)

    def _expire(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, session, what = heapq.heappop(timers)
            if isinstance(what, _FrameTimer):
                if session.frame_timer is what and session.state is not CLOSED:
                    self._frame_timed_out(session)
            elif session.waiter is what and session.state is PARKED and self._broker.cancel(what):
                self._delivered(session, [])
        # Timers of gets answered early (and of requests completed in time) stay until their
        # deadline; rebuild when they pile up.
        if len(timers) > 4096 and len(timers) > 4 * len(self._sessions):
            self._timers = [t for t in timers if t[2].waiter is t[3] or t[2].frame_timer is t[3]]
            heapq.heapify(self._timers)

    def _send(self, session: Session, msg: tuple) -> None:
        try:
            data = transport.encode_message(msg)
        except Exception as e:  # the stock server answers results that do not pickle like this
            data = transport.encode_message(("#UNSERIALIZABLE", f"{type(e).__name__}: {e}"))
        session.wbuf = memoryview(data)
        session.on_write(session)

    def _flush(self, session: Session) -> None:
        try:
            wbuf = session.wbuf
            while wbuf:
                wbuf = wbuf[os.write(session.fd, wbuf) :]
                session.wbuf = wbuf
        except BlockingIOError:
            session.state = WRITING
            self._set_events(session, selectors.EVENT_WRITE)
            return
        except OSError as e:
            self._close(session, f"send_failed:{type(e).__name__}")
            return
        self._written(session)

    def _written(self, session: Session) -> None:
        """The reply is fully written: run its hook, wait for the next request."""
        session.wbuf = None
        hook, session.hook = session.hook, None
        session.state = IDLE
        if hook is not None:
            hook(True)
        if self._stop_at is not None:
            self._set_events(session, 0)
            return
        self._set_events(session, selectors.EVENT_READ)
        if session.rbuf:
            # More requests already arrived (a pipelining client): answer them from the loop, not
            # from here, which may be deep inside _process already.
            self._inbox.append(("process", session))

    def _close(self, session: Session, reason: str) -> None:
        if session.state is CLOSED:
            return
        session.state = CLOSED
        waiter, session.waiter = session.waiter, None
        if waiter is not None and not self._broker.cancel(waiter):
            # Delivered but not yet answered: _delivered gives the tasks back when it sees this.
            session.waiter = waiter
        hook, session.hook = session.hook, None
        if hook is not None:
            hook(False)  # the reply did not (fully) reach the client
        self._set_events(session, 0)
        self._sessions.pop(session.fd, None)
        session.rbuf = bytearray()  # a partial request may be large; timers may still hold the session
        session.frame_timer = None
        session.conn.close()
        _log.info("client_disconnected", peer=session.peer, client=session.name, reason=reason)
