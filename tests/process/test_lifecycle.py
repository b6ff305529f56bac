"""Task lifecycle against a real server (issue 13): ids and status, results, cancellation,
headers and timeouts, several queues per get, heartbeats, bad input, authorization."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import queuekit
from queuekit.errors import (
    InvalidRequest,
    PayloadError,
    PayloadTooLarge,
    PermissionDenied,
    ResultExpired,
    ResultTimeout,
    TaskCancelled,
    TaskDead,
)
from support.procs import ServerProc, base_env, wait_until, write_key


def test_status_through_the_life_of_a_task(client):
    q = client.queue("life")
    before = time.time()
    task_id = q.put({"n": 1}, headers={"trace": "abc"}, timeout=12.5)
    st = q.status(task_id)
    assert (st.id, st.queue, st.state, st.attempts, st.started_at, st.finished_at) == (
        task_id,
        "life",
        "ready",
        0,
        None,
        None,
    )
    assert before - 1 <= st.enqueued_at <= time.time() + 1

    task = q.get(timeout=5)
    assert (task.id, task.headers, task.timeout) == (task_id, {"trace": "abc"}, 12.5)
    st = q.status(task_id)
    assert st.state == "inflight" and st.consumer == client.name and st.started_at >= st.enqueued_at

    q.nack(task, delay=0, error="boom")
    st = q.status(task_id)
    assert (st.state, st.attempts, st.last_error) == ("failed", 1, "boom")

    task = q.get(timeout=5)
    q.ack(task, result={"sum": 42})
    st = q.status(task_id)
    assert (st.state, st.attempts, st.has_result) == ("succeeded", 1, True)
    assert st.finished_at >= st.started_at
    assert q.result(task_id, timeout=1) == {"sum": 42}
    assert client.status(task_id).state == "succeeded"  # no queue named: found anyway
    assert client.queue("other").status(task_id).state == "unknown"  # of another queue: not shown there

    delayed = q.put("later", delay=60)
    assert q.status(delayed).state == "delayed"
    assert client.status(123).state == "unknown"


def test_result_waits_server_side_and_arrives_when_acked(server, client, key_file):
    q = client.queue("res")
    task_id = q.put("x")
    got = []
    waiter = threading.Thread(target=lambda: got.append(q.result(task_id, timeout=20)))
    waiter.start()
    # The wait is parked in the server (a result waiter, no polling).
    wait_until(lambda: client.stats()["results"]["waiting"] == 1, timeout=5, what="a parked result wait")
    assert got == []
    with queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5) as consumer:
        task = consumer.queue("res").get(timeout=5)
        consumer.queue("res").get_many(1, 0, ack=[task], results={task.id: [1, 2, 3]})
    waiter.join(10)
    assert got == [[1, 2, 3]]
    with pytest.raises(ResultTimeout):
        q.result(q.put("never taken"), timeout=0.3)
    with pytest.raises(ResultExpired):
        q.result(999, timeout=1)
    # A handler that returned None: succeeded without a result.
    q2 = client.queue("res2")
    none_id = q2.put("y")
    q2.ack(q2.get(timeout=5))
    assert q2.result(none_id, timeout=1) is None and not q2.status(none_id).has_result


def test_call_round_trip_with_a_consumer(server, client, key_file):
    def consume():
        with queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5) as c:
            cq = c.queue("calls")
            done = []
            for _ in range(200):  # bounded
                tasks = cq.get_many(10, 0.2, ack=done[:], results={t.id: t.payload * 2 for t in done})
                done = tasks
                if stop.is_set() and not tasks:
                    return

    stop = threading.Event()
    t = threading.Thread(target=consume)
    t.start()
    try:
        assert [client.queue("calls").call(n, timeout=10) for n in range(5)] == [0, 2, 4, 6, 8]
    finally:
        stop.set()
        t.join(20)


def test_dead_task_raises_task_dead(tmp_path, key_file):
    server = ServerProc(tmp_path, key_file, "--max-attempts", "1")
    with queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5) as c:
        q = c.queue("d")
        task_id = q.put("x")
        for _ in range(2):
            q.nack(q.get(timeout=5), delay=0, error="bad input")
        assert q.status(task_id).state == "dead"
        with pytest.raises(TaskDead, match="bad input"):
            q.result(task_id, timeout=1)
    server.stop()


def test_cancel_before_and_during_execution(server, client, key_file):
    q = client.queue("cx")
    waiting_id = q.put("a")
    waiter = []
    t = threading.Thread(target=lambda: waiter.append(_raises(lambda: q.result(waiting_id, timeout=20))))
    t.start()
    assert q.cancel(waiting_id) == "cancelled"
    t.join(10)
    assert waiter == [TaskCancelled]
    assert q.status(waiting_id).state == "cancelled"
    assert q.cancel(waiting_id) == "cancelled"

    running_id = q.put("b")
    with queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5) as consumer:
        cq = consumer.queue("cx")
        task = cq.get(timeout=5)
        assert task.id == running_id
        assert cq.heartbeat([task]) == ([], [])
        assert q.cancel(running_id) == "cancelling"
        assert cq.heartbeat([task]) == ([], [running_id])  # the flag reaches the holder
        assert q.status(running_id).state == "inflight"
        cq.ack(task, result="ignored")
    assert q.status(running_id).state == "cancelled"
    with pytest.raises(TaskCancelled):
        q.result(running_id, timeout=1)
    # A nacked cancelled task is not retried either.
    nacked_id = q.put("c")
    task = q.get(timeout=5)
    assert q.cancel(nacked_id) == "cancelling"
    q.nack(task, delay=0, error="stopped")
    assert q.status(nacked_id).state == "cancelled" and q.qsize() == 0
    assert q.cancel(12345) == "unknown"


def _raises(fn):
    try:
        fn()
    except Exception as e:
        return type(e)
    return None


def test_several_queues_in_strict_priority_one_waiter(server, client, key_file):
    for name, n in (("low", 3), ("default", 2), ("high", 2)):
        client.queue(name).put_many([f"{name}{i}" for i in range(n)])
    qs = client.queues(["high", "default", "low"])
    got = qs.get_many(5, 1)
    assert [t.payload for t in got] == ["high0", "high1", "default0", "default1", "low0"]
    assert [t.queue for t in got] == ["high", "high", "default", "default", "low"]
    hb = qs.heartbeat(got)
    assert hb.lost == [] and hb.cancelled == []
    assert qs.nack_many([(got[0], 0, "x")]) == 1
    assert qs.release(got[1:3]) == 2
    rest = qs.get_many(10, 1, ack=got[3:])
    assert sorted(t.payload for t in rest) == ["default0", "high0", "high1", "low1", "low2"]
    assert client.queue("default").status(got[3].id).state == "succeeded"
    qs.get_many(1, 0, ack=rest)

    # One parked get over three empty queues: a put to any of them wakes it, once.
    answer = []
    t = threading.Thread(target=lambda: answer.append(qs.get_many(10, 20)))
    t.start()
    wait_until(
        lambda: all(client.stats()["queues"][n]["waiting"] == 1 for n in qs.names), timeout=5, what="one parked take"
    )
    client.queue("low").put("wake")
    t.join(10)
    assert [(x.queue, x.payload) for x in answer[0]] == [("low", "wake")]
    assert all(client.stats()["queues"][n]["waiting"] == 0 for n in qs.names)


def test_bad_input_is_refused_clearly_and_loses_nothing(server, client, key_file):
    q = client.queue("bad")
    with pytest.raises(InvalidRequest, match="at most 64 headers"):
        q.put("x", headers={str(i): "v" for i in range(65)})
    with pytest.raises(InvalidRequest, match="8192"):
        q.put("x", headers={"h": "v" * 9000})
    with pytest.raises(InvalidRequest, match="str value"):
        q.put("x", headers={"h": 1})
    with pytest.raises(InvalidRequest, match="timeout"):
        q.put("x", timeout=-1)
    # The server checks too (a client may not be ours): raw calls.
    with pytest.raises(InvalidRequest, match="header names"):
        client.call("put_many", "bad", ['"x"'], 0.0, {"": "v"}, None)
    with pytest.raises(InvalidRequest, match="task id"):
        client.call("status", "bad", "12")
    with pytest.raises(InvalidRequest, match="queue names"):
        client.call("take", [], 1, 0.0, None, None, None)
    assert q.qsize() == 0

    task_id = q.put("keep")
    task = q.get(timeout=5)
    limit = client.max_result_bytes
    with pytest.raises(PayloadTooLarge, match="QUEUEKIT_MAX_RESULT_BYTES"):
        q.ack(task, result="r" * (limit + 1))
    with pytest.raises(PayloadError, match="result"):
        q.ack(task, result={1: "int key"})
    with pytest.raises(PayloadTooLarge, match="QUEUEKIT_MAX_RESULT_BYTES"):
        client.call("take", ["bad"], 1, 0.0, None, [task.id], {task.id: '"' + "r" * limit + '"'})
    with pytest.raises(PayloadError, match="not valid JSON"):
        client.call("ack_many", "bad", [task.id], {task.id: "{nope"})
    assert q.status(task_id).state == "inflight"  # the refused acks did nothing
    q.ack(task, result="fine")
    assert q.result(task_id, timeout=1) == "fine"


def test_new_methods_follow_the_roles(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("producer.p", "consumer.c", "admin.a"):
        write_key(keys / name)
    (keys / "producer.limited").write_text("z" * 40)
    write_key(keys / "producer.limited")
    (keys / "producer.limited.queues").write_text("jobs\n")
    server = ServerProc(tmp_path, keys / "admin.a", "--keys-dir", str(keys))

    def connect(name):
        return queuekit.connect(server.address, authkey_file=str(keys / name), connect_timeout=5)

    with connect("producer.p") as p, connect("consumer.c") as c, connect("producer.limited") as lim:
        task_id = p.queue("jobs").put("x")
        assert p.queue("jobs").status(task_id).state == "ready"
        assert lim.queue("jobs").status(task_id).state == "ready"
        with pytest.raises(PermissionDenied):
            lim.status(task_id)  # any queue: not for a key limited to queues
        with pytest.raises(PermissionDenied):
            lim.queue("other").status(task_id)
        with pytest.raises(PermissionDenied):
            c.queue("jobs").status(task_id)
        with pytest.raises(PermissionDenied):
            c.queue("jobs").cancel(task_id)
        with pytest.raises(PermissionDenied):
            p.queue("jobs").get_many(1, 0)  # take is the consumer's
        with pytest.raises(PermissionDenied):
            lim.queues(["jobs", "other"]).get_many(1, 0)
        task = c.queue("jobs").get(timeout=5)
        assert c.queue("jobs").heartbeat([task]).lost == []
        with pytest.raises(PermissionDenied):
            p.queue("jobs").heartbeat([task])
        assert p.queue("jobs").cancel(task_id) == "cancelling"
        c.queue("jobs").ack(task)
        with pytest.raises(TaskCancelled):
            p.queue("jobs").result(task_id, timeout=1)
    server.stop()


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat (fields 14 and 15, in clock ticks)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_thousand_results_waited_for_by_twenty_clients_without_polling(server, client, key_file):
    q = client.queue("many")
    ids = q.put_many(list(range(1000)))
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def wait_for(chunk):
        try:
            with queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=10) as c:
                for task_id in chunk:
                    results[task_id] = c.queue("many").result(task_id, timeout=60)
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=wait_for, args=(ids[i::20],)) for i in range(20)]
    for t in threads:
        t.start()
    wait_until(lambda: client.stats()["results"]["waiting"] == 20, timeout=30, what="20 parked result waits")
    # While they wait, the server does nothing: no thread per waiter, no polling.
    before, start = _cpu_seconds(server.pid), time.monotonic()
    time.sleep(2.0)  # the measurement window itself (not waiting for a condition)
    used = _cpu_seconds(server.pid) - before
    elapsed = time.monotonic() - start
    assert used < 0.1 * elapsed, f"server used {used:.3f} s of CPU in {elapsed:.2f} s with 20 idle waiters"

    with queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5) as consumer:
        cq = consumer.queue("many")
        done: list = []
        for _ in range(200):  # bounded: 1000 tasks in batches of up to 100
            tasks = cq.get_many(100, 1, ack=done, results={t.id: t.payload * 3 for t in done})
            done = tasks
            if not tasks:
                break
    for t in threads:
        t.join(60)
    assert errors == []
    assert results == {task_id: n * 3 for n, task_id in enumerate(ids)}


def test_status_results_and_cancellations_survive_sigkill_of_a_durable_server(tmp_path, key_file):
    data = str(tmp_path / "data")
    server = ServerProc(tmp_path, key_file, "--data-dir", data, "--sync", "full")
    with queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5) as c:
        q = c.queue("durable")
        done_id, running_id, flagged_id, waiting_id = q.put_many(["done", "running", "flagged", "waiting"])
        q.put("late", delay=3600)
        done, running, flagged = q.get_many(3, 5)
        q.ack(done, result={"ok": True})
        assert q.cancel(flagged_id) == "cancelling"
        assert q.cancel(waiting_id) == "cancelled"
        # Acks and cancels are written behind; a put waits for a commit, which carries them along.
        q.put("barrier")
    server.signal(signal.SIGKILL)
    server.wait()

    server = ServerProc(tmp_path, key_file, "--data-dir", data, "--sync", "full")
    with queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5) as c:
        q = c.queue("durable")
        assert q.result(done_id, timeout=1) == {"ok": True}
        st = q.status(done_id)
        assert (st.state, st.consumer, st.has_result) == ("succeeded", c.name, True)
        assert q.status(running_id).state == "ready"  # in flight at the kill: redelivered
        assert q.status(flagged_id).state == "cancelled"  # flagged in flight: not redelivered
        assert q.status(waiting_id).state == "cancelled"
        again = q.get_many(10, 1)
        assert sorted(t.payload for t in again) == ["barrier", "running"]
        q.ack([t for t in again if t.id == running_id][0], result=7)
    server.stop()
    server = ServerProc(tmp_path, key_file, "--data-dir", data, "--sync", "full")
    with queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5) as c:
        assert c.queue("durable").result(running_id, timeout=1) == 7
    server.stop()


CONSUMER_THAT_DIES = """
import sys, time, queuekit
c = queuekit.connect(sys.argv[1], authkey_file=sys.argv[2], connect_timeout=5, name="doomed")
task = c.queue("redo").get(timeout=10, lease=1.0)
print("holding", task.id, flush=True)
time.sleep(120)
"""


def test_result_of_a_task_whose_consumer_was_sigkilled_comes_from_the_redelivery(tmp_path, server, client, key_file):
    q = client.queue("redo")
    task_id = q.put({"x": 2})
    script = tmp_path / "doomed.py"
    script.write_text(CONSUMER_THAT_DIES)
    env = {**os.environ, "PYTHONPATH": str(Path(queuekit.__file__).parents[1])}
    doomed = subprocess.Popen(
        [sys.executable, str(script), server.address, str(key_file)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert doomed.stdout.readline().split() == ["holding", str(task_id)]
        assert q.status(task_id).consumer == "doomed"
        doomed.kill()  # SIGKILL before acking
        doomed.wait(10)
    finally:
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait(10)
    waited = []
    waiter = threading.Thread(target=lambda: waited.append(q.result(task_id, timeout=30)))
    waiter.start()
    with queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5, name="second") as c2:
        task = c2.queue("redo").get(timeout=15)  # after the 1 s lease expired
        assert (task.id, task.attempts, task.delivery) == (task_id, 1, 2)
        c2.queue("redo").ack(task, result=task.payload["x"] * 10)
    waiter.join(15)
    assert waited == [20]
    st = q.status(task_id)
    assert (st.state, st.attempts, st.consumer) == ("succeeded", 1, "second")
    assert "lease expired" in st.last_error


V1_JOURNAL = Path(__file__).parent / "data" / "journal-v1.db"


def test_a_version_1_journal_is_migrated_in_place_with_its_tasks(tmp_path, key_file):
    """data/journal-v1.db was written by the server code of 7ee8064 (journal schema 1, before the
    task lifecycle): three ready tasks (one of them in flight when it closed), one delayed, one
    dead after two failures, one acked. The delayed one's not_before was then set to 2100-01-01 in
    the file (sqlite3, nothing else changed): written as "an hour from now", it became ready an hour
    after the file was made and the test failed from then on."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    shutil.copy(V1_JOURNAL, data / "queuekit.db")
    os.chmod(data / "queuekit.db", 0o600)
    server = ServerProc(tmp_path, key_file, "--data-dir", str(data))
    server.wait_for("event=journal_migrated")
    with queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5) as c:
        q = c.queue("v1")
        assert c.stats()["queues"]["v1"]["delayed"] == 1
        tasks = q.get_many(10, 1)
        assert [t.payload for t in tasks] == [{"n": 1}, {"n": 2}, "three"]
        assert {(t.headers, t.timeout) for t in tasks} == {(None, None)}
        dead = c.queue("other").dead_list()
        assert [(d["payload"], d["attempts"], d["last_error"]) for d in dead] == [("[1,2]", 2, "second failure")]
        assert c.status(dead[0]["id"]).state == "dead"
        q.ack(tasks[0], result="v2 result")
        new_id = q.put("new", headers={"h": "v"}, timeout=3.0)
    server.stop()
    db = sqlite3.connect(data / "queuekit.db")
    assert db.execute("PRAGMA user_version").fetchone() == (2,)
    db.close()
    server = ServerProc(tmp_path, key_file, "--data-dir", str(data))
    assert "journal_migrated" not in server.log()
    with queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5) as c:
        q = c.queue("v1")
        assert q.result(tasks[0].id, timeout=1) == "v2 result"
        assert q.status(tasks[1].id).state == "inflight"  # a graceful stop saved its lease
        got = q.get_many(10, 1)
        assert [(t.payload, t.headers, t.timeout) for t in got if t.id == new_id] == [("new", {"h": "v"}, 3.0)]
    server.stop()


def _http(port: int, path: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_task_status_over_http_and_the_commands(tmp_path, key_file):
    token = "t" * 40
    (tmp_path / "token").write_text(token)
    server = ServerProc(tmp_path, key_file, "--http-token-file", str(tmp_path / "token"))
    with queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5) as c:
        q = c.queue("web")
        task_id = q.put("x")
        assert _http(server.http_port, f"/tasks/{task_id}")[0] == 401  # the same token rule as /stats
        code, body = _http(server.http_port, f"/tasks/{task_id}", token)
        assert code == 200 and json.loads(body)["state"] == "ready" and json.loads(body)["queue"] == "web"
        assert _http(server.http_port, "/tasks/42", token)[0] == 404
        assert _http(server.http_port, "/tasks/abc", token)[0] == 400

        def cli(*args):
            return subprocess.run(
                [sys.executable, "-m", "queuekit", *args, "--server", server.address, "--authkey-file", str(key_file)],
                capture_output=True,
                text=True,
                env=base_env(),
                timeout=60,
            )

        out = cli("status", str(task_id))
        assert out.returncode == 0 and json.loads(out.stdout)["state"] == "ready"
        q.ack(q.get(timeout=5), result={"answer": 42})
        out = cli("result", str(task_id), "--queue", "web", "--timeout", "5")
        assert out.returncode == 0 and json.loads(out.stdout) == {"answer": 42}
        other = q.put("y")
        out = cli("cancel", str(other))
        assert (out.returncode, out.stdout.strip()) == (0, f"state=cancelled id={other}")
        out = cli("result", str(other), "--timeout", "5")
        assert out.returncode == 1 and "cancelled" in out.stderr
        out = cli("result", str(q.put("z")), "--timeout", "0.5")
        assert out.returncode == 1 and "did not finish within 0.5 s" in out.stderr
        assert json.loads(_http(server.http_port, f"/tasks/{other}", token)[1])["state"] == "cancelled"
    server.stop()


def test_the_calls_of_older_clients_keep_their_answers(client):
    """What a client of the previous version sends (put_many without headers/timeout, get_many,
    ack_many without results, extend_many) is answered as before: get_many's 5-tuples."""
    (task_id,) = client.call("put_many", "old", ['"a"'], 0.0)
    items = client.call("get_many", "old", 10, 0.0, None, None)
    assert len(items) == 1 and type(items[0]) is tuple and len(items[0]) == 5
    assert items[0][:4] == (task_id, 1, 0, '"a"')
    assert client.call("extend_many", "old", [(task_id, 1)], None) == []
    assert client.call("ack_many", "old", [task_id]) == 1
    assert client.queue("old").status(task_id).state == "succeeded"
