"""``queue.Queue`` look-alikes for stock ``BaseManager`` clients (the classic recipe's scripts).

A stock client registers ``get_task_queue`` / ``get_result_queue`` (queues ``tasks`` /
``results``) or ``get_queue(name)`` and calls ``put``/``get`` on the proxy it gets back. The
server answers those calls with a :class:`CompatQueue` over the named queue.
"""

from __future__ import annotations

import queue as stdqueue
from collections.abc import Callable
from typing import Any

from .broker import Broker
from .errors import QueuekitError, ServerShuttingDown
from .loop import Loop, Session
from .message import Delivery, WireDelivery, check_queue_name, decode_payload, encode_payload

METHODS = ("put", "put_nowait", "get", "get_nowait", "qsize", "empty", "full", "task_done")
LEASE = 60.0  # a task handed to a stock client is leased this long until its reply was written


class CompatQueue:
    """A ``queue.Queue`` look-alike over one named queue, for stock ``BaseManager`` clients.

    At-most-once: a task taken with ``get`` is acknowledged as soon as the reply carrying it has
    been written to the client's socket (if that write fails it is released, not lost). A blocking
    ``get`` parks in the event loop like the queuekit API's (no thread, no time limit). Errors are
    builtin exceptions (``queue.Empty``, ``ValueError``, ``ConnectionError``) because a stock client
    cannot unpickle queuekit's own. Every method takes the session it answers first (the server's
    dispatch passes it).
    """

    def __init__(self, broker: Broker, loop: Loop, name: str, stopping: Callable[[], bool]):
        self._broker = broker
        self._loop = loop
        self._name = check_queue_name(name)
        self._stopping = stopping

    @property
    def name(self) -> str:
        return self._name

    def put(self, session: Session, item: Any, block: Any = True, timeout: Any = None) -> Any:
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

        return self._loop.after_commit(session, put.seq, finish)

    def put_nowait(self, session: Session, item: Any) -> Any:
        return self.put(session, item, block=False)

    def get(self, session: Session, block: Any = True, timeout: Any = None) -> Any:
        wait: float | None
        if not block:
            wait = 0.0
        elif timeout is None:
            wait = None
        elif type(timeout) not in (int, float) or not timeout >= 0:
            raise ValueError("'timeout' must be a non-negative number")
        else:
            wait = float(timeout)
        result = self._broker.get_or_wait(
            self._name, 1, float("inf") if wait is None else wait, LEASE, None, session.deliver
        )
        if isinstance(result, list):
            return self._answer(session, result)
        return self._loop.park(session, result, wait, lambda items: self._answer(session, items))

    def _answer(self, session: Session, items: list[WireDelivery]) -> Any:
        if not items:
            if self._stopping():
                raise ConnectionError("queuekit server is shutting down")
            raise stdqueue.Empty
        task = Delivery._make(items[0])
        name, broker = self._name, self._broker

        def settle(sent: bool) -> None:
            if sent:
                broker.ack_many(name, [task.id])
            else:
                broker.release_many(name, [(task.id, task.delivery)])

        session.after_reply(settle)
        return decode_payload(task.payload)

    def get_nowait(self, session: Session) -> Any:
        return self.get(session, block=False)

    def qsize(self, session: Session) -> int:
        return self._broker.qsize(self._name)

    def empty(self, session: Session) -> bool:
        return self.qsize(session) == 0

    def full(self, session: Session) -> bool:
        return False

    def task_done(self, session: Session) -> None:
        """Accepted for compatibility; delivery already acknowledged the task."""
