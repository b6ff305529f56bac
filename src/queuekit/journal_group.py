"""Group commit, shared by the durable journals (SQLite, PostgreSQL).

The broker appends ops under its lock (no I/O); one writer thread takes everything queued so far,
applies it in one transaction and commits, then wakes every put that was waiting for it. Producers
that arrive while a commit is in progress share the next one, so durability costs one commit per
batch of concurrent puts, not one per task. A put's ``wait`` runs the commit itself when none is
running (no hand-off to the writer thread and back); acks and nacks nobody waits for are written
behind by the writer, after a short delay that usually lets a put's commit carry them along.
``when_committed`` is the put's wait without blocking (the server's loop, when the journal
``commits_in_background``): the writer commits at once, skipping that delay, and calls back.

A subclass supplies ``_commit(batch)`` (one transaction, raising one of ``_commit_errors`` on
failure) and may override ``_housekeeping()`` (run by the writer between commits, e.g. vacuum).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from . import logs
from .journal import Journal, JournalError, JournalOp

WRITE_BEHIND_DELAY = 0.02  # write-behind ops wait this long for a put to carry them in its commit
HOUSEKEEPING_EVERY = 10.0  # seconds between housekeeping passes
_log = logs.get("journal")


class GroupCommitJournal(Journal):
    durable = True
    _commit_errors: tuple[type[BaseException], ...] = ()

    def _start_group_commit(self) -> None:
        """Call at the end of the subclass's ``__init__``, once its connection is open."""
        self._cond = threading.Condition()  # guards the pending ops and sequence numbers
        self._db_lock = threading.Lock()  # guards the connection
        self._pending: list[JournalOp] = []
        self._seq = 0  # last sequence number handed out by append
        self._committed = 0
        self._committing = False  # a thread is running a commit (the leader)
        self._writer_idle = False  # the writer thread sleeps until the next append
        self._error: BaseException | None = None
        # when_committed: (seq, done) in seq order, called once the commit reached seq or failed
        self._callbacks: list[tuple[int, Callable[[BaseException | None], object]]] = []
        self._closing = False
        self._next_housekeeping = time.monotonic() + HOUSEKEEPING_EVERY
        self.commits = 0
        self._writer = threading.Thread(target=self._write_loop, name="journal-writer", daemon=True)
        self._writer.start()

    # -- what the subclass implements -------------------------------------------------------

    def _commit(self, batch: list[JournalOp]) -> None:
        raise NotImplementedError

    def _housekeeping(self) -> None:
        """Runs with the connection lock held, every ``HOUSEKEEPING_EVERY`` seconds."""

    def _failed(self, error: BaseException) -> None:
        """A commit failed: the journal is unhealthy from now on (hook for subclasses)."""

    # -- the contract -----------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._error is None

    def append(self, ops: list[JournalOp]) -> int:
        with self._cond:
            self._pending.extend(ops)
            self._seq += 1
            if self._writer_idle:  # otherwise it is busy or already counting down to a commit
                self._cond.notify_all()
            return self._seq

    def wait(self, seq: int, timeout: float | None = None) -> None:
        """Return once ``seq`` is committed. If no commit is running, the caller runs it itself
        (leader): a lone producer then pays no hand-off to the writer thread and back."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._committed < seq:
                if self._error is not None:
                    raise self._failure()
                if not self._committing:
                    self._lead()
                    continue
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise JournalError(f"journal commit did not finish within {timeout} s")
                self._cond.wait(remaining)

    def when_committed(self, seq: int, done: Callable[[BaseException | None], object]) -> None:
        """``done(None)`` once ``seq`` is committed, ``done(JournalError)`` if that failed; it runs
        on the thread that committed (the writer, at once: no write-behind delay for a put)."""
        with self._cond:
            if self._committed < seq and self._error is None:
                self._callbacks.append((seq, done))
                self._cond.notify_all()
                return
            error = self._failure() if self._committed < seq else None
        done(error)

    def _failure(self) -> JournalError:
        return JournalError(f"journal commit failed, nothing was stored: {self._error}")

    def _call_back(self) -> None:
        """Run the ``when_committed`` callbacks that are due (condition held). ``done`` must not
        block: the server's loop only posts to its own queue."""
        callbacks = self._callbacks
        if not callbacks:
            return
        if self._error is not None:
            error = self._failure()
            self._callbacks = []
            for _, done in callbacks:
                done(error)
            return
        n = 0
        while n < len(callbacks) and callbacks[n][0] <= self._committed:
            n += 1
        if n:
            self._callbacks = callbacks[n:]
            for _, done in callbacks[:n]:
                done(None)

    def flush(self, timeout: float | None = None) -> None:
        with self._cond:
            seq = self._seq
        try:
            self.wait(seq, timeout)
        except JournalError as e:
            _log.error("journal_flush_failed", error=str(e))

    def _stop_writer(self) -> bool:
        """Stop the writer after it committed what is pending; True if the journal is still healthy."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._writer.join(timeout=10)
        return self._error is None and not self._writer.is_alive()

    # -- writer -----------------------------------------------------------------------------

    def _write_loop(self) -> None:
        """Commits what nobody waits for (acks, nacks: written behind) and does housekeeping."""
        with self._cond:
            while self._error is None:
                if not self._pending and not self._closing and time.monotonic() < self._next_housekeeping:
                    self._writer_idle = True
                    self._cond.wait(1.0)
                    self._writer_idle = False
                    continue
                if self._closing and not self._pending:
                    return
                # Let write-behind ops wait a little: usually a put's commit carries them along
                # (one transaction instead of two). A put waiting through when_committed does not.
                until = time.monotonic() + WRITE_BEHIND_DELAY
                while (
                    self._pending
                    and not self._callbacks
                    and not self._closing
                    and (left := until - time.monotonic()) > 0
                ):
                    self._cond.wait(left)
                if self._committing:
                    self._cond.wait(WRITE_BEHIND_DELAY)
                elif self._pending or time.monotonic() >= self._next_housekeeping:
                    self._lead()

    def _lead(self) -> None:
        """Commit everything pending (called with the condition held; released meanwhile, so
        producers keep appending and their ops form the next group commit)."""
        batch, self._pending = self._pending, []
        upto = self._seq
        self._committing = True
        self._cond.release()
        try:
            with self._db_lock:
                if batch:
                    self._commit(batch)
                    self.commits += 1
                if time.monotonic() >= self._next_housekeeping:
                    self._next_housekeeping = time.monotonic() + HOUSEKEEPING_EVERY
                    self._housekeeping()
            error = None
        except self._commit_errors as e:
            error = e
            _log.error("journal_failed", journal=self.description, error=f"{type(e).__name__}: {e}")
            self._failed(e)
        finally:
            self._cond.acquire()
        self._committing = False
        if error is None:
            self._committed = max(self._committed, upto)
            self._call_back()
            self._cond.notify_all()
        else:
            self._fail(error)

    def _fail(self, error: BaseException) -> None:
        """The journal is failed for good (condition held): waiting puts get a JournalError."""
        if self._error is None:
            self._error = error
        self._call_back()
        self._cond.notify_all()
