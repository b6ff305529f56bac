"""The PostgreSQL image (scripts/build-postgres-image, no registry) and the server image's psycopg:
a server container journals into a PostgreSQL container on a network of the test's own, a SIGKILLed
server's replacement finds the tasks, and no password shows in a log or in the server's argv."""

from __future__ import annotations

import os
import subprocess

import pytest

import queuekit
from support import dockerkit as dk
from support.procs import ROOT, wait_until

PG_IMAGE = os.environ.get("QUEUEKIT_POSTGRES_IMAGE", "queuekit/postgres:trixie")
PASSWORD_PATH = "/run/secrets/journal_password"


@pytest.fixture(scope="module")
def postgres_image(docker_ready):
    """The image `make postgres-image` builds (make test builds it first); built here if missing."""
    if subprocess.run(["docker", "image", "inspect", PG_IMAGE], capture_output=True).returncode != 0:
        done = subprocess.run(
            [str(ROOT / "scripts" / "build-postgres-image"), PG_IMAGE], capture_output=True, text=True, timeout=1200
        )
        assert done.returncode == 0, f"building {PG_IMAGE} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return PG_IMAGE


def start_postgres(image, network, secret_dir, volume):
    return dk.start_container(
        image,
        "postgres",
        network=network,
        aliases=["postgres"],
        env={"POSTGRES_PASSWORD_FILE": PASSWORD_PATH},
        files={secret_dir / "password": PASSWORD_PATH},
        volumes={volume.name: "/var/lib/postgresql/data"},
        publish=[5432],
        wait_log=r"database system is ready to accept connections",
        wait_timeout=120,
        user="999:999",
    )


def start_server(images, network, secret_dir, key_file):
    return dk.start_container(
        images["server"],
        "pgserver",
        network=network,
        env={
            "QUEUEKIT_DATA_DIR": "",  # the image's default; the journal URL replaces it
            "QUEUEKIT_JOURNAL_URL": "postgresql://queuekit@postgres:5432/queuekit",
            "QUEUEKIT_JOURNAL_PASSWORD_FILE": PASSWORD_PATH,
        },
        authkey_file=key_file,
        files={secret_dir / "password": PASSWORD_PATH},
        publish=[50000],
        wait_log=r"event=server_ready",
        wait_timeout=60,
    )


def test_server_image_journals_into_the_postgres_image(images, postgres_image, tmp_path):
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    secret_dir.chmod(0o755)
    password = dk.new_authkey()
    (secret_dir / "password").write_text(password + "\n")
    (secret_dir / "password").chmod(0o644)  # read through a bind mount by uids 999 and 10001
    key_file = dk.write_authkey(tmp_path)
    network = dk.create_network("pgnet")
    volume = dk.create_volume("pgdata")
    containers = []
    try:
        pg = start_postgres(postgres_image, network, secret_dir, volume)
        containers.append(pg)
        server = start_server(images, network, secret_dir, key_file)
        containers.append(server)
        address = f"127.0.0.1:{dk.host_port(server, 50000)}"
        client = queuekit.connect(address, authkey=open(key_file).read().strip().encode(), connect_timeout=30)
        q = client.queue("jobs")
        ids = q.put_many([{"n": i} for i in range(20)])
        held = q.get_many(5)  # in flight when the server dies: ready again afterwards
        client.close()
        dk.raw(server).kill()  # SIGKILL
        server_logs = [dk.logs(server)]
        dk.remove(server)
        server = start_server(images, network, secret_dir, key_file)
        containers.append(server)
        dk.wait_for_log(server, r"event=recovered tasks=20")
        address = f"127.0.0.1:{dk.host_port(server, 50000)}"
        client = queuekit.connect(address, authkey=open(key_file).read().strip().encode(), connect_timeout=30)
        got = client.queue("jobs").get_many(50)
        assert sorted(t.id for t in got) == sorted(ids) and {t.id for t in held} <= {t.id for t in got}
        client.close()

        # The journal really is in the PostgreSQL container (through its published port).
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=dk.host_port(pg, 5432), user="queuekit", dbname="queuekit", password=password
        ) as conn:
            assert conn.execute("SELECT count(*) FROM queuekit_tasks").fetchone() == (20,)
        # The data directory belongs to the image's non-root user.
        code, out = dk.exec_in(pg, ["sh", "-c", "id -u; stat -c '%u %a' \"$PGDATA\""], user="999:999")
        assert code == 0 and out.split() == ["999", "999", "700"], out
        # No password in a log or in the server's command line.
        for text in [*server_logs, dk.logs(server), dk.logs(pg)]:
            assert password not in text
        code, out = dk.exec_in(server, ["sh", "-c", "tr '\\0' ' ' < /proc/1/cmdline; cat /proc/*/cmdline"])
        assert password not in out
    finally:
        dk.remove(*containers)
        network.remove()
        wait_until(lambda: _remove_volume(volume), timeout=30, what="the test volume to be removable")


def _remove_volume(volume) -> bool:
    try:
        volume.remove(force=True)
        return True
    except Exception:
        return False
