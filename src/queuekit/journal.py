"""The journal: where the broker's state goes so a restarted server finds it again.

Contract (every implementation; tests/unit/test_journal_contract.py runs one suite against each):

- ``append(ops)`` is called by the broker *while it holds its lock*, in the order the state
  changed, so it must not block on I/O: it queues the ops and returns a sequence number.
- ``wait(seq)`` blocks until every op up to ``seq`` is committed (durable per the journal's sync
  mode) or raises :class:`JournalError`; ``when_committed(seq, done)`` is the same without
  blocking (``done(None)`` or ``done(error)`` later, from the committing thread). Only puts
  wait: a put is acknowledged to the producer only after its tasks are committed. Other ops
  (ack, nack, dead-letter, requeue, purge) are written behind, in order, in the next group
  commit; a crash loses at most the last few of them, which makes a task come back
  (at-least-once), never disappear.
- ``load()`` returns every stored task (live, dead and finished) ordered by id, and the next id
  to use. Finished tasks (schema v2: acked or cancelled, ``state`` set) keep their status and
  result until the broker evicts them from its result store with a ``DeleteOp``.
- Leases are not journaled as they happen: after a crash every task that was in flight is ready
  again, with the attempts it had. A graceful shutdown saves the leases held at that moment
  (``"lease"`` ops); ``load()`` returns them once and forgets them, so the consumers that held
  those tasks can still ack or extend them after the restart (no duplicate work).

Ops are the named records below: :class:`PutOp` (one per put call: its tasks have consecutive
ids), :class:`UpdateOp` (nack, lease expiry, dead-letter, requeue), :class:`FinishOp` (ack,
cancel; one per call), :class:`CancelOp` (an in-flight task flagged), :class:`DeleteOp` (purge,
result-store eviction) and :class:`LeaseOp` (graceful shutdown only). A put and an ack journal one record
per call, not one per task: creating a record per task cost more than the rest of a batched put.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import NamedTuple

from .errors import QueuekitError


class JournalError(QueuekitError):
    """The journal could not commit; the operation that waited for it did not happen."""


class PutOp(NamedTuple):
    """New tasks ``first_id``, ``first_id + 1``, ... with these payloads, attempts 0, and the
    same headers and per-task timeout (schema v2)."""

    queue: str
    first_id: int
    payloads: list[str]
    enqueued_at: float
    not_before: float
    headers: dict[str, str] | None = None
    timeout: float | None = None

    def rows(self) -> list[StoredTask]:
        headers, timeout = self.headers, self.timeout
        return [
            StoredTask(
                self.queue,
                task_id,
                payload,
                0,
                self.enqueued_at,
                self.not_before,
                False,
                None,
                None,
                None,
                headers,
                timeout,
            )
            for task_id, payload in enumerate(self.payloads, self.first_id)
        ]


class UpdateOp(NamedTuple):
    """A task's retry state changed (nack, lease expiry, dead-letter, requeue)."""

    id: int
    attempts: int
    not_before: float
    dead: bool
    last_error: str | None


class DeleteOp(NamedTuple):
    """Tasks gone (purged dead tasks, finished tasks evicted from the result store)."""

    ids: list[int]


class FinishOp(NamedTuple):
    """Live tasks finished (schema v2): ``state`` "succeeded" (acked) or "cancelled". The row stays
    as the task's status until evicted (a ``DeleteOp``); its payload is no longer kept.
    ``results``: task id -> result JSON text (ids absent: no result). ``started_at`` and
    ``consumers`` run parallel to ``ids`` (when and by which client name it was last leased)."""

    ids: list[int]
    state: str
    finished_at: float
    results: dict[int, str] | None
    started_at: list[float | None]
    consumers: list[str | None]


class CancelOp(NamedTuple):
    """In-flight tasks flagged cancelled (schema v2): their ack, nack or lease expiry finishes them
    as cancelled; a restart finds them live and finishes them as cancelled at once."""

    ids: list[int]


class LeaseOp(NamedTuple):
    """A lease held at a graceful shutdown, until this wall-clock time."""

    id: int
    delivery: int
    until: float


JournalOp = PutOp | UpdateOp | DeleteOp | LeaseOp | FinishOp | CancelOp


class StoredTask(NamedTuple):
    queue: str
    id: int
    payload: str
    attempts: int
    enqueued_at: float
    not_before: float
    dead: bool
    last_error: str | None
    lease_delivery: int | None = None  # set only for leases saved by a graceful shutdown
    lease_until: float | None = None
    # Schema v2:
    headers: dict[str, str] | None = None
    timeout: float | None = None
    state: str | None = None  # "succeeded" / "cancelled": a finished task (status kept); None: live or dead
    finished_at: float | None = None
    started_at: float | None = None
    consumer: str | None = None
    result: str | None = None
    cancel_requested: bool = False


class Recovered(NamedTuple):
    tasks: list[StoredTask]
    next_id: int


class Journal:
    """Base class and the memory-only journal: nothing is kept, nothing is recovered."""

    durable = False
    description = "memory"
    commits = 0  # transactions written so far (a durable journal counts them)
    # Schema v2: keeps finished tasks (FinishOp, CancelOp). A journal without it gets a DeleteOp
    # for each finish and no CancelOp: results and cancel flags then do not survive a restart.
    keeps_finished = False
    # A commit takes long enough (a network round trip, a disk flush) that the server's loop
    # should go on serving while it runs: the loop then uses ``when_committed`` instead of ``wait``.
    commits_in_background = False

    @property
    def healthy(self) -> bool:
        """False once a commit failed: the server then reports not ready."""
        return True

    def load(self) -> Recovered:
        return Recovered([], 0)

    def append(self, ops: list[JournalOp]) -> int:
        return 0

    def wait(self, seq: int, timeout: float | None = None) -> None:
        return None

    def when_committed(self, seq: int, done: Callable[[BaseException | None], object]) -> None:
        """Call ``done(None)`` once every op up to ``seq`` is committed, or ``done(error)`` (a
        :class:`JournalError`) if that commit failed. Never blocks when ``commits_in_background``
        is set: ``done`` then runs later, on the thread that committed. Otherwise (the default
        here) it commits now and calls ``done`` before it returns."""
        try:
            self.wait(seq)
        except JournalError as e:
            done(e)
        else:
            done(None)

    def flush(self, timeout: float | None = None) -> None:
        """Commit everything appended so far (used at shutdown)."""

    def close(self) -> None:
        pass


class MemoryJournal(Journal):
    """Keeps the journaled state in a dict: "durable" across broker instances in one process.

    For tests: a restart is a new ``Broker`` on the same ``MemoryJournal``. Ops are applied at
    ``append`` time, so everything appended is committed.
    """

    durable = True
    description = "in-process (tests)"
    keeps_finished = True

    def __init__(self) -> None:
        self._rows: dict[int, StoredTask] = {}
        self._next_id = 0
        self._seq = 0
        self._lock = threading.Lock()

    def load(self) -> Recovered:
        with self._lock:
            rows = [self._rows[i] for i in sorted(self._rows)]
            for row in rows:  # saved leases are restored once
                if row.lease_until is not None:
                    self._rows[row.id] = row._replace(lease_delivery=None, lease_until=None)
            return Recovered(rows, self._next_id)

    def append(self, ops: list[JournalOp]) -> int:
        with self._lock:
            for op in ops:
                apply_op(self._rows, op)
                if type(op) is PutOp and op.payloads:
                    self._next_id = max(self._next_id, op.first_id + len(op.payloads))
            self._seq += 1
            return self._seq


def apply_op(rows: dict[int, StoredTask], op: JournalOp) -> None:
    """Apply one op to an id -> StoredTask mapping (the reference semantics of every journal)."""
    if type(op) is PutOp:
        for row in op.rows():
            rows[row.id] = row
    elif type(op) is UpdateOp:
        updated = rows.get(op.id)
        if updated is not None:
            rows[op.id] = updated._replace(
                attempts=op.attempts, not_before=op.not_before, dead=op.dead, last_error=op.last_error
            )
    elif type(op) is DeleteOp:
        for task_id in op.ids:
            rows.pop(task_id, None)
    elif type(op) is LeaseOp:
        leased = rows.get(op.id)
        if leased is not None:
            rows[op.id] = leased._replace(lease_delivery=op.delivery, lease_until=op.until)
    elif type(op) is FinishOp:
        results = op.results or {}
        for task_id, started, consumer in zip(op.ids, op.started_at, op.consumers, strict=True):
            finished = rows.get(task_id)
            if finished is not None:
                rows[task_id] = finished._replace(
                    payload="",
                    state=op.state,
                    finished_at=op.finished_at,
                    started_at=started,
                    consumer=consumer,
                    result=results.get(task_id),
                    lease_delivery=None,
                    lease_until=None,
                )
    elif type(op) is CancelOp:
        for task_id in op.ids:
            flagged = rows.get(task_id)
            if flagged is not None:
                rows[task_id] = flagged._replace(cancel_requested=True)
    else:
        raise ValueError(f"unknown journal op {op!r}")
