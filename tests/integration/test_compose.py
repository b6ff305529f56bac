"""Issue 4, cases 8 and 9: the Compose files of compose/, driven with the ``docker compose`` CLI.

The files are copied into a temporary directory next to a throwaway ``secrets/queuekit_authkey``
(0644), so the user's real ``secrets/`` is never touched. The images are this session's
(``QUEUEKIT_IMAGE_TAG=test-<sid>``, ``--no-build``), the project names start with ``qktest-``,
and the host ports are picked free, so nothing clashes with a stack the user runs.
"""

from __future__ import annotations

import shutil

import pytest
from qkstack import EXAMPLE_RX, http_json

from support import dockerkit as dk

pytestmark = pytest.mark.integration

DEMO_TASKS = 100


@pytest.fixture
def compose_dir(images, tmp_path_factory):
    """``<tmp>/compose/*.yaml`` (a copy of compose/) and ``<tmp>/secrets/queuekit_authkey``."""
    root = tmp_path_factory.mktemp("compose")
    shutil.copytree(dk.ROOT / "compose", root / "compose")
    secrets_dir = root / "secrets"
    secrets_dir.mkdir(mode=0o700)
    key = dk.write_authkey(secrets_dir)
    assert dk.file_mode(key) == 0o644
    return root / "compose"


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
    assert dk.AUTHKEY_PATH in mounts and mounts[dk.AUTHKEY_PATH]["Type"] == "bind", mounts


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
    for c in consumers:
        c.reload()
        assert c.status == "running" and "event=consumer_started" in dk.logs(c), dk.describe([c])
    per = {c.name: len(EXAMPLE_RX.findall(dk.logs(c))) for c in consumers}
    for c in [*consumers, *project.containers("server")]:
        _check_hardening(c)
    # The manager port is published on loopback, where a client with the key reaches it.
    import queuekit

    with queuekit.connect(
        f"127.0.0.1:{port}", authkey_file=str(compose_dir.parent / "secrets" / "queuekit_authkey"), connect_timeout=10
    ) as client:
        assert client.stats()["durable"] is True
    metrics["compose --scale consumer=3"] = f"{DEMO_TASKS} demo tasks over 3 consumers: {sorted(per.values())}"


def test_multi_host_split_server_and_workers_as_separate_projects(compose_dir, projects, metrics):
    """Case 9: compose.server.yaml and compose.workers.yaml as two Compose projects on two
    networks; the workers reach the server only through its published port, on the address of
    the engine's default bridge gateway (how another host would reach it)."""
    gateway = dk.bridge_gateway()
    port, http_port = dk.free_port(gateway), dk.free_port()
    server = dk.ComposeProject(
        [compose_dir / "compose.server.yaml"],
        name=dk.short_name("server"),
        env=_env(QUEUEKIT_PUBLISH_ADDR=gateway, QUEUEKIT_PORT=str(port), QUEUEKIT_HTTP_PORT=str(http_port)),
        volumes=["data"],
    )
    projects.append(server)
    workers = dk.ComposeProject(
        [compose_dir / "compose.workers.yaml"],
        name=dk.short_name("workers"),
        env=_env(QUEUEKIT_SERVER=f"{gateway}:{port}"),
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

    stats = _wait_demo_done(http_port, consumers)
    _check_demo(workers.containers("producer"), consumers)
    assert stats["acked"] == DEMO_TASKS, stats
    assert "event=client_connected" in dk.logs(srv)
    metrics["compose multi-host"] = f"workers reached the server at {gateway}:{port}; acked {stats['acked']}"
