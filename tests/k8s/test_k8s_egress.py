"""components/egress (issue 11, ask 6): in every dev overlay, producer and consumer pods may open
connections only to the server's manager port and to the cluster DNS on 53 (UDP and TCP); the
documented way to let a handler reach more works and widens nothing else."""

from __future__ import annotations

import copy
import ipaddress
import shutil
from pathlib import Path

import k8slib
import pytest
from k8slib import objects, one, pod_template, selector_matches, workloads

pytestmark = pytest.mark.k8s

POLICY = "queuekit-clients-egress"
NS = k8slib.DEV_NAMESPACE
OVERLAYS = k8slib.DEPLOYABLE  # dev, dev-existing-secret, dev-keda: each includes the component
KUBE_SYSTEM = {"kubernetes.io/metadata.name": "kube-system"}
KUBE_DNS = {"k8s-app": "kube-dns"}  # the label of both kube-dns and CoreDNS pods
DNS_PORTS = {("UDP", 53), ("TCP", 53)}


def egress_allowed(
    policies: list[dict],
    *,
    src_labels: dict[str, str],
    src_namespace: str | None,
    port: int,
    protocol: str = "TCP",
    dst_labels: dict[str, str] | None = None,
    dst_namespace: str | None = None,
    dst_namespace_labels: dict[str, str] | None = None,
    dst_ip: str | None = None,
) -> bool:
    """Would NetworkPolicy (egress) let a pod open a connection to a pod (``dst_labels`` in
    ``dst_namespace``) or to an address outside the cluster (``dst_ip``, no labels)?

    The API's semantics: a pod no policy selects for Egress may connect anywhere; a selected pod
    only where at least one rule of one selecting policy allows. A rule without ports allows
    every port, one without ``to`` every destination. ipBlock peers match ``dst_ip`` only."""
    selecting = [
        p
        for p in policies
        if p["metadata"].get("namespace") == src_namespace
        and selector_matches(p["spec"].get("podSelector"), src_labels)
        and "Egress" in (p["spec"].get("policyTypes") or (["Egress"] if "egress" in p["spec"] else []))
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("egress") or []:
            ports = rule.get("ports")
            if ports and not any(_port_matches(p, protocol, port) for p in ports):
                continue
            peers = rule.get("to")
            if not peers:
                return True
            for peer in peers:
                if "ipBlock" in peer:
                    if dst_ip is not None and _in_block(peer["ipBlock"], dst_ip):
                        return True
                    continue
                if dst_labels is None:  # an address outside the cluster: only ipBlocks reach it
                    continue
                ns_sel = peer.get("namespaceSelector")
                ns_ok = (
                    dst_namespace == src_namespace
                    if ns_sel is None
                    else selector_matches(ns_sel, dst_namespace_labels or {})
                )
                pod_ok = "podSelector" not in peer or selector_matches(peer["podSelector"], dst_labels)
                if ns_ok and pod_ok:
                    return True
    return False


def _port_matches(rule_port: dict, protocol: str, port: int) -> bool:
    if rule_port.get("protocol", "TCP") != protocol:
        return False
    if "port" not in rule_port:
        return True
    value = rule_port["port"]
    if not isinstance(value, int):
        raise NotImplementedError("named ports are not modelled by this test helper")
    return value <= port <= rule_port.get("endPort", value)


def _in_block(block: dict, ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return addr in ipaddress.ip_network(block["cidr"]) and not any(
        addr in ipaddress.ip_network(e) for e in block.get("except") or []
    )


def _all_labels(docs: list[dict], component: str) -> list[dict[str, str]]:
    """The pod labels of every workload of ``component`` (overlays/dev-tls-tunnel: two producers)."""
    return [
        pod_template(w)["metadata"]["labels"]
        for w in workloads(docs)
        if pod_template(w)["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]


def _labels(docs: list[dict], component: str) -> dict[str, str]:
    (labels,) = _all_labels(docs, component)
    return labels


def egress_violations(docs: list[dict]) -> list[str]:
    """What is wrong with the clients' egress in a rendered dev overlay (empty: nothing)."""
    policies = objects(docs, "NetworkPolicy")
    server = _labels(docs, "server")
    same_ns = {"kubernetes.io/metadata.name": NS}
    out = []

    def check(what: str, want: bool, **dst) -> None:
        for component in ("consumer", "producer"):
            for labels in _all_labels(docs, component):
                got = egress_allowed(policies, src_labels=labels, src_namespace=NS, **dst)
                if got != want:
                    out.append(f"{component} {'cannot' if want else 'can'} connect to {what}")

    to_server = {"dst_labels": server, "dst_namespace": NS, "dst_namespace_labels": same_ns}
    dns = {"dst_labels": KUBE_DNS, "dst_namespace": "kube-system", "dst_namespace_labels": KUBE_SYSTEM}
    check("the server's manager port", True, port=k8slib.MANAGER_PORT, **to_server)
    check("DNS over UDP", True, port=53, protocol="UDP", **dns)
    check("DNS over TCP", True, port=53, protocol="TCP", **dns)
    check("the server's HTTP port", False, port=k8slib.HTTP_PORT, **to_server)
    check("another port of the server", False, port=22, **to_server)
    check("the manager port over UDP", False, port=k8slib.MANAGER_PORT, protocol="UDP", **to_server)
    check("another port of the DNS pods", False, port=9153, **dns)
    check("another kube-system pod on 53", False, port=53, protocol="UDP", **{**dns, "dst_labels": {"k8s-app": "x"}})
    elsewhere = {"kubernetes.io/metadata.name": "elsewhere"}
    check(
        "a 'kube-dns' pod outside kube-system",
        False,
        port=53,
        protocol="UDP",
        **{**dns, "dst_namespace": "elsewhere", "dst_namespace_labels": elsewhere},
    )
    impostor = {"app.kubernetes.io/name": "other-app", "app.kubernetes.io/component": "server"}
    check("another app's 'server' on 50000", False, port=k8slib.MANAGER_PORT, **{**to_server, "dst_labels": impostor})
    check(
        "a queuekit server in another namespace",
        False,
        port=k8slib.MANAGER_PORT,
        **{**to_server, "dst_namespace": "elsewhere", "dst_namespace_labels": elsewhere},
    )
    check("the internet on 443", False, port=443, dst_ip="93.184.216.34")
    check("the cloud metadata address", False, port=80, dst_ip="169.254.169.254")
    check("a DNS server outside the cluster", False, port=53, protocol="UDP", dst_ip="8.8.8.8")
    # The policy is about the clients only: the server's own connections are not restricted here.
    if not egress_allowed(policies, src_labels=server, src_namespace=NS, port=443, dst_ip="93.184.216.34"):
        out.append("the policy restricts the server's egress too")
    # And it opens nothing but (TCP 50000) and DNS, whatever the helper above models.
    (policy,) = [p for p in policies if p["metadata"]["name"] == POLICY] or [None]
    if policy is not None:
        opened = {
            (p.get("protocol", "TCP"), p.get("port")) for r in policy["spec"]["egress"] for p in r.get("ports") or [{}]
        }
        if opened != {("TCP", k8slib.MANAGER_PORT)} | DNS_PORTS:
            out.append(f"{POLICY} opens {sorted(opened, key=str)}")
    return out


@pytest.mark.parametrize("name", OVERLAYS)
def test_clients_reach_only_the_manager_port_and_dns(renders, name):
    policy = one(renders.docs[name], "NetworkPolicy", POLICY)
    assert policy["metadata"]["namespace"] == NS
    assert policy["spec"]["policyTypes"] == ["Egress"]
    assert egress_violations(renders.docs[name]) == []


def _drop_policy(docs):
    return [d for d in docs if d["metadata"]["name"] != POLICY]


def _mutate(change):
    def apply(docs):
        docs = copy.deepcopy(docs)
        change(next(d for d in docs if d["metadata"]["name"] == POLICY)["spec"])
        return docs

    return apply


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (_drop_policy, "consumer can connect to the internet on 443"),
        (
            _mutate(lambda s: s["egress"][0]["ports"].append({"port": 8080})),
            "consumer can connect to the server's HTTP port",
        ),
        (_mutate(lambda s: s["egress"][0]["ports"].append({"port": 6000, "protocol": "TCP"})), "opens"),
        (_mutate(lambda s: s["egress"][0].pop("ports")), "consumer can connect to another port of the server"),
        (_mutate(lambda s: s["egress"][1].pop("to")), "consumer can connect to a DNS server outside the cluster"),
        (
            _mutate(lambda s: s["egress"][1]["to"][0].pop("namespaceSelector")),
            "consumer cannot connect to DNS over UDP",
        ),
        (_mutate(lambda s: s["egress"][1]["ports"].pop(1)), "consumer cannot connect to DNS over TCP"),
        (_mutate(lambda s: s["podSelector"]["matchExpressions"][1]["values"].remove("producer")), "producer can"),
        (_mutate(lambda s: s["podSelector"].pop("matchExpressions")), "restricts the server's egress"),
        (_mutate(lambda s: s["egress"].append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})), "the internet on 443"),
    ],
)
def test_the_check_catches_a_missing_or_wider_policy(renders, mutate, expected):
    found = egress_violations(mutate(renders.docs["dev"]))
    assert any(expected in v for v in found), found


def test_base_leaves_egress_open(renders):
    """Egress is opt-in (a component): the base alone restricts no connection of the clients."""
    assert POLICY not in {p["metadata"]["name"] for p in objects(renders.docs["base"], "NetworkPolicy")}


def _copy(tree: Path, dest: Path) -> Path:
    """A private copy of the rendered tree (with its throwaway keys) to add an overlay to."""
    return Path(shutil.copytree(tree, dest / "k8s"))


def test_the_component_needs_the_namespace_set_before_it(kubectl, renders, tmp_path):
    """Listed before the namespace's component, kustomize stops instead of rendering a policy
    without a namespace (which kubectl would apply to its current namespace)."""
    overlay = _copy(renders.tree, tmp_path) / "overlays" / "egress-first"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../../base\n"
        "components:\n  - ../../components/egress\n  - ../../components/dev\n"
    )
    result = k8slib.kustomize(kubectl, overlay)
    assert result.returncode != 0 and "metadata.namespace" in result.stderr, result.stdout[:2000]


EXTENSION = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../dev
patches:
  - target:
      kind: NetworkPolicy
      name: queuekit-clients-egress
    patch: |-
      - op: add
        path: /spec/egress/-
        value:
          to:
            - ipBlock:
                cidr: 10.0.5.0/24
          ports:
            - port: 5432
              protocol: TCP
"""


def test_the_documented_extension_adds_only_what_it_names(kubectl, renders, tmp_path):
    """k8s/README.md and components/egress show this patch for a handler's PostgreSQL."""
    assert "cidr: 10.0.5.0/24" in (k8slib.K8S_DIR / "README.md").read_text()
    overlay = _copy(renders.tree, tmp_path) / "overlays" / "with-database"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(EXTENSION)
    result = k8slib.kustomize(kubectl, overlay)
    assert result.returncode == 0, result.stderr
    docs = k8slib.load_docs(result.stdout)
    policies = objects(docs, "NetworkPolicy")
    consumer = _labels(docs, "consumer")
    assert egress_allowed(policies, src_labels=consumer, src_namespace=NS, port=5432, dst_ip="10.0.5.7")
    assert not egress_allowed(policies, src_labels=consumer, src_namespace=NS, port=5432, dst_ip="10.0.6.7")
    assert not egress_allowed(policies, src_labels=consumer, src_namespace=NS, port=22, dst_ip="10.0.5.7")
    violations = egress_violations(docs)
    assert violations == [f"{POLICY} opens [('TCP', 50000), ('TCP', 53), ('TCP', 5432), ('UDP', 53)]"], violations


def test_egress_helper_is_not_vacuous():
    args = {"src_labels": {"a": "b"}, "src_namespace": "n", "port": 1, "dst_ip": "192.0.2.1"}
    assert egress_allowed([], **args)
    deny = {"metadata": {"namespace": "n"}, "spec": {"podSelector": {}, "policyTypes": ["Egress"]}}
    assert not egress_allowed([deny], **args)
    ingress_only = {"metadata": {"namespace": "n"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    assert egress_allowed([ingress_only], **args)
