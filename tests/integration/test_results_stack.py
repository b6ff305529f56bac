"""Issue 13 over a container network: a producer container waits for results that consumer
containers compute, each reaching the server by its network alias."""

from __future__ import annotations

import json

import pytest
from qkstack import QUEUE

from support import dockerkit as dk

pytestmark = pytest.mark.integration

TASKS = 30

# Runs in the producer container (entrypoint replaced by python3): puts TASKS tasks at once, then
# waits for each result with result(); the last few go through call() (put + wait in one). One
# JSON line per task: its id, payload n, result and the consumer that ran it (from status()).
PRODUCER_SCRIPT = f"""
import json, queuekit
client = queuekit.connect("server:50000", authkey_file="{dk.AUTHKEY_PATH}", connect_timeout=15)
queue = client.queue("{QUEUE}")
ns = [1000 + 7 * i for i in range({TASKS})]
put = [(queue.put({{"n": n}}), n) for n in ns[:-5]]
for task_id, n in put:
    print(json.dumps({{"id": task_id, "n": n, "result": queue.result(task_id, timeout=30),
                       "consumer": queue.status(task_id).consumer, "via": "result"}}), flush=True)
for n in ns[-5:]:
    print(json.dumps({{"n": n, "result": queue.call({{"n": n}}, timeout=30), "via": "call"}}), flush=True)
client.close()
"""


def test_producer_container_waits_for_results_of_consumer_containers(stack):
    """Server (alias ``server``), 2 consumers running ``queuekit.examples:answer`` (returns the
    payload's n) and a producer container on the same network: every result the producer gets
    is its task's n, and the status names a consumer container's host as the consumer."""
    stack.server()
    consumers = stack.consumers(2, env={"QUEUEKIT_HANDLER": "queuekit.examples:answer"})
    producer = dk.start_container(
        stack.images["producer"],
        f"{stack.hint}-producer",
        network=stack.network,
        env={"QUEUEKIT_SERVER": "server:50000"},
        entrypoint=["python3", "-c", PRODUCER_SCRIPT],
        authkey_file=stack.keys["producer"],
    )
    stack.containers.append(producer)

    code = dk.wait_exit(producer, timeout=60)
    out = dk.logs(producer)
    assert code == 0, f"producer exited {code}:\n{stack.dump()}"
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == TASKS, out
    wrong = [line for line in lines if line["result"] != line["n"]]
    assert not wrong, f"results that are not their task's n: {wrong}"
    assert [line["via"] for line in lines].count("call") == 5, lines

    hosts = {dk.raw(c).attrs["Config"]["Hostname"] for c in consumers}
    ran_on = {line["consumer"].removeprefix("consume@").rsplit(":", 1)[0] for line in lines if "consumer" in line}
    assert ran_on and ran_on <= hosts, f"status().consumer names {ran_on}, consumer hosts are {hosts}"
    stats = stack.stats()
    assert stats["acked"] == TASKS and stats["dead"] == 0, stats
