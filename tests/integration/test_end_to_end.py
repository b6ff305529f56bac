"""Issue 4, cases 1 and 2: a fault-free run end to end, and throughput scaling with replicas."""

from __future__ import annotations

import time

import pytest
from qkstack import done_tasks, tasks

from support import dockerkit as dk

pytestmark = pytest.mark.integration


def test_end_to_end_every_task_processed_exactly_once(stack, metrics):
    """Case 1: server + 3 consumers + a producer container on a user-defined network; 2000 demo
    tasks, each processed exactly once (fault-free run: no redelivery, no duplicate)."""
    total = 2000
    stack.server()
    consumers = stack.consumers(3)
    started = time.monotonic()
    producer = stack.producer(["produce", "--generate", str(total), "--task-ms", "1"])

    code = dk.wait_exit(producer, timeout=60)
    out = dk.logs(producer)
    assert code == 0, f"producer exited {code}:\n{stack.dump()}"
    assert f"produced={total} queue=tasks" in out, out

    stats = stack.wait_settled(total, timeout=90)
    elapsed = time.monotonic() - started
    # Each task is logged (after the work) before its ack: once acked, every line is there.
    done = {dk.name_of(c): done_tasks(c) for c in consumers}
    counts: dict[int, int] = {}
    for items in done.values():
        for d in items:
            counts[d.n] = counts.get(d.n, 0) + 1
    missing = sorted(set(range(total)) - set(counts))
    duplicated = sorted(n for n, k in counts.items() if k > 1)
    unexpected = sorted(set(counts) - set(range(total)))
    summary = {name: len(items) for name, items in done.items()}
    assert not missing, f"{len(missing)} tasks never processed, e.g. {missing[:20]}; per consumer {summary}"
    assert not duplicated, f"{len(duplicated)} tasks processed twice, e.g. {duplicated[:20]}; per consumer {summary}"
    assert not unexpected, f"tasks nobody produced were processed: {unexpected[:20]}"
    assert all(summary.values()), f"a consumer processed nothing: {summary}\n{stack.dump()}"
    assert stats["enqueued"] == total and stats["acked"] == total, stats
    assert stats["redelivered"] == 0 and stats["dead"] == 0 and stats["nacked"] == 0, stats
    metrics["end to end"] = f"{total} tasks in {elapsed:.1f}s over 3 consumers: {sorted(summary.values())}"


def _throughput(done: list) -> tuple[float, float]:
    """Tasks per second between the first and the last task finished (from the log timestamps)."""
    stamps = sorted(d.ts for d in done)
    span = stamps[-1] - stamps[0]
    assert span > 0, f"all {len(stamps)} tasks logged within one millisecond?"
    return (len(stamps) - 1) / span, span


def test_scaling_four_replicas_at_least_three_times_one(stack, metrics):
    """Case 2: the same sleep-bound workload (20 ms per task) on 1 and on 4 consumer replicas;
    throughput with 4 is at least 3x throughput with 1. Tasks are put only once every replica
    has started, and throughput is measured from the first to the last task finished."""
    ms = 20
    per_replica = 200
    env = {"QUEUEKIT_PREFETCH": "1", "QUEUEKIT_CONCURRENCY": "1"}
    stack.server()
    client = stack.client()
    queue = client.queue("tasks")

    one = stack.consumer("solo", env=env)
    queue.put_many(tasks(range(per_replica), ms))
    stack.wait_settled(per_replica, timeout=60)
    solo_done = done_tasks(one)
    assert sorted(d.n for d in solo_done) == list(range(per_replica)), stack.dump()
    tp1, span1 = _throughput(solo_done)
    dk.remove(one)

    four = stack.consumers(4, env=env, prefix="replica")
    base = 10_000
    queue.put_many(tasks(range(base, base + 4 * per_replica), ms))
    stack.wait_settled(5 * per_replica, timeout=60)
    done4 = [d for c in four for d in done_tasks(c)]
    assert sorted(d.n for d in done4) == list(range(base, base + 4 * per_replica)), stack.dump()
    per = sorted(len(done_tasks(c)) for c in four)
    tp4, span4 = _throughput(done4)

    ratio = tp4 / tp1
    line = (
        f"1 replica {tp1:.1f} tasks/s ({per_replica} in {span1:.2f}s), 4 replicas {tp4:.1f} tasks/s "
        f"({4 * per_replica} in {span4:.2f}s, per replica {per}): ratio {ratio:.2f} (required >= 3)"
    )
    metrics["scaling (20 ms tasks)"] = line
    print(line)
    assert ratio >= 3.0, f"throughput with 4 replicas is only {ratio:.2f}x that with 1: {line}"
