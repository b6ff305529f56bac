"""Docker helpers for the container tests (tests/integration, tests/k8s): one small API.

Everything created through this module carries the label ``queuekit.test=<session id>`` and is
removed by :func:`sweep` (call it at session end; fixtures also remove what they made as they go).
Typical use::

    from support import dockerkit as dk

    dk.configure_env()                              # TESTCONTAINERS_RYUK_DISABLED, TC_HOST, BASE_IMAGE
    images = dk.build_images()                      # {"server": "queuekit-server:test-<sid>", ...}
    net = dk.create_network("e2e")                  # labelled user-defined bridge network
    vol = dk.create_volume("data")                  # labelled named volume
    keys = dk.write_role_keys(tmp_path / "keys")    # {"producer": Path, "consumer": ..., "admin": ...}
    srv = dk.start_container(images["server"], "server", network=net, aliases=["server"],
                             keys_dir=keys["consumer"].parent, volumes={vol.name: "/var/lib/queuekit"},
                             publish=[50000, 8080], wait_log=r"event=server_ready")
    con = dk.start_container(images["consumer"], "consumer", network=net, authkey_file=keys["consumer"])
    port = dk.host_port(srv, 50000)                 # published on 127.0.0.1 only
    dk.wait_for_log(srv, r"event=client_connected", timeout=10)
    dk.remove(srv); dk.sweep()

Containers are started with testcontainers (``DockerContainer``) and returned as such; every
helper that takes a container also accepts a docker-py ``Container``. Containers run like
production by default (:func:`hardened`): uid/gid 10001, read-only root filesystem, tmpfs
``/tmp``, no capabilities, ``no-new-privileges``, an init process.

Host-side clients reach containers only through ports published on 127.0.0.1. Every wait here
polls with a deadline. Nothing here kills processes by name: resources are removed by id/label.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
LABEL = "queuekit.test"
IMAGE_NAMES = ("server", "consumer", "producer")  # the targets of DOCKERFILE
DOCKERFILE = "images/Dockerfile"  # relative to the build context
DEFAULT_BASE_IMAGE = "queuekit/base:trixie"
AUTHKEY_PATH = "/run/secrets/queuekit_authkey"
KEYS_PATH = "/run/secrets/queuekit_keys"  # the server's QUEUEKIT_KEYS_DIR, as in compose/compose.yaml
ROLES = ("producer", "consumer", "admin")
APP_UID = APP_GID = 10001
APP_USER = "10001:10001"
COMPOSE_PREFIX = "qktest-"

_ENV_DEFAULTS = {
    "TESTCONTAINERS_RYUK_DISABLED": "true",  # the reaper image cannot be pulled here
    "TC_HOST": "127.0.0.1",  # else testcontainers picks the bridge gateway (/.dockerenv exists)
    "BASE_IMAGE": DEFAULT_BASE_IMAGE,
}

_session_id: str | None = None
_client = None
_built_images: list[str] = []
_compose_projects: list[ComposeProject] = []


# -- session, environment, client -------------------------------------------------------------


def configure_env() -> None:
    """Set (only if unset) the environment testcontainers and the image builds need."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def session_id() -> str:
    """This test session's id: ``$QUEUEKIT_TEST_SESSION`` or 8 random hex digits (lower case,
    so it is valid in image tags and Compose project names)."""
    global _session_id
    if _session_id is None:
        _session_id = os.environ.get("QUEUEKIT_TEST_SESSION") or secrets.token_hex(4)
    return _session_id


def session_active() -> bool:
    """True once this process asked for its session id (so it may have created resources)."""
    return _session_id is not None


def labels(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The labels every resource of this session carries (plus ``extra``)."""
    return {LABEL: session_id(), **(extra or {})}


def client():
    """A shared docker-py client (``docker.from_env()``), created on first use."""
    global _client
    if _client is None:
        import docker

        _client = docker.from_env(timeout=120)
    return _client


def docker_unavailable_reason() -> str | None:
    """``None`` when a Docker engine answers, else why not (for ``pytest.skip``)."""
    try:
        client().ping()
        return None
    except Exception as e:  # any failure means: no usable engine
        return f"no Docker engine: {type(e).__name__}: {e}"


def short_name(hint: str) -> str:
    """A unique, label-friendly resource name: ``qktest-<sid>-<hint>-<4 hex>``."""
    clean = re.sub(r"[^a-z0-9-]+", "-", hint.lower()).strip("-") or "x"
    return f"{COMPOSE_PREFIX}{session_id()}-{clean}-{secrets.token_hex(2)}"


# -- images -----------------------------------------------------------------------------------


def image_ref(name: str, tag: str | None = None) -> str:
    """``queuekit-<name>:test-<sid>``: the real repository name with this session's tag."""
    return f"queuekit-{name}:{tag or image_tag()}"


def image_tag() -> str:
    """The tag of this session's images (``test-<sid>``); Compose reads it as QUEUEKIT_IMAGE_TAG."""
    return f"test-{session_id()}"


def build_images(
    names: Sequence[str] = IMAGE_NAMES,
    *,
    base_image: str | None = None,
    tag: str | None = None,
    context: Path | str | None = None,
) -> dict[str, str]:
    """Build target ``<name>`` of ``images/Dockerfile`` for each name and return ``{name: image reference}``.

    The build context is the repository root, or ``context`` (another checkout, e.g. a deliberately
    broken copy to check that the tests catch it). ``base_image`` defaults to ``$BASE_IMAGE``.
    Idempotent within a session: an image already built under that reference is not built again.
    """
    from testcontainers.core.image import DockerImage

    base = base_image or os.environ.get("BASE_IMAGE") or DEFAULT_BASE_IMAGE
    root = Path(context) if context else ROOT
    refs: dict[str, str] = {}
    for name in names:
        ref = image_ref(name, tag)
        if ref not in _built_images:
            image = DockerImage(
                path=str(root),
                dockerfile_path=DOCKERFILE,
                target=name,
                tag=ref,
                clean_up=False,  # removed by remove_images()/sweep() at session end
                buildargs={"BASE_IMAGE": base},
                labels=labels(),
                rm=True,
            )
            try:
                image.build()
            except Exception as e:
                raise RuntimeError(f"building {ref} FROM {base} failed: {e}") from e
            _built_images.append(ref)
        refs[name] = ref
    return refs


def remove_images(refs: Iterable[str] | None = None) -> None:
    """Untag (and delete when no other tag uses it) the given image references; default: every
    image built by :func:`build_images` in this session. Missing images are ignored."""
    import docker

    for ref in list(refs if refs is not None else _built_images):
        try:
            client().images.remove(ref, force=True)
        except docker.errors.ImageNotFound:
            pass
        if ref in _built_images:
            _built_images.remove(ref)


# -- keys, networks, volumes ------------------------------------------------------------------


def new_authkey() -> str:
    """A random authkey: 32 random bytes as 64 hex characters (like ``queuekit keygen``)."""
    return secrets.token_hex(32)


def write_authkey(directory: Path | str, key: str | None = None, name: str = "queuekit_authkey") -> Path:
    """Write an authkey file with mode 0644 (uid 10001 reads it through a bind mount) and return it."""
    path = Path(directory) / name
    path.write_text((key or new_authkey()) + "\n")
    path.chmod(0o644)
    return path


def write_role_keys(directory: Path | str, label: str = "default") -> dict[str, Path]:
    """A keys directory as ``make secrets`` makes it: ``<role>.<label>`` for producer, consumer and
    admin (random keys), with its modes: as root, owned by uid/gid 10001, files 0400, directory
    0500 (only uid 10001 reads them); otherwise files 0640 and directory 0750 in our group, which
    :func:`start_container` adds to the containers (:func:`key_groups`). Returns ``{role: path}``."""
    keys = Path(directory)
    keys.mkdir(parents=True, exist_ok=True)
    paths = {}
    for role in ROLES:
        path = keys / f"{role}.{label}"
        path.write_text(new_authkey() + "\n")
        paths[role] = path
    protect_keys(keys)
    return paths


def protect_keys(keys: Path | str) -> None:
    """The modes ``make secrets`` gives a keys directory (see :func:`write_role_keys`)."""
    keys = Path(keys)
    root = os.geteuid() == 0
    for path in [keys, *keys.iterdir()]:
        if root:
            os.chown(path, APP_UID, APP_GID)
        path.chmod((0o500 if root else 0o750) if path.is_dir() else (0o400 if root else 0o640))


def key_groups() -> list[str]:
    """Supplementary groups a container needs to read keys written by :func:`write_role_keys`."""
    return [] if os.geteuid() == 0 else [str(os.getegid())]


def create_network(hint: str = "net", **kwargs: Any):
    """A labelled user-defined bridge network (docker-py ``Network``); ``kwargs`` go to
    ``networks.create`` (e.g. ``internal=True``)."""
    extra = kwargs.pop("labels", None)
    return client().networks.create(short_name(hint), driver="bridge", labels=labels(extra), **kwargs)


def create_volume(hint: str = "data"):
    """A labelled named volume (docker-py ``Volume``)."""
    return client().volumes.create(name=short_name(hint), labels=labels())


def bridge_gateway() -> str:
    """The IPv4 gateway of the engine's default ``bridge`` network (the host as seen from containers)."""
    for cfg in client().networks.get("bridge").attrs["IPAM"]["Config"] or []:
        if cfg.get("Gateway"):
            return cfg["Gateway"]
    # Older engines leave Gateway out of IPAM: the first host address of the subnet.
    import ipaddress

    subnet = client().networks.get("bridge").attrs["IPAM"]["Config"][0]["Subnet"]
    return str(next(ipaddress.ip_network(subnet).hosts()))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for fixed host ports, e.g. Compose's)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- containers -------------------------------------------------------------------------------


def hardened(**overrides: Any) -> dict[str, Any]:
    """docker-py run options for the production security settings, with ``overrides`` applied."""
    opts: dict[str, Any] = {
        "user": APP_USER,
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "init": True,
    }
    opts.update(overrides)
    return opts


def start_container(
    image: str,
    hint: str,
    *,
    network=None,
    aliases: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    command: str | Sequence[str] | None = None,
    authkey_file: Path | str | None = None,
    keys_dir: Path | str | None = None,
    volumes: Mapping[str, str] | None = None,
    files: Mapping[Path | str, str] | None = None,
    publish: Sequence[int] = (),
    wait_log: str | None = None,
    wait_timeout: float = 30.0,
    secure: bool = True,
    tmpfs: Mapping[str, str] | None = None,
    **docker_kwargs: Any,
):
    """Start a labelled container and return the testcontainers ``DockerContainer``.

    - ``network``: a docker-py Network (or its name); ``aliases``: DNS names on it.
    - ``authkey_file``: bind-mounted read-only at :data:`AUTHKEY_PATH`.
    - ``keys_dir``: a directory of role keys (:func:`write_role_keys`) bind-mounted read-only at
      :data:`KEYS_PATH`, with ``QUEUEKIT_KEYS_DIR`` pointing there (the server).
    - ``volumes``: ``{volume name or host path: container path}`` mounted read-write.
    - ``files``: ``{host file or directory: container path}`` bind-mounted read-only (certificates).
    - ``publish``: container ports published on 127.0.0.1 at random host ports (:func:`host_port`).
    - ``wait_log``: a regex; return only once the container logged it (``LogMessageWaitStrategy``,
      polling every 0.1 s); raises with the logs if it exits first or ``wait_timeout`` passes.
    - ``secure``: apply :func:`hardened` (default) and a tmpfs ``/tmp``; ``docker_kwargs`` go to
      docker-py ``containers.create`` and win over the hardening options.
    """
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.network import Network as TcNetwork
    from testcontainers.core.wait_strategies import LogMessageWaitStrategy

    kwargs: dict[str, Any] = hardened() if secure else {}
    if (authkey_file is not None or keys_dir is not None or files) and key_groups():
        kwargs["group_add"] = key_groups()
    kwargs.update(docker_kwargs)
    env = dict(env or {})
    if keys_dir is not None:
        env.setdefault("QUEUEKIT_KEYS_DIR", KEYS_PATH)
    kwargs["labels"] = labels(kwargs.get("labels"))
    kwargs.setdefault("name", short_name(hint))
    kwargs.setdefault("hostname", (re.sub(r"[^a-z0-9-]+", "-", hint.lower()).strip("-") or "box")[:63])
    container = DockerContainer(image, env=env, command=command, **kwargs)
    if network is not None:
        tc_net = TcNetwork()
        tc_net.name = network if isinstance(network, str) else network.name
        container.with_network(tc_net)
        if aliases:
            container.with_network_aliases(*aliases)
    if secure or tmpfs:
        for path, opts in (tmpfs or {"/tmp": "size=16m,mode=1777"}).items():
            container.tmpfs[path] = opts
    if authkey_file is not None:
        container.with_volume_mapping(str(authkey_file), AUTHKEY_PATH, "ro")
    if keys_dir is not None:
        container.with_volume_mapping(str(keys_dir), KEYS_PATH, "ro")
    for source, target in (volumes or {}).items():
        container.with_volume_mapping(source, target, "rw")
    for source, target in (files or {}).items():
        container.with_volume_mapping(str(source), target, "ro")
    for port in publish:
        container.ports[f"{port}/tcp"] = ("127.0.0.1", None)  # type: ignore[assignment]
    if wait_log:
        container.waiting_for(
            LogMessageWaitStrategy(re.compile(wait_log, re.MULTILINE))
            .with_poll_interval(0.1)
            .with_startup_timeout(int(wait_timeout))
        )
    try:
        container.start()
    except Exception:
        raw = container._container  # created but never ready: do not leak it
        if raw is not None:
            _force_remove(raw)
        raise
    return container


def raw(container):
    """The docker-py ``Container`` behind a testcontainers one (or the argument itself)."""
    return container.get_wrapped_container() if hasattr(container, "get_wrapped_container") else container


def name_of(container) -> str:
    c = raw(container)
    return c.name


def logs(container, tail: int | None = None) -> str:
    """stdout+stderr of the container, interleaved as Docker stored them (works after it exited)."""
    kw: dict[str, Any] = {"stdout": True, "stderr": True}
    if tail is not None:
        kw["tail"] = tail
    return raw(container).logs(**kw).decode("utf-8", "replace")


def describe(containers: Iterable, tail: int = 60) -> str:
    """A readable dump of containers' state and last log lines, for assertion messages."""
    parts = []
    for c in containers:
        r = raw(c)
        try:
            r.reload()
            state = r.attrs["State"]
            head = f"--- {r.name}: status={state.get('Status')} exit={state.get('ExitCode')}"
            parts.append(head + "\n" + logs(r, tail=tail).rstrip())
        except Exception as e:  # already removed
            parts.append(f"--- {getattr(r, 'name', r)}: unavailable ({type(e).__name__})")
    return "\n".join(parts)


def wait_until(
    predicate: Callable[[], Any], *, timeout: float, interval: float = 0.2, message: str | Callable[[], str] = ""
) -> Any:
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` s pass
    (AssertionError with ``message``, called if callable, and the last value)."""
    deadline = time.monotonic() + timeout
    value = None
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:g}s: {text} (last value: {value!r})")
        time.sleep(interval)


def wait_for_log(container, pattern: str, *, count: int = 1, timeout: float = 30.0) -> list[re.Match]:
    """Wait until ``pattern`` (regex, multiline) matches at least ``count`` times in the logs;
    return all the matches. Fails early, with the logs, if the container stops first."""
    rx = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + timeout
    r = raw(container)
    while True:
        matches = list(rx.finditer(logs(r)))
        if len(matches) >= count:
            return matches
        r.reload()
        if r.status not in ("created", "running", "restarting"):
            matches = list(rx.finditer(logs(r)))
            if len(matches) >= count:
                return matches
            raise AssertionError(
                f"{r.name} stopped ({r.status}) with {len(matches)}/{count} lines matching {pattern!r}:\n"
                + describe([r])
            )
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"{r.name}: {len(matches)}/{count} lines matching {pattern!r} after {timeout:g}s:\n" + describe([r])
            )
        time.sleep(0.1)


def wait_exit(container, timeout: float = 30.0) -> int:
    """Wait for the container to exit and return its exit code (AssertionError on timeout)."""
    r = raw(container)

    def exited():
        r.reload()
        return r.status in ("exited", "dead")

    wait_until(exited, timeout=timeout, interval=0.1, message=lambda: f"{r.name} still {r.status}")
    return int(r.attrs["State"]["ExitCode"])


def host_port(container, port: int) -> int:
    """The 127.0.0.1 host port a container port is published on (re-read: it changes on restart)."""
    r = raw(container)
    deadline = time.monotonic() + 10
    while True:
        r.reload()
        bindings = (r.attrs["NetworkSettings"]["Ports"] or {}).get(f"{port}/tcp") or []
        for b in bindings:
            if b.get("HostPort"):
                return int(b["HostPort"])
        if time.monotonic() > deadline:
            raise AssertionError(f"{r.name}: port {port} is not published: {r.attrs['NetworkSettings']['Ports']}")
        time.sleep(0.1)


def ip_address(container, network) -> str:
    """The container's IPv4 address on ``network`` (object or name)."""
    r = raw(container)
    r.reload()
    name = network if isinstance(network, str) else network.name
    return r.attrs["NetworkSettings"]["Networks"][name]["IPAddress"]


def remove(*containers) -> None:
    """Force-remove containers (and their anonymous volumes); missing ones are ignored."""
    for c in containers:
        try:
            _force_remove(raw(c))
        except Exception:
            pass


def _force_remove(r) -> None:
    import docker

    try:
        r.remove(force=True, v=True)
    except docker.errors.NotFound:
        pass


# -- Compose ----------------------------------------------------------------------------------


@dataclass
class ComposeProject:
    """A ``docker compose`` project driven through the CLI (v2 plugin).

    ``files`` are passed with ``-f`` in order; a generated override that puts this session's label
    on every service, on the default network and on the named ``volumes`` is appended (written
    next to the first file). ``env`` is the whole environment Compose sees on top of a minimal
    one (PATH, HOME, DOCKER_*): the caller's QUEUEKIT_*/COMPOSE_* variables never leak in.
    """

    files: Sequence[Path]
    name: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    volumes: Sequence[str] = ()
    services: Sequence[str] = ()

    def __post_init__(self):
        self.name = self.name or short_name("compose")
        if not self.name.startswith(COMPOSE_PREFIX):
            raise ValueError(f"Compose project names of tests start with {COMPOSE_PREFIX!r}: {self.name}")
        self.files = [Path(f) for f in self.files]
        services = list(self.services) or self._config_services()
        override = {
            "services": {s: {"labels": labels()} for s in services},
            "networks": {"default": {"labels": labels()}},
        }
        if self.volumes:
            override["volumes"] = {v: {"labels": labels()} for v in self.volumes}
        path = self.files[0].parent / f"zz-test-labels-{self.name}.yaml"
        path.write_text(json.dumps(override, indent=2) + "\n")  # JSON is YAML
        self._override = path
        _compose_projects.append(self)

    def _base_env(self) -> dict[str, str]:
        keep = ("PATH", "HOME", "DOCKER_HOST", "DOCKER_CONFIG", "DOCKER_CONTEXT", "DOCKER_CERT_PATH", "TMPDIR")
        env = {k: v for k, v in os.environ.items() if k in keep}
        env.update(self.env)
        return env

    def _args(self, with_override: bool = True) -> list[str]:
        args = ["docker", "compose", "-p", self.name]
        for f in [*self.files, *([self._override] if with_override else [])]:
            args += ["-f", str(f)]
        return args

    def _config_services(self) -> list[str]:
        out = subprocess.run(
            [*self._args(with_override=False), "config", "--services"],
            env=self._base_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"docker compose config --services failed ({out.returncode}):\n{out.stderr}")
        return [s for s in out.stdout.split() if s]

    def run(self, *args: str, check: bool = True, timeout: float = 180.0) -> subprocess.CompletedProcess:
        """Run ``docker compose -p NAME -f ... ARGS``; with ``check``, raise with its output on failure."""
        proc = subprocess.run(
            [*self._args(), *args], env=self._base_env(), capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"docker compose {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def containers(self, service: str | None = None, *, all: bool = True) -> list:
        """docker-py containers of this project (optionally of one service), sorted by name."""
        filters = {"label": [f"com.docker.compose.project={self.name}"]}
        if service:
            filters["label"].append(f"com.docker.compose.service={service}")
        return sorted(client().containers.list(all=all, filters=filters), key=lambda c: c.name)

    def down(self, timeout: int = 10) -> None:
        """``down -v --remove-orphans`` (volumes too); never raises, so it is safe in finalizers."""
        try:
            self.run("down", "-v", "--remove-orphans", "--timeout", str(timeout), check=False, timeout=120)
        except Exception:
            pass
        for c in self.containers():
            remove(c)
        if self in _compose_projects:
            _compose_projects.remove(self)


# -- cleanup ----------------------------------------------------------------------------------


def sweep(session: str | None = None) -> dict[str, int]:
    """Remove every container, network, volume and image labelled ``queuekit.test=<session>``
    (default: this session), after ``down`` of the Compose projects still registered. Returns
    how many of each were removed. Never raises: it runs in finalizers."""
    import docker

    for project in list(_compose_projects):
        project.down(timeout=5)
    sid = session or session_id()
    flt = {"label": f"{LABEL}={sid}"}
    counts = {"containers": 0, "networks": 0, "volumes": 0, "images": 0}
    try:
        cl = client()
    except Exception:
        return counts
    for c in cl.containers.list(all=True, filters=flt):
        try:
            c.remove(force=True, v=True)
            counts["containers"] += 1
        except docker.errors.APIError:
            pass
    for n in cl.networks.list(filters=flt):
        try:
            n.remove()
            counts["networks"] += 1
        except docker.errors.APIError:
            pass
    for v in cl.volumes.list(filters=flt):
        try:
            v.remove(force=True)
            counts["volumes"] += 1
        except docker.errors.APIError:
            pass
    if session is None:
        remove_images()
    for img in cl.images.list(filters=flt):
        for ref in img.tags or [img.id]:
            try:
                cl.images.remove(ref, force=True)
                counts["images"] += 1
            except docker.errors.APIError:
                pass
    return counts


def exec_in(container, command: Sequence[str], user: str = APP_USER) -> tuple[int, str]:
    """Run ``command`` in a running container (as ``user``); return (exit code, stdout+stderr).
    Not bounded by a timeout here: give the command its own (e.g. a client's connect timeout)."""
    r = raw(container)
    result = r.exec_run(list(command), user=user, demux=False)
    return result.exit_code, (result.output or b"").decode("utf-8", "replace")


DIGEST_SCRIPT = "import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())"


def digest_in(container, path: str = AUTHKEY_PATH, user: str = APP_USER) -> str:
    """SHA-256 (hex) of a file as a process in the running container reads it: compares a key
    the container holds with the host's key files without the key itself leaving the container."""
    code, out = exec_in(container, ["python3", "-c", DIGEST_SCRIPT, path], user=user)
    if code != 0:
        raise AssertionError(f"{name_of(container)}: cannot read {path} as {user}: {out.strip()}")
    return out.strip()


def file_mode(path: Path | str) -> int:
    """The permission bits of a file (e.g. 0o644), for checks on key files."""
    return stat.S_IMODE(os.stat(path).st_mode)
