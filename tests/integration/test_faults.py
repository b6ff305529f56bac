"""Issue 4, cases 3, 4, 5 and 7: consumer SIGKILL, SIGTERM scale-down, server crash and restart
on its volume, network cut of a consumer. Real containers, real signals, real bridge networks."""

from __future__ import annotations

import re
import time

import pytest
from qkstack import count_n, done_tasks, parallel, tasks

from support import dockerkit as dk

pytestmark = pytest.mark.integration

LEASE = 3  # seconds: short, so redelivery after a lost consumer is quick


def _missing(counts, expected) -> list[int]:
    return sorted(set(expected) - set(counts))


def _wait_server_closed_connections_of(stack, ip: str, timeout: float = 15) -> None:
    """Wait until the server has closed every connection it served from ``ip`` (as many
    ``client_disconnected`` as ``client_connected`` lines): it read and answered all it got from there."""

    def count(event: str, log: str) -> int:
        return len(re.findall(rf"event={event} peer={re.escape(ip)}:\d+ ", log))

    def all_closed():
        log = dk.logs(stack.server_container)
        opened, closed = count("client_connected", log), count("client_disconnected", log)
        return (opened, closed) if opened and opened == closed else None

    dk.wait_until(
        all_closed,
        timeout=timeout,
        interval=0.1,
        message=lambda: f"the server to close every connection from {ip}:\n{dk.logs(stack.server_container, tail=40)}",
    )


def _retries(container) -> int:
    return len(re.findall(r"event=connect_retry ", dk.logs(container)))


def test_consumer_sigkill_mid_task_tasks_redelivered_after_lease(stack, metrics):
    """Case 3: ``docker kill`` (SIGKILL) of a consumer mid-task. Nothing is lost: the tasks it held
    are redelivered once their lease ran out (not before) and processed by the other consumers."""
    total, ms = 40, 100
    env = {"QUEUEKIT_LEASE_SECONDS": str(LEASE), "QUEUEKIT_PREFETCH": "1"}
    stack.server()
    stack.client().queue("tasks").put_many(tasks(range(total), ms))
    # The victim runs alone first, so that whatever is in flight at the kill is its own.
    victim = stack.consumer("victim", env=env)
    dk.wait_for_log(victim, r"event=example_task", count=5, timeout=30)
    victim_ip = dk.ip_address(victim, stack.network)  # gone once it stopped
    dk.raw(victim).kill()  # SIGKILL: no drain, no release, no ack
    killed_at = time.monotonic()
    dk.wait_exit(victim, timeout=10)
    # Whatever the victim sent just before it died has been handled once the server has seen each of
    # its connections close.
    _wait_server_closed_connections_of(stack, victim_ip)
    held = stack.stats()["inflight"]  # no other consumer yet: these leases are all the victim's
    assert held >= 1, f"the victim held no task when killed (prefetch 1 keeps one): {stack.stats()}"
    by_victim = done_tasks(victim)

    survivors = stack.consumers(2, env=env, prefix="survivor")
    # The victim's leases expire at the earliest LEASE - LEASE/3 s after its last renewal.
    stats = stack.wait_stats(
        lambda s: s["redelivered"] >= held, timeout=LEASE + 10, what=f"the {held} held tasks redelivered"
    )
    redelivered_after = time.monotonic() - killed_at
    assert redelivered_after >= LEASE * 2 / 3 - 0.6, (
        f"tasks redelivered {redelivered_after:.2f}s after the kill, before their {LEASE}s lease could expire"
    )
    stats = stack.wait_settled(total, timeout=60)
    assert stats["acked"] == total and stats["dead"] == 0, stats
    assert stats["redelivered"] == held, f"expected exactly the victim's {held} tasks redelivered: {stats}"

    counts = count_n([victim, *survivors])
    assert not _missing(counts, range(total)), f"lost tasks {_missing(counts, range(total))}:\n{stack.dump()}"
    # A task may run twice only if the victim finished it and died before its ack went out.
    twice = {n for n, k in counts.items() if k > 1}
    assert twice <= {d.n for d in by_victim}, f"tasks run twice that the victim never finished: {twice}"
    assert len(twice) <= 2, f"more duplicates than the victim could hold unacknowledged: {sorted(twice)}"
    by_survivors = {d.n for c in survivors for d in done_tasks(c)}
    assert by_survivors >= set(range(total)) - {d.n for d in by_victim}, "survivors skipped tasks"
    metrics["consumer SIGKILL"] = (
        f"{held} held tasks redelivered {redelivered_after:.1f}s after the kill (lease {LEASE}s), "
        f"{len(twice)} ran twice"
    )


def test_scale_down_sigterm_drains_in_flight_tasks(stack, metrics):
    """Case 4: ``docker stop`` (SIGTERM) of 2 of 4 consumers while tasks run: their in-flight tasks
    finish, the rest go back to the queue, nothing is lost or run twice, and they exit 0 well
    inside the grace period."""
    total, ms, grace = 40, 300, 30
    env = {"QUEUEKIT_LEASE_SECONDS": "10", "QUEUEKIT_PREFETCH": "1", "QUEUEKIT_DRAIN_TIMEOUT": "20"}
    stack.server()
    consumers = stack.consumers(4, env=env)
    stack.client().queue("tasks").put_many(tasks(range(total), ms))
    victims, keep = consumers[:2], consumers[2:]
    for v in victims:
        dk.wait_for_log(v, r"event=example_task", count=2, timeout=30)

    def stop(c):
        t0 = time.monotonic()
        dk.raw(c).stop(timeout=grace)  # SIGTERM, then SIGKILL after the grace period
        return time.monotonic() - t0

    durations = parallel([lambda c=c: stop(c) for c in victims])
    running_total = 0
    for v, took in zip(victims, durations, strict=True):
        name, text = dk.name_of(v), dk.logs(v)
        code = dk.wait_exit(v, timeout=5)
        assert code == 0, f"{name} exited {code} after SIGTERM:\n{text}"
        assert took < 5, f"{name} took {took:.1f}s to stop (grace {grace}s, tasks of {ms} ms):\n{text}"
        draining = re.search(r"event=consumer_draining running=(\d+) buffered=(\d+)", text)
        stopped = re.search(
            r"event=consumer_stopped processed=(\d+) failed=(\d+) (?:timed_out=\d+ )?released=(\d+) abandoned=(\d+)",
            text,
        )
        assert draining and stopped, f"{name}: no consumer_draining/consumer_stopped line:\n{text}"
        running = int(draining.group(1))
        running_total += running
        after = _finished_after(text, draining.start())
        assert after >= running, f"{name}: {running} tasks were running at SIGTERM, {after} finished after:\n{text}"
        assert stopped.group(4) == "0", f"{name} abandoned tasks:\n{text}"
        assert int(stopped.group(1)) == len(done_tasks(v)), f"{name}: processed= disagrees with its log:\n{text}"
        assert "exit_code=0" in text[stopped.start() :], text
    assert running_total >= 1, "no consumer was mid-task at SIGTERM: the test proved nothing"
    metrics["SIGTERM scale-down"] = (
        f"stops took {', '.join(f'{d:.1f}s' for d in durations)} (grace {grace}s), {running_total} in-flight finished"
    )

    stats = stack.wait_settled(total, timeout=60)
    counts = count_n(consumers)
    assert not _missing(counts, range(total)), f"lost: {_missing(counts, range(total))}\n{stack.dump()}"
    twice = sorted(n for n, k in counts.items() if k > 1)
    assert not twice, f"a graceful stop must not make tasks run twice: {twice}\n{stack.dump()}"
    assert stats["acked"] == total and stats["redelivered"] == 0 and stats["nacked"] == 0, stats
    for c in keep:
        dk.raw(c).reload()
        assert dk.raw(c).status == "running", f"{dk.name_of(c)} should still run:\n{stack.dump()}"


def _finished_after(text: str, pos: int) -> int:
    """How many example_task lines come after position ``pos`` of a log."""
    return len(re.findall(r"event=example_task ", text[pos:]))


def test_server_sigkill_and_restart_on_its_volume(stack, metrics):
    """Case 5: the server container is SIGKILLed mid-stream and started again on its data volume
    (durable mode). Nothing acknowledged is lost: every task the producer was told was enqueued is
    processed, tasks acknowledged before the crash are not run again (beyond the few whose ack was
    in flight), and the consumers and the producer reconnect by themselves."""
    total, ms, batch = 300, 20, 10
    env = {"QUEUEKIT_LEASE_SECONDS": "5", "QUEUEKIT_PREFETCH": "1"}
    server = stack.server(env={"QUEUEKIT_SYNC": "full"})
    consumers = stack.consumers(2, env=env)
    producer = stack.producer(
        ["produce", "--generate", str(total), "--task-ms", str(ms), "--rate", "50", "--batch", str(batch)],
        env={"QUEUEKIT_CONNECT_TIMEOUT": "60"},
    )
    dk.wait_until(
        lambda: sum(len(done_tasks(c)) for c in consumers) >= 60, timeout=30, message="60 tasks before the crash"
    )
    retries = {dk.name_of(c): _retries(c) for c in (*consumers, producer)}  # before the crash
    dk.raw(server).kill()
    crashed_at = time.time()
    assert dk.wait_exit(server, timeout=10) != 0
    before = count_n(consumers)
    dk.wait_until(  # the restart must find producer and consumers retrying against a dead address
        lambda: all(_retries(c) > retries[dk.name_of(c)] for c in (*consumers, producer)),
        timeout=30,
        interval=0.1,
        message=lambda: (
            f"every client to log connect_retry after the crash (before: {retries}):\n{stack.dump(tail=20)}"
        ),
    )
    dk.raw(server).start()
    dk.wait_for_log(server, r"event=server_ready", count=2, timeout=30)
    restarted_at = time.time()
    recovered = re.findall(r"event=recovered tasks=(\d+)", dk.logs(server))
    assert len(recovered) == 2, dk.logs(server)

    code = dk.wait_exit(producer, timeout=60)
    assert code == 0, f"the producer did not survive the server restart ({code}):\n{stack.dump()}"
    assert f"produced={total} queue=tasks" in dk.logs(producer), dk.logs(producer)

    def all_done():
        counts = count_n(consumers)
        return counts if set(range(total)) <= set(counts) else None

    counts = dk.wait_until(
        all_done, timeout=60, message=lambda: f"missing {_missing(count_n(consumers), range(total))}"
    )
    stack.wait_stats(
        lambda s: s["ready"] == 0 and s["inflight"] == 0 and s["delayed"] == 0 and s["dead"] == 0,
        timeout=30,
        what="an empty queue after the restart",
    )
    assert set(counts) == set(range(total)), f"unexpected tasks: {sorted(set(counts) - set(range(total)))}"
    twice = sorted(n for n, k in counts.items() if k > 1)
    # In flight at the crash: per consumer, 2 held (running + prefetched) + 2 done awaiting their ack;
    # plus one producer batch whose put committed but whose reply was lost (the retry puts it again).
    bound = len(consumers) * 4 + batch
    assert len(twice) <= bound, (
        f"{len(twice)} tasks ran twice (at most {bound} can be in flight at a crash): acknowledged work was "
        f"lost by the restart: {twice[:40]} ({len(before)} tasks were done before the crash)"
    )
    for c in consumers:
        after = [d for d in done_tasks(c) if d.ts > restarted_at]
        assert after, f"{dk.name_of(c)} processed nothing after the restart:\n{dk.logs(c, tail=40)}"
        dk.raw(c).reload()
        assert dk.raw(c).attrs["RestartCount"] == 0 and dk.raw(c).status == "running", stack.dump()
    metrics["server SIGKILL + restart"] = (
        f"crash after {len(before)} tasks, server back in {restarted_at - crashed_at:.1f}s, "
        f"recovered {recovered[-1]} tasks, {len(twice)} of {total} ran twice (bound {bound})"
    )


def test_network_cut_consumer_tasks_redelivered_and_reconnect_loses_nothing(stack, metrics):
    """Case 7: ``docker network disconnect`` of a consumer mid-task. Its tasks are redelivered to
    the others once their leases expire; after ``docker network connect`` it carries on, and
    nothing is lost."""
    first, ms = 45, 200
    env = {"QUEUEKIT_LEASE_SECONDS": str(LEASE), "QUEUEKIT_PREFETCH": "1"}
    stack.server()
    queue = stack.client().queue("tasks")
    victim = stack.consumer("victim", env=env)
    others = stack.consumers(2, env=env, prefix="other")
    queue.put_many(tasks(range(first), ms))
    dk.wait_for_log(victim, r"event=example_task", count=2, timeout=30)
    ip_before = dk.ip_address(victim, stack.network)
    stack.network.disconnect(dk.raw(victim))
    cut_at = time.time()

    stats = stack.wait_stats(lambda s: s["redelivered"] >= 1, timeout=LEASE + 10, what="victim's tasks redelivered")
    stats = stack.wait_settled(first, timeout=60)  # the victim is still cut off: the others did it all
    counts = count_n([victim, *others])
    assert not _missing(counts, range(first)), f"lost: {_missing(counts, range(first))}\n{stack.dump()}"
    by_others = {d.n for c in others for d in done_tasks(c)}
    # Whatever the victim finished after the cut could not be acknowledged: others must have run it.
    cut_off = {d.n for d in done_tasks(victim) if d.ts > cut_at + 0.05}
    assert cut_off <= by_others, f"tasks finished by the cut-off victim, never redelivered: {cut_off - by_others}"
    assert set(range(first)) - {d.n for d in done_tasks(victim) if d.ts <= cut_at} <= by_others

    stack.network.connect(dk.raw(victim))
    reconnected_at = time.time()
    ip_after = dk.ip_address(victim, stack.network)
    # Feed new tasks until the reconnected victim has finished one of them (it carries on by itself).
    # If its address changed, a connection it had open is dead and it notices only when the call
    # times out (30 s + 30 s server-side wait): allow for that.
    second: list[int] = []
    deadline = time.monotonic() + (45 if ip_after == ip_before else 80)
    while not [d for d in done_tasks(victim) if d.ts > reconnected_at and d.n >= 1000]:
        assert time.monotonic() < deadline, f"the victim did not resume after the reconnect:\n{stack.dump()}"
        chunk = list(range(1000 + len(second), 1000 + len(second) + 6))
        queue.put_many(tasks(chunk, ms))
        second += chunk
        time.sleep(0.5)  # the feed's pacing (a trickle of new tasks), not synchronisation
    stats = stack.wait_settled(first + len(second), timeout=60)
    counts = count_n([victim, *others])
    assert not _missing(counts, second), f"lost after the reconnect: {_missing(counts, second)}\n{stack.dump()}"
    assert set(counts) == set(range(first)) | set(second), "tasks nobody enqueued were processed"
    assert stats["dead"] == 0 and stats["enqueued"] == stats["acked"] == first + len(second), stats
    resumed = [d for d in done_tasks(victim) if d.ts > reconnected_at]
    metrics["network cut"] = (
        f"cut-off victim finished {sorted(cut_off)} unacknowledged; after the reconnect ({ip_before} -> "
        f"{ip_after}) it resumed in {min(d.ts for d in resumed) - reconnected_at:.1f}s and did {len(resumed)}"
    )
