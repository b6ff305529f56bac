"""A result is not held back behind a parked get (issue 13, bench row 17): while every handler
seat of a consumer is busy, its fetcher does not park a get on the server (the finished task's
ack would wait for that get to return); it polls and waits locally, where the handler's finish
wakes it at once."""

from handlers import read_record
from test_worker_lifecycle import consumer

from support.procs import wait_parked, wait_until, waiting

SAMPLES = 40  # /stats reads while the seat is busy; the old fetcher parked ~all the time


def test_no_get_parked_while_the_only_seat_is_busy(tmp_path, server, key_file, client):
    consumer(tmp_path, server, key_file, "--handler", "handlers:until_file", "--concurrency", "1", "--queue", "calls")
    q = client.queue("calls")
    release = tmp_path / "release"
    task_id = q.put({"file": str(release), "n": 41})
    wait_until(lambda: read_record(tmp_path / "record"), what="the handler holding the task")
    # The get sent just before the handler took the task (seat still free) may be parked briefly;
    # once it ended, a consumer whose only seat is busy must not park another (the old one re-parked
    # one every BUSY_FETCH_WAIT, so it fails either here or in the samples).
    wait_parked(client, "calls", 0)

    parked = [waiting(client, "calls") for _ in range(SAMPLES)]
    assert parked == [0] * SAMPLES, f"gets parked on the server while the seat was busy: {parked}"

    release.touch()
    assert q.result(task_id, timeout=30) == 41
    # Idle again: now the fetcher parks its get (new tasks start at once).
    wait_until(lambda: waiting(client, "calls") == 1, what="the idle consumer's parked get")


def test_no_get_parked_while_a_delivered_task_waits_for_its_seat(tmp_path, server, key_file, client):
    """The get sent right after a delivery, before the free seat took the task, must not park
    either (bench row 17: each call() waited for that park). The handler itself reads the parked
    gets of its queue while it runs: none, for every task (the old worker parked one)."""
    consumer(tmp_path, server, key_file, "--handler", "handlers:parked_gets", "--concurrency", "1", "--queue", "calls")
    q = client.queue("calls")
    seen = [q.call({"http": server.http_port, "queue": "calls"}, timeout=30) for _ in range(10)]
    assert seen == [0] * 10, f"gets parked on the server while a task was held: {seen}"
