"""A real server process on loopback: protocol, bad input, authentication, shutdown."""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from multiprocessing import connection as mpc
from multiprocessing.managers import BaseManager, dispatch

import pytest

import queuekit
from queuekit.errors import (
    AuthenticationFailed,
    InvalidRequest,
    PayloadError,
    PayloadTooLarge,
    ServerUnavailable,
)
from support.procs import ROOT, ServerProc, base_env, wait_parked, waiting, write_key


def http_get(server, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}{path}", timeout=5) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def test_put_get_ack_round_trip(client):
    q = client.queue("jobs")
    ids = q.put_many([{"n": i} for i in range(5)])
    tasks = q.get_many(10, timeout=1)
    assert [t.payload for t in tasks] == [{"n": i} for i in range(5)]
    assert [t.id for t in tasks] == ids
    assert q.ack(tasks) == 5
    assert client.stats()["queues"]["jobs"]["acked"] == 5


def test_blocking_get_waits_for_a_put_from_another_client(client, server, key_file):
    other = queuekit.connect(server.address, authkey_file=str(key_file))
    got = []
    getter = threading.Thread(target=lambda: got.append(client.queue("wait").get(timeout=10)))
    getter.start()
    wait_parked(other, "wait", 1)  # the get is waiting on the server, with nothing to take yet
    assert getter.is_alive() and not got
    other.queue("wait").put("late")
    getter.join(5)
    assert not getter.is_alive(), "the waiting get was not woken by the put"
    assert got[0] is not None and got[0].payload == "late"
    assert waiting(other, "wait") == 0
    other.close()


def test_non_json_and_oversized_payloads_get_clear_errors_and_nothing_is_enqueued(client):
    q = client.queue("bad")
    with pytest.raises(PayloadError, match="got bytes"):
        q.put(b"raw bytes")
    with pytest.raises(PayloadTooLarge, match="the limit is 1048576"):
        q.put("x" * (1024 * 1024))
    # A client that skips the library's checks meets the server's.
    with pytest.raises(PayloadError, match="payload 1 is not valid JSON"):
        client.call("put_many", "bad", ['"fine"', "{oops"])
    with pytest.raises(PayloadTooLarge):
        client.call("put_many", "bad", ['"' + "y" * (1024 * 1024) + '"'])
    with pytest.raises(InvalidRequest, match="invalid queue name"):
        client.call("put_many", "bad name", ['"x"'])
    assert q.qsize() == 0
    q.put("the server is fine")
    assert q.get().payload == "the server is fine"


def test_wrong_authkey_is_a_clear_error_and_the_server_keeps_serving(server, client, tmp_path):
    wrong = write_key(tmp_path / "wrong")
    t0 = time.monotonic()
    with pytest.raises(AuthenticationFailed, match="rejected our authkey.*do not match"):
        queuekit.connect(server.address, authkey_file=str(wrong), connect_timeout=30)
    assert time.monotonic() - t0 < 3  # not retried
    out = subprocess.run(
        [sys.executable, "-m", "queuekit", "check", "--server", server.address, "--authkey-file", str(wrong)],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 4 and "do not match" in out.stderr
    server.wait_for(r"event=auth_failed peer=127\.0\.0\.1:\d+", count=2)
    assert client.queue("still").put(1) > 0


def test_garbage_on_the_port_leaves_the_server_unaffected(server, client):
    junk = [os.urandom(4096), struct.pack("!i", 2**31 - 1) + b"x" * 64, b"GET / HTTP/1.1\r\n\r\n", b"\x00"]
    for payload in junk:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.recv(64)  # the challenge
            s.sendall(payload)
            s.settimeout(5)
            try:
                while s.recv(4096):
                    pass
            except (TimeoutError, ConnectionError):
                pass
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=5)  # says nothing at all
    server.wait_for("event=handshake_failed", count=3)
    assert client.queue("ok").put("still serving") > 0
    idle.close()
    assert client.queue("ok").get().payload == "still serving"


@pytest.mark.parametrize(
    "funcname, args, error, message",
    [
        ("shutdown", (), PermissionError, "queuekit server does not serve 'shutdown'"),
        ("debug_info", (), PermissionError, "queuekit server does not serve 'debug_info'"),
        ("create", ("builtins.dict",), KeyError, "builtins.dict"),  # only the registered compat typeids
    ],
)
def test_clients_cannot_shut_the_server_down_or_create_objects(
    server, client, key_file, funcname, args, error, message
):
    client.queue("kept").put("queued before")
    conn = mpc.Client(("127.0.0.1", server.port), authkey=key_file.read_bytes().strip())
    with pytest.raises(error, match=message):  # the stock client raises the #ERROR reply as it is
        dispatch(conn, None, funcname, args)
    conn.close()
    if error is PermissionError:
        server.wait_for(rf"event=request_refused peer=127\.0\.0\.1:\d+ request={funcname}\b")
    # Still serving, with its state: the refusal neither stopped nor reset anything.
    assert server.popen.poll() is None
    fresh = queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5)
    assert fresh.ping()["server"] == "queuekit"
    assert fresh.queue("kept").get(timeout=5).payload == "queued before"
    assert fresh.queue("kept").put("after") > 0
    fresh.close()
    assert "server_stopped" not in server.log() and "server_stopping" not in server.log()


def test_client_that_vanishes_while_waiting_does_not_swallow_a_task(server, client, key_file):
    script = (
        f"import queuekit; queuekit.connect({server.address!r}, authkey_file={str(key_file)!r})"
        ".queue('vanish').get(timeout=60)"
    )
    waiter = subprocess.Popen([sys.executable, "-c", script], env=base_env())
    wait_parked(client, "vanish", 1)  # it is waiting on the server now
    waiter.kill()
    waiter.wait(5)
    server.wait_for("reason=gone_while_waiting")  # the server saw the hang-up...
    assert waiting(client, "vanish") == 0  # ...and withdrew the waiter
    client.queue("vanish").put("for the living")
    t0 = time.monotonic()
    task = client.queue("vanish").get(timeout=5)
    assert task is not None and task.payload == "for the living"
    assert task.delivery == 1 and time.monotonic() - t0 < 2  # first delivery, no lease expiry needed


def test_sigterm_exits_zero_quickly_even_with_clients_waiting(tmp_path, key_file):
    server = ServerProc(tmp_path, key_file)
    c = queuekit.connect(server.address, authkey_file=str(key_file))
    waiter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                f"import queuekit; c = queuekit.connect({server.address!r}, authkey_file={str(key_file)!r}, "
                "connect_timeout=2)\ntry:\n  c.queue('w').get(timeout=60)\nexcept queuekit.ServerUnavailable:\n  pass"
            ),
        ],
        env=base_env(),
    )
    wait_parked(c, "w", 1)
    t0 = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait(10) == 0
    assert time.monotonic() - t0 < 5
    assert "event=server_stopped" in server.log()
    assert waiter.wait(30) == 0
    c.close()


def test_client_reconnects_transparently_after_a_server_restart(tmp_path, key_file):
    server = ServerProc(tmp_path, key_file)
    c = queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=20)
    q = c.queue("r")
    q.put("before")
    assert server.stop() == 0
    restarted = ServerProc(tmp_path, key_file, port=server.port)
    q.put("after")  # memory mode: "before" is gone with the old process; this call reconnects
    assert q.get(timeout=2).payload == "after"
    restarted.stop()
    with pytest.raises(ServerUnavailable, match="cannot reach"):
        queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=1)


def test_http_endpoints(server, client):
    client.queue("web").put_many([1, 2, 3])
    client.queue("web").get()
    assert http_get(server, "/healthz")[0] == 200
    assert http_get(server, "/readyz")[0] == 200
    status, ctype, body = http_get(server, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert 'queuekit_tasks_ready{queue="web"} 2' in body
    assert 'queuekit_tasks_inflight{queue="web"} 1' in body
    assert 'queuekit_tasks_enqueued_total{queue="web"} 3' in body
    assert "# TYPE queuekit_tasks_acked_total counter" in body
    assert "queuekit_journal_commits_total 0" in body  # memory mode: nothing is committed
    status, ctype, body = http_get(server, "/stats")
    stats = json.loads(body)
    assert ctype == "application/json" and stats["queues"]["web"]["ready"] == 2 and stats["ready"] is True
    assert http_get(server, "/nope")[0] == 404


def test_server_refuses_to_start_without_a_usable_key(tmp_path):
    for content, message in [(None, "does not exist"), (b"", "is empty"), (b"tooshort\n", "holds 8 bytes")]:
        path = tmp_path / "k"
        if content is not None:
            path.write_bytes(content)
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "queuekit",
                "server",
                "--authkey-file",
                str(path),
                "--bind",
                "127.0.0.1:0",
                "--http",
                "off",
            ],
            env=base_env(),
            capture_output=True,
            text=True,
            timeout=30,
            cwd=str(ROOT),
        )
        assert out.returncode == 3, out
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and str(path) in lines[0] and "queuekit keygen" in lines[0]


class StockManager(BaseManager):
    pass


StockManager.register("get_task_queue")
StockManager.register("get_result_queue")

# The seed's stock client script, unmodified: argv port, authkey file, put N | get. The tunnel
# sidecar examples (Compose and Kubernetes) run the same file.
STOCK_CLIENT = (ROOT / "k8s" / "components" / "tunnel-sidecar" / "stock_client.py").read_text()


def test_stock_basemanager_clients_work_unmodified(server, key_file, tmp_path, client):
    script = tmp_path / "stock.py"
    script.write_text(STOCK_CLIENT)

    def run(*args):
        return subprocess.run(
            [sys.executable, str(script), str(server.port), str(key_file), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=base_env(),
        )

    out = run("put", "50")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["put", "51"]
    # Interop both ways: queuekit sees the stock client's tasks on queue "tasks".
    assert client.queue("tasks").qsize() == 51
    client.queue("tasks").put("from queuekit")
    out = run("get")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["empty True", "got 52 {'i': 0} from queuekit"]
    stats = client.stats()["queues"]["tasks"]
    assert stats["acked"] == 52 and stats["inflight"] == 0  # acknowledged on delivery


def test_stock_client_errors_are_builtin_exceptions(server, key_file):
    m = StockManager(address=("127.0.0.1", server.port), authkey=key_file.read_bytes().strip())
    m.connect()
    results = m.get_result_queue()
    with pytest.raises(ValueError, match="JSON-compatible"):
        results.put({1, 2})  # a set: plain pickle data (no global), but not JSON
    with pytest.raises(ValueError, match="limit is 1048576"):
        results.put("z" * (2 * 1024 * 1024))
    import queue

    with pytest.raises(queue.Empty):
        results.get(timeout=0.2)
    results.put([1, "two", None])
    assert results.get(block=False) == [1, "two", None]
