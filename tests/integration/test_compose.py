"""Issue 4, cases 8 and 9: the Compose files of compose/, driven with the ``docker compose`` CLI.

The files are copied into a temporary directory next to throwaway role keys in ``secrets/keys``,
made there by the real ``make secrets`` (``SECRETS_DIR``), so the user's real ``secrets/`` is never
touched and the modes under test are the target's. The images are this session's
(``QUEUEKIT_IMAGE_TAG=test-<sid>``, ``--no-build``), the project names start with ``qktest-``,
and the host ports are picked free, so nothing clashes with a stack the user runs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trustme
from qkstack import EXAMPLE_RX, http_json

from support import dockerkit as dk

pytestmark = pytest.mark.integration

DEMO_TASKS = 100


ROLES = ("producer", "consumer", "admin")
WORKER_TLS_FILES = ("ca.crt", "client.crt", "client.key")  # what a worker host holds with TLS


def make_secrets(secrets_dir) -> str:
    """``make secrets SECRETS_DIR=...`` of this checkout; its output."""
    proc = subprocess.run(
        ["make", "-s", "--no-print-directory", "-C", str(dk.ROOT), "secrets", f"SECRETS_DIR={secrets_dir}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))},
    )
    assert proc.returncode == 0, f"make secrets failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture
def compose_dir(images, tmp_path_factory):
    """``<tmp>/compose/*.yaml`` (a copy of compose/) and ``<tmp>/secrets/keys/<role>.default``."""
    root = tmp_path_factory.mktemp("compose")
    shutil.copytree(dk.ROOT / "compose", root / "compose")
    out = make_secrets(root / "secrets")
    for role in ROLES:
        assert f"created {root}/secrets/keys/{role}.default" in out, out
    check_key_modes(root / "secrets")
    return root / "compose"


def compose_certs(compose_dir: Path) -> Path:
    """``secrets/tls`` next to the Compose files, as ``make certs`` lays it out (ca.crt, ca.key,
    server.crt/.key for the name ``server``, client.crt/.key), with the keys' modes."""
    tls = compose_dir.parent / "secrets" / "tls"
    tls.mkdir()
    ca = trustme.CA()
    (tls / "ca.crt").write_bytes(ca.cert_pem.bytes())
    ca.private_key_pem.write_to_path(str(tls / "ca.key"))
    for stem, names in (("server", ("server", "localhost", "127.0.0.1")), ("client", ("queuekit-client",))):
        leaf = ca.issue_cert(*names)
        (tls / f"{stem}.crt").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        (tls / f"{stem}.key").write_bytes(leaf.private_key_pem.bytes())
    dk.protect_keys(tls)
    return tls


def check_key_modes(secrets_dir) -> None:
    """Only uid 10001 can read the keys (as root), or only the owner and the group the containers
    are given (as another user); never "others"; secrets/ itself is 0700."""
    keys = secrets_dir / "keys"
    assert dk.file_mode(secrets_dir) == 0o700
    root = os.geteuid() == 0
    for path in [keys, *sorted(keys.iterdir())]:
        st = os.stat(path)
        want = (0o500 if root else 0o750) if path.is_dir() else (0o400 if root else 0o640)
        assert dk.file_mode(path) == want, f"{path}: mode {oct(dk.file_mode(path))}, expected {oct(want)}"
        if root:
            assert (st.st_uid, st.st_gid) == (dk.APP_UID, dk.APP_GID), f"{path}: owner {st.st_uid}:{st.st_gid}"


def key_digests(compose_dir) -> dict[str, str]:
    keys = compose_dir.parent / "secrets" / "keys"
    return {role: hashlib.sha256((keys / f"{role}.default").read_bytes()).hexdigest() for role in ROLES}


def check_holds_only(container, role: str, digests: dict[str, str]) -> None:
    """The container mounts one key, at the authkey path, and it is the ``role`` key: fails when a
    consumer holds the producer or admin key (or the keys directory), and the other way round."""
    container.reload()
    secret_mounts = {
        m["Destination"]: m for m in container.attrs["Mounts"] if m["Destination"].startswith("/run/secrets/")
    }
    assert list(secret_mounts) == [dk.AUTHKEY_PATH], f"{container.name} mounts {sorted(secret_mounts)}"
    source = secret_mounts[dk.AUTHKEY_PATH]["Source"]
    assert os.path.basename(source) == f"{role}.default", f"{container.name} mounts {source} as its key"
    if container.status == "running":  # and the file it reads there is that key
        digest = dk.digest_in(container)
        held = [r for r, d in digests.items() if d == digest]
        assert held == [role], f"{container.name} holds the key of {held or 'no role'}, not {role}"


@pytest.fixture
def projects(request):
    """Compose projects of the test: ``down -v`` at the end (logs printed first if it failed)."""
    made: list[dk.ComposeProject] = []
    yield made
    rep = getattr(request.node, "rep_call", None)
    for p in reversed(made):
        if rep is None or rep.failed:
            print(f"\n===== compose project {p.name} =====\n{dk.describe(p.containers())}")
        p.down(timeout=10)


def _env(**extra: str) -> dict[str, str]:
    return {
        "QUEUEKIT_IMAGE_TAG": dk.image_tag(),
        "QUEUEKIT_DEMO_TASKS": str(DEMO_TASKS),
        "QUEUEKIT_DEMO_TASK_MS": "20",
        "QUEUEKIT_STOP_GRACE_PERIOD": "15s",
        **extra,
    }


def _processed(containers) -> dict[int, int]:
    counts: dict[int, int] = {}
    for c in containers:
        for m in EXAMPLE_RX.finditer(dk.logs(c)):
            counts[int(m.group(2))] = counts.get(int(m.group(2)), 0) + 1
    return counts


def _wait_demo_done(http_port: int, consumers, timeout: float = 90) -> dict:
    last = {}

    def done():
        nonlocal last
        try:
            last = http_json(http_port)["queues"].get("tasks", {})
        except OSError as e:
            last = {"error": str(e)}
            return None
        counts = _processed(consumers)
        empty = last.get("ready") == 0 and last.get("inflight") == 0 and last.get("delayed") == 0
        return last if empty and set(range(DEMO_TASKS)) <= set(counts) else None

    return dk.wait_until(done, timeout=timeout, interval=0.3, message=lambda: f"demo tasks not all done: {last}")


def _check_demo(producer_containers, consumers) -> None:
    assert len(producer_containers) == 1, producer_containers
    producer = producer_containers[0]
    assert dk.wait_exit(producer, timeout=30) == 0, dk.describe([producer])
    assert f"produced={DEMO_TASKS} queue=tasks" in dk.logs(producer), dk.logs(producer)
    counts = _processed(consumers)
    assert set(counts) == set(range(DEMO_TASKS)), f"missing {sorted(set(range(DEMO_TASKS)) - set(counts))}"
    twice = sorted(n for n, k in counts.items() if k > 1)
    assert not twice, f"demo tasks processed twice in a fault-free run: {twice}"


def _check_hardening(container) -> None:
    container.reload()
    cfg, host = container.attrs["Config"], container.attrs["HostConfig"]
    assert cfg["User"] == "10001:10001", cfg["User"]
    assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"] and host["Init"] is True, host
    mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
    secret = dk.KEYS_PATH if "server" in container.name else dk.AUTHKEY_PATH
    assert secret in mounts and mounts[secret]["Type"] == "bind" and mounts[secret]["RW"] is False, mounts


def test_compose_up_scale_consumer_3_processes_all_demo_tasks(compose_dir, projects, metrics):
    """Case 8: ``docker compose up -d --scale consumer=3`` of compose/compose.yaml, with the file
    secret; the demo producer's tasks are all processed, spread over the three consumers."""
    port, http_port = dk.free_port(), dk.free_port()
    project = dk.ComposeProject(
        [compose_dir / "compose.yaml"],
        env=_env(QUEUEKIT_PORT=str(port), QUEUEKIT_HTTP_PORT=str(http_port)),
        volumes=["data"],
    )
    projects.append(project)
    project.run("up", "-d", "--no-build", "--scale", "consumer=3", timeout=180)

    consumers = project.containers("consumer")
    assert len(consumers) == 3, [c.name for c in consumers]
    stats = _wait_demo_done(http_port, consumers)
    _check_demo(project.containers("producer"), consumers)
    assert stats["acked"] == DEMO_TASKS and stats["dead"] == 0, stats
    # Three replicas really run and serve (how the 100 tasks spread depends on start order).
    for c in consumers:  # a replica may still be starting when the others finished the demo
        dk.wait_for_log(c, r"event=consumer_started", timeout=30)
        c.reload()
        assert c.status == "running", dk.describe([c])
    per = {c.name: len(EXAMPLE_RX.findall(dk.logs(c))) for c in consumers}
    for c in [*consumers, *project.containers("server")]:
        _check_hardening(c)
    check_roles(project, compose_dir, port)
    metrics["compose --scale consumer=3"] = f"{DEMO_TASKS} demo tasks over 3 consumers: {sorted(per.values())}"


def check_roles(project, compose_dir, port: int) -> None:
    """Issue 11: each container holds only its role's key; a consumer's key cannot put or read
    stats, a producer's cannot get; the admin key (``make stats``' way) reads the stats; and
    another uid in a container cannot read the key file (as root, where the files are 10001's)."""
    import queuekit

    digests = key_digests(compose_dir)
    for c in project.containers("consumer"):
        check_holds_only(c, "consumer", digests)
    for c in project.containers("producer"):
        check_holds_only(c, "producer", digests)
    (server,) = project.containers("server")
    server.reload()
    (keys_mount,) = [m for m in server.attrs["Mounts"] if m["Destination"] == dk.KEYS_PATH]
    assert keys_mount["Source"] == str(compose_dir.parent / "secrets" / "keys"), keys_mount
    assert dk.AUTHKEY_PATH not in {m["Destination"] for m in server.attrs["Mounts"]}, "the server holds a key file"
    if os.geteuid() == 0:
        consumer = project.containers("consumer")[0]
        code, out = dk.exec_in(consumer, ["cat", dk.AUTHKEY_PATH], user="10002:10002")
        assert code != 0 and "Permission denied" in out, f"uid 10002 read the consumer key: exit {code}"

    keys = compose_dir.parent / "secrets" / "keys"

    def client(role: str):
        return queuekit.connect(f"127.0.0.1:{port}", authkey_file=str(keys / f"{role}.default"), connect_timeout=10)

    with client("consumer") as c:
        with pytest.raises(queuekit.PermissionDenied, match="producer role"):
            c.queue("tasks").put({"n": -1, "ms": 0})
        with pytest.raises(queuekit.PermissionDenied, match="admin role"):
            c.stats()
    with client("producer") as c:
        with pytest.raises(queuekit.PermissionDenied, match="consumer role"):
            c.queue("tasks").get(timeout=0)
    with client("admin") as c:
        stats = c.stats()
        assert stats["durable"] is True
        assert stats["queues"]["tasks"]["enqueued"] == DEMO_TASKS, "the refused put enqueued something"
    admin_in_server = f"{dk.KEYS_PATH}/admin.default"  # what `make stats` runs
    out = project.run("exec", "-T", "server", "python3", "-m", "queuekit", "stats", "--authkey-file", admin_in_server)
    assert "tasks" in out.stdout and str(DEMO_TASKS) in out.stdout, out.stdout


def test_make_secrets_migrates_the_old_single_key_and_keeps_existing_keys(tmp_path):
    """An old checkout's secrets/queuekit_authkey becomes the admin key (its holders keep working);
    a second run creates nothing and keeps every key; the modes are set again."""
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o700)
    old = secrets_dir / "queuekit_authkey"
    old.write_text(dk.new_authkey() + "\n")
    old.chmod(0o644)
    out = make_secrets(secrets_dir)
    keys = secrets_dir / "keys"
    assert (keys / "admin.default").read_bytes() == old.read_bytes(), out
    assert "created" not in out.split("admin.default is the old")[0], out
    before = {p.name: p.read_bytes() for p in keys.iterdir()}
    assert sorted(before) == ["admin.default", "consumer.default", "producer.default"]
    assert len(set(before.values())) == 3, "two roles got the same key"
    (keys / "consumer.extra").write_text(dk.new_authkey() + "\n")  # a key added for a rotation
    (keys / "consumer.extra").chmod(0o644)
    assert make_secrets(secrets_dir).strip() == ""
    assert {p.name: p.read_bytes() for p in keys.iterdir() if p.name != "consumer.extra"} == before
    check_key_modes(secrets_dir)


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_multi_host_split_server_and_workers_as_separate_projects(compose_dir, projects, metrics, tls):
    """Case 9: compose.server.yaml and compose.workers.yaml as two Compose projects on two
    networks; the workers reach the server only through its published port, on the address of
    the engine's default bridge gateway (how another host would reach it). With ``tls``, each side
    adds its TLS file (compose.server.tls.yaml, compose.workers.tls.yaml) and the worker "host"
    holds only ca.crt and the client certificate (QUEUEKIT_TLS_DIR), as a real one would: every
    connection is mutual TLS."""
    gateway = dk.bridge_gateway()
    port, http_port = dk.free_port(gateway), dk.free_port()
    server_files, worker_files, worker_env = (
        [compose_dir / "compose.server.yaml"],
        [compose_dir / "compose.workers.yaml"],
        {},
    )
    if tls:
        server_tls = compose_certs(compose_dir)
        worker_tls = compose_dir.parent / "worker-tls"  # what is copied to a worker host, nothing more
        worker_tls.mkdir()
        for name in WORKER_TLS_FILES:
            shutil.copy2(server_tls / name, worker_tls / name)
        dk.protect_keys(worker_tls)
        server_files.append(compose_dir / "compose.server.tls.yaml")
        worker_files.append(compose_dir / "compose.workers.tls.yaml")
        worker_env["QUEUEKIT_TLS_DIR"] = str(worker_tls)
    server = dk.ComposeProject(
        server_files,
        name=dk.short_name("server"),
        env=_env(QUEUEKIT_PUBLISH_ADDR=gateway, QUEUEKIT_PORT=str(port), QUEUEKIT_HTTP_PORT=str(http_port)),
        volumes=["data"],
    )
    projects.append(server)
    workers = dk.ComposeProject(
        worker_files,
        name=dk.short_name("workers"),
        env=_env(QUEUEKIT_SERVER=f"{gateway}:{port}", **worker_env),
    )
    projects.append(workers)
    server.run("up", "-d", "--no-build", "--wait", "--wait-timeout", "60", timeout=120)
    workers.run("up", "-d", "--no-build", "--scale", "consumer=2", timeout=120)

    (srv,) = server.containers("server")
    consumers = workers.containers("consumer")
    assert len(consumers) == 2, [c.name for c in consumers]
    srv.reload()
    published = srv.attrs["NetworkSettings"]["Ports"]["50000/tcp"]
    assert published and published[0]["HostIp"] == gateway, published
    server_nets = set(srv.attrs["NetworkSettings"]["Networks"])
    for c in [*consumers, *workers.containers("producer")]:
        c.reload()
        env = dict(e.partition("=")[::2] for e in c.attrs["Config"]["Env"])
        assert env["QUEUEKIT_SERVER"] == f"{gateway}:{port}", env["QUEUEKIT_SERVER"]
        shared = server_nets & set(c.attrs["NetworkSettings"]["Networks"])
        assert not shared, f"{c.name} shares network(s) {shared} with the server: not a split"
        if tls:
            sources = {m["Source"] for m in c.attrs["Mounts"] if m["Destination"].startswith("/run/secrets/tls_")}
            assert sources == {str(worker_tls / f) for f in WORKER_TLS_FILES}, (c.name, sources)

    stats = _wait_demo_done(http_port, consumers)
    _check_demo(workers.containers("producer"), consumers)
    assert stats["acked"] == DEMO_TASKS, stats
    connected = [line for line in dk.logs(srv).splitlines() if "event=client_connected" in line]
    assert len(connected) >= 3, dk.logs(srv)[-3000:]  # two consumers and the producer
    assert all(("tls=true" in line) == tls for line in connected), connected
    if tls:
        srv.reload()
        held = {m["Destination"] for m in srv.attrs["Mounts"] if m["Destination"].startswith("/run/secrets/tls_")}
        assert {"/run/secrets/tls_server_cert", "/run/secrets/tls_server_key", "/run/secrets/tls_ca"} <= held, held
    label = "compose multi-host" + (" TLS" if tls else "")
    metrics[label] = f"workers reached the server at {gateway}:{port}; acked {stats['acked']}"
