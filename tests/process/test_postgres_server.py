"""``queuekit server --journal-url``: a real server process on a throwaway PostgreSQL
(tests/support/pg.py). The crash test on PostgreSQL is in test_durability.py (parametrized)."""

import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
from test_durability import start_expecting_failure

import queuekit
from queuekit.errors import ExitCode
from queuekit.journal import JournalError
from queuekit.journal_postgres import SCHEMA_VERSION
from support.procs import SRC, ServerProc, base_env, wait_until


def pg_args(db):
    return ("--journal-url", db.url, "--journal-password-file", db.password_file)


def test_a_server_on_postgres_keeps_tasks_across_restarts_and_never_logs_the_password(tmp_path, key_file, pg_db):
    server = ServerProc(tmp_path, key_file, *pg_args(pg_db))
    log = server.log()
    assert f"journal=postgresql:{pg_db.url}" in log
    client = queuekit.connect(server.address, authkey_file=str(key_file))
    q = client.queue("jobs")
    q.put_many([{"n": i} for i in range(5)])
    (held,) = q.get_many(1)  # in flight at the crash: ready again afterwards
    client.close()
    server.signal(9)
    server.wait(10)
    server = ServerProc(tmp_path, key_file, *pg_args(pg_db), port=server.port)
    server.wait_for(r"event=recovered tasks=5")
    client = queuekit.connect(server.address, authkey_file=str(key_file))
    got = client.queue("jobs").get_many(10)
    assert sorted(t.payload["n"] for t in got) == [0, 1, 2, 3, 4] and held.id in {t.id for t in got}
    client.close()
    assert server.stop() == 0
    assert pg_db.server.password not in server.log()


def run_server(key_file, *args, python=sys.executable, env=None):
    """(exit code, stderr) of a server that must stop at start."""
    code, _, stderr = start_expecting_failure(key_file, None, python=python, env=env, journal_args=args)
    return code, stderr


def test_a_url_with_a_password_stops_the_server_with_exit_3_and_no_password_shown(tmp_path, key_file):
    code, stderr = run_server(key_file, "--journal-url", "postgresql://qk:Sup3rS3cret@127.0.0.1:1/q")
    assert code == ExitCode.CONFIG
    assert "QUEUEKIT_JOURNAL_PASSWORD_FILE" in stderr and "Sup3rS3cret" not in stderr


def test_a_wrong_password_is_exit_5_and_a_newer_schema_exit_6(tmp_path, key_file, pg_db):
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    code, stderr = run_server(key_file, "--journal-url", pg_db.url, "--journal-password-file", str(wrong))
    assert code == ExitCode.UNAVAILABLE, stderr
    assert "cannot connect to the journal database" in stderr and "not-the-password" not in stderr

    server = ServerProc(tmp_path, key_file, *pg_args(pg_db))  # creates the schema
    assert server.stop() == 0
    pg_db.server.sql(
        "UPDATE queuekit_meta SET value = %s WHERE key = 'schema_version'", pg_db.name, (SCHEMA_VERSION + 1,)
    )
    code, stderr = run_server(key_file, *pg_args(pg_db))
    assert code == ExitCode.DATA, stderr
    assert "newer queuekit" in stderr


def test_without_psycopg_the_error_names_the_extra(tmp_path, key_file):
    """The system Python has no psycopg (the runtime stays standard-library only): the server
    explains which extra to install instead of a traceback."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    probe = subprocess.run([python or "python3", "-c", "import psycopg"], capture_output=True) if python else None
    if probe is None or probe.returncode == 0:
        pytest.skip("no Python without psycopg on this machine")
    env = base_env(PYTHONPATH=str(SRC), PYTHONNOUSERSITE="1")
    code, stderr = run_server(key_file, "--journal-url", "postgresql://qk@127.0.0.1:1/q", python=python, env=env)
    assert code == ExitCode.CONFIG
    assert "queuekit[postgres]" in stderr and "Traceback" not in stderr


def test_a_server_that_loses_its_session_reports_not_ready(tmp_path, key_file, pg_db):
    server = ServerProc(tmp_path, key_file, *pg_args(pg_db))
    client = queuekit.connect(server.address, authkey_file=str(key_file))
    client.queue("jobs").put({"n": 1})
    pg_db.server.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
        params=(pg_db.name, "queuekit-server"),
    )
    with pytest.raises(JournalError):
        client.queue("jobs").put({"n": 2})
    server.wait_for("event=journal_failed")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/readyz", timeout=5)
    assert e.value.code == 503
    client.close()


def test_the_loop_serves_other_clients_while_a_put_waits_for_its_commit(tmp_path, key_file, pg_db):
    """The commit runs beside the loop (PostgreSQL: a round trip plus the WAL flush): a put whose
    COMMIT is stuck behind a row lock that another session holds leaves every other client
    served, and is answered, and its task delivered, once the commit went through."""
    server = ServerProc(tmp_path, key_file, *pg_args(pg_db))
    consumer = queuekit.connect(server.address, authkey_file=str(key_file), name="consumer")
    producer = queuekit.connect(server.address, authkey_file=str(key_file), name="producer")
    consumer.queue("jobs").put({"n": 1})  # stored before the lock is taken
    blocker = pg_db.server.connect(pg_db.name)
    blocker.execute("BEGIN")
    blocker.execute("SELECT value FROM queuekit_meta WHERE key = 'next_id' FOR UPDATE")  # every commit bumps it
    answered = threading.Event()
    put = threading.Thread(target=lambda: (producer.queue("jobs").put({"n": 2}), answered.set()), daemon=True)
    put.start()
    try:
        wait_until(
            lambda: pg_db.server.sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = %s "
                "AND wait_event_type = 'Lock'",
                params=(pg_db.name, "queuekit-server"),
            )[0][0],
            timeout=10,
            what="the server's COMMIT waiting for the row lock",
        )
        (task,) = consumer.queue("jobs").get_many(1, timeout=0)  # answered while that commit waits
        assert task.payload == {"n": 1}
        assert consumer.ping()["durable"] is True
        assert not answered.is_set(), "the put was answered before its commit"
    finally:
        blocker.rollback()
        blocker.close()
    assert answered.wait(10), "the put was not answered once its commit went through"
    (task,) = consumer.queue("jobs").get_many(1, timeout=5, ack=[task])
    assert task.payload == {"n": 2}
    consumer.close()
    producer.close()
    assert server.stop() == 0
