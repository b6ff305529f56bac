"""Issue 12 over a real container network: the TLS stack end to end, what a machine on the path
sees with and without TLS, and mutual TLS refusing clients without a good certificate; plus the
Compose TLS variant (compose/compose.tls.yaml) brought up with ``docker compose``.

Certificates are made at test time (trustme) in the test's own directory, with the modes
``make secrets`` gives the role keys (uid 10001 reads them, through group_add when not root), and
bind-mounted read-only as the Compose and Kubernetes setups mount them. Everything is labelled and
removed by the ``stack`` / ``projects`` fixtures.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil

import pytest
import trustme
from qkstack import EXAMPLE_RX, http_json

# Helpers and fixtures of the Compose tests (compose_dir: a copy of compose/ with make secrets' keys).
from test_compose import _check_demo, _env, _wait_demo_done, compose_certs, compose_dir, projects  # noqa: F401

from support import dockerkit as dk

pytestmark = pytest.mark.integration

STOCK_CLIENT = "k8s/components/tunnel-sidecar/stock_client.py"  # the seed's stock client, unmodified
TLS_DIR = "/run/tls"  # where the containers see their certificate directory
CLIENT_TLS_ENV = {
    "QUEUEKIT_TLS_CA_FILE": f"{TLS_DIR}/ca.crt",
    "QUEUEKIT_TLS_CLIENT_CERT_FILE": f"{TLS_DIR}/client.crt",
    "QUEUEKIT_TLS_CLIENT_KEY_FILE": f"{TLS_DIR}/client.key",
    "QUEUEKIT_TLS_SERVER_NAME": "server",
}
SERVER_TLS_ENV = {
    "QUEUEKIT_TLS_CERT_FILE": f"{TLS_DIR}/server.crt",
    "QUEUEKIT_TLS_KEY_FILE": f"{TLS_DIR}/server.key",
    "QUEUEKIT_TLS_CLIENT_CA_FILE": f"{TLS_DIR}/ca.crt",
}

# A recording TCP proxy, run with the server image's Python: listens on 50000, forwards each
# connection to argv[1]:argv[2] and appends every byte of both directions to /tmp/capture.
PROXY = r"""
import socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
lst = socket.socket()
lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind(("0.0.0.0", 50000))
lst.listen(16)
cap = open("/tmp/capture", "ab", buffering=0)
lock = threading.Lock()
print("event=proxy_ready", flush=True)
def pump(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            with lock:
                cap.write(data)
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
while True:
    client, _ = lst.accept()
    try:
        upstream = socket.create_connection((host, port), timeout=10)
    except OSError:
        client.close()
        continue
    upstream.settimeout(None)
    for a, b in ((client, upstream), (upstream, client)):
        threading.Thread(target=pump, args=(a, b), daemon=True).start()
"""
# Prints the capture's size and whether the marker (argv[1]) occurs in it.
CAPTURE_CHECK = (
    "import json, sys; d = open('/tmp/capture', 'rb').read(); "
    "print(json.dumps({'bytes': len(d), 'marker': sys.argv[1].encode() in d}))"
)


def write_cert_dir(directory, ca: trustme.CA, stem: str, *names: str, with_ca: trustme.CA | None = None):
    """``directory/{ca.crt, <stem>.crt, <stem>.key}``: a certificate of ``ca`` for ``names`` and the
    CA certificate to trust (``with_ca``, default ``ca``), with the role keys' modes."""
    directory.mkdir(parents=True)
    leaf = ca.issue_cert(*names)
    (directory / f"{stem}.crt").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    (directory / f"{stem}.key").write_bytes(leaf.private_key_pem.bytes())
    (directory / "ca.crt").write_bytes((with_ca or ca).cert_pem.bytes())
    dk.protect_keys(directory)
    return directory


@pytest.fixture
def pki(stack):
    """Certificate directories: the server's, a good client's, one from another CA, and the CA only."""
    root = stack.workdir / "tls"
    ca, other = trustme.CA(), trustme.CA()
    return {
        "server": write_cert_dir(root / "server", ca, "server", "server", "localhost", "127.0.0.1"),
        "client": write_cert_dir(root / "client", ca, "client", "queuekit-client"),
        "other": write_cert_dir(root / "other", other, "client", "queuekit-client", with_ca=ca),
        "operator": write_cert_dir(root / "operator", ca, "client", "operator"),
    }


def tls_server(stack, pki, *, mutual=True, name="server", aliases=("server",)):
    env = dict(SERVER_TLS_ENV)
    if not mutual:
        env.pop("QUEUEKIT_TLS_CLIENT_CA_FILE")
    c = dk.start_container(
        stack.images["server"],
        f"{stack.hint}-{name}",
        network=stack.network,
        aliases=list(aliases),
        env={"QUEUEKIT_DATA_DIR": "", **env},
        keys_dir=stack.keys_dir,
        files={pki["server"]: TLS_DIR, pki["operator"]: "/run/tls-operator"},
        publish=[50000, 8080],
        wait_log=r"event=server_ready",
    )
    stack.containers.append(c)
    stack.server_container = c  # stack.stats(): its HTTP /stats
    return c


def client_container(
    stack, image, name, command, *, tls_dir=None, server="server:50000", env=None, role="producer", files=None,
    wait_log=None,
):  # fmt: skip
    environment = {"QUEUEKIT_SERVER": server, "QUEUEKIT_QUEUE": "tasks", "QUEUEKIT_CONNECT_TIMEOUT": "5"}
    if tls_dir is not None:
        environment.update(CLIENT_TLS_ENV)
    for key, value in (env or {}).items():
        if value is None:
            environment.pop(key, None)
        else:
            environment[key] = value
    mounts = dict(files or {})
    if tls_dir is not None:
        mounts[tls_dir] = TLS_DIR
    c = dk.start_container(
        stack.images[image],
        f"{stack.hint}-{name}",
        network=stack.network,
        env=environment,
        command=command,
        authkey_file=stack.keys[role],
        files=mounts,
        wait_log=wait_log,
    )
    stack.containers.append(c)
    return c


def proxy(stack, name: str, upstream: str):
    c = dk.start_container(
        stack.images["server"],
        f"{stack.hint}-{name}",
        network=stack.network,
        aliases=[name],
        entrypoint=["python3", "-c", PROXY, upstream, "50000"],
        wait_log=r"event=proxy_ready",
    )
    stack.containers.append(c)
    return c


def capture(proxy_container, marker: str) -> dict:
    code, out = dk.exec_in(proxy_container, ["python3", "-c", CAPTURE_CHECK, marker])
    assert code == 0, out
    return json.loads(out.strip().splitlines()[-1])


def operator_stats(server) -> dict:
    """``queuekit stats`` in the server container over mutual TLS with the admin key, as
    ``make stats TLS=1`` runs it."""
    code, out = dk.exec_in(
        server,
        [
            "python3", "-m", "queuekit", "stats", "--json", "--connect-timeout", "5",
            "--authkey-file", f"{dk.KEYS_PATH}/admin.default",
            "--tls-ca-file", "/run/tls-operator/ca.crt",
            "--tls-client-cert-file", "/run/tls-operator/client.crt",
            "--tls-client-key-file", "/run/tls-operator/client.key",
        ],
    )  # fmt: skip
    assert code == 0, out
    return json.loads(out)


def test_tls_stack_runs_end_to_end(stack, pki):
    """Server with mutual TLS, two consumers and a producer over TLS on the network; every task is
    done, every connection is TLS, and the operator's stats work over TLS."""
    server = tls_server(stack, pki)
    consumers = [
        client_container(
            stack,
            "consumer",
            f"consumer{i}",
            None,
            tls_dir=pki["client"],
            role="consumer",
            wait_log=r"event=consumer_started",
        )  # fmt: skip
        for i in (1, 2)
    ]
    producer = client_container(
        stack, "producer", "producer", ["produce", "--generate", "40", "--task-ms", "10"], tls_dir=pki["client"]
    )
    assert dk.wait_exit(producer, timeout=60) == 0, dk.describe([producer, server])
    stack.wait_settled(40, timeout=90)
    done = sorted(int(m.group(2)) for c in consumers for m in EXAMPLE_RX.finditer(dk.logs(c)))
    assert done == list(range(40)), done
    logs = dk.logs(server)
    assert "event=tls_loaded" in logs, logs
    connected = [line for line in logs.splitlines() if "event=client_connected" in line]
    assert len(connected) >= 3 and all("tls=true" in line for line in connected), connected
    stats = operator_stats(server)
    assert stats["queues"]["tasks"]["acked"] == 40, stats


def test_proxy_sees_the_payload_without_tls_and_not_with_it(stack, pki):
    """A recording proxy between a producer container and the server: the marker is in the bytes
    of the plaintext connection (the control: the proxy sees the traffic) and nowhere in those of
    the TLS one, which still carried the task to the server."""
    marker = "QKMARK-" + secrets.token_hex(12)
    tasks_file = stack.workdir / "tasks.jsonl"
    tasks_file.write_text(json.dumps({"n": 1, "ms": 1, "secret": marker}) + "\n")
    tasks_file.chmod(0o644)
    tls = tls_server(stack, pki)
    plain = stack.server(durable=False)  # alias "server" too: each proxy dials its server's IP
    tls_proxy = proxy(stack, "proxy-tls", dk.ip_address(tls, stack.network))
    plain_proxy = proxy(stack, "proxy-plain", dk.ip_address(plain, stack.network))
    files = {tasks_file: "/run/tasks.jsonl"}

    sent = client_container(
        stack, "producer", "producer-plain", ["produce", "/run/tasks.jsonl"], server="proxy-plain:50000", files=files
    )
    assert dk.wait_exit(sent, timeout=60) == 0, dk.describe([sent, plain])
    seen = capture(plain_proxy, marker)
    assert seen["bytes"] > 0 and seen["marker"] is True, seen

    sent = client_container(
        stack,
        "producer",
        "producer-tls",
        ["produce", "/run/tasks.jsonl"],
        server="proxy-tls:50000",
        tls_dir=pki["client"],
        files=files,
    )
    assert dk.wait_exit(sent, timeout=60) == 0, dk.describe([sent, tls])
    seen = capture(tls_proxy, marker)
    assert seen["bytes"] > 1000 and seen["marker"] is False, seen
    stats = operator_stats(tls)
    assert stats["queues"]["tasks"]["enqueued"] == 1, stats


@pytest.mark.parametrize(
    "which, reason",
    [("ca-only", "no_client_certificate"), ("other", "client_certificate_rejected")],
    ids=["no-client-certificate", "certificate-from-another-ca"],
)
def test_mutual_tls_refuses_clients_without_a_good_certificate(stack, pki, which, reason):
    """A client container with only the CA, or with a certificate of another CA, is refused
    (exit code 4, the auth code, fast) and the server logs why; a good client passes (control)."""
    server = tls_server(stack, pki)
    good = client_container(stack, "consumer", "good", ["check"], tls_dir=pki["client"], role="consumer")
    assert dk.wait_exit(good, timeout=30) == 0, dk.describe([good, server])
    if which == "ca-only":
        tls_dir = stack.workdir / "tls" / "ca-only"
        tls_dir.mkdir()
        shutil.copy(pki["client"] / "ca.crt", tls_dir / "ca.crt")
        dk.protect_keys(tls_dir)
        env = {"QUEUEKIT_TLS_CLIENT_CERT_FILE": None, "QUEUEKIT_TLS_CLIENT_KEY_FILE": None}
    else:
        tls_dir, env = pki["other"], {}
    bad = client_container(stack, "consumer", "bad", ["check"], tls_dir=tls_dir, role="consumer", env=env)
    assert dk.wait_exit(bad, timeout=30) == 4, dk.describe([bad])
    dk.wait_for_log(server, rf"event=tls_handshake_failed .*reason={reason}", timeout=10)


# --- the Compose TLS variant -----------------------------------------------------------------


def test_compose_tls_variant_runs_the_demo_over_mutual_tls(compose_dir, projects):  # noqa: F811
    """compose.yaml + compose.tls.yaml with certificates in secrets/tls (the files ``make certs``
    writes, with the keys' modes): the demo runs over mutual TLS, ``make stats``' command works in
    the server container, and no container holds the CA's key or another role's key."""
    compose_certs(compose_dir)
    port, http_port = dk.free_port(), dk.free_port()
    project = dk.ComposeProject(
        [compose_dir / "compose.yaml", compose_dir / "compose.tls.yaml"],
        env=_env(QUEUEKIT_PORT=str(port), QUEUEKIT_HTTP_PORT=str(http_port)),
        volumes=["data"],
    )
    projects.append(project)
    project.run("up", "-d", "--no-build", "--scale", "consumer=2", timeout=180)
    consumers = project.containers("consumer")
    stats = _wait_demo_done(http_port, consumers)
    _check_demo(project.containers("producer"), consumers)
    assert stats["acked"] >= 100 and stats["dead"] == 0, stats
    (server,) = project.containers("server")
    logs = server.logs().decode()
    connected = [line for line in logs.splitlines() if "event=client_connected" in line]
    assert "event=tls_loaded" in logs and connected and all("tls=true" in line for line in connected), logs[-3000:]
    # make stats TLS=1: the same command, in the server container, over TLS with the client certificate
    out = project.run(
        "exec", "-T", "server", "python3", "-m", "queuekit", "stats", "--json",
        "--authkey-file", f"{dk.KEYS_PATH}/admin.default",
    )  # fmt: skip
    assert json.loads(out.stdout)["queues"]["tasks"]["acked"] >= 100, out.stdout
    for c in [server, *consumers, *project.containers("producer")]:
        c.reload()
        sources = {m["Destination"]: m["Source"] for m in c.attrs["Mounts"]}
        assert not [s for s in sources.values() if s.endswith("ca.key")], sources
        held = {d.rsplit("/", 1)[-1] for d in sources if d.startswith("/run/secrets/tls_")}
        want = {"tls_ca", "tls_client_cert", "tls_client_key"}
        assert held == (want | {"tls_server_cert", "tls_server_key"} if c is server else want), (c.name, held)


def test_compose_tunnel_sidecar_carries_the_stock_client_over_tls(compose_dir, projects):  # noqa: F811
    """compose.tunnel.yaml on top of the TLS variant: the seed's stock client (STOCK_CLIENT)
    runs in the tunnel sidecar's network namespace holding only the producer key, puts its tasks
    through ``queuekit tunnel`` into the mutual-TLS server, and the consumers do them all. Control:
    the same script and key aimed straight at the server's TLS port fail."""
    tls = compose_certs(compose_dir)
    script = compose_dir.parent / STOCK_CLIENT  # where compose.tunnel.yaml finds it, in the copy
    script.parent.mkdir(parents=True)
    shutil.copy2(dk.ROOT / STOCK_CLIENT, script)
    http_port = dk.free_port()
    n = 30
    project = dk.ComposeProject(
        [compose_dir / "compose.yaml", compose_dir / "compose.tls.yaml", compose_dir / "compose.tunnel.yaml"],
        env=_env(QUEUEKIT_PORT=str(dk.free_port()), QUEUEKIT_HTTP_PORT=str(http_port), QUEUEKIT_DEMO_TASKS=str(n)),
        volumes=["data"],
    )
    projects.append(project)
    project.run("up", "-d", "--no-build", "--scale", "consumer=1", timeout=180)
    assert project.containers("producer") == [], "the demo producer runs beside the stock client"
    (stock,) = project.containers("stock-client")
    assert dk.wait_exit(stock, timeout=60) == 0, dk.describe([stock, *project.containers("tunnel")])
    assert dk.logs(stock).startswith("put "), dk.logs(stock)

    def all_done():
        queue = http_json(http_port)["queues"].get("tasks", {})
        return queue if queue.get("acked") == n + 1 and queue.get("ready") == 0 else None

    dk.wait_until(all_done, timeout=60, message="the stock client's tasks were not all acked")
    (server,) = project.containers("server")
    (tunnel,) = project.containers("tunnel")
    logs = server.logs().decode()
    connected = [line for line in logs.splitlines() if "event=client_connected" in line]
    assert connected and all("tls=true" in line for line in connected), logs[-3000:]
    assert re.search(r"event=tunnel_closed .*bytes_in=[1-9]", dk.logs(tunnel)), dk.logs(tunnel)
    # Who holds what: the stock client the producer key and no TLS file, the tunnel the CA and the
    # client certificate and no authkey; both share one network namespace.
    for c in (stock, tunnel):
        c.reload()
    mounts = {c.name: {m["Destination"] for m in c.attrs["Mounts"]} for c in (stock, tunnel)}
    assert {d for d in mounts[stock.name] if d.startswith("/run/")} == {dk.AUTHKEY_PATH}, mounts
    assert {d for d in mounts[tunnel.name] if d.startswith("/run/")} == {
        "/run/secrets/tls_ca", "/run/secrets/tls_client_cert", "/run/secrets/tls_client_key",
    }, mounts  # fmt: skip
    assert stock.attrs["HostConfig"]["NetworkMode"] == f"container:{tunnel.id}", stock.attrs["HostConfig"]
    assert (
        os.path.basename(next(m["Source"] for m in stock.attrs["Mounts"] if m["Destination"] == dk.AUTHKEY_PATH))
        == "producer.default"
    )

    # Control: the same stock client, key and script in the server's network namespace, where
    # 127.0.0.1:50000 is the TLS port itself: refused, and the server says why.
    direct = dk.start_container(
        dk.image_ref("producer"),
        "stock-direct",
        network_mode=f"container:{server.id}",
        hostname=None,
        entrypoint=["python3", "/opt/stock/stock_client.py"],
        command=["50000", dk.AUTHKEY_PATH, "put", "1"],
        authkey_file=compose_dir.parent / "secrets" / "keys" / "producer.default",
        files={script: "/opt/stock/stock_client.py"},
    )
    try:
        assert dk.wait_exit(direct, timeout=30) != 0, dk.describe([direct])
        assert "put " not in dk.logs(direct), dk.logs(direct)
        dk.wait_for_log(server, r"event=tls_handshake_failed .*reason=", timeout=10)
    finally:
        dk.remove(direct)
    assert http_json(http_port)["queues"]["tasks"]["enqueued"] == n + 1
    assert (tls / "ca.key").exists() and not [
        m for c in project.containers() for m in c.attrs["Mounts"] if m["Source"].endswith("ca.key")
    ]
