"""The durable journal: SQLite in WAL mode, one database file in the data directory.

Group commit (queuekit.journal_group): everything appended since the last commit goes into one
transaction, committed (fsync per ``sync`` mode) before the puts waiting for it are answered.

``sync=full``  — SQLite ``synchronous=FULL``: the WAL is fsynced at every commit; an acknowledged
                 put survives power loss.
``sync=normal`` — ``synchronous=NORMAL``: fsync only at checkpoints; survives a crash of the
                 process or container, but the last commits can be lost on power loss.

Safety: the database is validated with reads before anything is written to it (a foreign or
corrupt file, or one from a newer schema, is refused and left untouched), and a lock file keeps a
second server off the same directory. The database, its -wal and -shm files and the lock file are
created 0600 and a directory the server creates 0700 (an existing one keeps its mode). SQLite WAL
needs shared memory between processes on one host, so the directory must not be on a network
filesystem (NFS, SMB).
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import json
import os
import sqlite3
import stat
import time
from collections.abc import Iterator

from . import logs
from .errors import DataDirError
from .journal import CancelOp, DeleteOp, FinishOp, JournalOp, LeaseOp, PutOp, Recovered, StoredTask, UpdateOp
from .journal_group import GroupCommitJournal

DB_NAME = "queuekit.db"
LOCK_NAME = "queuekit.lock"
SCHEMA_VERSION = 2
APPLICATION_ID = 0x716B6A31  # "qkj1": marks the file as a queuekit journal
TASK_COLUMNS_V1 = {
    "id",
    "queue",
    "payload",
    "attempts",
    "enqueued_at",
    "not_before",
    "dead",
    "last_error",
    "lease_delivery",
    "lease_until",
}
# Schema 2 (task lifecycle): headers, per-task timeout and the cancel flag of live tasks, and a
# table of finished tasks (their status and result) until the result store evicts them. A finished
# task moves there (its payload left behind), so that the pages of acked payloads are freed as
# before. Added to a version 1 file in place.
_V2_COLUMNS = (
    ("headers", "TEXT"),  # JSON object of str -> str, NULL: none
    ("timeout", "REAL"),
    ("cancel_requested", "INTEGER NOT NULL DEFAULT 0"),
)
TASK_COLUMNS = TASK_COLUMNS_V1 | {name for name, _ in _V2_COLUMNS}
_log = logs.get("journal")

_SCHEMA = """
CREATE TABLE tasks (
    id          INTEGER PRIMARY KEY,
    queue       TEXT    NOT NULL,
    payload     TEXT    NOT NULL,
    attempts    INTEGER NOT NULL,
    enqueued_at REAL    NOT NULL,
    not_before  REAL    NOT NULL DEFAULT 0,
    dead        INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    lease_delivery INTEGER,          -- these two are set only by a graceful shutdown,
    lease_until    REAL              -- and cleared when the next start has read them
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""
_MIGRATE_V2 = "".join(f"ALTER TABLE tasks ADD COLUMN {name} {decl};\n" for name, decl in _V2_COLUMNS) + (
    """CREATE TABLE finished (
    id          INTEGER PRIMARY KEY,
    queue       TEXT    NOT NULL,
    attempts    INTEGER NOT NULL,
    enqueued_at REAL    NOT NULL,
    last_error  TEXT,
    headers     TEXT,
    timeout     REAL,
    state       TEXT    NOT NULL,   -- 'succeeded' or 'cancelled'
    finished_at REAL    NOT NULL,
    started_at  REAL,
    consumer    TEXT,
    result      TEXT              -- JSON text; NULL: none
);
"""
)


class SqliteJournal(GroupCommitJournal):
    _commit_errors = (sqlite3.Error,)
    keeps_finished = True

    def __init__(self, data_dir: str, sync: str = "full"):
        if sync not in ("full", "normal"):
            raise ValueError(f"sync must be full or normal, not {sync!r}")
        self.data_dir = data_dir
        self.path = os.path.join(data_dir, DB_NAME)
        self.sync = sync
        self.description = f"sqlite:{self.path}"
        self._lock_fd = _prepare_dir(data_dir)
        try:
            self._db = _open(self.path, sync)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._start_group_commit()

    def load(self) -> Recovered:
        with self._db_lock:
            rows = self._db.execute(
                "SELECT queue, id, payload, attempts, enqueued_at, not_before, dead, last_error, lease_delivery, "
                "lease_until, headers, timeout, NULL, NULL, NULL, NULL, NULL, cancel_requested FROM tasks "
                "UNION ALL SELECT queue, id, '', attempts, enqueued_at, 0, 0, last_error, NULL, NULL, headers, "
                "timeout, state, finished_at, started_at, consumer, result, 0 FROM finished ORDER BY id"
            ).fetchall()
            next_id = (self._db.execute("SELECT value FROM meta WHERE key='next_id'").fetchone() or (0,))[0]
            with self._db:  # saved leases are restored once
                self._db.execute(
                    "UPDATE tasks SET lease_delivery = NULL, lease_until = NULL WHERE lease_until IS NOT NULL"
                )
        return Recovered(
            [
                StoredTask(q, i, p, a, e, nb, bool(d), le, ld, lu, _headers(h), t, st, fin, sta, con, res, bool(cr))
                for q, i, p, a, e, nb, d, le, ld, lu, h, t, st, fin, sta, con, res, cr in rows
            ],
            next_id,
        )

    def close(self) -> None:
        try:
            if self._stop_writer():
                self._db.executescript("PRAGMA incremental_vacuum;")  # every free page, not a slice
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            self._db.close()
        finally:
            os.close(self._lock_fd)

    def _commit(self, batch: list[JournalOp]) -> None:
        db = self._db
        max_id = None
        with db:  # one transaction; commits (and fsyncs per the sync mode) on exit
            # Runs of ops of one kind become one statement each (the order between kinds is kept).
            for kind, group in itertools.groupby(batch, key=type):
                ops: list = list(group)
                if kind is PutOp:
                    rows = []
                    for op in ops:
                        headers = None if op.headers is None else json.dumps(op.headers, separators=(",", ":"))
                        rows += [
                            (op.queue, task_id, payload, 0, op.enqueued_at, op.not_before, headers, op.timeout)
                            for task_id, payload in enumerate(op.payloads, op.first_id)
                        ]
                    if not rows:
                        continue
                    # Multi-row statements: one step per chunk instead of one per task.
                    for chunk in _chunks(rows, 100):
                        db.execute(_insert_sql(len(chunk)), [value for row in chunk for value in row])
                    max_id = max(max_id or 0, max(r[1] for r in rows))
                elif kind is UpdateOp:
                    db.executemany(
                        "UPDATE tasks SET attempts = ?, not_before = ?, dead = ?, last_error = ? WHERE id = ?",
                        [(op.attempts, op.not_before, int(op.dead), op.last_error, op.id) for op in ops],
                    )
                elif kind is DeleteOp:
                    ids = [task_id for op in ops for task_id in op.ids]
                    for chunk in _chunks(ids, 500):
                        db.execute(_delete_sql("tasks", len(chunk)), chunk)
                        db.execute(_delete_sql("finished", len(chunk)), chunk)
                elif kind is LeaseOp:
                    db.executemany(
                        "UPDATE tasks SET lease_delivery = ?, lease_until = ? WHERE id = ?",
                        [(op.delivery, op.until, op.id) for op in ops],
                    )
                elif kind is FinishOp:
                    # The task's status moves to the finished table until evicted (a DeleteOp).
                    db.executemany(
                        "INSERT OR REPLACE INTO finished (id, queue, attempts, enqueued_at, last_error, headers, "
                        "timeout, state, finished_at, started_at, consumer, result) SELECT id, queue, attempts, "
                        "enqueued_at, last_error, headers, timeout, ?, ?, ?, ?, ? FROM tasks WHERE id = ?",
                        [
                            (op.state, op.finished_at, started, consumer, (op.results or {}).get(task_id), task_id)
                            for op in ops
                            for task_id, started, consumer in zip(op.ids, op.started_at, op.consumers, strict=True)
                        ],
                    )
                    ids = [task_id for op in ops for task_id in op.ids]
                    for chunk in _chunks(ids, 500):
                        db.execute(_delete_sql("tasks", len(chunk)), chunk)
                elif kind is CancelOp:
                    db.executemany(
                        "UPDATE tasks SET cancel_requested = 1 WHERE id = ?",
                        [(task_id,) for op in ops for task_id in op.ids],
                    )
                else:
                    raise sqlite3.ProgrammingError(f"unknown journal op {kind!r}")
            if max_id is not None:
                db.execute(
                    "INSERT INTO meta (key, value) VALUES ('next_id', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
                    (max_id + 1,),
                )

    def _housekeeping(self) -> None:
        """Give the pages of deleted tasks back to the filesystem, a slice at a time."""
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        if free > 256:
            # executescript steps the pragma to completion; execute() would free a single page.
            self._db.executescript("PRAGMA incremental_vacuum(4096);")


def _chunks(rows: list, size: int) -> Iterator[list]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


@functools.lru_cache(maxsize=128)
def _insert_sql(n: int) -> str:
    values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * n)
    return (
        f"INSERT INTO tasks (queue, id, payload, attempts, enqueued_at, not_before, headers, timeout) VALUES {values}"
    )


def _headers(text: str | None) -> dict[str, str] | None:
    return None if text is None else json.loads(text)


@functools.lru_cache(maxsize=128)
def _delete_sql(table: str, n: int) -> str:
    return f"DELETE FROM {table} WHERE id IN ({', '.join(['?'] * n)})"


def _prepare_dir(data_dir: str) -> int:
    """Create/check the directory and take its lock. Returns the lock file descriptor."""
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataDirError(
            f"data directory {data_dir} is a file, not a directory: point QUEUEKIT_DATA_DIR at a directory"
        )
    try:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)  # a directory that exists keeps its mode
    except OSError as e:
        raise DataDirError(f"cannot create data directory {data_dir}: {e.strerror}") from None
    _warn_if_others_can_write(data_dir)
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise DataDirError(
            f"data directory {data_dir} is not writable by uid {os.getuid()}: fix its owner or mode "
            f"(the images run as uid 10001)"
        )
    db_path = os.path.join(data_dir, DB_NAME)
    if os.path.exists(db_path) and not os.path.isfile(db_path):
        raise DataDirError(f"{db_path} exists but is not a regular file; nothing was changed")
    try:
        fd = os.open(os.path.join(data_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise DataDirError(f"cannot create the lock file in {data_dir}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise DataDirError(
            f"another queuekit server is using {data_dir} (its lock is held); two servers must never share a journal"
        ) from None
    return fd


def _warn_if_others_can_write(data_dir: str) -> None:
    """Someone else who can write the directory can replace the journal: say so (the server still
    starts). Group-writable by the server's own group is fine: a Kubernetes fsGroup volume is."""
    st = os.stat(data_dir)
    group_other = st.st_mode & stat.S_IWGRP and st.st_gid != os.getegid()
    if st.st_mode & stat.S_IWOTH or group_other:
        _log.warning(
            "data_dir_writable_by_others",
            dir=data_dir,
            mode=oct(stat.S_IMODE(st.st_mode)),
            hint=f"users other than uid {os.geteuid()} can replace the journal: chmod 700 it",
        )


def _create_private(path: str) -> None:
    """Create the database file 0600 before SQLite opens it: SQLite would create it 0644 (under the
    usual umask), and it gives its -wal and -shm files the database file's mode."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass
    except OSError as e:
        raise DataDirError(f"cannot create journal {path}: {e.strerror}") from None


def _open(path: str, sync: str) -> sqlite3.Connection:
    existed = os.path.exists(path) and os.path.getsize(path) > 0
    if existed:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            _log.warning(
                "journal_readable_by_others",
                path=path,
                mode=oct(mode),
                hint="created by an older queuekit; chmod 600 it (its -wal and -shm files take its mode)",
            )
    else:
        _create_private(path)
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as e:
        raise DataDirError(f"cannot open journal {path}: {e}") from None
    try:
        db.isolation_level = "DEFERRED"  # `with db:` opens and commits a transaction
        if existed:
            version = _validate(db, path)
        else:
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # must precede WAL mode and the first table
        db.execute("PRAGMA journal_mode=WAL").fetchone()
        db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
        db.execute("PRAGMA journal_size_limit=67108864")  # truncate the WAL back to 64 MiB after checkpoints
        if not existed:
            with db:
                db.executescript(_SCHEMA + _MIGRATE_V2)
                db.execute(f"PRAGMA application_id={APPLICATION_ID}")
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version == 1:
            _migrate_v2(db, path)
        # Prove we can write (a read-only file or filesystem fails here, not at the first put).
        with db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('opened_at', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (int(time.time()),),
            )
    except DataDirError:
        db.close()
        raise
    except sqlite3.Error as e:
        db.close()
        raise DataDirError(f"journal {path} cannot be used: {type(e).__name__}: {e}; nothing was changed") from None
    return db


def _migrate_v2(db: sqlite3.Connection, path: str) -> None:
    """Schema 1 -> 2 in place, in one transaction (all or nothing): the new columns, NULL/0 for
    the tasks already there, which keep everything they had."""
    # executescript would commit first; the statements run one by one inside BEGIN ... COMMIT.
    db.execute("BEGIN IMMEDIATE")
    try:
        for statement in _MIGRATE_V2.strip().split(";\n"):
            db.execute(statement.rstrip(";"))
        db.execute("PRAGMA user_version=2")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    _log.info("journal_migrated", path=path, schema_from=1, schema_to=2)


def _validate(db: sqlite3.Connection, path: str) -> int:
    """Reads only: refuse anything that is not an intact queuekit journal we understand. Returns
    its schema version."""
    where = f"journal {path}"
    hint = "move it away or point QUEUEKIT_DATA_DIR at another directory; nothing was changed"
    try:
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
        raise DataDirError(f"{where} is not an SQLite database or is corrupt ({e}): {hint}") from None
    if app_id == APPLICATION_ID and {"tasks", "meta"} <= tables:
        columns = {r[1] for r in db.execute("PRAGMA table_info(tasks)")}
        missing = (TASK_COLUMNS_V1 if version <= 1 else TASK_COLUMNS) - columns
        if version >= 2 and "finished" not in tables:
            missing.add("(table finished)")
        if missing and version <= SCHEMA_VERSION:
            raise DataDirError(
                f"{where} lacks columns {sorted(missing)} of schema {SCHEMA_VERSION}: it was written by "
                f"a development build; {hint}"
            )
    if app_id != APPLICATION_ID or not {"tasks", "meta"} <= tables:
        raise DataDirError(
            f"{where} is an SQLite database but not a queuekit journal "
            f"(application_id={app_id:#x}, tables={sorted(tables)}): {hint}"
        )
    if version > SCHEMA_VERSION:
        raise DataDirError(
            f"{where} was written by a newer queuekit (schema {version}; this version reads up to "
            f"{SCHEMA_VERSION}): upgrade queuekit; nothing was changed"
        )
    try:
        check = db.execute("PRAGMA quick_check").fetchall()
    except sqlite3.DatabaseError as e:
        raise DataDirError(f"{where} is corrupt ({e}): {hint}") from None
    if check != [("ok",)]:
        raise DataDirError(f"{where} failed its integrity check ({'; '.join(r[0] for r in check[:3])}): {hint}")
    return version
