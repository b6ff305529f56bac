"""Real queuekit processes on loopback for tests: start, wait for a log line or a condition, signal,
clean up."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
HANDLERS = ROOT / "tests" / "process"


def wait_until(
    predicate: Callable[[], Any], *, timeout: float = 15.0, interval: float = 0.02, what: str | Callable[[], str]
) -> Any:
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` s pass: then an
    AssertionError naming ``what`` (called if callable) and the last value seen. Tests wait on a
    condition with this instead of sleeping and hoping."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g}s waiting for {text} (last value: {value!r})")
        time.sleep(interval)


def waiting(client, queue: str) -> int:
    """Gets parked on the server for ``queue`` (``waiting`` in /stats): 0 for a queue not yet created."""
    return client.stats()["queues"].get(queue, {}).get("waiting", 0)


def wait_parked(client, queue: str, n: int, timeout: float = 10.0) -> None:
    """Wait until exactly ``n`` gets are parked on the server for ``queue``."""
    wait_until(
        lambda: waiting(client, queue) == n,
        timeout=timeout,
        what=lambda: f"{n} parked gets on queue {queue!r} (now {waiting(client, queue)})",
    )


def write_key(path: Path, key: str | None = None) -> Path:
    path.write_text((key or secrets.token_hex(32)) + "\n")
    return path


def base_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUEUEKIT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(HANDLERS)])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Proc:
    """A child process whose stderr+stdout go to a file we can search."""

    all: list[Proc] = []

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict | None = None):
        self.name = name
        self.log_path = log_dir / f"{name}.{len(Proc.all)}.log"
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "queuekit", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env or base_env(),
            cwd=str(ROOT),
        )
        Proc.all.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 15.0, count: int = 1) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            matches = list(re.finditer(pattern, self.log()))
            if len(matches) >= count:
                return matches[count - 1]
            if self.popen.poll() is not None and len(list(re.finditer(pattern, self.log()))) < count:
                raise AssertionError(
                    f"{self.name} exited ({self.popen.returncode}) before logging {pattern!r}:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not log {pattern!r} within {timeout}s:\n{self.log()[-4000:]}")
            time.sleep(0.02)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(5)

    def cleanup(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)
        self._log.close()


class ServerProc(Proc):
    """``queuekit server`` on 127.0.0.1 (ephemeral ports unless given)."""

    def __init__(
        self, log_dir: Path, key_file: Path, *args: str, port: int = 0, http: bool = True, env: dict | None = None
    ):
        argv = [
            "server",
            "--bind",
            f"127.0.0.1:{port}",
            "--http",
            "127.0.0.1:0" if http else "off",
            "--authkey-file",
            str(key_file),
            *args,
        ]
        super().__init__("server", argv, log_dir, env)
        ready = self.wait_for(r"event=server_ready bind=127\.0\.0\.1:(\d+) http=(\S+)")
        self.port = int(ready.group(1))
        self.http_port = int(ready.group(2).rsplit(":", 1)[1]) if http else None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def cleanup_all() -> None:
    while Proc.all:
        Proc.all.pop().cleanup()
