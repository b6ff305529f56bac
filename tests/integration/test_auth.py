"""Issue 4, case 6: a consumer with the wrong authkey fails fast and clearly; the server serves on."""

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
    for key_file in (stack.key_file, wrong_key):
        secret = key_file.read_text().strip()
        for c in stack.containers:
            assert secret not in dk.logs(c), f"{dk.name_of(c)} logged an authkey"
