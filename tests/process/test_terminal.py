"""The commands on a real terminal (a pty) and off it: `stats --watch` redraws in place on a
terminal and ends with exit 0 on Ctrl-C (SIGINT), prints plain snapshots to a pipe; `produce`
shows a progress line on a terminal's stderr and nothing on a pipe."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

from support.procs import base_env

CLEAR_HOME = b"\x1b[H\x1b[2J"
HEADER = b"queue  ready  inflight"


class Run:
    """`queuekit ARGS` with stdout and/or stderr on a pty (the rest on pipes), its output read as it comes."""

    def __init__(self, args: list[str], *, stdout_tty: bool, stderr_tty: bool):
        master, slave = os.openpty()
        self.master = master
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "queuekit", *args],
            stdin=subprocess.DEVNULL,
            stdout=slave if stdout_tty else subprocess.PIPE,
            stderr=slave if stderr_tty else subprocess.PIPE,
            env=base_env(),
        )
        os.close(slave)
        self.tty = b""

    def read_until(self, predicate, timeout: float = 20.0) -> bytes:
        """Read the pty until ``predicate(output)`` or the process ends (pty closed); bounded in time."""
        deadline = time.monotonic() + timeout
        while not predicate(self.tty) and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: every writer closed the pty
                    break
                if not chunk:
                    break
                self.tty += chunk
        return self.tty

    def finish(self, timeout: float = 20.0) -> tuple[int, bytes]:
        """Exit code and the piped stream's output; the pty read to its end."""
        try:
            out, err = self.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
            os.close(self.master)
            raise
        self.read_until(lambda _: False, timeout=2)
        os.close(self.master)
        return self.popen.returncode, (out or b"") + (err or b"")


def client_args(server, key_file):
    return ["--server", server.address, "--authkey-file", str(key_file)]


def test_stats_watch_redraws_in_place_on_a_terminal(server, key_file, client):
    client.queue("tasks").put_many([{"n": i} for i in range(5)])
    run = Run(
        ["stats", "--watch", "0.2", "--count", "3", *client_args(server, key_file)], stdout_tty=True, stderr_tty=False
    )
    code, _ = run.finish()
    assert code == 0
    assert run.tty.count(CLEAR_HOME) == 3 and run.tty.count(HEADER) == 3
    assert b"every 0.2 s" in run.tty and b"Ctrl-C to stop" in run.tty
    assert run.tty.index(CLEAR_HOME) < run.tty.index(HEADER)  # cleared, then drawn
    assert b"tasks      5" in run.tty


def test_stats_watch_ends_on_ctrl_c_with_exit_0(server, key_file):
    run = Run(
        ["stats", "--watch", "--interval", "0.2", *client_args(server, key_file)], stdout_tty=True, stderr_tty=True
    )
    run.read_until(lambda out: out.count(HEADER) >= 2)
    assert run.tty.count(HEADER) >= 2, run.tty
    t0 = time.monotonic()
    run.popen.send_signal(signal.SIGINT)  # what the terminal sends on Ctrl-C
    code, _ = run.finish(timeout=10)
    assert code == 0 and time.monotonic() - t0 < 5
    assert b"Traceback" not in run.tty and b"event=fatal" not in run.tty


def test_stats_watch_to_a_pipe_prints_plain_snapshots(server, key_file):
    run = Run(
        ["stats", "--watch", "0.2", "--count", "3", *client_args(server, key_file)], stdout_tty=False, stderr_tty=True
    )
    code, out = run.finish()
    assert code == 0 and b"\x1b" not in out
    assert out.count(HEADER) == 3 and out.count(b"\n\n") == 2  # a blank line between snapshots
    run = Run(
        ["stats", "--watch", "0.2", "--count", "2", "--json", *client_args(server, key_file)],
        stdout_tty=False,
        stderr_tty=True,
    )
    code, out = run.finish()
    assert code == 0 and len(out.splitlines()) == 2 and out.startswith(b"{")
    for bad in (["--watch", "0"], ["--watch", "--interval", "0"], ["--watch", "1", "--count", "0"]):
        run = Run(["stats", *bad, *client_args(server, key_file)], stdout_tty=False, stderr_tty=False)
        code, out = run.finish()
        assert code == 3 and b"--watch/--interval must be > 0" in out, bad


def test_produce_shows_progress_only_on_a_terminal(tmp_path, server, key_file, client):
    source = tmp_path / "tasks.jsonl"
    source.write_text("".join(f'{{"n": {i}}}\n' for i in range(3000)))
    args = ["produce", str(source), "--batch", "50", "--rate", "3000", *client_args(server, key_file)]
    run = Run(args, stdout_tty=False, stderr_tty=True)
    code, out = run.finish()
    assert code == 0 and out.strip() == b"produced=3000 queue=tasks"  # stdout unchanged
    updates = run.tty.count(b"\r\x1b[Kproduced ")
    assert updates >= 3, run.tty  # about 1 s at 3000/s: an update every 0.2 s, and the last
    assert run.tty.rstrip().endswith(b"/s, " + run.tty.rstrip().rsplit(b", ", 1)[1])
    assert b"produced 3,000 tasks" in run.tty and run.tty.endswith(b"\r\n")  # the last count stays
    run = Run(args, stdout_tty=False, stderr_tty=False)
    code, out = run.finish()
    assert code == 0 and b"\x1b" not in out and b"produced 3" not in out.replace(b"produced=3000", b"")
    assert client.stats()["queues"]["tasks"]["enqueued"] == 6000
