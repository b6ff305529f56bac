"""Every kustomization renders with `kubectl kustomize`, to the objects we expect; the keys
Secret comes only from the role key files, and a missing key file is a loud error."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import k8slib
import pytest
from k8slib import KUSTOMIZATIONS, one, pod_spec, workloads

pytestmark = pytest.mark.k8s

BASE_OBJECTS = {
    ("ServiceAccount", "queuekit-server"),
    ("ServiceAccount", "queuekit-consumer"),
    ("ServiceAccount", "queuekit-producer"),
    ("Service", "queuekit-server"),
    ("Service", "queuekit-server-headless"),
    ("StatefulSet", "queuekit-server"),
    ("Deployment", "queuekit-consumer"),
    ("PodDisruptionBudget", "queuekit-consumer"),
    ("Job", "queuekit-producer"),
    ("NetworkPolicy", "queuekit-server"),
    ("NetworkPolicy", "queuekit-clients"),
}
SECRET = ("Secret", k8slib.SECRET_NAME)
EGRESS = ("NetworkPolicy", "queuekit-clients-egress")  # components/egress, in every dev overlay
EXPECTED = {
    "base": BASE_OBJECTS | {SECRET},
    "dev": BASE_OBJECTS | {SECRET, ("Namespace", "queuekit-dev"), EGRESS},
    "dev-existing-secret": BASE_OBJECTS | {("Namespace", "queuekit-dev"), EGRESS},
    "dev-keda": BASE_OBJECTS
    | {
        SECRET,
        ("Namespace", "queuekit-dev"),
        EGRESS,
        ("ScaledObject", "queuekit-consumer"),
        ("NetworkPolicy", "queuekit-server-from-keda"),
    },
    # components/tls/secrets + components/tls
    "dev-tls": BASE_OBJECTS
    | {
        SECRET,
        ("Namespace", "queuekit-dev"),
        EGRESS,
        ("Secret", "queuekit-server-tls"),
        ("Secret", "queuekit-client-tls"),
    },
    # components/cert-manager + components/tls: cert-manager writes the TLS Secrets
    "dev-tls-cert-manager": BASE_OBJECTS
    | {
        SECRET,
        ("Namespace", "queuekit-dev"),
        EGRESS,
        ("Issuer", "queuekit-selfsigned"),
        ("Issuer", "queuekit-ca"),
        ("Certificate", "queuekit-ca"),
        ("Certificate", "queuekit-server"),
        ("Certificate", "queuekit-client"),
    },
}
# dev-tls + components/tunnel-sidecar: the stock client Job, its account and its script
EXPECTED["dev-tls-tunnel"] = EXPECTED["dev-tls"] | {
    ("ServiceAccount", "queuekit-stock-client"),
    k8slib.STOCK_CLIENT_JOB,
    ("ConfigMap", "queuekit-stock-client"),  # + kustomize's content hash, dropped by _kind_names
}


def _kind_names(docs: list[dict]) -> list[tuple[str, str]]:
    def name(d: dict) -> str:
        n = d["metadata"]["name"]
        return re.sub(r"-[a-z0-9]{10}$", "", n) if d["kind"] == "ConfigMap" else n

    return [(d["kind"], name(d)) for d in docs]


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_renders_expected_objects(renders, name):
    found = _kind_names(renders.docs[name])
    assert len(found) == len(set(found)), f"duplicate objects in {name}: {sorted(found)}"
    assert set(found) == EXPECTED[name]
    for doc in renders.docs[name]:
        assert doc.get("apiVersion") and doc["metadata"].get("name"), doc


@pytest.mark.parametrize("name", k8slib.NEEDS_KEY)
def test_missing_key_files_fail_loudly(kubectl, tmp_path, name):
    tree = k8slib.copy_k8s_tree(tmp_path, keys=None)
    assert not (tree / "base" / "keys").exists() and not (tree / "base" / "authkey").exists()
    result = k8slib.kustomize(kubectl, tree / KUSTOMIZATIONS[name])
    assert result.returncode != 0, "rendered without key files:\n" + result.stdout[:2000]
    assert result.stdout.strip() == "", "partial output despite the error"
    assert str(tree / "base" / "keys") in result.stderr, f"stderr does not name the keys:\n{result.stderr}"


@pytest.mark.parametrize("role", list(k8slib.ROLE_KEYS))
def test_each_missing_role_key_fails_loudly(kubectl, tmp_path, role):
    keys = k8slib.throwaway_keys()
    del keys[k8slib.ROLE_KEYS[role]]
    tree = k8slib.copy_k8s_tree(tmp_path, keys)
    result = k8slib.kustomize(kubectl, tree / KUSTOMIZATIONS["dev"])
    assert result.returncode != 0 and result.stdout.strip() == "", "rendered without the " + role + " key"
    missing = str(tree / "base" / "keys" / k8slib.ROLE_KEYS[role])
    assert missing in result.stderr, f"stderr does not name {missing}:\n{result.stderr}"


def test_existing_secret_overlay_renders_in_place_without_key(kubectl):
    """The work tree itself (not a copy) renders where no key is read at all."""
    result = k8slib.kustomize(kubectl, k8slib.K8S_DIR / KUSTOMIZATIONS["dev-existing-secret"])
    assert result.returncode == 0, result.stderr
    docs = k8slib.load_docs(result.stdout)
    assert not [d for d in docs if d["kind"] == "Secret"]
    names = {v["secret"]["secretName"] for w in workloads(docs) for v in pod_spec(w)["volumes"] if "secret" in v}
    assert names == {k8slib.SECRET_NAME}
    # the keys the pods ask for are the ones the README tells you to create
    items = {
        i["key"] for w in workloads(docs) for v in pod_spec(w)["volumes"] for i in v.get("secret", {}).get("items", [])
    }
    assert items == {k8slib.ROLE_KEYS["consumer"], k8slib.ROLE_KEYS["producer"]}


@pytest.mark.parametrize("name", k8slib.NEEDS_KEY)
def test_secret_holds_the_role_key_files_under_their_names(renders, name):
    secrets = [d for d in renders.docs[name] if d["kind"] == "Secret"]
    (secret,) = [d for d in secrets if d["metadata"]["name"] not in k8slib.TLS_SECRET_NAMES]
    assert secret["metadata"]["name"] == k8slib.SECRET_NAME
    assert secret.get("type") == "Opaque"
    assert "stringData" not in secret
    assert sorted(secret["data"]) == sorted(k8slib.ROLE_KEYS.values())
    for key, content in renders.keys.items():
        assert base64.b64decode(secret["data"][key]) == content, key
    # every pod's secret volume points at this very Secret (or, with TLS, a TLS Secret)
    refs = {
        v["secret"]["secretName"]
        for w in workloads(renders.docs[name])
        for v in pod_spec(w)["volumes"]
        if "secret" in v and v["secret"]["secretName"] not in k8slib.TLS_SECRET_NAMES
    }
    assert refs == {secret["metadata"]["name"]}


def test_keys_change_in_place_without_restarting_the_server(kubectl, tmp_path):
    """Rotation without a restart (base/kustomization.yaml): new keys, or one more key, change the
    Secret's data but not its name, so no pod template changes and the kubelet updates the mounted
    files in place (the server re-reads its keys directory). With kustomize's name hash, any key
    change would rename the Secret and restart the server."""
    renders = []
    rotated = {**k8slib.throwaway_keys(), "consumer.next": k8slib.throwaway_key()}
    for i, keys in enumerate((k8slib.throwaway_keys(), k8slib.throwaway_keys(), rotated)):
        tree = k8slib.copy_k8s_tree(tmp_path / str(i), keys)
        if "consumer.next" in keys:  # a key added to the generator, as k8s/README.md says
            kfile = tree / "base" / "kustomization.yaml"
            text = kfile.read_text()
            assert "      - admin.default=keys/admin.default\n" in text
            kfile.write_text(
                text.replace(
                    "      - admin.default=keys/admin.default\n",
                    "      - admin.default=keys/admin.default\n      - consumer.next=keys/consumer.next\n",
                )
            )
        result = k8slib.kustomize(kubectl, tree / "base")
        assert result.returncode == 0, result.stderr
        docs = k8slib.load_docs(result.stdout)
        (secret,) = [d for d in docs if d["kind"] == "Secret"]
        renders.append((secret, {w["metadata"]["name"]: w["spec"]["template"] for w in workloads(docs)}))
    assert {s["metadata"]["name"] for s, _ in renders} == {k8slib.SECRET_NAME}
    assert renders[0][0]["data"] != renders[1][0]["data"]
    assert "consumer.next" in renders[2][0]["data"]
    for _, templates in renders[1:]:
        assert templates == renders[0][1], "a key change alters a pod template (the pods would restart)"


@pytest.mark.parametrize("name", k8slib.DEPLOYABLE)
def test_overlays_put_everything_in_one_namespace(renders, name):
    docs = renders.docs[name]
    ns = one(docs, "Namespace", k8slib.DEV_NAMESPACE)
    labels = ns["metadata"].get("labels") or {}
    assert labels.get("pod-security.kubernetes.io/enforce") == "restricted"
    for doc in docs:
        if doc["kind"] == "Namespace":
            continue
        assert doc["metadata"].get("namespace") == k8slib.DEV_NAMESPACE, (
            doc["kind"],
            doc["metadata"]["name"],
        )


def test_base_is_namespace_agnostic(renders):
    assert [d["metadata"]["name"] for d in renders.docs["base"] if "namespace" in d["metadata"]] == []


KEDA_OBJECTS = {("ScaledObject", "queuekit-consumer"), ("NetworkPolicy", "queuekit-server-from-keda")}
# dev + components/monitoring (checked in test_k8s_monitoring.py)
EXPECTED["dev-monitoring"] = EXPECTED["dev"] | {
    ("PodMonitor", "queuekit-server"),
    ("PrometheusRule", "queuekit"),
    ("NetworkPolicy", "queuekit-server-from-prometheus"),
}


def _overlay(tree, name: str, *, components: list[str], namespace: str | None = None) -> Path:
    """A throwaway kustomization in the copied tree: base + components (+ a namespace component
    listed first, the way components/dev sets its namespace)."""
    comps = list(components)
    if namespace:
        ns_dir = tree / "components" / f"ns-{namespace}"
        ns_dir.mkdir()
        (ns_dir / "kustomization.yaml").write_text(
            f"apiVersion: kustomize.config.k8s.io/v1alpha1\nkind: Component\nnamespace: {namespace}\n"
        )
        comps.insert(0, f"../../components/ns-{namespace}")
    overlay = tree / "overlays" / name
    overlay.mkdir()
    lines = ["apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization", "resources: [../../base]"]
    lines.append("components: [" + ", ".join(comps) + "]")
    (overlay / "kustomization.yaml").write_text("\n".join(lines) + "\n")
    return overlay


def test_keda_component_follows_any_namespace(kubectl, tmp_path):
    """components/keda is not tied to queuekit-dev: on another namespace its objects and the
    scaler's URL name that namespace, and the consumer has no replica count."""
    tree = k8slib.copy_k8s_tree(tmp_path, k8slib.throwaway_keys())
    overlay = _overlay(tree, "team-keda", components=["../../components/keda"], namespace="team-a")
    result = k8slib.kustomize(kubectl, overlay)
    assert result.returncode == 0, result.stderr
    docs = k8slib.load_docs(result.stdout)
    assert set(_kind_names(docs)) == BASE_OBJECTS | {SECRET} | KEDA_OBJECTS
    assert {d["metadata"].get("namespace") for d in docs} == {"team-a"}
    so = one(docs, "ScaledObject", "queuekit-consumer")
    assert so["spec"]["triggers"][0]["metadata"]["url"] == "http://queuekit-server.team-a.svc:8080/stats"
    assert "replicas" not in one(docs, "Deployment", "queuekit-consumer")["spec"]


def test_keda_component_without_a_namespace_fails_loudly(kubectl, tmp_path):
    """No namespace set before the component: the scaler's URL cannot name one, so no output."""
    tree = k8slib.copy_k8s_tree(tmp_path, k8slib.throwaway_keys())
    overlay = _overlay(tree, "keda-no-namespace", components=["../../components/keda"])
    result = k8slib.kustomize(kubectl, overlay)
    assert result.returncode != 0, "rendered without a namespace:\n" + result.stdout[:2000]
    assert result.stdout.strip() == ""
    assert "metadata.namespace" in result.stderr, result.stderr


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_images_and_pull_policy(renders, name):
    want_policy = "Always" if name == "base" else "IfNotPresent"
    images = {}
    for w in workloads(renders.docs[name]):
        for c in k8slib.all_containers(pod_spec(w)):  # the tunnel sidecar (an init container) too
            images[f"{w['metadata']['name']}/{c['name']}"] = c["image"]
            assert c.get("imagePullPolicy") == want_policy, (w["metadata"]["name"], c.get("imagePullPolicy"))
    want = {
        "queuekit-server/server": "queuekit-server:latest",
        "queuekit-consumer/consumer": "queuekit-consumer:latest",
        "queuekit-producer/producer": "queuekit-producer:latest",
    }
    if name in k8slib.TUNNEL_OVERLAYS:
        want |= {
            "queuekit-stock-client/tunnel": "queuekit-producer:latest",
            "queuekit-stock-client/stock-client": "queuekit-producer:latest",
        }
    assert images == want
