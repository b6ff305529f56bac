"""Leadership among servers that share a PostgreSQL journal: one leader, fenced standbys.

Every server pointed at the same database opens its own :class:`~queuekit.journal_postgres.
PostgresJournal`, whose ONE session carries every journal write. The leader is the server whose
session holds ``pg_try_advisory_lock(LEADER_LOCK_KEY)``; PostgreSQL frees the lock only when that
session ends, and the session is never reconnected, so a server that lost its session (database
restart, network cut, a standby fencing it) cannot commit anything any more.

The leader proves it is alive by renewing a heartbeat row (``queuekit_leader``: epoch, holder,
backend pid, ``renewed_at`` in the database's clock) every probe interval, and keeps a local
monotonic deadline: the start of the last successful renewal plus the lease. Past that deadline it
serves nothing (the server checks :meth:`Election.valid` before every request), whatever its
threads are doing: a process frozen by SIGSTOP or ``docker pause`` wakes up past its deadline.

A frozen leader's TCP session stays open (its kernel still answers keepalives), so PostgreSQL keeps
its lock for ever. A standby therefore fences: when the heartbeat of the lock's holder is older
than the lease (the database's clock, so the hosts' clocks do not matter), it terminates the
holder's backend (``pg_terminate_backend``; allowed for sessions of the same role, otherwise it
needs ``pg_signal_backend``), takes the lock and bumps the epoch. The old leader's deadline ended
no later than its heartbeat went stale (the deadline counts from before the renewal was sent), so
it stopped serving before the standby started.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from . import logs

LEADER_LOCK_KEY = 0x716B6A32  # "qkj2": pg_try_advisory_lock key of the leader's session
TABLE_LOCK_KEY = 0x716B6A31  # the journal's schema lock (journal_postgres.SCHEMA_LOCK_KEY): creating our table
FENCE_WAIT_MS = 5000  # how long pg_terminate_backend waits for the fenced backend to exit
LOCK_RETRY_SECONDS = 2.0  # after fencing, how long the lock is retried (the backend's exit frees it)
# Why a term ends (Election.lost_reason; /metrics queuekit_leader_stepdowns_total{reason}), a fixed set.
STEPDOWN_REASONS = (
    "lease_expired",  # the deadline passed before a renewal (frozen, stalled)
    "probe_failed",  # the heartbeat's query failed (the session is gone)
    "probe_slow",  # the heartbeat took longer than the lease
    "superseded",  # another server took over (the epoch changed)
    "session_failed",  # the journal's session failed (a write, a commit)
    "start_failed",  # loading the state after winning failed
)

_TABLE = (
    "CREATE TABLE IF NOT EXISTS queuekit_leader ("
    "id smallint PRIMARY KEY CHECK (id = 1), epoch bigint NOT NULL, holder text NOT NULL, "
    "pid integer NOT NULL, renewed_at timestamptz NOT NULL)"
)
# The backend holding the leader lock in this database, and the heartbeat row (which may belong to
# an older leader: the pids tell). A bigint advisory key shows as classid (high half), objid (low).
_HOLDER = (
    "SELECT l.pid, h.pid, h.holder, EXTRACT(EPOCH FROM now() - h.renewed_at)::float8 FROM pg_locks l "
    "LEFT JOIN queuekit_leader h ON h.id = 1 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND l.classid::bigint = %s AND l.objid::bigint = %s"
)
_RENEW = (
    "UPDATE queuekit_leader SET renewed_at = now() WHERE id = 1 AND epoch = %s AND pid = pg_backend_pid() "
    "RETURNING epoch"
)

_log = logs.get("server")


class Session(Protocol):
    """What leadership needs of the journal (queuekit.journal_postgres.PostgresJournal)."""

    backend_pid: int

    def session(self) -> Any: ...  # a context manager yielding the psycopg connection, under its lock

    def try_advisory_lock(self, key: int) -> bool: ...


class Term(NamedTuple):
    """One leadership term, as it began."""

    epoch: int
    previous_holder: str | None  # the leader before (None: the first leader of this database)
    since_heartbeat: float | None  # seconds from the previous leader's last heartbeat to the takeover
    fenced_pid: int | None  # the backend terminated to take over (a frozen or cut-off leader's)


class Election:
    """One journal session's part in the election: :meth:`attempt` while standby (until it returns
    a :class:`Term`), then :meth:`renew` every probe interval while it returns True.
    ``holder`` names this server in the heartbeat row and the logs (host and pid)."""

    def __init__(self, journal: Session, holder: str, lease: float, clock: Callable[[], float] = time.monotonic):
        self.journal = journal
        self.holder = holder
        self.lease = lease
        self.clock = clock
        self.term: Term | None = None
        self.deadline = -math.inf  # serve only before this (monotonic)
        self.lost: str | None = None  # why the term ended
        self.lost_reason: str | None = None  # the same as one of STEPDOWN_REASONS
        self._first_seen: tuple[int, float] | None = None  # a lock holder without its heartbeat, since when
        with journal.session() as db, db.transaction():
            # Servers starting together: serialised with the journal's own schema creation.
            db.execute("SELECT pg_advisory_xact_lock(%s)", (TABLE_LOCK_KEY,))
            db.execute(_TABLE)

    def valid(self) -> bool:
        """This server leads right now: a term, not lost, its deadline not passed."""
        return self.term is not None and self.lost is None and self.clock() < self.deadline

    # -- standby ------------------------------------------------------------------------------

    def attempt(self) -> Term | None:
        """One round as a standby: take the lock if it is free, or fence a holder whose heartbeat
        is older than the lease and take it then. Returns the new term, or None (someone leads).
        Raises what the session raises (the journal is broken then: open a new one)."""
        started = self.clock()
        fenced = None
        if not self.journal.try_advisory_lock(LEADER_LOCK_KEY):
            fenced = self._fence_if_stale()
            if fenced is None or not self._lock_after_fencing():
                return None
        return self._begin(started, fenced)

    def _fence_if_stale(self) -> int | None:
        """Terminate the lock holder's backend when its heartbeat is older than the lease.
        Returns the pid fenced, or None."""
        key = LEADER_LOCK_KEY
        with self.journal.session() as db:
            row = db.execute(_HOLDER, (key >> 32, key & 0xFFFFFFFF)).fetchone()
        if row is None:
            return None  # freed meanwhile: the next round takes it
        lock_pid, beat_pid, beat_holder, age = row
        if lock_pid != beat_pid:
            # The holder has not written its heartbeat yet (it is taking over, or froze right
            # after taking the lock): give it a lease from when we first saw it.
            now = self.clock()
            if self._first_seen is None or self._first_seen[0] != lock_pid:
                self._first_seen = (lock_pid, now)
            age = now - self._first_seen[1]
            beat_holder = None
        if age is None or age <= self.lease:
            return None
        with self.journal.session() as db:
            db.execute("SELECT pg_terminate_backend(%s, %s)", (lock_pid, FENCE_WAIT_MS)).fetchone()
        _log.warning(
            "leader_fenced",
            pid=lock_pid,
            holder=beat_holder,
            heartbeat_age=round(age, 3),
            lease=self.lease,
            detail="the leader's heartbeat is older than the lease: its database session was terminated",
        )
        return lock_pid

    def _lock_after_fencing(self) -> bool:
        deadline = self.clock() + LOCK_RETRY_SECONDS
        while not self.journal.try_advisory_lock(LEADER_LOCK_KEY):
            if self.clock() >= deadline:
                return False  # another standby was faster, or the backend is slow to go
            time.sleep(0.05)
        return True

    def _begin(self, started: float, fenced: int | None) -> Term:
        """We hold the lock: bump the epoch and write our heartbeat in one transaction."""
        with self.journal.session() as db, db.transaction():
            db.execute(
                "INSERT INTO queuekit_leader VALUES (1, 0, '', 0, now()) ON CONFLICT (id) DO NOTHING",
            )
            row = db.execute(
                "SELECT epoch, holder, EXTRACT(EPOCH FROM now() - renewed_at)::float8 "
                "FROM queuekit_leader WHERE id = 1 FOR UPDATE"
            ).fetchone()
            epoch, previous, age = row[0] + 1, row[1] or None, row[2]
            db.execute(
                "UPDATE queuekit_leader SET epoch = %s, holder = %s, pid = pg_backend_pid(), renewed_at = now() "
                "WHERE id = 1",
                (epoch, self.holder),
            )
        self.deadline = started + self.lease
        self.term = Term(epoch, previous, round(age, 3) if previous else None, fenced)
        return self.term

    # -- leader -------------------------------------------------------------------------------

    def renew(self) -> bool:
        """Renew the heartbeat and the deadline; False (and :attr:`lost` says why) when this
        server must step down: the deadline passed, the session failed, another epoch began."""
        assert self.term is not None
        started = self.clock()
        if started >= self.deadline:
            return self.lose(f"lease expired {started - self.deadline:.3f} s ago (frozen or stalled?)", "lease_expired")
        try:
            with self.journal.session() as db:
                row = db.execute(_RENEW, (self.term.epoch,)).fetchone()
        except Exception as e:  # the session is gone: we cannot commit anything any more
            return self.lose(
                f"probe failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}", "probe_failed"
            )
        if row is None:
            return self.lose("another server took over (epoch changed)", "superseded")
        if self.clock() >= started + self.lease:
            return self.lose("the probe took longer than the lease", "probe_slow")
        self.deadline = started + self.lease
        return True

    def lose(self, why: str, reason: str) -> bool:
        """End the term (the first call says why: ``why`` for the log, ``reason`` one of
        :data:`STEPDOWN_REASONS`); returns False."""
        if reason not in STEPDOWN_REASONS:
            raise ValueError(f"unknown step-down reason {reason!r}: one of {', '.join(STEPDOWN_REASONS)}")
        if self.lost is None:
            self.lost, self.lost_reason = why, reason
        return False
