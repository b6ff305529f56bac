"""The calls a queuekit client makes, and the checks of what it sends.

This is one of the two doors where untrusted input stops (the other is :mod:`queuekit.transport`,
bytes to objects): every argument a client sends is checked here, by type and range, before the
broker sees it; the broker trusts its callers. Every method runs on the loop thread and takes the
:class:`~queuekit.loop.Session` whose request it answers as its first argument.
"""

from __future__ import annotations

from typing import Any

from . import __version__
from .broker import Broker, Outcome
from .consumer_metrics import checked_report
from .errors import InvalidRequest
from .loop import Loop, Session
from .message import (
    NackItem,
    check_headers,
    check_queue_name,
    check_task_timeout,
    printable_text,
    validate_results,
    validate_texts,
)

MAX_BATCH = 10_000  # tasks per put_many / get_many call
MAX_SERVER_WAIT = 60.0  # one get_many call waits at most this long (the client library loops)
MAX_LEASE_SECONDS = 12 * 3600.0
MAX_DELAY_SECONDS = 366 * 86400.0
MAX_TAKE_QUEUES = 16  # queues one take or heartbeat may name

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
        # Since 0.13 (task lifecycle). take and heartbeat name a list of queues; status, result
        # and cancel may name None (any queue: only for keys not limited to queues).
        "take",
        "heartbeat",
        "status",
        "result",
        "cancel",
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
            "max_result_bytes": self._broker.max_result_bytes,
        }

    def put_many(
        self, session: Session, queue: Any, texts: Any, delay: Any = 0.0, headers: Any = None, timeout: Any = None
    ) -> Any:
        check_queue_name(queue)
        texts = validate_texts(texts, self._broker.max_task_bytes)
        if len(texts) > MAX_BATCH:
            raise InvalidRequest(f"at most {MAX_BATCH} tasks per put_many, got {len(texts)}")
        delay = seconds(delay, "delay", 0.0, MAX_DELAY_SECONDS)
        headers = check_headers(headers)
        timeout = check_task_timeout(timeout)
        broker = self._broker
        if texts and not broker.has_queue(queue):
            create_queue(broker, queue)
        put = broker.begin_put(queue, texts, delay, headers, timeout)
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
        result = self._broker.get_or_wait(queue, max_n, timeout, lease, acks, session.deliver, session.name)
        if isinstance(result, list):
            return self._answer(session, queue, result)
        return self._loop.park(session, result, timeout, lambda items: self._answer(session, queue, items))

    def take(
        self,
        session: Session,
        queues: Any,
        max_n: Any = 1,
        timeout: Any = 0.0,
        lease: Any = None,
        acks: Any = None,
        results: Any = None,
    ) -> Any:
        """``get_many`` for clients that know headers, timeouts, results and several queues:
        takes from ``queues`` in their order of priority; returns TakeItem tuples."""
        names = queue_list(queues)
        if type(max_n) is not int or not 1 <= max_n <= MAX_BATCH:
            raise InvalidRequest(f"max_n must be an int in 1..{MAX_BATCH}, got {max_n!r}")
        timeout = min(seconds(timeout, "timeout", 0.0, None), MAX_SERVER_WAIT)
        lease = optional_lease(lease)
        acks = None if acks is None else task_ids(acks)
        results = validate_results(results, self._broker.max_result_bytes)
        broker = self._broker
        for name in names:
            if not broker.has_queue(name):
                create_queue(broker, name)
        result = broker.take_or_wait(names, max_n, timeout, lease, acks, results, session.deliver, session.name)
        if isinstance(result, list):
            return self._answer(session, names[0], result)
        return self._loop.park(session, result, timeout, lambda items: self._answer(session, names[0], items))

    def _answer(self, session: Session, queue: str, items: list) -> list:
        if items:
            broker = self._broker

            def release_unsent(sent: bool) -> None:
                if not sent:  # the client never got them: ready again at once, no attempt charged
                    broker.release_taken(queue, items)

            session.after_reply(release_unsent)
        return items

    def ack_many(self, session: Session, queue: Any, ids: Any, results: Any = None) -> int:
        results = validate_results(results, self._broker.max_result_bytes)
        return self._broker.ack_many(check_queue_name(queue), task_ids(ids), results)

    def heartbeat(self, session: Session, queues: Any, receipts: Any, lease: Any = None) -> tuple[list[int], list[int]]:
        """Renew leases like ``extend_many``, over tasks of any of ``queues``; also says which of
        them were cancelled. Returns ``(lost, cancelled)``."""
        return self._broker.heartbeat(queue_list(queues), receipt_items(receipts, "heartbeat"), optional_lease(lease))

    def status(self, session: Session, queue: Any, task_id: Any) -> tuple:
        return tuple(self._broker.status(optional_queue(queue), task_id_arg(task_id)))

    def result(self, session: Session, queue: Any, task_id: Any, timeout: Any = 0.0) -> Any:
        """How the task ended: ``(state, result JSON text, error)``, state succeeded, dead,
        cancelled, unknown, or pending when it did not end within ``timeout`` (at most
        MAX_SERVER_WAIT: the client library loops). Waits parked, like a get."""
        queue = optional_queue(queue)
        task_id = task_id_arg(task_id)
        timeout = min(seconds(timeout, "timeout", 0.0, None), MAX_SERVER_WAIT)
        outcome = self._broker.result_or_wait(queue, task_id, timeout, session.deliver)
        if isinstance(outcome, Outcome):
            return tuple(outcome)
        return self._loop.park(session, outcome, timeout, _outcome_reply)

    def cancel(self, session: Session, queue: Any, task_id: Any) -> str:
        return self._broker.cancel_task(optional_queue(queue), task_id_arg(task_id))

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
        reporter, seq, queues, info = checked_report(report)
        for name in queues:
            session.grant.check("report", name)
        known = {name: item for name, item in queues.items() if self._broker.has_queue(name)}
        return self._info.reports.add(session.name, reporter, seq, known, info)


def _outcome_reply(outcome: Any) -> tuple:
    """A parked result's answer: the outcome delivered, or ``[]`` (timed out, server closing)."""
    return tuple(outcome) if outcome else tuple(Outcome("pending"))


# -- argument checks (also used by the compat adapter) -------------------------------------


def queue_list(queues: Any) -> list[str]:
    """A take's or heartbeat's queues: a queue name or a list of 1..MAX_TAKE_QUEUES distinct names."""
    if type(queues) is str:
        return [check_queue_name(queues)]
    if type(queues) not in (list, tuple) or not 1 <= len(queues) <= MAX_TAKE_QUEUES:
        raise InvalidRequest(f"queues must be a list of 1..{MAX_TAKE_QUEUES} queue names, got {queues!r:.200}")
    names = [check_queue_name(name) for name in queues]
    if len(set(names)) != len(names):
        raise InvalidRequest(f"queues must be distinct, got {names!r}")
    return names


def optional_queue(queue: Any) -> str | None:
    return None if queue is None else check_queue_name(queue)


def task_id_arg(task_id: Any) -> int:
    if type(task_id) is not int or task_id < 0:
        raise InvalidRequest(f"a task id must be a non-negative int, got {task_id!r:.100}")
    return task_id


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
        out.append(NackItem(task_id, delivery, delay, None if error is None else printable_text(str(error))))
    return out
