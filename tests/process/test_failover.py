"""Several servers on one PostgreSQL journal (issue 14): one leader, fenced standbys, failover.

Real processes on loopback and a real PostgreSQL (tests/support/pg.py, a database per test). The
failover times are measured from the fault to the first put answered by the new leader, and
printed (pytest -s shows them).
"""

from __future__ import annotations

import re
import socket
import time

import pytest

import queuekit
from queuekit.errors import ServerUnavailable
from support.procs import ServerProc

PROBE = 0.5  # QUEUEKIT_LEADER_PROBE_INTERVAL for these tests
LEASE = 3.0  # QUEUEKIT_LEADER_LEASE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_tries_each_address_in_turn(tmp_path, key_file):
    """A first address that refuses connections costs nothing but a refused connect: the client
    moves on to the next at once (no backoff within a round)."""
    server = ServerProc(tmp_path, key_file)
    dead = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with queuekit.connect(f"{dead},{server.address}", authkey_file=str(key_file), connect_timeout=10) as client:
        assert time.monotonic() - t0 < 2.0
        client.queue("q").put("x")
        assert client.queue("q").get(timeout=2).payload == "x"
        assert str(client.address) == server.address
    with pytest.raises(ServerUnavailable, match=re.escape(f"servers at {dead},{dead} within 1 s")):
        queuekit.connect(f"{dead},{dead}", authkey_file=str(key_file), connect_timeout=1)
