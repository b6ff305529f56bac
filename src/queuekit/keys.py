"""Keys and what they grant: a role (producer, consumer, admin), optionally limited to queues.

The server accepts any of several keys. Each is a :class:`Grant`: which key, under which name,
for which role and queue-name patterns. Sources:

- ``QUEUEKIT_AUTHKEY_FILE``: one key with the ``admin`` role (what a single shared key has always
  granted, so existing deployments keep working);
- ``QUEUEKIT_KEYS_DIR``: a directory of key files named ``<role>.<label>`` (for example
  ``producer.web``, ``consumer.billing-2026-11``, ``admin.ops``), each holding one key exactly as
  the client's key file does (at least 32 bytes, one trailing newline stripped), so the same file
  is mounted on both sides. Beside a key file, ``<role>.<label>.queues`` (not secret) may limit
  that key to queue names matching shell-style patterns, one per line or comma-separated
  (``billing-*, invoices``). Files whose names start with ``.`` are skipped (Kubernetes mounts a
  Secret with ``..data`` links beside the files).

Rotation without a restart: add the new key file, roll the clients over, remove the old file.
The server re-reads the sources on SIGHUP and when they change; connections authenticated with a
key that is gone are closed. A set of files that does not load (a short key, an unknown role)
is refused as a whole and the keys in force stay.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import ConfigError, PermissionDenied
from .settings import KEYGEN_HINT, Secret, load_authkey

ROLES = ("producer", "consumer", "admin")
QUEUES_SUFFIX = ".queues"
MAX_KEY_FILE_BYTES = 64 * 1024

# What each role may call. Admin may call everything; the rest are listed.
# status/result/cancel follow a task its producer made: producer (admin may too). A consumer
# takes and heartbeats; it learns about cancellation from its heartbeat, not from status.
PRODUCER_METHODS = frozenset(
    {"ping", "put_many", "qsize", "put", "put_nowait", "empty", "full", "status", "result", "cancel"}
)
CONSUMER_METHODS = frozenset(
    {
        "ping",
        "get_many",
        "ack_many",
        "nack_many",
        "extend_many",
        "take",
        "heartbeat",
        "release_many",
        "report",
        "qsize",
        "get",
        "get_nowait",
        "empty",
        "full",
        "task_done",
    }
)
_ALLOWED = {"producer": PRODUCER_METHODS, "consumer": CONSUMER_METHODS}
# The role a method needs, for the refusal message.
_NEEDS = {m: "producer" for m in PRODUCER_METHODS} | {m: "consumer" for m in CONSUMER_METHODS - PRODUCER_METHODS}


@dataclass(frozen=True)
class Grant:
    """One accepted key: ``name`` (the file it came from, safe to log), ``role``, ``queues``
    (shell-style patterns; empty: every queue)."""

    name: str
    role: str
    key: Secret
    queues: tuple[str, ...] = ()

    @property
    def unrestricted(self) -> bool:
        """May call everything on every queue (no check needed per call)."""
        return self.role == "admin" and not self.queues

    def check(self, method: str, queue: str | None) -> None:
        """Raise :class:`PermissionDenied` unless this key may call ``method`` on ``queue``."""
        if self.role != "admin" and method not in _ALLOWED[self.role]:
            needs = _NEEDS.get(method, "admin")
            raise PermissionDenied(
                f"key {self.name!r} (role {self.role}) may not call {method}: it needs the {needs} role"
            )
        if queue is not None and self.queues and not any(fnmatch.fnmatchcase(queue, p) for p in self.queues):
            raise PermissionDenied(
                f"key {self.name!r} may not use queue {queue!r}: it is limited to {', '.join(self.queues)}"
            )


def load_grants(authkey_file: str | None, keys_dir: str | None) -> list[Grant]:
    """Every key the server accepts. Raises :class:`ConfigError` naming the file and the fix."""
    grants = []
    if authkey_file is not None:
        grants.append(Grant(os.path.basename(authkey_file) or "authkey", "admin", load_authkey(authkey_file)))
    if keys_dir is not None:
        grants.extend(_load_dir(keys_dir))
    if not grants:
        raise ConfigError(f"no keys: set QUEUEKIT_AUTHKEY_FILE or QUEUEKIT_KEYS_DIR ({KEYGEN_HINT})")
    seen: dict[bytes, str] = {}
    for g in grants:
        other = seen.setdefault(g.key.reveal(), g.name)
        if other != g.name:
            raise ConfigError(f"key files {other} and {g.name} hold the same key: every key must be unique")
    return grants


def sources_signature(authkey_file: str | None, keys_dir: str | None) -> tuple:
    """Changes whenever a key source changes (names, sizes, modification times): cheap to poll."""
    sig: list[tuple] = []
    paths = [authkey_file] if authkey_file else []
    if keys_dir:
        try:
            paths += [os.path.join(keys_dir, n) for n in sorted(os.listdir(keys_dir)) if not n.startswith(".")]
        except OSError as e:
            sig.append(("error", keys_dir, e.errno))
    for path in paths:
        try:
            st = os.stat(path)  # follows Kubernetes' symlinks to the current data
            sig.append((path, st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError as e:
            sig.append((path, "error", e.errno))
    return tuple(sig)


def summary(grants: Iterable[Grant]) -> str:
    """``admin:1,consumer:2`` for the log (never a key)."""
    counts: dict[str, int] = {}
    for g in grants:
        counts[g.role] = counts.get(g.role, 0) + 1
    return ",".join(f"{role}:{n}" for role, n in sorted(counts.items()))


def _load_dir(keys_dir: str) -> list[Grant]:
    try:
        names = sorted(n for n in os.listdir(keys_dir) if not n.startswith("."))
    except FileNotFoundError:
        raise ConfigError(f"keys directory {keys_dir} does not exist (QUEUEKIT_KEYS_DIR)") from None
    except NotADirectoryError:
        raise ConfigError(f"keys directory {keys_dir} is not a directory (QUEUEKIT_KEYS_DIR)") from None
    except OSError as e:
        raise ConfigError(f"keys directory {keys_dir} cannot be read ({e.strerror}) (QUEUEKIT_KEYS_DIR)") from None
    grants = []
    for name in names:
        path = os.path.join(keys_dir, name)
        if os.path.isdir(path) or name.endswith(QUEUES_SUFFIX):
            continue
        role = name.split(".", 1)[0]
        if role not in ROLES or "." not in name:
            raise ConfigError(
                f"key file {path}: name it <role>.<label> with role one of {', '.join(ROLES)} (e.g. producer.web)"
            )
        key = _read_key(path)
        queues = _read_queues(path + QUEUES_SUFFIX) if name + QUEUES_SUFFIX in names else ()
        grants.append(Grant(name, role, key, queues))
    for name in names:
        if name.endswith(QUEUES_SUFFIX) and name[: -len(QUEUES_SUFFIX)] not in names:
            raise ConfigError(f"queue list {os.path.join(keys_dir, name)} has no key file beside it")
    return grants


def _read_key(path: str) -> Secret:
    try:
        return load_authkey(path)  # the client's rules, so the same file works on both sides
    except ConfigError as e:
        raise ConfigError(str(e).replace("authkey file", "key file", 1)) from None


def _read_queues(path: str) -> tuple[str, ...]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_KEY_FILE_BYTES)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"queue list {path} cannot be read ({e})") from None
    patterns = [p.strip() for line in text.splitlines() if not line.lstrip().startswith("#") for p in line.split(",")]
    patterns = [p for p in patterns if p]
    if not patterns:
        raise ConfigError(f"queue list {path} names no queue pattern (one per line, or comma-separated)")
    return tuple(patterns)
