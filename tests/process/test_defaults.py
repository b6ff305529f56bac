"""Safe defaults of a real server process (issue 11, ask 6): without --bind/--http both ports listen
on loopback only, and the durable journal's files are readable by the server's uid only."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import queuekit
from queuekit.journal_sqlite import DB_NAME, LOCK_NAME
from support.procs import ROOT, Proc, ServerProc, base_env

linux_only = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc")


def _decode(address: str) -> tuple[str, int]:
    """``0100007F:C350`` (/proc/net/tcp, words in host byte order) -> ("127.0.0.1", 50000)."""
    host_hex, port_hex = address.split(":")
    raw = bytes.fromhex(host_hex)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)) if sys.byteorder == "little" else raw
    family = socket.AF_INET if len(words) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, words), int(port_hex, 16)


def listening(pid: int) -> set[tuple[str, int]]:
    """The TCP addresses the process ``pid`` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                found.add(_decode(fields[1]))
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@linux_only
def test_without_bind_flags_both_ports_listen_on_loopback_only(tmp_path, key_file):
    if not (_port_free(50000) and _port_free(8080)):
        pytest.skip("the default ports 50000/8080 are taken on this machine (e.g. by `make up`)")
    server = Proc("server", ["server", "--authkey-file", str(key_file)], tmp_path, base_env())
    try:
        server.wait_for(r"event=server_ready bind=127\.0\.0\.1:50000 http=127\.0\.0\.1:8080 ")
        assert listening(server.pid) == {("127.0.0.1", 50000), ("127.0.0.1", 8080)}
        # What relied on the old default still works: the image's health check and a local client.
        check = subprocess.run(
            [sys.executable, "-m", "queuekit", "server", "--check"],
            env=base_env(),
            cwd=str(ROOT),
            capture_output=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stderr
        with queuekit.connect("localhost:50000", authkey_file=str(key_file), connect_timeout=5) as client:
            assert client.stats()["durable"] is False
    finally:
        assert server.stop() == 0


@linux_only
def test_an_explicit_bind_still_listens_where_told(tmp_path, key_file):
    server = ServerProc(tmp_path, key_file)  # --bind 127.0.0.1:0 --http 127.0.0.1:0
    assert listening(server.pid) == {("127.0.0.1", server.port), ("127.0.0.1", server.http_port)}
    server.stop()
    wildcard = Proc(
        "server", ["server", "--bind", ":0", "--http", "off", "--authkey-file", str(key_file)], tmp_path, base_env()
    )
    port = int(wildcard.wait_for(r"event=server_ready bind=0\.0\.0\.0:(\d+) ").group(1))
    assert listening(wildcard.pid) == {("0.0.0.0", port)}
    assert wildcard.stop() == 0


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _durable_server_writes_tasks(tmp_path: Path, key_file: Path, data_dir: Path) -> ServerProc:
    with _umask(0o022):  # the usual umask: what a file created without an explicit mode gets 0644 from
        server = ServerProc(tmp_path, key_file, "--data-dir", str(data_dir))
    with queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5) as client:
        q = client.queue("tasks")
        q.put_many([{"n": i} for i in range(200)])
        task = q.get(timeout=5)
        q.ack(task)
        assert client.stats()["durable"] is True
    return server


JOURNAL_FILES = (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", LOCK_NAME)


def test_journal_files_are_0600_in_an_existing_data_dir(tmp_path, key_file):
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)
    server = _durable_server_writes_tasks(tmp_path, key_file, data)
    modes = {name: oct(_mode(data / name)) for name in JOURNAL_FILES}  # while it runs: WAL and shm exist
    assert modes == dict.fromkeys(JOURNAL_FILES, "0o600")
    assert server.stop() == 0
    assert {p.name: oct(_mode(p)) for p in data.iterdir()} == {DB_NAME: "0o600", LOCK_NAME: "0o600"}
    assert _mode(data) == 0o755, "an existing directory's mode is left alone"
    assert "data_dir_writable_by_others" not in server.log()


def test_a_data_dir_the_server_creates_is_0700(tmp_path, key_file):
    data = tmp_path / "new" / "data"
    server = _durable_server_writes_tasks(tmp_path, key_file, data)
    assert _mode(data) == 0o700
    assert {name: oct(_mode(data / name)) for name in JOURNAL_FILES} == dict.fromkeys(JOURNAL_FILES, "0o600")
    assert server.stop() == 0


def test_a_data_dir_others_can_write_is_used_with_a_warning(tmp_path, key_file):
    data = tmp_path / "shared"
    data.mkdir()
    data.chmod(0o777)
    server = _durable_server_writes_tasks(tmp_path, key_file, data)
    assert _mode(data / DB_NAME) == 0o600
    assert server.stop() == 0
    line = server.wait_for(r"level=warning component=journal event=data_dir_writable_by_others .*").group(0)
    assert f"dir={data}" in line and "mode=0o777" in line
    assert _mode(data) == 0o777


def test_a_journal_from_before_that_others_can_read_is_kept_with_a_warning(tmp_path, key_file):
    data = tmp_path / "data"
    server = _durable_server_writes_tasks(tmp_path, key_file, data)
    assert server.stop() == 0
    (data / DB_NAME).chmod(0o644)  # as created by a queuekit that did not set the mode
    restarted = ServerProc(tmp_path, key_file, "--data-dir", str(data))
    with queuekit.connect(restarted.address, authkey_file=str(key_file), connect_timeout=5) as client:
        assert client.stats()["queues"]["tasks"]["ready"] == 199, "the journal was used as it is"
    assert restarted.stop() == 0
    line = restarted.wait_for(r"level=warning component=journal event=journal_readable_by_others .*").group(0)
    assert f"path={data / DB_NAME}" in line and "mode=0o644" in line
    assert _mode(data / DB_NAME) == 0o644, "the operator's file is not changed behind their back"
