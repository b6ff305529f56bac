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
- Thread-safe: one lock guards all queues. Two ways to wait for a task: ``get_many`` blocks the
  calling thread on a per-queue condition (in slices of at most a second, asking its ``alive``
  callback between slices so a client that went away never gets handed a task); ``get_or_wait``
  never blocks: it parks a :class:`Waiter`, and whoever makes tasks ready (a put, a nack, a lease
  expiry) takes them for the oldest waiter and calls its ``deliver`` callback. The server's event
  loop uses the second, so a waiting client costs no thread.
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
from .errors import InvalidRequest, ServerShuttingDown
from .journal import Journal, Recovered
from .message import check_queue_name, validate_texts

READY, LEASED, DELAYED, DEAD, GONE = "ready", "leased", "delayed", "dead", "gone"
MAX_BATCH = 10_000
MAX_WAIT_SLICE = 1.0
MAX_LEASE_SECONDS = 12 * 3600.0
MAX_ERROR_CHARS = 2000
COMPACT_MIN = 4096  # dead lease-heap slots tolerated before a compaction is considered

_log = logs.get("broker")


class ClientGone(Exception):
    """Raised out of a blocking get when the ``alive`` callback says the caller disconnected."""


class Waiter:
    """A parked ``get_or_wait``: ``deliver(items)`` is called exactly once, with the tasks taken
    for it (already leased), or with ``[]`` when the broker closes; never after ``cancel`` said
    True. It runs with the broker lock held, on whichever thread made the tasks ready, so it must
    only hand the items over (append to a queue), never block or call the broker."""

    __slots__ = ("queue", "max_n", "lease", "deliver")

    def __init__(self, queue: _Queue, max_n: int, lease: float, deliver: Callable[[list], None]):
        self.queue = queue
        self.max_n = max_n
        self.lease = lease
        self.deliver = deliver


class PendingPut(NamedTuple):
    """A put between ``begin_put`` and ``finish_put``: journaled as ``seq`` (0: not journaled)."""

    queue: str
    tasks: list
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
        "cond",
        "waiters",
    )

    def __init__(self, name: str, lock: threading.Lock):
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
        self.cond = threading.Condition(lock)
        self.waiters: deque[Waiter] = deque()  # parked get_or_wait calls, oldest first


class Broker:
    def __init__(
        self,
        *,
        journal: Journal | None = None,
        max_task_bytes: int = 1024 * 1024,
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

    def put_many(self, queue: str, texts: Any, delay: float = 0.0) -> list[int]:
        """Enqueue JSON texts; all or nothing. Returns the new task ids once they are committed."""
        put = self.begin_put(queue, texts, delay)
        if put.seq:
            self.wait_committed(put.seq)  # raises JournalError: then nothing becomes visible
        return self.finish_put(put)

    def begin_put(self, queue: str, texts: Any, delay: float = 0.0) -> PendingPut:
        """The first half of ``put_many``, which never waits: validate, number and journal the
        tasks. Durable: nothing is visible until ``finish_put``, to be called once
        ``wait_committed(put.seq)`` returned (the server's loop commits many puts at once).
        Memory (``seq`` 0): the tasks are visible already."""
        check_queue_name(queue)
        texts = validate_texts(texts, self.max_task_bytes)
        if len(texts) > MAX_BATCH:
            raise InvalidRequest(f"at most {MAX_BATCH} tasks per put_many, got {len(texts)}")
        delay = _seconds(delay, "delay", 0.0, 366 * 86400.0)
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
            seq = self._journal.append([("put", queue, t.id, t.payload, 0, now, not_before) for t in tasks])
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
            self._wake(q, len(tasks))
        q.enqueued += len(tasks)

    # -- consumer side ----------------------------------------------------------------------

    def get_many(
        self,
        queue: str,
        max_n: int = 1,
        timeout: float = 0.0,
        lease: float | None = None,
        acks: Iterable[int] | None = None,
        alive: Callable[[], bool] | None = None,
    ) -> list[tuple]:
        """Lease up to ``max_n`` ready tasks, waiting up to ``timeout`` seconds for the first.

        ``acks`` are applied first (a worker's acks ride on its next get: no extra round trip).
        Returns ``(id, delivery, attempts, payload, enqueued_at)`` tuples; ``[]`` on timeout.
        """
        timeout, lease = self._get_args(queue, max_n, timeout, lease)
        clock = self._clock
        with self._lock:
            q = self._queue(queue)
            now = self._start_get(q, acks)
            if now is None:
                return []
            if not q.n_ready and timeout > 0:
                deadline = now + timeout
                while True:
                    remaining = deadline - now
                    if remaining <= 0 or self._closed:
                        return []
                    q.cond.wait(min(remaining, MAX_WAIT_SLICE, self._next_due(q, now)))
                    if alive is not None and not alive():
                        raise ClientGone()
                    now = clock.monotonic()
                    self._service(q, now)
                    if q.n_ready:
                        break
            return self._take(q, max_n, now + lease)

    def get_or_wait(
        self,
        queue: str,
        max_n: int,
        timeout: float,
        lease: float | None,
        acks: Iterable[int] | None,
        deliver: Callable[[list], None],
    ) -> list[tuple] | Waiter:
        """``get_many`` that never blocks: the tasks (or ``[]`` when ``timeout`` is 0 or the
        broker is closed), or a parked :class:`Waiter` that ``deliver`` will complete. The caller
        owns the timeout: when it passes, ``cancel(waiter)``; True means answer ``[]``."""
        timeout, lease = self._get_args(queue, max_n, timeout, lease)
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

    def _get_args(self, queue: Any, max_n: Any, timeout: Any, lease: Any) -> tuple[float, float]:
        check_queue_name(queue)
        if type(max_n) is not int or not 1 <= max_n <= MAX_BATCH:
            raise InvalidRequest(f"max_n must be an int in 1..{MAX_BATCH}, got {max_n!r}")
        timeout = _seconds(timeout, "timeout", 0.0, None)
        lease = self.default_lease if lease is None else _seconds(lease, "lease", 0.001, MAX_LEASE_SECONDS)
        return timeout, lease

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
        check_queue_name(queue)
        with self._lock:
            return self._ack(self._queue(queue), ids)

    def nack_many(self, queue: str, items: Iterable[tuple]) -> int:
        """``items``: ``(id, delivery, delay_or_None, error_or_None)``. A nack charges an attempt;
        ``delay=None`` means the server's exponential backoff with jitter."""
        check_queue_name(queue)
        now = self._clock.monotonic()
        with self._lock:
            q = self._queue(queue)
            done = 0
            for item in _items(items, 4, "nack"):
                task_id, delivery, delay, error = item
                task = q.live.get(task_id)
                if task is None or task.state is not LEASED or task.delivery != delivery:
                    continue
                if delay is not None:
                    delay = _seconds(delay, "delay", 0.0, 366 * 86400.0)
                q.nacked += 1
                q.lease_garbage += 1
                self._fail(q, task, now, delay, None if error is None else str(error)[:MAX_ERROR_CHARS], "nack")
                done += 1
            self._maybe_compact(q)
            return done

    def extend_many(self, queue: str, receipts: Iterable[tuple], lease: float | None = None) -> list[int]:
        """Renew the leases of ``(id, delivery)`` receipts. Returns the ids that are no longer ours."""
        check_queue_name(queue)
        lease = self.default_lease if lease is None else _seconds(lease, "lease", 0.001, MAX_LEASE_SECONDS)
        with self._lock:
            q = self._queue(queue)
            now = self._clock.monotonic()
            self._service(q, now)
            deadline = now + lease
            kept, lost = [], []
            for task_id, delivery in _items(receipts, 2, "extend"):
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

    def release_many(self, queue: str, receipts: Iterable[tuple]) -> int:
        """Give leased tasks back unstarted: to the front of the queue, no attempt charged."""
        check_queue_name(queue)
        with self._lock:
            q = self._queue(queue)
            released = []
            for task_id, delivery in _items(receipts, 2, "release"):
                task = q.live.get(task_id)
                if task is not None and task.state is LEASED and task.delivery == delivery:
                    released.append(task)
            for task in reversed(released):  # keep their original order at the front
                q.n_leased -= 1
                self._make_ready(q, task, front=True)
            if released:
                self._wake(q, len(released))
                q.lease_garbage += len(released)
                self._maybe_compact(q)
            return len(released)

    # -- dead letters -----------------------------------------------------------------------

    def dead_list(self, queue: str, limit: int = 100) -> list[dict]:
        check_queue_name(queue)
        if type(limit) is not int or limit < 1:
            raise InvalidRequest(f"limit must be a positive int, got {limit!r}")
        with self._lock:
            q = self._queue(queue)
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
        check_queue_name(queue)
        with self._lock:
            q = self._queue(queue)
            chosen = list(q.dead) if ids is None else [i for i in _ids(ids) if i in q.dead]
            ops = []
            for task_id in chosen:
                task = q.dead.pop(task_id)
                task.attempts, task.not_before, task.last_error = 0, 0.0, None
                q.live[task_id] = task
                self._make_ready(q, task)
                ops.append(("upd", task_id, 0, 0.0, False, None))
            if ops:
                self._wake(q, len(ops))
                if self._durable:
                    self._journal.append(ops)
            return len(chosen)

    def dead_purge(self, queue: str, ids: Iterable[int] | None = None) -> int:
        check_queue_name(queue)
        with self._lock:
            q = self._queue(queue)
            chosen = list(q.dead) if ids is None else [i for i in _ids(ids) if i in q.dead]
            for task_id in chosen:
                q.dead.pop(task_id).state = GONE
            if chosen and self._durable:
                self._journal.append([("del", task_id) for task_id in chosen])
            return len(chosen)

    # -- inspection and housekeeping --------------------------------------------------------

    def qsize(self, queue: str) -> int:
        check_queue_name(queue)
        with self._lock:
            q = self._queues.get(queue)
            if q is None:
                return 0
            self._service(q, self._clock.monotonic())
            return q.n_ready

    def stats(self) -> dict[str, dict[str, int]]:
        """Per-queue gauges and counters. Counters count since this server process started."""
        with self._lock:
            now = self._clock.monotonic()
            out = {}
            for name, q in self._queues.items():
                self._service(q, now)
                out[name] = {
                    "ready": q.n_ready,
                    "inflight": q.n_leased,
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
            ops = [
                ("lease", t.id, t.delivery, wall + (t.lease_deadline - mono))
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
                q.cond.notify_all()
                while q.waiters:
                    q.waiters.popleft().deliver([])

    # -- internals (lock held) --------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ServerShuttingDown("the server is shutting down and takes no new tasks; retry after it restarts")

    def _queue(self, name: str) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = _Queue(name, self._lock)
        return q

    def _wake(self, q: _Queue, n: int) -> None:
        """``n`` tasks became ready: hand them to parked waiters first (oldest first), then wake
        threads blocked in ``get_many`` for what is left."""
        waiters = q.waiters
        if waiters:
            now = self._clock.monotonic()
            while waiters and q.n_ready:
                waiter = waiters.popleft()
                waiter.deliver(self._take(q, waiter.max_n, now + waiter.lease))
        if q.n_ready:
            q.cond.notify(n)

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

    def _take(self, q: _Queue, max_n: int, deadline: float) -> list[tuple]:
        ready = q.ready
        taken = []
        out = []
        while ready and len(out) < max_n:
            task = ready.popleft()
            if task.state is not READY:
                continue  # stale entry of a task acked while ready
            task.state = LEASED
            task.delivery += 1
            task.lease_deadline = deadline
            taken.append((task, task.delivery))
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
        for task_id in _ids(ids):
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
                self._journal.append([("del", task_id) for task_id in removed])
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
                self._wake(q, 1)
            not_before = task.not_before if task.state is DELAYED else 0.0
        if self._durable:
            self._journal.append([("upd", task.id, task.attempts, not_before, task.state is DEAD, task.last_error)])

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
                self._wake(q, promoted)

    def _next_due(self, q: _Queue, now: float) -> float:
        """Seconds until this queue's next lease expiry or retry, so a waiter wakes for it."""
        due = MAX_WAIT_SLICE
        if q.leases:
            due = min(due, q.leases[0][0] - now)
        if q.delayed:
            due = min(due, q.delayed[0][0] - self._clock.wall())
        return max(due, 0.001)


def receipts(items: list[tuple]) -> list[tuple[int, int]]:
    """The ``(id, delivery)`` receipts of ``get_many`` items, as ``release_many`` takes them."""
    return [(item[0], item[1]) for item in items]


def _seconds(value: Any, name: str, low: float, high: float | None) -> float:
    if type(value) not in (int, float) or value != value or value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise InvalidRequest(f"{name} must be a number of seconds in {bound}, got {value!r}")
    return float(value)


def _ids(ids: Any) -> Iterable[int]:
    if type(ids) not in (list, tuple, set, frozenset):
        raise InvalidRequest(f"task ids must be a list of ints, got {type(ids).__name__}")
    for task_id in ids:
        if type(task_id) is not int:
            raise InvalidRequest(f"task ids must be ints, got {task_id!r}")
    return ids


def _items(items: Any, width: int, what: str) -> list[tuple]:
    if type(items) not in (list, tuple):
        raise InvalidRequest(f"{what} items must be a list of tuples, got {type(items).__name__}")
    out = []
    for item in items:
        if (
            type(item) not in (list, tuple)
            or len(item) != width
            or type(item[0]) is not int
            or type(item[1]) is not int
        ):
            raise InvalidRequest(f"malformed {what} item {item!r}")
        out.append(tuple(item))
    return out
