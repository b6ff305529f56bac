"""After authentication, bounded (issue 11, ask 4): the maximum message size is derived from the task
limit and configurable, the rest of a started request has a deadline, the number of queues is
capped (reads never create one), the stock clients' queue cache is bounded by that cap, and
`create` refuses a bad queue name with an error a stock client can read.

Real server processes on loopback; the abusive clients are authenticated raw connections.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from multiprocessing import connection as mpc
from pathlib import Path

import pytest

import queuekit
from queuekit import client as client_module
from queuekit import settings as settings_module
from queuekit import transport
from queuekit.errors import InvalidRequest
from queuekit.transport import API_IDENT
from support.procs import ServerProc, base_env, wait_until

MiB = 1024 * 1024
FRAME_TIMEOUT = 2.0
# The derived limits (settings.derived_max_message_bytes), spelled out so that the behaviour tests
# also run, and fail, against a tree from before the setting existed.
LIMIT_1MIB_TASKS = 65 * MiB  # 64 MiB (the client's largest chunk) + 1 MiB
LIMIT_1KIB_TASKS = 10_000 * 1024 + MiB  # api.MAX_BATCH tasks of 1 KiB + 1 MiB


def start(tmp_path: Path, key_file: Path, **env: str) -> ServerProc:
    return ServerProc(tmp_path, key_file, env=base_env(**env))


def key_of(key_file: Path) -> bytes:
    return key_file.read_bytes().strip()


def served(server: ServerProc, key_file: Path, name: str = "postauth") -> mpc.Connection:
    """An authenticated connection served by the loop (what a client has after connecting)."""
    conn = mpc.Client(("127.0.0.1", server.port), authkey=key_of(key_file))
    conn.send((None, "accept_connection", (name,), {}))
    assert conn.recv() == ("#RETURN", None)
    return conn


def send_raw(conn: mpc.Connection, data: bytes) -> None:
    with socket.socket(fileno=os.dup(conn.fileno())) as s:
        s.sendall(data)


def hung_up(conn: mpc.Connection) -> bool:
    """True once the server closed ``conn`` (without answering)."""
    if not conn.poll(0):
        return False
    try:
        conn.recv()
    except (EOFError, OSError):
        return True
    raise AssertionError("the server answered instead of hanging up")


def rss(pid: int) -> int:
    """Resident set size of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def works(server: ServerProc, key_file: Path, queue: str = "still-works") -> bool:
    with queuekit.connect(server.address, authkey=key_of(key_file), connect_timeout=5) as c:
        q = c.queue(queue)
        q.put({"ok": 1})
        task = q.get(timeout=5)
        assert task is not None
        q.ack(task)
        return task.payload == {"ok": 1}


# -- maximum message size ------------------------------------------------------------------------


def test_the_derived_limit_covers_the_api_batch_and_the_clients_largest_chunk():
    derived = settings_module.derived_max_message_bytes
    assert derived(settings_module.DEFAULT_MAX_TASK_BYTES) == LIMIT_1MIB_TASKS
    assert derived(1024) == LIMIT_1KIB_TASKS
    assert settings_module.ServerSettings.load(env={}, need_authkey=False).max_message_bytes == LIMIT_1MIB_TASKS
    # queuekit's client sends chunks of at most PUT_CHUNK_TASKS texts and PUT_CHUNK_BYTES
    # characters (4 bytes each at most in UTF-8), or one text alone: within the limit.
    for task_limit in (1024, 64 * 1024, MiB, 8 * MiB, 64 * MiB):
        chunk = max(task_limit, min(client_module.PUT_CHUNK_TASKS * task_limit, 4 * client_module.PUT_CHUNK_BYTES))
        assert chunk + 16 * client_module.PUT_CHUNK_TASKS <= derived(task_limit), task_limit


def test_the_default_limit_is_derived_from_the_task_limit_and_refuses_before_reading(tmp_path, key_file):
    server = start(tmp_path, key_file)
    limit = LIMIT_1MIB_TASKS
    conn = served(server, key_file)
    # 100 MiB announced (under the old fixed 256 MiB), 1 KB sent: refused on the header alone.
    send_raw(conn, struct.pack("!i", 100 * MiB) + b"x" * 1000)
    wait_until(lambda: hung_up(conn), timeout=3, what="the server to hang up on a 100 MiB length prefix")
    conn.close()
    server.wait_for(rf"event=message_too_large peer=127\.0\.0\.1:\d+ bytes={100 * MiB} limit={limit}", timeout=2)
    # The loop logs client_disconnected just after it closed the socket (what hung_up saw): waited
    # for, not read at once (a server thread descheduled between the two would fail a bare read).
    server.wait_for(r"event=client_disconnected peer=127\.0\.0\.1:\d+ client=postauth reason=message_too_large")
    assert works(server, key_file)


def test_the_limit_is_configurable_and_applies_to_the_first_request_too(tmp_path, key_file):
    server = start(tmp_path, key_file, QUEUEKIT_MAX_MESSAGE_BYTES=str(MiB))
    # The first request after the handshake is read by the handshake thread, not the loop.
    conn = mpc.Client(("127.0.0.1", server.port), authkey=key_of(key_file))
    send_raw(conn, struct.pack("!i", 2 * MiB) + b"x" * 1000)
    wait_until(lambda: hung_up(conn), timeout=3, what="the server to hang up on a 2 MiB first request")
    conn.close()
    server.wait_for(rf"event=message_too_large peer=127\.0\.0\.1:\d+ limit={MiB}", timeout=2)
    # ... and to served connections.
    conn = served(server, key_file)
    send_raw(conn, struct.pack("!i", MiB + 1) + b"x" * 1000)
    wait_until(lambda: hung_up(conn), timeout=3, what="the server to hang up on a 1 MiB + 1 request")
    conn.close()
    assert works(server, key_file)


def test_a_put_many_of_the_api_batch_at_a_small_task_limit_fits_the_derived_limit(tmp_path, key_file):
    server = start(tmp_path, key_file, QUEUEKIT_MAX_TASK_BYTES="1024")
    limit = LIMIT_1KIB_TASKS
    texts = [f'"{i:05d}' + "a" * 1017 + '"' for i in range(10_000)]  # api.MAX_BATCH tasks of 1,024 bytes
    size = len(transport.encode_message((API_IDENT, "put_many", ("batch", texts, 0.0), {})))
    print(f"\nput_many of 10,000 x 1 KiB: {size} bytes; limit {limit}")
    assert size <= limit
    with queuekit.connect(server.address, authkey=key_of(key_file), connect_timeout=5) as c:
        assert len(c.call("put_many", "batch", texts, 0.0)) == 10_000
        assert c.queue("batch").qsize() == 10_000
    # Just over the derived limit is refused.
    conn = served(server, key_file)
    send_raw(conn, struct.pack("!i", limit + 1))
    wait_until(lambda: hung_up(conn), timeout=3, what="the server to hang up on limit + 1")
    conn.close()


def test_the_largest_put_many_chunk_and_get_many_reply_of_the_client_still_work(tmp_path, key_file):
    server = start(tmp_path, key_file)
    limit = LIMIT_1MIB_TASKS
    # The client's worst case: tasks at the 1 MiB limit made of 4-byte UTF-8 characters, so a
    # chunk of 16 Mi characters is 4 x 16 MiB on the wire.
    chars = (settings_module.DEFAULT_MAX_TASK_BYTES - 2) // 4
    payloads = [f"{i:04d}" + "\U0001f600" * (chars - 1) for i in range(126)]
    texts = [json.dumps(p, ensure_ascii=False, separators=(",", ":")) for p in payloads]
    assert max(len(t.encode()) for t in texts) <= settings_module.DEFAULT_MAX_TASK_BYTES
    chunks = list(client_module._chunks(texts))
    biggest = max(len(transport.encode_message((API_IDENT, "put_many", ("big", ch, 0.0), {}))) for ch in chunks)
    print(f"\nlargest put_many chunk: {len(chunks[0])} tasks, {biggest} bytes; limit {limit}")
    assert biggest > 60 * MiB and biggest <= limit
    with queuekit.connect(server.address, authkey=key_of(key_file), connect_timeout=10) as c:
        q = c.queue("big")
        assert len(q.put_many(payloads)) == 126
        got = q.get_many(len(chunks[0]), timeout=5)  # a reply as large as the largest chunk
        assert [t.payload for t in got] == payloads[: len(chunks[0])]
        q.ack(got)
    assert "message_too_large" not in server.log()


# -- deadline for the rest of a started request ---------------------------------------------------


def test_half_sent_requests_are_dropped_at_the_frame_deadline_and_their_memory_freed(tmp_path, key_file):
    server = start(tmp_path, key_file, QUEUEKIT_FRAME_TIMEOUT=str(FRAME_TIMEOUT))
    conns = [served(server, key_file, f"half-{i}") for i in range(3)]
    base = rss(server.pid)
    announced, sent = 50 * MiB, 40 * MiB  # within the derived 65 MiB limit; 10 MiB never come
    started = time.monotonic()
    for conn in conns:
        send_raw(conn, struct.pack("!i", announced) + b"x" * sent)
    held = wait_until(
        lambda: (r := rss(server.pid)) >= base + 100 * MiB and r,
        timeout=10,
        what="the server to buffer the three partial requests",
    )
    wait_until(
        lambda: all(hung_up(c) for c in conns),
        timeout=FRAME_TIMEOUT + 8,
        what=f"the server to close three half-sent requests at the {FRAME_TIMEOUT} s frame deadline",
    )
    elapsed = time.monotonic() - started
    freed = wait_until(
        lambda: (r := rss(server.pid)) < base + 30 * MiB and r,
        timeout=5,
        what=lambda: f"the server's RSS to come back (base {base >> 20} MiB, now {rss(server.pid) >> 20} MiB)",
    )
    print(
        f"\nRSS base {base >> 20} MiB, with 3 half-sent 50 MiB requests {held >> 20} MiB, "
        f"after the deadline {freed >> 20} MiB; closed after {elapsed:.1f} s"
    )
    assert elapsed < FRAME_TIMEOUT + 3
    for conn in conns:
        conn.close()
    # client_disconnected is logged just after each socket was closed (what hung_up saw) and its
    # buffer freed (what the RSS showed): wait for the third line before counting.
    server.wait_for(r"event=client_disconnected .*reason=frame_timeout", count=3)
    log = server.log()
    assert log.count("event=frame_timeout") == 3
    assert log.count("reason=frame_timeout") == 3
    assert works(server, key_file)


def test_the_frame_deadline_covers_the_whole_rest_not_each_read(tmp_path, key_file):
    server = start(tmp_path, key_file, QUEUEKIT_FRAME_TIMEOUT=str(FRAME_TIMEOUT))
    conn = served(server, key_file)
    send_raw(conn, struct.pack("!i", 1000) + b"x" * 10)
    started = time.monotonic()
    cut = False
    # The trickle is the workload: one byte every 0.25 s, each well within any per-read
    # timeout. Bounded: at most 40 bytes, 10 s.
    for _ in range(40):
        try:
            send_raw(conn, b"x")
        except OSError:
            cut = True
            break
        if conn.poll(0.25):
            cut = hung_up(conn)
            break
    elapsed = time.monotonic() - started
    conn.close()
    assert cut, "a request trickling one byte every 0.25 s was kept open for 10 s"
    assert elapsed < FRAME_TIMEOUT + 1.5, elapsed
    server.wait_for(r"event=client_disconnected peer=127\.0\.0\.1:\d+ client=postauth reason=frame_timeout")


# -- maximum number of queues; reads create none; the stock clients' cache ------------------------

STOCK_CLIENT = r"""
import json, sys
from multiprocessing.managers import BaseManager

class M(BaseManager):
    pass

M.register("get_queue")
M.register("get_task_queue")
port, key_file, names = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
key = open(key_file, "rb").read().strip()
m = M(address=("127.0.0.1", port), authkey=key)
m.connect()  # sends `dummy`
out = {"connected": True}
for name in names:
    try:
        q = m.get_queue(name)
        q.put({"n": name})
        out[name] = ["ok", q.get(timeout=5)]
    except Exception as e:
        out[name] = [type(e).__name__, str(e)]
print(json.dumps(out))
"""


def stock_client(tmp_path: Path, server: ServerProc, key_file: Path, *names: str) -> dict:
    """A stock BaseManager client in a process where queuekit cannot be imported (so it cannot
    unpickle queuekit's own exception types)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUEUEKIT_", "PYTHON"))}
    done = subprocess.run(
        [sys.executable, "-c", STOCK_CLIENT, str(server.port), str(key_file), *names],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


READS = [
    ("qsize", ()),
    ("dead_list", (10,)),
    ("ack_many", ([1, 2],)),
    ("nack_many", ([(1, 1, None, "x")],)),
    ("extend_many", ([(1, 1)], None)),
    ("release_many", ([(1, 1)],)),
    ("dead_requeue", (None,)),
    ("dead_purge", (None,)),
]


def test_reads_and_calls_on_existing_tasks_never_create_a_queue(tmp_path, key_file, server):
    with queuekit.connect(server.address, authkey=key_of(key_file), connect_timeout=5) as c:
        for i, (method, args) in enumerate(READS):
            result = c.call(method, f"unknown-{i}", *args)
            assert result in (0, [], [1]), (method, result)
        assert c.stats()["queues"] == {}, "a read created a queue"


def test_at_the_queue_limit_new_queues_are_refused_and_existing_ones_keep_working(tmp_path, key_file):
    server = start(tmp_path, key_file, QUEUEKIT_MAX_QUEUES="5")
    with queuekit.connect(server.address, authkey=key_of(key_file), connect_timeout=5) as c:
        for i in range(5):
            c.queue(f"q{i}").put({"i": i})
        with pytest.raises(InvalidRequest, match="QUEUEKIT_MAX_QUEUES") as put_error:
            c.queue("q5").put({"i": 5})
        with pytest.raises(InvalidRequest, match="QUEUEKIT_MAX_QUEUES"):
            c.queue("q6").get_many(1)
        print(f"\nrefused: {put_error.value}")
        for i, (method, args) in enumerate(READS):  # reads at the limit: answered, nothing created
            c.call(method, f"r{i}", *args)
        assert sorted(c.stats()["queues"]) == [f"q{i}" for i in range(5)]
        for i in range(5):  # the existing queues keep working
            task = c.queue(f"q{i}").get(timeout=5)
            assert task is not None and task.payload == {"i": i}
            c.queue(f"q{i}").ack(task)
            c.queue(f"q{i}").put({"again": i})
    # Stock clients: an existing queue works, a new one is refused at `create` with a builtin
    # error naming the setting, and the refused names are not cached (the queue count stays 5).
    refused = [f"stock{i}" for i in range(20)]
    out = stock_client(tmp_path, server, key_file, "q0", *refused)
    assert out["connected"] is True
    assert out["q0"] == ["ok", {"again": 0}]
    for name in refused:
        assert out[name][0] == "ValueError" and "QUEUEKIT_MAX_QUEUES" in out[name][1], out[name]
    with queuekit.connect(server.address, authkey=key_of(key_file), connect_timeout=5) as c:
        assert len(c.stats()["queues"]) == 5


def test_stock_create_with_a_bad_queue_name_is_refused_with_a_builtin_error(tmp_path, key_file, server):
    bad = ["bad name", "-starts-with-dash", "x" * 129, "ok-name"]
    out = stock_client(tmp_path, server, key_file, *bad)
    assert out["connected"] is True  # BaseManager.connect() sends `dummy`: still served
    for name in bad[:3]:
        kind, text = out[name]
        assert kind == "ValueError" and "invalid queue name" in text, out[name]
    assert out["ok-name"] == ["ok", {"n": "ok-name"}]
    with queuekit.connect(server.address, authkey=key_of(key_file), connect_timeout=5) as c:
        assert list(c.stats()["queues"]) == ["ok-name"]


def test_dummy_is_served_and_does_nothing(tmp_path, key_file, server):
    conn = mpc.Client(("127.0.0.1", server.port), authkey=key_of(key_file))
    conn.send((None, "dummy", (), {}))
    assert conn.recv() == ("#RETURN", None)
    conn.close()
    conn = mpc.Client(("127.0.0.1", server.port), authkey=key_of(key_file))
    conn.send((None, "dummy", ("extra",), {}))
    kind, error = conn.recv()
    assert kind == "#ERROR" and isinstance(error, TypeError)
    conn.close()
    assert works(server, key_file)
