"""Every kustomization renders with `kubectl kustomize`, to the objects we expect; the authkey
Secret comes only from the key file, and a missing key file is a loud error."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import k8slib
import pytest
from k8slib import KUSTOMIZATIONS, one, pod_spec, workloads

pytestmark = pytest.mark.k8s

HASHED_SECRET = re.compile(r"^queuekit-authkey-[a-z0-9]{10}$")

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
SECRET = ("Secret", "queuekit-authkey-<hash>")
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
}


def _kind_names(docs: list[dict]) -> list[tuple[str, str]]:
    out = []
    for d in docs:
        name = d["metadata"]["name"]
        if d["kind"] == "Secret" and HASHED_SECRET.match(name):
            name = "queuekit-authkey-<hash>"
        out.append((d["kind"], name))
    return out


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_renders_expected_objects(renders, name):
    found = _kind_names(renders.docs[name])
    assert len(found) == len(set(found)), f"duplicate objects in {name}: {sorted(found)}"
    assert set(found) == EXPECTED[name]
    for doc in renders.docs[name]:
        assert doc.get("apiVersion") and doc["metadata"].get("name"), doc


@pytest.mark.parametrize("name", k8slib.NEEDS_KEY)
def test_missing_key_file_fails_loudly(kubectl, tmp_path, name):
    tree = k8slib.copy_k8s_tree(tmp_path, key=None)
    assert not (tree / "base" / "authkey").exists()
    result = k8slib.kustomize(kubectl, tree / KUSTOMIZATIONS[name])
    assert result.returncode != 0, "rendered without a key file:\n" + result.stdout[:2000]
    assert result.stdout.strip() == "", "partial output despite the error"
    missing = str(tree / "base" / "authkey")
    assert missing in result.stderr, f"stderr does not name {missing}:\n{result.stderr}"


def test_existing_secret_overlay_renders_in_place_without_key(kubectl):
    """The work tree itself (not a copy) renders where no key is read at all."""
    result = k8slib.kustomize(kubectl, k8slib.K8S_DIR / KUSTOMIZATIONS["dev-existing-secret"])
    assert result.returncode == 0, result.stderr
    docs = k8slib.load_docs(result.stdout)
    assert not [d for d in docs if d["kind"] == "Secret"]
    names = {v["secret"]["secretName"] for w in workloads(docs) for v in pod_spec(w)["volumes"] if "secret" in v}
    assert names == {k8slib.SECRET_NAME}


@pytest.mark.parametrize("name", k8slib.NEEDS_KEY)
def test_secret_is_the_key_file_under_the_contract_key(renders, name):
    (secret,) = [d for d in renders.docs[name] if d["kind"] == "Secret"]
    assert HASHED_SECRET.match(secret["metadata"]["name"])
    assert secret.get("type") == "Opaque"
    assert "stringData" not in secret
    assert list(secret["data"]) == [k8slib.SECRET_KEY]
    assert base64.b64decode(secret["data"][k8slib.SECRET_KEY]) == renders.key
    # every pod's secret volume points at this very Secret (kustomize rewrote the hashed name)
    refs = {
        v["secret"]["secretName"]
        for w in workloads(renders.docs[name])
        for v in pod_spec(w)["volumes"]
        if "secret" in v
    }
    assert refs == {secret["metadata"]["name"]}


def test_new_key_renames_secret_and_rolls_every_workload(kubectl, tmp_path):
    """The name-suffix hash is what makes a key change restart the pods (see base/kustomization)."""
    names = []
    templates = []
    for i, key in enumerate((k8slib.throwaway_key(), k8slib.throwaway_key())):
        tree = k8slib.copy_k8s_tree(tmp_path / str(i), key)
        result = k8slib.kustomize(kubectl, tree / "base")
        assert result.returncode == 0, result.stderr
        docs = k8slib.load_docs(result.stdout)
        names.append(next(d["metadata"]["name"] for d in docs if d["kind"] == "Secret"))
        templates.append({w["metadata"]["name"]: w["spec"]["template"] for w in workloads(docs)})
    assert names[0] != names[1]
    for workload, template in templates[0].items():
        assert template != templates[1][workload], f"{workload}'s pod template ignores the key change"


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
    tree = k8slib.copy_k8s_tree(tmp_path, k8slib.throwaway_key())
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
    tree = k8slib.copy_k8s_tree(tmp_path, k8slib.throwaway_key())
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
        for c in pod_spec(w)["containers"]:
            images[w["metadata"]["name"]] = c["image"]
            assert c.get("imagePullPolicy") == want_policy, (w["metadata"]["name"], c.get("imagePullPolicy"))
    assert images == {
        "queuekit-server": "queuekit-server:latest",
        "queuekit-consumer": "queuekit-consumer:latest",
        "queuekit-producer": "queuekit-producer:latest",
    }
