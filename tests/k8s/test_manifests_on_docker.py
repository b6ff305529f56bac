"""Manifests executed on Docker: proves the manifests' wiring, not scheduling, PVC binding or
NetworkPolicy enforcement.

There is no Kubernetes cluster here. These tests take the RENDERED dev overlay (``kubectl
kustomize k8s/overlays/dev`` of a copy of k8s/ holding a throwaway key, see conftest.py) and run
every workload's pod spec as containers on a Docker network of their own, through the
translation in k8s_docker.py (read its docstring for the field-by-field mapping and for what it
does not model): the manifest's image (retagged to this session's test images), command, args,
env, the keys Secret as files named after its keys at the volumeMount's mountPath with the
kubelet's modes and fsGroup ownership (the server: every role key as its keys directory; each
consumer: only the consumer key, at the authkey path), the Services as forwarders carrying the Service name
with port -> targetPort, ``replicas`` containers, the Job run to completion, the securityContext
(user, groups, read-only root filesystem, dropped capabilities, no-new-privileges), emptyDirs as
tmpfs and the volumeClaimTemplate as a labelled Docker volume.

test_manifests_run_end_to_end_on_docker
    producer Job -> Service -> server StatefulSet -> Service -> consumer Deployment: the Job's
    ``produced=N`` equals the server's ``acked`` count on that queue, the demo handler logged
    ``event=example_task n=`` for every task, on both replicas; every probe (startup, readiness,
    liveness; exec and httpGet) succeeds against the running containers, before and after; the
    journal is on the claim's volume; each container really runs as the manifest says, and holds
    the keys of its role only (compared by digest inside the container: a consumer holding the
    producer or admin key fails).
test_negative_control_*
    The same flow, made small, with ONE drift applied in memory to the rendered objects (Secret
    key, mountPath, Service port/targetPort/selector/name, container port name, env var name or
    value, probe path or port, fsGroup, image name): each must fail, at the stage expected, within
    a bounded time; an unmutated baseline run in the same batch must pass. They run concurrently.
test_consumer_replicas_scale_on_docker
    The consumer Deployment with 1, then 3 replicas (replicas overridden, QUEUEKIT_PREFETCH=1 so
    no replica hoards) drains the same 600 tasks of 20 ms at least 2.5x faster with 3.

What this does NOT prove (only a real cluster can): scheduling and resource requests, PVC
binding and StorageClasses, NetworkPolicy enforcement (Docker does not filter between
containers of a network), Pod Security admission (checked statically in test_k8s_workloads.py),
readiness gating of Service endpoints, probe timing (periods, delays, thresholds, liveness
restarts), rolling updates, PodDisruptionBudgets, KEDA, image pulls.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import k8slib
import pytest
from k8s_docker import Namespace, Pod, PodConfigError, effective_security
from k8slib import one, pod_spec, the_container

import queuekit
from queuekit import QueuekitError

pytestmark = pytest.mark.k8s

OVERLAY = "dev"
SERVER = ("StatefulSet", "queuekit-server")
CONSUMER = ("Deployment", "queuekit-consumer")
PRODUCER = ("Job", "queuekit-producer")
SERVICE = "queuekit-server"
KEYS_VOLUME = "keys"  # the server's: the whole Secret, its QUEUEKIT_KEYS_DIR
AUTHKEY_VOLUME = "authkey"  # a consumer's or the producer's: its role's key only


@dataclass(frozen=True)
class Budgets:
    """How long (seconds) a stage may take before it counts as failed. A crashed or restarting
    container, or a probe that can never succeed (its port does not exist), fails at once."""

    server_start: float = 30.0  # startupProbe success
    server_ready: float = 30.0  # then readinessProbe success
    consumer_ready: float = 20.0  # each consumer's readinessProbe (`consume --probe ready`: connected to the server)
    job: float = 60.0  # the producer Job, retries included
    flow: float = 60.0  # after the Job: acked == produced


FLOW_BUDGETS = Budgets()
# The controls' stacks are small (one consumer, 10 tasks) and healthy ones take a few seconds per
# stage even with the whole batch running at once; the unmutated baseline, run with the same
# budgets in the same batch, shows they are enough.
CONTROL_BUDGETS = Budgets(server_start=20, server_ready=12, consumer_ready=12, job=30, flow=12)
# Every stage is bounded, so is a run: a control must have failed within its budgets plus time for
# the Docker operations (they typically fail in 3-20 s).
CONTROL_BOUND = sum(dataclasses.astuple(CONTROL_BUDGETS)) + 30.0
CONTROL_TASKS = 10  # the controls' producer makes this many demo tasks instead of the manifest's
CONTROL_WORKERS = 5

STAGES = (
    "plan", "services", "start", "server-startup", "server-probes", "consumer-probes", "producer",
    "flow", "handler-logs", "durable", "pod-runtime", "probes-again", "done",
)  # fmt: skip

PRODUCED = re.compile(r"^produced=(\d+) queue=(\S+)$", re.MULTILINE)
EXAMPLE_TASK = re.compile(r"^ts=(\S+) .*event=example_task n=(\d+)\b", re.MULTILINE)


# ---------------------------------------------------------------------------------------------
# Fixtures and small helpers


@pytest.fixture(scope="module")
def key_file(renders, tmp_path_factory) -> Path:
    """The throwaway admin key the Secret was rendered with, for the test's own host-side client
    (it puts tasks and reads stats)."""
    path = tmp_path_factory.mktemp("k8s-docker-key") / "authkey"
    path.write_bytes(renders.key)
    path.chmod(0o600)
    return path


def fresh_docs(renders) -> list[dict]:
    return copy.deepcopy(renders.docs[OVERLAY])


def container_of(docs: list[dict], workload: tuple[str, str]) -> dict:
    return the_container(one(docs, *workload))


def env_item(container: dict, name: str) -> dict:
    found = [e for e in container.get("env") or [] if e["name"] == name]
    assert len(found) == 1, f"container {container['name']}: env {name} not found exactly once"
    return found[0]


def mount_of(container: dict, volume: str) -> dict:
    found = [m for m in container.get("volumeMounts") or [] if m["name"] == volume]
    assert len(found) == 1, f"container {container['name']}: no single volumeMount of {volume}"
    return found[0]


def keys_secret(docs: list[dict]) -> dict:
    """The Secret the server's keys volume refers to."""
    volume = next(v for v in pod_spec(one(docs, *SERVER))["volumes"] if v["name"] == KEYS_VOLUME)
    return one(docs, "Secret", volume["secret"]["secretName"])


def service_port(docs: list[dict], name: str) -> dict:
    return next(p for p in one(docs, "Service", SERVICE)["spec"]["ports"] if p["name"] == name)


def parse_ts(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def connect(pod: Pod, key_file: Path):
    """A host-side client to the server pod, through its manager port published on 127.0.0.1."""
    return queuekit.connect(
        f"127.0.0.1:{pod.host_port(k8slib.MANAGER_PORT)}", authkey_file=str(key_file), connect_timeout=10
    )


def wait_for(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# One run of the rendered objects, stage by stage


@dataclass
class Run:
    name: str
    _stage: str = "plan"
    ok: bool = False
    detail: str = ""
    seconds: float = 0.0
    facts: dict = field(default_factory=dict)
    error: BaseException | None = None  # anything but a wiring failure: re-raised by the test
    error_trace: str = ""
    timings: dict = field(default_factory=dict)  # stage -> seconds since the run started
    started: float = field(default_factory=time.monotonic)

    @property
    def stage(self) -> str:
        return self._stage

    @stage.setter
    def stage(self, value: str) -> None:
        assert value in STAGES, value
        self.timings[self._stage] = round(time.monotonic() - self.started, 1)
        self._stage = value


def _raise_error(run: Run) -> None:
    if run.error is not None:
        raise AssertionError(f"{run.name}: broke outside the wiring checks:\n{run.error_trace}") from run.error


def require(result, stage_detail: str = "") -> None:
    if not result:
        raise AssertionError(f"{stage_detail}{getattr(result, 'detail', result)}")


def execute(docs, images, key_file, hint, budgets: Budgets, *, thorough=False, keys=None) -> Run:
    """Run server StatefulSet, consumer Deployment and producer Job from ``docs`` and check the
    flow. A wiring failure ends the run at its stage (``ok`` false, ``stage``, ``detail``);
    anything else (a NotModelled field, a bug here) is kept in ``error`` for the test to raise."""
    run = Run(hint)
    started = time.monotonic()
    ns = None
    try:
        ns = Namespace(docs, images, helper_image=images["queuekit-server"], hint=hint)
        _stages(ns, run, key_file, budgets, thorough=thorough, keys=keys)
        run.ok, run.stage = True, "done"
    except (AssertionError, PodConfigError, QueuekitError) as e:
        run.detail = f"{type(e).__name__}: {e}"
    except Exception as e:  # reported by the test, with its traceback
        run.error, run.error_trace = e, traceback.format_exc()
    finally:
        run.seconds = round(time.monotonic() - started, 1)
        if ns is not None:
            errors = ns.cleanup()
            if errors:
                run.facts["cleanup_errors"] = errors
    return run


def _stages(ns: Namespace, run: Run, key_file: Path, budgets: Budgets, *, thorough: bool, keys=None) -> None:
    docs = ns.docs
    run.stage = "plan"
    servers = ns.plan(one(docs, *SERVER))
    consumers = ns.plan(one(docs, *CONSUMER))
    job = one(docs, *PRODUCER)

    run.stage = "services"
    ns.start_services(servers + consumers)

    run.stage = "start"  # like `kubectl apply`: everything at once, nobody waits for anybody
    ns.start_workload(servers)
    ns.start_workload(consumers)

    run.stage = "server-startup"
    for pod in servers:
        if "startupProbe" in pod.container_spec:
            require(pod.wait_probe("startupProbe", budgets.server_start), f"{pod.name}: ")

    run.stage = "server-probes"
    for pod in servers:
        require(pod.wait_probe("readinessProbe", budgets.server_ready), f"{pod.name}: ")
        require(pod.probe("livenessProbe"), f"{pod.name}: ")

    run.stage = "consumer-probes"
    for pod in consumers:
        require(pod.wait_probe("readinessProbe", budgets.consumer_ready), f"{pod.name}: ")
        require(pod.probe("livenessProbe"), f"{pod.name}: ")

    run.stage = "producer"
    producer = ns.run_job(job, budgets.job)
    match = PRODUCED.search(producer.logs())
    assert match, f"the producer did not print produced=N queue=Q:\n{producer.tail()}"
    produced, queue = int(match.group(1)), match.group(2)
    assert produced > 0
    run.facts.update(produced=produced, queue=queue, producer_pod=producer.name)

    run.stage = "flow"
    client = connect(servers[0], key_file)
    try:

        def acked() -> int:
            return client.stats()["queues"].get(queue, {}).get("acked", 0)

        wait_for(lambda: acked() >= produced, budgets.flow, 0.1)
        stats = client.stats()
    finally:
        client.close()
    counts = stats["queues"].get(queue, {})
    run.facts["server_queue"] = {k: counts.get(k) for k in ("enqueued", "acked", "ready", "inflight", "dead")}
    assert counts.get("acked") == produced, (
        f"queue {queue}: acked={counts.get('acked')} != produced={produced} after {budgets.flow}s; "
        f"server counts {stats['queues']}\n" + "\n".join(p.tail() for p in consumers)
    )
    assert counts.get("enqueued") == produced and counts.get("dead") == 0, counts

    run.stage = "handler-logs"
    per_pod = {p.name: [int(n) for _, n in EXAMPLE_TASK.findall(p.logs())] for p in consumers}
    seen = sorted(n for ns_ in per_pod.values() for n in ns_)
    run.facts["example_task_lines"] = {name: len(ns_) for name, ns_ in per_pod.items()}
    assert set(seen) == set(range(produced)), f"handler log lines n= cover {len(set(seen))}/{produced} tasks"
    if len(consumers) > 1:
        idle = [name for name, ns_ in per_pod.items() if not ns_]
        assert not idle, f"replicas that handled nothing (not reached through the Service?): {idle}"

    run.stage = "durable"
    assert stats["durable"] is True, "the server runs without a journal (QUEUEKIT_DATA_DIR)"
    for pod in servers:
        claims = [c for c in ns.claims if c.endswith(f"-{pod.name}")]
        assert claims, f"{pod.name}: no PersistentVolumeClaim"
        entries = {name: info for c in claims for name, info in ns.read_volume(ns.claims[c]).items()}
        run.facts["claim_files"] = sorted(entries)
        assert "queuekit.db" in entries, f"{pod.name}: the journal is not on the claim's volume: {sorted(entries)}"

    if not thorough:  # the controls stop here: they are about the wiring, and must be quick
        return
    run.stage = "pod-runtime"
    run.facts["runtime"] = {p.name: check_runtime_facts(p, keys) for p in servers + consumers}

    run.stage = "probes-again"
    for pod in servers + consumers:
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind in pod.container_spec:
                require(pod.probe(kind), f"{pod.name}: ")


# What the kernel says about a process started in the container (docker exec starts it with the
# container's user and security settings, like the pod's own process).
RUNTIME_SCRIPT = r"""
import hashlib, json, os, sys
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
try:
    with open("/.k8s-docker-write-test", "w"):
        pass
    rootfs_writable = True
except OSError:
    rootfs_writable = False
files = {}
for path in sys.argv[1:]:
    st = os.stat(path)
    readable = os.access(path, os.R_OK)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest() if readable else None
    files[path] = {"mode": st.st_mode & 0o7777, "uid": st.st_uid, "gid": st.st_gid, "readable": readable,
                   "sha256": digest}
secret_dirs = sorted({os.path.dirname(p) for p in sys.argv[1:]})
listed = {d: sorted(n for n in os.listdir(d) if not n.startswith(".")) for d in secret_dirs}
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
    "cap_eff": status["CapEff"].strip(), "no_new_privs": status.get("NoNewPrivs", "").strip(),
    "rootfs_writable": rootfs_writable, "files": files, "listed": listed,
}))
"""


def check_runtime_facts(pod: Pod, keys: dict[str, bytes] | None = None) -> dict:
    """The securityContext and the Secret files as the running container sees them, compared
    with what the pod spec asks for; with ``keys`` (the rendered Secret's keys), also which role
    keys the container holds: the server all of them, a consumer only the consumer key."""
    c = pod.container_spec
    sc = effective_security(pod.spec, c)
    fs_group = (pod.spec.get("securityContext") or {}).get("fsGroup")
    volumes = {v["name"]: v for v in pod.spec.get("volumes") or []}
    expected_files = {}
    for vm in c.get("volumeMounts") or []:
        secret = volumes.get(vm["name"], {}).get("secret")
        if secret:
            items = secret.get("items") or [{"key": k, "path": k} for k in k8slib.ROLE_KEYS.values()]
            for item in items:
                mode = item.get("mode", secret.get("defaultMode", 0o644)) | (0o440 if fs_group is not None else 0)
                expected_files[f"{vm['mountPath']}/{item['path']}"] = mode
    code, output = pod.exec(["python3", "-c", RUNTIME_SCRIPT, *expected_files], timeout=20)
    assert code == 0, f"{pod.name}: runtime probe failed ({code}): {output}"
    facts = json.loads(output.strip().splitlines()[-1])
    problems = []
    if facts["uid"] != sc["runAsUser"] or facts["gid"] != sc["runAsGroup"]:
        problems.append(f"runs as {facts['uid']}:{facts['gid']}, manifest says {sc['runAsUser']}:{sc['runAsGroup']}")
    if fs_group is not None and fs_group not in facts["groups"]:
        problems.append(f"fsGroup {fs_group} not among the process's groups {facts['groups']}")
    if facts["rootfs_writable"] == bool(sc.get("readOnlyRootFilesystem")):
        problems.append(f"root filesystem writable={facts['rootfs_writable']}")
    if "ALL" in ((sc.get("capabilities") or {}).get("drop") or []) and int(facts["cap_eff"], 16) != 0:
        problems.append(f"effective capabilities {facts['cap_eff']} despite drop ALL")
    if sc.get("allowPrivilegeEscalation") is False and facts["no_new_privs"] != "1":
        problems.append("no_new_privs is not set despite allowPrivilegeEscalation: false")
    for path, mode in expected_files.items():
        got = facts["files"][path]
        if (got["mode"], got["uid"], got["gid"]) != (mode, 0, fs_group if fs_group is not None else 0):
            problems.append(f"{path}: mode {oct(got['mode'])} owner {got['uid']}:{got['gid']}, expected {oct(mode)}")
        if not got["readable"]:
            problems.append(f"{path} is not readable by the container's user")
    if keys is not None:
        by_digest = {hashlib.sha256(v).hexdigest(): k for k, v in keys.items()}
        held = sorted(by_digest.get(f["sha256"], "an unknown key") for f in facts["files"].values())
        component = pod.labels.get("app.kubernetes.io/component")
        want = sorted(keys) if component == "server" else [k8slib.ROLE_KEYS[component]]
        if held != want:
            problems.append(f"holds {held}, its role ({component}) must hold exactly {want}")
        for directory, names in facts["listed"].items():
            if component != "server" and names != [os.path.basename(p) for p in expected_files]:
                problems.append(f"{directory} holds {names}: more than its key")
    assert not problems, f"{pod.name}: " + "; ".join(problems)
    return facts


# ---------------------------------------------------------------------------------------------
# Item 4: the flow, end to end


def test_manifests_run_end_to_end_on_docker(renders, docker_images, key_file):
    """The dev overlay exactly as rendered: producer Job -> server <- consumers, probes, journal."""
    docs = fresh_docs(renders)
    run = execute(docs, docker_images, key_file, "flow", FLOW_BUDGETS, thorough=True, keys=renders.keys)
    _raise_error(run)
    print(f"\nflow: {run.stage} in {run.seconds}s (stage ends {run.timings}): {json.dumps(run.facts)}")
    assert run.ok, f"stage {run.stage!r} failed after {run.seconds}s: {run.detail}"
    args = container_of(docs, PRODUCER)["args"]
    assert run.facts["produced"] == int(args[args.index("--generate") + 1]), "the Job's own task count"
    replicas = one(docs, *CONSUMER)["spec"]["replicas"]
    assert len(run.facts["example_task_lines"]) == replicas, f"expected {replicas} consumer pods"
    assert not run.facts.get("cleanup_errors"), run.facts["cleanup_errors"]


# ---------------------------------------------------------------------------------------------
# Item 4: negative controls. Each mutates the rendered objects in memory (never the work tree)
# the way a careless edit of the manifests would, and says where the flow must break.


def _small(docs: list[dict]) -> None:
    args = container_of(docs, PRODUCER)["args"]
    args[args.index("--generate") + 1] = str(CONTROL_TASKS)


def _rename_secret_key(docs, *, in_pods: bool) -> None:
    """The consumer key renamed to ``authkey`` in the Secret (not a ``<role>.<label>`` name, so the
    server must refuse its keys directory), and in the consumers' items too (``in_pods``), or not
    (the consumers then ask for a key the Secret lacks)."""
    secret = keys_secret(docs)
    old = k8slib.ROLE_KEYS["consumer"]
    secret["data"]["authkey"] = secret["data"].pop(old)
    if in_pods:
        for w in k8slib.workloads(docs):
            for v in pod_spec(w).get("volumes") or []:
                for item in (v.get("secret") or {}).get("items") or []:
                    if item["key"] == old:
                        item["key"] = "authkey"


def _service_spec(docs):
    return one(docs, "Service", SERVICE)["spec"]


def _server_port(docs, name):
    return next(p for p in container_of(docs, SERVER)["ports"] if p["name"] == name)


CONTROLS = {
    # name: (mutation, stage where the flow must break)
    "secret-key-renamed": (lambda d: _rename_secret_key(d, in_pods=True), "server-startup"),
    "secret-key-missing": (lambda d: _rename_secret_key(d, in_pods=False), "start"),
    "authkey-mountpath-server": (
        lambda d: mount_of(container_of(d, SERVER), KEYS_VOLUME).update(mountPath="/run/secret"),
        "server-startup",
    ),
    "authkey-mountpath-consumer": (
        lambda d: mount_of(container_of(d, CONSUMER), AUTHKEY_VOLUME).update(mountPath="/etc/queuekit"),
        "consumer-probes",
    ),
    "no-fsgroup-server": (lambda d: pod_spec(one(d, *SERVER))["securityContext"].pop("fsGroup"), "server-startup"),
    "server-keys-dir-env": (
        lambda d: env_item(container_of(d, SERVER), "QUEUEKIT_KEYS_DIR").update(value="/run/secrets"),
        "server-startup",
    ),
    "consumer-key-not-in-server": (
        lambda d: next(v for v in pod_spec(one(d, *SERVER))["volumes"] if v["name"] == KEYS_VOLUME)["secret"].update(
            items=[
                {"key": "admin.default", "path": "admin.default"},
                {"key": "producer.default", "path": "producer.default"},
            ]
        ),
        "consumer-probes",
    ),
    "consumer-env-server-port": (
        lambda d: env_item(container_of(d, CONSUMER), "QUEUEKIT_SERVER").update(value=f"{SERVICE}:50001"),
        "consumer-probes",
    ),
    "consumer-env-server-renamed": (
        lambda d: env_item(container_of(d, CONSUMER), "QUEUEKIT_SERVER").update(name="QUEUEKIT_SERVER_ADDRESS"),
        "consumer-probes",
    ),
    "service-port": (lambda d: service_port(d, "manager").update(port=50001), "consumer-probes"),
    "service-target-port": (lambda d: service_port(d, "manager").update(targetPort=50001), "consumer-probes"),
    "server-port-name": (lambda d: _server_port(d, "manager").update(name="mgr"), "consumer-probes"),
    "service-selector": (
        lambda d: _service_spec(d)["selector"].update({"app.kubernetes.io/component": "queue-server"}),
        "consumer-probes",
    ),
    "service-name": (lambda d: one(d, "Service", SERVICE)["metadata"].update(name="queuekit"), "consumer-probes"),
    "producer-env-queue": (
        lambda d: env_item(container_of(d, PRODUCER), "QUEUEKIT_QUEUE").update(value="other"),
        "flow",
    ),
    "data-mountpath": (lambda d: mount_of(container_of(d, SERVER), "data").update(mountPath="/data"), "durable"),
    "readiness-path": (
        lambda d: container_of(d, SERVER)["readinessProbe"]["httpGet"].update(path="/ready"),
        "server-probes",
    ),
    "startup-probe-port": (
        lambda d: container_of(d, SERVER)["startupProbe"]["httpGet"].update(port="health"),
        "server-startup",
    ),
    "consumer-image": (
        lambda d: container_of(d, CONSUMER).update(image="queuekit-worker:latest"),
        "start",
    ),
}


@pytest.fixture(scope="module")
def control_runs(renders, docker_images, key_file) -> dict[str, Run]:
    """Every control, plus the unmutated baseline, run concurrently (each on its own network)."""

    def one_run(name: str) -> Run:
        docs = fresh_docs(renders)
        _small(docs)
        if name != "baseline":
            CONTROLS[name][0](docs)
        return execute(docs, docker_images, key_file, f"ctl-{name}", CONTROL_BUDGETS)

    # Longest first (those that wait out a budget), so that the pool's last wave is short.
    slow = {"consumer-probes": 0, "flow": 0, "server-probes": 1, "durable": 2}
    names = sorted(["baseline", *CONTROLS], key=lambda n: slow.get(CONTROLS[n][1], 3) if n in CONTROLS else 1)
    with ThreadPoolExecutor(max_workers=CONTROL_WORKERS, thread_name_prefix="control") as pool:
        futures = {name: pool.submit(one_run, name) for name in names}
        runs = {name: futures[name].result() for name in ["baseline", *CONTROLS]}
    print("\nnegative controls (stage reached, seconds):")
    for name, run in runs.items():
        print(f"  {name:28} ok={run.ok!s:5} stage={run.stage:16} {run.seconds:5.1f}s  {run.detail[:110]!r}")
        if run.facts.get("cleanup_errors"):
            print(f"  {'':28} cleanup errors (the session sweep retries): {run.facts['cleanup_errors']}")
    return runs


def test_negative_control_baseline_passes(control_runs):
    """The controls only mean something if the same small run, unmutated, goes through."""
    run = control_runs["baseline"]
    _raise_error(run)
    assert run.ok, f"baseline failed at {run.stage!r} after {run.seconds}s: {run.detail}"
    assert run.facts["produced"] == CONTROL_TASKS


@pytest.mark.parametrize("control", list(CONTROLS))
def test_negative_control_breaks_the_flow(control_runs, control):
    run = control_runs[control]
    _raise_error(run)
    expected_stage = CONTROLS[control][1]
    assert not run.ok, f"{control}: the drifted manifests still ran end to end: {run.facts}"
    assert run.stage == expected_stage, f"{control}: broke at {run.stage!r}, expected {expected_stage!r}: {run.detail}"
    assert run.seconds < CONTROL_BOUND, f"{control}: took {run.seconds}s to fail"


# ---------------------------------------------------------------------------------------------
# Item 5: scaling


SCALE_TASKS = 600
SCALE_TASK_MS = 20
SCALE_MIN_RATIO = 2.5


def test_consumer_replicas_scale_on_docker(renders, docker_images, key_file):
    """1, then 3 consumer replicas (the Deployment's pod spec, replicas overridden) drain the same
    sleep-bound workload; with QUEUEKIT_PREFETCH=1 each replica holds at most 2 tasks.

    The speed-up asserted is on the time from the put to the last handler finishing (the consumers'
    ``example_task`` log timestamps; containers share the host's clock). The time until the server
    has counted the last ack is reported too: it adds an almost constant ~1 s, because a worker
    sends its acks with its next fetch, which waits up to 1 s on an emptied queue, whatever the
    replica count.
    """
    docs = fresh_docs(renders)
    consumer_spec = container_of(docs, CONSUMER)
    consumer_spec["env"].append({"name": "QUEUEKIT_PREFETCH", "value": "1"})
    queue_name = env_item(consumer_spec, "QUEUEKIT_QUEUE")["value"]
    ns = Namespace(docs, docker_images, helper_image=docker_images["queuekit-server"], hint="scale")
    results: dict[int, dict] = {}
    client = None
    try:
        servers = ns.plan(one(docs, *SERVER))
        ns.start_services(servers)
        ns.start_workload(servers)
        require(servers[0].wait_probe("readinessProbe", FLOW_BUDGETS.server_ready))
        client = connect(servers[0], key_file)
        queue = client.queue(queue_name)

        def acked() -> int:
            return client.stats()["queues"].get(queue_name, {}).get("acked", 0)

        for replicas in (1, 3):
            pods = ns.start_workload(ns.plan(one(docs, *CONSUMER), replicas=replicas))
            for pod in pods:
                require(pod.wait_probe("readinessProbe", FLOW_BUDGETS.consumer_ready), f"{pod.name}: ")
                wait_for(lambda pod=pod: "event=consumer_started" in pod.logs(), FLOW_BUDGETS.consumer_ready)
                assert "event=consumer_started" in pod.logs(), pod.tail()
            base = acked()
            t0_wall, t0 = time.time(), time.monotonic()
            queue.put_many([{"n": n, "ms": SCALE_TASK_MS} for n in range(SCALE_TASKS)])
            done = wait_for(lambda base=base: acked() - base >= SCALE_TASKS, 90, 0.02)
            acked_seconds = time.monotonic() - t0
            assert done, f"{replicas} replica(s): only {acked() - base}/{SCALE_TASKS} acked after 90 s"
            lines = {pod.name: EXAMPLE_TASK.findall(pod.logs()) for pod in pods}
            handled = sorted(int(n) for found in lines.values() for _, n in found)
            assert handled == list(range(SCALE_TASKS)), f"{replicas} replica(s): handled {len(handled)} lines"
            last_done = max(parse_ts(ts) for found in lines.values() for ts, _ in found)
            results[replicas] = {
                "work_seconds": round(last_done - t0_wall, 3),  # put -> last handler finished
                "acked_seconds": round(acked_seconds, 3),  # put -> server counted the last ack
                "per_replica": {name: len(found) for name, found in lines.items()},
            }
            # Scale in: SIGTERM, grace period from the pod spec; an idle consumer drains and exits 0.
            with ThreadPoolExecutor(max_workers=len(pods)) as pool:
                codes = dict(zip([p.name for p in pods], pool.map(Pod.stop, pods), strict=True))
            assert set(codes.values()) == {0}, f"exit codes on SIGTERM: {codes}"
    finally:
        if client is not None:
            client.close()
        errors = ns.cleanup()
    assert not errors, errors

    ratio = results[1]["work_seconds"] / results[3]["work_seconds"]
    acked_ratio = results[1]["acked_seconds"] / results[3]["acked_seconds"]
    print(
        f"\nscaling: {SCALE_TASKS} tasks x {SCALE_TASK_MS} ms: 1 replica {results[1]}, 3 replicas {results[3]}; "
        f"speed-up {ratio:.2f}x (last task handled), {acked_ratio:.2f}x (last ack counted by the server)"
    )
    assert ratio >= SCALE_MIN_RATIO, f"3 replicas only {ratio:.2f}x faster than 1: {results}"
    floor = SCALE_TASKS // 3 // 2
    lazy = {n: c for n, c in results[3]["per_replica"].items() if c < floor}
    assert not lazy, f"replicas with fewer than {floor} of {SCALE_TASKS} tasks (hoarding?): {results[3]['per_replica']}"
