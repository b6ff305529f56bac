"""Strict schema validation of every rendered object (unknown fields are errors).

Core kinds: kubernetes-validate's schemas (from the upstream OpenAPI) for several Kubernetes
minor versions. KEDA's ScaledObject: the schema of KEDA's published CRD (see k8slib). cert-manager's
Issuer and Certificate: the schemas of cert-manager's published CRDs (k8slib). Any other
kind without a schema fails the test instead of being waved through (the kubernetes-validate
CLI only warns about those).
"""

from __future__ import annotations

import copy

import k8slib
import pytest
from k8slib import KUSTOMIZATIONS, one

pytestmark = pytest.mark.k8s

# Oldest to newest Kubernetes minor versions we claim to support. Everything used is GA in 1.30
# (PDB unhealthyPodEvictionPolicy: beta and on by default since 1.27, GA 1.31).
K8S_VERSIONS = ("1.30.0", "1.32.0", "1.34.0", "1.36.0")
CERT_MANAGER_KINDS = {("cert-manager.io/v1", "Issuer"), ("cert-manager.io/v1", "Certificate")}
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), *CERT_MANAGER_KINDS}
# The Prometheus Operator's, validated against its CRD schemas in test_k8s_monitoring.py.
CRD_KINDS |= {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


@pytest.fixture(scope="module")
def kv():
    return k8slib.require_module("kubernetes_validate")


@pytest.fixture(scope="module")
def keda_validator():
    jsonschema = k8slib.require_module("jsonschema")
    schema = k8slib.keda_scaledobject_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def cert_manager_validators():
    jsonschema = k8slib.require_module("jsonschema")
    validators = {}
    for kind, schema in k8slib.cert_manager_schemas().items():
        jsonschema.Draft202012Validator.check_schema(schema)
        validators[kind] = jsonschema.Draft202012Validator(schema)
    return validators


def _validate_core(kv, doc: dict, version: str) -> str | None:
    """None when valid, else a message. A kind without a schema is an error too."""
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        return f"{doc['kind']}/{doc['metadata']['name']} @ {path}: {e.message}"
    except kv.SchemaNotFoundError as e:
        return f"{doc['kind']}/{doc['metadata']['name']}: {e.message}"
    return None


def _keda_errors(validator, doc: dict) -> list[str]:
    jsonschema = k8slib.require_module("jsonschema")
    errors = []
    for error in validator.iter_errors(doc):
        best = jsonschema.exceptions.best_match([error])
        path = ".".join(str(p) for p in best.absolute_path)
        errors.append(f"@ {path}: {best.message}")
    return errors


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_core_objects_validate_strictly(renders, kv, name, version):
    errors = []
    checked = 0
    for doc in renders.docs[name]:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        message = _validate_core(kv, doc, version)
        if message:
            errors.append(message)
        checked += 1
    assert checked >= 11
    assert errors == [], f"{name} against Kubernetes {version}:\n" + "\n".join(errors)


def test_scaledobject_validates_against_keda_crd_schema(renders, keda_validator):
    (so,) = [d for d in renders.docs["dev-keda"] if (d["apiVersion"], d["kind"]) in CRD_KINDS]
    assert _keda_errors(keda_validator, so) == []


def test_only_known_crds_appear(renders):
    """A new custom resource must get a schema here (or this list), not slip through."""
    core_groups = ("v1", "apps/v1", "batch/v1", "policy/v1", "networking.k8s.io/v1")
    for name, docs in renders.docs.items():
        for doc in docs:
            key = (doc["apiVersion"], doc["kind"])
            assert doc["apiVersion"] in core_groups or key in CRD_KINDS, (name, key)


# --- the validators do reject what they should: negative controls ---------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_strict_mode_rejects_a_misspelt_field(renders, kv, version):
    deployment = copy.deepcopy(one(renders.docs["dev"], "Deployment", "queuekit-consumer"))
    assert _validate_core(kv, deployment, version) is None
    sc = deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    sc["readOnlyRootFileSystem"] = sc.pop("readOnlyRootFilesystem")  # capital S: a classic typo
    message = _validate_core(kv, deployment, version)
    assert message and "readOnlyRootFileSystem" in message


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_validation_rejects_a_wrong_type(renders, kv, version):
    statefulset = copy.deepcopy(one(renders.docs["dev"], "StatefulSet", "queuekit-server"))
    statefulset["spec"]["replicas"] = "1"
    message = _validate_core(kv, statefulset, version)
    assert message and "replicas" in message


def test_unknown_kind_is_an_error_not_a_warning(kv):
    doc = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert "Widget" in (_validate_core(kv, doc, K8S_VERSIONS[0]) or "")


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda so: so["spec"]["triggers"][0].update(metaData={}), "'metaData' was unexpected"),
        (lambda so: so["spec"].update(maxReplicas=3), "'maxReplicas' was unexpected"),
        (lambda so: so["spec"]["scaleTargetRef"].pop("name"), "'name' is a required property"),
        (lambda so: so["spec"]["triggers"][0]["metadata"].update(targetValue=20), "metadata.targetValue"),
        (lambda so: so["spec"].update(minReplicaCount="1"), "spec.minReplicaCount"),
    ],
    ids=[
        "unknown-trigger-field",
        "unknown-spec-field",
        "missing-target-name",
        "non-string-metadata",
        "string-count",
    ],
)
def test_keda_schema_rejects_bad_scaledobjects(renders, keda_validator, mutate, fragment):
    so = copy.deepcopy(one(renders.docs["dev-keda"], "ScaledObject", "queuekit-consumer"))
    mutate(so)
    errors = _keda_errors(keda_validator, so)
    assert errors and any(fragment in e for e in errors), errors


# --- cert-manager (components/cert-manager) ----------------------------------------------------


def test_cert_manager_objects_validate_against_its_crd_schemas(renders, cert_manager_validators):
    checked = 0
    for name, docs in renders.docs.items():
        for doc in docs:
            if (doc["apiVersion"], doc["kind"]) in CERT_MANAGER_KINDS:
                errors = _keda_errors(cert_manager_validators[doc["kind"]], doc)
                assert errors == [], f"{name}: {doc['kind']}/{doc['metadata']['name']}: {errors}"
                checked += 1
    assert checked == 5  # dev-tls-cert-manager: 2 Issuers, 3 Certificates


@pytest.mark.parametrize(
    "kind, name, mutate, fragment",
    [
        ("Certificate", "queuekit-server", lambda c: c["spec"].update(dnsName=["x"]), "'dnsName' was unexpected"),
        ("Certificate", "queuekit-server", lambda c: c["spec"].pop("secretName"), "'secretName' is a required"),
        ("Certificate", "queuekit-server", lambda c: c["spec"].update(duration=2160), "spec.duration"),
        ("Certificate", "queuekit-client", lambda c: c["spec"]["issuerRef"].pop("name"), "'name' is a required"),
        ("Certificate", "queuekit-client", lambda c: c["spec"]["privateKey"].update(algorithm="DSA"), "DSA"),
        ("Certificate", "queuekit-ca", lambda c: c.update(apiVersion="cert-manager.io/v1alpha2"), "apiVersion"),
        ("Issuer", "queuekit-ca", lambda i: i["spec"]["ca"].update(secret="queuekit-ca"), "'secret' was unexpected"),
        ("Issuer", "queuekit-selfsigned", lambda i: i["spec"].update(selfsigned={}), "'selfsigned' was unexpected"),
    ],
    ids=[
        "misspelt-dnsnames",
        "missing-secretname",
        "numeric-duration",
        "issuerref-without-name",
        "unknown-key-algorithm",
        "old-api-version",
        "misspelt-ca-secretname",
        "misspelt-selfsigned",
    ],
)
def test_cert_manager_schemas_reject_bad_objects(renders, cert_manager_validators, kind, name, mutate, fragment):
    obj = copy.deepcopy(one(renders.docs["dev-tls-cert-manager"], kind, name))
    assert _keda_errors(cert_manager_validators[kind], obj) == []
    mutate(obj)
    errors = _keda_errors(cert_manager_validators[kind], obj)
    assert errors and any(fragment in e for e in errors), errors
