"""The server's event loop, seen from raw protocol clients: waiting gets cost no thread, requests
are answered in order, a client that breaks the protocol or stops reading loses nobody's task and
blocks nobody."""

import json
import os
import pickle
import random
import re
import struct
import threading
import time
from multiprocessing import connection as mpc

import pytest

import queuekit
from queuekit.transport import API_IDENT
from support.procs import wait_parked, wait_until, waiting


def served(server, key_file, name="raw-test"):
    """A raw authenticated connection in the server's loop (what a BaseManager proxy opens)."""
    conn = mpc.Client(("127.0.0.1", server.port), authkey=key_file.read_bytes().strip())
    conn.send((None, "accept_connection", (name,), {}))
    assert conn.recv() == ("#RETURN", None)
    return conn


def call(conn, method, *args):
    conn.send((API_IDENT, method, args, {}))


def frame(obj) -> bytes:
    body = pickle.dumps(obj)
    return struct.pack("!i", len(body)) + body


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


def test_waiting_gets_cost_no_thread_and_each_gets_one_task(server, client, key_file):
    idle_threads = threads_of(server.pid)
    waiters = [served(server, key_file, f"waiter-{i}") for i in range(200)]
    for conn in waiters:
        call(conn, "get_many", "fanout", 1, 30.0, None, None)
    wait_parked(client, "fanout", 200)  # every get has reached the server and parked
    assert client.stats()["connections"] == 201
    assert threads_of(server.pid) <= idle_threads + 2  # not one thread per waiting client
    ids = client.queue("fanout").put_many(range(200))
    got = []
    for conn in waiters:
        assert conn.poll(10), "a waiting get was not answered"
        kind, items = conn.recv()
        assert kind == "#RETURN" and len(items) == 1
        got.append(items[0][0])
        conn.close()
    assert sorted(got) == sorted(ids)  # each task to exactly one waiter
    assert client.stats()["queues"]["fanout"]["inflight"] == 200


def test_pipelined_requests_are_answered_in_order(server, key_file):
    conn = served(server, key_file)
    requests = [
        (API_IDENT, "put_many", ("pipe", ['"a"', '"b"']), {}),
        (API_IDENT, "qsize", ("pipe",), {}),
        (API_IDENT, "no_such_method", (), {}),
        (API_IDENT, "get_many", ("pipe", 5, 0.0, None, None), {}),
    ]
    os.write(conn.fileno(), b"".join(frame(r) for r in requests))  # one write, four requests
    replies = [conn.recv() for _ in requests]
    assert replies[0][0] == "#RETURN" and len(replies[0][1]) == 2
    assert replies[1] == ("#RETURN", 2)
    assert replies[2][0] == "#ERROR" and isinstance(replies[2][1], AttributeError)
    assert replies[3][0] == "#RETURN" and [json.loads(item[3]) for item in replies[3][1]] == ["a", "b"]
    conn.close()


def test_undecodable_request_is_answered_and_the_connection_keeps_working(server, key_file):
    conn = served(server, key_file)
    conn.send_bytes(b"\x80\x05 this is not a pickle")
    kind, error = conn.recv()
    assert kind == "#ERROR" and "could not be decoded" in str(error)
    call(conn, "qsize", "still")
    assert conn.recv() == ("#RETURN", 0)
    conn.close()


def test_request_while_waiting_is_a_protocol_error_and_takes_nothing(server, client, key_file):
    conn = served(server, key_file)
    call(conn, "get_many", "strict", 1, 30.0, None, None)
    # Only once the get is parked is a second request a protocol error: sent together, both would
    # arrive in one read and the second would just wait its turn (pipelining).
    wait_parked(client, "strict", 1)
    call(conn, "qsize", "strict")  # the manager protocol allows one outstanding request
    assert conn.poll(5), "the server neither answered nor hung up on a request sent while a get waits"
    with pytest.raises(EOFError):  # hung up on, not answered
        conn.recv()
    server.wait_for("reason=protocol_error:request_while_waiting")
    assert waiting(client, "strict") == 0  # its waiter was withdrawn with the connection
    client.queue("strict").put("for someone who waits properly")
    task = client.queue("strict").get(timeout=5)
    assert task is not None and task.delivery == 1  # first delivery: the broken client took nothing
    assert client.stats()["queues"]["strict"]["inflight"] == 1


def test_client_that_stops_reading_blocks_nobody_and_gets_its_tasks_back(server, client, key_file):
    big = "x" * 600_000  # 40 of them: a 24 MB reply, far more than the socket buffers hold
    client.queue("big").put_many([big] * 40)
    conn = served(server, key_file, "stops-reading")
    call(conn, "get_many", "big", 40, 0.0, 60.0, None)  # leased for 60 s, then never read
    wait_until(
        lambda: client.stats()["queues"]["big"]["inflight"] == 40, timeout=10, what="the 40 tasks leased to the raw get"
    )

    t0 = time.monotonic()  # the loop keeps serving everyone else meanwhile
    other = client.queue("other")
    other.put("hello")
    assert other.get(timeout=5).payload == "hello"
    assert time.monotonic() - t0 < 1.0

    conn.close()  # unread data: the kernel resets the connection, the server's write fails
    server.wait_for("reason=send_failed")
    t0 = time.monotonic()
    tasks = client.queue("big").get_many(40, timeout=5)
    assert len(tasks) == 40 and time.monotonic() - t0 < 2  # released at once, not after the 60 s lease
    assert {t.attempts for t in tasks} == {0}  # no attempt charged: the client never had them


def test_stock_client_blocking_get_parks_without_a_thread_and_wakes_on_put(server, key_file, client):
    conn = mpc.Client(("127.0.0.1", server.port), authkey=key_file.read_bytes().strip())
    conn.send((None, "create", ("get_task_queue",), {}))  # what BaseManager does for a proxy
    kind, (ident, exposed) = conn.recv()
    conn.close()
    assert kind == "#RETURN" and "get" in exposed
    proxy_conn = served(server, key_file, "stock-like")
    proxy_conn.send((ident, "get", (True, None), {}))  # block forever
    wait_parked(client, "tasks", 1)
    assert not proxy_conn.poll(0)
    queuekit.connect(server.address, authkey_file=str(key_file)).queue("tasks").put({"job": 1})
    assert proxy_conn.poll(5)
    assert proxy_conn.recv() == ("#RETURN", {"job": 1})
    wait_until(  # acknowledged once the reply was written (at-most-once path)
        lambda: client.stats()["queues"]["tasks"]["acked"] >= 1, timeout=5, what="the stock get's task acknowledged"
    )
    assert client.stats()["queues"]["tasks"]["acked"] == 1
    proxy_conn.close()


def test_abusive_clients_during_traffic_lose_nothing_and_never_break_the_loop(server, client, key_file):
    """Normal producers and consumers (2% of tasks never acked: redelivered after their lease)
    while vandals (authenticated, so inside the loop) park gets and vanish, pipeline and reset,
    send garbage frames and break the protocol: every task is acked in the end and the loop logs
    no error."""
    n, deadline = 3000, time.monotonic() + 15
    vandals_until = time.monotonic() + 4  # while the producer is still putting
    seen, lock = set(), threading.Lock()

    def producer():
        q = queuekit.connect(server.address, authkey_file=str(key_file)).queue("chaos")
        for i in range(0, n, 50):
            q.put_many([{"i": j} for j in range(i, i + 50)])
            time.sleep(0.06)  # pacing of the load, not synchronisation: spread over about 4 s

    def consumer():
        rng = random.Random()
        q = queuekit.connect(server.address, authkey_file=str(key_file)).queue("chaos")
        held = []
        while time.monotonic() < deadline and len(seen) < n:
            got = q.get_many(rng.choice([1, 5, 50]), timeout=rng.choice([0, 0.01, 0.2]), ack=held, lease=1.0)
            held = [t for t in got if rng.random() > 0.02]
            with lock:
                seen.update(t.payload["i"] for t in held)
        if held:
            q.ack(held)

    def vandal():
        rng = random.Random()
        # The sleeps below are the vandals' random pacing (workload), not synchronisation: whichever
        # way each race goes (answered first or not, parked or still in flight) the loop must cope.
        while time.monotonic() < vandals_until:
            try:
                conn = served(server, key_file, "vandal")
                r = rng.random()
                if r < 0.4:  # park a get, hang up before or after it is answered
                    call(conn, "get_many", "chaos", 10, 5.0, 1.0, None)
                    time.sleep(rng.random() * 0.05)
                elif r < 0.6:  # five requests in one write, then reset with replies unread
                    os.write(conn.fileno(), frame((API_IDENT, "qsize", ("chaos",), {})) * 5)
                    time.sleep(0.01)
                elif r < 0.8:  # a frame of garbage
                    conn.send_bytes(os.urandom(rng.randint(1, 200)))
                    time.sleep(0.01)
                else:  # a second request while the first get waits
                    call(conn, "get_many", "chaos", 1, 1.0, 1.0, None)
                    time.sleep(0.02)
                    call(conn, "qsize", "chaos")
                    time.sleep(0.01)
                conn.close()
            except (OSError, EOFError):
                pass

    threads = [threading.Thread(target=producer)] + [threading.Thread(target=consumer) for _ in range(4)]
    threads += [threading.Thread(target=vandal) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    q, held, drain_until = client.queue("chaos"), [], time.monotonic() + 30
    while client.stats()["queues"]["chaos"]["acked"] < n and time.monotonic() < drain_until:
        held = q.get_many(100, timeout=0.5, ack=held, lease=5.0)
    if held:
        q.ack(held)
    stats = client.stats()["queues"]["chaos"]
    log = server.log()
    vandal_closes = len(re.findall(r"client=vandal reason=", log))
    print(f"\nchaos: {stats['acked']} of {n} acked, {stats['redelivered']} redelivered, {vandal_closes} vandals")
    assert (stats["enqueued"], stats["acked"], stats["ready"], stats["inflight"]) == (n, n, 0, 0)
    assert vandal_closes > 100
    assert "loop_error" not in log and "internal_error" not in log
