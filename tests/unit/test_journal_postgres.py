"""The PostgreSQL journal beyond the shared contract (tests/unit/test_journal_contract.py): the URL and
password rules, schema creation/refusal, a broken session, group commits. A real throwaway server."""

import threading

import pytest

from queuekit.broker import Broker
from queuekit.errors import ConfigError, DataDirError, ExitCode
from queuekit.journal import JournalError, PutOp
from queuekit.settings import Secret, ServerSettings
from support.procs import wait_until

SECRET = "s3cr3t-pw-in-url"


def journal_for(db, **kw):
    from queuekit.journal_postgres import PostgresJournal

    return PostgresJournal(db.url, Secret(db.server.password.encode()), **kw)


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://qk:{SECRET}@db:5432/queuekit",
        f"postgres://qk:{SECRET}@db/queuekit?sslmode=require",
        f"postgresql://qk@db/queuekit?password={SECRET}",
    ],
)
def test_a_url_holding_a_password_is_refused_without_echoing_it(tmp_path, url):
    key = tmp_path / "key"
    key.write_text("k" * 64)
    with pytest.raises(ConfigError) as e:
        ServerSettings.load({"journal_url": url, "authkey_file": str(key)}, env={})
    assert "QUEUEKIT_JOURNAL_PASSWORD_FILE" in str(e.value) and SECRET not in str(e.value)
    assert e.value.exit_code == ExitCode.CONFIG


def test_url_scheme_data_dir_and_password_file_rules(tmp_path):
    key = tmp_path / "key"
    key.write_text("k" * 64)
    base = {"authkey_file": str(key)}
    with pytest.raises(ConfigError, match="postgresql://"):
        ServerSettings.load({**base, "journal_url": "mysql://qk@db/q"}, env={})
    with pytest.raises(ConfigError, match="two journals"):
        ServerSettings.load({**base, "journal_url": "postgresql://qk@db/q", "data_dir": str(tmp_path)}, env={})
    with pytest.raises(ConfigError, match="QUEUEKIT_JOURNAL_URL"):
        ServerSettings.load({**base, "journal_password_file": str(key)}, env={})
    with pytest.raises(ConfigError, match="journal password file .* does not exist"):
        ServerSettings.load(
            {**base, "journal_url": "postgresql://qk@db/q", "journal_password_file": str(tmp_path / "nope")}, env={}
        )
    pw = tmp_path / "pw"
    pw.write_text("hunter2\n")
    s = ServerSettings.load(
        {**base}, env={"QUEUEKIT_JOURNAL_URL": "postgresql://qk@db/q", "QUEUEKIT_JOURNAL_PASSWORD_FILE": str(pw)}
    )
    assert s.journal_url == "postgresql://qk@db/q" and s.journal_password == Secret(b"hunter2")
    assert "hunter2" not in repr(s)


def test_redact_url_removes_any_password():
    from queuekit.journal_postgres import redact_url

    assert redact_url("postgresql://qk:pw@db:5432/q?password=pw2&sslmode=require") == (
        "postgresql://qk:<redacted>@db:5432/q?password=<redacted>&sslmode=require"
    )
    assert redact_url("postgresql://qk@db/q") == "postgresql://qk@db/q"


def test_the_schema_is_created_once_and_versioned(pg_db):
    from queuekit.journal_postgres import APPLICATION_ID, SCHEMA_VERSION

    first = journal_for(pg_db)
    first.wait(first.append([PutOp("q", 0, ['"a"', '"b"'], 1.0, 0.0)]))
    first.close()
    second = journal_for(pg_db)  # opening again validates and keeps the rows
    assert [t.payload for t in second.load().tasks] == ['"a"', '"b"']
    second.close()
    meta = dict(pg_db.server.sql("SELECT key, value FROM queuekit_meta", pg_db.name))
    assert meta["application"] == APPLICATION_ID and meta["schema_version"] == SCHEMA_VERSION
    assert meta["next_id"] == 2


def test_a_newer_schema_is_refused_with_exit_6_and_left_untouched(pg_db):
    from queuekit.journal_postgres import SCHEMA_VERSION

    journal_for(pg_db).close()
    pg_db.server.sql(
        "UPDATE queuekit_meta SET value = %s WHERE key = 'schema_version'", pg_db.name, (SCHEMA_VERSION + 1,)
    )
    with pytest.raises(DataDirError, match="newer queuekit") as e:
        journal_for(pg_db)
    assert e.value.exit_code == ExitCode.DATA
    meta = dict(pg_db.server.sql("SELECT key, value FROM queuekit_meta", pg_db.name))
    assert meta["schema_version"] == SCHEMA_VERSION + 1


@pytest.mark.parametrize(
    "foreign",
    [
        [
            "CREATE TABLE queuekit_meta (key text PRIMARY KEY, value bigint)",
            "INSERT INTO queuekit_meta VALUES ('x', 1)",
        ],
        ["CREATE TABLE queuekit_tasks (id int)"],
        ["CREATE TABLE queuekit_meta (name text, owner text)", "INSERT INTO queuekit_meta VALUES ('someone', 'else')"],
    ],
)
def test_foreign_tables_with_our_names_are_refused_and_left_untouched(pg_db, foreign):
    for statement in foreign:
        pg_db.server.sql(statement, pg_db.name)
    before = pg_db.server.sql(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1", pg_db.name
    )
    with pytest.raises(DataDirError, match="not a queuekit journal|not a queuekit table") as e:
        journal_for(pg_db)
    assert e.value.exit_code == ExitCode.DATA
    after = pg_db.server.sql(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1", pg_db.name
    )
    assert after == before


def test_servers_opening_an_empty_database_together_create_the_schema_once(pg_db):
    journals, errors = [], []

    def open_one():
        try:
            journals.append(journal_for(pg_db))
        except Exception as e:  # recorded: the assertion below names it
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(journals) == 4
    for j in journals:
        j.close()


def test_a_lost_session_fails_the_put_and_is_never_reconnected(pg_db):
    journal = journal_for(pg_db)
    broker = Broker(journal=journal)
    broker.put_many("q", ['"stored"'])
    assert not journal.broken.is_set()
    pg_db.server.sql("SELECT pg_terminate_backend(%s)", params=(journal.backend_pid,))
    with pytest.raises(JournalError, match="commit failed"):
        broker.put_many("q", ['"lost"'])
    assert broker.qsize("q") == 1  # the failed put never became visible
    assert not journal.healthy and journal.broken.is_set()
    with pytest.raises(JournalError):
        broker.put_many("q", ['"also refused"'])
    sessions = pg_db.server.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = 'queuekit-server'",
        params=(pg_db.name,),
    )
    assert sessions == [(0,)]  # no new session was opened behind the journal's back
    journal.close()


def test_leadership_hooks_use_the_journals_own_session(pg_db):
    first, second = journal_for(pg_db), journal_for(pg_db)
    assert first.try_advisory_lock(4242) is True
    assert second.try_advisory_lock(4242) is False  # held by the other session
    holders = pg_db.server.sql(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND granted", params=()
    )
    assert holders == [(first.backend_pid,)]
    assert first.ping() >= 0
    first.close()  # the session ends: the lock is freed once the server noticed
    wait_until(lambda: second.try_advisory_lock(4242), timeout=10, what="the closed session's lock to be freed")
    second.close()


def test_concurrent_puts_share_group_commits(pg_db):
    journal = journal_for(pg_db)
    broker = Broker(journal=journal)
    barrier = threading.Barrier(8)

    def produce():
        barrier.wait()
        for i in range(25):
            broker.put_many("q", [str(i)])

    threads = [threading.Thread(target=produce) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert broker.qsize("q") == 200
    print(f"\n200 puts from 8 threads: {journal.commits} commits")
    assert journal.commits < 200
    journal.close()


def test_unreachable_database_is_a_clear_error_with_exit_5(pg_server):
    from queuekit.journal_postgres import JournalUnavailable, PostgresJournal

    with pytest.raises(JournalUnavailable, match="cannot connect to the journal database") as e:
        PostgresJournal(pg_server.url(), Secret(b"wrong password"), connect_timeout=5)
    assert e.value.exit_code == ExitCode.UNAVAILABLE and "wrong password" not in str(e.value)


def v2_ops():
    """Every kind of op, as the broker journals them (schema 2: headers, timeouts, finished rows)."""
    from queuekit.journal import CancelOp, DeleteOp, FinishOp, LeaseOp, UpdateOp

    return [
        PutOp("q", 10, ['"a"', '"b"', '"c"', '"d"'], 5.0, 0.0, {"trace": "t-1", "k": "ü"}, 30.0),
        PutOp("r", 14, ['"e"'], 6.0, 7.0),
        UpdateOp(11, 1, 9.0, False, "boom\x00nul"),  # an error text with a NUL, as a client may send
        FinishOp([10, 12], "succeeded", 8.0, {10: '{"ok": 1}'}, [7.5, None], ["consume@h:1", None]),
        CancelOp([13]),
        FinishOp([12], "cancelled", 8.5, None, [7.9], ["c2"]),  # the last op for an id wins
        LeaseOp(11, 3, 99.0),
        UpdateOp(14, 6, 0.0, True, "dead"),
        DeleteOp([12]),
    ]


def test_schema_2_rows_match_the_reference_semantics(pg_db):
    from queuekit.journal import MemoryJournal, apply_op

    journal = journal_for(pg_db)
    journal.wait(journal.append(v2_ops()))
    journal.close()
    expected: dict = {}
    for op in v2_ops():
        apply_op(expected, op)
    expected[11] = expected[11]._replace(last_error="boom\\x00nul")  # PostgreSQL text holds no NUL
    reopened = journal_for(pg_db)
    got = reopened.load()
    assert got.tasks == [expected[i] for i in sorted(expected)] and got.next_id == 15
    assert MemoryJournal.keeps_finished and reopened.keeps_finished
    reopened.close()


def test_finishes_of_one_task_in_one_statement_keep_the_last(pg_db):
    """Consecutive finish ops become one UPDATE; a task in two of them ends as the last says."""
    from queuekit.journal import FinishOp, apply_op

    ops = [
        PutOp("q", 1, ['"a"', '"b"', '"c"'], 5.0, 0.0),
        FinishOp([1, 2], "cancelled", 8.0, None, [7.0, 7.0], ["c1", "c1"]),
        FinishOp([2, 3], "succeeded", 9.0, {2: '"r"'}, [7.5, None], ["c2", None]),
    ]
    journal = journal_for(pg_db)
    journal.wait(journal.append(ops))
    journal.close()
    expected: dict = {}
    for op in ops:
        apply_op(expected, op)
    assert expected[2].state == "succeeded" and expected[2].result == '"r"'
    reopened = journal_for(pg_db)
    assert reopened.load().tasks == [expected[i] for i in sorted(expected)]
    reopened.close()


def test_a_schema_1_database_is_migrated_in_place_with_its_tasks(pg_db):
    """A database as the schema-1 code left it (its DDL and meta rows, a task with a saved lease)."""
    from queuekit.journal_postgres import _SCHEMA, APPLICATION_ID, SCHEMA_VERSION

    for statement in _SCHEMA:
        pg_db.server.sql(statement, pg_db.name)
    pg_db.server.sql(
        "INSERT INTO queuekit_meta VALUES ('application', %s), ('schema_version', 1), ('next_id', 8)",
        pg_db.name,
        (APPLICATION_ID,),
    )
    pg_db.server.sql(
        "INSERT INTO queuekit_tasks (id, queue, payload, attempts, enqueued_at, not_before, dead, last_error, "
        "lease_delivery, lease_until) VALUES (7, 'q', '\"old\"', 2, 1.0, 0.0, false, 'e', 4, 50.0)",
        pg_db.name,
    )
    journal = journal_for(pg_db)
    (task,) = journal.load().tasks
    assert task[:10] == ("q", 7, '"old"', 2, 1.0, 0.0, False, "e", 4, 50.0)
    assert (task.headers, task.state, task.cancel_requested) == (None, None, False)
    journal.wait(journal.append([PutOp("q", 8, ['"new"'], 2.0, 0.0, {"h": "v"}, 1.5)]))
    journal.close()
    meta = dict(pg_db.server.sql("SELECT key, value FROM queuekit_meta", pg_db.name))
    assert meta["schema_version"] == SCHEMA_VERSION == 2 and meta["next_id"] == 9


def test_a_commit_stuck_on_a_frozen_database_fails_at_once_when_severed(pg_db):
    """The database's backend stopped (SIGSTOP, as a frozen host): the commit waits with no TCP
    timeout; sever() from another thread makes the waiting put fail and breaks the journal."""
    import os
    import signal

    journal = journal_for(pg_db)
    broker = Broker(journal=journal)
    broker.put_many("q", ['"stored"'])
    os.kill(journal.backend_pid, signal.SIGSTOP)
    outcome: list = []
    try:
        t = threading.Thread(target=lambda: outcome.append(_put(broker)), daemon=True)
        t.start()
        wait_until(lambda: journal.commit_started is not None, timeout=10, what="the commit to start")
        t.join(0.5)
        assert t.is_alive()  # stuck: the frozen backend never answers
        journal.sever()
        t.join(10)
        assert not t.is_alive() and isinstance(outcome[0], JournalError)
    finally:
        os.kill(journal.backend_pid, signal.SIGCONT)
    assert journal.broken.is_set() and not journal.healthy
    assert broker.qsize("q") == 1
    journal.close()


def _put(broker):
    try:
        broker.put_many("q", ['"stuck"'])
    except JournalError as e:
        return e
    return None


def test_the_session_plans_every_statement_for_its_own_parameters(pg_db):
    """psycopg prepares a statement from its 5th execution on; PostgreSQL would then keep the
    generic plan it made while the tasks table was nearly empty, and the ack UPDATE's cost grew
    with the table under it (3.0 -> 7.8 ms per commit over 90,000 rows; a one-task commit 7.6 ms).
    The journal's session plans each execution afresh: checked on the session after enough
    commits for psycopg to have prepared the statements (prepared, and custom plans)."""
    journal = journal_for(pg_db)
    broker = Broker(journal=journal)
    for _ in range(12):  # puts and acks, well past psycopg's prepare threshold
        broker.put_many("q", ['"x"'] * 10)
        taken = broker.get_many("q", 10)
        broker.ack_many("q", [item[0] for item in taken])
        journal.wait(journal.append([]))
    with journal.session() as db:
        (mode,) = db.execute("SHOW plan_cache_mode").fetchone()
        prepared = db.execute("SELECT statement FROM pg_prepared_statements").fetchall()
    assert mode == "force_custom_plan"
    assert any("UPDATE queuekit_tasks" in row[0] for row in prepared)  # parsing is still saved
    journal.close()


def test_acks_reach_their_rows_by_index_on_a_mid_sized_table(pg_db):
    """On a table of 30,000 rows PostgreSQL's default costs choose a sequential scan and a hash
    join for the ack UPDATE of 100 tasks (it assumes uncached pages): the whole table read per
    commit (4.2 ms against about 1 ms). The journal's session reaches them by the primary key."""
    from queuekit.journal import FinishOp
    from queuekit.journal_postgres import _FINISH, _finish_columns

    journal = journal_for(pg_db)
    pg_db.server.sql(
        "INSERT INTO queuekit_tasks (queue, id, payload, attempts, enqueued_at) "
        "SELECT 'q', n, '\"x\"', 0, 0 FROM generate_series(1, 30000) AS n",
        pg_db.name,
    )
    acks = FinishOp(list(range(1000, 1100)), "succeeded", 1.0, None, [1.0] * 100, ["c"] * 100)
    with journal.session() as db:
        plan = "\n".join(r[0] for r in db.execute("EXPLAIN " + _FINISH, _finish_columns([acks])))
    assert "Seq Scan on queuekit_tasks" not in plan and "queuekit_tasks_pkey" in plan, plan
    journal.close()


def test_a_group_commit_is_all_or_nothing(pg_db):
    """A group commit's statements are one transaction: when a later one fails (here a put whose
    ids exist already), the earlier ones of the same commit are not stored either."""
    journal = journal_for(pg_db)
    journal.wait(journal.append([PutOp("q", 1, ['"first"'], 5.0, 0.0)]))
    seq = journal.append([PutOp("q", 2, ['"second"'], 5.0, 0.0), PutOp("other", 1, ['"clash"'], 5.0, 0.0)])
    with pytest.raises(JournalError):
        journal.wait(seq)
    journal.close()
    reopened = journal_for(pg_db)
    recovered = reopened.load()
    assert [t.payload for t in recovered.tasks] == ['"first"'] and recovered.next_id == 2
    reopened.close()
