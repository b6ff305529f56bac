"""The transport's Connection over a real socket pair: framing, buffering, limits."""

import socket
import threading
import time

import pytest

from queuekit.transport import Connection, MessageTooLarge


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    left, right = Connection(a.detach()), Connection(b.detach())
    yield left, right
    left.close()
    right.close()


def test_messages_sent_back_to_back_arrive_one_by_one(pair):
    left, right = pair
    for i in range(50):
        left.send(("msg", i, "x" * i))
    assert [right.recv() for _ in range(50)] == [("msg", i, "x" * i) for i in range(50)]
    assert not right.poll(0)


def test_message_arriving_in_fragments(pair):
    left, right = pair
    payload = ("big", "y" * 300_000)
    raw = socket.socket(fileno=__import__("os").dup(left.fileno()))
    import pickle
    import struct

    data = pickle.dumps(payload)
    frame = struct.pack("!i", len(data)) + data

    def dribble():
        for i in range(0, len(frame), 7001):
            raw.sendall(frame[i : i + 7001])
            time.sleep(0.001)  # a trickle (the workload): each fragment is a separate read

    t = threading.Thread(target=dribble)
    t.start()
    assert right.recv() == payload
    t.join()
    raw.close()


def test_poll_sees_buffered_data(pair):
    left, right = pair
    left.send(1)
    left.send(2)
    assert right.recv() == 1  # the second message may already sit in the buffer
    assert right.poll(0)
    assert right.recv() == 2


def test_oversized_message_is_refused_without_reading_it(pair):
    left, right = pair
    right.max_message_bytes = 1000
    left.send("z" * 5000)
    with pytest.raises(MessageTooLarge):
        right.recv()


def test_peer_closing_is_eof(pair):
    left, right = pair
    left.close()
    with pytest.raises(EOFError):
        right.recv()
