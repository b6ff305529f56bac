"""Mutual TLS in the Kubernetes manifests (issue 12): components/tls mounts the TLS Secrets and
sets the TLS variables; components/tls/secrets generates them (type kubernetes.io/tls) from files;
components/cert-manager has cert-manager issue them. Checked on the rendered overlays dev-tls and
dev-tls-cert-manager; the cert-manager objects against cert-manager's CRD schemas in
test_k8s_schema.py.

What each check catches: a pod without its certificate or with another role's (a client holding
the server's key, anyone holding the CA's key), a variable naming a file the Secret does not have,
a mount that the kubelet cannot update in place (items, subPath: renewal would never reach the
server), a Secret of the wrong type, a certificate whose names do not cover the Service the
clients dial, a Certificate writing a Secret no pod mounts.
"""

from __future__ import annotations

import base64
import copy

import k8slib
import pytest
from k8slib import DEV_NAMESPACE, TLS_OVERLAYS, env_map, one, pod_spec, the_container, workloads

pytestmark = pytest.mark.k8s

SERVER_SECRET, CLIENT_SECRET, CA_SECRET = "queuekit-server-tls", "queuekit-client-tls", "queuekit-ca"
TLS_KEYS = {"tls.crt", "tls.key", "ca.crt"}
SERVER_VARS = ("QUEUEKIT_TLS_CERT_FILE", "QUEUEKIT_TLS_KEY_FILE", "QUEUEKIT_TLS_CLIENT_CA_FILE")
CLIENT_VARS = ("QUEUEKIT_TLS_CA_FILE", "QUEUEKIT_TLS_CLIENT_CERT_FILE", "QUEUEKIT_TLS_CLIENT_KEY_FILE")


def tls_problems(docs: list[dict]) -> list[str]:
    """What is wrong with the TLS wiring of the rendered workloads (empty: nothing). Each workload
    mounts exactly one TLS Secret, the one of its role, whole, 0400, read-only, and every TLS
    variable names a file of that mount that the Secret (or the Certificate writing it) holds."""
    problems = []
    for w in workloads(docs):
        name = w["metadata"]["name"]
        want_secret, want_vars = (
            (SERVER_SECRET, SERVER_VARS) if name == "queuekit-server" else (CLIENT_SECRET, CLIENT_VARS)
        )
        spec = pod_spec(w)
        # components/tunnel-sidecar: the tunnel holds the client certificate, the stock client none.
        tunnels = [c for c in spec.get("initContainers") or [] if c["name"] == k8slib.TUNNEL_CONTAINER]
        container = tunnels[0] if tunnels else the_container(w)
        tls_volumes = [
            v
            for v in spec.get("volumes", [])
            if v.get("secret", {}).get("secretName") in (SERVER_SECRET, CLIENT_SECRET, CA_SECRET)
        ]
        if [v["secret"]["secretName"] for v in tls_volumes] != [want_secret]:
            problems.append(f"{name}: TLS Secrets mounted {[v['secret']['secretName'] for v in tls_volumes]}")
            continue
        (volume,) = tls_volumes
        for other in k8slib.all_containers(spec):
            if other is not container and any(m["name"] == volume["name"] for m in other.get("volumeMounts") or []):
                problems.append(f"{name}/{other['name']}: mounts the TLS Secret beside {container['name']}")
        if "items" in volume["secret"] or volume["secret"].get("defaultMode") != 0o400:
            problems.append(f"{name}: TLS volume {volume['secret']} (want the whole Secret, defaultMode 0400)")
        mounts = [m for m in container.get("volumeMounts", []) if m["name"] == volume["name"]]
        if len(mounts) != 1 or "subPath" in mounts[0] or mounts[0].get("readOnly") is not True:
            problems.append(f"{name}: TLS mount {mounts} (want one read-only mount, no subPath)")
            continue
        root = mounts[0]["mountPath"].rstrip("/") + "/"
        env = env_map(container)
        for var in want_vars:
            path = env.get(var, "")
            if not path.startswith(root) or path.removeprefix(root) not in TLS_KEYS:
                problems.append(f"{name}: {var}={path!r} is not a file of the {want_secret} mount at {root}")
        wrong = sorted(v for v in (*SERVER_VARS, *CLIENT_VARS) if v in env and v not in want_vars)
        if wrong:
            problems.append(f"{name}: the other side's variables {wrong}")
    return problems


@pytest.mark.parametrize("name", TLS_OVERLAYS)
def test_each_pod_mounts_its_roles_certificate_with_the_tls_variables(renders, name):
    docs = renders.docs[name]
    stock = {k8slib.STOCK_CLIENT_JOB[1]} if name in k8slib.TUNNEL_OVERLAYS else set()
    assert {w["metadata"]["name"] for w in workloads(docs)} == {
        "queuekit-server",
        "queuekit-consumer",
        "queuekit-producer",
        *stock,
    }
    assert tls_problems(docs) == []


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda d: _volume(d, "queuekit-consumer")["secret"].update(secretName=SERVER_SECRET), "TLS Secrets mounted"),
        (lambda d: _volume(d, "queuekit-server")["secret"].update(secretName=CA_SECRET), "TLS Secrets mounted"),
        (
            lambda d: pod_spec(one(d, "Job", "queuekit-producer"))["volumes"].append(
                {"name": "ca", "secret": {"secretName": CA_SECRET}}
            ),
            "TLS Secrets mounted",
        ),
        (
            lambda d: _volume(d, "queuekit-server")["secret"].update(items=[{"key": "tls.crt", "path": "tls.crt"}]),
            "whole Secret",
        ),
        (lambda d: _volume(d, "queuekit-consumer")["secret"].update(defaultMode=0o444), "defaultMode 0400"),
        (lambda d: _mount(d, "queuekit-server").update(subPath="tls.crt"), "no subPath"),
        (lambda d: _env(d, "queuekit-consumer", "QUEUEKIT_TLS_CA_FILE", "/run/tls/ca.pem"), "QUEUEKIT_TLS_CA_FILE"),
        (lambda d: _env(d, "queuekit-server", "QUEUEKIT_TLS_CLIENT_CA_FILE", None), "QUEUEKIT_TLS_CLIENT_CA_FILE"),
        (
            lambda d: the_container(one(d, "Job", "queuekit-producer"))["env"].append(
                {"name": "QUEUEKIT_TLS_KEY_FILE", "value": "/run/tls/tls.key"}
            ),
            "other side's variables",
        ),
    ],
    ids=[
        "consumer-holds-server-key",
        "server-holds-ca-key",
        "producer-holds-ca-key-too",
        "items",
        "mode-0444",
        "subpath",
        "wrong-file",
        "missing-client-ca",
        "server-variable-on-a-client",
    ],
)
def test_the_tls_checker_catches_miswiring(renders, mutate, fragment):
    """Negative controls: each mutation of a correct render is reported."""
    docs = copy.deepcopy(renders.docs["dev-tls"])
    mutate(docs)
    problems = tls_problems(docs)
    assert problems and any(fragment in p for p in problems), problems


def _stock_pod(docs) -> dict:
    return pod_spec(one(docs, *k8slib.STOCK_CLIENT_JOB))


def _tunnel_env(docs) -> list[dict]:
    return next(c for c in _stock_pod(docs)["initContainers"] if c["name"] == k8slib.TUNNEL_CONTAINER)["env"]


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (
            lambda d: _stock_pod(d)["containers"][0]["volumeMounts"].append(
                {"name": "tls", "mountPath": "/run/tls", "readOnly": True}
            ),
            "mounts the TLS Secret beside tunnel",
        ),
        (lambda d: _tunnel_env(d).pop(0), "QUEUEKIT_TLS_CA_FILE"),
        (lambda d: _stock_pod(d)["volumes"][1]["secret"].update(secretName=SERVER_SECRET), "TLS Secrets mounted"),
    ],
    ids=["stock-client-holds-the-certificate", "tunnel-without-ca", "tunnel-holds-the-server-key"],
)
def test_the_tls_checker_catches_a_miswired_tunnel_sidecar(renders, mutate, fragment):
    """components/tunnel-sidecar: the tunnel, and only it, holds the client certificate and the CA."""
    docs = copy.deepcopy(renders.docs["dev-tls-tunnel"])
    assert tls_problems(docs) == []
    mutate(docs)
    problems = tls_problems(docs)
    assert problems and any(fragment in p for p in problems), problems


def _workload(docs, name):
    return next(w for w in workloads(docs) if w["metadata"]["name"] == name)


def _volume(docs, name):
    return next(v for v in pod_spec(_workload(docs, name))["volumes"] if v["name"] == "tls")


def _mount(docs, name):
    return next(m for m in the_container(_workload(docs, name))["volumeMounts"] if m["name"] == "tls")


def _env(docs, name, var, value):
    container = the_container(_workload(docs, name))
    container["env"] = [e for e in container["env"] if e["name"] != var]
    if value is not None:
        container["env"].append({"name": var, "value": value})


def test_plain_overlays_have_no_tls(renders):
    for name in ("dev", "dev-keda", "dev-existing-secret"):
        for w in workloads(renders.docs[name]):
            env = env_map(the_container(w))
            assert not [v for v in env if v.startswith("QUEUEKIT_TLS_")], (name, w["metadata"]["name"])


def test_generated_secrets_are_kubernetes_io_tls_from_the_files(renders):
    """components/tls/secrets: both Secrets of type kubernetes.io/tls in the overlay's namespace,
    fixed names, holding the copied files; the CA's key is in none of them."""
    files = {p.name: p.read_bytes() for p in (renders.tree / k8slib.TLS_CERTS_DIR).iterdir()}
    want = {
        SERVER_SECRET: {"tls.crt": "server.crt", "tls.key": "server.key", "ca.crt": "ca.crt"},
        CLIENT_SECRET: {"tls.crt": "client.crt", "tls.key": "client.key", "ca.crt": "ca.crt"},
    }
    for secret_name, layout in want.items():
        secret = one(renders.docs["dev-tls"], "Secret", secret_name)
        assert secret["type"] == "kubernetes.io/tls"
        assert secret["metadata"]["namespace"] == DEV_NAMESPACE
        data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
        assert set(data) == set(layout)
        for key, file in layout.items():
            assert data[key] == files[file], (secret_name, key)
    assert b"PRIVATE KEY" in files["server.key"]
    for secret in k8slib.objects(renders.docs["dev-tls"], "Secret"):
        assert secret["metadata"]["name"] != CA_SECRET


def test_missing_certificate_file_stops_rendering(kubectl, tmp_path):
    tls = k8slib.throwaway_tls_files()
    del tls["server.key"]
    tree = k8slib.copy_k8s_tree(tmp_path, k8slib.throwaway_keys(), tls=tls)
    result = k8slib.kustomize(kubectl, tree / k8slib.KUSTOMIZATIONS["dev-tls"])
    assert result.returncode != 0 and "server.key" in result.stderr, result.stderr


def test_real_certificates_in_the_work_tree_are_not_copied(tmp_path):
    """copy_k8s_tree never carries k8s/components/tls/secrets/certs (a user's real files)."""
    tree = k8slib.copy_k8s_tree(tmp_path, k8slib.throwaway_keys(), tls=None)
    assert not (tree / k8slib.TLS_CERTS_DIR).exists()


# --- cert-manager ------------------------------------------------------------------------------


def _cm(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["apiVersion"] == "cert-manager.io/v1" and d["kind"] == kind}


def test_cert_manager_writes_the_secrets_the_pods_mount(renders):
    docs = renders.docs["dev-tls-cert-manager"]
    certificates, issuers = _cm(docs, "Certificate"), _cm(docs, "Issuer")
    assert set(certificates) == {"queuekit-ca", "queuekit-server", "queuekit-client"}
    assert set(issuers) == {"queuekit-selfsigned", "queuekit-ca"}
    for obj in [*certificates.values(), *issuers.values()]:
        assert obj["metadata"]["namespace"] == DEV_NAMESPACE, obj["metadata"]
    # No Secret of the TLS component is rendered: cert-manager writes them.
    assert not [s for s in k8slib.objects(docs, "Secret") if s["metadata"]["name"].endswith("-tls")]
    # The chain: self-signed -> CA certificate (its Secret) -> CA issuer -> server and client.
    ca = certificates["queuekit-ca"]["spec"]
    assert ca["isCA"] is True and ca["issuerRef"]["name"] == "queuekit-selfsigned"
    assert "selfSigned" in issuers["queuekit-selfsigned"]["spec"]
    assert issuers["queuekit-ca"]["spec"]["ca"]["secretName"] == ca["secretName"] == CA_SECRET
    server, client = certificates["queuekit-server"]["spec"], certificates["queuekit-client"]["spec"]
    for spec in (server, client):
        assert spec["issuerRef"] == {"group": "cert-manager.io", "kind": "Issuer", "name": "queuekit-ca"}
        assert spec["privateKey"]["rotationPolicy"] == "Always"
    assert server["secretName"] == SERVER_SECRET and "server auth" in server["usages"]
    assert client["secretName"] == CLIENT_SECRET and "client auth" in client["usages"]
    assert "client auth" not in server["usages"] and "server auth" not in client["usages"]
    # The names the clients dial (QUEUEKIT_SERVER) and the Services' DNS names are in the certificate.
    dialled: set[str] = set()
    for w in workloads(docs):
        if w["metadata"]["name"] != "queuekit-server":
            dialled.add(env_map(the_container(w))["QUEUEKIT_SERVER"].rsplit(":", 1)[0])
    assert dialled == {"queuekit-server"}
    names = set(server["dnsNames"])
    for svc in ("queuekit-server", "queuekit-server-headless"):
        assert {svc, f"{svc}.{DEV_NAMESPACE}.svc", f"{svc}.{DEV_NAMESPACE}.svc.cluster.local"} <= names
    assert dialled <= names and "localhost" in names and server["ipAddresses"] == ["127.0.0.1"]
    assert tls_problems(docs) == []


def test_cert_manager_component_follows_another_namespace(kubectl, renders, tmp_path):
    """The Issuers, Certificates and the DNS names take the namespace of what the component is
    applied on (copied from the Service), not a fixed queuekit-dev."""
    tree = k8slib.copy_k8s_tree(tmp_path, k8slib.throwaway_keys())
    overlay = tree / "overlays" / "elsewhere"
    (overlay / "ns").mkdir(parents=True)
    (overlay / "ns" / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1alpha1\nkind: Component\nnamespace: team-a\n"
    )
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [../../base]\n"
        "components: [ns, ../../components/cert-manager, ../../components/tls]\n"
    )
    result = k8slib.kustomize(kubectl, overlay)
    assert result.returncode == 0, result.stderr
    docs = k8slib.load_docs(result.stdout)
    certificates = _cm(docs, "Certificate")
    assert {c["metadata"]["namespace"] for c in [*certificates.values(), *_cm(docs, "Issuer").values()]} == {"team-a"}
    assert "queuekit-server.team-a.svc.cluster.local" in certificates["queuekit-server"]["spec"]["dnsNames"]
    assert not [n for n in certificates["queuekit-server"]["spec"]["dnsNames"] if DEV_NAMESPACE in n]


def test_cert_manager_component_without_a_namespace_fails_loudly(kubectl, tmp_path):
    tree = k8slib.copy_k8s_tree(tmp_path, k8slib.throwaway_keys())
    overlay = tree / "overlays" / "nonamespace"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [../../base]\n"
        "components: [../../components/cert-manager]\n"
    )
    result = k8slib.kustomize(kubectl, overlay)
    assert result.returncode != 0 and "namespace" in result.stderr, result.stderr
