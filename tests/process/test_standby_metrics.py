"""A standby is observable: ``/metrics`` and ``/stats`` answer 200 on every server of a shared
PostgreSQL journal (a standby: no queues, the server's, leadership, build and process families),
and the leadership families follow a failover and a step-down; a server that cannot open a
session to the database says so (``queuekit_journal_connected 0``, failed opens counted) and
recovers when it can again.

Real server processes on loopback and a real PostgreSQL (tests/support/pg.py, a database per
test); ``/metrics`` is read with Prometheus' own text parser (prometheus_client.parser)."""

from __future__ import annotations

import http.client
import json
import secrets
import signal

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_failover import connect, ha_server, is_ready, leader_pair
from test_preauth import wrong_key_attempt

from queuekit.leader import LEADER_LOCK_KEY, STEPDOWN_REASONS
from support.pg import PgDatabase
from support.procs import ServerProc, wait_until

pytestmark = pytest.mark.process


def get(server: ServerProc, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def scrape(server: ServerProc) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted labels: value}} of a 200 /metrics, parsed by Prometheus' parser."""
    status, body = get(server, "/metrics")
    assert status == 200, f"/metrics answered {status}: {body!r}"
    samples: dict[str, dict[tuple, float]] = {}
    for f in text_string_to_metric_families(body):
        for s in f.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def one(samples: dict, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def stats(server: ServerProc) -> dict:
    status, body = get(server, "/stats")
    assert status == 200, f"/stats answered {status}: {body!r}"
    return json.loads(body)


def leads(server: ServerProc) -> bool:
    try:
        return one(scrape(server), "queuekit_leader") == 1
    except (AssertionError, OSError):
        return False


def test_standby_answers_metrics_and_stats_and_takes_over(tmp_path, key_file, pg_db):
    a, b = leader_pair(tmp_path, key_file, pg_db)
    with connect([a, b], key_file) as client:
        ids = client.queue("jobs").put_many(["x", "y"])

    # The standby's queue port authenticates (then refuses with NotLeader): its failures count.
    assert [wrong_key_attempt(b, "127.0.0.41") for _ in range(2)] == ["wrong key"] * 2
    standby = scrape(b)
    assert one(standby, "queuekit_auth_failures_total") == 2
    assert one(standby, "queuekit_leader") == 0
    assert one(standby, "queuekit_leader_elections_total") == 0
    assert {one(standby, "queuekit_leader_stepdowns_total", reason=r) for r in STEPDOWN_REASONS} == {0}
    assert one(standby, "queuekit_ready") == 0
    assert one(standby, "process_cpu_seconds_total") > 0
    assert one(standby, "process_resident_memory_bytes") > 1024 * 1024
    assert len(standby["queuekit_build_info"]) == 1
    assert one(standby, "queuekit_connections_refused_total", reason="max_connections") == 0
    assert not [n for n in standby if n.startswith(("queuekit_tasks_", "queuekit_gets_", "queuekit_queue"))]
    s = stats(b)
    assert s["role"] == "standby" and s["queues"] == {} and s["ready"] is False
    assert s["leadership"] == {
        "leader": False,
        "elections": 0,
        "stepdowns": dict.fromkeys(STEPDOWN_REASONS, 0),
        "journal_connected": True,
        "journal_open_failures": 0,
    }
    assert one(standby, "queuekit_journal_connected") == 1
    assert one(standby, "queuekit_journal_open_failures_total") == 0
    status, overview = get(b, "/api/overview")  # the dashboard's: the same object
    assert status == 200 and json.loads(overview)["stats"]["role"] == "standby"
    status, text = get(b, f"/tasks/{ids[0]}")  # a task's status lives on the leader: said so
    assert status == 503 and text.startswith("not the leader: this server is a standby"), text
    assert get(a, f"/tasks/{ids[0]}")[0] == 200

    leader = scrape(a)
    assert one(leader, "queuekit_leader") == 1
    assert one(leader, "queuekit_leader_elections_total") == 1
    assert one(leader, "queuekit_ready") == 1
    assert one(leader, "queuekit_tasks_ready", queue="jobs") == 2
    assert one(leader, "queuekit_journal_connected") == 1
    assert set(leader) >= set(standby), f"families only the standby writes: {set(standby) - set(leader)}"
    s = stats(a)
    assert s["role"] == "leader" and s["queues"]["jobs"]["ready"] == 2 and s["leadership"]["leader"] is True

    a.signal(signal.SIGKILL)
    a.wait()
    wait_until(lambda: leads(b), timeout=20.0, what="the standby's /metrics saying queuekit_leader 1")
    took_over = scrape(b)
    assert one(took_over, "queuekit_leader_elections_total") == 1
    assert one(took_over, "queuekit_tasks_ready", queue="jobs") == 2  # the state it loaded
    assert one(took_over, "queuekit_auth_failures_total") == 2  # counted as a standby: a counter only grows
    wait_until(lambda: is_ready(b), what="the new leader ready")
    s = stats(b)
    assert s["role"] == "leader" and s["queues"]["jobs"]["ready"] == 2 and s["ready"] is True


def test_a_leader_whose_session_is_terminated_steps_down_and_is_elected_again(tmp_path, key_file, pg_db):
    server = ha_server(tmp_path, key_file, pg_db)
    server.wait_for(r"event=leader_elected epoch=1\b")
    wait_until(lambda: leads(server), what="the server leading")
    pg_db.server.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        params=(pg_db.name,),
    )
    server.wait_for(r"event=leader_lost epoch=1 ")
    server.wait_for(r"event=leader_elected epoch=2\b")
    wait_until(lambda: leads(server), what="the server leading again")
    samples = scrape(server)
    assert one(samples, "queuekit_leader_elections_total") == 2
    stepdowns = {r: one(samples, "queuekit_leader_stepdowns_total", reason=r) for r in STEPDOWN_REASONS}
    assert sum(stepdowns.values()) == 1
    assert stepdowns["probe_failed"] + stepdowns["session_failed"] == 1, stepdowns


def test_a_single_server_says_single_and_writes_no_leadership_families(server):
    samples = scrape(server)
    assert not [n for n in samples if n.startswith(("queuekit_leader", "queuekit_journal_connected"))]
    assert "queuekit_journal_open_failures_total" not in samples
    assert one(samples, "queuekit_ready") == 1
    s = stats(server)
    assert s["role"] == "single" and "leadership" not in s


# -- a server that cannot open a session to the database ------------------------------------------


def journal_session(server: ServerProc) -> tuple[float, float]:
    """(queuekit_journal_connected, queuekit_journal_open_failures_total) of a server."""
    samples = scrape(server)
    return one(samples, "queuekit_journal_connected"), one(samples, "queuekit_journal_open_failures_total")


def cut_off(server: ServerProc, failures_above: float = 0) -> bool:
    """No session, and more than ``failures_above`` failed attempts to open one."""
    connected, failures = journal_session(server)
    return connected == 0 and failures > failures_above


def terminate_sessions(db: PgDatabase, *, spare_the_leader: bool = False) -> None:
    """End the database sessions of the test's database (its servers'), from outside: the
    leader's too unless ``spare_the_leader`` (the backend holding the leader lock)."""
    spared = (
        " AND pid NOT IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid::bigint = %s)"
        if spare_the_leader
        else ""
    )
    db.server.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
        + spared,
        params=(db.name, LEADER_LOCK_KEY) if spare_the_leader else (db.name,),
    )


def test_servers_that_cannot_reach_the_database_say_so_and_recover(tmp_path, key_file, pg_db):
    """The database refuses every new session to the journal (as a pg_hba rule or a network
    policy would) and the servers' sessions end: the leader steps down, both say
    queuekit_journal_connected 0 with the failed attempts counting up; when the database lets
    them in again both reconnect and one leads."""
    a, b = leader_pair(tmp_path, key_file, pg_db)
    wait_until(lambda: journal_session(b) == (1, 0), what="the standby's journal session")
    assert journal_session(a) == (1, 0)
    pg_db.server.sql(f'ALTER DATABASE "{pg_db.name}" ALLOW_CONNECTIONS false')
    try:
        terminate_sessions(pg_db)
        a.wait_for(r"event=leader_lost epoch=1 ")
        for server in (a, b):
            wait_until(lambda s=server: cut_off(s, 1), timeout=20, what=f"{server.address}: no session, failures")
        _, failures = journal_session(b)
        wait_until(lambda: cut_off(b, failures), timeout=20, what="the standby's failed opens counting up")
        for server in (a, b):
            samples = scrape(server)
            assert one(samples, "queuekit_leader") == 0 and one(samples, "queuekit_ready") == 0
            leadership = stats(server)["leadership"]
            assert leadership["journal_connected"] is False and leadership["journal_open_failures"] >= 2
            assert stats(server)["role"] == "standby"
        assert "event=journal_reopen_failed " in b.log() and "not currently accepting connections" in b.log()
        stepdowns = {r: one(scrape(a), "queuekit_leader_stepdowns_total", reason=r) for r in STEPDOWN_REASONS}
        assert stepdowns["probe_failed"] + stepdowns["session_failed"] == 1, stepdowns
    finally:
        pg_db.server.sql(f'ALTER DATABASE "{pg_db.name}" ALLOW_CONNECTIONS true')
    for server in (a, b):
        wait_until(lambda s=server: journal_session(s)[0] == 1, timeout=20, what=f"{server.address} reconnected")
        server.wait_for(r"event=journal_reopened .*seconds=[\d.]+ failures=\d+")
    wait_until(lambda: leads(a) or leads(b), timeout=20, what="a leader again")
    assert [leads(a), leads(b)].count(True) == 1


def test_a_standby_whose_password_was_rotated_says_so_and_recovers_from_the_new_file(tmp_path, key_file, pg_db):
    """The journal role's password changes in the database while the servers run, before their
    password file has it: the leader keeps its session, the standby's ends and it cannot log in
    again. It says so on /metrics while the leader serves; when the leader dies nobody can take
    over. Once the file holds the new password (a Secret's mounted file updated in place), the
    standby's next attempt reads it and takes over, with no restart."""
    pg = pg_db.server
    role, password = f"qk_rot_{pg_db.name}", secrets.token_hex(16)
    pg.sql(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'")
    try:
        pg.sql(f'ALTER DATABASE "{pg_db.name}" OWNER TO "{role}"')  # PostgreSQL 15: creates in public
        password_file = tmp_path / "journal-password"
        password_file.write_text(password + "\n")
        db = PgDatabase(pg.url(pg_db.name, user=role), str(password_file), pg, pg_db.name)
        a, b = leader_pair(tmp_path, key_file, db)
        wait_until(lambda: journal_session(b) == (1, 0), what="the standby's journal session")
        rotated = secrets.token_hex(16)
        pg.sql(f"ALTER ROLE \"{role}\" PASSWORD '{rotated}'")  # the rotation, in the database first
        terminate_sessions(pg_db, spare_the_leader=True)  # the standby's session ends (the leader's lives on)
        wait_until(lambda: cut_off(b, 1), timeout=20, what="the standby: no session, failed opens")
        assert "password authentication failed" in b.log()
        assert journal_session(a) == (1, 0) and leads(a) and is_ready(a)
        assert one(scrape(b), "queuekit_leader") == 0
        a.signal(signal.SIGKILL)
        a.wait()
        _, failures = journal_session(b)
        wait_until(lambda: cut_off(b, failures), timeout=20, what="the standby still failing after the kill")
        assert not leads(b)
        password_file.write_text(rotated + "\n")  # then in the servers' file
        wait_until(lambda: leads(b), timeout=20, what="the standby leading once its file has the new password")
        assert journal_session(b)[0] == 1 and b.popen.poll() is None  # the same process: no restart
        b.stop()
    finally:  # no server of this test can log in again; then the role goes
        pg.sql(f"ALTER ROLE \"{role}\" PASSWORD '{secrets.token_hex(16)}'")
        terminate_sessions(pg_db)
        pg.sql(f'ALTER DATABASE "{pg_db.name}" OWNER TO CURRENT_USER')
        pg.sql(f'REASSIGN OWNED BY "{role}" TO CURRENT_USER', pg_db.name)
        pg.sql(f'DROP ROLE "{role}"')
