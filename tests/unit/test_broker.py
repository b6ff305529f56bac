"""Queue semantics of the broker, without network, with a hand-moved clock."""

import json
import random

import pytest

from queuekit.broker import Broker
from queuekit.errors import ServerShuttingDown
from queuekit.journal import MemoryJournal
from queuekit.message import NackItem
from support.fakeclock import FakeClock


def texts(*values):
    return [json.dumps(v) for v in values]


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def broker(clock):
    return Broker(
        clock=clock,
        max_attempts=2,
        retry_base=1.0,
        retry_max=8.0,
        default_lease=10.0,
        rng=random.Random(7),
        max_task_bytes=1000,
    )


def payloads(items):
    return [json.loads(item[3]) for item in items]


def test_put_get_ack_in_fifo_order(broker):
    ids = broker.put_many("q", texts("a", "b", "c"))
    assert ids == sorted(ids) and len(set(ids)) == 3
    got = broker.get_many("q", 2)
    assert payloads(got) == ["a", "b"]
    assert [item[0] for item in got] == ids[:2]
    assert [item[1] for item in got] == [1, 1]  # first delivery
    assert broker.ack_many("q", [item[0] for item in got]) == 2
    assert payloads(broker.get_many("q", 5)) == ["c"]
    s = broker.stats()["q"]
    assert (s["ready"], s["inflight"], s["enqueued"], s["acked"]) == (0, 1, 3, 2)


def test_empty_queue_returns_nothing_without_waiting(broker):
    assert broker.get_many("q", 10) == []


def test_expired_lease_returns_task_and_counts_redelivery(broker, clock):
    broker.put_many("q", texts({"n": 1}))
    (first,) = broker.get_many("q", 1, lease=5)
    clock.advance(4.9)
    broker.tick()
    assert broker.get_many("q", 1) == []
    clock.advance(0.2)
    broker.tick()
    (second,) = broker.get_many("q", 1)
    assert second[0] == first[0]
    assert second[1] == first[1] + 1  # new delivery number
    assert second[2] == 1  # one failed attempt
    assert broker.stats()["q"]["redelivered"] == 1


def test_stale_holder_cannot_nack_extend_or_release_but_ack_counts(broker, clock):
    broker.put_many("q", texts(1))
    (old,) = broker.get_many("q", 1, lease=1)
    clock.advance(2)
    (new,) = broker.get_many("q", 1, lease=30)
    assert broker.nack_many("q", [NackItem(old[0], old[1], 0, "late")]) == 0
    assert broker.extend_many("q", [(old[0], old[1])]) == [old[0]]
    assert broker.release_many("q", [(old[0], old[1])]) == 0
    assert broker.stats()["q"]["inflight"] == 1
    # The stale holder finished the work: its ack removes the task for good.
    assert broker.ack_many("q", [old[0]]) == 1
    assert broker.ack_many("q", [new[0]]) == 0
    assert broker.stats()["q"]["inflight"] == 0


def test_extend_keeps_the_lease_alive(broker, clock):
    broker.put_many("q", texts(1))
    (item,) = broker.get_many("q", 1, lease=5)
    for _ in range(4):
        clock.advance(4)
        assert broker.extend_many("q", [(item[0], item[1])], lease=5) == []
    broker.tick()
    assert broker.stats()["q"]["inflight"] == 1
    clock.advance(5.1)
    broker.tick()
    assert broker.stats()["q"]["ready"] == 1


def test_nack_delays_with_backoff_then_dead_letters(broker, clock):
    broker.put_many("q", texts("x"))
    (item,) = broker.get_many("q", 1)
    assert broker.nack_many("q", [NackItem(item[0], item[1], None, "boom 1")]) == 1
    s = broker.stats()["q"]
    assert (s["ready"], s["delayed"], s["nacked"]) == (0, 1, 1)
    clock.advance(1.0)  # attempt 1: backoff in [0.5, 1.0]
    broker.tick()
    (item,) = broker.get_many("q", 1)
    assert item[2] == 1
    broker.nack_many("q", [NackItem(item[0], item[1], 0, "boom 2")])  # explicit delay 0: ready at once
    (item,) = broker.get_many("q", 1)
    assert item[2] == 2
    broker.nack_many("q", [NackItem(item[0], item[1], None, "boom 3")])  # 3 failures > max_attempts=2
    s = broker.stats()["q"]
    assert (s["ready"], s["delayed"], s["dead"], s["dead_lettered"]) == (0, 0, 1, 1)
    (dead,) = broker.dead_list("q")
    assert dead["attempts"] == 3 and dead["last_error"] == "boom 3" and json.loads(dead["payload"]) == "x"


def test_expiry_counts_toward_dead_letter(broker, clock):
    broker.put_many("q", texts("poison"))
    for _ in range(3):
        assert broker.get_many("q", 1, lease=1)
        clock.advance(1.5)
        broker.tick()
    assert broker.stats()["q"]["dead"] == 1
    assert "lease expired" in broker.dead_list("q")[0]["last_error"]


def test_requeue_resets_attempts_and_purge_removes(broker, clock):
    broker.put_many("q", texts(1, 2))
    for _ in range(3):
        for item in broker.get_many("q", 2):
            broker.nack_many("q", [NackItem(item[0], item[1], 0, "no")])
    assert broker.stats()["q"]["dead"] == 2
    first, second = (d["id"] for d in broker.dead_list("q"))
    assert broker.dead_requeue("q", [first]) == 1
    (item,) = broker.get_many("q", 5)
    assert item[0] == first and item[2] == 0
    assert broker.dead_purge("q", [second, 12345]) == 1
    assert broker.stats()["q"]["dead"] == 0


def test_backoff_is_exponential_jittered_and_capped(broker):
    for attempts, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 8), (40, 8)]:
        samples = [broker.backoff(attempts) for _ in range(200)]
        assert all(ceiling / 2 <= s <= ceiling for s in samples), (attempts, min(samples), max(samples))
        assert max(samples) - min(samples) > ceiling / 10  # jitter spreads retries


def test_release_puts_tasks_back_in_front_without_an_attempt(broker):
    broker.put_many("q", texts(1, 2, 3, 4))
    held = broker.get_many("q", 2)
    assert broker.release_many("q", [(i[0], i[1]) for i in held]) == 2
    again = broker.get_many("q", 4)
    assert payloads(again) == [1, 2, 3, 4]
    assert [i[2] for i in again] == [0, 0, 0, 0]


def test_delayed_put_becomes_ready_after_delay(broker, clock):
    broker.put_many("q", texts("later"), delay=30)
    assert broker.get_many("q", 1) == []
    assert broker.stats()["q"]["delayed"] == 1
    clock.advance(30)
    assert payloads(broker.get_many("q", 1)) == ["later"]


def test_acks_ride_on_get(broker):
    broker.put_many("q", texts(1, 2))
    (a,) = broker.get_many("q", 1)
    (b,) = broker.get_many("q", 1, acks=[a[0]])
    assert broker.stats()["q"]["acked"] == 1 and b[0] != a[0]


def test_task_ids_never_repeat_across_broker_incarnations(clock):
    first = Broker(clock=clock).put_many("q", texts(1, 2, 3))
    clock.advance(0.001)
    second = Broker(clock=clock).put_many("q", texts(1))
    assert second[0] > max(first)


def test_lease_heap_does_not_keep_acked_tasks_alive(broker, clock):
    """Acked tasks must not stay referenced by the lease heap until their deadline."""
    for _ in range(50):
        broker.put_many("q", texts(*range(200)))
        items = broker.get_many("q", 200, lease=30)
        broker.ack_many("q", [i[0] for i in items[:150]])
        broker.release_many("q", [(i[0], i[1]) for i in items[150:]])
        again = broker.get_many("q", 200, lease=30)
        broker.ack_many("q", [i[0] for i in again])
    q = broker._queues["q"]
    slots = sum(len(batch) for _, _, batch in q.leases)
    assert slots < 4096 + 400, slots  # 20,000 leases ended; the heap was compacted along the way
    assert broker.stats()["q"]["inflight"] == 0
    # Still correct after compactions: a live lease expires on time.
    broker.put_many("q", texts("last"))
    broker.get_many("q", 1, lease=5)
    clock.advance(6)
    broker.tick()
    assert broker.stats()["q"]["ready"] == 1


# -- parked waiters (get_or_wait), what the server's event loop uses ---------------------------


def park(broker, queue="q", max_n=1, timeout=30.0, lease=None, acks=None):
    delivered = []
    result = broker.get_or_wait(queue, max_n, timeout, lease, acks, delivered.append)
    return result, delivered


def test_get_or_wait_returns_ready_tasks_at_once_and_parks_otherwise(broker):
    broker.put_many("q", texts("now"))
    result, delivered = park(broker)
    assert payloads(result) == ["now"] and delivered == []
    waiter, delivered = park(broker, max_n=5, lease=3.0)
    assert not isinstance(waiter, list) and delivered == []
    assert park(broker, timeout=0)[0] == []  # no timeout: never parks


def test_parked_waiters_are_served_oldest_first_with_their_own_batch_size_and_lease(broker, clock):
    _, first = park(broker, max_n=2, lease=3.0)
    _, second = park(broker, max_n=10)
    broker.put_many("q", texts(1, 2, 3))
    assert [payloads(batch) for batch in first] == [[1, 2]]
    assert [payloads(batch) for batch in second] == [[3]]
    clock.advance(3.5)  # the first waiter's 3 s lease ran out, the second's 10 s did not
    broker.tick()
    s = broker.stats()["q"]
    assert (s["ready"], s["inflight"], s["redelivered"]) == (2, 1, 2)


def test_waiters_are_served_by_nack_release_expiry_and_requeue(broker, clock):
    broker.put_many("q", texts("t"))
    (item,) = broker.get_many("q", 1, lease=5)
    _, by_release = park(broker)
    broker.release_many("q", [(item[0], item[1])])
    assert payloads(by_release[0]) == ["t"]
    item = by_release[0][0]
    _, by_expiry = park(broker)
    clock.advance(11)  # default lease 10 s
    broker.tick()
    assert payloads(by_expiry[0]) == ["t"] and by_expiry[0][0][2] == 1  # one attempt charged
    item = by_expiry[0][0]
    _, by_retry = park(broker)
    broker.nack_many("q", [NackItem(item[0], item[1], 0.0, "boom")])  # attempts 2, not above max_attempts 2: retried
    assert payloads(by_retry[0]) == ["t"]
    item = by_retry[0][0]
    broker.nack_many("q", [NackItem(item[0], item[1], 0.0, "boom again")])  # 3 > 2: dead
    _, by_requeue = park(broker)
    assert by_requeue == []
    assert broker.dead_requeue("q") == 1
    assert payloads(by_requeue[0]) == ["t"]


def test_cancelled_waiter_gets_nothing_and_the_task_stays_ready(broker):
    waiter, delivered = park(broker)
    assert broker.cancel(waiter) is True
    broker.put_many("q", texts("keep"))
    assert delivered == []
    assert broker.stats()["q"]["ready"] == 1
    assert broker.cancel(waiter) is False  # already withdrawn


def test_cancel_after_delivery_says_so(broker):
    waiter, delivered = park(broker)
    broker.put_many("q", texts("taken"))
    assert broker.cancel(waiter) is False and payloads(delivered[0]) == ["taken"]


def test_acks_ride_on_a_parked_get_too(broker):
    broker.put_many("q", texts("a"))
    (item,) = broker.get_many("q", 1)
    waiter, _ = park(broker, acks=[item[0]])
    assert broker.stats()["q"]["acked"] == 1 and not isinstance(waiter, list)


def test_close_answers_parked_waiters_with_nothing_and_refuses_puts(broker):
    _, delivered = park(broker)
    assert broker.stats()["q"]["waiting"] == 1
    broker.close()
    assert delivered == [[]]
    assert broker.stats()["q"]["waiting"] == 0
    assert park(broker)[0] == []  # closed: never parks again
    with pytest.raises(ServerShuttingDown):
        broker.put_many("q", texts(1))


# -- task lifecycle (issue 13) ---------------------------------------------------------------


def test_result_store_is_bounded_by_count_bytes_and_ttl_oldest_first(clock):
    b = Broker(clock=clock, result_max_count=3, result_max_bytes=9300, result_ttl=60.0)
    ids = b.put_many("q", texts(*range(5)))
    b.get_many("q", 5)
    b.ack_many("q", ids[:4], {i: '"r"' for i in ids[:4]})
    assert [b.status("q", i).state for i in ids[:4]] == ["unknown", "succeeded", "succeeded", "succeeded"]
    b.ack_many("q", [ids[4]], {ids[4]: json.dumps("x" * 9000)})  # counted 200 + 9002 bytes: the older ones go
    assert b.result_store()["finished"] == 1 and b.status("q", ids[4]).has_result
    clock.advance(61)
    b.tick()
    assert b.status(None, ids[4]).state == "unknown" and b.result_store() == {"finished": 0, "bytes": 0, "waiting": 0}


def test_result_waiters_complete_on_ack_dead_letter_and_cancel(clock):
    broker = Broker(clock=clock, max_attempts=0)
    done, dead, waiting = broker.put_many("q", texts("a", "b", "c"))
    got = {}
    for task_id in (done, dead, waiting):
        waiter = broker.result_or_wait("q", task_id, 5.0, lambda outcome, i=task_id: got.setdefault(i, outcome))
        assert type(waiter).__name__ == "ResultWaiter"
    assert broker.result_store()["waiting"] == 3
    a, b = broker.get_many("q", 2)
    broker.ack_many("q", [a[0]], {a[0]: "[1]"})
    broker.nack_many("q", [NackItem(b[0], b[1], 0.0, "bad")])  # max_attempts=0: dead at once
    assert broker.cancel_task(None, waiting) == "cancelled"
    assert got[done] == ("succeeded", "[1]", None)
    assert got[dead] == ("dead", None, "bad")
    assert got[waiting][0] == "cancelled"
    assert broker.result_store()["waiting"] == 0
    # A waiter withdrawn at its timeout is not completed later.
    (late,) = broker.put_many("q", texts("d"))
    w = broker.result_or_wait("q", late, 5.0, lambda outcome: got.setdefault("late", outcome))
    assert broker.cancel(w) is True and broker.cancel(w) is False
    broker.ack_many("q", [late])
    assert "late" not in got


def test_a_take_over_several_queues_waits_once_and_is_woken_once(broker):
    delivered = []
    waiter = broker.take_or_wait(["high", "low"], 10, 5.0, None, None, None, delivered.append, "w")
    assert broker.stats()["high"]["waiting"] == broker.stats()["low"]["waiting"] == 1
    broker.put_many("low", texts("l1"))
    assert [[(item[0], json.loads(item[4])) for item in items] for items in delivered] == [[("low", "l1")]]
    assert broker.stats()["high"]["waiting"] == broker.stats()["low"]["waiting"] == 0
    broker.put_many("high", texts("h1"))
    assert len(delivered) == 1 and broker.cancel(waiter) is False
    # Parked again, then the broker closes: delivered [] once, not once per queue.
    broker.take_or_wait(["high", "low", "other"], 10, 5.0, None, None, None, delivered.append)
    broker.get_many("high", 5)  # (h1 was ready: the take above took it without parking)
    broker.take_or_wait(["high", "low"], 10, 5.0, None, None, None, delivered.append)
    broker.close()
    assert delivered[-1] == [] and delivered.count([]) == 1


def test_a_cancelled_delayed_task_is_never_promoted(broker, clock):
    (task_id,) = broker.put_many("q", texts("later"), delay=30)
    assert broker.cancel_task("q", task_id) == "cancelled"
    clock.advance(31)
    assert broker.get_many("q", 5) == [] and broker.stats()["q"]["delayed"] == 0
    assert broker.status("q", task_id).state == "cancelled"


# -- restarts: leases and delivery numbers (a MemoryJournal shared by two broker incarnations) ----


def restarted(journal, clock):
    broker = Broker(journal=journal, clock=clock, default_lease=10.0, rng=random.Random(7))
    broker.recover()
    return broker


def test_a_saved_lease_that_ran_out_during_the_downtime_is_held_a_default_lease_after_it(clock):
    """Graceful restart: the holder could not extend while the server was down, so its lease is
    not charged for the downtime: it gets a default lease from the restart to reconnect."""
    journal = MemoryJournal()
    first = restarted(journal, clock)
    first.put_many("q", texts("held"))
    ((task_id, delivery, *_),) = first.get_many("q", 1, lease=2.0)
    first.save_leases()
    clock.advance(5.0)  # down longer than the 2 s the lease had left
    second = restarted(journal, clock)
    assert second.stats()["q"]["inflight"] == 1
    assert second.get_many("q", 1) == []  # not handed to anyone else
    assert second.extend_many("q", [(task_id, delivery)], lease=2.0) == []  # the holder still holds it
    clock.advance(2.5)
    second.tick()
    assert second.stats()["q"]["ready"] == 1  # a holder that stops extending loses it as usual


def test_a_holder_from_before_a_crash_cannot_nack_extend_or_release_the_new_lease(clock):
    """Delivery numbers are not journaled; after a restart they must not start again where a
    holder from before the restart could quote the new holder's number."""
    journal = MemoryJournal()
    first = restarted(journal, clock)
    first.put_many("q", texts("t"))
    ((task_id, old_delivery, *_),) = first.get_many("q", 1)  # holder A; then the server crashes
    clock.advance(1.0)
    second = restarted(journal, clock)
    ((same_id, new_delivery, *_),) = second.get_many("q", 1)  # holder B
    assert same_id == task_id and new_delivery != old_delivery
    assert second.nack_many("q", [NackItem(task_id, old_delivery, 0.0, "stale")]) == 0
    assert second.release_many("q", [(task_id, old_delivery)]) == 0
    assert second.extend_many("q", [(task_id, old_delivery)]) == [task_id]
    assert second.stats()["q"]["inflight"] == 1  # B's lease untouched
    assert second.extend_many("q", [(task_id, new_delivery)]) == []
