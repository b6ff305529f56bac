"""Keys per role, limited to queues, rotated without a restart: real server, real clients.

The server gets a keys directory (``--keys-dir``) of ``<role>.<label>`` files; clients are the
queuekit client, the ``queuekit`` commands and a stock ``BaseManager`` client.
"""

import os
import secrets
import signal
import subprocess
import sys
from multiprocessing.managers import BaseManager

import pytest

import queuekit
from queuekit.errors import AuthenticationFailed, ExitCode, PermissionDenied
from support.procs import ROOT, ServerProc, base_env


def key_file(directory, name, queues=None):
    """Write ``directory/name`` (a key of 64 hex chars) and, with ``queues``, its ``.queues`` list."""
    path = directory / name
    path.write_text(secrets.token_hex(32) + "\n")
    if queues:
        (directory / f"{name}.queues").write_text(queues + "\n")
    return path


@pytest.fixture
def keys_dir(tmp_path):
    d = tmp_path / "keys"
    d.mkdir()
    key_file(d, "producer.web")
    key_file(d, "consumer.workers")
    key_file(d, "admin.ops")
    key_file(d, "producer.billing", queues="billing-*, invoices")
    return d


@pytest.fixture
def server(tmp_path, keys_dir):
    proc = ServerProc(tmp_path, tmp_path / "absent", "--keys-dir", str(keys_dir))
    yield proc
    proc.stop()


def connect(server, path):
    return queuekit.connect(server.address, authkey_file=str(path), connect_timeout=5)


def test_each_role_may_do_its_part_and_is_told_what_it_lacks(server, keys_dir):
    with connect(server, keys_dir / "producer.web") as producer, connect(server, keys_dir / "consumer.workers") as cons:
        producer.queue("jobs").put({"n": 1})
        with pytest.raises(PermissionDenied, match="may not call take: it needs the consumer role"):
            producer.queue("jobs").get(timeout=0)
        with pytest.raises(PermissionDenied, match="needs the admin role"):
            producer.stats()
        task = cons.queue("jobs").get(timeout=5)
        assert task.payload == {"n": 1}
        cons.queue("jobs").ack(task)
        with pytest.raises(PermissionDenied, match="may not call put_many: it needs the producer role"):
            cons.queue("jobs").put({"n": 2})
        with pytest.raises(PermissionDenied, match="needs the admin role"):
            cons.queue("jobs").dead_purge()
    with connect(server, keys_dir / "admin.ops") as admin:
        assert admin.stats()["queues"]["jobs"]["acked"] == 1
        assert admin.queue("jobs").dead_purge() == 0


def test_a_key_limited_to_queues_uses_only_those(server, keys_dir):
    with connect(server, keys_dir / "producer.billing") as billing:
        billing.queue("billing-eu").put(1)
        billing.queue("invoices").put(2)
        with pytest.raises(PermissionDenied, match="may not use queue 'jobs': it is limited to billing-\\*, invoices"):
            billing.queue("jobs").put(3)
    with connect(server, keys_dir / "admin.ops") as admin:
        queues = admin.stats()["queues"]
        assert queues["billing-eu"]["enqueued"] == 1 and "jobs" not in queues


class StockManager(BaseManager):
    pass


StockManager.register("get_task_queue")


def test_stock_clients_get_builtin_permission_errors(server, keys_dir):
    m = StockManager(address=("127.0.0.1", server.port), authkey=(keys_dir / "consumer.workers").read_bytes().strip())
    m.connect()
    tasks = m.get_task_queue()
    with pytest.raises(PermissionError, match="needs the producer role") as e:
        tasks.put({"stock": 1})
    assert type(e.value) is PermissionError  # a stock client cannot unpickle queuekit's errors
    with connect(server, keys_dir / "producer.web") as producer:
        producer.queue("tasks").put({"stock": 2})
    assert tasks.get(timeout=5) == {"stock": 2}


def test_worker_with_a_producer_key_exits_with_the_auth_code(server, keys_dir, tmp_path):
    env = base_env(QUEUEKIT_SERVER=server.address, QUEUEKIT_AUTHKEY_FILE=str(keys_dir / "producer.web"))
    out = subprocess.run(
        [sys.executable, "-m", "queuekit", "consume", "--handler", "queuekit.examples:handle"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == ExitCode.AUTH, out.stderr[-2000:]
    assert "needs the consumer role" in out.stderr


def test_rotation_without_a_restart(server, keys_dir, tmp_path):
    old = keys_dir / "consumer.workers"
    with connect(server, old) as before:
        before.queue("jobs").qsize()
    new = key_file(keys_dir, "consumer.workers-2")  # 1. add the new key: picked up without a signal
    server.wait_for(r"event=keys_loaded why=files_changed roles=admin:1,consumer:2,producer:2")
    with connect(server, new) as rolled, connect(server, old) as still:  # 2. both work meanwhile
        rolled.queue("jobs").qsize()
        still.queue("jobs").qsize()
        old.unlink()  # 3. remove the old key
        server.wait_for(
            r"event=keys_loaded why=files_changed roles=admin:1,consumer:1,producer:2 removed=consumer.workers"
        )
        # Its connection is closed; it cannot come back.
        server.wait_for(r"event=client_disconnected .*reason=key_revoked")
        rolled.queue("jobs").qsize()
    leftover = tmp_path / "old-copy"
    leftover.write_text("x" * 64 + "\n")  # any key that is not in the directory
    with pytest.raises(AuthenticationFailed):
        queuekit.connect(server.address, authkey_file=str(leftover), connect_timeout=2)
    assert server.popen.poll() is None  # no restart happened


def test_sighup_rereads_and_a_bad_set_changes_nothing(server, keys_dir):
    (keys_dir / "wizard.x").write_text(secrets.token_hex(32) + "\n")  # unknown role: the set is refused
    server.wait_for(r"event=keys_reload_failed why=files_changed error=.*wizard\.x")
    with connect(server, keys_dir / "producer.web") as producer:  # the keys in force stay
        producer.queue("jobs").put(1)
    (keys_dir / "wizard.x").unlink()
    server.wait_for(r"event=keys_unchanged why=files_changed")
    os.kill(server.pid, signal.SIGHUP)
    server.wait_for(r"event=keys_unchanged why=sighup roles=admin:1,consumer:1,producer:2")
    assert server.popen.poll() is None


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("producer.short", "tooshort\n", "key file"),
        ("nobody.x", "k" * 64 + "\n", "name it <role>.<label>"),
        ("producer", "k" * 64 + "\n", "name it <role>.<label>"),
        ("consumer.q.queues", "jobs\n", "has no key file beside it"),
    ],
)
def test_bad_key_files_stop_the_server_with_a_clear_error(tmp_path, name, content, message):
    d = tmp_path / "keys"
    d.mkdir()
    (d / name).write_text(content)
    out = subprocess.run(
        [sys.executable, "-m", "queuekit", "server", "--bind", "127.0.0.1:0", "--http", "off", "--keys-dir", str(d)],
        env=base_env(QUEUEKIT_AUTHKEY_FILE=str(tmp_path / "absent")),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == ExitCode.CONFIG and message in out.stderr, out.stderr[-2000:]
    assert "k" * 32 not in out.stderr  # never a key in the log
