"""The broker: named queues and the task state machine. No network, no files.

States and transitions (``attempts`` counts failed deliveries)::

    ready ──get──▶ leased ──ack──▶ gone
    leased ──nack──▶ delayed ──(backoff elapsed)──▶ ready       attempts + 1
    leased ──lease expired──▶ ready                              attempts + 1, redelivered + 1
    leased ──release──▶ ready (front of the queue)               no attempt charged (worker drain)
    leased ──nack/expiry with attempts > max_attempts──▶ dead
    dead ──requeue──▶ ready (attempts reset);  dead ──purge──▶ gone
    leased ──ack──▶ succeeded (with its result, if any)
    ready/delayed ──cancel──▶ cancelled;  leased ──cancel──▶ flagged, its ack/nack/expiry ──▶ cancelled
    succeeded/cancelled ──evicted (TTL, count, bytes; oldest first)──▶ gone
    crash + restart (durable): leased ──▶ ready, attempts kept
    graceful restart (durable): leased ──▶ leased, same delivery, remaining lease but at least a
                                default lease (the holder could not extend while the server was down)

Contract:
- The broker trusts its callers: arguments were checked where they entered the process
  (:mod:`queuekit.api` for what clients send); here they are used as they are.
- Queues are created on first use by a put or a get (``_queue``), or by ``create_queue``; calls
  that only read or change existing tasks (ack, nack, extend, release, dead letters, qsize) never
  create one. How many queues may exist is the API's check (``create_queue`` with a limit).
- Thread-safe: one lock guards all queues. Nothing blocks waiting for a task: ``get_or_wait``
  parks a :class:`Waiter` when nothing is ready, and whoever makes tasks ready (a put, a nack, a
  release, a lease expiry) takes them for the oldest waiter and calls its ``deliver`` callback.
  The server's event loop answers the client from there, so a waiting client costs no thread.
- ``ack`` is by task id and accepted in any live state (the work is done, whoever reports it);
  ``nack``/``extend``/``release`` quote the delivery number of their lease and are ignored when it
  is stale, so a consumer whose lease expired cannot disturb the task's new holder.
- Task ids are unique across server restarts, also in memory mode (they start from the current
  time in microseconds), so an ack from before a restart can never remove a different task.
- Every state change that must survive a restart is appended to the journal under the lock, in
  order; a put becomes visible to consumers only after the journal committed it.
- Finished tasks (succeeded, cancelled) stay in a result store, oldest first, for their status and
  result, bounded by ``result_ttl``, ``result_max_count`` and ``result_max_bytes``; dead tasks stay
  in their queue's dead letters. ``result_or_wait`` parks a :class:`ResultWaiter` (no thread, no
  polling) that the task's ack, dead-letter or cancel completes.
- Time comes from an injected clock: ``monotonic`` for leases and waits, ``wall`` for what is
  stored (enqueue time, retry-not-before).
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from . import logs
from .errors import ServerShuttingDown
from .journal import CancelOp, DeleteOp, FinishOp, Journal, JournalOp, LeaseOp, PutOp, Recovered, UpdateOp
from .message import Delivery, NackItem, TaskStatus, WireDelivery
from .settings import (
    DEFAULT_MAX_RESULT_BYTES,
    DEFAULT_RESULT_MAX_BYTES,
    DEFAULT_RESULT_MAX_COUNT,
    DEFAULT_RESULT_TTL,
)

READY, LEASED, DELAYED, DEAD, GONE = "ready", "leased", "delayed", "dead", "gone"
SUCCEEDED, CANCELLED = "succeeded", "cancelled"  # finished: in the result store
MAX_ERROR_CHARS = 2000
COMPACT_MIN = 4096  # dead lease-heap slots tolerated before a compaction is considered
FINISHED_OVERHEAD = 200  # bytes a finished task's record is counted as, besides its result

_log = logs.get("broker")


class Waiter:
    """A parked ``get_or_wait``: ``deliver(items)`` is called exactly once, with the tasks taken
    for it (already leased), or with ``[]`` when the broker closes; never after ``cancel`` said
    True. It runs with the broker lock held, on whichever thread made the tasks ready, so it must
    only hand the items over (append to a queue), never block or call the broker.

    A waiter of a ``take`` over several queues is parked in each of them; whichever makes a task
    ready first takes it out of all and fills it in the queues' priority order. ``rich``: the
    items are ``take`` items (:data:`~queuekit.message.TakeItem`), else ``get_many``'s tuples."""

    __slots__ = ("queues", "max_n", "lease", "deliver", "consumer", "rich")

    def __init__(
        self,
        queues: list[_Queue],
        max_n: int,
        lease: float,
        deliver: Callable[[Any], None],
        consumer: str | None = None,
        rich: bool = False,
    ):
        self.queues = queues
        self.max_n = max_n
        self.lease = lease
        self.deliver = deliver
        self.consumer = consumer
        self.rich = rich

    @property
    def queue(self) -> _Queue:
        return self.queues[0]


class ResultWaiter:
    """A parked ``result_or_wait``: ``deliver(outcome)`` is called once, with the task's
    :class:`Outcome` when it finishes (or ``[]`` when the broker closes), under the broker lock."""

    __slots__ = ("task_id", "deliver")

    def __init__(self, task_id: int, deliver: Callable[[Any], None]):
        self.task_id = task_id
        self.deliver = deliver


class Outcome(NamedTuple):
    """How a task ended, as ``result`` answers: ``state`` succeeded (``result`` its JSON text or
    None), dead or cancelled (``error`` its last error), unknown, or pending (still running when
    the wait ended). A plain tuple on the wire."""

    state: str
    result: str | None = None
    error: str | None = None


class PendingPut(NamedTuple):
    """A put between ``begin_put`` and ``finish_put``: journaled as ``seq`` (0: not journaled)."""

    queue: str
    tasks: list[_Task]
    not_before: float
    seq: int


class Clock:
    """Real time. Tests pass an object with the same two methods that they move by hand."""

    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)


class _Task:
    __slots__ = (
        "id",
        "queue",
        "payload",
        "attempts",
        "enqueued_at",
        "state",
        "delivery",
        "lease_deadline",
        "not_before",
        "last_error",
        "headers",
        "timeout",
        "started_at",
        "consumer",
        "cancel_requested",
        "finished_at",
        "result",
    )

    def __init__(
        self,
        task_id: int,
        queue: str,
        payload: str,
        attempts: int,
        enqueued_at: float,
        not_before: float = 0.0,
        last_error: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ):
        self.id = task_id
        self.queue = queue
        self.payload = payload
        self.attempts = attempts
        self.enqueued_at = enqueued_at
        self.state = GONE
        self.delivery = 0
        self.lease_deadline = 0.0
        self.not_before = not_before
        self.last_error = last_error
        self.headers = headers
        self.timeout = timeout
        self.started_at: float | None = None
        self.consumer: str | None = None
        self.cancel_requested = False
        self.finished_at: float | None = None
        self.result: str | None = None

    def status(self) -> TaskStatus:
        state = self.state
        if state is LEASED:
            shown = "inflight"
        elif state in (READY, DELAYED) and self.attempts and self.last_error is not None:
            shown = "failed"  # the last attempt failed; it will be retried
        else:
            shown = state
        return TaskStatus(
            self.id,
            self.queue,
            shown,
            self.attempts,
            self.last_error,
            self.enqueued_at,
            self.started_at,
            self.finished_at,
            self.consumer,
            self.result is not None,
        )


class _Queue:
    __slots__ = (
        "lease_garbage",
        "name",
        "ready",
        "live",
        "dead",
        "leases",
        "delayed",
        "n_ready",
        "n_leased",
        "n_delayed",
        "enqueued",
        "acked",
        "nacked",
        "redelivered",
        "dead_lettered",
        "waiters",
    )

    def __init__(self, name: str):
        self.name = name
        self.ready: deque[_Task] = deque()  # may hold stale entries of acked tasks; skipped on pop
        self.live: dict[int, _Task] = {}  # ready, leased and delayed tasks
        self.dead: dict[int, _Task] = {}
        # Lease heap: one entry per handed-out batch, (deadline, seq, [(task, delivery), ...]).
        self.leases: list[tuple[float, int, list]] = []
        # Heap slots that no longer hold a live lease (acked, nacked, released or extended early):
        # they are only dropped when their deadline comes, so the heap is compacted when they
        # pile up (at 100k tasks/s with 30 s leases they would otherwise hold millions of tasks).
        self.lease_garbage = 0
        self.delayed: list[tuple[float, int, _Task]] = []  # (not_before, id, task)
        self.n_ready = self.n_leased = self.n_delayed = 0
        self.enqueued = self.acked = self.nacked = self.redelivered = self.dead_lettered = 0
        self.waiters: deque[Waiter] = deque()  # parked get_or_wait calls, oldest first


class Broker:
    def __init__(
        self,
        *,
        journal: Journal | None = None,
        max_task_bytes: int = 1024 * 1024,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
        max_queues: int | None = None,
        max_attempts: int = 5,
        retry_base: float = 1.0,
        retry_max: float = 300.0,
        default_lease: float = 30.0,
        clock: Any = None,
        rng: random.Random | None = None,
        result_ttl: float = DEFAULT_RESULT_TTL,
        result_max_count: int = DEFAULT_RESULT_MAX_COUNT,
        result_max_bytes: int = DEFAULT_RESULT_MAX_BYTES,
    ):
        self._lock = threading.Lock()
        self._queues: dict[str, _Queue] = {}
        self._journal = journal or Journal()
        self._durable = self._journal.durable
        self._keeps_finished = self._durable and self._journal.keeps_finished
        self.max_task_bytes = max_task_bytes
        self.max_result_bytes = max_result_bytes
        self.max_queues = max_queues  # for the API's check before a call creates a queue (None: no limit)
        self.max_attempts = max_attempts
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.default_lease = default_lease
        self._clock = clock or Clock()
        self._rng = rng or random.Random()
        self._batch_seq = itertools.count()
        self._next_id = int(self._clock.wall() * 1_000_000)
        self._closed = False
        self.result_ttl = result_ttl
        self.result_max_count = result_max_count
        self.result_max_bytes = result_max_bytes
        # The result store: finished tasks by id, oldest first (an OrderedDict: popping the oldest
        # of a plain dict degrades to a scan over the slots its earlier pops left).
        self._finished: OrderedDict[int, _Task] = OrderedDict()
        self._finished_bytes = 0
        self._result_waiters: dict[int, list[ResultWaiter]] = {}

    # -- recovery ---------------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """Load the journal's tasks (before serving). Returns live tasks recovered per queue."""
        state: Recovered = self._journal.load()
        counts: dict[str, int] = {}
        now = self._clock.wall()
        mono = self._clock.monotonic()
        cancelled: list[_Task] = []
        # Delivery numbers are not journaled (only saved leases keep theirs). Counting again from
        # 0 would hand out a number that a holder from before the restart still quotes, letting
        # its nack/extend/release act on the new holder's lease. So recovered tasks count on from
        # a base above every number an earlier incarnation used: those counted from 0 or from an
        # earlier base, one per lease handed out, far fewer than the milliseconds since.
        delivery_base = int(now * 1000)
        with self._lock:
            for row in state.tasks:
                q = self._queue(row.queue)
                task = _Task(
                    row.id,
                    row.queue,
                    row.payload,
                    row.attempts,
                    row.enqueued_at,
                    row.not_before,
                    row.last_error,
                    row.headers,
                    row.timeout,
                )
                task.started_at, task.consumer = row.started_at, row.consumer
                task.delivery = delivery_base
                if row.state is not None:  # finished: its status (and result) only
                    task.result = row.result
                    # The broker's states are compared by identity: map the stored text back.
                    finished = SUCCEEDED if row.state == SUCCEEDED else CANCELLED
                    self._store_finished(task, finished, row.finished_at or now)
                    continue
                if row.cancel_requested:  # flagged in flight before the restart: it ends here
                    cancelled.append(task)
                    continue
                if row.dead:
                    task.state = DEAD
                    q.dead[task.id] = task
                    continue
                q.live[task.id] = task
                counts[row.queue] = counts.get(row.queue, 0) + 1
                if row.lease_until is not None:
                    # Saved by a graceful shutdown: the holder may still ack or extend it. It could
                    # not extend while the server was down, so it gets at least a default lease
                    # from now to reconnect (the downtime is the server's, not the holder's).
                    task.state = LEASED
                    task.delivery = row.lease_delivery or 0
                    task.lease_deadline = mono + max(row.lease_until - now, self.default_lease)
                    q.n_leased += 1
                    heapq.heappush(q.leases, (task.lease_deadline, next(self._batch_seq), [(task, task.delivery)]))
                elif row.not_before > now:
                    self._delay(q, task, row.not_before)
                else:
                    self._make_ready(q, task)
            self._next_id = max(self._next_id, state.next_id, max((r.id + 1 for r in state.tasks), default=0))
            if cancelled:
                for task in cancelled:
                    self._store_finished(task, CANCELLED, now)
                self._journal_finished(cancelled, CANCELLED, now, None)
            self._evict(now)
        return counts

    # -- producer side ----------------------------------------------------------------------

    def put_many(
        self,
        queue: str,
        texts: list[str],
        delay: float = 0.0,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> list[int]:
        """Enqueue JSON texts; all or nothing. Returns the new task ids once they are committed.
        For in-process callers; the server's loop uses the two halves below."""
        put = self.begin_put(queue, texts, delay, headers, timeout)
        if put.seq:
            self.wait_committed(put.seq)  # raises JournalError: then nothing becomes visible
        return self.finish_put(put)

    def begin_put(
        self,
        queue: str,
        texts: list[str],
        delay: float = 0.0,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> PendingPut:
        """The first half of ``put_many``, which never waits: number and journal the tasks.
        Durable: nothing is visible until ``finish_put``, to be called once
        ``wait_committed(put.seq)`` returned (the server's loop commits many puts at once).
        Memory (``seq`` 0): the tasks are visible already."""
        if not texts:
            return PendingPut(queue, [], 0.0, 0)
        now = self._clock.wall()
        not_before = now + delay if delay > 0 else 0.0
        # Built before taking the lock, numbered under it: less time holding the lock.
        tasks = [_Task(0, queue, text, 0, now, not_before, None, headers, timeout) for text in texts]
        with self._lock:
            self._check_open()
            first = self._next_id
            self._next_id = first + len(tasks)
            for task_id, t in enumerate(tasks, first):
                t.id = task_id
            if not self._durable:
                self._publish(queue, tasks, not_before)
                return PendingPut(queue, tasks, not_before, 0)
            seq = self._journal.append([PutOp(queue, first, texts, now, not_before, headers, timeout)])
        return PendingPut(queue, tasks, not_before, seq)

    def wait_committed(self, seq: int) -> None:
        """Block until the journal committed everything up to ``seq`` (raises ``JournalError``)."""
        self._journal.wait(seq)

    @property
    def commits_in_background(self) -> bool:
        """The journal's commits are slow enough to run beside the loop (``when_committed``)."""
        return self._journal.commits_in_background

    def when_committed(self, seq: int, done: Callable[[BaseException | None], object]) -> None:
        """``done(None)`` once the journal committed up to ``seq``, ``done(JournalError)`` if it
        could not; from the committing thread when ``commits_in_background``."""
        self._journal.when_committed(seq, done)

    def finish_put(self, put: PendingPut) -> list[int]:
        """The second half of ``put_many``: make committed tasks visible. Returns their ids."""
        if put.seq:
            with self._lock:
                self._publish(put.queue, put.tasks, put.not_before)
        return [t.id for t in put.tasks]

    def _publish(self, queue: str, tasks: list[_Task], not_before: float) -> None:
        """Make new tasks visible to consumers (lock held)."""
        q = self._queue(queue)
        live = q.live
        for t in tasks:
            live[t.id] = t
        if not_before:
            for t in tasks:
                self._delay(q, t, not_before)
        else:
            for t in tasks:
                t.state = READY
            q.ready.extend(tasks)
            q.n_ready += len(tasks)
            self._wake(q)
        q.enqueued += len(tasks)

    # -- consumer side ----------------------------------------------------------------------

    def get_many(
        self,
        queue: str,
        max_n: int = 1,
        lease: float | None = None,
        acks: Iterable[int] | None = None,
        consumer: str | None = None,
    ) -> list[WireDelivery]:
        """Lease up to ``max_n`` ready tasks now (``[]`` when none is ready or the broker is closed).

        ``acks`` are applied first (a worker's acks ride on its next get: no extra round trip).
        Returns :class:`~queuekit.message.Delivery`-shaped tuples.
        """
        lease = self.default_lease if lease is None else lease
        with self._lock:
            q = self._queue(queue)
            now = self._start_get([q], acks, None)
            if now is None:
                return []
            return self._take(q, max_n, now + lease, consumer)

    def get_or_wait(
        self,
        queue: str,
        max_n: int,
        timeout: float,
        lease: float | None,
        acks: Iterable[int] | None,
        deliver: Callable[[list[WireDelivery]], None],
        consumer: str | None = None,
    ) -> list[WireDelivery] | Waiter:
        """``get_many``, or when nothing is ready and ``timeout`` > 0, a parked :class:`Waiter`
        that ``deliver`` will complete. The caller owns the timeout: when it passes,
        ``cancel(waiter)``; True means answer ``[]``."""
        lease = self.default_lease if lease is None else lease
        with self._lock:
            q = self._queue(queue)
            now = self._start_get([q], acks, None)
            if now is None:
                return []
            if q.n_ready or timeout <= 0:
                return self._take(q, max_n, now + lease, consumer)
            waiter = Waiter([q], max_n, lease, deliver, consumer)
            q.waiters.append(waiter)
            return waiter

    def take_or_wait(
        self,
        queues: list[str],
        max_n: int,
        timeout: float,
        lease: float | None,
        acks: Iterable[int] | None,
        results: dict[int, str] | None,
        deliver: Callable[[list], None],
        consumer: str | None = None,
    ) -> list | Waiter:
        """The get of clients that know headers, timeouts, results and several queues: apply
        ``acks`` (ids of tasks of any of ``queues``, with their ``results``), then lease up to
        ``max_n`` tasks taking strictly in the order of ``queues`` (all of ``high`` before any of
        ``low``), as :data:`~queuekit.message.TakeItem` tuples; or park one :class:`Waiter` that a
        task made ready in any of them completes."""
        lease = self.default_lease if lease is None else lease
        with self._lock:
            qs = [self._queue(name) for name in queues]
            now = self._start_get(qs, acks, results)
            if now is None:
                return []
            if timeout <= 0 or any(q.n_ready for q in qs):
                return self._take_rich(qs, max_n, now + lease, consumer)
            waiter = Waiter(qs, max_n, lease, deliver, consumer, True)
            for q in qs:
                q.waiters.append(waiter)
            return waiter

    def cancel(self, waiter: Waiter | ResultWaiter) -> bool:
        """Withdraw a parked waiter. False: it was already delivered (its ``deliver`` ran or runs)."""
        with self._lock:
            if type(waiter) is ResultWaiter:
                waiters = self._result_waiters.get(waiter.task_id)
                if waiters is None or waiter not in waiters:
                    return False
                waiters.remove(waiter)
                if not waiters:
                    del self._result_waiters[waiter.task_id]
                return True
            assert type(waiter) is Waiter
            withdrawn = False
            for q in waiter.queues:
                try:
                    q.waiters.remove(waiter)
                    withdrawn = True
                except ValueError:
                    pass
            return withdrawn

    def release_taken(self, queue: str, items: list) -> None:
        """Give back tasks taken for a reply that never reached its client: ``get_many`` tuples of
        ``queue``, or ``take`` items (which name their queue)."""
        if not items:
            return
        if len(items[0]) == 8:
            by_queue: dict[str, list[tuple[int, int]]] = {}
            for item in items:
                by_queue.setdefault(item[0], []).append((item[1], item[2]))
            for name, taken in by_queue.items():
                self.release_many(name, taken)
        else:
            self.release_many(queue, receipts(items))

    def _start_get(self, qs: list[_Queue], acks: Iterable[int] | None, results: dict[int, str] | None) -> float | None:
        """Lock held: apply the acks riding on a get, then expire and promote what is due.
        Returns the current monotonic time, or None when the broker is closed."""
        if acks:
            if len(qs) == 1:
                self._ack(qs[0], acks, results)
            else:
                for q, ids in _by_queue(qs, acks).items():
                    self._ack(q, ids, results)
        if self._closed:
            return None
        now = self._clock.monotonic()
        for q in qs:
            self._service(q, now)
        return now

    def ack_many(self, queue: str, ids: Iterable[int], results: dict[int, str] | None = None) -> int:
        """Finish tasks as succeeded (those flagged by ``cancel``: cancelled), storing ``results``
        (task id -> JSON text) for those that have one."""
        with self._lock:
            q = self._queues.get(queue)
            return 0 if q is None else self._ack(q, ids, results)

    def nack_many(self, queue: str, items: Iterable[NackItem]) -> int:
        """A nack charges an attempt; ``delay=None`` means the server's exponential backoff with
        jitter. Items quoting a stale delivery are ignored."""
        now = self._clock.monotonic()
        with self._lock:
            q = self._queues.get(queue)
            if q is None:
                return 0
            done = 0
            for item in items:
                task = q.live.get(item.id)
                if task is None or task.state is not LEASED or task.delivery != item.delivery:
                    continue
                q.nacked += 1
                q.lease_garbage += 1
                error = None if item.error is None else item.error[:MAX_ERROR_CHARS]
                self._fail(q, task, now, item.delay, error, "nack")
                done += 1
            self._maybe_compact(q)
            return done

    def extend_many(self, queue: str, receipts: Iterable[tuple[int, int]], lease: float | None = None) -> list[int]:
        """Renew the leases of ``(id, delivery)`` receipts. Returns the ids that are no longer ours."""
        return self.heartbeat([queue], receipts, lease)[0]

    def heartbeat(
        self, queues: list[str], receipts: Iterable[tuple[int, int]], lease: float | None = None
    ) -> tuple[list[int], list[int]]:
        """Renew the leases of ``(id, delivery)`` receipts of tasks of any of ``queues``. Returns
        ``(lost, cancelled)``: the ids that are no longer ours, and those renewed but flagged by
        ``cancel_task`` (their holder should stop)."""
        lease = self.default_lease if lease is None else lease
        with self._lock:
            qs = [q for q in map(self._queues.get, queues) if q is not None]
            now = self._clock.monotonic()
            for q in qs:
                self._service(q, now)
            deadline = now + lease
            kept: dict[_Queue, list[tuple[_Task, int]]] = {}
            lost, cancelled = [], []
            for task_id, delivery in receipts:
                task = None
                for q in qs:
                    task = q.live.get(task_id)
                    if task is not None:
                        break
                if task is None or task.state is not LEASED or task.delivery != delivery:
                    lost.append(task_id)
                    continue
                task.lease_deadline = deadline
                kept.setdefault(q, []).append((task, delivery))
                if task.cancel_requested:
                    cancelled.append(task_id)
            for q, renewed in kept.items():
                heapq.heappush(q.leases, (deadline, next(self._batch_seq), renewed))
                q.lease_garbage += len(renewed)
                self._maybe_compact(q)
            return lost, cancelled

    def release_many(self, queue: str, receipts: Iterable[tuple[int, int]]) -> int:
        """Give leased tasks back unstarted: to the front of the queue, no attempt charged."""
        with self._lock:
            q = self._queues.get(queue)
            if q is None:
                return 0
            released = []
            for task_id, delivery in receipts:
                task = q.live.get(task_id)
                if task is not None and task.state is LEASED and task.delivery == delivery:
                    released.append(task)
            for task in reversed(released):  # keep their original order at the front
                q.n_leased -= 1
                self._make_ready(q, task, front=True)
            if released:
                self._wake(q)
                q.lease_garbage += len(released)
                self._maybe_compact(q)
            return len(released)

    # -- status, results, cancellation ------------------------------------------------------

    def status(self, queue: str | None, task_id: int) -> TaskStatus:
        """Where task ``task_id`` is (of ``queue``, or of any queue when None)."""
        with self._lock:
            task = self._find(queue, task_id)
            if task is None:
                return TaskStatus(task_id, None, "unknown")
            return task.status()

    def result_or_wait(
        self, queue: str | None, task_id: int, timeout: float, deliver: Callable[[Any], None]
    ) -> Outcome | ResultWaiter:
        """How task ``task_id`` ended, or (still live and ``timeout`` > 0) a parked
        :class:`ResultWaiter` completed when it ends. The caller owns the timeout as for gets."""
        with self._lock:
            task = self._find(queue, task_id)
            if task is None:
                return Outcome("unknown")
            if task.state in (SUCCEEDED, CANCELLED, DEAD):
                return _outcome(task)
            if timeout <= 0 or self._closed:
                return Outcome("pending")
            waiter = ResultWaiter(task_id, deliver)
            self._result_waiters.setdefault(task_id, []).append(waiter)
            return waiter

    def cancel_task(self, queue: str | None, task_id: int) -> str:
        """Cancel a task: a ready or delayed one is removed (state cancelled); one in flight is
        flagged ("cancelling": its holder learns it from ``heartbeat``, and its ack or nack
        finishes it as cancelled). Returns the state after, or the finished state it had."""
        with self._lock:
            task = self._find(queue, task_id)
            if task is None:
                return "unknown"
            state = task.state
            if state is LEASED:
                if not task.cancel_requested:
                    task.cancel_requested = True
                    if self._keeps_finished:
                        self._journal.append([CancelOp([task_id])])
                return "cancelling"
            if state is READY or state is DELAYED:
                q = self._queues[task.queue]
                del q.live[task_id]
                if state is READY:
                    q.n_ready -= 1
                else:
                    q.n_delayed -= 1
                wall = self._clock.wall()
                self._store_finished(task, CANCELLED, wall)
                self._journal_finished([task], CANCELLED, wall, None)
                self._evict(wall)
                return CANCELLED
            return state

    def _find(self, queue: str | None, task_id: int) -> _Task | None:
        """Lock held: task ``task_id`` live, dead or finished (of ``queue`` when given), with its
        queue's due expiries applied first. Without a queue, each queue's maps are looked up: one
        dict lookup per queue instead of an id index that every put and ack would have to keep."""
        qs = self._queues.values() if queue is None else [q for q in (self._queues.get(queue),) if q is not None]
        for q in qs:
            task = q.live.get(task_id) or q.dead.get(task_id)
            if task is not None:
                self._service(q, self._clock.monotonic())
                return task
        task = self._finished.get(task_id)
        if task is not None and (queue is None or task.queue == queue):
            return task
        return None

    def _store_finished(self, task: _Task, state: str, wall: float) -> None:
        """Lock held: a task left its queue as ``state``: into the result store (its payload is
        not kept), completing whoever waits for its result. Call ``_evict`` after."""
        task.state = state
        task.finished_at = wall
        task.payload = ""
        self._finished[task.id] = task
        self._finished_bytes += FINISHED_OVERHEAD + (len(task.result) if task.result else 0)
        if self._result_waiters:
            self._complete_waiters(task)

    def _complete_waiters(self, task: _Task) -> None:
        waiters = self._result_waiters.pop(task.id, None)
        if waiters:
            outcome = _outcome(task)
            for waiter in waiters:
                waiter.deliver(outcome)

    def _journal_finished(self, tasks: list[_Task], state: str, wall: float, results: dict[int, str] | None) -> None:
        if not tasks or not self._durable:
            return
        if not self._keeps_finished:
            self._journal.append([DeleteOp([t.id for t in tasks])])
        else:
            self._journal.append(
                [
                    FinishOp(
                        [t.id for t in tasks],
                        state,
                        wall,
                        results,
                        [t.started_at for t in tasks],
                        [t.consumer for t in tasks],
                    )
                ]
            )

    def _evict(self, wall: float) -> None:
        """Lock held: drop the oldest finished tasks past the TTL or beyond the count or bytes bounds."""
        finished = self._finished
        if not finished:
            return
        cutoff = wall - self.result_ttl
        evicted = []
        while finished:
            oldest = finished[next(iter(finished))]
            if (
                len(finished) <= self.result_max_count
                and self._finished_bytes <= self.result_max_bytes
                and (oldest.finished_at or 0.0) > cutoff
            ):
                break
            finished.popitem(last=False)
            oldest.state = GONE
            self._finished_bytes -= FINISHED_OVERHEAD + (len(oldest.result) if oldest.result else 0)
            evicted.append(oldest.id)
        if evicted and self._keeps_finished:
            self._journal.append([DeleteOp(evicted)])

    # -- dead letters -----------------------------------------------------------------------

    def dead_list(self, queue: str, limit: int = 100) -> list[dict]:
        with self._lock:
            q = self._queues.get(queue)
            if q is None:
                return []
            return [
                {
                    "id": t.id,
                    "attempts": t.attempts,
                    "enqueued_at": t.enqueued_at,
                    "last_error": t.last_error,
                    "payload": t.payload,
                }
                for t in itertools.islice(q.dead.values(), limit)
            ]

    def dead_requeue(self, queue: str, ids: Iterable[int] | None = None) -> int:
        """Move dead tasks (all, or the given ids) back to ready with their attempts reset."""
        with self._lock:
            q = self._queues.get(queue)
            if q is None:
                return 0
            chosen = list(q.dead) if ids is None else [i for i in ids if i in q.dead]
            ops: list[JournalOp] = []
            for task_id in chosen:
                task = q.dead.pop(task_id)
                task.attempts, task.not_before, task.last_error, task.finished_at = 0, 0.0, None, None
                q.live[task_id] = task
                self._make_ready(q, task)
                ops.append(UpdateOp(task_id, 0, 0.0, False, None))
            if ops:
                self._wake(q)
                if self._durable:
                    self._journal.append(ops)
            return len(chosen)

    def dead_purge(self, queue: str, ids: Iterable[int] | None = None) -> int:
        with self._lock:
            q = self._queues.get(queue)
            if q is None:
                return 0
            chosen = list(q.dead) if ids is None else [i for i in ids if i in q.dead]
            for task_id in chosen:
                q.dead.pop(task_id).state = GONE
            if chosen and self._durable:
                self._journal.append([DeleteOp(chosen)])
            return len(chosen)

    # -- inspection and housekeeping --------------------------------------------------------

    def qsize(self, queue: str) -> int:
        with self._lock:
            q = self._queues.get(queue)
            if q is None:
                return 0
            self._service(q, self._clock.monotonic())
            return q.n_ready

    def has_queue(self, name: str) -> bool:
        """Whether queue ``name`` exists (one dict lookup, no lock: a queue is never removed)."""
        return name in self._queues

    def queue_count(self) -> int:
        return len(self._queues)

    def create_queue(self, name: str, limit: int | None = None) -> bool:
        """Make sure queue ``name`` exists. False, and nothing created, when it does not and
        ``limit`` queues exist already (checked and created under the lock, so concurrent
        callers cannot overshoot)."""
        with self._lock:
            if name in self._queues:
                return True
            if limit is not None and len(self._queues) >= limit:
                return False
            self._queues[name] = _Queue(name)
            return True

    def stats(self) -> dict[str, dict[str, float]]:
        """Per-queue gauges and counters. Counters count since this server process started."""
        with self._lock:
            now = self._clock.monotonic()
            wall = self._clock.wall()
            out = {}
            for name, q in self._queues.items():
                self._service(q, now)
                ready = q.ready
                while ready and ready[0].state is not READY:  # stale entries (acked while ready)
                    ready.popleft()
                out[name] = {
                    "ready": q.n_ready,
                    "inflight": q.n_leased,
                    "backlog": q.n_ready + q.n_leased,  # what KEDA scales on (k8s/components/keda)
                    # The next task in line; a retried task may be older but waits behind it.
                    "oldest_ready_age_seconds": round(max(0.0, wall - ready[0].enqueued_at), 3) if ready else 0.0,
                    "delayed": q.n_delayed,
                    "dead": len(q.dead),
                    "waiting": len(q.waiters),
                    "enqueued": q.enqueued,
                    "acked": q.acked,
                    "nacked": q.nacked,
                    "redelivered": q.redelivered,
                    "dead_lettered": q.dead_lettered,
                }
            return out

    def tick(self) -> None:
        """Expire leases and promote due retries in every queue, waking waiters, and evict
        finished tasks past the result TTL (the reaper calls this)."""
        with self._lock:
            now = self._clock.monotonic()
            for q in self._queues.values():
                self._service(q, now)
            self._evict(self._clock.wall())

    def result_store(self) -> dict[str, int]:
        """Gauges of the result store: finished tasks kept, the bytes they are counted as, and
        clients waiting for a result."""
        with self._lock:
            return {
                "finished": len(self._finished),
                "bytes": self._finished_bytes,
                "waiting": sum(len(w) for w in self._result_waiters.values()),
            }

    def save_leases(self) -> int:
        """Journal the leases held right now (graceful shutdown), so a restart can restore them."""
        if not self._durable:
            return 0
        with self._lock:
            mono, wall = self._clock.monotonic(), self._clock.wall()
            ops: list[JournalOp] = [
                LeaseOp(t.id, t.delivery, wall + (t.lease_deadline - mono))
                for q in self._queues.values()
                for t in q.live.values()
                if t.state is LEASED
            ]
            if ops:
                self._journal.append(ops)
            return len(ops)

    def close(self) -> None:
        """Stop handing out work: waiting gets return empty at once, new puts are refused."""
        with self._lock:
            self._closed = True
            done: set[int] = set()
            for q in self._queues.values():
                while q.waiters:
                    waiter = q.waiters.popleft()
                    if id(waiter) not in done:  # a take over several queues waits in each of them
                        done.add(id(waiter))
                        waiter.deliver([])
            waiting, self._result_waiters = self._result_waiters, {}
            for waiters in waiting.values():
                for result_waiter in waiters:
                    result_waiter.deliver([])

    # -- internals (lock held) --------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ServerShuttingDown("the server is shutting down and takes no new tasks; retry after it restarts")

    def _queue(self, name: str) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = _Queue(name)
        return q

    def _wake(self, q: _Queue) -> None:
        """Tasks became ready: hand them to parked waiters, oldest first."""
        waiters = q.waiters
        if waiters:
            now = self._clock.monotonic()
            while waiters and q.n_ready:
                waiter = waiters.popleft()
                if not waiter.rich:
                    waiter.deliver(self._take(q, waiter.max_n, now + waiter.lease, waiter.consumer))
                    continue
                for other in waiter.queues:
                    if other is not q:
                        other.waiters.remove(waiter)
                waiter.deliver(self._take_rich(waiter.queues, waiter.max_n, now + waiter.lease, waiter.consumer))

    def _make_ready(self, q: _Queue, task: _Task, front: bool = False) -> None:
        task.state = READY
        if front:
            q.ready.appendleft(task)
        else:
            q.ready.append(task)
        q.n_ready += 1

    def _delay(self, q: _Queue, task: _Task, not_before: float) -> None:
        task.state = DELAYED
        task.not_before = not_before
        heapq.heappush(q.delayed, (not_before, task.id, task))
        q.n_delayed += 1

    def _take(self, q: _Queue, max_n: int, deadline: float, consumer: str | None) -> list[WireDelivery]:
        # A plain tuple in Delivery's field order: what goes on the wire (see Delivery).
        return [
            (task.id, task.delivery, task.attempts, task.payload, task.enqueued_at)
            for task, _ in self._lease(q, max_n, deadline, consumer)
        ]

    def _take_rich(self, qs: list[_Queue], max_n: int, deadline: float, consumer: str | None) -> list:
        """``take`` items from ``qs`` in their order of priority."""
        out: list = []
        for q in qs:
            if q.n_ready:
                name = q.name
                out += [
                    (
                        name,
                        task.id,
                        task.delivery,
                        task.attempts,
                        task.payload,
                        task.enqueued_at,
                        task.headers,
                        task.timeout,
                    )
                    for task, _ in self._lease(q, max_n - len(out), deadline, consumer)
                ]
                if len(out) >= max_n:
                    break
        return out

    def _lease(self, q: _Queue, max_n: int, deadline: float, consumer: str | None) -> list[tuple[_Task, int]]:
        ready = q.ready
        taken: list[tuple[_Task, int]] = []
        wall = self._clock.wall()
        while ready and len(taken) < max_n:
            task = ready.popleft()
            if task.state is not READY:
                continue  # stale entry of a task acked or cancelled while ready
            task.state = LEASED
            task.delivery += 1
            task.lease_deadline = deadline
            task.started_at = wall
            task.consumer = consumer
            taken.append((task, task.delivery))
        if taken:
            n = len(taken)
            q.n_ready -= n
            q.n_leased += n
            heapq.heappush(q.leases, (deadline, next(self._batch_seq), taken))
        return taken

    def _ack(self, q: _Queue, ids: Iterable[int], results: dict[int, str] | None = None) -> int:
        live = q.live
        removed: list[_Task] = []
        cancelled: list[_Task] = []
        wall = self._clock.wall()
        store = self._store_finished
        for task_id in ids:
            task = live.pop(task_id, None)
            if task is None:
                continue
            state = task.state
            if state is LEASED:
                q.n_leased -= 1
                q.lease_garbage += 1
            elif state is READY:
                q.n_ready -= 1
            elif state is DELAYED:
                q.n_delayed -= 1
            if task.cancel_requested:  # cancelled while it ran: recorded cancelled, result dropped
                store(task, CANCELLED, wall)
                cancelled.append(task)
                continue
            if results:
                task.result = results.get(task_id)
            store(task, SUCCEEDED, wall)
            removed.append(task)
        if removed or cancelled:
            self._maybe_compact(q)
            q.acked += len(removed) + len(cancelled)
            if results and self._keeps_finished:
                results = {t.id: t.result for t in removed if t.result is not None}
            self._journal_finished(removed, SUCCEEDED, wall, results or None)
            self._journal_finished(cancelled, CANCELLED, wall, None)
            self._evict(wall)
        return len(removed) + len(cancelled)

    def _fail(self, q: _Queue, task: _Task, now: float, delay: float | None, error: str | None, reason: str) -> None:
        """A leased task failed (nack or lease expiry): retry later, or dead-letter it."""
        q.n_leased -= 1
        task.attempts += 1
        if error is not None:
            task.last_error = error
        if task.cancel_requested:  # cancelled while it ran: not retried
            del q.live[task.id]
            wall = self._clock.wall()
            self._store_finished(task, CANCELLED, wall)
            self._journal_finished([task], CANCELLED, wall, None)
            self._evict(wall)
            return
        if task.attempts > self.max_attempts:
            del q.live[task.id]
            task.state = DEAD
            task.finished_at = self._clock.wall()
            q.dead[task.id] = task
            q.dead_lettered += 1
            if self._result_waiters:
                self._complete_waiters(task)
            not_before = 0.0
            _log.warning(
                "dead_lettered",
                queue=q.name,
                task=task.id,
                attempts=task.attempts,
                reason=reason,
                error=(task.last_error or "")[:200],
            )
        else:
            if delay is None:
                delay = self.backoff(task.attempts) if reason == "nack" else 0.0
            if delay > 0:
                self._delay(q, task, self._clock.wall() + delay)
            else:
                self._make_ready(q, task)
                self._wake(q)
            not_before = task.not_before if task.state is DELAYED else 0.0
        if self._durable:
            self._journal.append([UpdateOp(task.id, task.attempts, not_before, task.state is DEAD, task.last_error)])

    def _maybe_compact(self, q: _Queue) -> None:
        """Rebuild the lease heap without dead slots once they outnumber the live leases.
        Amortised O(1) per ended lease: a rebuild costs O(heap) and follows that many endings."""
        if q.lease_garbage <= COMPACT_MIN or q.lease_garbage <= 2 * q.n_leased:
            return
        kept = []
        for deadline, seq, batch in q.leases:
            live = [(t, d) for t, d in batch if t.state is LEASED and t.delivery == d and t.lease_deadline == deadline]
            if live:
                kept.append((deadline, seq, live))
        heapq.heapify(kept)
        q.leases = kept
        q.lease_garbage = 0

    def backoff(self, attempts: int) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random; capped at retry_max."""
        ceiling = min(self.retry_max, self.retry_base * (2 ** min(attempts - 1, 32)))
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def _service(self, q: _Queue, now: float) -> None:
        """Expire due leases and promote due retries of one queue."""
        leases = q.leases
        while leases and leases[0][0] <= now:
            _, _, batch = heapq.heappop(leases)
            for task, delivery in batch:
                if task.state is LEASED and task.delivery == delivery and task.lease_deadline <= now:
                    q.redelivered += 1
                    self._fail(
                        q,
                        task,
                        now,
                        None,
                        "lease expired (consumer died, stalled or lost its connection)",
                        "lease_expired",
                    )
        delayed = q.delayed
        if delayed:
            wall = self._clock.wall()
            promoted = 0
            while delayed and delayed[0][0] <= wall:
                not_before, _, task = heapq.heappop(delayed)
                if task.state is DELAYED and task.not_before == not_before:
                    q.n_delayed -= 1
                    task.not_before = 0.0
                    self._make_ready(q, task)
                    promoted += 1
            if promoted:
                self._wake(q)


def _outcome(task: _Task) -> Outcome:
    if task.state is SUCCEEDED:
        return Outcome(SUCCEEDED, task.result)
    return Outcome(task.state, None, task.last_error)


def _by_queue(qs: list[_Queue], ids: Iterable[int]) -> dict[_Queue, list[int]]:
    """Task ids grouped by which of ``qs`` holds them live (ids of none are dropped: a take acks
    only tasks of the queues it names, which are what its key was checked against)."""
    out: dict[_Queue, list[int]] = {}
    for task_id in ids:
        for q in qs:
            if task_id in q.live:
                out.setdefault(q, []).append(task_id)
                break
    return out


def receipts(items: list[WireDelivery]) -> list[tuple[int, int]]:
    """The ``(id, delivery)`` receipts of ``get_many`` items, as ``release_many`` takes them."""
    return [(d.id, d.delivery) for d in map(Delivery._make, items)]
