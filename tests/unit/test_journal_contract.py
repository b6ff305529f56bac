"""One contract suite, run against every durable journal (the in-process one, SQLite, PostgreSQL).

A "restart" is a new Broker on the same journal (for SQLite and PostgreSQL: the journal closed and
reopened from its directory or database, as a restarted server would). PostgreSQL: a throwaway
server (tests/support/pg.py), a new database per test.
"""

import json
import random
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from queuekit.broker import Broker
from queuekit.journal import DeleteOp, MemoryJournal, PutOp
from queuekit.journal_sqlite import SqliteJournal
from queuekit.message import NackItem
from support.fakeclock import FakeClock


class MemoryStore:
    def __init__(self, tmp_path):
        self.journal = MemoryJournal()

    def open(self):
        return self.journal

    def close(self, journal):
        pass


class SqliteStore:
    def __init__(self, tmp_path):
        self.dir = str(tmp_path / "data")

    def open(self):
        return SqliteJournal(self.dir, sync="normal")

    def close(self, journal):
        journal.flush(timeout=10)
        journal.close()


class PostgresStore:
    def __init__(self, db):
        self.db = db

    def open(self):
        from queuekit.journal_postgres import PostgresJournal
        from queuekit.settings import Secret

        return PostgresJournal(self.db.url, Secret(self.db.server.password.encode()))

    close = SqliteStore.close


STORES = {"memory": MemoryStore, "sqlite": SqliteStore, "postgres": PostgresStore}


@pytest.fixture(params=sorted(STORES))
def store(request, tmp_path):
    if request.param == "postgres":  # only this parameter needs (and may skip for) PostgreSQL
        return PostgresStore(request.getfixturevalue("pg_db"))
    return STORES[request.param](tmp_path)


class Harness:
    """A broker on a store, restartable; the clock carries over like real time does."""

    def __init__(self, store, clock=None, **broker_options):
        self.store = store
        self.broker_options = broker_options
        self.clock = clock or FakeClock()
        self.journal = store.open()
        self.broker = self._new_broker()
        self.broker.recover()

    def _new_broker(self):
        return Broker(
            journal=self.journal,
            clock=self.clock,
            max_attempts=2,
            retry_base=10.0,
            retry_max=10.0,
            default_lease=5.0,
            rng=random.Random(1),
            **self.broker_options,
        )

    def restart(self):
        self.store.close(self.journal)
        self.journal = self.store.open()
        self.broker = self._new_broker()
        return self.broker.recover()

    def close(self):
        self.store.close(self.journal)


def state(broker):
    """{queue: {"live": {id: attempts}, "dead": {id: attempts}}} (live = ready, leased or delayed)."""
    out = {}
    for name, q in broker._queues.items():
        out[name] = {
            "live": {i: t.attempts for i, t in q.live.items()},
            "dead": {i: t.attempts for i, t in q.dead.items()},
        }
    return out


def test_put_survives_restart_with_payload_and_order(store):
    h = Harness(store)
    ids = h.broker.put_many("q", [json.dumps({"n": i}) for i in range(5)])
    h.broker.put_many("other", ['"x"'])
    counts = h.restart()
    assert counts == {"q": 5, "other": 1}
    got = h.broker.get_many("q", 10)
    assert [item[0] for item in got] == ids
    assert [json.loads(item[3]) for item in got] == [{"n": i} for i in range(5)]
    h.close()


def test_when_committed_calls_back_once_the_put_is_stored(store):
    h = Harness(store)
    put = h.broker.begin_put("q", ['"a"', '"b"'])
    outcomes = []
    done = threading.Event()

    def record(error):
        outcomes.append(error)
        done.set()

    h.broker.when_committed(put.seq, record)
    assert done.wait(10), "when_committed never called back"
    assert outcomes == [None]
    h.broker.finish_put(put)
    h.broker.when_committed(put.seq, outcomes.append)  # committed already: at once, on this thread
    assert outcomes == [None, None]
    assert h.restart() == {"q": 2}
    h.close()


def test_when_committed_does_not_block_the_caller_of_a_background_journal(store):
    """The server's loop calls when_committed and goes on serving: with a journal that commits in
    the background, the call returns while the commit cannot even start (its connection is
    busy), and the callback comes once it could."""
    h = Harness(store)
    journal = h.journal
    if not journal.commits_in_background:
        pytest.skip(f"{journal.description}: the loop commits inline")
    called = threading.Event()
    with journal._db_lock:  # the connection is busy (another commit, a leadership query)
        put = h.broker.begin_put("q", ['"a"'])
        caller = threading.Thread(target=journal.when_committed, args=(put.seq, lambda error: called.set()))
        caller.start()
        caller.join(5)
        assert not caller.is_alive(), "when_committed blocked until the commit could run"
        assert not called.is_set()
    assert called.wait(10), "when_committed never called back once the connection was free"
    h.close()


def test_leased_tasks_come_back_ready_with_attempts_kept(store):
    h = Harness(store)
    h.broker.put_many("q", ["1", "2", "3"])
    a, b, c = h.broker.get_many("q", 3)
    h.broker.ack_many("q", [a[0]])
    h.broker.nack_many("q", [NackItem(b[0], b[1], 0, "failed once")])
    h.restart()
    again = {item[0]: item[2] for item in h.broker.get_many("q", 10)}
    assert again == {b[0]: 1, c[0]: 0}  # acked one gone; nacked kept its attempt; leased one is back
    h.close()


def test_dead_letters_and_delays_survive_restart(store):
    h = Harness(store)
    h.broker.put_many("q", ['"dead"', '"delayed"'])
    dead, delayed = h.broker.get_many("q", 2)
    for _ in range(3):
        h.broker.nack_many("q", [NackItem(dead[0], dead[1], 0, "boom")])
        got = h.broker.get_many("q", 1)
        dead = got[0] if got else dead
    h.broker.nack_many("q", [NackItem(delayed[0], delayed[1], 60.0, "later")])
    h.restart()
    s = h.broker.stats()["q"]
    assert (s["dead"], s["delayed"], s["ready"]) == (1, 1, 0)
    assert h.broker.dead_list("q")[0]["last_error"] == "boom"
    h.clock.advance(61)
    (item,) = h.broker.get_many("q", 1)
    assert json.loads(item[3]) == "delayed" and item[2] == 1
    assert h.broker.dead_requeue("q") == 1
    h.restart()
    assert h.broker.stats()["q"]["dead"] == 0
    # After a restart, ready tasks come back in enqueue (id) order.
    assert [json.loads(i[3]) for i in h.broker.get_many("q", 5)] == ["dead", "delayed"]
    h.close()


def test_ids_keep_growing_across_restarts_even_when_everything_was_acked(store):
    h = Harness(store)
    first = h.broker.put_many("q", ["1", "2"])
    h.broker.ack_many("q", first)
    h.clock.wall_time -= 3600  # even if the wall clock went backwards
    h.restart()
    assert h.broker.put_many("q", ["3"])[0] > max(first)
    h.close()


# -- schema v2: headers, timeouts, finished tasks (status, results), cancel flags ------------------


def v2_harness(store, **options):
    h = Harness(store, **options)
    if not h.journal.keeps_finished:
        h.close()
        pytest.skip(f"{type(h.journal).__name__} does not keep finished tasks yet (keeps_finished False)")
    return h


def test_headers_timeout_status_and_results_survive_restart(store):
    h = v2_harness(store)
    b = h.broker
    ok, plain, waiting, live = b.put_many("q", ['"ok"', '"plain"', '"waiting"', '"live"'], 0.0, {"trace": "t1"}, 7.5)
    a, p = b.take_or_wait(["q"], 2, 0.0, None, None, None, print, "worker@1")
    assert a[6:] == ({"trace": "t1"}, 7.5)
    b.ack_many("q", [ok, plain], {ok: '{"sum":3}'})
    assert b.cancel_task("q", waiting) == "cancelled"
    h.restart()
    b = h.broker
    st = b.status("q", ok)
    assert (st.state, st.has_result, st.consumer, st.queue) == ("succeeded", True, "worker@1", "q")
    assert st.started_at is not None and st.finished_at is not None
    assert b.result_or_wait(None, ok, 0.0, print) == ("succeeded", '{"sum":3}', None)
    assert b.result_or_wait(None, plain, 0.0, print) == ("succeeded", None, None)
    assert b.status(None, waiting).state == "cancelled"
    assert b.status(None, live).state == "ready"
    (item,) = b.take_or_wait(["q"], 5, 0.0, None, None, None, print)
    assert item[1] == live and item[6:] == ({"trace": "t1"}, 7.5)  # headers and timeout kept
    assert b.qsize("q") == 0
    h.close()


AWKWARD_TEXTS = [
    '"emoji \U0001f600 and \u2028 line separator"',
    '{"quote": "\\"", "backslash": "\\\\", "tab": "\\t", "escaped nul": "\\u0000"}',
    '[1.5e300, -0.0, "caf\u00e9", "\u65e5\u672c"]',
    '"  leading and trailing spaces  "',
]


def test_awkward_payloads_results_and_names_come_back_unchanged(store):
    """Payloads, headers, results and consumer names travel to PostgreSQL inside JSON parameters:
    non-ASCII, escapes and quotes must come back byte for byte."""
    h = v2_harness(store)
    b = h.broker
    ids = b.put_many("q", AWKWARD_TEXTS, 0.0, {"who": "z\u00fcrich \U0001f600"}, None)
    taken = b.take_or_wait(["q"], 2, 0.0, None, None, None, print, "w\u00f6rker \U0001f600")
    b.ack_many("q", [taken[0][1]], {taken[0][1]: AWKWARD_TEXTS[1]})
    h.restart()
    b = h.broker
    assert b.result_or_wait(None, ids[0], 0.0, print) == ("succeeded", AWKWARD_TEXTS[1], None)
    assert b.status(None, ids[0]).consumer == "w\u00f6rker \U0001f600"
    rest = b.take_or_wait(["q"], 5, 0.0, None, None, None, print)
    assert [item[4] for item in rest] == AWKWARD_TEXTS[1:]
    assert rest[0][6] == {"who": "z\u00fcrich \U0001f600"}
    h.close()


def test_cancel_flag_of_a_task_in_flight_survives_restart(store):
    h = v2_harness(store)
    (task_id,) = h.broker.put_many("q", ['"x"'])
    h.broker.get_many("q", 1)
    assert h.broker.cancel_task(None, task_id) == "cancelling"
    h.restart()  # a crash: the task would be ready again, but it was cancelled
    assert h.broker.status("q", task_id).state == "cancelled"
    assert h.broker.get_many("q", 1) == []
    h.restart()
    assert h.broker.status("q", task_id).state == "cancelled"
    h.close()


def test_result_store_evictions_are_journaled(store):
    h = v2_harness(store, result_max_count=2, result_ttl=100.0)
    ids = h.broker.put_many("q", ['"1"', '"2"', '"3"'])
    h.broker.get_many("q", 3)
    for task_id in ids:
        h.broker.ack_many("q", [task_id], {task_id: str(task_id)})
    h.restart()
    assert [h.broker.status("q", i).state for i in ids] == ["unknown", "succeeded", "succeeded"]
    h.clock.advance(101)
    h.broker.tick()
    h.restart()
    assert [h.broker.status("q", i).state for i in ids] == ["unknown"] * 3
    h.close()


# -- property: any sequence of operations, replayed after a restart, matches a reference model --

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(1, 3)),
        st.tuples(st.just("get"), st.integers(1, 3)),
        st.tuples(st.just("ack"), st.integers(0, 50)),
        st.tuples(st.just("nack"), st.integers(0, 50)),
        st.tuples(st.just("expire"), st.just(0)),
        st.tuples(st.just("requeue"), st.just(0)),
        st.tuples(st.just("restart"), st.just(0)),
    ),
    max_size=40,
)


class Model:
    """The reference: live tasks with attempts, dead tasks with attempts, leased ids with delivery."""

    def __init__(self, max_attempts):
        self.max_attempts = max_attempts
        self.live, self.dead, self.leased = {}, {}, {}

    def fail(self, task_id):
        self.leased.pop(task_id)
        self.live[task_id] += 1
        if self.live[task_id] > self.max_attempts:
            self.dead[task_id] = self.live.pop(task_id)


def run_ops(store, ops):
    h = Harness(store)
    model = Model(h.broker.max_attempts)
    for op, arg in ops:
        b = h.broker
        if op == "put":
            for task_id in b.put_many("q", [json.dumps(i) for i in range(arg)]):
                model.live[task_id] = 0
        elif op == "get":
            h.clock.advance(11)  # retry delays (10 s) elapse, and so do the 5 s leases
            for task_id in list(model.leased):
                model.fail(task_id)
            for item in b.get_many("q", arg, lease=5):
                model.leased[item[0]] = item[1]
        elif op in ("ack", "nack") and model.leased:
            task_id = sorted(model.leased)[arg % len(model.leased)]
            if op == "ack":
                assert b.ack_many("q", [task_id]) == 1
                model.leased.pop(task_id)
                model.live.pop(task_id)
            else:
                assert b.nack_many("q", [NackItem(task_id, model.leased[task_id], None, "e")]) == 1
                model.fail(task_id)
        elif op == "expire":
            h.clock.advance(6)
            b.tick()
            for task_id in list(model.leased):
                model.fail(task_id)
        elif op == "requeue":
            b.dead_requeue("q")
            model.live.update({i: 0 for i in model.dead})
            model.dead.clear()
        elif op == "restart":
            h.restart()
            model.leased.clear()  # leases are not journaled: in-flight tasks are ready again
    h.restart()
    got = state(h.broker).get("q", {"live": {}, "dead": {}})
    h.close()
    return got, {"live": model.live, "dead": model.dead}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_replay_matches_model_postgres(pg_db, ops):
    pg_db.server.sql("DROP TABLE IF EXISTS queuekit_tasks, queuekit_meta", pg_db.name)  # a fresh journal
    got, expected = run_ops(PostgresStore(pg_db), ops)
    assert got == expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_replay_matches_model_memory(tmp_path, ops):
    got, expected = run_ops(MemoryStore(tmp_path), ops)
    assert got == expected


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_replay_matches_model_sqlite(tmp_path_factory, ops):
    got, expected = run_ops(SqliteStore(tmp_path_factory.mktemp("replay")), ops)
    assert got == expected


def test_graceful_shutdown_saves_leases_for_one_restart(store):
    h = Harness(store)
    h.broker.put_many("q", ['"held"', '"ready"'])
    (held,) = h.broker.get_many("q", 1, lease=30)
    h.clock.advance(10)
    assert h.broker.save_leases() == 1
    h.restart()
    s = h.broker.stats()["q"]
    assert (s["inflight"], s["ready"]) == (1, 1)
    # The holder's receipt is still valid: it can extend, and its ack removes the task.
    assert h.broker.extend_many("q", [(held[0], held[1])], lease=5) == []
    assert [json.loads(i[3]) for i in h.broker.get_many("q", 5)] == ["ready"]
    assert h.broker.ack_many("q", [held[0]]) == 1
    h.close()


def test_saved_leases_expire_on_time_and_are_restored_only_once(store):
    h = Harness(store)
    h.broker.put_many("q", ['"x"'])
    h.broker.get_many("q", 1, lease=30)
    h.broker.save_leases()
    h.restart()
    assert h.broker.stats()["q"]["inflight"] == 1
    h.clock.advance(31)
    h.broker.tick()
    assert h.broker.stats()["q"]["ready"] == 1  # the remaining lease ran out: redelivered
    (item,) = h.broker.get_many("q", 1, lease=30)
    h.restart()  # a crash-style restart (no save_leases): the lease is not restored again
    assert h.broker.stats()["q"]["ready"] == 1
    h.close()


def test_sqlite_journal_is_created_with_incremental_auto_vacuum(tmp_path):
    journal = SqliteJournal(str(tmp_path / "d"), sync="normal")
    assert journal._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
    assert journal._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    journal.close()


def test_sqlite_vacuum_gives_pages_back_while_running(tmp_path):
    journal = SqliteJournal(str(tmp_path / "d"), sync="normal")
    journal.wait(journal.append([PutOp("q", 0, ['"' + "x" * 3000 + '"'] * 2000, 0.0, 0.0)]))
    journal.wait(journal.append([DeleteOp(list(range(2000)))]))
    assert journal._db.execute("PRAGMA freelist_count").fetchone()[0] > 1000
    journal._next_housekeeping = 0  # due now
    journal.wait(journal.append([DeleteOp([-1])]))
    assert journal._db.execute("PRAGMA freelist_count").fetchone()[0] < 100
    journal.close()


def test_sqlite_commit_failure_is_reported_to_the_waiting_put_and_marks_the_journal_unhealthy(tmp_path):
    from queuekit.journal import JournalError

    journal = SqliteJournal(str(tmp_path / "d"), sync="normal")
    broker = Broker(journal=journal)
    broker.put_many("q", ['"stored"'])
    journal._db.execute("PRAGMA query_only = ON")  # every write now fails, like a read-only disk
    with pytest.raises(JournalError, match="commit failed"):
        broker.put_many("q", ['"lost"'])
    assert broker.qsize("q") == 1  # the failed put never became visible
    assert not journal.healthy
    with pytest.raises(JournalError):
        broker.put_many("q", ['"also refused"'])
    journal._db.execute("PRAGMA query_only = OFF")
    journal.close()


def test_failed_commit_is_reported_to_when_committed_and_nothing_becomes_visible(tmp_path):
    from queuekit.journal import JournalError

    journal = SqliteJournal(str(tmp_path / "d"), sync="normal")
    broker = Broker(journal=journal)
    journal._db.execute("PRAGMA query_only = ON")  # every write now fails, like a read-only disk
    put = broker.begin_put("q", ['"lost"'])
    outcomes = []
    done = threading.Event()
    broker.when_committed(put.seq, lambda error: (outcomes.append(error), done.set()))
    assert done.wait(10)
    assert len(outcomes) == 1 and isinstance(outcomes[0], JournalError)
    assert broker.qsize("q") == 0
    broker.when_committed(put.seq + 1, outcomes.append)  # a failed journal answers at once
    assert isinstance(outcomes[1], JournalError)
    journal._db.execute("PRAGMA query_only = OFF")
    journal.close()
