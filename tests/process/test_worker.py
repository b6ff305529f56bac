"""Real `queuekit consume` processes: redelivery after SIGKILL, SIGTERM drain, retries, produce."""

import signal
import subprocess
import sys
import time

import pytest
from handlers import read_record

import queuekit
from queuekit.errors import ExitCode
from support.procs import Proc, ServerProc, base_env, wait_until


def consumer(tmp_path, server, key_file, *args, name="consumer", **env):
    argv = ["consume", "--server", server.address, "--authkey-file", str(key_file), *args]
    proc = Proc(name, argv, tmp_path, base_env(QK_RECORD=str(tmp_path / "record"), **env))
    proc.wait_for("event=consumer_started")
    return proc


def cli(server, key_file, *args, input=None):
    """Run `queuekit <args>` against the server; returns the CompletedProcess."""
    argv = [sys.executable, "-m", "queuekit", *args, "--server", server.address, "--authkey-file", str(key_file)]
    return subprocess.run(argv, input=input, capture_output=True, text=True, env=base_env(), timeout=30)


def test_consumer_killed_mid_task_its_task_goes_to_another(tmp_path, server, key_file, client):
    record = tmp_path / "record"
    victim = consumer(
        tmp_path,
        server,
        key_file,
        "--handler",
        "handlers:record",
        "--lease",
        "2",
        "--prefetch",
        "0",
        name="victim",
        QK_HANG="1",
    )
    client.queue("tasks").put({"n": 42})
    wait_until(lambda: ("start", victim.pid, 42) in read_record(record), what="victim to start the task")
    victim.signal(signal.SIGKILL)
    victim.wait(5)
    t_kill = time.monotonic()
    rescuer = consumer(tmp_path, server, key_file, "--handler", "handlers:record", "--lease", "2", name="rescuer")
    wait_until(lambda: ("done", rescuer.pid, 42) in read_record(record), what="redelivery to the rescuer")
    assert time.monotonic() - t_kill < 10
    # The rescuer's ack rides on its next get, at most FETCH_WAIT (1 s) later.
    wait_until(lambda: client.stats()["queues"]["tasks"]["acked"] == 1, timeout=5, what="ack")
    stats = client.stats()["queues"]["tasks"]
    assert stats["redelivered"] == 1 and stats["acked"] == 1 and stats["inflight"] == 0
    assert rescuer.stop() == 0


def test_sigterm_drains_in_flight_and_releases_the_rest(tmp_path, server, key_file, client):
    record = tmp_path / "record"
    q = client.queue("tasks")
    q.put_many([{"n": n, "ms": 1500} for n in range(10)])
    worker = consumer(
        tmp_path, server, key_file, "--handler", "handlers:record", "--concurrency", "2", "--prefetch", "4"
    )
    wait_until(lambda: len([r for r in read_record(record) if r[0] == "start"]) == 2, what="two tasks started")
    assert client.stats()["queues"]["tasks"]["inflight"] == 6  # 2 running + 4 prefetched
    t0 = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert time.monotonic() - t0 < 5
    rows = read_record(record)
    started = {n for what, _, n in rows if what == "start"}
    done = {n for what, _, n in rows if what == "done"}
    assert started == done and len(done) == 2  # in-flight work finished, nothing new was started
    assert "released=4" in worker.log()
    stats = client.stats()["queues"]["tasks"]
    assert (stats["ready"], stats["inflight"], stats["acked"]) == (8, 0, 2)
    rest = q.get_many(10)
    assert len(rest) == 8 and all(t.attempts == 0 for t in rest)  # released without charging an attempt
    assert {t.payload["n"] for t in rest} | done == set(range(10))


def test_second_sigterm_exits_at_once(tmp_path, server, key_file, client):
    record = tmp_path / "record"
    client.queue("tasks").put({"n": 1, "ms": 60_000})
    worker = consumer(tmp_path, server, key_file, "--handler", "handlers:record", "--drain-timeout", "25")
    wait_until(lambda: ("start", worker.pid, 1) in read_record(record), what="the handler to start the task")
    worker.signal(signal.SIGTERM)
    worker.wait_for("event=consumer_draining running=1")  # the first one drains: it waits for the handler
    t0 = time.monotonic()
    worker.signal(signal.SIGTERM)
    try:
        code = worker.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 10 s after the second SIGTERM:\n{worker.log()[-2000:]}")
    took = time.monotonic() - t0
    # At once: not after the handler's 60 s nor the 25 s drain, and without the drain's clean exit.
    assert code == ExitCode.ERROR, f"exit code {code} after a second SIGTERM:\n{worker.log()}"
    assert took < 2, f"took {took:.1f}s to exit after the second SIGTERM"
    assert ("done", worker.pid, 1) not in read_record(record)  # the handler was still running
    assert "event=consumer_stopped" not in worker.log()  # no drain completed
    assert client.stats()["queues"]["tasks"]["inflight"] == 1  # held until its lease expires


def test_failing_handler_retries_then_dead_letters(tmp_path, key_file):
    server = ServerProc(
        tmp_path,
        key_file,
        "--max-attempts",
        "2",
        env=base_env(QUEUEKIT_RETRY_BASE_SECONDS="0.05", QUEUEKIT_RETRY_MAX_SECONDS="0.1"),
    )
    worker = consumer(tmp_path, server, key_file, "--handler", "handlers:always_fail")
    c = queuekit.connect(server.address, authkey_file=str(key_file))
    c.queue("tasks").put({"n": 7})
    wait_until(lambda: c.stats()["queues"]["tasks"]["dead"] == 1, what="dead letter")
    assert worker.log().count("event=task_failed") == 3  # max_attempts=2: three failures
    assert "handler refuses" in worker.log() and "traceback=" in worker.log()
    server.wait_for("event=dead_lettered queue=tasks")
    out = cli(server, key_file, "dead", "list", "--queue", "tasks")
    assert out.returncode == 0 and '"attempts": 3' in out.stdout and "handler refuses" in out.stdout
    out = cli(server, key_file, "dead", "purge", "--queue", "tasks")
    assert out.returncode != 0 and "--yes" in out.stderr
    out = cli(server, key_file, "dead", "requeue", "--queue", "tasks")
    assert out.stdout.strip() == "requeued=1 queue=tasks"
    wait_until(lambda: c.stats()["queues"]["tasks"]["dead_lettered"] == 2, what="second dead letter")
    assert worker.stop() == 0
    server.stop()


def test_consumer_with_wrong_key_fails_fast(tmp_path, server, key_file):
    from support.procs import write_key

    wrong = write_key(tmp_path / "wrong")
    argv = ["consume", "--server", server.address, "--authkey-file", str(wrong), "--handler", "handlers:record"]
    proc = Proc("wrong", argv, tmp_path, base_env(QK_RECORD=str(tmp_path / "record")))
    assert proc.wait(15) == 4
    assert "event=fatal" in proc.log() and "do not match" in proc.log()


def test_consumer_started_before_the_server_connects_when_it_comes(tmp_path, key_file):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    argv = ["consume", "--server", f"127.0.0.1:{port}", "--authkey-file", str(key_file), "--handler", "handlers:record"]
    worker = Proc("early", argv, tmp_path, base_env(QK_RECORD=str(tmp_path / "record")))
    worker.wait_for("event=connect_retry")  # it has tried the port: nobody listens there yet
    assert "event=consumer_started" not in worker.log()
    server = ServerProc(tmp_path, key_file, port=port)
    worker.wait_for("event=consumer_started", timeout=20)
    c = queuekit.connect(server.address, authkey_file=str(key_file))
    c.queue("tasks").put({"n": 5})
    wait_until(lambda: ("done", worker.pid, 5) in read_record(tmp_path / "record"), what="task done")
    assert worker.stop() == 0


def test_worker_reconnects_after_a_server_restart(tmp_path, key_file):
    server = ServerProc(tmp_path, key_file)
    worker = consumer(tmp_path, server, key_file, "--handler", "handlers:record")
    server.stop()
    server = ServerProc(tmp_path, key_file, port=server.port)
    c = queuekit.connect(server.address, authkey_file=str(key_file))
    c.queue("tasks").put({"n": 9})
    wait_until(lambda: ("done", worker.pid, 9) in read_record(tmp_path / "record"), timeout=30, what="task done")
    assert worker.stop() == 0


def test_produce_reports_the_bad_line_and_what_was_enqueued(tmp_path, server, key_file, client):
    lines = '{"a": 1}\n\n[2]\n"three"\n{bad json}\n{"never": true}\n'
    out = cli(server, key_file, "produce", "--queue", "in", "--batch", "2", "-", input=lines)
    assert out.returncode == 7
    assert "stdin line 5" in out.stderr and "3 tasks from the lines before it were enqueued" in out.stderr
    assert [t.payload for t in client.queue("in").get_many(10)] == [{"a": 1}, [2], "three"]


def test_produce_generate_prints_the_count(server, key_file, client):
    out = cli(server, key_file, "produce", "--generate", "250", "--task-ms", "5")
    assert out.returncode == 0 and out.stdout.strip() == "produced=250 queue=tasks"
    tasks = client.queue("tasks").get_many(1000)
    assert [t.payload for t in tasks] == [{"n": n, "ms": 5} for n in range(250)]


@pytest.mark.parametrize(
    "spec, message",
    [("nocolon", "pkg.module:function"), ("no_such_mod:f", "cannot import"), ("handlers:missing", "no attribute")],
)
def test_bad_handler_is_a_config_error(tmp_path, server, key_file, spec, message):
    out = cli(server, key_file, "consume", "--handler", spec)
    assert out.returncode == 3 and message in out.stderr
