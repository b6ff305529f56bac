"""The dashboard's HTTP side on a real server process (no browser: tests/process/test_dashboard_browser.py
drives one): security headers and no inline script, the token rules, every refusal of an action
and its bounds (body size, slow body, content type, ids), the dead-letter listing's bounds, the
consumers table fed by a real consumer's heartbeats."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time

import pytest

import queuekit
from support.procs import Proc, ServerProc, base_env, wait_until

PREVIEW_CHARS = 300  # queuekit.dashboard.PREVIEW_CHARS, as documented in docs/reference.md


def call(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.headers, r.read()
    finally:
        conn.close()


@pytest.fixture
def board(tmp_path, key_file):
    """A server with a read token and an admin token; a client; queue "jobs" with 3 dead letters."""
    tokens = {}
    for name in ("read", "admin"):
        tokens[name] = "t" * 20 + name * 8
        (tmp_path / name).write_text(tokens[name] + "\n")
    env = base_env(QUEUEKIT_DASHBOARD_ADMIN_TOKEN_FILE=str(tmp_path / "admin"))
    server = ServerProc(tmp_path, key_file, "--http-token-file", str(tmp_path / "read"), "--max-attempts", "0", env=env)
    client = queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5)
    q = client.queue("jobs")
    q.put_many([{"big": "x" * 1000}, {"n": 2}, {"n": 3}])
    for task in q.get_many(3, timeout=5):
        q.nack(task, error="boom")
    assert client.stats()["queues"]["jobs"]["dead"] == 3
    read = {"Authorization": f"Bearer {tokens['read']}"}
    admin = {**read, "X-Queuekit-Admin": tokens["admin"], "Content-Type": "application/json"}
    yield server, client, read, admin
    client.close()
    server.stop()


def test_page_headers_and_no_inline_script(board):
    server, _, read, _ = board
    status, headers, body = call(server.http_port, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
    html = body.decode()
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all('src="/' in attrs and not text.strip() for attrs, text in scripts)
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers either
    assert "http://" not in html and "https://" not in html  # no external assets
    for asset in ("/dashboard.js", "/dashboard.css"):
        status, headers, body = call(server.http_port, "GET", asset)
        assert status == 200 and body and headers["X-Content-Type-Options"] == "nosniff"
        assert b"http://" not in body.replace(b"http://www.w3.org/2000/svg", b"")
    status, headers, body = call(server.http_port, "HEAD", "/")
    assert status == 200 and body == b""


def test_the_api_follows_the_stats_token_rule(board):
    server, _, read, _ = board
    for path in ("/api/overview", "/api/history", "/api/dead?queue=jobs"):
        status, headers, _ = call(server.http_port, "GET", path)
        assert status == 401 and "Bearer" in headers["WWW-Authenticate"]
        status, headers, body = call(server.http_port, "GET", path, headers=read)
        assert status == 200 and headers["Content-Type"] == "application/json", (path, body)
        assert "Access-Control-Allow-Origin" not in headers
    overview = json.loads(call(server.http_port, "GET", "/api/overview", headers=read)[2])
    assert overview["actions"] is True and overview["stats"]["queues"]["jobs"]["dead"] == 3
    assert [c["name"] for c in overview["clients"]] == ["queuekit-client"]
    # A preflight is never answered with CORS headers: cross-origin scripts cannot send the admin header.
    status, headers, _ = call(server.http_port, "OPTIONS", "/api/dead/purge", headers={"Origin": "http://evil"})
    assert status == 501 and "Access-Control-Allow-Origin" not in headers


def test_dead_listing_is_bounded_and_previewed(board):
    server, _, read, _ = board
    port = server.http_port
    dead = json.loads(call(port, "GET", "/api/dead?queue=jobs&limit=2", headers=read)[2])
    assert dead["limit"] == 2 and len(dead["items"]) == 2
    big = json.loads(call(port, "GET", "/api/dead?queue=jobs", headers=read)[2])["items"][0]
    assert len(big["payload"]) == PREVIEW_CHARS and big["payload_chars"] > 1000 and big["error"] == "boom"
    for bad in ("limit=0", "limit=201", "limit=x", "queue=a%20b", "queue=" + "q" * 200, ""):
        path = "/api/dead?" + (bad if bad.startswith("queue") else "queue=jobs&" + bad if bad else "")
        status, _, body = call(port, "GET", path, headers=read)
        assert status == 400 and json.loads(body)["error"], (bad, body)


def test_every_refused_action_changes_nothing(board):
    server, client, read, admin = board
    port = server.http_port
    body = json.dumps({"queue": "jobs", "ids": None}).encode()
    cases = [
        ({**admin, "Content-Type": "text/plain"}, body, 415),
        ({k: v for k, v in admin.items() if k != "X-Queuekit-Admin"}, body, 403),
        ({**admin, "X-Queuekit-Admin": "wrong"}, body, 403),
        ({k: v for k, v in admin.items() if k != "Authorization"}, body, 401),
        ({**admin, "Sec-Fetch-Site": "same-site"}, body, 403),
        ({**admin, "Origin": f"http://localhost:{port}"}, body, 403),  # another origin, same machine
        (admin, b"{not json", 400),
        (admin, json.dumps({"queue": "jobs", "ids": ["1"]}).encode(), 400),
        (admin, json.dumps({"queue": "jobs", "ids": list(range(1001))}).encode(), 400),
        (admin, json.dumps({"queue": "bad name", "ids": None}).encode(), 400),
        (admin, json.dumps([1, 2]).encode(), 400),
        (admin, b"x" * (16 * 1024 + 1), 413),
    ]
    for headers, data, expected in cases:
        status, _, answer = call(port, "POST", "/api/dead/requeue", data, headers)
        assert status == expected, (headers, data[:60], answer)
        assert json.loads(answer)["error"]
    status, _, answer = call(port, "POST", "/api/dead/purge", body, admin)  # purge all needs "all": true
    assert status == 400 and '"all": true' in json.loads(answer)["error"]
    assert client.stats()["queues"]["jobs"]["dead"] == 3
    # The same origin (what the page sends) is accepted.
    same = {**admin, "Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
    status, _, answer = call(port, "POST", "/api/dead/requeue", body, same)
    assert status == 200 and json.loads(answer) == {"action": "requeue", "queue": "jobs", "count": 3}
    assert client.stats()["queues"]["jobs"]["ready"] == 3


def test_a_body_that_never_comes_is_cut_at_the_deadline(board):
    server, client, _, admin = board
    head = "".join(f"{k}: {v}\r\n" for k, v in admin.items())
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
    try:
        sock.sendall(f"POST /api/dead/requeue HTTP/1.0\r\n{head}Content-Length: 50\r\n\r\n{{".encode())
        t0 = time.monotonic()
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.0 408"), answer[:100]
        assert time.monotonic() - t0 < 7  # the connection's 5 s deadline
    finally:
        sock.close()
    assert client.stats()["queues"]["jobs"]["dead"] == 3


def test_history_samples_the_queues(tmp_path, key_file):
    env = base_env(QUEUEKIT_DASHBOARD_SAMPLE_SECONDS="0.2")
    server = ServerProc(tmp_path, key_file, env=env)
    client = queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5)
    try:
        client.queue("h").put_many([{"n": i} for i in range(10)])

        def history():
            return json.loads(call(server.http_port, "GET", "/api/history?queue=h")[2])

        snap = wait_until(lambda: (s := history()) and len(s["t"]) >= 3 and s, timeout=10, what="3 samples")
        assert snap["interval"] == 0.2 and snap["points"] == 360
        assert snap["queues"]["h"]["ready"][-1] == 10
    finally:
        client.close()
        server.stop()


def test_payloads_need_a_token_when_the_port_has_none(tmp_path, key_file):
    """Without QUEUEKIT_HTTP_TOKEN_FILE the port is open: the dead letters' payloads and errors are
    shown only to a request with the admin token."""
    admin = "a" * 40
    (tmp_path / "admin").write_text(admin + "\n")
    env = base_env(QUEUEKIT_DASHBOARD_ADMIN_TOKEN_FILE=str(tmp_path / "admin"))
    server = ServerProc(tmp_path, key_file, "--max-attempts", "0", env=env)
    client = queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5)
    try:
        q = client.queue("jobs")
        q.put({"secret": "s3cr3t"})
        q.nack(q.get(timeout=5), error="failed on s3cr3t")
        status, _, body = call(server.http_port, "GET", "/api/dead?queue=jobs")
        assert status == 200 and b"s3cr3t" not in body
        item = json.loads(body)["items"][0]
        assert (item["payload"], item["error"], item["attempts"]) == (None, None, 1)
        status, _, body = call(server.http_port, "GET", "/api/dead?queue=jobs", headers={"X-Queuekit-Admin": "b" * 40})
        assert status == 200 and b"s3cr3t" not in body  # a wrong admin token shows nothing more
        status, _, body = call(server.http_port, "GET", "/api/dead?queue=jobs", headers={"X-Queuekit-Admin": admin})
        item = json.loads(body)["items"][0]
        assert json.loads(item["payload"]) == {"secret": "s3cr3t"} and item["error"] == "failed on s3cr3t"
    finally:
        client.close()
        server.stop()


def test_task_lookup_and_cancel(tmp_path, key_file):
    admin = "a" * 40
    (tmp_path / "admin").write_text(admin + "\n")
    env = base_env(QUEUEKIT_DASHBOARD_ADMIN_TOKEN_FILE=str(tmp_path / "admin"))
    server = ServerProc(tmp_path, key_file, "--max-attempts", "0", env=env)
    port = server.http_port
    client = queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5)
    try:
        q = client.queue("jobs")
        failed, ready = q.put_many([{"n": 1}, {"n": 2}])
        q.nack(q.get(timeout=5), error="boom on 1")
        status, _, body = call(port, "GET", f"/api/task?id={failed}")
        task = json.loads(body)["task"]
        assert status == 200 and (task["state"], task["queue"], task["attempts"]) == ("dead", "jobs", 1)
        assert task["last_error"] is None  # an open port: the error only with the admin token
        task = json.loads(
            call(port, "GET", f"/api/task?id={failed}&queue=jobs", headers={"X-Queuekit-Admin": admin})[2]
        )
        assert task["task"]["last_error"] == "boom on 1"
        assert json.loads(call(port, "GET", f"/api/task?id={ready}&queue=other")[2])["task"]["state"] == "unknown"
        for bad in ("id=x", "id=-1", "", f"id={ready}&queue=a%20b"):
            assert call(port, "GET", "/api/task?" + bad)[0] == 400, bad
        body = json.dumps({"id": ready, "queue": None}).encode()
        json_only = {"Content-Type": "application/json"}
        assert call(port, "POST", "/api/task/cancel", body, json_only)[0] == 403  # no admin token
        assert q.status(ready).state == "ready"
        for bad in ({"id": "1"}, {"id": -1}, {"id": ready, "queue": "a b"}):
            status, _, _ = call(
                port, "POST", "/api/task/cancel", json.dumps(bad).encode(), {**json_only, "X-Queuekit-Admin": admin}
            )
            assert status == 400, bad
        status, _, answer = call(port, "POST", "/api/task/cancel", body, {**json_only, "X-Queuekit-Admin": admin})
        assert status == 200 and json.loads(answer) == {
            "action": "cancel",
            "queue": None,
            "id": ready,
            "state": "cancelled",
        }
        assert q.status(ready).state == "cancelled" and client.stats()["queues"]["jobs"]["ready"] == 0
    finally:
        client.close()
        server.stop()


def test_consumers_show_what_a_real_consumer_reports(tmp_path, key_file):
    """A consumer's heartbeat reports say who it is and how much it holds; once it stops, its
    entry ages out (3 heartbeats: --lease 1.5 beats every 0.5 s)."""
    server = ServerProc(tmp_path, key_file)
    client = queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5)
    argv = ["consume", "--server", server.address, "--authkey-file", str(key_file), "--queue", "slow"]
    argv += ["--handler", "metrics_handlers:work", "--concurrency", "3", "--lease", "1.5"]
    consumer = Proc("consumer", argv, tmp_path, base_env())
    try:
        consumer.wait_for("event=consumer_started")

        def overview():
            return json.loads(call(server.http_port, "GET", "/api/overview")[2])

        [seen] = wait_until(lambda: overview()["consumers"], timeout=10, what="the consumer's first report")
        assert (seen["host"], seen["pid"], seen["queues"], seen["concurrency"], seen["pool"], seen["version"]) == (
            socket.gethostname(),
            consumer.pid,
            ["slow"],
            3,
            "thread",
            queuekit.__version__,
        )
        assert seen["in_flight"] == 0 and 0 <= seen["last_heartbeat_age"] < 1.5
        assert seen["session"] in [c["name"] for c in overview()["clients"]]
        client.queue("slow").put({"ms": 2000})
        wait_until(lambda: overview()["consumers"][0]["in_flight"] == 1, timeout=10, what="in_flight while it runs")
        wait_until(lambda: overview()["consumers"][0]["in_flight"] == 0, timeout=10, what="in_flight after it ran")
        assert consumer.stop() == 0
        wait_until(lambda: overview()["consumers"] == [], timeout=10, what="the stopped consumer to age out")
    finally:
        consumer.cleanup()
        client.close()
        server.stop()
