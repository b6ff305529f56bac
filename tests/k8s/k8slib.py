"""Helpers for the tests of the Kubernetes manifests (tests/k8s).

Rendering never touches a key in the work tree: the k8s/ directory is copied to a temporary
directory (without any k8s/base/keys/ or old k8s/base/authkey the user may have) and throwaway
role keys are written into the copy. So the tests neither read a real key (which would end up base64-encoded in rendered
output and in failure messages) nor leave one behind, even if they are killed.
"""

from __future__ import annotations

import importlib
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "k8s"
KEYS_DIR_NAME = "keys"  # k8s/base/keys/<role>.default, read by the base's secretGenerator
OLD_KEY_FILE_NAME = "authkey"  # k8s/base/authkey before keys per role: never copied either
TLS_CERTS_DIR = Path("components") / "tls" / "secrets" / "certs"  # files copied from make certs: never copied
# The Secrets of components/tls (type kubernetes.io/tls): checked by test_k8s_tls.py, not as keys.
TLS_SECRET_NAMES = frozenset({"queuekit-server-tls", "queuekit-client-tls"})
TLS_CERT_FILES = ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")

# name -> kustomization directory relative to k8s/
KUSTOMIZATIONS = {
    "base": "base",
    "dev": "overlays/dev",
    "dev-existing-secret": "overlays/dev-existing-secret",
    "dev-keda": "overlays/dev-keda",  # overlays/dev + components/keda
    "dev-tls": "overlays/dev-tls",  # overlays/dev + components/tls/secrets + components/tls
    "dev-tls-cert-manager": "overlays/dev-tls-cert-manager",  # overlays/dev + cert-manager + tls
    "dev-tls-tunnel": "overlays/dev-tls-tunnel",  # overlays/dev-tls + components/tunnel-sidecar
}
# The kustomizations that generate the Secret from k8s/base/keys.
NEEDS_KEY = ("base", "dev", "dev-keda", "dev-tls", "dev-tls-cert-manager", "dev-tls-tunnel")
# The ones a user deploys (an overlay picks the namespace); the base is for building on.
DEPLOYABLE = ("dev", "dev-existing-secret", "dev-keda", "dev-tls", "dev-tls-cert-manager", "dev-tls-tunnel")
# The ones with mutual TLS on the queue port (components/tls).
TLS_OVERLAYS = ("dev-tls", "dev-tls-cert-manager", "dev-tls-tunnel")
# components/tunnel-sidecar: a stock client Job (component producer) with a `queuekit tunnel` native
# sidecar (an init container of this name) that holds the TLS client Secret and no key.
TUNNEL_OVERLAYS = ("dev-tls-tunnel",)
STOCK_CLIENT_JOB = ("Job", "queuekit-stock-client")
TUNNEL_CONTAINER = "tunnel"
DEV_NAMESPACE = "queuekit-dev"
# overlays/dev + components/monitoring (Prometheus Operator PodMonitor and PrometheusRule):
# tests/k8s/test_k8s_monitoring.py.
KUSTOMIZATIONS["dev-monitoring"] = "overlays/dev-monitoring"
NEEDS_KEY += ("dev-monitoring",)
DEPLOYABLE += ("dev-monitoring",)

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet", "CronJob", "Pod")

# Contract (docs/ARCHITECTURE.md, "Interfaces")
UID = GID = 10001
AUTHKEY_PATH = "/run/secrets/queuekit_authkey"  # a client's key file (consumer, producer)
KEYS_PATH = "/run/secrets/queuekit_keys"  # the server's QUEUEKIT_KEYS_DIR: the whole Secret
SECRET_NAME = "queuekit-keys"  # fixed (no hash suffix): updated in place, see base/kustomization.yaml
# role -> the Secret's key (= file name in the server's keys directory)
ROLE_KEYS = {"producer": "producer.default", "consumer": "consumer.default", "admin": "admin.default"}
KEY_MODE = 0o400  # defaultMode of every key volume (the kubelet adds group read for fsGroup)
DATA_DIR = "/var/lib/queuekit"
MANAGER_PORT = 50000
HTTP_PORT = 8080
QUEUEKIT_CMD = ["python3", "-m", "queuekit"]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing_tool(reason: str) -> None:
    """Skip locally, fail under CI=true: CI must run every one of these tests."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: this must not be skipped in CI)", pytrace=False)
    pytest.skip(reason)


def require_module(name: str, pip_hint: str = "pip install -r requirements/k8s.txt") -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        missing_tool(f"Python module {name!r} is not installed ({pip_hint})")


def find_kubectl() -> str:
    path = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if not path:
        missing_tool("kubectl not found on PATH (set KUBECTL=...); it renders the kustomizations")
    return path


def copy_k8s_tree(
    dest: Path, keys: dict[str, bytes] | bytes | None, tls: dict[str, bytes] | None | bool = True
) -> Path:
    """Copy k8s/ to dest/k8s, dropping any real key; write ``keys`` ({Secret key: content}, e.g.
    :func:`throwaway_keys`) as the base's key files. A single key (bytes) is the admin key, with
    fresh keys for the other roles. None: no key files (rendering the base must then fail).
    Any real certificate in components/tls/secrets/certs is dropped too; ``tls``: the files
    written there instead ({file name: content}; True: :func:`throwaway_tls_files`; None: none)."""
    if isinstance(keys, bytes):
        keys = {**throwaway_keys(), ROLE_KEYS["admin"]: keys}
    target = dest / "k8s"
    dropped = (KEYS_DIR_NAME, OLD_KEY_FILE_NAME)
    shutil.copytree(
        K8S_DIR,
        target,
        ignore=lambda d, names: [
            n for n in names if (Path(d) == K8S_DIR / "base" and n in dropped) or Path(d) / n == K8S_DIR / TLS_CERTS_DIR
        ],
    )
    if tls is True:
        tls = throwaway_tls_files()
    if tls:
        cert_dir = target / TLS_CERTS_DIR
        cert_dir.mkdir(mode=0o700)
        for name, content in tls.items():
            (cert_dir / name).write_bytes(content)
            (cert_dir / name).chmod(0o600)
    if keys is not None:
        key_dir = target / "base" / KEYS_DIR_NAME
        key_dir.mkdir(mode=0o700)
        for name, content in keys.items():
            key_file = key_dir / name
            key_file.write_bytes(content)
            key_file.chmod(0o600)
    return target


def throwaway_tls_files() -> dict[str, bytes]:
    """A fresh CA, server and client certificate (trustme), as the files of components/tls/secrets."""
    trustme = require_module("trustme", "pip install -r requirements/dev.txt")
    ca = trustme.CA()
    server = ca.issue_cert("queuekit-server", "localhost", "127.0.0.1")
    client = ca.issue_cert("queuekit-client")
    return {
        "ca.crt": ca.cert_pem.bytes(),
        "server.crt": b"".join(blob.bytes() for blob in server.cert_chain_pems),
        "server.key": server.private_key_pem.bytes(),
        "client.crt": b"".join(blob.bytes() for blob in client.cert_chain_pems),
        "client.key": client.private_key_pem.bytes(),
    }


def throwaway_key() -> bytes:
    return (secrets.token_hex(32) + "\n").encode()


def throwaway_keys() -> dict[str, bytes]:
    """One fresh key per role, by the Secret's key (``consumer.default``: ...)."""
    return {name: throwaway_key() for name in ROLE_KEYS.values()}


def kustomize(kubectl: str, directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def load_docs(text: str) -> list[dict[str, Any]]:
    yaml = require_module("yaml")
    return [doc for doc in yaml.safe_load_all(text) if doc]


# ---------------------------------------------------------------------------------------------
# Navigating rendered objects


def objects(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d.get("kind") in WORKLOAD_KINDS]


def pod_template(workload: dict) -> dict:
    kind = workload["kind"]
    if kind == "Pod":
        return workload
    if kind == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]
    return workload["spec"]["template"]


def pod_spec(workload: dict) -> dict:
    return pod_template(workload)["spec"]


def all_containers(spec: dict) -> Iterator[dict]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        yield from spec.get(field) or []


def env_map(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env") or []}


def the_container(workload: dict) -> dict:
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']}: expected one container"
    return containers[0]


def selector_matches(selector: dict | None, labels: dict[str, str]) -> bool:
    """Kubernetes LabelSelector semantics (matchLabels AND matchExpressions); {} matches all."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ValueError(f"unknown selector operator {op}")
    return True


def ingress_allowed(
    policies: list[dict],
    *,
    src_labels: dict[str, str],
    src_namespace: str | None,
    src_namespace_labels: dict[str, str],
    dst_labels: dict[str, str],
    dst_namespace: str | None,
    port: int,
) -> bool:
    """Would NetworkPolicy (ingress) admit a TCP connection from one pod to another's port?

    Same semantics as the API: a pod no policy selects for Ingress accepts everything; a selected
    pod accepts what at least one rule of one selecting policy allows. Ports are numeric here
    (our policies use numbers). ipBlock peers are not modelled (we use none).
    """
    selecting = [
        p
        for p in policies
        if p["metadata"].get("namespace") == dst_namespace
        and selector_matches(p["spec"].get("podSelector"), dst_labels)
        and "Ingress" in (p["spec"].get("policyTypes") or ["Ingress"])
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(p.get("protocol", "TCP") == "TCP" and _port_matches(p, port) for p in ports):
                continue
            peers = rule.get("from")
            if not peers:  # no `from` = from everywhere
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    raise NotImplementedError("ipBlock peers are not modelled by this test helper")
                ns_sel = peer.get("namespaceSelector")
                if ns_sel is None:
                    ns_ok = src_namespace == dst_namespace
                else:
                    ns_ok = selector_matches(ns_sel, src_namespace_labels)
                pod_ok = "podSelector" not in peer or selector_matches(peer["podSelector"], src_labels)
                if ns_ok and pod_ok:
                    return True
    return False


def _port_matches(rule_port: dict, port: int) -> bool:
    if "port" not in rule_port:
        return True
    value = rule_port["port"]
    if not isinstance(value, int):
        raise NotImplementedError("named ports in NetworkPolicies are not modelled by this test helper")
    end = rule_port.get("endPort", value)
    return value <= port <= end


# ---------------------------------------------------------------------------------------------
# Pod Security Standards "restricted" (plus our own stricter rules), as a checker that returns
# the list of violations so tests can show that it does find them.

PSS_ALLOWED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip


def restricted_violations(workload: dict) -> list[str]:
    name = f"{workload['kind']}/{workload['metadata']['name']}"
    spec = pod_spec(workload)
    psc = spec.get("securityContext") or {}
    out: list[str] = []

    def bad(msg: str) -> None:
        out.append(f"{name}: {msg}")

    # --- pod level (our rules: set explicitly at pod level, to the contract's ids) ---
    if psc.get("runAsNonRoot") is not True:
        bad("pod securityContext.runAsNonRoot must be true")
    for field, want in (("runAsUser", UID), ("runAsGroup", GID), ("fsGroup", GID)):
        if psc.get(field) != want:
            bad(f"pod securityContext.{field} must be {want}, is {psc.get(field)!r}")
    if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        bad("pod securityContext.seccompProfile.type must be RuntimeDefault")
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            bad(f"{flag} must not be set")
    if psc.get("sysctls"):
        bad("no sysctls")
    for volume in spec.get("volumes") or []:
        types = set(volume) - {"name"}
        if not types <= PSS_ALLOWED_VOLUME_TYPES:
            bad(f"volume {volume['name']}: type {sorted(types)} not allowed by 'restricted'")
    if spec.get("automountServiceAccountToken") is not False:
        bad("pod automountServiceAccountToken must be false")
    if spec.get("serviceAccountName") in (None, "", "default"):
        bad("pod must use its own ServiceAccount")

    # --- every container (init and ephemeral too) ---
    for c in all_containers(spec):
        cname = f"container {c['name']}"
        csc = c.get("securityContext") or {}
        non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            bad(f"{cname}: effective runAsNonRoot must be true")
        user = csc.get("runAsUser", psc.get("runAsUser"))
        if user != UID:
            bad(f"{cname}: effective runAsUser must be {UID} (>= 10000, not 0), is {user!r}")
        group = csc.get("runAsGroup", psc.get("runAsGroup"))
        if group != GID:
            bad(f"{cname}: effective runAsGroup must be {GID}, is {group!r}")
        if csc.get("allowPrivilegeEscalation") is not False:
            bad(f"{cname}: allowPrivilegeEscalation must be false (explicitly)")
        if csc.get("privileged"):
            bad(f"{cname}: privileged")
        caps = csc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad(f"{cname}: capabilities.drop must contain ALL")
        if caps.get("add"):
            bad(f"{cname}: no capabilities may be added, found {caps['add']}")
        seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad(f"{cname}: effective seccompProfile must be RuntimeDefault/Localhost, is {seccomp!r}")
        if csc.get("procMount") not in (None, "Default"):
            bad(f"{cname}: procMount must be Default")
        if csc.get("readOnlyRootFilesystem") is not True:
            bad(f"{cname}: readOnlyRootFilesystem must be true")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                bad(f"{cname}: hostPort not allowed")
        resources = c.get("resources") or {}
        for section in ("requests", "limits"):
            for res in ("cpu", "memory"):
                if not (resources.get(section) or {}).get(res):
                    bad(f"{cname}: resources.{section}.{res} missing")
    return out


# ---------------------------------------------------------------------------------------------
# KEDA ScaledObject schema


KEDA_MODELS_DIR = Path(os.environ.get("QUEUEKIT_KEDA_MODELS") or REPO / ".cache" / "keda-models")


def close_schema(node: Any) -> None:
    """Close every object schema that lists its properties (additionalProperties: false), in place:
    the "strict" meaning kubernetes-validate uses. Map-typed fields keep their own
    additionalProperties and stay open."""
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            node.setdefault("additionalProperties", False)
        for value in node.values():
            close_schema(value)
    elif isinstance(node, list):
        for value in node:
            close_schema(value)


def keda_scaledobject_schema() -> dict:
    """Strict JSON schema of KEDA's ScaledObject (keda.sh/v1alpha1), from PyPI.

    cloudcoil-models-keda ships pydantic models generated from KEDA's published CRDs (v2.16.1
    for the pinned release), installed into a side directory (requirements/keda-models.txt)
    that is put on sys.path only here, so cloudcoil's pytest plugin is never loaded. Their JSON
    schema lets unknown fields through (pydantic ignores extras), so every object schema that
    lists its properties is closed here with additionalProperties: false -- the same "strict"
    meaning kubernetes-validate uses. Map-typed fields (labels, trigger metadata) keep their own
    additionalProperties and stay open.
    """
    require_module("pydantic")
    if not (KEDA_MODELS_DIR / "cloudcoil" / "models" / "keda").is_dir():
        missing_tool(
            f"KEDA models not found in {KEDA_MODELS_DIR} (make k8s-deps, or: pip install --no-deps "
            f"--target {KEDA_MODELS_DIR} -r requirements/keda-models.txt; or set QUEUEKIT_KEDA_MODELS)"
        )
    if str(KEDA_MODELS_DIR) not in sys.path:
        sys.path.append(str(KEDA_MODELS_DIR))
    models = importlib.import_module("cloudcoil.models.keda.v1alpha1")
    schema = models.ScaledObject.model_json_schema()

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


# ---------------------------------------------------------------------------------------------
# cert-manager Issuer / Certificate schemas


def cert_manager_schemas() -> dict[str, dict]:
    """Strict JSON schemas of cert-manager's Issuer and Certificate (cert-manager.io/v1), by kind.

    cloudcoil-models-cert-manager ships pydantic models generated from cert-manager's published
    CRDs (v1.17.1 for the pinned release, requirements/cert-manager-models.txt), installed into the
    same side directory as the KEDA models (they share the cloudcoil package) and closed the same
    way (:func:`close_schema`).
    """
    return cloudcoil_schemas("cert_manager", ("Issuer", "Certificate"), "cert-manager-models.txt", "cert-manager")


def cloudcoil_schemas(package: str, kinds: tuple[str, ...], requirements: str, what: str) -> dict[str, dict]:
    """Closed JSON schemas of ``kinds`` from the cloudcoil models package ``package`` (v1),
    installed into the KEDA models' side directory by ``make k8s-deps`` from ``requirements``."""
    require_module("pydantic")
    if not (KEDA_MODELS_DIR / "cloudcoil" / "models" / package).is_dir():
        missing_tool(
            f"{what} models not found in {KEDA_MODELS_DIR} (make k8s-deps, or: pip install --no-deps "
            f"--target {KEDA_MODELS_DIR} -r requirements/keda-models.txt -r requirements/{requirements})"
        )
    if str(KEDA_MODELS_DIR) not in sys.path:
        sys.path.append(str(KEDA_MODELS_DIR))
    models = importlib.import_module(f"cloudcoil.models.{package}.v1")
    schemas = {}
    for kind in kinds:
        schema = getattr(models, kind).model_json_schema(by_alias=True)
        close_schema(schema)
        schemas[kind] = schema
    return schemas
