"""The broker: named queues and the task state machine. No network, no files.

States and transitions (``attempts`` counts failed deliveries)::

    ready ──get──▶ leased ──ack──▶ gone
    leased ──nack──▶ delayed ──(backoff elapsed)──▶ ready       attempts + 1
    leased ──lease expired──▶ ready                              attempts + 1, redelivered + 1
    leased ──release──▶ ready (front of the queue)               no attempt charged (worker drain)
    leased ──nack/expiry with attempts > max_attempts──▶ dead
    dead ──requeue──▶ ready (attempts reset);  dead ──purge──▶ gone
    crash + restart (durable): leased ──▶ ready, attempts kept
    graceful restart (durable): leased ──▶ leased, same delivery and remaining lease (save_leases)

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
- Time comes from an injected clock: ``monotonic`` for leases and waits, ``wall`` for what is
  stored (enqueue time, retry-not-before).
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from . import logs
from .errors import ServerShuttingDown
from .journal import DeleteOp, Journal, JournalOp, LeaseOp, PutOp, Recovered, UpdateOp
from .message import Delivery, NackItem, WireDelivery

READY, LEASED, DELAYED, DEAD, GONE = "ready", "leased", "delayed", "dead", "gone"
MAX_ERROR_CHARS = 2000
COMPACT_MIN = 4096  # dead lease-heap slots tolerated before a compaction is considered

_log = logs.get("broker")


class Waiter:
    """A parked ``get_or_wait``: ``deliver(items)`` is called exactly once, with the tasks taken
    for it (already leased), or with ``[]`` when the broker closes; never after ``cancel`` said
    True. It runs with the broker lock held, on whichever thread made the tasks ready, so it must
    only hand the items over (append to a queue), never block or call the broker."""

    __slots__ = ("queue", "max_n", "lease", "deliver")

    def __init__(self, queue: _Queue, max_n: int, lease: float, deliver: Callable[[list[WireDelivery]], None]):
        self.queue = queue
        self.max_n = max_n
        self.lease = lease
        self.deliver = deliver


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
        "payload",
        "attempts",
        "enqueued_at",
        "state",
        "delivery",
        "lease_deadline",
        "not_before",
        "last_error",
    )

    def __init__(
        self,
        task_id: int,
        payload: str,
        attempts: int,
        enqueued_at: float,
        not_before: float = 0.0,
        last_error: str | None = None,
    ):
        self.id = task_id
        self.payload = payload
        self.attempts = attempts
        self.enqueued_at = enqueued_at
        self.state = GONE
        self.delivery = 0
        self.lease_deadline = 0.0
        self.not_before = not_before
        self.last_error = last_error


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
        max_queues: int | None = None,
        max_attempts: int = 5,
        retry_base: float = 1.0,
        retry_max: float = 300.0,
        default_lease: float = 30.0,
        clock: Any = None,
        rng: random.Random | None = None,
    ):
        self._lock = threading.Lock()
        self._queues: dict[str, _Queue] = {}
        self._journal = journal or Journal()
        self._durable = self._journal.durable
        self.max_task_bytes = max_task_bytes
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

    # -- recovery ---------------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """Load the journal's tasks (before serving). Returns live tasks recovered per queue."""
        state: Recovered = self._journal.load()
        counts: dict[str, int] = {}
        now = self._clock.wall()
        mono = self._clock.monotonic()
        with self._lock:
            for row in state.tasks:
                q = self._queue(row.queue)
                task = _Task(row.id, row.payload, row.attempts, row.enqueued_at, row.not_before, row.last_error)
                if row.dead:
                    task.state = DEAD
                    q.dead[task.id] = task
                    continue
                q.live[task.id] = task
                counts[row.queue] = counts.get(row.queue, 0) + 1
                if row.lease_until is not None and row.lease_until > now:
                    # Saved by a graceful shutdown: the holder may still ack or extend it.
                    task.state = LEASED
                    task.delivery = row.lease_delivery or 0
                    task.lease_deadline = mono + (row.lease_until - now)
                    q.n_leased += 1
                    heapq.heappush(q.leases, (task.lease_deadline, next(self._batch_seq), [(task, task.delivery)]))
                elif row.not_before > now:
                    self._delay(q, task, row.not_before)
                else:
                    self._make_ready(q, task)
            self._next_id = max(self._next_id, state.next_id, max((r.id + 1 for r in state.tasks), default=0))
        return counts

    # -- producer side ----------------------------------------------------------------------

    def put_many(self, queue: str, texts: list[str], delay: float = 0.0) -> list[int]:
        """Enqueue JSON texts; all or nothing. Returns the new task ids once they are committed.
        For in-process callers; the server's loop uses the two halves below."""
        put = self.begin_put(queue, texts, delay)
        if put.seq:
            self.wait_committed(put.seq)  # raises JournalError: then nothing becomes visible
        return self.finish_put(put)

    def begin_put(self, queue: str, texts: list[str], delay: float = 0.0) -> PendingPut:
        """The first half of ``put_many``, which never waits: number and journal the tasks.
        Durable: nothing is visible until ``finish_put``, to be called once
        ``wait_committed(put.seq)`` returned (the server's loop commits many puts at once).
        Memory (``seq`` 0): the tasks are visible already."""
        if not texts:
            return PendingPut(queue, [], 0.0, 0)
        now = self._clock.wall()
        not_before = now + delay if delay > 0 else 0.0
        # Built before taking the lock, numbered under it: less time holding the lock.
        tasks = [_Task(0, text, 0, now, not_before) for text in texts]
        with self._lock:
            self._check_open()
            first = self._next_id
            self._next_id = first + len(tasks)
            for task_id, t in enumerate(tasks, first):
                t.id = task_id
            if not self._durable:
                self._publish(queue, tasks, not_before)
                return PendingPut(queue, tasks, not_before, 0)
            seq = self._journal.append([PutOp(queue, first, texts, now, not_before)])
        return PendingPut(queue, tasks, not_before, seq)

    def wait_committed(self, seq: int) -> None:
        """Block until the journal committed everything up to ``seq`` (raises ``JournalError``)."""
        self._journal.wait(seq)

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
        self, queue: str, max_n: int = 1, lease: float | None = None, acks: Iterable[int] | None = None
    ) -> list[WireDelivery]:
        """Lease up to ``max_n`` ready tasks now (``[]`` when none is ready or the broker is closed).

        ``acks`` are applied first (a worker's acks ride on its next get: no extra round trip).
        Returns :class:`~queuekit.message.Delivery`-shaped tuples.
        """
        lease = self.default_lease if lease is None else lease
        with self._lock:
            q = self._queue(queue)
            now = self._start_get(q, acks)
            if now is None:
                return []
            return self._take(q, max_n, now + lease)

    def get_or_wait(
        self,
        queue: str,
        max_n: int,
        timeout: float,
        lease: float | None,
        acks: Iterable[int] | None,
        deliver: Callable[[list[WireDelivery]], None],
    ) -> list[WireDelivery] | Waiter:
        """``get_many``, or when nothing is ready and ``timeout`` > 0, a parked :class:`Waiter`
        that ``deliver`` will complete. The caller owns the timeout: when it passes,
        ``cancel(waiter)``; True means answer ``[]``."""
        lease = self.default_lease if lease is None else lease
        with self._lock:
            q = self._queue(queue)
            now = self._start_get(q, acks)
            if now is None:
                return []
            if q.n_ready or timeout <= 0:
                return self._take(q, max_n, now + lease)
            waiter = Waiter(q, max_n, lease, deliver)
            q.waiters.append(waiter)
            return waiter

    def cancel(self, waiter: Waiter) -> bool:
        """Withdraw a parked waiter. False: it was already delivered (its ``deliver`` ran or runs)."""
        with self._lock:
            try:
                waiter.queue.waiters.remove(waiter)
            except ValueError:
                return False
            return True

    def _start_get(self, q: _Queue, acks: Iterable[int] | None) -> float | None:
        """Lock held: apply the acks riding on a get, then expire and promote what is due.
        Returns the current monotonic time, or None when the broker is closed."""
        if acks:
            self._ack(q, acks)
        if self._closed:
            return None
        now = self._clock.monotonic()
        self._service(q, now)
        return now

    def ack_many(self, queue: str, ids: Iterable[int]) -> int:
        with self._lock:
            q = self._queues.get(queue)
            return 0 if q is None else self._ack(q, ids)

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
        lease = self.default_lease if lease is None else lease
        with self._lock:
            q = self._queues.get(queue)
            if q is None:
                return [task_id for task_id, _ in receipts]
            now = self._clock.monotonic()
            self._service(q, now)
            deadline = now + lease
            kept, lost = [], []
            for task_id, delivery in receipts:
                task = q.live.get(task_id)
                if task is None or task.state is not LEASED or task.delivery != delivery:
                    lost.append(task_id)
                    continue
                task.lease_deadline = deadline
                kept.append((task, delivery))
            if kept:
                heapq.heappush(q.leases, (deadline, next(self._batch_seq), kept))
                q.lease_garbage += len(kept)
                self._maybe_compact(q)
            return lost

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
                task.attempts, task.not_before, task.last_error = 0, 0.0, None
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
        """Expire leases and promote due retries in every queue, waking waiters (the reaper calls this)."""
        with self._lock:
            now = self._clock.monotonic()
            for q in self._queues.values():
                self._service(q, now)

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
            for q in self._queues.values():
                while q.waiters:
                    q.waiters.popleft().deliver([])

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
                waiter.deliver(self._take(q, waiter.max_n, now + waiter.lease))

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

    def _take(self, q: _Queue, max_n: int, deadline: float) -> list[WireDelivery]:
        ready = q.ready
        taken = []
        out: list[WireDelivery] = []
        while ready and len(out) < max_n:
            task = ready.popleft()
            if task.state is not READY:
                continue  # stale entry of a task acked while ready
            task.state = LEASED
            task.delivery += 1
            task.lease_deadline = deadline
            taken.append((task, task.delivery))
            # A plain tuple in Delivery's field order: what goes on the wire (see Delivery).
            out.append((task.id, task.delivery, task.attempts, task.payload, task.enqueued_at))
        if taken:
            n = len(taken)
            q.n_ready -= n
            q.n_leased += n
            heapq.heappush(q.leases, (deadline, next(self._batch_seq), taken))
        return out

    def _ack(self, q: _Queue, ids: Iterable[int]) -> int:
        live = q.live
        removed = []
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
            task.state = GONE
            removed.append(task_id)
        if removed:
            self._maybe_compact(q)
            q.acked += len(removed)
            if self._durable:
                self._journal.append([DeleteOp(removed)])
        return len(removed)

    def _fail(self, q: _Queue, task: _Task, now: float, delay: float | None, error: str | None, reason: str) -> None:
        """A leased task failed (nack or lease expiry): retry later, or dead-letter it."""
        q.n_leased -= 1
        task.attempts += 1
        if error is not None:
            task.last_error = error
        if task.attempts > self.max_attempts:
            del q.live[task.id]
            task.state = DEAD
            q.dead[task.id] = task
            q.dead_lettered += 1
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


def receipts(items: list[WireDelivery]) -> list[tuple[int, int]]:
    """The ``(id, delivery)`` receipts of ``get_many`` items, as ``release_many`` takes them."""
    return [(d.id, d.delivery) for d in map(Delivery._make, items)]
