"""components/monitoring (overlays/dev-monitoring): the PodMonitor and PrometheusRule validate
against the Prometheus Operator's CRD schemas (v0.80.1, requirements/prometheus-operator-models.txt),
the PodMonitor scrapes exactly the server pods' HTTP port, the PrometheusRule holds the same rules
as monitoring/queuekit-alerts.rules.yml (which promtool tests: tests/unit/test_alert_rules.py), and
Prometheus' namespace may reach /metrics and nothing else. Negative controls show each check bites."""

from __future__ import annotations

import copy

import k8slib
import pytest
from k8slib import one, pod_template

pytestmark = pytest.mark.k8s

OVERLAY = "dev-monitoring"
KINDS = ("PodMonitor", "PrometheusRule")
PROMETHEUS_NAMESPACE = "monitoring"


@pytest.fixture(scope="module")
def validators():
    """Strict (closed) JSON schemas of PodMonitor and PrometheusRule, as for KEDA and cert-manager."""
    jsonschema = k8slib.require_module("jsonschema")
    schemas = k8slib.cloudcoil_schemas(
        "prometheus_operator", tuple(KINDS), "prometheus-operator-models.txt", "Prometheus Operator"
    )
    out = {}
    for kind, schema in schemas.items():
        python_regex(schema)
        jsonschema.Draft202012Validator.check_schema(schema)
        out[kind] = jsonschema.Draft202012Validator(schema)
    return out


def python_regex(node) -> None:
    """The CRDs' patterns are Go regular expressions: Go allows ``^(?i)...``, Python wants inline
    flags first. Rewritten in place (same meaning)."""
    if isinstance(node, dict):
        pattern = node.get("pattern")
        if isinstance(pattern, str) and pattern.startswith("^(?i)"):
            node["pattern"] = "(?i)^" + pattern[len("^(?i)") :]
        for value in node.values():
            python_regex(value)
    elif isinstance(node, list):
        for value in node:
            python_regex(value)


def errors(validator, doc) -> list[str]:
    return [f"@ {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_monitoring_objects_validate_against_the_operator_crd_schemas(renders, validators):
    docs = renders.docs[OVERLAY]
    for kind, name in (("PodMonitor", "queuekit-server"), ("PrometheusRule", "queuekit")):
        assert errors(validators[kind], one(docs, kind, name)) == [], kind
    server = one(docs, "Service", "queuekit-server")
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            assert doc["metadata"]["namespace"] == server["metadata"]["namespace"], doc["kind"]
    policy = one(docs, "NetworkPolicy", "queuekit-server-from-prometheus")
    assert policy["metadata"]["namespace"] == server["metadata"]["namespace"]


@pytest.mark.parametrize(
    "kind, name, mutate, fragment",
    [
        ("PodMonitor", "queuekit-server", lambda d: d["spec"].update(podMetricEndpoints=[]), "podMetricEndpoints"),
        (
            "PodMonitor",
            "queuekit-server",
            lambda d: d["spec"]["podMetricsEndpoints"][0].update(interval=15),
            "15",
        ),
        ("PodMonitor", "queuekit-server", lambda d: d["spec"]["podMetricsEndpoints"][0].update(scheme="tcp"), "tcp"),
        (
            "PrometheusRule",
            "queuekit",
            lambda d: d["spec"]["groups"][0]["rules"][0].update(expression="up"),
            "expression",
        ),
        ("PrometheusRule", "queuekit", lambda d: d["spec"]["groups"][0].pop("name"), "spec.groups"),
    ],
)
def test_the_schemas_reject_bad_objects(renders, validators, kind, name, mutate, fragment):
    doc = copy.deepcopy(one(renders.docs[OVERLAY], kind, name))
    mutate(doc)
    found = errors(validators[kind], doc)
    assert found and any(fragment in e for e in found), found


def test_the_prometheusrule_holds_the_rules_file_word_for_word(renders):
    yaml = k8slib.require_module("yaml")
    rules_file = yaml.safe_load((k8slib.REPO / "monitoring" / "queuekit-alerts.rules.yml").read_text())
    rule = one(renders.docs[OVERLAY], "PrometheusRule", "queuekit")
    assert rule["spec"] == rules_file
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts >= {"QueuekitDeadLettersGrowing", "QueuekitOldestTaskTooOld", "QueuekitNoConsumers"}
    assert "QueuekitServerNotReady" in alerts


def scraped(podmonitor: dict, workload: dict) -> list[int]:
    """The container ports of ``workload``'s pods that ``podmonitor`` scrapes (same namespace only)."""
    if podmonitor["metadata"]["namespace"] != workload["metadata"]["namespace"]:
        return []
    template = pod_template(workload)
    if not k8slib.selector_matches(podmonitor["spec"]["selector"], template["metadata"].get("labels") or {}):
        return []
    ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports") or []}
    return [ports[e["port"]] for e in podmonitor["spec"]["podMetricsEndpoints"] if e["port"] in ports]


def prometheus_reaches(docs: list[dict], server: dict, port: int) -> bool:
    """Whether a pod in Prometheus' namespace may connect to ``port`` of the server pods."""
    return k8slib.ingress_allowed(
        [d for d in docs if d["kind"] == "NetworkPolicy"],
        src_labels={"app.kubernetes.io/name": "prometheus"},
        src_namespace=PROMETHEUS_NAMESPACE,
        src_namespace_labels={"kubernetes.io/metadata.name": PROMETHEUS_NAMESPACE},
        dst_labels=pod_template(server)["metadata"]["labels"],
        dst_namespace=server["metadata"]["namespace"],
        port=port,
    )


def check_scrape(docs: list[dict]) -> list[str]:
    problems = []
    pm = one(docs, "PodMonitor", "queuekit-server")
    server = one(docs, "StatefulSet", "queuekit-server")
    if scraped(pm, server) != [k8slib.HTTP_PORT]:
        problems.append(f"server pods: scrapes ports {scraped(pm, server)}, wants [{k8slib.HTTP_PORT}]")
    for w in k8slib.workloads(docs):
        labels = pod_template(w)["metadata"].get("labels") or {}
        if w is not server and k8slib.selector_matches(pm["spec"]["selector"], labels):
            problems.append(f"also selects {w['kind']}/{w['metadata']['name']}")
    for e in pm["spec"]["podMetricsEndpoints"]:
        if e.get("path", "/metrics") != "/metrics":
            problems.append(f"path {e.get('path')}")
        jobs = [r for r in e.get("relabelings") or [] if r.get("targetLabel") == "job"]
        if [r.get("replacement") for r in jobs] != ["queuekit-server"]:
            problems.append("job label is not queuekit-server (the alert QueuekitServerDown selects it)")
    if not prometheus_reaches(docs, server, k8slib.HTTP_PORT):
        problems.append("Prometheus' namespace cannot reach the server's HTTP port")
    if prometheus_reaches(docs, server, k8slib.MANAGER_PORT):
        problems.append("Prometheus' namespace can reach the manager port")
    return problems


def test_the_podmonitor_scrapes_exactly_the_server_http_port(renders):
    assert check_scrape(renders.docs[OVERLAY]) == []


def _pm(docs):
    return one(docs, "PodMonitor", "queuekit-server")


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (
            lambda d: _pm(d)["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/component": "consumer"}),
            "server pods",
        ),
        (lambda d: _pm(d)["spec"]["selector"]["matchLabels"].pop("app.kubernetes.io/component"), "also selects"),
        (lambda d: _pm(d)["spec"]["podMetricsEndpoints"][0].update(port="manager"), "server pods"),
        (lambda d: _pm(d)["spec"]["podMetricsEndpoints"][0].update(path="/stats"), "path"),
        (lambda d: _pm(d)["spec"]["podMetricsEndpoints"][0].pop("relabelings"), "job label"),
        (lambda d: _pm(d)["metadata"].update(namespace="default"), "server pods"),
        (
            lambda d: one(d, "NetworkPolicy", "queuekit-server-from-prometheus")["spec"]["ingress"][0]["from"][0][
                "namespaceSelector"
            ]["matchLabels"].update({"kubernetes.io/metadata.name": "observability"}),
            "cannot reach",
        ),
        (
            lambda d: one(d, "NetworkPolicy", "queuekit-server-from-prometheus")["spec"]["ingress"][0].pop("ports"),
            "manager port",
        ),
    ],
)
def test_scrape_check_catches_mistakes(renders, mutate, fragment):
    docs = copy.deepcopy(renders.docs[OVERLAY])
    mutate(docs)
    problems = check_scrape(docs)
    assert any(fragment in p for p in problems), problems
