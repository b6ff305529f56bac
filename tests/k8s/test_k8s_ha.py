"""k8s/components/ha-postgres and overlays/dev-ha: two servers on a PostgreSQL journal.

Rendered like the other overlays (a copy of k8s/ with throwaway keys), then: the HA wiring (a
2-replica Deployment with the base server's pod spec, no volume, the journal from the ConfigMap
and Secret, readiness = /readyz = leadership, a PDB, no StatefulSet) with negative controls;
strict schemas of every object; the restricted pod security profile; checkov with the repository's
configuration; the examples' CloudNativePG Cluster against CloudNativePG's CRD schema (vendored:
tests/k8s/schemas/README.md).
"""

from __future__ import annotations

import copy
from pathlib import Path

import k8slib
import pytest
import yaml
from k8slib import env_map, one, pod_spec, the_container

pytestmark = pytest.mark.k8s

COMPONENT = k8slib.REPO / "k8s" / "components" / "ha-postgres"
CNPG_CRD = Path(__file__).with_name("schemas") / "postgresql.cnpg.io_clusters.yaml"
SERVER = ("Deployment", "queuekit-server")
PASSWORD_FILE = "/run/secrets/queuekit_journal/password"


@pytest.fixture(scope="module")
def ha(kubectl, tmp_path_factory) -> list[dict]:
    tree = k8slib.copy_k8s_tree(tmp_path_factory.mktemp("ha"), k8slib.throwaway_keys())
    result = k8slib.kustomize(kubectl, tree / "overlays" / "dev-ha")
    assert result.returncode == 0, result.stderr
    return k8slib.load_docs(result.stdout)


def ha_violations(docs: list[dict], base_server: dict) -> list[str]:
    """What is wrong with the HA wiring of a rendered overlay (empty: nothing)."""
    out: list[str] = []
    if any(d["kind"] == "StatefulSet" for d in docs):
        out.append("a StatefulSet is left (a second, volume-backed server)")
    servers = [d for d in docs if (d["kind"], d["metadata"]["name"]) == SERVER]
    if len(servers) != 1:
        return out + ["no Deployment queuekit-server"]
    (server,) = servers
    spec, pod = server["spec"], pod_spec(server)
    service = one(docs, "Service", "queuekit-server")
    namespace = service["metadata"].get("namespace")
    if server["metadata"].get("namespace") != namespace:
        out.append(f"Deployment in namespace {server['metadata'].get('namespace')!r}, Service in {namespace!r}")
    if spec.get("replicas") != 2:
        out.append(f"replicas {spec.get('replicas')!r}, not 2")
    if (spec.get("strategy") or {}).get("type") != "Recreate":
        out.append("strategy is not Recreate (a rolling update never sees a new pod Ready while one leads)")
    labels = server["spec"]["template"]["metadata"]["labels"]
    if not k8slib.selector_matches({"matchLabels": service["spec"]["selector"]}, labels):
        out.append("the Service does not select the server pods")
    container = the_container(server)
    env = {e["name"]: e for e in container.get("env") or []}
    if "QUEUEKIT_DATA_DIR" in env:
        out.append("QUEUEKIT_DATA_DIR is set (a second journal)")
    url = (env.get("QUEUEKIT_JOURNAL_URL") or {}).get("valueFrom", {}).get("configMapKeyRef") or {}
    if (url.get("name"), url.get("key")) != ("queuekit-journal", "url"):
        out.append("QUEUEKIT_JOURNAL_URL does not come from ConfigMap queuekit-journal key url")
    if any("secretKeyRef" in (e.get("valueFrom") or {}) for e in env.values()):
        out.append("a secret in the environment (the password is a file)")
    if env_map(container).get("QUEUEKIT_JOURNAL_PASSWORD_FILE") != PASSWORD_FILE:
        out.append("QUEUEKIT_JOURNAL_PASSWORD_FILE is not the mounted password")
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts") or []}
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    mount = mounts.get(str(Path(PASSWORD_FILE).parent))
    secret = (volumes.get(mount["name"]) or {}).get("secret") if mount else None
    if not secret or secret.get("secretName") != "queuekit-journal" or not mount.get("readOnly"):
        out.append("the password directory is not a read-only mount of Secret queuekit-journal")
    elif [i["key"] for i in secret.get("items") or []] != ["password"] or secret.get("defaultMode") != 0o400:
        out.append("the journal Secret volume must hold only its password, mode 0400")
    if "/var/lib/queuekit" in mounts or any("persistentVolumeClaim" in v for v in volumes.values()):
        out.append("a data volume is mounted (the state is in the database)")
    if "volumeClaimTemplates" in spec:
        out.append("volumeClaimTemplates on a Deployment")
    probe = (container.get("readinessProbe") or {}).get("httpGet") or {}
    if probe.get("path") != "/readyz":
        out.append("readiness is not /readyz (leadership)")
    # The rest of the pod is the base server's: one definition of container, probes and hardening.
    base = pod_spec(base_server)
    for field in ("securityContext", "serviceAccountName", "automountServiceAccountToken", "enableServiceLinks"):
        if pod.get(field) != base.get(field):
            out.append(f"pod {field} differs from the base server's")
    base_container = base["containers"][0]
    for field in ("image", "command", "args", "securityContext", "resources", "livenessProbe", "ports"):
        if container.get(field) != base_container.get(field):
            out.append(f"container {field} differs from the base server's")
    pdbs = [d for d in docs if (d["kind"], d["metadata"]["name"]) == ("PodDisruptionBudget", "queuekit-server")]
    if len(pdbs) != 1:
        return out + ["no PodDisruptionBudget queuekit-server"]
    pdb = pdbs[0]
    if pdb["metadata"].get("namespace") != namespace:
        out.append("the PDB is not in the server's namespace")
    if not k8slib.selector_matches(pdb["spec"].get("selector"), labels):
        out.append("the PDB does not select the server pods")
    if pdb["spec"].get("minAvailable") != 1 or pdb["spec"].get("unhealthyPodEvictionPolicy") != "AlwaysAllow":
        out.append("the PDB must keep the leader (minAvailable 1) and let the standby go (AlwaysAllow)")
    return out


def test_ha_overlay_wiring(ha, renders):
    assert ha_violations(ha, one(renders.docs["dev"], "StatefulSet", "queuekit-server")) == []


def _pod(docs):
    return pod_spec(one(docs, *SERVER))


def _env(docs):
    return the_container(one(docs, *SERVER))["env"]


MUTATIONS = {
    "statefulset kept": (lambda d, base: d.append(copy.deepcopy(base)), "StatefulSet is left"),
    "one replica": (lambda d, base: one(d, *SERVER)["spec"].update(replicas=1), "replicas"),
    "rolling update": (lambda d, base: one(d, *SERVER)["spec"].update(strategy={"type": "RollingUpdate"}), "Recreate"),
    "data dir": (lambda d, base: _env(d).append({"name": "QUEUEKIT_DATA_DIR", "value": "/x"}), "QUEUEKIT_DATA_DIR"),
    "url in a secret": (
        lambda d, base: [e for e in _env(d) if e["name"] == "QUEUEKIT_JOURNAL_URL"][0].update(
            valueFrom={"secretKeyRef": {"name": "queuekit-journal", "key": "url"}}
        ),
        "ConfigMap",
    ),
    "password in env": (
        lambda d, base: _env(d).append(
            {"name": "PGPASSWORD", "valueFrom": {"secretKeyRef": {"name": "queuekit-journal", "key": "password"}}}
        ),
        "secret in the environment",
    ),
    "whole secret mounted": (
        lambda d, base: [v for v in _pod(d)["volumes"] if v["name"] == "journal"][0]["secret"].pop("items"),
        "only its password",
    ),
    "data volume": (
        lambda d, base: _pod(d)["volumes"].append({"name": "data", "persistentVolumeClaim": {"claimName": "x"}}),
        "data volume",
    ),
    "readiness healthz": (
        lambda d, base: the_container(one(d, *SERVER))["readinessProbe"]["httpGet"].update(path="/healthz"),
        "/readyz",
    ),
    "weaker hardening": (
        lambda d, base: the_container(one(d, *SERVER))["securityContext"].update(readOnlyRootFilesystem=False),
        "container securityContext",
    ),
    "pdb gone": (lambda d, base: d.remove(one(d, "PodDisruptionBudget", "queuekit-server")), "PodDisruptionBudget"),
    "pdb blocks the standby": (
        lambda d, base: one(d, "PodDisruptionBudget", "queuekit-server")["spec"].pop("unhealthyPodEvictionPolicy"),
        "AlwaysAllow",
    ),
    "other namespace": (lambda d, base: one(d, *SERVER)["metadata"].update(namespace="default"), "namespace"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_ha_wiring_checker_catches(ha, renders, name):
    base = one(renders.docs["dev"], "StatefulSet", "queuekit-server")
    docs = copy.deepcopy(ha)
    mutate, fragment = MUTATIONS[name]
    mutate(docs, base)
    found = ha_violations(docs, base)
    assert any(fragment in v for v in found), found


@pytest.mark.parametrize("version", ("1.30.0", "1.36.0"))
def test_ha_objects_validate_strictly(ha, version):
    kv = k8slib.require_module("kubernetes_validate")
    errors = []
    for doc in ha:
        try:
            kv.validate(doc, version, strict=True)
        except (kv.ValidationError, kv.SchemaNotFoundError) as e:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {getattr(e, 'message', e)}")
    assert errors == []


def test_ha_server_meets_the_restricted_profile(ha):
    assert k8slib.restricted_violations(one(ha, *SERVER)) == []


def test_ha_overlay_passes_checkov(ha, tmp_path):
    from test_k8s_checkov import CONFIG, _find_checkov, _run

    checkov = _find_checkov()
    scan = tmp_path / "rendered"
    scan.mkdir()
    (scan / "dev-ha.yaml").write_text(yaml.safe_dump_all(ha))
    report = _run(checkov, CONFIG, scan, tmp_path)
    failures = [f"{c['check_id']} {c['check_name']}: {c['resource']}" for c in report["results"]["failed_checks"]]
    assert failures == []
    checked = {c["resource"] for c in report["results"]["passed_checks"]}
    assert {"Deployment.queuekit-dev.queuekit-server", "PodDisruptionBudget.queuekit-dev.queuekit-server"} & checked


# --- the CloudNativePG example, against CloudNativePG's CRD --------------------------------------


@pytest.fixture(scope="module")
def cnpg_validator():
    jsonschema = k8slib.require_module("jsonschema")
    crd = yaml.safe_load(CNPG_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    k8slib.close_schema(schema)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _cnpg_cluster() -> dict:
    docs = list(yaml.safe_load_all((COMPONENT / "examples" / "cloudnative-pg.yaml").read_text()))
    return one(docs, "Cluster", "queuekit-db")


def _errors(validator, doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_cloudnative_pg_example_matches_the_crd(cnpg_validator):
    cluster = _cnpg_cluster()
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    assert _errors(cnpg_validator, cluster) == []
    # the wiring the component relies on: the owner's password from the Secret it reads, the
    # database and owner the example URL names, and synchronous replication
    initdb = cluster["spec"]["bootstrap"]["initdb"]
    assert initdb["secret"]["name"] == "queuekit-journal"
    docs = list(yaml.safe_load_all((COMPONENT / "examples" / "cloudnative-pg.yaml").read_text()))
    url = one(docs, "ConfigMap", "queuekit-journal")["data"]["url"]
    assert url == f"postgresql://{initdb['owner']}@{cluster['metadata']['name']}-rw:5432/{initdb['database']}"
    assert cluster["spec"]["postgresql"]["synchronous"]["number"] >= 1


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda c: c["spec"].update(instance=3), "instance"),  # misspelt
        (lambda c: c["spec"].update(instances="3"), "instances"),  # wrong type
        (lambda c: c["spec"]["postgresql"]["synchronous"].update(method="some"), "some"),  # not an enum value
    ],
)
def test_cnpg_schema_rejects_bad_clusters(cnpg_validator, mutate, fragment):
    cluster = _cnpg_cluster()
    mutate(cluster)
    assert any(fragment in e for e in _errors(cnpg_validator, cluster))
