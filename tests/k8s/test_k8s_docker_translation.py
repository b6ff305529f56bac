"""The manifest -> Docker translation of k8s_docker.py, checked without Docker: the parts that
test_manifests_on_docker.py relies on but cannot show failing on the real manifests (they use no
valueFrom, no ``$(VAR)``, no unknown fields)."""

from __future__ import annotations

import copy

import k8slib
import pytest
from k8s_docker import Namespace, NotModelled, PodConfigError, expand, quantity
from k8slib import one, pod_spec, the_container

pytestmark = pytest.mark.k8s

CONSUMER = ("Deployment", "queuekit-consumer")


def namespace(docs) -> Namespace:
    # Planning and env building touch no Docker object: the network is created on first use.
    return Namespace(docs, images={}, helper_image="unused", hint="translation")


def test_var_expansion_follows_kubernetes():
    env = {"A": "x", "B_C": "y"}
    assert expand("$(A)-$(B_C)", env) == "x-y"
    assert expand("$(MISSING)", env) == "$(MISSING)"
    assert expand("$$(A) costs $$5", env) == "$(A) costs $5"


@pytest.mark.parametrize(
    ("text", "value"),
    [("500m", 0.5), ("1", 1.0), (2, 2.0), ("64Mi", 64 * 2**20), ("1Gi", 2**30), ("100k", 1e5)],
)
def test_quantities(text, value):
    assert quantity(text) == value


def test_unparsed_quantity_is_refused():
    with pytest.raises(NotModelled):
        quantity("1e3")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s["containers"][0].update(lifecycle={"preStop": {"exec": {"command": ["true"]}}}),
        lambda s: s.update(initContainers=[{"name": "init", "image": "queuekit-consumer:latest"}]),
        lambda s: s["containers"][0]["securityContext"].update(seLinuxOptions={"level": "s0"}),
        lambda s: s["securityContext"].update(sysctls=[{"name": "net.core.somaxconn", "value": "1"}]),
        lambda s: s.update(hostNetwork=True),
    ],
    ids=["lifecycle", "init-container", "selinux", "sysctls", "host-network"],
)
def test_unknown_fields_are_refused_not_dropped(renders, mutate):
    docs = copy.deepcopy(renders.docs["dev"])
    namespace(docs).plan(one(docs, *CONSUMER))  # as rendered: accepted
    mutate(pod_spec(one(docs, *CONSUMER)))
    with pytest.raises(NotModelled):
        namespace(docs).plan(one(docs, *CONSUMER))


def test_pods_are_named_and_labelled_like_the_controllers(renders):
    docs = copy.deepcopy(renders.docs["dev"])
    ns = namespace(docs)
    assert ns.namespace == k8slib.DEV_NAMESPACE
    (server,) = ns.plan(one(docs, "StatefulSet", "queuekit-server"))
    assert server.name == "queuekit-server-0"
    assert server.labels["statefulset.kubernetes.io/pod-name"] == "queuekit-server-0"
    assert server.resolve_port("manager") == k8slib.MANAGER_PORT and server.resolve_port("nope") is None
    consumers = ns.plan(one(docs, *CONSUMER))
    assert len(consumers) == one(docs, *CONSUMER)["spec"]["replicas"]
    assert len(ns.plan(one(docs, *CONSUMER), replicas=5)) == 5
    assert len({p.name for p in consumers}) == len(consumers)
    assert all(p.name.startswith("queuekit-consumer-") and "pod-template-hash" in p.labels for p in consumers)


def test_env_value_from_and_service_links(renders):
    docs = copy.deepcopy(renders.docs["dev"])
    container = the_container(one(docs, *CONSUMER))
    secret_name = next(v for v in pod_spec(one(docs, *CONSUMER))["volumes"] if v["name"] == "authkey")["secret"][
        "secretName"
    ]
    container["env"] += [
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": secret_name, "key": k8slib.ROLE_KEYS["consumer"]}}},
        {"name": "WHERE", "value": "$(POD) in $(NS) reads $(QUEUEKIT_QUEUE)"},
    ]
    ns = namespace(docs)
    (pod,) = ns.plan(one(docs, *CONSUMER), replicas=1)
    ns.service_ips["queuekit-server"] = "10.0.0.7"  # as if its forwarder were running
    env = ns._env(pod)
    assert env["KEY"].encode() == renders.keys[k8slib.ROLE_KEYS["consumer"]]
    assert env["WHERE"] == f"{pod.name} in {k8slib.DEV_NAMESPACE} reads tasks"
    assert not any(k.endswith("_SERVICE_HOST") for k in env), "enableServiceLinks: false"
    pod.spec["enableServiceLinks"] = True
    env = ns._env(pod)
    assert env["QUEUEKIT_SERVER_SERVICE_HOST"] == "10.0.0.7"
    assert env["QUEUEKIT_SERVER_PORT"] == f"tcp://10.0.0.7:{k8slib.MANAGER_PORT}"
    assert env["QUEUEKIT_SERVER"] == "queuekit-server:50000", "the manifest's value wins over the links"

    container["env"].append({"name": "NOPE", "valueFrom": {"secretKeyRef": {"name": secret_name, "key": "nope"}}})
    (pod,) = ns.plan(one(docs, *CONSUMER), replicas=1)
    with pytest.raises(PodConfigError, match="couldn't find key nope"):
        ns._env(pod)
