"""The PostgreSQL journal: the broker's state in two tables of a PostgreSQL database, so that any
server pointed at the database can load it (standby servers, issue 14).

Same contract and group commit as the SQLite journal (queuekit.journal, queuekit.journal_group):
everything appended since the last commit goes into one transaction, sent in one round trip
(pipeline mode; each run of ops of one kind is one statement over arrays, so a batch of puts is one
INSERT whatever its size), and a put is answered after its COMMIT returned. How durable a COMMIT
is belongs to the database: ``synchronous_commit`` (``on`` by default: flushed to the primary's
WAL; with synchronous standbys, also on a standby). Acks, nacks and the rest are written behind.

The session: ONE connection, opened at start, carries every write (and the leadership queries of
queuekit.leader). It is never reconnected: once it fails, the journal is unhealthy for good and
``broken`` is set, because a new session would not hold the advisory lock (leadership) the old one
held. To go on, a server opens a new journal.

Schema (in the session's ``search_path``, normally ``public``): ``queuekit_meta(key, value)`` with
``application`` (marks the tables as ours), ``schema_version`` and ``next_id``; ``queuekit_tasks``
(one row per stored task). Creating, migrating and validating happen in one transaction under a
transaction-scoped advisory lock, so servers starting together do not race; a foreign schema (our
table names without our marker) or a newer one is refused and left untouched (exit 6).

The password never travels in the URL: a URL holding one is refused; it comes from a file
(QUEUEKIT_JOURNAL_PASSWORD_FILE) and is handed to libpq apart from the URL.

psycopg (3) is an optional extra (``pip install queuekit[postgres]``), imported when a journal URL
is used: the embedded default stays standard-library only.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import logs
from .errors import ConfigError, DataDirError, ExitCode, QueuekitError
from .journal import CancelOp, DeleteOp, FinishOp, JournalOp, LeaseOp, PutOp, Recovered, StoredTask, UpdateOp
from .journal_group import GroupCommitJournal
from .settings import Secret

SCHEMA_VERSION = 2
APPLICATION_ID = 0x716B6A31  # "qkj1", as the SQLite journal's application_id
SCHEMA_LOCK_KEY = APPLICATION_ID  # pg_advisory_xact_lock key serialising schema creation/migration
TASK_COLUMNS = set(StoredTask._fields)  # the table holds every field of the contract's record
EXTRA_HINT = "install the PostgreSQL extra: pip install 'queuekit[postgres]' (the server image has it)"
_log = logs.get("journal")

# Schema 1. A new database gets it and then every migration step, so that a new database and a
# migrated one are the same by construction.
_SCHEMA = [
    "CREATE TABLE queuekit_meta (key text PRIMARY KEY, value bigint NOT NULL)",
    """CREATE TABLE queuekit_tasks (
        id             bigint PRIMARY KEY,
        queue          text NOT NULL,
        payload        text NOT NULL,
        attempts       integer NOT NULL,
        enqueued_at    double precision NOT NULL,
        not_before     double precision NOT NULL DEFAULT 0,
        dead           boolean NOT NULL DEFAULT false,
        last_error     text,
        lease_delivery bigint,           -- these two are set only by a graceful shutdown,
        lease_until    double precision  -- and cleared when the next start has read them
    )""",
]
# Steps from schema N to N + 1, run in the opening transaction.
MIGRATIONS: dict[int, list[str]] = {
    # 2 (issue 13): headers and per-task timeout; finished tasks keep their row (state, times, the
    # consumer, the result) until evicted; the cancel flag of an in-flight task.
    1: [
        "ALTER TABLE queuekit_tasks ADD COLUMN headers text, ADD COLUMN timeout double precision, "
        "ADD COLUMN state text, ADD COLUMN finished_at double precision, ADD COLUMN started_at double precision, "
        "ADD COLUMN consumer text, ADD COLUMN result text, ADD COLUMN cancel_requested boolean NOT NULL DEFAULT false"
    ],
}

# The two statements of the hot path (a put, an ack) take their rows as ONE JSON parameter
# (json.dumps is C; PostgreSQL parses JSON in C): psycopg dumps a list parameter element by
# element in Python, which cost about a third of a commit of 100 puts and 100 acks (2026-11-27:
# 3.9 ms against 2.5 ms per commit on a throwaway PostgreSQL). A put's tasks share everything but
# their payload, and their ids are consecutive.
_INSERT = (
    "INSERT INTO queuekit_tasks (queue, id, payload, attempts, enqueued_at, not_before, headers, timeout) "
    "SELECT %s, %s + u.n - 1, u.payload, 0, %s, %s, %s, %s "
    "FROM json_array_elements_text(%s::json) WITH ORDINALITY AS u(payload, n)"
)
_FINISH = (  # the columns side by side, one JSON array each (C-fast to encode, no object per row)
    "UPDATE queuekit_tasks t SET payload = '', state = u.state, finished_at = u.finished_at::double precision, "
    "started_at = u.started_at::double precision, consumer = u.consumer, result = u.result, "
    "lease_delivery = NULL, lease_until = NULL FROM ROWS FROM (json_array_elements_text(%s::json), "
    "json_array_elements_text(%s::json), json_array_elements_text(%s::json), json_array_elements_text(%s::json), "
    "json_array_elements_text(%s::json), json_array_elements_text(%s::json)) "
    "AS u(id, state, finished_at, started_at, consumer, result) WHERE t.id = u.id::bigint"
)
_CANCEL = "UPDATE queuekit_tasks SET cancel_requested = true WHERE id = ANY(%s::bigint[])"
_COLUMNS = ", ".join(StoredTask._fields)  # load() reads them in the record's order
_UPDATE = (
    "UPDATE queuekit_tasks t SET attempts = u.attempts, not_before = u.not_before, dead = u.dead, "
    "last_error = u.last_error FROM unnest(%s::bigint[], %s::integer[], %s::double precision[], %s::boolean[], "
    "%s::text[]) AS u(id, attempts, not_before, dead, last_error) WHERE t.id = u.id"
)
_LEASE = (
    "UPDATE queuekit_tasks t SET lease_delivery = u.delivery, lease_until = u.until "
    "FROM unnest(%s::bigint[], %s::bigint[], %s::double precision[]) AS u(id, delivery, until) WHERE t.id = u.id"
)
_DELETE = "DELETE FROM queuekit_tasks WHERE id = ANY(%s::bigint[])"
_NEXT_ID = "UPDATE queuekit_meta SET value = GREATEST(value, %s) WHERE key = 'next_id'"


class JournalUnavailable(QueuekitError):
    """The journal database cannot be reached or refused the login. The server does not start."""

    exit_code = ExitCode.UNAVAILABLE


def check_url(url: str) -> str:
    """Validate a journal URL (``postgresql://user@host:port/db?params``); returns it unchanged.
    Raises ConfigError, without echoing a password, when it is not one or holds a password."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            f"journal URL {redact_url(url)!r} must start with postgresql:// (e.g. postgresql://queuekit@db:5432/queuekit)"
        )
    query = urllib.parse.parse_qs(parts.query)
    if parts.password is not None or "password" in query:
        raise ConfigError(
            f"journal URL {redact_url(url)!r} holds a password: remove it (a URL shows in process lists, "
            "environment dumps and logs) and put the password in a file named by QUEUEKIT_JOURNAL_PASSWORD_FILE"
        )
    return url.strip()


def redact_url(url: str) -> str:
    """The URL with any password removed (what logs and errors show)."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            netloc = f"{userinfo.partition(':')[0]}:<redacted>@{hostport}" if ":" in userinfo else netloc
        query = "&".join(
            f"{k}=<redacted>" if k == "password" else f"{k}={v}"
            for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        )
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparsable URL>"


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise ConfigError(f"a PostgreSQL journal (QUEUEKIT_JOURNAL_URL) needs psycopg: {EXTRA_HINT}") from None
    return psycopg


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _text(value: str | None) -> str | None:
    """PostgreSQL text holds neither NUL nor lone surrogates; an error text from a client may."""
    if value is None:
        return None
    return value.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _finish_columns(ops: list[FinishOp]) -> tuple[str, ...]:
    """The parameters of ``_FINISH`` for a run of finish ops: six JSON arrays (id, state,
    finished_at, started_at, consumer, result), one row per task id, the last op for an id
    winning (``UPDATE ... FROM`` changes a row once, with an arbitrary one of its matches).
    State and finish time are the same for every task of an op: encoded once per op (json.dumps
    of a float is the costly part: 200 acks took 0.46 ms as one JSON object per row, 3-4x less so)."""
    ids: list[int] = []
    states: list[str] = []  # JSON texts
    finished: list[str] = []  # JSON texts
    started: list[float | None] = []
    consumers: list[str | None] = []
    results: list[str | None] = []
    for op in ops:
        n = len(op.ids)
        ids += op.ids
        states += [json.dumps(op.state)] * n
        finished += [json.dumps(op.finished_at)] * n
        started += op.started_at
        consumers += op.consumers
        results += [op.results.get(i) for i in op.ids] if op.results else [None] * n
    columns: list[list[Any]] = [ids, states, finished, started, consumers, results]
    if len(set(ids)) != len(ids):
        last = sorted({task_id: k for k, task_id in enumerate(ids)}.values())
        columns = [[column[k] for k in last] for column in columns]
    names = {name: _text(name) for name in set(columns[4])}  # a batch has few consumer names
    columns[4] = [names[name] for name in columns[4]]
    columns[5] = [_text(result) for result in columns[5]]
    # Tasks leased together share their start time: each distinct float is written out once.
    times = {t: json.dumps(t) for t in set(columns[3])}
    columns[3] = [times[t] for t in columns[3]]
    return tuple(
        f"[{','.join(column)}]" if k in (1, 2, 3) else json.dumps(column, ensure_ascii=False)
        for k, column in enumerate(columns)
    )


class PostgresJournal(GroupCommitJournal):
    keeps_finished = True  # schema 2: finished tasks keep their row (FinishOp, CancelOp)
    commits_in_background = True  # a commit is a round trip to the database (and its WAL flush)

    def __init__(
        self,
        url: str,
        password: Secret | None = None,
        *,
        connect_timeout: float = 10.0,
        keepalives_idle: int = 5,
        keepalives_interval: int = 2,
        keepalives_count: int = 3,
        tcp_user_timeout_ms: int = 10_000,
        application_name: str = "queuekit-server",
    ):
        psycopg = _psycopg()
        self.url = check_url(url)
        self.description = f"postgresql:{redact_url(self.url)}"
        self._commit_errors = (psycopg.Error,)
        # Set when the session failed: leadership (queuekit.leader) watches it.
        self.broken = threading.Event()
        # Monotonic start of the commit in progress (None between commits): a watchdog can see a
        # commit stuck on a frozen database without taking the connection's lock.
        self.commit_started: float | None = None
        extra = {"password": password.reveal().decode()} if password is not None else {}
        try:
            self._db = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=max(1, round(connect_timeout)),
                # A dead peer (host gone, cable cut) is noticed in seconds, not after the kernel's
                # two hours: keepalives while idle, tcp_user_timeout while data is unacknowledged.
                keepalives=1,
                keepalives_idle=keepalives_idle,
                keepalives_interval=keepalives_interval,
                keepalives_count=keepalives_count,
                tcp_user_timeout=tcp_user_timeout_ms,
                application_name=application_name,
                **extra,
            )
        except psycopg.Error as e:
            raise JournalUnavailable(f"cannot connect to the journal database {redact_url(self.url)}: {_one_line(e)}")
        try:
            self.backend_pid: int = self._db.info.backend_pid
            self._open_schema(psycopg)
            self._tune_session()
            setting = self._db.execute("SHOW synchronous_commit").fetchone()
            self.synchronous_commit = setting[0] if setting else "?"
        except BaseException:
            self._db.close()
            raise
        if self.synchronous_commit == "off":
            _log.warning(
                "journal_not_durable",
                journal=self.description,
                detail="synchronous_commit=off: the database acknowledges commits before they are flushed, so "
                "acknowledged puts can be lost in a database crash",
            )
        self._start_group_commit()

    # -- opening ------------------------------------------------------------------------------

    def _tune_session(self) -> None:
        """Two planner settings for the journal's session, whose statements (after the schema
        check) all reach rows by id: measured on a throwaway PostgreSQL, 2026-11-27.

        - ``plan_cache_mode = force_custom_plan``: psycopg prepares a statement from its 5th
          execution on, and PostgreSQL soon keeps that statement's generic plan, made while the
          tasks table was nearly empty, as the table grows: a commit of 100 puts and 100 acks took
          3.0, then 5.4, then 7.8 ms as the table grew by 30,000 rows at a time, a one-task commit
          7.6 ms; with custom plans 1.8 ms and 0.65 ms, flat (not prepared at all: 1.9 and 0.8 ms).
        - ``enable_seqscan = off``: for a table of up to some 40,000 rows the planner prices a
          sequential scan and a hash join below 100 index lookups (its random_page_cost assumes
          uncached pages), and the ack UPDATE then read the whole table: 4.2 ms for 100 acks on
          30,000 rows, against about 1 ms by index. Every journal statement names its rows by id;
          ``load()`` reads the table in id order, which the primary key's index serves as well.

        Set on the session, not through libpq's ``options``, which would replace the URL's own."""
        self._db.execute("SET enable_seqscan = off")
        try:
            self._db.execute("SET plan_cache_mode = force_custom_plan")
        except self._commit_errors:  # PostgreSQL before 12: no such setting; then never prepare
            self._db.prepare_threshold = None

    def _open_schema(self, psycopg: Any) -> None:
        """Create, migrate or validate the schema in one transaction (rolled back when refused)."""
        where = f"journal database {redact_url(self.url)}"
        hint = "point QUEUEKIT_JOURNAL_URL at another database (or schema, with options=-csearch_path=...)"
        try:
            with self._db.transaction():
                self._db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
                tables = {
                    r[0]
                    for r in self._db.execute(
                        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
                        "AND table_name IN ('queuekit_meta', 'queuekit_tasks')"
                    )
                }
                created = not tables
                if created:
                    for statement in _SCHEMA:
                        self._db.execute(statement)
                    self._db.execute(
                        "INSERT INTO queuekit_meta (key, value) VALUES ('application', %s), ('schema_version', 1), "
                        "('next_id', 0)",
                        (APPLICATION_ID,),
                    )
                    tables = {"queuekit_meta", "queuekit_tasks"}
                meta: dict[str, int] = {}
                if "queuekit_meta" in tables:
                    try:
                        meta = dict(self._db.execute("SELECT key, value FROM queuekit_meta"))
                    except psycopg.Error as e:
                        raise DataDirError(f"{where}: queuekit_meta is not a queuekit table ({_one_line(e)}): {hint}")
                if meta.get("application") != APPLICATION_ID or "queuekit_tasks" not in tables:
                    raise DataDirError(
                        f"{where} holds tables named {sorted(tables)} that are not a queuekit journal "
                        f"(no application marker {APPLICATION_ID:#x}); nothing was changed: {hint}"
                    )
                version = meta.get("schema_version", 0)
                if version > SCHEMA_VERSION:
                    raise DataDirError(
                        f"{where} was written by a newer queuekit (schema {version}; this version reads up to "
                        f"{SCHEMA_VERSION}): upgrade queuekit; nothing was changed"
                    )
                for step in range(version, SCHEMA_VERSION):
                    for statement in MIGRATIONS[step]:
                        self._db.execute(statement)
                    self._db.execute("UPDATE queuekit_meta SET value = %s WHERE key = 'schema_version'", (step + 1,))
                    if not created:
                        _log.info("journal_migrated", journal=self.description, schema=step + 1)
                columns = {
                    r[0]
                    for r in self._db.execute(
                        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                        "AND table_name = 'queuekit_tasks'"
                    )
                }
                if TASK_COLUMNS - columns:
                    raise DataDirError(
                        f"{where}: queuekit_tasks lacks columns {sorted(TASK_COLUMNS - columns)} of schema "
                        f"{SCHEMA_VERSION}; nothing was changed: {hint}"
                    )
                if created:
                    _log.info("journal_created", journal=self.description, schema=SCHEMA_VERSION)
        except psycopg.Error as e:
            raise DataDirError(f"{where} cannot be used: {_one_line(e)}; nothing was changed")

    # -- the contract -------------------------------------------------------------------------

    def load(self) -> Recovered:
        with self._session() as db:
            with db.transaction():
                rows = db.execute(f"SELECT {_COLUMNS} FROM queuekit_tasks ORDER BY id").fetchall()
                found = db.execute("SELECT value FROM queuekit_meta WHERE key = 'next_id'").fetchone()
                # Saved leases are restored once.
                db.execute(
                    "UPDATE queuekit_tasks SET lease_delivery = NULL, lease_until = NULL WHERE lease_until IS NOT NULL"
                )
        tasks = [StoredTask._make((*row[:10], json.loads(row[10]) if row[10] else None, *row[11:])) for row in rows]
        return Recovered(tasks, found[0] if found else 0)

    def close(self) -> None:
        try:
            self._stop_writer()
        finally:
            self._db.close()

    def _commit(self, batch: list[JournalOp]) -> None:
        self.commit_started = time.monotonic()
        try:
            self._write(batch)
        finally:
            self.commit_started = None

    def _write(self, batch: list[JournalOp]) -> None:
        db = self._db
        max_id = None
        # One round trip: the statements go out in one pipeline, and leaving it sends a Sync and
        # waits for every result (an error raises; the journal is then failed for good). On this
        # autocommit session the statements up to the Sync are ONE implicit transaction, committed
        # at the Sync (and rolled back whole if any fails: PostgreSQL's extended query protocol),
        # so no BEGIN/COMMIT statements (measured: 0.1 ms less per commit of 100 puts and 100
        # acks). Not psycopg's transaction(): it syncs on entry, a second round trip.
        with db.pipeline():
            # Runs of ops of one kind become one statement each (the order between kinds is kept).
            for kind, group in itertools.groupby(batch, key=type):
                ops: list = list(group)
                if kind is PutOp:
                    for op in ops:  # one statement per put call (its tasks share all but the payload)
                        if not op.payloads:
                            continue
                        headers = _text(json.dumps(op.headers)) if op.headers else None
                        values = (op.queue, op.first_id, op.enqueued_at, op.not_before, headers, op.timeout)
                        db.execute(_INSERT, (*values, json.dumps(op.payloads, ensure_ascii=False)))
                        max_id = max(max_id or 0, op.first_id + len(op.payloads) - 1)
                elif kind is UpdateOp:
                    # One UPDATE ... FROM changes a row once: the last op for an id wins, as in order.
                    last = {op.id: op for op in ops}.values()
                    db.execute(
                        _UPDATE,
                        (
                            [op.id for op in last],
                            [op.attempts for op in last],
                            [op.not_before for op in last],
                            [op.dead for op in last],
                            [_text(op.last_error) for op in last],
                        ),
                    )
                elif kind is DeleteOp:
                    db.execute(_DELETE, ([task_id for op in ops for task_id in op.ids],))
                elif kind is FinishOp:
                    db.execute(_FINISH, _finish_columns(ops))
                elif kind is CancelOp:
                    db.execute(_CANCEL, ([task_id for op in ops for task_id in op.ids],))
                elif kind is LeaseOp:
                    leases = {op.id: op for op in ops}.values()
                    db.execute(
                        _LEASE, ([op.id for op in leases], [op.delivery for op in leases], [op.until for op in leases])
                    )
                else:
                    raise ValueError(f"unknown journal op {kind!r}")
            if max_id is not None:
                db.execute(_NEXT_ID, (max_id + 1,))

    def _failed(self, error: BaseException) -> None:
        self.broken.set()

    # -- the session, for leadership (queuekit.leader) ----------------------------------------

    @contextmanager
    def _session(self) -> Iterator[Any]:
        """The journal's connection under its lock; a database error breaks the journal for good."""
        with self._db_lock:
            try:
                yield self._db
            except self._commit_errors as e:
                self._break(e)
                raise

    session = _session

    def _break(self, error: BaseException) -> None:
        if not self.broken.is_set():
            _log.error("journal_failed", journal=self.description, error=f"{type(error).__name__}: {error}")
        self.broken.set()
        with self._cond:
            self._fail(error)

    def sever(self) -> None:
        """Cut the session's connection, from any thread: a commit or query waiting on a frozen
        database (its kernel still acknowledges, so no TCP timeout fires) fails at once, and the
        journal is failed for good. For a watchdog that saw ``commit_started`` too long ago."""
        self.broken.set()
        try:
            fd = os.dup(self._db.pgconn.socket)
        except Exception:  # already closed: nothing to cut
            return
        with socket.socket(fileno=fd) as sock:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def try_advisory_lock(self, key: int) -> bool:
        """``pg_try_advisory_lock(key)`` on the journal's own session (held until it ends)."""
        with self._session() as db:
            row = db.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        return bool(row and row[0])

    def ping(self) -> float:
        """A round trip on the session; returns its seconds (raises, and breaks the journal, on failure)."""
        t0 = time.monotonic()
        with self._session() as db:
            db.execute("SELECT 1").fetchone()
        return time.monotonic() - t0
