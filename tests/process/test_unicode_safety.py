"""Text that a Python str can hold but UTF-8 cannot (lone surrogates) against a durable server.

Pickle carries such strings and the JSON parser accepts them, but no journal can store them:
before the check, one such payload made the group commit fail, and with it every put of that
commit and the server's readiness. Each case sends the text straight through ``Client.call`` (as
a client that skips the library's checks would) and then proves the server still commits puts.
"""

import json
import urllib.request

import pytest

import queuekit
from queuekit.errors import InvalidRequest, PayloadError
from support.procs import ServerProc

LONE = "\ud800"


@pytest.fixture
def durable(tmp_path, key_file):
    server = ServerProc(tmp_path, key_file, "--data-dir", str(tmp_path / "data"), "--sync", "full")
    yield server
    server.stop()


def still_commits(server, key_file):
    """A good put on a fresh connection is committed and served; the server reports ready."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/readyz", timeout=5) as reply:
        assert reply.status == 200
    client = queuekit.connect(server.address, authkey_file=str(key_file))
    q = client.queue("after")
    task_id = q.put({"ok": 1})
    task = q.get(timeout=5)
    assert task is not None and task.id == task_id and task.payload == {"ok": 1}
    q.ack(task)
    client.close()


def test_a_payload_with_a_lone_surrogate_is_refused_and_the_journal_keeps_working(durable, key_file):
    client = queuekit.connect(durable.address, authkey_file=str(key_file))
    with pytest.raises(PayloadError, match=r"payload 1 is not valid Unicode text: a lone surrogate '\\ud800'"):
        client.call("put_many", "q", ['"fine"', json.dumps(LONE, ensure_ascii=False)], 0.0)
    assert client.queue("q").qsize() == 0  # all or nothing: the good one was not put either
    with pytest.raises(PayloadError, match="not valid Unicode"):
        client.queue("q").put(LONE)  # the library refuses it before sending
    client.close()
    still_commits(durable, key_file)


def test_headers_and_results_with_lone_surrogates_are_refused(durable, key_file):
    client = queuekit.connect(durable.address, authkey_file=str(key_file))
    q = client.queue("q")
    with pytest.raises((PayloadError, InvalidRequest), match="not valid Unicode"):
        q.put({"n": 1}, headers={"trace": LONE})
    task_id = q.put({"n": 2})
    task = q.get(timeout=5)
    with pytest.raises(PayloadError, match="not valid Unicode"):
        client.call("take", ["q"], 1, 0.0, None, [task.id], {task.id: json.dumps(LONE, ensure_ascii=False)})
    q.ack(task, result="fine")
    assert q.result(task_id, timeout=5) == "fine"
    client.close()
    still_commits(durable, key_file)


def test_a_nack_error_and_a_client_name_with_lone_surrogates_are_stored_escaped(durable, key_file):
    client = queuekit.connect(durable.address, authkey_file=str(key_file), name=f"odd{LONE}name")
    q = client.queue("q")
    task_id = q.put({"n": 1})
    task = q.get(timeout=5)
    assert q.nack(task, delay=0.0, error=f"boom {LONE}")
    status = q.status(task_id)
    assert status.last_error == "boom \\ud800"
    task = q.get(timeout=5)
    assert q.status(task_id).consumer == "odd\\ud800name"
    q.ack(task)
    client.close()
    still_commits(durable, key_file)
