"""Run rendered Kubernetes objects as Docker containers: a kubelet + kube-proxy stand-in for tests.

This is how tests/k8s/test_manifests_on_docker.py executes the manifests without a cluster. The
translation is driven by the rendered objects only (nothing about queuekit is hard-coded here),
and it is deliberately strict: every pod-spec, container and securityContext field it meets must
be one it knows, either translated or listed below as "accepted, not modelled" with the reason.
An unknown field raises :class:`NotModelled` instead of being silently dropped.

What a pod becomes
    One container per pod (a pod with several containers or init containers is NotModelled), on
    the namespace's user-defined Docker network, hostname = the pod's name, which is also its
    network alias. Pod names follow the controllers: ``<sts>-<ordinal>``, ``<deploy>-<hash>-<x>``,
    ``<job>-<x>``; pod labels = the template's plus the controller's own (pod-template-hash,
    statefulset.kubernetes.io/pod-name, job-name).

    image              -> the session's test image for that repository (``images`` map); an image
                          whose repository is not in the map is an error (no pulls here)
    command / args     -> ENTRYPOINT / CMD, with the Kubernetes rules: command replaces the
                          image's entrypoint and drops its CMD, args alone keep the entrypoint;
                          ``$(VAR)`` references are expanded from the container's env
    env / envFrom      -> environment: value, valueFrom (secretKeyRef, configMapKeyRef, fieldRef
                          on metadata/spec fields), ``$(VAR)`` expansion, and the docker-link style
                          Service variables unless enableServiceLinks is false
    secret / configMap / projected volumes
                       -> a labelled Docker volume per pod, filled with one file per key (or per
                          ``items`` entry: key -> path) with the kubelet's ownership and modes:
                          owner root, mode = item mode or defaultMode (0644), and with a pod
                          fsGroup the group is fsGroup and the mode gains 0440 (what the kubelet's
                          SetVolumeOwnership does to read-only volumes). A missing Secret or key
                          is a :class:`PodConfigError` (the pod would never start), unless optional.
    emptyDir           -> tmpfs (sizeLimit -> size, mode 0777; with fsGroup: group fsGroup, 2777)
    volumeClaimTemplates / persistentVolumeClaim
                       -> a labelled named Docker volume per claim (``<template>-<sts>-<ordinal>``),
                          kept for the life of the namespace, root owned; with fsGroup its root
                          directory gets group fsGroup and mode |= 2770, as the kubelet does
    volumeMounts       -> mounts at mountPath, readOnly -> ro (subPath is NotModelled)
    securityContext    -> user runAsUser:runAsGroup (container overrides pod), group_add fsGroup
                          and supplementalGroups, runAsNonRoot checked as the kubelet does
                          (uid 0 or a non-numeric image user refuses to start), read_only =
                          readOnlyRootFilesystem, cap_drop / cap_add, no-new-privileges when
                          allowPrivilegeEscalation is false, privileged, seccomp Unconfined ->
                          seccomp=unconfined (RuntimeDefault = the engine's default profile)
    resources.limits   -> nano_cpus / mem_limit; requests.cpu -> cpu_shares
    ports              -> published on 127.0.0.1 (ephemeral) for the test's own clients and for
                          the httpGet probes, as the kubelet reaches a pod from the node
    probes             -> run on demand by :meth:`Pod.probe`: exec inside the container (as its
                          user; exceeding timeoutSeconds is a failure, as the kubelet enforces),
                          httpGet from the host through the published port (named ports
                          resolved, 200-399 = success). Periods, delays and thresholds are NOT
                          simulated: callers poll at their own pace.
    terminationGracePeriodSeconds -> :meth:`Pod.stop`: SIGTERM, SIGKILL after the grace period
    restartPolicy      -> Deployment/StatefulSet: Docker restart "always" (a crashing container
                          shows up as restarts); Job pods: no restart, a new pod per failure up
                          to backoffLimit (also for OnFailure), within activeDeadlineSeconds
    image VOLUMEs      -> what Docker does (an anonymous volume where no mount covers it), which
                          is also containerd's default in a cluster

What a Service becomes
    A ClusterIP Service is a small forwarding container (Python, the helper image) that carries
    the Service's name as network aliases (``name``, ``name.<ns>``, ``name.<ns>.svc``,
    ``name.<ns>.svc.cluster.local``), listens on every Service ``port`` and forwards each
    connection to ``targetPort`` of one endpoint (round robin). Endpoints are the pods planned
    before the Services start whose labels match the Service's selector (Job pods, planned
    later, never are), with ``targetPort`` resolved per pod (a
    named port a pod does not declare leaves that pod out). No endpoint: the connection is reset,
    as kube-proxy rejects it. So port != targetPort, a renamed port or a selector that matches
    nothing behave as in a cluster. A headless Service (clusterIP: None) becomes network aliases
    on its pods (``svc``, and ``<pod>.<svc>`` for a StatefulSet's governing Service). There are
    no DNS search domains: the short name and the aliases above resolve, nothing else.

Not modelled (and so NOT proven by tests built on this): scheduling, resource requests as
placement, node and pod affinity, PVC binding, StorageClasses, capacity and access modes,
NetworkPolicy enforcement (Docker networks do not filter), readiness gating of Service endpoints
(a not-ready pod stays an endpoint), probe timing (periods, initial delays, thresholds, restarts
by liveness), rolling-update strategies, PodDisruptionBudgets, ServiceAccount tokens and RBAC,
Pod Security admission (checked statically by test_k8s_workloads.py), image pull policies, and
the secret volume's atomic ``..data`` symlink layout.
"""

from __future__ import annotations

import base64
import copy
import io
import re
import secrets
import ssl
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import k8slib

from support import dockerkit as dk


class NotModelled(NotImplementedError):
    """The manifests use something this translation does not implement: fail loudly."""


class PodConfigError(RuntimeError):
    """Kubernetes would not start this pod (e.g. CreateContainerConfigError, a missing Secret key)."""


# ---------------------------------------------------------------------------------------------
# Field inventories: translated, or accepted on purpose with the reason it does not matter here.

POD_FIELDS = {
    "containers": "translated",
    "volumes": "translated",
    "securityContext": "translated",
    "restartPolicy": "translated",
    "terminationGracePeriodSeconds": "translated (stop timeout)",
    "enableServiceLinks": "translated (Service env variables)",
    "hostname": "translated",
    "subdomain": "translated",
    "serviceAccountName": "accepted: no API server, no tokens",
    "serviceAccount": "accepted: no API server, no tokens",
    "automountServiceAccountToken": "accepted: no API server, no tokens",
    "nodeSelector": "accepted: scheduling is not modelled",
    "affinity": "accepted: scheduling is not modelled",
    "tolerations": "accepted: scheduling is not modelled",
    "topologySpreadConstraints": "accepted: scheduling is not modelled",
    "priorityClassName": "accepted: scheduling is not modelled",
    "schedulerName": "accepted: scheduling is not modelled",
    "imagePullSecrets": "accepted: images are local",
    "dnsPolicy": "accepted: Docker's embedded DNS resolves the aliases",
    "activeDeadlineSeconds": "accepted",
}
CONTAINER_FIELDS = {
    "name": "translated",
    "image": "translated",
    "command": "translated",
    "args": "translated",
    "env": "translated",
    "envFrom": "translated",
    "workingDir": "translated",
    "ports": "translated",
    "resources": "translated (limits; requests.cpu as shares)",
    "securityContext": "translated",
    "volumeMounts": "translated",
    "readinessProbe": "translated (run on demand)",
    "livenessProbe": "translated (run on demand)",
    "startupProbe": "translated (run on demand)",
    "stdin": "translated",
    "tty": "translated",
    "imagePullPolicy": "accepted: images are local, never pulled",
    "terminationMessagePath": "accepted: no pod status",
    "terminationMessagePolicy": "accepted: no pod status",
}
POD_SECURITY_FIELDS = {
    "runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "fsGroupChangePolicy", "supplementalGroups",
    "seccompProfile",
}  # fmt: skip
CONTAINER_SECURITY_FIELDS = {
    "runAsNonRoot", "runAsUser", "runAsGroup", "allowPrivilegeEscalation", "privileged",
    "readOnlyRootFilesystem", "capabilities", "seccompProfile", "procMount",
}  # fmt: skip
SERVICE_SPEC_FIELDS = {
    "type", "selector", "ports", "clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy",
    "internalTrafficPolicy", "sessionAffinity",
}  # fmt: skip
SERVICE_PORT_FIELDS = {"name", "port", "targetPort", "protocol", "appProtocol"}
WORKLOAD_SPEC_FIELDS = {
    "Deployment": {
        "replicas", "selector", "template", "strategy", "minReadySeconds", "revisionHistoryLimit",
        "progressDeadlineSeconds", "paused",
    },
    "StatefulSet": {
        "replicas", "selector", "template", "serviceName", "volumeClaimTemplates", "updateStrategy",
        "podManagementPolicy", "persistentVolumeClaimRetentionPolicy", "minReadySeconds", "revisionHistoryLimit",
        "ordinals",
    },
    "Job": {
        "template", "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished", "completions",
        "parallelism", "selector", "manualSelector", "completionMode",
    },
}  # fmt: skip


def _check_fields(what: str, obj: dict, known: Iterable[str]) -> None:
    unknown = sorted(set(obj) - set(known))
    if unknown:
        raise NotModelled(f"{what}: field(s) {unknown} are not translated to Docker (tests/k8s/k8s_docker.py)")


# ---------------------------------------------------------------------------------------------
# Small pure helpers


_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
_SUFFIX = {
    None: 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


def quantity(value: Any) -> float:
    """A Kubernetes resource quantity ("500m", "256Mi", "1", 2) as a number."""
    if isinstance(value, int | float):
        return float(value)
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise NotModelled(f"resource quantity {value!r} (exponent forms are not parsed here)")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined names are replaced, ``$$`` is a literal ``$``,
    references to undefined names are left as they are."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR_REF.sub(sub, text)


def selector_matches(selector: dict | None, labels: dict[str, str]) -> bool:
    """A Service selector is a plain map; workload selectors are LabelSelectors."""
    if selector is None:
        return False
    if "matchLabels" in selector or "matchExpressions" in selector:
        return k8slib.selector_matches(selector, labels)
    return all(labels.get(k) == v for k, v in selector.items())


def _rand(n: int) -> str:
    alphabet = "bcdfghjklmnpqrstvwxz2456789"  # the API server's name suffix alphabet
    return "".join(secrets.choice(alphabet) for _ in range(n))


def effective_security(pod: dict, container: dict) -> dict:
    """Container securityContext over the pod's, for the fields both levels have."""
    psc = pod.get("securityContext") or {}
    csc = container.get("securityContext") or {}
    merged = {k: psc[k] for k in ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile") if k in psc}
    merged.update(csc)
    return merged


# ---------------------------------------------------------------------------------------------
# The Service stand-in: a TCP forwarder, run with `python3 -c` in the helper image so that
# nothing is mounted from the host. Arguments: LISTEN_PORT=HOST:PORT[,HOST:PORT...] (no
# endpoints: LISTEN_PORT=). One endpoint per connection, round robin; no endpoint or an
# endpoint that refuses: the client's connection is reset (kube-proxy REJECTs, it does not
# retry another endpoint).

FORWARDER_SOURCE = r"""
import itertools, socket, struct, sys, threading

def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass

def reset(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()

def handle(client, endpoint):
    if endpoint is None:
        return reset(client)
    try:
        upstream = socket.create_connection(endpoint, timeout=3)
    except OSError:
        return reset(client)
    upstream.settimeout(None)
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
    back.start()
    pump(client, upstream)
    back.join()
    client.close()
    upstream.close()

def serve(listener, endpoints):
    turn = itertools.cycle(endpoints) if endpoints else itertools.repeat(None)
    while True:
        client, _ = listener.accept()
        threading.Thread(target=handle, args=(client, next(turn)), daemon=True).start()

threads = []
for spec in sys.argv[1:]:
    port, _, targets = spec.partition("=")
    endpoints = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in targets.split(",") if t]
    listener = socket.create_server(("0.0.0.0", int(port)), backlog=256)
    threads.append(threading.Thread(target=serve, args=(listener, endpoints), daemon=True))
    print(f"service_listening port={port} endpoints={targets or '-'}", flush=True)
for t in threads:
    t.start()
print("service_ready", flush=True)
for t in threads:
    t.join()
"""


# ---------------------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    ok: bool
    detail: str
    final: bool = False  # a failure that no amount of waiting can fix (e.g. the port does not exist)

    def __bool__(self) -> bool:
        return self.ok


@dataclass
class Pod:
    name: str
    namespace: Namespace
    workload: dict
    spec: dict  # pod spec (the template's, after our own mutations, if any)
    labels: dict[str, str]
    container_spec: dict
    container: Any = None  # docker Container once created
    index: int = 0

    @property
    def kind(self) -> str:
        return self.workload["kind"]

    # --- state ---

    def reload(self) -> dict:
        self.container.reload()
        return self.container.attrs

    def crashed(self) -> str | None:
        """Why the container is not running normally (exited, restarting), or None."""
        attrs = self.reload()
        state = attrs["State"]
        restarts = int(attrs.get("RestartCount") or 0)
        if state.get("Restarting") or restarts:
            return f"crashed and restarting (restarts={restarts}, status={state.get('Status')})"
        if not state.get("Running"):
            return f"not running: status={state.get('Status')} exit code {state.get('ExitCode')}"
        return None

    def logs(self) -> str:
        return self.container.logs(stdout=True, stderr=True).decode(errors="replace")

    def stop(self) -> int:
        """Terminate as the kubelet does: SIGTERM, SIGKILL after terminationGracePeriodSeconds;
        returns the exit code."""
        grace = int(self.spec.get("terminationGracePeriodSeconds", 30))
        self.container.stop(timeout=grace)
        return int(self.container.wait(timeout=grace + 10)["StatusCode"])

    def host_port(self, container_port: int) -> int:
        ports = self.reload()["NetworkSettings"]["Ports"] or {}
        bindings = ports.get(f"{container_port}/tcp") or []
        for b in bindings:
            if b.get("HostIp") in ("127.0.0.1", "0.0.0.0", ""):
                return int(b["HostPort"])
        raise LookupError(f"pod {self.name}: container port {container_port} is not published")

    def resolve_port(self, port: int | str) -> int | None:
        """A port number, or a named containerPort of this pod's container (None if undeclared)."""
        if isinstance(port, int):
            return port
        if str(port).isdigit():
            return int(port)
        for p in self.container_spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        return None

    def exec(self, command: list[str], timeout: float) -> tuple[int | None, str]:
        """Run a command in the container as its user; (None, ...) when it exceeds the timeout."""
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                out = self.container.exec_run(command, stdout=True, stderr=True, demux=False)
                result["code"], result["output"] = out.exit_code, (out.output or b"").decode(errors="replace")
            except Exception as e:  # a stopped container, an API error: the probe fails
                result["code"], result["output"] = -1, f"{type(e).__name__}: {e}"

        t = threading.Thread(target=run, name=f"exec-{self.name}", daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive():
            return None, f"timed out after {timeout}s"
        return result["code"], result["output"]

    # --- probes ---

    def probe(self, kind: str) -> ProbeResult:
        """Run the container's ``readinessProbe`` / ``livenessProbe`` / ``startupProbe`` once."""
        spec = self.container_spec.get(kind)
        if spec is None:
            raise LookupError(f"pod {self.name} has no {kind}")
        timeout = float(spec.get("timeoutSeconds", 1))
        handlers = {k for k in ("exec", "httpGet", "tcpSocket", "grpc") if k in spec}
        if handlers == {"exec"}:
            code, output = self.exec(list(spec["exec"]["command"]), timeout)
            return ProbeResult(
                code == 0, f"{kind} exec {spec['exec']['command']}: exit {code}: {output.strip()[-500:]}"
            )
        if handlers == {"httpGet"}:
            return self._http_probe(kind, spec["httpGet"], timeout)
        raise NotModelled(f"pod {self.name}: {kind} with {sorted(handlers) or 'no handler'}")

    def _http_probe(self, kind: str, get: dict, timeout: float) -> ProbeResult:
        if get.get("host"):
            raise NotModelled(f"{kind}.httpGet.host")
        port = self.resolve_port(get["port"])
        if port is None:
            return ProbeResult(False, f"{kind}: port {get['port']!r} is not a port of the container", final=True)
        scheme = str(get.get("scheme", "HTTP")).lower()
        try:
            host_port = self.host_port(port)
        except LookupError as e:
            return ProbeResult(False, f"{kind}: {e}")
        url = f"{scheme}://127.0.0.1:{host_port}{get.get('path', '/')}"
        headers = {"User-Agent": "kube-probe/queuekit-tests"}
        headers.update({h["name"]: h["value"] for h in get.get("httpHeaders") or []})
        request = urllib.request.Request(url, headers=headers)
        context = ssl._create_unverified_context() if scheme == "https" else None  # as the kubelet
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=context) as r:
                status = r.status
        except urllib.error.HTTPError as e:
            status = e.code
        except (urllib.error.URLError, OSError) as e:
            return ProbeResult(False, f"{kind} GET {get.get('path')} (container port {port}): {e}")
        return ProbeResult(200 <= status < 400, f"{kind} GET {get.get('path')} (container port {port}): {status}")

    def wait_probe(self, kind: str, timeout: float, interval: float = 0.25) -> ProbeResult:
        """Poll a probe until it succeeds; fail early if the container crashed or restarts."""
        deadline = time.monotonic() + timeout
        last = ProbeResult(False, "never ran")
        while True:
            crash = self.crashed()
            if crash:
                return ProbeResult(False, f"{kind}: container {crash}; last probe: {last.detail}\n{self.tail()}")
            last = self.probe(kind)
            if last or last.final or time.monotonic() >= deadline:
                if not last:
                    waited = "" if last.final else f" (still failing after {timeout}s)"
                    last = ProbeResult(False, f"{last.detail}{waited}\n{self.tail()}", last.final)
                return last
            time.sleep(interval)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.logs()
        except Exception as e:
            return f"[no logs: {e}]"
        return "\n".join(f"    {self.name}| {line}" for line in text.splitlines()[-lines:])


@dataclass
class Namespace:
    """One Kubernetes namespace's worth of rendered objects, run on its own Docker network.

    ``docs``: the rendered objects. ``images``: image repository as written in the manifests
    (e.g. ``queuekit-server``) -> local image reference to run. ``helper_image``: any image with
    python3; it runs the Service forwarders and, never started, carries volumes to fill or read.
    ``hint``: a short word for the Docker names (``qktest-<session>-<hint>-...``).
    Everything is created through tests/support/dockerkit.py, so it carries the session label.
    """

    docs: list[dict]
    images: dict[str, str]
    helper_image: str
    hint: str
    namespace: str = ""
    pods: list[Pod] = field(default_factory=list)
    services: dict[str, Any] = field(default_factory=dict)  # name -> forwarder container
    service_ips: dict[str, str] = field(default_factory=dict)
    containers: list[Any] = field(default_factory=list)
    volumes: list[Any] = field(default_factory=list)
    claims: dict[str, Any] = field(default_factory=dict)
    _network: Any = None

    def __post_init__(self) -> None:
        if not self.namespace:
            namespaces = {d["metadata"].get("namespace") for d in self.docs if d.get("kind") != "Namespace"}
            namespaces.discard(None)
            if len(namespaces) > 1:
                raise NotModelled(f"objects in several namespaces: {sorted(namespaces)}")
            self.namespace = namespaces.pop() if namespaces else "default"

    @property
    def docker(self) -> Any:
        return dk.client()

    @property
    def network(self) -> Any:
        """The namespace's user-defined bridge network, created on first use (planning needs none)."""
        if self._network is None:
            self._network = dk.create_network(self.hint, labels={"queuekit.k8s.namespace": self.namespace})
        return self._network

    @property
    def network_name(self) -> str:
        return self.network.name

    # --- objects ---

    def find(self, kind: str, name: str) -> dict | None:
        found = [d for d in self.docs if d.get("kind") == kind and d["metadata"]["name"] == name]
        return found[0] if found else None

    def _docker_name(self, name: str) -> str:
        return dk.short_name(f"{self.hint}-{name}")

    def _labels(self, **extra: str) -> dict[str, str]:
        return dk.labels({"queuekit.k8s.namespace": self.namespace, **extra})

    # --- pods planned before anything runs, so Services know their endpoints ---

    def plan(self, workload: dict, replicas: int | None = None) -> list[Pod]:
        kind, name = workload["kind"], workload["metadata"]["name"]
        if kind not in WORKLOAD_SPEC_FIELDS:
            raise NotModelled(f"workload kind {kind}")
        spec = workload["spec"]
        _check_fields(f"{kind}/{name} spec", spec, WORKLOAD_SPEC_FIELDS[kind])
        template = spec["template"]
        labels = dict(template["metadata"].get("labels") or {})
        if kind != "Job" or spec.get("manualSelector"):
            if not k8slib.selector_matches(spec["selector"], labels):
                raise PodConfigError(f"{kind}/{name}: selector does not match the template labels (API rejects it)")
        pod_spec = copy.deepcopy(template["spec"])
        _check_fields(f"{kind}/{name} pod spec", pod_spec, POD_FIELDS)
        containers = pod_spec["containers"]
        if len(containers) != 1 or pod_spec.get("initContainers"):
            raise NotModelled(f"{kind}/{name}: only pods with exactly one container are translated")
        container = containers[0]
        _check_fields(f"{kind}/{name} container {container['name']}", container, CONTAINER_FIELDS)
        _check_fields(f"{kind}/{name} pod securityContext", pod_spec.get("securityContext") or {}, POD_SECURITY_FIELDS)
        _check_fields(
            f"{kind}/{name} container securityContext",
            container.get("securityContext") or {},
            CONTAINER_SECURITY_FIELDS,
        )
        if kind == "Job":
            count = 1
        else:
            count = spec.get("replicas", 1) if replicas is None else replicas
        pods = []
        template_hash = _rand(10)
        for i in range(count):
            pod_labels = dict(labels)
            if kind == "StatefulSet":
                pod_name = f"{name}-{i}"
                pod_labels["statefulset.kubernetes.io/pod-name"] = pod_name
                pod_labels["apps.kubernetes.io/pod-index"] = str(i)
            elif kind == "Deployment":
                pod_name = f"{name}-{template_hash}-{_rand(5)}"
                pod_labels["pod-template-hash"] = template_hash
            else:
                pod_name = f"{name}-{_rand(5)}"
                pod_labels["job-name"] = name
                pod_labels["batch.kubernetes.io/job-name"] = name
            pods.append(Pod(pod_name, self, workload, pod_spec, pod_labels, container, index=i))
        return pods

    # --- Services ---

    def start_services(self, planned: list[Pod]) -> None:
        """One forwarder per ClusterIP Service, endpoints from the planned pods' labels."""
        for svc in k8slib.objects(self.docs, "Service"):
            name = svc["metadata"]["name"]
            spec = svc["spec"]
            _check_fields(f"Service/{name} spec", spec, SERVICE_SPEC_FIELDS)
            for port in spec["ports"]:
                _check_fields(f"Service/{name} port", port, SERVICE_PORT_FIELDS)
            if spec.get("type", "ClusterIP") != "ClusterIP":
                raise NotModelled(f"Service/{name} of type {spec.get('type')}")
            if spec.get("selector") is None:
                raise NotModelled(f"Service/{name} without a selector (hand-made Endpoints)")
            if spec.get("sessionAffinity", "None") != "None":
                raise NotModelled(f"Service/{name}: sessionAffinity {spec['sessionAffinity']}")
            if spec.get("clusterIP") == "None":
                continue  # headless: aliases on the pods (see _aliases)
            selected = [p for p in planned if selector_matches(spec.get("selector"), p.labels)]
            args = []
            for port in spec["ports"]:
                if port.get("protocol", "TCP") != "TCP":
                    raise NotModelled(f"Service/{name}: protocol {port['protocol']}")
                target = port.get("targetPort", port["port"])
                endpoints = []
                for pod in selected:
                    resolved = pod.resolve_port(target)
                    if resolved is not None:
                        endpoints.append(f"{pod.name}:{resolved}")
                args.append(f"{int(port['port'])}={','.join(endpoints)}")
            aliases = [name, f"{name}.{self.namespace}", f"{name}.{self.namespace}.svc"]
            aliases.append(f"{name}.{self.namespace}.svc.cluster.local")
            forwarder = dk.start_container(
                self.helper_image,
                f"svc-{name}",
                network=self.network,
                aliases=aliases,
                command=["-c", FORWARDER_SOURCE, *args],
                wait_log=r"^service_ready$",
                wait_timeout=20,
                secure=False,
                entrypoint=["python3"],
                name=self._docker_name(f"svc-{name}"),
                hostname=name[:63],
                labels=self._labels(**{"queuekit.k8s.service": name}),
                user="65534:65534",
                read_only=True,
                cap_drop=["ALL"],
                security_opt=["no-new-privileges:true"],
                restart_policy={"Name": "always"},
            )
            container = dk.raw(forwarder)
            self.containers.append(container)
            self.services[name] = container
            self.service_ips[name] = dk.ip_address(container, self.network)

    # --- pods ---

    def start(self, pod: Pod) -> Pod:
        """Create the pod's volumes and container and start it (PodConfigError if it cannot)."""
        image, run = self._container_args(pod)
        pod.container = dk.raw(dk.start_container(image, pod.name, network=self.network, secure=False, **run))
        self.containers.append(pod.container)
        self.pods.append(pod)
        return pod

    def _aliases(self, pod: Pod) -> list[str]:
        aliases = [pod.name]
        for svc in k8slib.objects(self.docs, "Service"):
            spec = svc["spec"]
            if spec.get("clusterIP") == "None" and selector_matches(spec.get("selector"), pod.labels):
                svc_name = svc["metadata"]["name"]
                aliases += [svc_name, f"{svc_name}.{self.namespace}.svc.cluster.local"]
                subdomain = pod.spec.get("subdomain") or (
                    pod.workload["spec"].get("serviceName") if pod.kind == "StatefulSet" else None
                )
                if subdomain == svc_name:
                    aliases += [f"{pod.name}.{svc_name}", f"{pod.name}.{svc_name}.{self.namespace}.svc.cluster.local"]
        return aliases

    def _image(self, reference: str) -> str:
        repo = reference.split("@", 1)[0]
        if ":" in repo.rsplit("/", 1)[-1]:
            repo = repo.rsplit(":", 1)[0]
        if repo not in self.images:
            raise PodConfigError(
                f"image {reference!r}: repository {repo!r} is not one of the test images {self.images}"
            )
        return self.images[repo]

    def _env(self, pod: Pod) -> dict[str, str]:
        container = pod.container_spec
        env: dict[str, str] = {}
        if pod.spec.get("enableServiceLinks", True):
            env.update(self._service_link_env())
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source or "secretRef" in source:
                ref = source.get("configMapRef") or source.get("secretRef")
                kind = "ConfigMap" if "configMapRef" in source else "Secret"
                data = self._object_data(kind, ref["name"], optional=ref.get("optional", False))
                env.update({prefix + k: v.decode() for k, v in data.items()})
            else:
                raise NotModelled(f"envFrom {source}")
        for item in container.get("env") or []:
            name = item["name"]
            if "value" in item:
                env[name] = expand(str(item["value"]), env)
            elif "valueFrom" in item:
                value = self._value_from(pod, item["valueFrom"])
                if value is not None:
                    env[name] = value
            else:
                env[name] = ""
        return env

    def _value_from(self, pod: Pod, source: dict) -> str | None:
        if "secretKeyRef" in source or "configMapKeyRef" in source:
            ref = source.get("secretKeyRef") or source.get("configMapKeyRef")
            kind = "Secret" if "secretKeyRef" in source else "ConfigMap"
            data = self._object_data(kind, ref["name"], optional=ref.get("optional", False))
            if ref["key"] not in data:
                if ref.get("optional"):
                    return None
                raise PodConfigError(f"couldn't find key {ref['key']} in {kind} {self.namespace}/{ref['name']}")
            return data[ref["key"]].decode()
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            simple = {
                "metadata.name": pod.name,
                "metadata.namespace": self.namespace,
                "spec.nodeName": "docker",
                "spec.serviceAccountName": pod.spec.get("serviceAccountName", "default"),
            }
            if path in simple:
                return simple[path]
            match = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
            if match:
                return pod.labels.get(match.group(1), "")
            raise NotModelled(f"fieldRef {path}")
        raise NotModelled(f"valueFrom {sorted(source)}")

    def _service_link_env(self) -> dict[str, str]:
        env = {}
        for svc in k8slib.objects(self.docs, "Service"):
            name = svc["metadata"]["name"]
            if name not in self.service_ips:
                continue
            ip, key = self.service_ips[name], name.upper().replace("-", "_")
            ports = svc["spec"]["ports"]
            env[f"{key}_SERVICE_HOST"] = ip
            env[f"{key}_SERVICE_PORT"] = str(ports[0]["port"])
            env[f"{key}_PORT"] = f"tcp://{ip}:{ports[0]['port']}"
            for p in ports:
                if p.get("name"):
                    env[f"{key}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
                base = f"{key}_PORT_{p['port']}_TCP"
                env.update({base: f"tcp://{ip}:{p['port']}", f"{base}_PROTO": "tcp"})
                env.update({f"{base}_PORT": str(p["port"]), f"{base}_ADDR": ip})
        return env

    def _object_data(self, kind: str, name: str, optional: bool) -> dict[str, bytes]:
        obj = self.find(kind, name)
        if obj is None:
            if optional:
                return {}
            raise PodConfigError(f'{kind.lower()} "{name}" not found in namespace {self.namespace}')
        if kind == "ConfigMap":
            data = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
            data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        else:
            data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data.update({k: str(v).encode() for k, v in (obj.get("stringData") or {}).items()})
        return data

    def _projected_files(self, kind: str, name: str, source: dict, default_mode: int) -> list[tuple[str, bytes, int]]:
        data = self._object_data(kind, name, optional=source.get("optional", False))
        items = source.get("items")
        if items is None:
            return [(key, value, default_mode) for key, value in sorted(data.items())]
        files = []
        for item in items:
            if item["key"] not in data:
                if source.get("optional"):
                    continue
                raise PodConfigError(
                    f"MountVolume.SetUp failed: couldn't find key {item['key']} in {kind} {self.namespace}/{name}"
                )
            files.append((item["path"], data[item["key"]], item.get("mode", default_mode)))
        return files

    def _fill_volume(self, volume: Any, files: list[tuple[str, bytes, int]], dir_mode: int, gid: int) -> None:
        """Put files into a Docker volume with exact owners and modes, without running anything:
        an unstarted helper container mounts it and receives a tar archive."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            root = tarfile.TarInfo("vol")
            root.type, root.mode, root.uid, root.gid = tarfile.DIRTYPE, dir_mode, 0, gid
            tar.addfile(root)
            for path, content, mode in files:
                if path.startswith("/") or ".." in path.split("/"):
                    raise PodConfigError(f"invalid item path {path!r}")
                parts = path.split("/")
                for depth in range(1, len(parts)):
                    sub = tarfile.TarInfo("vol/" + "/".join(parts[:depth]))
                    sub.type, sub.mode, sub.uid, sub.gid = tarfile.DIRTYPE, dir_mode, 0, gid
                    tar.addfile(sub)
                info = tarfile.TarInfo("vol/" + path)
                info.size, info.mode, info.uid, info.gid = len(content), mode, 0, gid
                tar.addfile(info, io.BytesIO(content))
        helper = self._volume_helper(volume, read_only=False)
        try:
            if not helper.put_archive("/mnt", buf.getvalue()):
                raise RuntimeError(f"could not fill volume {volume.name}")
        finally:
            helper.remove(force=True, v=True)  # v: the image may declare VOLUMEs

    def _volume_mounts(self, pod: Pod) -> tuple[list[Any], dict[str, str]]:
        psc = pod.spec.get("securityContext") or {}
        fs_group = psc.get("fsGroup")
        volumes = {v["name"]: v for v in pod.spec.get("volumes") or []}
        claims = {}
        if pod.kind == "StatefulSet":
            for tpl in pod.workload["spec"].get("volumeClaimTemplates") or []:
                claim = f"{tpl['metadata']['name']}-{pod.workload['metadata']['name']}-{pod.index}"
                claims[tpl["metadata"]["name"]] = claim
        mounts, tmpfs = [], {}
        for vm in pod.container_spec.get("volumeMounts") or []:
            extra = set(vm) - {"name", "mountPath", "readOnly", "mountPropagation"}
            if extra:
                raise NotModelled(f"volumeMount fields {sorted(extra)}")
            name, path, read_only = vm["name"], vm["mountPath"], bool(vm.get("readOnly"))
            if name in volumes:
                volume = volumes[name]
                types = set(volume) - {"name"}
                if types == {"emptyDir"}:
                    size = volume["emptyDir"].get("sizeLimit")
                    options = ["mode=2777" if fs_group is not None else "mode=777"]
                    if fs_group is not None:
                        options.append(f"gid={fs_group}")
                    if size:
                        options.append(f"size={int(quantity(size))}")
                    if read_only:
                        options.append("ro")
                    tmpfs[path] = ",".join(options)
                    continue
                if types == {"persistentVolumeClaim"}:
                    claim = volume["persistentVolumeClaim"]["claimName"]
                    mounts.append(_mount(path, self._claim(claim, fs_group).name, read_only))
                    continue
                files = self._volume_files(volume, types)
                dir_mode = 0o755 | (0o2550 if fs_group is not None else 0)
                files = [(p, c, m | (0o440 if fs_group is not None else 0)) for p, c, m in files]
                docker_volume = self.docker.volumes.create(
                    self._docker_name(f"{pod.name}-{name}"), labels=self._labels(**{"queuekit.k8s.pod": pod.name})
                )
                self.volumes.append(docker_volume)
                self._fill_volume(docker_volume, files, dir_mode, fs_group if fs_group is not None else 0)
                # The kubelet mounts secret/configMap/projected volumes read-only whatever readOnly says.
                mounts.append(_mount(path, docker_volume.name, read_only=True))
            elif name in claims:
                mounts.append(_mount(path, self._claim(claims[name], fs_group).name, read_only))
            else:
                raise PodConfigError(f"volumeMount {name!r}: no such volume in the pod")
        return mounts, tmpfs

    def _volume_files(self, volume: dict, types: set[str]) -> list[tuple[str, bytes, int]]:
        if types == {"secret"}:
            src = volume["secret"]
            return self._projected_files("Secret", src["secretName"], src, src.get("defaultMode", 0o644))
        if types == {"configMap"}:
            src = volume["configMap"]
            return self._projected_files("ConfigMap", src["name"], src, src.get("defaultMode", 0o644))
        if types == {"projected"}:
            default_mode = volume["projected"].get("defaultMode", 0o644)
            files = []
            for source in volume["projected"]["sources"]:
                if set(source) == {"secret"}:
                    src = source["secret"]
                    files += self._projected_files("Secret", src["name"], src, default_mode)
                elif set(source) == {"configMap"}:
                    src = source["configMap"]
                    files += self._projected_files("ConfigMap", src["name"], src, default_mode)
                else:
                    raise NotModelled(f"projected volume source {sorted(source)}")
            return files
        raise NotModelled(f"volume {volume['name']} of type {sorted(types)}")

    def _claim(self, claim: str, fs_group: int | None) -> Any:
        """A PVC as a named Docker volume; fsGroup applied to its root as the kubelet does."""
        volume = self.claims.get(claim)
        if volume is None:
            volume = self.docker.volumes.create(
                self._docker_name(f"pvc-{claim}"), labels=self._labels(**{"queuekit.k8s.pvc": claim})
            )
            self.volumes.append(volume)
            self.claims[claim] = volume
        if fs_group is not None:
            self._fill_volume(volume, [], 0o2775, fs_group)
        return volume

    def _container_args(self, pod: Pod) -> tuple[str, dict[str, Any]]:
        c = pod.container_spec
        image = self._image(c["image"])
        image_config = self.docker.images.get(image).attrs["Config"]
        env = self._env(pod)
        # command replaces the entrypoint (and drops the image's CMD); args replace the CMD.
        if "command" in c:
            entrypoint = [expand(str(a), env) for a in c["command"]]
            cmd = [expand(str(a), env) for a in c.get("args") or []]
        else:
            entrypoint = list(image_config.get("Entrypoint") or [])
            cmd = [expand(str(a), env) for a in c["args"]] if "args" in c else list(image_config.get("Cmd") or [])
        if not entrypoint and not cmd:
            raise PodConfigError(f"pod {pod.name}: no command to run")

        sc = effective_security(pod.spec, c)
        psc = pod.spec.get("securityContext") or {}
        user = self._user(pod, sc, image_config)
        groups = [
            str(g) for g in ([psc["fsGroup"]] if "fsGroup" in psc else []) + list(psc.get("supplementalGroups") or [])
        ]
        caps = sc.get("capabilities") or {}
        security_opt = []
        if sc.get("allowPrivilegeEscalation") is False:
            if sc.get("privileged"):
                raise PodConfigError("privileged with allowPrivilegeEscalation false is invalid")
            security_opt.append("no-new-privileges:true")
        seccomp = (sc.get("seccompProfile") or {}).get("type", "RuntimeDefault")
        if seccomp == "Unconfined":
            security_opt.append("seccomp=unconfined")
        elif seccomp != "RuntimeDefault":
            raise NotModelled(f"seccompProfile {seccomp}")
        if sc.get("procMount", "Default") != "Default":
            raise NotModelled(f"procMount {sc['procMount']}")

        resources = c.get("resources") or {}
        limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
        extra_resources = set(limits) | set(requests)
        if extra_resources - {"cpu", "memory", "ephemeral-storage"}:
            raise NotModelled(f"resources {sorted(extra_resources)}")
        run: dict[str, Any] = {}
        if "cpu" in limits:
            run["nano_cpus"] = int(quantity(limits["cpu"]) * 1e9)
        if "memory" in limits:
            run["mem_limit"] = int(quantity(limits["memory"]))
        if "cpu" in requests:
            run["cpu_shares"] = max(2, int(quantity(requests["cpu"]) * 1024))

        publish: set[int] = set()
        for p in c.get("ports") or []:
            if p.get("protocol", "TCP") != "TCP" or p.get("hostPort"):
                raise NotModelled(f"container port {p}")
            publish.add(int(p["containerPort"]))
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            get = (c.get(kind) or {}).get("httpGet")
            if get:
                resolved = pod.resolve_port(get["port"])
                if resolved is not None:
                    publish.add(resolved)

        mounts, tmpfs = self._volume_mounts(pod)
        if pod.kind != "Job" and pod.spec.get("restartPolicy", "Always") != "Always":
            raise PodConfigError(f"{pod.kind} pods must have restartPolicy Always")
        run.update(
            aliases=self._aliases(pod),
            env=env,
            command=cmd,
            publish=sorted(publish),
            tmpfs=tmpfs,
            entrypoint=entrypoint,
            name=self._docker_name(pod.name),
            hostname=(pod.spec.get("hostname") or pod.name)[:63],
            working_dir=c.get("workingDir"),
            user=user,
            group_add=groups or None,
            read_only=bool(sc.get("readOnlyRootFilesystem")),
            cap_drop=list(caps.get("drop") or []) or None,
            cap_add=list(caps.get("add") or []) or None,
            privileged=bool(sc.get("privileged")),
            security_opt=security_opt or None,
            mounts=mounts,
            labels=self._labels(
                **{
                    "queuekit.k8s.pod": pod.name,
                    "queuekit.k8s.workload": f"{pod.kind}/{pod.workload['metadata']['name']}",
                }
            ),
            stop_signal="SIGTERM",
            restart_policy={"Name": "no"} if pod.kind == "Job" else {"Name": "always"},
            stdin_open=bool(c.get("stdin")),
            tty=bool(c.get("tty")),
        )
        return image, run

    def _user(self, pod: Pod, sc: dict, image_config: dict) -> str | None:
        image_user = str(image_config.get("User") or "")
        image_uid, _, image_gid = image_user.partition(":")
        uid = sc.get("runAsUser")
        gid = sc.get("runAsGroup")
        if sc.get("runAsNonRoot"):
            if uid is None and not image_uid.isdigit():
                raise PodConfigError(
                    f"pod {pod.name}: runAsNonRoot and image has non-numeric user ({image_user or 'root'}), "
                    "cannot verify user is non-root"
                )
            if (uid if uid is not None else int(image_uid)) == 0:
                raise PodConfigError(f"pod {pod.name}: container's runAsUser breaks non-root policy")
        if uid is None and gid is None:
            return None
        if uid is None:
            return f"{image_uid or 0}:{gid}"
        return f"{uid}:{gid}" if gid is not None else str(uid)

    # --- controllers ---

    def run_job(self, job: dict, timeout: float) -> Pod:
        """Run a Job to completion: a new pod per failure, up to backoffLimit; returns the pod
        that succeeded, or raises AssertionError with the last pod's logs."""
        spec = job["spec"]
        if spec.get("completions", 1) != 1 or spec.get("parallelism", 1) != 1:
            raise NotModelled("Jobs with completions/parallelism other than 1")
        restart = spec["template"]["spec"].get("restartPolicy")
        if restart not in ("Never", "OnFailure"):
            raise PodConfigError(f"Job restartPolicy must be Never or OnFailure, is {restart!r}")
        limit = min(timeout, float(spec.get("activeDeadlineSeconds", timeout)))
        deadline = time.monotonic() + limit
        attempts = int(spec.get("backoffLimit", 6)) + 1
        last = None
        for _ in range(attempts):
            (pod,) = self.plan(job)
            self.start(pod)
            last = pod
            try:
                result = pod.container.wait(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # the client's read timeout: the deadline passed
                raise AssertionError(
                    f"Job/{job['metadata']['name']}: pod {pod.name} still running after {limit:.0f}s\n{pod.tail()}"
                ) from None
            if result.get("StatusCode") == 0:
                return pod
            if time.monotonic() >= deadline:
                break
        raise AssertionError(
            f"Job/{job['metadata']['name']} failed (backoffLimit {attempts - 1}); last pod {last.name}:\n{last.tail()}"
        )

    def start_workload(self, pods: list[Pod], ready_timeout: float = 30.0) -> list[Pod]:
        """Start planned pods. StatefulSet pods with the OrderedReady policy (the default) start
        one after the other, each once the previous one is ready."""
        for i, pod in enumerate(pods):
            self.start(pod)
            ordered = pod.kind == "StatefulSet" and pod.workload["spec"].get("podManagementPolicy") != "Parallel"
            if ordered and i + 1 < len(pods) and "readinessProbe" in pod.container_spec:
                result = pod.wait_probe("readinessProbe", ready_timeout)
                if not result:
                    raise AssertionError(f"StatefulSet pod {pod.name} never became ready: {result.detail}")
        return pods

    def _volume_helper(self, volume: Any, *, read_only: bool) -> Any:
        """An unstarted container with ``volume`` at /mnt/vol, to copy files in or out of it."""
        return self.docker.containers.create(
            self.helper_image,
            ["true"],
            entrypoint=[],
            labels=self._labels(),
            network_mode="none",
            mounts=[_mount("/mnt/vol", volume.name, read_only=read_only)],
        )

    def read_volume(self, volume: Any) -> dict[str, tarfile.TarInfo]:
        """Entries at the root of a Docker volume, read through an unstarted helper container."""
        helper = self._volume_helper(volume, read_only=True)
        try:
            stream, _ = helper.get_archive("/mnt/vol")
            data = b"".join(stream)
        finally:
            helper.remove(force=True, v=True)  # v: the image may declare VOLUMEs
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            return {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}

    def cleanup(self) -> list[str]:
        """Remove every container and volume this namespace created; returns errors, if any."""
        errors = []
        for container in reversed(self.containers):
            try:
                container.remove(force=True, v=True)
            except Exception as e:
                if "No such container" not in str(e):
                    errors.append(f"container {container.name}: {e}")
        for volume in self.volumes:
            for _ in range(20):
                try:
                    volume.remove(force=True)
                    break
                except Exception as e:
                    if "no such volume" in str(e).lower():
                        break
                    last = e
                    time.sleep(0.1)
            else:
                errors.append(f"volume {volume.name}: {last}")
        if self._network is not None:
            try:
                self._network.remove()
            except Exception as e:
                if "not found" not in str(e).lower():
                    errors.append(f"network {self._network.name}: {e}")
        return errors


def _mount(target: str, source: str, read_only: bool) -> Any:
    from docker.types import Mount

    return Mount(target, source, type="volume", read_only=read_only, no_copy=True)
