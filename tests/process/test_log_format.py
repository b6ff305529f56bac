"""QUEUEKIT_LOG_FORMAT on real processes: a JSON server log is one object per line (and holds no
key), a worker's task failure keeps its traceback inside its object; a bad value stops with exit 3."""

import json
import subprocess
import sys

import queuekit
from queuekit.errors import ExitCode
from support.procs import Proc, base_env, wait_until


def json_lines(proc: Proc) -> list[dict]:
    return [json.loads(line) for line in proc.log().splitlines() if line.strip()]


def test_json_logs_of_server_and_worker(tmp_path, key_file):
    env = base_env(QUEUEKIT_LOG_FORMAT="json")
    server = Proc(
        "server",
        ["server", "--bind", "127.0.0.1:0", "--http", "off", "--authkey-file", str(key_file), "--max-attempts", "0"],
        tmp_path,
        env,
    )
    ready = server.wait_for(r'"event": "server_ready", "bind": "127\.0\.0\.1:(\d+)"')
    address = f"127.0.0.1:{ready.group(1)}"
    worker = Proc(
        "worker",
        ["consume", "--server", address, "--authkey-file", str(key_file), "--handler", "handlers:always_fail"],
        tmp_path,
        env,
    )
    worker.wait_for(r'"event": "consumer_started"')
    with queuekit.connect(address, authkey_file=str(key_file), connect_timeout=5) as client:
        client.queue("tasks").put({"n": 1})
        wait_until(lambda: client.stats()["queues"]["tasks"]["dead"] == 1, what="the task to be dead-lettered")
    server.wait_for(r'"event": "dead_lettered"')
    worker.wait_for(r'"event": "task_failed"')
    assert worker.stop() == 0 and server.stop() == 0
    key = key_file.read_text().strip()
    for proc in (server, worker):
        events = json_lines(proc)  # every line is one JSON object
        assert events and all({"ts", "level", "component", "event"} <= set(e) for e in events)
        assert key not in proc.log()
    failed = next(e for e in json_lines(worker) if e["event"] == "task_failed")
    assert "handler refuses" in failed["traceback"]
    dead = next(e for e in json_lines(server) if e["event"] == "dead_lettered")
    assert dead["component"] == "broker" and dead["queue"] == "tasks" and dead["attempts"] == 1


def test_a_bad_format_is_a_config_error(key_file):
    argv = [sys.executable, "-m", "queuekit", "check", "--server", "127.0.0.1:1", "--authkey-file", str(key_file)]
    r = subprocess.run(argv, capture_output=True, text=True, env=base_env(QUEUEKIT_LOG_FORMAT="yaml"), timeout=30)
    assert r.returncode == ExitCode.CONFIG
    assert "invalid QUEUEKIT_LOG_FORMAT='yaml': must be one of logfmt, json" in r.stderr
