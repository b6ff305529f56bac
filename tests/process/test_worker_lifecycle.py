"""Real `queuekit consume` processes against a real server: task context, results, timeouts in
both pools, cancellation, several queues, and the consumer's probes (issue 13, issue 15 item 5)."""

import os
import subprocess
import sys

import pytest
from handlers import read_record

import queuekit
from support.procs import Proc, ServerProc, base_env, wait_until

FAST_RETRY = {"QUEUEKIT_RETRY_BASE_SECONDS": "0.05", "QUEUEKIT_RETRY_MAX_SECONDS": "0.1"}


def consumer(tmp_path, server, key_file, *args, name="consumer", **env):
    argv = ["consume", "--server", server.address, "--authkey-file", str(key_file), *args]
    environment = base_env(
        QK_RECORD=str(tmp_path / "record"), QUEUEKIT_HEALTH_FILE=str(tmp_path / f"{name}.health"), **env
    )
    proc = Proc(name, argv, tmp_path, environment)
    proc.wait_for("event=consumer_started")
    return proc


def probe(tmp_path, which, name="consumer"):
    argv = [sys.executable, "-m", "queuekit", "consume", "--probe", which]
    env = base_env(QUEUEKIT_HEALTH_FILE=str(tmp_path / f"{name}.health"))
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)


def fast_server(tmp_path, key_file, *args, **env):
    return ServerProc(tmp_path, key_file, *args, env=base_env(**FAST_RETRY, **env))


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child that its parent has not reaped yet is a zombie: gone for our purpose.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_context_fields_headers_attempts_and_result(tmp_path, key_file):
    server = fast_server(tmp_path, key_file)
    c = queuekit.connect(server.address, authkey_file=str(key_file))
    q = c.queue("jobs")
    consumer(
        tmp_path, server, key_file, "--queue", "jobs", "--handler", "handlers:with_context", "--task-timeout", "60"
    )
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "key": "ä b=c"}
    task_id = q.put({"n": 1, "fail_first": True}, headers=headers)
    value = q.result(task_id, timeout=20)
    assert value["id"] == task_id
    assert value["queue"] == "jobs"
    assert value["attempt"] == 2  # the first attempt failed on purpose and was retried
    assert value["delivery"] >= 2
    assert value["headers"] == headers  # untouched
    assert value["same_as_current_task"] is True
    assert abs(value["deadline"] - (value["enqueued_at"] + 60)) < 30  # the consumer's timeout, wall clock
    status = q.status(task_id)
    assert status.state == "succeeded" and status.attempts >= 1
    assert status.consumer.startswith("consume@") and status.consumer.endswith(":" + str(_consumer_pid(tmp_path)))

    # A task without headers: an empty mapping, a per-task timeout wins over the consumer's.
    task_id = q.put({"n": 2}, timeout=5)
    value = q.result(task_id, timeout=20)
    assert value["headers"] == {} and value["attempt"] == 1
    assert value["deadline"] - value["enqueued_at"] < 20


def _consumer_pid(tmp_path):
    return next(pid for what, pid, _ in read_record(tmp_path / "record") if what.startswith("ctx-"))


def test_current_task_in_a_one_parameter_handler(tmp_path, server, key_file, client):
    consumer(tmp_path, server, key_file, "--handler", "handlers:via_current_task")
    q = client.queue("tasks")
    task_id = q.put({"n": 1}, headers={"idempotency-key": "k-1"})
    assert q.result(task_id, timeout=20) == {"id": task_id, "attempt": 1, "headers": {"idempotency-key": "k-1"}}
    # Outside a handler it is a clear error.
    with pytest.raises(queuekit.NoTaskContext, match="outside a queuekit handler"):
        queuekit.current_task()


def test_unencodable_result_nacks_the_task_with_a_clear_error(tmp_path, key_file):
    server = fast_server(tmp_path, key_file, "--max-attempts", "0")
    c = queuekit.connect(server.address, authkey_file=str(key_file))
    q = c.queue("tasks")
    worker = consumer(tmp_path, server, key_file, "--handler", "handlers:bad_result")
    not_json = q.put({"n": 1})
    too_big = q.put({"n": 2, "big": c.max_result_bytes + 1})
    wait_until(lambda: q.status(not_json).state == "dead" and q.status(too_big).state == "dead", what="dead letters")
    assert "unencodable result" in q.status(not_json).last_error and "set" in q.status(not_json).last_error
    assert (
        f"{c.max_result_bytes + 3} bytes" in q.status(too_big).last_error
        and f"limit is {c.max_result_bytes}" in q.status(too_big).last_error
    )
    with pytest.raises(queuekit.errors.TaskDead, match="unencodable result"):
        q.result(not_json, timeout=5)
    assert worker.log().count("unencodable result") == 2  # and each said so in the log


def test_thread_pool_timeout_nacks_retries_and_abandoned_threads_fail_liveness(tmp_path, key_file):
    server = fast_server(tmp_path, key_file, "--max-attempts", "1")
    c = queuekit.connect(server.address, authkey_file=str(key_file))
    q = c.queue("tasks")
    # No consumer default: the tasks' own timeouts apply.
    worker = consumer(
        tmp_path, server, key_file, "--handler", "handlers:sleepy", "--concurrency", "2", "--task-timeout", "0"
    )
    assert probe(tmp_path, "live").returncode == 0
    hung = q.put({"n": 1, "s": 120}, timeout=0.5)
    # Attempt 1 times out, is retried (with backoff), times out again: dead, error "timeout".
    wait_until(lambda: q.status(hung).state == "dead", timeout=20, what="the hung task dead-lettered")
    status = q.status(hung)
    assert status.last_error == "timeout" and status.attempts == 2
    assert worker.log().count("event=task_timeout") == 2
    # Two threads abandoned = the concurrency: capacity was kept (a fresh thread each time)...
    quick = q.put({"n": 2})
    assert q.result(quick, timeout=10) == worker.pid
    # ...but the worker reports itself stuck, so an orchestrator restarts it; readiness says so too.
    wait_until(lambda: probe(tmp_path, "live").returncode != 0, timeout=10, what="liveness to fail")
    out = probe(tmp_path, "live")
    assert out.returncode == 5 and "2 abandoned handler threads" in out.stderr
    assert probe(tmp_path, "ready").returncode != 0


def test_thread_pool_one_abandoned_thread_below_concurrency_stays_live(tmp_path, server, key_file, client):
    q = client.queue("tasks")
    worker = consumer(
        tmp_path, server, key_file, "--handler", "handlers:sleepy", "--concurrency", "2", "--task-timeout", "0.5"
    )
    q.put({"n": 1, "s": 120})
    worker.wait_for("event=task_timeout .*abandoned_threads=1")
    done = q.put({"n": 2})
    assert q.result(done, timeout=10) == worker.pid
    wait_until(lambda: "abandoned" not in (tmp_path / "consumer.health").read_text(), what="a fresh health file")
    assert probe(tmp_path, "live").returncode == 0


def test_process_pool_kills_an_overrunning_child_and_replaces_it(tmp_path, key_file):
    server = fast_server(tmp_path, key_file, "--max-attempts", "0")
    c = queuekit.connect(server.address, authkey_file=str(key_file))
    q = c.queue("tasks")
    worker = consumer(
        tmp_path, server, key_file, "--handler", "handlers:sleepy", "--pool", "process", "--task-timeout", "1"
    )
    first_child = q.result(q.put({"n": 0}), timeout=20)
    assert first_child != worker.pid and pid_alive(first_child)  # ran in a child process
    hung = q.put({"n": 1, "s": 120})
    wait_until(lambda: q.status(hung).state == "dead", timeout=20, what="the hung task timed out")
    assert q.status(hung).last_error == "timeout"
    worker.wait_for("event=handler_child_replaced")
    assert not pid_alive(first_child)  # killed, not abandoned
    second_child = q.result(q.put({"n": 2}), timeout=20)
    assert second_child not in (first_child, worker.pid)
    assert probe(tmp_path, "live").returncode == 0  # nothing is stuck: the seat was freed for real

    # A child that dies mid-task (os._exit): the task fails with a clear error, a new child takes over.
    crashed = q.put({"n": 3, "crash": True})
    wait_until(lambda: q.status(crashed).state == "dead", timeout=20, what="the crashed task failed")
    assert "died (exit code 3)" in q.status(crashed).last_error
    third_child = q.result(q.put({"n": 4}), timeout=20)
    assert third_child not in (second_child, worker.pid)
    assert worker.stop() == 0
    assert not pid_alive(third_child)  # the drain stopped the children too


def test_cancel_reaches_ctx_in_the_thread_pool(tmp_path, server, key_file, client):
    q = client.queue("tasks")
    consumer(tmp_path, server, key_file, "--handler", "handlers:until_cancelled", "--lease", "1.5")
    task_id = q.put({"n": 7})
    wait_until(lambda: ("start", _pid_of(tmp_path, "start"), 7) in read_record(tmp_path / "record"), what="start")
    assert q.cancel(task_id) == "cancelling"
    wait_until(lambda: any(r[0] == "cancelled" for r in read_record(tmp_path / "record")), what="ctx.cancelled")
    wait_until(lambda: q.status(task_id).state == "cancelled", what="the task recorded cancelled")
    with pytest.raises(queuekit.errors.TaskCancelled):
        q.result(task_id, timeout=5)


def _pid_of(tmp_path, what):
    rows = [pid for w, pid, _ in read_record(tmp_path / "record") if w == what]
    return rows[0] if rows else None


def test_cancel_kills_the_child_in_the_process_pool(tmp_path, server, key_file, client):
    q = client.queue("tasks")
    worker = consumer(tmp_path, server, key_file, "--handler", "handlers:sleepy", "--pool", "process", "--lease", "1.5")
    task_id = q.put({"n": 8, "s": 120})
    child = wait_until(lambda: _pid_of(tmp_path, "start"), what="the child to start the task")
    assert q.cancel(task_id) == "cancelling"
    wait_until(lambda: not pid_alive(child), timeout=10, what="the child killed")
    wait_until(lambda: q.status(task_id).state == "cancelled", what="the task recorded cancelled")
    assert "event=task_cancelled" in worker.log()
    # The seat has a new child and works.
    assert q.result(q.put({"n": 9}), timeout=20) not in (child, worker.pid)


def test_several_queues_in_strict_priority_order(tmp_path, server, key_file, client):
    low, high = client.queue("low"), client.queue("high")
    low.put_many([{"n": n} for n in range(20)])
    high.put_many([{"n": 100 + n} for n in range(20)])
    worker = consumer(
        tmp_path, server, key_file, "--queue", "high,low", "--handler", "handlers:with_context", "--prefetch", "4"
    )
    wait_until(lambda: len(read_record(tmp_path / "record")) == 40, what="all 40 tasks")
    order = [what for what, _, _ in read_record(tmp_path / "record")]
    assert order == ["ctx-high"] * 20 + ["ctx-low"] * 20
    assert "queue=high,low" in worker.log()


def test_the_health_file_is_there_from_the_start(tmp_path, server, key_file):
    """A probe run as soon as the consumer says it started finds the health file (live, not yet
    necessarily ready), however fast the server answered: it is written before the consumer connects."""
    consumer(tmp_path, server, key_file, "--handler", "handlers:record")
    assert (tmp_path / "consumer.health").exists(), "consumer_started logged before the health file was written"
    assert probe(tmp_path, "live").returncode == 0


def test_liveness_ignores_the_server_readiness_follows_it(tmp_path, key_file):
    server = ServerProc(tmp_path, key_file)
    worker = consumer(tmp_path, server, key_file, "--handler", "handlers:record", "--connect-timeout", "60")
    wait_until(lambda: probe(tmp_path, "ready").returncode == 0, what="ready")
    assert probe(tmp_path, "live").returncode == 0
    server.stop()
    wait_until(lambda: probe(tmp_path, "ready").returncode == 5, timeout=15, what="readiness to fail")
    assert "server" in probe(tmp_path, "ready").stderr
    assert probe(tmp_path, "live").returncode == 0  # a server outage restarts no consumer
    server = ServerProc(tmp_path, key_file, port=server.port)
    wait_until(lambda: probe(tmp_path, "ready").returncode == 0, timeout=30, what="ready again")
    assert worker.stop() == 0
    assert not (tmp_path / "consumer.health").exists()  # removed at exit
    out = probe(tmp_path, "live")
    assert out.returncode == 5 and "no consumer health file" in out.stderr
