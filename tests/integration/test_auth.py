"""Keys over real containers. Issue 4, case 6: a consumer with the wrong authkey fails fast and
clearly; the server serves on. Issue 11: each container holds only its role's key, and a consumer's
key is refused for a put (and a producer's for a get) while the stack keeps working."""

from __future__ import annotations

import re
import time

import pytest
from qkstack import count_n, http_status, tasks

from support import dockerkit as dk

pytestmark = pytest.mark.integration


def test_wrong_authkey_consumer_fails_fast_server_keeps_serving(stack, metrics):
    stack.server()
    good = stack.consumer("good")
    queue = stack.client().queue("tasks")
    queue.put_many(tasks(range(10), 10))

    wrong_dir = stack.workdir / "wrong"
    wrong_dir.mkdir()
    wrong_dir.chmod(0o755)
    wrong_key = dk.write_authkey(wrong_dir)
    t0 = time.monotonic()
    bad = stack.consumer("wrongkey", key_file=wrong_key, wait=False)
    code = dk.wait_exit(bad, timeout=30)
    took = time.monotonic() - t0
    text = dk.logs(bad)
    assert code == 4, f"a consumer with the wrong key must exit 4 (AUTH), got {code}:\n{text}"
    assert took < 10, f"the wrong-key consumer took {took:.1f}s to give up: it must not retry a bad key"
    fatal = [line for line in text.splitlines() if "event=fatal" in line]
    assert fatal and "do not match" in fatal[0], f"no clear fatal line about the key:\n{text}"
    assert "event=consumer_started" not in text, text
    reason = fatal[0].split("error=")[-1][:90]
    metrics["wrong authkey"] = f"consumer exited {code} {took:.1f}s after its start: {reason}"

    dk.wait_for_log(stack.server_container, r"event=auth_failed peer=\S+", timeout=10)
    bad_ip = re.search(r"event=auth_failed peer=([\d.]+):", dk.logs(stack.server_container)).group(1)
    good_ip = dk.ip_address(good, stack.network)
    assert bad_ip != good_ip, f"auth_failed names the good consumer ({good_ip}), not the wrong-key one"

    # The server keeps serving the others: the good consumer and a host client still work.
    queue.put_many(tasks(range(10, 30), 10))
    stack.wait_settled(30, timeout=30)
    counts = count_n([good])
    assert set(counts) == set(range(30)) and max(counts.values()) == 1, f"good consumer: {dict(counts)}"
    assert http_status(stack.port(8080), "/healthz") == 200
    dk.raw(stack.server_container).reload()
    assert dk.raw(stack.server_container).status == "running"
    dk.raw(good).reload()
    assert dk.raw(good).status == "running", stack.dump()
    # Neither key ever shows up in a log.
    for key_file in (*stack.keys.values(), wrong_key):
        secret = key_file.read_text().strip()
        for c in stack.containers:
            assert secret not in dk.logs(c), f"{dk.name_of(c)} logged an authkey"


# Run in a container with the key it holds: try one call, print what happened on one line.
TRY_CALL = r"""
import sys, queuekit
call = sys.argv[1]
with queuekit.connect("server:50000", authkey_file="/run/secrets/queuekit_authkey", connect_timeout=10) as c:
    try:
        if call == "put":
            c.queue("tasks").put({"n": -1, "ms": 0})
        elif call == "get":
            c.queue("tasks").get(timeout=0)
        else:
            c.stats()
    except queuekit.PermissionDenied as e:
        print("refused=PermissionDenied", e)
        sys.exit(0)
print("allowed")
"""


def test_consumer_key_cannot_put_producer_key_cannot_get_and_the_stack_works(stack, metrics):
    """A consumer container's key is refused for a put (PermissionDenied naming the role it needs),
    a producer container's for a get, neither reads stats; meanwhile the producer's tasks flow to
    the consumer, nothing of the refused put was enqueued, and each container holds only its key."""
    import hashlib

    stack.server()
    consumer = stack.consumer("roles")

    digests = {role: hashlib.sha256(path.read_bytes()).hexdigest() for role, path in stack.keys.items()}
    held = dk.digest_in(consumer)
    assert held == digests["consumer"], (
        f"the consumer container holds the {next((r for r, d in digests.items() if d == held), 'unknown')} key"
    )
    code, out = dk.exec_in(consumer, ["sh", "-c", "ls -A /run/secrets"])
    assert out.split() == ["queuekit_authkey"], f"the consumer container sees more than its key: {out}"

    code, put_out = dk.exec_in(consumer, ["python3", "-c", TRY_CALL, "put"])
    assert code == 0 and put_out.startswith("refused=PermissionDenied"), f"consumer key put: {code} {put_out}"
    assert "may not call put_many" in put_out and "producer role" in put_out, put_out
    code, stats_out = dk.exec_in(consumer, ["python3", "-c", TRY_CALL, "stats"])
    assert stats_out.startswith("refused=PermissionDenied") and "admin role" in stats_out, stats_out

    # A producer's key may put, not get: tried in a container of the producer image holding the
    # file the producer containers mount (a one-shot producer has exited before one could exec).
    getter = dk.start_container(
        stack.images["producer"],
        f"{stack.hint}-getter",
        network=stack.network,
        authkey_file=stack.keys["producer"],
        entrypoint=["python3", "-c", TRY_CALL, "get"],
    )
    stack.containers.append(getter)
    assert dk.wait_exit(getter, timeout=30) == 0, dk.describe([getter])
    out = dk.logs(getter)
    assert "refused=PermissionDenied" in out and "consumer role" in out, out

    # The stack works all along: 20 tasks from a producer container reach the consumer.
    assert stack.stats()["enqueued"] == 0, "the refused put enqueued something"
    producer = stack.producer(["produce", "--generate", "20", "--task-ms", "1"], name="work")
    assert dk.wait_exit(producer, timeout=30) == 0, stack.dump()
    stats = stack.wait_settled(20, timeout=30)
    assert stats["enqueued"] == 20 and stats["acked"] == 20, stats
    assert set(count_n([consumer])) == set(range(20))
    mounts = {m["Destination"]: m["Source"] for m in dk.raw(producer).attrs["Mounts"]}
    assert mounts.get(dk.AUTHKEY_PATH) == str(stack.keys["producer"]), mounts
    assert dk.KEYS_PATH not in mounts, mounts
    metrics["role keys"] = put_out.splitlines()[0][:120]
