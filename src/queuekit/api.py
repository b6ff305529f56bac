"""The calls a queuekit client makes, and the checks of what it sends.

This is one of the two doors where untrusted input stops (the other is :mod:`queuekit.transport`,
bytes to objects): every argument a client sends is checked here, by type and range, before the
broker sees it; the broker trusts its callers. Every method runs on the loop thread and takes the
:class:`~queuekit.loop.Session` whose request it answers as its first argument.
"""

from __future__ import annotations

from typing import Any

from . import __version__
from .broker import Broker, receipts
from .consumer_metrics import check_report
from .errors import InvalidRequest
from .loop import Loop, Session
from .message import NackItem, WireDelivery, check_queue_name, validate_texts

MAX_BATCH = 10_000  # tasks per put_many / get_many call
MAX_SERVER_WAIT = 60.0  # one get_many call waits at most this long (the client library loops)
MAX_LEASE_SECONDS = 12 * 3600.0
MAX_DELAY_SECONDS = 366 * 86400.0

# The methods whose first argument is a queue name (what a key's queue patterns are checked against).
QUEUE_METHODS = frozenset(
    {
        "put_many",
        "get_many",
        "ack_many",
        "nack_many",
        "extend_many",
        "release_many",
        "dead_list",
        "dead_requeue",
        "dead_purge",
        "qsize",
    }
)
METHODS = ("ping", "stats", "report", *sorted(QUEUE_METHODS))  # everything a queuekit client may call


class QueueAPI:
    """The object a queuekit client calls (``queuekit.client``), under the ident ``API_IDENT``.

    ``get_many`` may park the session and a durable ``put_many`` is answered after the loop's
    group commit; both then return :data:`queuekit.loop.PENDING`.
    """

    def __init__(self, broker: Broker, loop: Loop, info: Any):
        """``info`` answers ``durable`` and ``stats()`` (the server application)."""
        self._broker = broker
        self._loop = loop
        self._info = info

    def ping(self, session: Session) -> dict:
        return {
            "server": "queuekit",
            "version": __version__,
            "durable": self._info.durable,
            "max_task_bytes": self._broker.max_task_bytes,
        }

    def put_many(self, session: Session, queue: Any, texts: Any, delay: Any = 0.0) -> Any:
        check_queue_name(queue)
        texts = validate_texts(texts, self._broker.max_task_bytes)
        if len(texts) > MAX_BATCH:
            raise InvalidRequest(f"at most {MAX_BATCH} tasks per put_many, got {len(texts)}")
        delay = seconds(delay, "delay", 0.0, MAX_DELAY_SECONDS)
        broker = self._broker
        if texts and not broker.has_queue(queue):
            create_queue(broker, queue)
        put = broker.begin_put(queue, texts, delay)
        if not put.seq:  # memory mode: visible already
            return broker.finish_put(put)

        def finish(error: BaseException | None) -> list[int]:
            if error is not None:
                raise error
            return broker.finish_put(put)

        return self._loop.after_commit(session, put.seq, finish)

    def get_many(
        self, session: Session, queue: Any, max_n: Any = 1, timeout: Any = 0.0, lease: Any = None, acks: Any = None
    ) -> Any:
        check_queue_name(queue)
        if type(max_n) is not int or not 1 <= max_n <= MAX_BATCH:
            raise InvalidRequest(f"max_n must be an int in 1..{MAX_BATCH}, got {max_n!r}")
        # Longer waits are cut to MAX_SERVER_WAIT: the client library loops.
        timeout = min(seconds(timeout, "timeout", 0.0, None), MAX_SERVER_WAIT)
        lease = optional_lease(lease)
        acks = None if acks is None else task_ids(acks)
        if not self._broker.has_queue(queue):
            create_queue(self._broker, queue)
        result = self._broker.get_or_wait(queue, max_n, timeout, lease, acks, session.deliver)
        if isinstance(result, list):
            return self._answer(session, queue, result)
        return self._loop.park(session, result, timeout, lambda items: self._answer(session, queue, items))

    def _answer(self, session: Session, queue: str, items: list[WireDelivery]) -> list[WireDelivery]:
        if items:
            broker = self._broker

            def release_unsent(sent: bool) -> None:
                if not sent:  # the client never got them: ready again at once, no attempt charged
                    broker.release_many(queue, receipts(items))

            session.after_reply(release_unsent)
        return items

    def ack_many(self, session: Session, queue: Any, ids: Any) -> int:
        return self._broker.ack_many(check_queue_name(queue), task_ids(ids))

    def nack_many(self, session: Session, queue: Any, items: Any) -> int:
        return self._broker.nack_many(check_queue_name(queue), nack_items(items))

    def extend_many(self, session: Session, queue: Any, receipts: Any, lease: Any = None) -> list[int]:
        return self._broker.extend_many(
            check_queue_name(queue), receipt_items(receipts, "extend"), optional_lease(lease)
        )

    def release_many(self, session: Session, queue: Any, receipts: Any) -> int:
        return self._broker.release_many(check_queue_name(queue), receipt_items(receipts, "release"))

    def dead_list(self, session: Session, queue: Any, limit: Any = 100) -> list[dict]:
        if type(limit) is not int or limit < 1:
            raise InvalidRequest(f"limit must be a positive int, got {limit!r}")
        return self._broker.dead_list(check_queue_name(queue), limit)

    def dead_requeue(self, session: Session, queue: Any, ids: Any = None) -> int:
        return self._broker.dead_requeue(check_queue_name(queue), None if ids is None else task_ids(ids))

    def dead_purge(self, session: Session, queue: Any, ids: Any = None) -> int:
        return self._broker.dead_purge(check_queue_name(queue), None if ids is None else task_ids(ids))

    def stats(self, session: Session) -> dict:
        return self._info.stats()

    def qsize(self, session: Session, queue: Any) -> int:
        return self._broker.qsize(check_queue_name(queue))

    def report(self, session: Session, report: Any) -> bool:
        """A consumer's metrics since its last report (:mod:`queuekit.consumer_metrics`). Queues
        that do not exist are left out (they would be series nobody bounds). False: a duplicate."""
        reporter, seq, queues = check_report(report)
        for name in queues:
            session.grant.check("report", name)
        known = {name: item for name, item in queues.items() if self._broker.has_queue(name)}
        return self._info.reports.add(session.name, reporter, seq, known)


# -- argument checks (also used by the compat adapter) -------------------------------------


def create_queue(broker: Broker, name: str) -> None:
    """Create queue ``name`` for a call that needs it (a put or a get), unless the server holds
    ``QUEUEKIT_MAX_QUEUES`` queues already: then :class:`InvalidRequest`, nothing created."""
    if not broker.create_queue(name, broker.max_queues):
        raise InvalidRequest(
            f"queue {name!r} does not exist and the server already holds its maximum of "
            f"{broker.max_queues} queues (QUEUEKIT_MAX_QUEUES); existing queues keep working"
        )


def seconds(value: Any, name: str, low: float, high: float | None) -> float:
    """A number of seconds in ``low..high`` (no NaN, no bool)."""
    if type(value) not in (int, float) or value != value or value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise InvalidRequest(f"{name} must be a number of seconds in {bound}, got {value!r}")
    return float(value)


def optional_lease(value: Any) -> float | None:
    """None (the server's default lease) or a lease length in seconds."""
    return None if value is None else seconds(value, "lease", 0.001, MAX_LEASE_SECONDS)


def task_ids(ids: Any) -> list[int] | tuple[int, ...] | set[int] | frozenset[int]:
    if type(ids) not in (list, tuple, set, frozenset):
        raise InvalidRequest(f"task ids must be a list of ints, got {type(ids).__name__}")
    for task_id in ids:
        if type(task_id) is not int:
            raise InvalidRequest(f"task ids must be ints, got {task_id!r}")
    return ids


def _items(items: Any, width: int, what: str) -> list[tuple]:
    if type(items) not in (list, tuple):
        raise InvalidRequest(f"{what} items must be a list of tuples, got {type(items).__name__}")
    for item in items:
        if (
            type(item) not in (list, tuple)
            or len(item) != width
            or type(item[0]) is not int
            or type(item[1]) is not int
        ):
            raise InvalidRequest(f"malformed {what} item {item!r}")
    return items


def receipt_items(items: Any, what: str) -> list[tuple[int, int]]:
    """``(id, delivery)`` receipts."""
    return [(item[0], item[1]) for item in _items(items, 2, what)]


def nack_items(items: Any) -> list[NackItem]:
    """``(id, delivery, delay_or_None, error_or_None)`` items as :class:`NackItem` records."""
    out = []
    for task_id, delivery, delay, error in _items(items, 4, "nack"):
        if delay is not None:
            delay = seconds(delay, "delay", 0.0, MAX_DELAY_SECONDS)
        out.append(NackItem(task_id, delivery, delay, None if error is None else str(error)))
    return out
