"""Our own checks of the rendered workloads: Pod Security "restricted" and the rest of the
hardening, the wiring the programs rely on (docs/ARCHITECTURE.md "Interfaces"), probes, the
authkey as a file, drain vs grace period, NetworkPolicy reachability and the KEDA scaler.

Static only: it proves what the manifests say, not what a cluster does with them.
"""

from __future__ import annotations

import copy
from urllib.parse import urlsplit

import k8slib
import pytest
from k8slib import (
    KUSTOMIZATIONS,
    env_map,
    objects,
    one,
    pod_spec,
    pod_template,
    restricted_violations,
    the_container,
    workloads,
)

pytestmark = pytest.mark.k8s

ALL = list(KUSTOMIZATIONS)
EXPECTED_WORKLOADS = {
    ("StatefulSet", "queuekit-server"): "server",
    ("Deployment", "queuekit-consumer"): "consumer",
    ("Job", "queuekit-producer"): "producer",
}
STABLE_SELECTOR_KEYS = {"app.kubernetes.io/name", "app.kubernetes.io/component"}


def _workload(docs, component):
    (kind, name) = next(k for k, c in EXPECTED_WORKLOADS.items() if c == component)
    return one(docs, kind, name)


def _service_port(docs, service, port_name):
    svc = one(docs, "Service", service)
    return next(p for p in svc["spec"]["ports"] if p["name"] == port_name)


# --- Pod Security "restricted" and hardening -------------------------------------------------


def expected_workloads(name: str) -> dict[tuple[str, str], str]:
    """(kind, name) -> component of a kustomization's workloads: the stock client behind the tunnel
    sidecar is a producer (components/tunnel-sidecar)."""
    if name in k8slib.TUNNEL_OVERLAYS:
        return {**EXPECTED_WORKLOADS, k8slib.STOCK_CLIENT_JOB: "producer"}
    return EXPECTED_WORKLOADS


@pytest.mark.parametrize("name", ALL)
def test_workloads_are_the_expected_ones(renders, name):
    found = {(w["kind"], w["metadata"]["name"]) for w in workloads(renders.docs[name])}
    assert found == set(expected_workloads(name))


@pytest.mark.parametrize("name", ALL)
def test_every_pod_meets_restricted_and_hardening(renders, name):
    violations = [v for w in workloads(renders.docs[name]) for v in restricted_violations(w)]
    assert violations == []


MUTATIONS = {
    "root-user": (lambda s: s["securityContext"].update(runAsUser=0), "runAsUser"),
    "container-root": (lambda s: s["containers"][0]["securityContext"].update(runAsUser=0), "runAsUser"),
    "non-root-off": (
        lambda s: s["containers"][0]["securityContext"].update(runAsNonRoot=False),
        "runAsNonRoot",
    ),
    "no-fsgroup": (lambda s: s["securityContext"].pop("fsGroup"), "fsGroup"),
    "escalation": (
        lambda s: s["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        "allowPrivilegeEscalation",
    ),
    "caps-kept": (
        lambda s: s["containers"][0]["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
        "drop must contain ALL",
    ),
    "caps-added": (
        lambda s: s["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
        "added",
    ),
    "unconfined": (
        lambda s: s["containers"][0]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        "seccompProfile",
    ),
    "no-pod-seccomp": (lambda s: s["securityContext"].pop("seccompProfile"), "seccompProfile"),
    "writable-root": (
        lambda s: s["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False),
        "readOnlyRootFilesystem",
    ),
    "no-limits": (lambda s: s["containers"][0]["resources"].pop("limits"), "resources.limits"),
    "no-memory-request": (
        lambda s: s["containers"][0]["resources"]["requests"].pop("memory"),
        "requests.memory",
    ),
    "hostpath": (lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
    "host-network": (lambda s: s.update(hostNetwork=True), "hostNetwork"),
    "host-port": (lambda s: s["containers"][0]["ports"][0].update(hostPort=50000), "hostPort"),
    "privileged": (lambda s: s["containers"][0]["securityContext"].update(privileged=True), "privileged"),
    "token": (lambda s: s.update(automountServiceAccountToken=True), "automountServiceAccountToken"),
    "default-sa": (lambda s: s.update(serviceAccountName="default"), "ServiceAccount"),
    "init-container": (
        lambda s: s.setdefault("initContainers", []).append({"name": "init", "image": "x", "securityContext": {}}),
        "container init",
    ),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_the_restricted_checker_catches(renders, mutation):
    """The checker above is only worth something if it fails on a bad pod: show it does."""
    mutate, fragment = MUTATIONS[mutation]
    server = copy.deepcopy(one(renders.docs["dev"], "StatefulSet", "queuekit-server"))
    assert restricted_violations(server) == []
    mutate(pod_spec(server))
    violations = restricted_violations(server)
    assert any(fragment in v for v in violations), violations


@pytest.mark.parametrize("name", ALL)
def test_own_service_accounts_without_tokens(renders, name):
    docs = renders.docs[name]
    accounts = {sa["metadata"]["name"]: sa for sa in objects(docs, "ServiceAccount")}
    used = []
    for w in workloads(docs):
        sa_name = pod_spec(w)["serviceAccountName"]
        assert sa_name in accounts, f"{w['metadata']['name']} uses a ServiceAccount not in the manifests"
        assert accounts[sa_name].get("automountServiceAccountToken") is False
        used.append(sa_name)
    assert len(used) == len(set(used)), "workloads share a ServiceAccount"


@pytest.mark.parametrize("name", ALL)
def test_no_service_link_env_vars(renders, name):
    """A Service named queuekit-server would inject QUEUEKIT_SERVER_PORT=tcp://... into pods."""
    for w in workloads(renders.docs[name]):
        assert pod_spec(w).get("enableServiceLinks") is False, w["metadata"]["name"]


@pytest.mark.parametrize("name", ALL)
def test_labels_and_stable_selectors(renders, name):
    docs = renders.docs[name]
    for doc in docs:
        if doc["kind"] == "Namespace":
            continue
        labels = doc["metadata"].get("labels") or {}
        assert labels.get("app.kubernetes.io/name") == "queuekit", (doc["kind"], doc["metadata"]["name"])
        assert labels.get("app.kubernetes.io/part-of") == "queuekit", (doc["kind"], doc["metadata"]["name"])
        assert labels.get("app.kubernetes.io/component"), (doc["kind"], doc["metadata"]["name"])
    for (kind, wname), component in EXPECTED_WORKLOADS.items():
        w = one(docs, kind, wname)
        pod_labels = pod_template(w)["metadata"]["labels"]
        assert pod_labels["app.kubernetes.io/component"] == component
        assert pod_labels["app.kubernetes.io/name"] == "queuekit"
        assert pod_labels["app.kubernetes.io/part-of"] == "queuekit"
        if kind != "Job":  # the Job controller manages its own selector
            selector = w["spec"]["selector"]
            assert set(selector) == {"matchLabels"}
            assert set(selector["matchLabels"]) == STABLE_SELECTOR_KEYS
            assert k8slib.selector_matches(selector, pod_labels)
            # ...and it selects none of the other components' pods
            for other_kind, other_name in EXPECTED_WORKLOADS:
                if other_name != wname:
                    other = pod_template(one(docs, other_kind, other_name))["metadata"]["labels"]
                    assert not k8slib.selector_matches(selector, other)


# --- wiring the programs rely on ------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_commands_and_args_are_explicit(renders, name):
    docs = renders.docs[name]
    expected_args = {
        "server": ["server"],
        "consumer": ["consume"],
        "producer": ["produce", "--generate", "200", "--task-ms", "50"],
    }
    for component, args in expected_args.items():
        c = the_container(_workload(docs, component))
        assert c["command"] == k8slib.QUEUEKIT_CMD
        assert c["args"] == args


def key_holding_violations(workload: dict, component: str, secret_name: str = k8slib.SECRET_NAME) -> list[str]:
    """What is wrong with the keys a workload's pods hold (issue 11): the server mounts the whole
    keys Secret as its QUEUEKIT_KEYS_DIR (no items, so a key added to the Secret appears; no
    subPath, so updates arrive); a consumer holds only the consumer key and a producer only the
    producer key, each at the authkey path; mode 0400 (+ group read for fsGroup 10001), read-only,
    never in the environment."""
    out: list[str] = []
    spec = pod_spec(workload)
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    for c in k8slib.all_containers(spec):
        where = f"{workload['metadata']['name']}/{c['name']}"
        mounts = [
            m
            for m in c.get("volumeMounts") or []
            if "secret" in volumes.get(m["name"], {})
            # TLS certificates (components/tls) are checked by test_k8s_tls.py
            and volumes[m["name"]]["secret"].get("secretName") not in k8slib.TLS_SECRET_NAMES
        ]
        if c["name"] == k8slib.TUNNEL_CONTAINER and component != "server":
            # The tunnel sidecar forwards bytes: the client's handshake passes through, no key here.
            if mounts or "QUEUEKIT_AUTHKEY_FILE" in env_map(c):
                out.append(f"{where}: the tunnel sidecar holds a key ({[m['mountPath'] for m in mounts]})")
            continue
        if len(mounts) != 1:
            out.append(f"{where}: expected one Secret mount, got {[m['mountPath'] for m in mounts]}")
            continue
        mount = mounts[0]
        source = volumes[mount["name"]]["secret"]
        env = env_map(c)
        if source.get("secretName") != secret_name:
            out.append(f"{where}: mounts Secret {source.get('secretName')!r}, not {secret_name!r}")
        if mount.get("readOnly") is not True:
            out.append(f"{where}: the key mount is not readOnly")
        if "subPath" in mount:
            out.append(f"{where}: subPath mounts never see Secret updates")
        if source.get("defaultMode") != k8slib.KEY_MODE:
            out.append(f"{where}: defaultMode {oct(source.get('defaultMode') or 0)}, expected {oct(k8slib.KEY_MODE)}")
        if source.get("optional") is not False:
            out.append(f"{where}: the keys Secret must not be optional")
        items = {i["key"]: i["path"] for i in source.get("items") or []}
        if any("mode" in i for i in source.get("items") or []):
            out.append(f"{where}: an item sets its own mode")
        if component == "server":
            if items:
                out.append(f"{where}: the server mounts only {sorted(items)}: keys added later would not appear")
            if mount["mountPath"] != k8slib.KEYS_PATH or env.get("QUEUEKIT_KEYS_DIR") != mount["mountPath"]:
                out.append(f"{where}: keys at {mount['mountPath']}, QUEUEKIT_KEYS_DIR={env.get('QUEUEKIT_KEYS_DIR')}")
            if "QUEUEKIT_AUTHKEY_FILE" in env:
                out.append(f"{where}: the server has an authkey file of its own (an admin key)")
        else:
            want = k8slib.ROLE_KEYS[component]
            if set(items) != {want}:
                held = sorted(items) or ["every key of the Secret"]
                out.append(f"{where}: holds {held}, must hold only {want}")
            elif f"{mount['mountPath'].rstrip('/')}/{items[want]}" != env.get(
                "QUEUEKIT_AUTHKEY_FILE", k8slib.AUTHKEY_PATH
            ):
                out.append(f"{where}: its key file is not where QUEUEKIT_AUTHKEY_FILE points")
            if env.get("QUEUEKIT_AUTHKEY_FILE", k8slib.AUTHKEY_PATH) != k8slib.AUTHKEY_PATH:
                out.append(f"{where}: QUEUEKIT_AUTHKEY_FILE is not the default {k8slib.AUTHKEY_PATH}")
        for e in c.get("env") or []:
            if "secretKeyRef" in (e.get("valueFrom") or {}):
                out.append(f"{where}: env {e['name']} from a Secret")
        for ref in c.get("envFrom") or []:
            if "secretRef" in ref:
                out.append(f"{where}: envFrom a Secret")
    if (spec.get("securityContext") or {}).get("fsGroup") != k8slib.GID:
        out.append(f"{workload['metadata']['name']}: without fsGroup {k8slib.GID} uid 10001 cannot read the 0400 keys")
    return out


@pytest.mark.parametrize("name", ALL)
def test_each_pod_holds_only_its_roles_key_as_a_read_only_file(renders, name):
    docs = renders.docs[name]
    secrets = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] not in k8slib.TLS_SECRET_NAMES]
    assert [s["metadata"]["name"] for s in secrets] in ([k8slib.SECRET_NAME], [])
    violations = [
        v
        for w in workloads(docs)
        for v in key_holding_violations(w, expected_workloads(name)[(w["kind"], w["metadata"]["name"])])
    ]
    assert violations == []
    # no key's content anywhere in a pod template (env values, args, annotations)
    for w in workloads(docs):
        text = str(pod_template(w))
        for key in renders.keys.values():
            assert key.decode().strip() not in text, f"{w['metadata']['name']}: a key is in the pod template"


def _items(workload) -> list[dict]:
    volume = next(v for v in pod_spec(workload)["volumes"] if "secret" in v)
    return volume["secret"].setdefault("items", [])


KEY_MUTATIONS = {
    # name: (component, mutation)
    "consumer-holds-producer-key": ("consumer", lambda w: _items(w)[0].update(key="producer.default")),
    "consumer-holds-admin-key": ("consumer", lambda w: _items(w)[0].update(key="admin.default")),
    "consumer-holds-every-key": (
        "consumer",
        lambda w: next(v for v in pod_spec(w)["volumes"] if "secret" in v)["secret"].pop("items"),
    ),
    "consumer-holds-admin-too": ("consumer", lambda w: _items(w).append({"key": "admin.default", "path": "admin"})),
    "producer-holds-consumer-key": ("producer", lambda w: _items(w)[0].update(key="consumer.default")),
    "producer-holds-admin-key": ("producer", lambda w: _items(w)[0].update(key="admin.default")),
    "server-lists-items": ("server", lambda w: _items(w).append({"key": "admin.default", "path": "admin.default"})),
    "server-authkey-file": (
        "server",
        lambda w: the_container(w)["env"].append({"name": "QUEUEKIT_AUTHKEY_FILE", "value": k8slib.AUTHKEY_PATH}),
    ),
    "world-readable": (
        "consumer",
        lambda w: next(v for v in pod_spec(w)["volumes"] if "secret" in v)["secret"].update(defaultMode=0o444),
    ),
    "subpath": ("server", lambda w: the_container(w)["volumeMounts"][1].update(subPath="admin.default")),
    "no-fsgroup": ("producer", lambda w: pod_spec(w)["securityContext"].pop("fsGroup")),
    "key-in-env": (
        "consumer",
        lambda w: the_container(w)["env"].append(
            {"name": "K", "valueFrom": {"secretKeyRef": {"name": k8slib.SECRET_NAME, "key": "consumer.default"}}}
        ),
    ),
}


@pytest.mark.parametrize("mutation", list(KEY_MUTATIONS))
def test_the_key_holding_checker_catches(renders, mutation):
    """A consumer holding the producer or admin key (or all of them), and the other drifts, are caught."""
    component, mutate = KEY_MUTATIONS[mutation]
    workload = copy.deepcopy(_workload(renders.docs["dev"], component))
    assert key_holding_violations(workload, component) == []
    mutate(workload)
    assert key_holding_violations(workload, component) != []


def _tunnel(workload) -> dict:
    return next(c for c in pod_spec(workload)["initContainers"] if c["name"] == k8slib.TUNNEL_CONTAINER)


TUNNEL_KEY_MUTATIONS = {
    "tunnel-mounts-the-producer-key": lambda w: _tunnel(w)["volumeMounts"].append(
        {"name": "authkey", "mountPath": "/run/secrets", "readOnly": True}
    ),
    "tunnel-has-an-authkey-file": lambda w: _tunnel(w)["env"].append(
        {"name": "QUEUEKIT_AUTHKEY_FILE", "value": k8slib.AUTHKEY_PATH}
    ),
    "stock-client-holds-the-consumer-key": lambda w: _items(w)[0].update(key="consumer.default"),
    "stock-client-holds-no-key": lambda w: the_container(w)["volumeMounts"].pop(0),
}


@pytest.mark.parametrize("mutation", list(TUNNEL_KEY_MUTATIONS))
def test_the_key_holding_checker_catches_a_tunnel_sidecar_with_a_key(renders, mutation):
    """components/tunnel-sidecar: the stock client holds the producer key only, the tunnel none."""
    workload = copy.deepcopy(one(renders.docs["dev-tls-tunnel"], *k8slib.STOCK_CLIENT_JOB))
    assert key_holding_violations(workload, "producer") == []
    TUNNEL_KEY_MUTATIONS[mutation](workload)
    assert key_holding_violations(workload, "producer") != []


@pytest.mark.parametrize("name", ALL)
def test_server_wiring(renders, name):
    docs = renders.docs[name]
    sts = one(docs, "StatefulSet", "queuekit-server")
    c = the_container(sts)
    env = env_map(c)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"manager": k8slib.MANAGER_PORT, "http": k8slib.HTTP_PORT}
    assert env["QUEUEKIT_BIND"].rsplit(":", 1)[1] == str(ports["manager"])
    assert env["QUEUEKIT_HTTP"].rsplit(":", 1)[1] == str(ports["http"])
    assert sts["spec"]["replicas"] == 1
    # durable journal on the PVC from volumeClaimTemplates
    assert env["QUEUEKIT_DATA_DIR"] == k8slib.DATA_DIR
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    data_mounts = [m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert [m["mountPath"] for m in data_mounts] == [k8slib.DATA_DIR]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    # the Services reach the named container ports; the StatefulSet names its headless Service
    for svc_name in ("queuekit-server", "queuekit-server-headless"):
        svc = one(docs, "Service", svc_name)
        assert k8slib.selector_matches(
            {"matchLabels": svc["spec"]["selector"]}, pod_template(sts)["metadata"]["labels"]
        )
        assert {p["name"]: (p["port"], ports[p["targetPort"]]) for p in svc["spec"]["ports"]} == {
            "manager": (k8slib.MANAGER_PORT, k8slib.MANAGER_PORT),
            "http": (k8slib.HTTP_PORT, k8slib.HTTP_PORT),
        }
    assert one(docs, "Service", "queuekit-server")["spec"]["type"] == "ClusterIP"
    assert one(docs, "Service", "queuekit-server-headless")["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == "queuekit-server-headless"


@pytest.mark.parametrize("name", ALL)
def test_clients_point_at_the_server_service(renders, name):
    docs = renders.docs[name]
    manager = _service_port(docs, "queuekit-server", "manager")
    for component in ("consumer", "producer"):
        env = env_map(the_container(_workload(docs, component)))
        assert env["QUEUEKIT_SERVER"] == f"queuekit-server:{manager['port']}"
        assert env["QUEUEKIT_QUEUE"] == "tasks"
    consumer_env = env_map(the_container(_workload(docs, "consumer")))
    assert consumer_env["QUEUEKIT_HANDLER"] == "queuekit.examples:handle"


@pytest.mark.parametrize("name", ALL)
def test_server_probes(renders, name):
    c = the_container(one(renders.docs[name], "StatefulSet", "queuekit-server"))
    port_names = {p["name"] for p in c["ports"]}
    expect = {"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/healthz"}
    for probe, path in expect.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path and get["port"] == "http" and "http" in port_names, probe
        assert c[probe]["timeoutSeconds"] < c[probe]["periodSeconds"] or probe == "startupProbe"


@pytest.mark.parametrize("name", ALL)
def test_consumer_probes_read_the_consumers_health_file(renders, name):
    c = the_container(one(renders.docs[name], "Deployment", "queuekit-consumer"))
    for probe, which in (("readinessProbe", "ready"), ("livenessProbe", "live")):
        cmd = c[probe]["exec"]["command"]
        assert cmd == [*k8slib.QUEUEKIT_CMD, "consume", "--probe", which], cmd
        assert c[probe]["timeoutSeconds"] <= c[probe]["periodSeconds"]
    # The consumer writes the file the probes read: on a writable volume (the root is read-only).
    health_file = env_map(c)["QUEUEKIT_HEALTH_FILE"]
    mounts = [m for m in c["volumeMounts"] if not m.get("readOnly")]
    assert any(health_file.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts), health_file
    # liveness slower to fire than readiness: a server restart should not restart every worker
    live, ready = c["livenessProbe"], c["readinessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 60
    assert live["periodSeconds"] * live["failureThreshold"] > ready["periodSeconds"] * ready["failureThreshold"]


@pytest.mark.parametrize("name", ALL)
def test_consumer_drains_within_its_grace_period(renders, name):
    deployment = one(renders.docs[name], "Deployment", "queuekit-consumer")
    env = env_map(the_container(deployment))
    drain = float(env["QUEUEKIT_DRAIN_TIMEOUT"])
    assert drain == 25
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert grace > drain, f"terminationGracePeriodSeconds {grace} <= drain timeout {drain}"
    assert float(env["QUEUEKIT_LEASE_SECONDS"]) > drain  # no redelivery while still draining
    strategy = deployment["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("name", ALL)
def test_consumer_replicas_and_disruption_budget(renders, name):
    docs = renders.docs[name]
    deployment = one(docs, "Deployment", "queuekit-consumer")
    if name == "dev-keda":
        assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    else:
        assert deployment["spec"]["replicas"] == 2
    pdb = one(docs, "PodDisruptionBudget", "queuekit-consumer")
    assert k8slib.selector_matches(pdb["spec"]["selector"], pod_template(deployment)["metadata"]["labels"])
    assert pdb["spec"].get("maxUnavailable") == 1 and "minAvailable" not in pdb["spec"]


@pytest.mark.parametrize("name", ALL)
def test_producer_job(renders, name):
    job = one(renders.docs[name], "Job", "queuekit-producer")
    assert 0 < job["spec"]["backoffLimit"] <= 5
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    assert pod_spec(job)["restartPolicy"] in ("Never", "OnFailure")


@pytest.mark.parametrize("name", ALL)
def test_writable_paths_are_volumes(renders, name):
    """Read-only root: every path the programs write to must be a mounted volume."""
    docs = renders.docs[name]
    for component, paths in {"server": ["/var/lib/queuekit", "/tmp"], "consumer": ["/tmp"]}.items():
        spec = pod_spec(_workload(docs, component))
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
        for path in paths:
            assert path in mounts and not mounts[path].get("readOnly"), (component, path)
            if path == "/tmp":
                assert volumes[mounts[path]["name"]]["emptyDir"]["sizeLimit"]


# --- NetworkPolicy: who reaches what ---------------------------------------------------------


def _pod_labels(docs, component):
    return pod_template(_workload(docs, component))["metadata"]["labels"]


@pytest.mark.parametrize("name", ["dev", "dev-existing-secret", "dev-keda", "base"])
def test_network_policy_reachability(renders, name):
    docs = renders.docs[name]
    policies = objects(docs, "NetworkPolicy")
    ns = k8slib.DEV_NAMESPACE if name != "base" else None
    ns_labels = {"kubernetes.io/metadata.name": ns or "default"}
    server = _pod_labels(docs, "server")
    consumer = _pod_labels(docs, "consumer")
    producer = _pod_labels(docs, "producer")
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    impostor = {"app.kubernetes.io/name": "other-app", "app.kubernetes.io/component": "consumer"}

    def can(src, port, *, dst=server, src_ns=ns, src_ns_labels=ns_labels):
        return k8slib.ingress_allowed(
            policies, src_labels=src, src_namespace=src_ns, src_namespace_labels=src_ns_labels,
            dst_labels=dst, dst_namespace=ns, port=port,
        )  # fmt: skip

    manager, http = k8slib.MANAGER_PORT, k8slib.HTTP_PORT
    assert can(consumer, manager) and can(producer, manager)
    assert not can(prometheus, manager), "any pod reaches the manager port"
    assert not can(impostor, manager), "another app's 'consumer' reaches the manager port"
    assert not can(server, manager)
    assert can(prometheus, http) and can(consumer, http)
    assert not can(prometheus, 12345)
    other_ns = {"kubernetes.io/metadata.name": "elsewhere"}
    assert not can(consumer, manager, src_ns="elsewhere", src_ns_labels=other_ns)
    assert not can(prometheus, http, src_ns="elsewhere", src_ns_labels=other_ns)
    keda_ns = {"kubernetes.io/metadata.name": "keda"}
    keda_pod = {"app": "keda-operator"}
    assert can(keda_pod, http, src_ns="keda", src_ns_labels=keda_ns) == (name == "dev-keda")
    assert not can(keda_pod, manager, src_ns="keda", src_ns_labels=keda_ns)
    # producers and consumers accept nothing
    assert not can(prometheus, http, dst=consumer) and not can(server, manager, dst=producer)


def test_network_policy_helper_is_not_vacuous():
    """With no policies everything is allowed; with the server policy alone, only its rules."""
    args = {
        "src_labels": {"a": "b"},
        "src_namespace": "n",
        "src_namespace_labels": {},
        "dst_labels": {"x": "y"},
        "dst_namespace": "n",
        "port": 1,
    }
    assert k8slib.ingress_allowed([], **args)
    deny = {
        "metadata": {"namespace": "n"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []},
    }
    assert not k8slib.ingress_allowed([deny], **args)


# --- KEDA -------------------------------------------------------------------------------------


def test_keda_scaledobject_matches_the_deployment_and_the_server(renders):
    docs = renders.docs["dev-keda"]
    so = one(docs, "ScaledObject", "queuekit-consumer")
    spec = so["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    one(docs, "Deployment", target["name"])
    assert so["metadata"]["namespace"] == one(docs, "Deployment", target["name"])["metadata"]["namespace"]
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "metrics-api"
    meta = trigger["metadata"]
    url = urlsplit(meta["url"])
    server_svc = one(docs, "Service", "queuekit-server")
    assert url.scheme == "http"
    assert url.hostname == f"{server_svc['metadata']['name']}.{server_svc['metadata']['namespace']}.svc"
    assert url.port == _service_port(docs, "queuekit-server", "http")["port"]
    assert url.path == "/stats"
    queue = env_map(the_container(one(docs, "Deployment", "queuekit-consumer")))["QUEUEKIT_QUEUE"]
    # The backlog (ready + in flight) against one consumer's capacity (concurrency + prefetch,
    # prefetch 2 x concurrency unless set): prefetched tasks count, busy consumers stay.
    assert meta["valueLocation"] == f"queues.{queue}.backlog"
    env = env_map(the_container(one(docs, "Deployment", "queuekit-consumer")))
    concurrency = int(env.get("QUEUEKIT_CONCURRENCY") or 1)
    prefetch = int(env.get("QUEUEKIT_PREFETCH") or 2 * concurrency)
    assert int(meta["targetValue"]) == concurrency + prefetch
    assert trigger.get("metricType", "AverageValue") == "AverageValue"
