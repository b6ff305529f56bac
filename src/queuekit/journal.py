"""The journal: where the broker's state goes so a restarted server finds it again.

Contract (every implementation; tests/unit/test_journal_contract.py runs one suite against each):

- ``append(ops)`` is called by the broker *while it holds its lock*, in the order the state
  changed, so it must not block on I/O: it queues the ops and returns a sequence number.
- ``wait(seq)`` blocks until every op up to ``seq`` is committed (durable per the journal's sync
  mode) or raises :class:`JournalError`. Only puts wait: a put is acknowledged to the producer only
  after its tasks are committed. Other ops (ack, nack, dead-letter, requeue, purge) are written
  behind, in order, in the next group commit; a crash loses at most the last few of them, which
  makes a task come back (at-least-once), never disappear.
- ``load()`` returns every stored task (live and dead) ordered by id, and the next id to use.
- Leases are not journaled as they happen: after a crash every task that was in flight is ready
  again, with the attempts it had. A graceful shutdown saves the leases held at that moment
  (``"lease"`` ops); ``load()`` returns them once and forgets them, so the consumers that held
  those tasks can still ack or extend them after the restart (no duplicate work).

Ops are tuples:
    ("put", queue, id, payload, attempts, enqueued_at, not_before)
    ("upd", id, attempts, not_before, dead, last_error)   # nack, expiry, dead-letter, requeue
    ("del", id)                                            # ack, purge
    ("lease", id, delivery, until_wall_time)               # graceful shutdown only
"""

from __future__ import annotations

import threading
from typing import NamedTuple

from .errors import QueuekitError


class JournalError(QueuekitError):
    """The journal could not commit; the operation that waited for it did not happen."""


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


class Recovered(NamedTuple):
    tasks: list[StoredTask]
    next_id: int


class Journal:
    """Base class and the memory-only journal: nothing is kept, nothing is recovered."""

    durable = False
    description = "memory"
    commits = 0  # transactions written so far (a durable journal counts them)
    healthy = True  # False once a commit failed: the server then reports not ready

    def load(self) -> Recovered:
        return Recovered([], 0)

    def append(self, ops: list[tuple]) -> int:
        return 0

    def wait(self, seq: int, timeout: float | None = None) -> None:
        return None

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

    def __init__(self):
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

    def append(self, ops: list[tuple]) -> int:
        with self._lock:
            for op in ops:
                apply_op(self._rows, op)
                if op[0] == "put":
                    self._next_id = max(self._next_id, op[2] + 1)
            self._seq += 1
            return self._seq


def apply_op(rows: dict[int, StoredTask], op: tuple) -> None:
    """Apply one op to an id -> StoredTask mapping (the reference semantics of every journal)."""
    kind = op[0]
    if kind == "put":
        _, queue, task_id, payload, attempts, enqueued_at, not_before = op
        rows[task_id] = StoredTask(queue, task_id, payload, attempts, enqueued_at, not_before, False, None)
    elif kind == "upd":
        _, task_id, attempts, not_before, dead, last_error = op
        row = rows.get(task_id)
        if row is not None:
            rows[task_id] = row._replace(attempts=attempts, not_before=not_before, dead=dead, last_error=last_error)
    elif kind == "del":
        rows.pop(op[1], None)
    elif kind == "lease":
        _, task_id, delivery, until = op
        row = rows.get(task_id)
        if row is not None:
            rows[task_id] = row._replace(lease_delivery=delivery, lease_until=until)
    else:
        raise ValueError(f"unknown journal op {kind!r}")
