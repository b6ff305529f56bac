"""A throwaway PostgreSQL server for tests and the benchmark: initdb in a temporary directory,
``postgres`` on 127.0.0.1 and a free port, a fresh database per test, everything removed at the end.

Binaries: ``$QK_PG_BIN`` or the newest ``/usr/lib/postgresql/<N>/bin`` (Debian's ``postgresql``
package; .ci/run installs it). PostgreSQL refuses to run as root, so as root the cluster belongs to
the ``postgres`` user the package creates (the child processes switch to it; nothing else does).
Connections need a password (scram-sha-256 on 127.0.0.1), so tests exercise the password file.
The pytest fixtures are in tests/conftest.py; bench/throughput.py uses PgServer too.
"""

from __future__ import annotations

import ctypes
import glob
import itertools
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

SUPERUSER = "qk_admin"
PR_SET_PDEATHSIG = 1
_names = itertools.count()


class PgUnavailable(Exception):
    """No PostgreSQL binaries (or no psycopg) on this machine."""


def find_bin() -> Path:
    configured = os.environ.get("QK_PG_BIN")
    candidates = (
        [configured]
        if configured
        else sorted(
            glob.glob("/usr/lib/postgresql/*/bin"),
            key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
        )
    )
    for directory in reversed(candidates):
        if directory and os.access(os.path.join(directory, "postgres"), os.X_OK):
            return Path(directory)
    raise PgUnavailable("PostgreSQL is not installed (apt-get install postgresql; or set QK_PG_BIN)")


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it


def _die_with_parent() -> None:
    """In the child before exec: SIGQUIT (PostgreSQL's immediate shutdown) when the process that
    started it dies, so a test run killed outright (a timeout's SIGKILL) leaves no server behind."""
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGQUIT), 0, 0, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """One PostgreSQL cluster; ``start()``, ``database()`` as often as needed, ``stop()``."""

    def __init__(self, fsync: bool = False):
        self.bin = find_bin()
        self.fsync = fsync  # off for tests (a SIGKILLed queuekit does not need it), on for the bench
        self.password = secrets.token_hex(16)
        self.dir = Path(tempfile.mkdtemp(prefix="qk-pg-"))
        self.data = self.dir / "data"
        self.password_file = self.dir / "password"
        self.password_file.write_text(self.password + "\n")
        self.password_file.chmod(0o600)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        # PostgreSQL will not run as root: the cluster's files and processes belong to 'postgres'.
        self._user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None

    def _as_owner(self) -> dict:
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def start(self, timeout: float = 60.0) -> PgServer:
        pwfile = self.dir / "initdb-pw"
        pwfile.write_text(self.password + "\n")
        if self._user is not None:
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
            os.chown(pwfile, self._user.pw_uid, self._user.pw_gid)
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "--pwfile",
                str(pwfile),
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            cwd=self.dir,
            **self._as_owner(),
        )
        pwfile.unlink()
        last_error = ""
        for _ in range(5):  # the free port may be taken between the probe and the bind
            self.port = _free_port()
            self.log = self.dir / f"postgres.{self.port}.log"
            with open(self.log, "wb") as log:
                if self._user is not None:
                    os.chown(self.log, self._user.pw_uid, self._user.pw_gid)
                self.proc = subprocess.Popen(
                    [
                        str(self.bin / "postgres"),
                        "-D",
                        str(self.data),
                        "-h",
                        "127.0.0.1",
                        "-p",
                        str(self.port),
                        "-k",
                        str(self.dir),
                        "-c",
                        f"fsync={'on' if self.fsync else 'off'}",
                        "-c",
                        "max_connections=200",
                        "-c",
                        "shared_buffers=64MB",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.dir,
                    start_new_session=True,  # a Ctrl-C of the test run is not delivered to it twice
                    preexec_fn=_die_with_parent,
                    **self._as_owner(),
                )
            if self._wait_ready(timeout):
                return self
            last_error = self.log.read_text(errors="replace")[-2000:]
            self._kill()
        raise RuntimeError(f"PostgreSQL did not start: {last_error}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            if "ready to accept connections" in self.log.read_text(errors="replace"):
                return True
            time.sleep(0.05)
        return False

    def url(self, database: str = "postgres", user: str = SUPERUSER) -> str:
        """A URL without the password (the journal reads it from ``password_file``)."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        import psycopg

        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=SUPERUSER, password=self.password, dbname=database, autocommit=True
        )

    def sql(self, statement: str, database: str = "postgres", params: tuple = ()) -> list[tuple]:
        with self.connect(database) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def database(self) -> str:
        """A new empty database; returns its name."""
        name = f"qk_{os.getpid()}_{next(_names)}"
        self.sql(f'CREATE DATABASE "{name}"')
        return name

    def drop(self, name: str) -> None:
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def restart(self, timeout: float = 60.0) -> None:
        """Stop the server (fast shutdown: sessions are cut) and start it again on the same port."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)
        port = self.port
        # Counted before the new server starts: counted after, a server that became ready first
        # (the test process descheduled meanwhile) left nothing to wait for but the 60 s deadline.
        start = self.log.read_text(errors="replace").count("ready to accept connections")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.proc.args, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True,
                preexec_fn=_die_with_parent, **self._as_owner(),
            )  # fmt: skip
        self.port = port
        deadline = time.monotonic() + timeout
        while self.log.read_text(errors="replace").count("ready to accept connections") <= start:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"PostgreSQL did not restart: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # immediate shutdown: nothing to keep
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def stop(self) -> None:
        self._kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class PgDatabase(NamedTuple):
    """One test's database: the URL (no password in it), the password file, the server."""

    url: str
    password_file: str
    server: PgServer
    name: str
