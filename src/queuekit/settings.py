"""Typed settings built from command-line flags and ``QUEUEKIT_*`` environment variables.

Precedence: a flag wins over the environment, the environment over the default. The authkey is
only ever read from a file and held in a :class:`Secret`, whose ``repr`` is redacted, so printing
any settings object (or logging it) never shows the key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

from .errors import AuthkeyFileError, ConfigError, QueuekitError

DEFAULT_AUTHKEY_FILE = "/run/secrets/queuekit_authkey"
MIN_AUTHKEY_BYTES = 32  # a random key this long cannot be guessed from a captured handshake
MAX_AUTHKEY_FILE_BYTES = 64 * 1024
DEFAULT_PORT = 50000
DEFAULT_HTTP_PORT = 8080
DEFAULT_MAX_TASK_BYTES = 1024 * 1024
DEFAULT_MAX_RESULT_BYTES = 64 * 1024
DEFAULT_RESULT_TTL = 86400.0
DEFAULT_RESULT_MAX_COUNT = 100_000
DEFAULT_RESULT_MAX_BYTES = 64 * 1024 * 1024
MIN_HTTP_TOKEN_BYTES = 32
MAX_HTTP_TOKEN_BYTES = 4096
DEFAULT_HTTP_MAX_QUEUES = 1000
DEFAULT_FRAME_TIMEOUT = 30.0
# Seconds a client waits for a reply beyond the call's server-side wait (client.py's docstring).
DEFAULT_CALL_TIMEOUT = 10.0
DEFAULT_MAX_QUEUES = 10_000
# What the derived maximum message size (QUEUEKIT_MAX_MESSAGE_BYTES) allows: the biggest request a
# legitimate client sends is a put_many. The API takes up to 10,000 texts a call (api.MAX_BATCH);
# queuekit's own client sends chunks of at most 1,000 texts and 16 Mi characters in all, or one
# text alone (client._chunks), i.e. at most 64 MiB of UTF-8 (4 bytes a character). Everything
# else a client sends (acks, receipts, names) is far smaller.
MESSAGE_BATCH_TASKS = 10_000
MESSAGE_BATCH_BYTES = 4 * 16 * 1024 * 1024
MESSAGE_OVERHEAD_BYTES = 1024 * 1024  # the request tuple, the queue name, ~10 bytes of pickle a text
KEYGEN_HINT = "create one with `queuekit keygen > FILE` and point --authkey-file / QUEUEKIT_AUTHKEY_FILE at it"


class Secret:
    """Bytes that must never be printed. ``repr``/``str`` show ``<redacted>``."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes):
        self._value = bytes(value)

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple:
        raise TypeError("a Secret is not picklable: it must not leave the process")


def load_authkey(path: str) -> Secret:
    """Read the authkey file; one trailing newline (``\\n`` or ``\\r\\n``) is stripped.

    Raises :class:`AuthkeyFileError` with a one-line message naming the file and the fix.
    """
    return Secret(
        _read_secret_file(
            path,
            "authkey file",
            MIN_AUTHKEY_BYTES,
            MAX_AUTHKEY_FILE_BYTES,
            KEYGEN_HINT,
            "compose/README.md",
            AuthkeyFileError,
        )
    )


def load_http_token(
    path: str, what: str = "HTTP token file", setting: str = "--http-token-file / QUEUEKIT_HTTP_TOKEN_FILE"
) -> Secret:
    """Read the HTTP bearer token file (rules as :func:`load_authkey`; the token travels in a
    header, so printable ASCII without spaces). Raises :class:`ConfigError` with a one-line message.
    The dashboard's admin token follows the same rules (``what`` and ``setting`` name it)."""
    hint = f"create one with `queuekit keygen > FILE` and point {setting} at it"
    data = _read_secret_file(
        path, what, MIN_HTTP_TOKEN_BYTES, MAX_HTTP_TOKEN_BYTES, hint, "docs/SECURITY.md", ConfigError
    )
    if not all(0x21 <= b <= 0x7E for b in data):
        raise ConfigError(f"{what} {path} must hold printable ASCII without spaces (one line): {hint}")
    return Secret(data)


def _read_secret_file(
    path: str, what: str, min_bytes: int, max_bytes: int, hint: str, mode_doc: str, error: type[ConfigError]
) -> bytes:
    """A secret's bytes, one trailing newline (``\\n`` or ``\\r\\n``) stripped, or ``error``
    with one line naming the file and the fix (never the content)."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 3)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist: {hint}") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a directory, not a file: {hint}") from None
    except PermissionError:
        raise error(
            f"{what} {path} is not readable by uid {os.getuid()}: fix its mode/owner (see {mode_doc})"
        ) from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror}): {hint}") from None
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if len(data) > max_bytes:
        raise error(f"{what} {path} is larger than {max_bytes} bytes: is it the right file?")
    if len(data) < min_bytes:
        size = "is empty" if not data else f"holds {len(data)} bytes"
        raise error(f"{what} {path} {size}; at least {min_bytes} are required: {hint}")
    return data


def derived_max_message_bytes(max_task_bytes: int) -> int:
    """The default maximum message size for a task limit: a put_many of up to
    ``MESSAGE_BATCH_TASKS`` texts at the task limit, but at most ``MESSAGE_BATCH_BYTES`` (what the
    client's chunking can send), never less than one task; plus ``MESSAGE_OVERHEAD_BYTES``.
    65 MiB for the default 1 MiB task limit."""
    batch = min(MESSAGE_BATCH_TASKS * max_task_bytes, MESSAGE_BATCH_BYTES)
    return max(max_task_bytes, batch) + MESSAGE_OVERHEAD_BYTES


@dataclasses.dataclass(frozen=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, default_port: int | None = None) -> Address:
        """``host:port``, ``[v6addr]:port``, ``:port`` (all interfaces), or ``host`` if a default port is given."""
        text = text.strip()
        port_text: str | None = None
        if text.startswith("["):
            host, bracket, rest = text[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError(f"expected [IPv6]:PORT, got {text!r}")
            port_text = rest[1:] if rest else None
        elif text.count(":") == 1:
            host, port_text = text.split(":")
        elif ":" not in text:
            host = text
        else:
            raise ValueError(f"write IPv6 addresses in brackets, e.g. [::1]:50000, not {text!r}")
        if port_text is None:
            if default_port is None:
                raise ValueError(f"expected HOST:PORT, got {text!r}")
            port_text = str(default_port)
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"port must be a number in {text!r}") from None
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} out of range in {text!r}")
        return cls(host or "0.0.0.0", port)

    def tuple(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class ServerList(tuple[Address, ...]):
    """Where a client connects: one address, or several tried in turn (a leader and its standbys
    sharing a PostgreSQL journal). ``str`` gives them back as ``a:50000,b:50000``."""

    @classmethod
    def parse(cls, text: str) -> ServerList:
        """Comma-separated ``host:port`` (the port defaults to 50000); a host is required."""
        parts = [part.strip() for part in str(text).split(",") if part.strip()]
        if not parts:
            raise ValueError("no server address")
        for part in parts:
            if part.startswith(":"):
                raise ValueError("name the server's host, e.g. queue-host:50000")
        return cls(Address.parse(part, DEFAULT_PORT) for part in parts)

    def __str__(self) -> str:
        return ",".join(str(address) for address in self)


def _positive_float(text: Any) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be > 0")
    return value


def _call_timeout(text: Any) -> float:
    """QUEUEKIT_CALL_TIMEOUT: a socket timeout, so finite."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError("must be a number of seconds > 0 (a call without a reply after it is retried elsewhere)")
    return value


def _non_negative_float(text: Any) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("must be >= 0")
    return value


def _positive_int(text: Any) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be >= 1")
    return value


def _non_negative_int(text: Any) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(text: Any) -> str:
        value = str(text).strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


def _optional_address(default_port: int) -> Callable[[Any], Address | None]:
    def parse(text: Any) -> Address | None:
        if str(text).strip().lower() in ("off", "none", "false", "0", "no"):
            return None
        return Address.parse(str(text), default_port)

    return parse


def _address(default_port: int) -> Callable[[Any], Address]:
    return lambda text: Address.parse(str(text), default_port)


def _server_address(text: Any) -> Address:
    """Where a client connects: unlike a bind address, the host cannot be left out."""
    if str(text).strip().startswith(":"):
        raise ValueError("name the server's host, e.g. queue-host:50000")
    return Address.parse(str(text), DEFAULT_PORT)


def _plaintext_bind(text: Any) -> Address | None:
    """``HOST:PORT``; a port alone (``50001`` or ``:50001``) binds 127.0.0.1; ``off`` disables."""
    text = str(text).strip()
    if text.lower() in ("off", "none", "false", "no"):
        return None
    if text.isdigit():
        text = ":" + text
    if text.startswith(":"):
        text = "127.0.0.1" + text
    return Address.parse(text)


def _optional_path(text: Any) -> str | None:
    text = str(text).strip()
    return text or None


def _journal_url(text: Any) -> str | None:
    """A postgresql:// URL. One holding a password is refused with a ConfigError, whose message
    (unlike a ValueError's) does not echo the value."""
    from .journal_postgres import check_url  # the URL rules live with the journal

    text = str(text).strip()
    return check_url(text) if text else None


def load_journal_password(path: str) -> Secret:
    """The PostgreSQL journal's password (rules as :func:`load_authkey`, any length)."""
    hint = (
        "write the database password into it (one line) and point QUEUEKIT_JOURNAL_PASSWORD_FILE / "
        "--journal-password-file at it"
    )
    return Secret(_read_secret_file(path, "journal password file", 1, 4096, hint, "docs/SECURITY.md", ConfigError))


class _Sources:
    """Looks a setting up in the flags, then the environment, then takes the default."""

    def __init__(self, flags: Mapping[str, Any] | None, env: Mapping[str, str] | None):
        self.flags = dict(flags or {})
        self.env = os.environ if env is None else env

    def get(self, dest: str, env_name: str | None, default: Any, parse: Callable[[Any], Any]) -> Any:
        value = self.flags.get(dest)
        source = "--" + dest.replace("_", "-")
        if value is None and env_name:
            raw = self.env.get(env_name)
            if raw is not None and raw.strip() != "":
                value, source = raw, env_name
        if value is None:
            return default
        try:
            return parse(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"invalid {source}={value!r}: {e}") from None


def _log_level(src: _Sources) -> str:
    return src.get("log_level", "QUEUEKIT_LOG_LEVEL", "info", _choice("debug", "info", "warning", "error"))


def _leader_timing(src: _Sources) -> dict[str, float]:
    probe = src.get("leader_probe_interval", "QUEUEKIT_LEADER_PROBE_INTERVAL", 1.0, _positive_float)
    lease = src.get("leader_lease", "QUEUEKIT_LEADER_LEASE", 5.0, _positive_float)
    if lease < 2 * probe:
        raise ConfigError(
            f"QUEUEKIT_LEADER_LEASE ({lease:g} s) must be at least twice QUEUEKIT_LEADER_PROBE_INTERVAL "
            f"({probe:g} s): one late heartbeat must not cost the leadership"
        )
    return {"leader_probe_interval": probe, "leader_lease": lease}


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    bind: Address
    http: Address | None
    authkey_file: str
    authkey: Secret
    data_dir: str | None
    sync: str
    max_task_bytes: int
    max_attempts: int
    retry_base_seconds: float
    retry_max_seconds: float
    lease_seconds: float
    max_connections: int
    shutdown_grace_seconds: float
    log_level: str
    # The HTTP port: bearer token for everything but the probes (None: no token), queues listed.
    http_token_file: str | None = None
    http_token: Secret | None = None
    http_max_queues: int = DEFAULT_HTTP_MAX_QUEUES
    # Before authentication (the handshake and the first request), per connection and in all.
    handshake_timeout: float = 10.0
    max_handshakes: int = 64
    max_handshakes_per_address: int = 8
    auth_failures_per_minute: int = 10
    # Keys per role (queuekit.keys): a directory of <role>.<label> files beside or instead of the
    # single admin authkey. With it, the authkey file is used only if it exists.
    keys_dir: str | None = None
    # After authentication: the largest message a client may send (default derived from the
    # task limit), how long the rest of a started message may take, how many queues may exist.
    max_message_bytes: int = derived_max_message_bytes(DEFAULT_MAX_TASK_BYTES)
    frame_timeout: float = DEFAULT_FRAME_TIMEOUT
    max_queues: int = DEFAULT_MAX_QUEUES
    # Task results (issue 13): the largest result a handler may return, and the result store's
    # bounds (finished tasks' status and results, oldest evicted first).
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    result_ttl: float = DEFAULT_RESULT_TTL
    result_max_count: int = DEFAULT_RESULT_MAX_COUNT
    result_max_bytes: int = DEFAULT_RESULT_MAX_BYTES
    # The web dashboard: its actions need this token (None: read-only); seconds between the
    # samples of its history (360 kept).
    dashboard_admin_token_file: str | None = None
    dashboard_admin_token: Secret | None = None
    dashboard_sample_seconds: float = 10.0
    # TLS on the queue port (both files, or neither: plaintext); with a client CA, mutual TLS.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    # A second, plaintext listener beside TLS, for stock clients (None: off). Loopback unless a
    # host is named.
    plaintext_bind: Address | None = None
    # Leadership with a shared (PostgreSQL) journal: seconds between the leader's heartbeats, and
    # how long a heartbeat keeps it leader (a standby fences it after that).
    leader_probe_interval: float = 1.0
    leader_lease: float = 5.0
    # The PostgreSQL journal (instead of data_dir): a URL without a password; the password is read
    # from its own file and kept as a Secret.
    journal_url: str | None = None
    journal_password_file: str | None = None
    journal_password: Secret | None = None

    @classmethod
    def load(
        cls, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None, *, need_authkey: bool = True
    ) -> ServerSettings:
        src = _Sources(flags, env)
        authkey_file = src.get("authkey_file", "QUEUEKIT_AUTHKEY_FILE", DEFAULT_AUTHKEY_FILE, str)
        http_token_file = src.get("http_token_file", "QUEUEKIT_HTTP_TOKEN_FILE", None, _optional_path)
        keys_dir = src.get("keys_dir", "QUEUEKIT_KEYS_DIR", None, _optional_path)
        use_authkey = need_authkey and (keys_dir is None or os.path.exists(authkey_file))
        tls_cert_file = src.get("tls_cert_file", "QUEUEKIT_TLS_CERT_FILE", None, _optional_path)
        tls_key_file = src.get("tls_key_file", "QUEUEKIT_TLS_KEY_FILE", None, _optional_path)
        tls_client_ca_file = src.get("tls_client_ca_file", "QUEUEKIT_TLS_CLIENT_CA_FILE", None, _optional_path)
        if (tls_cert_file is None) != (tls_key_file is None):
            raise ConfigError(
                "TLS needs both QUEUEKIT_TLS_CERT_FILE and QUEUEKIT_TLS_KEY_FILE (--tls-cert-file, --tls-key-file)"
            )
        if tls_client_ca_file and not tls_cert_file:
            raise ConfigError(
                "QUEUEKIT_TLS_CLIENT_CA_FILE (mutual TLS) needs TLS: "
                "set QUEUEKIT_TLS_CERT_FILE and QUEUEKIT_TLS_KEY_FILE"
            )
        plaintext_bind = src.get("plaintext_bind", "QUEUEKIT_PLAINTEXT_BIND", None, _plaintext_bind)
        if plaintext_bind is not None and not tls_cert_file:
            raise ConfigError(
                "QUEUEKIT_PLAINTEXT_BIND (--plaintext-bind) adds a plaintext listener beside TLS: it needs "
                "QUEUEKIT_TLS_CERT_FILE and QUEUEKIT_TLS_KEY_FILE (without TLS, QUEUEKIT_BIND is plaintext already)"
            )
        journal_url = src.get("journal_url", "QUEUEKIT_JOURNAL_URL", None, _journal_url)
        journal_password_file = src.get("journal_password_file", "QUEUEKIT_JOURNAL_PASSWORD_FILE", None, _optional_path)
        if journal_url and src.get("data_dir", "QUEUEKIT_DATA_DIR", None, _optional_path):
            raise ConfigError(
                "QUEUEKIT_JOURNAL_URL (--journal-url) and QUEUEKIT_DATA_DIR (--data-dir) are two journals: set one "
                "(the server image sets QUEUEKIT_DATA_DIR: set it to the empty string beside a journal URL)"
            )
        if journal_password_file and not journal_url:
            raise ConfigError("QUEUEKIT_JOURNAL_PASSWORD_FILE is for the PostgreSQL journal: set QUEUEKIT_JOURNAL_URL")
        return cls(
            journal_url=journal_url,
            journal_password_file=journal_password_file,
            journal_password=load_journal_password(journal_password_file)
            if journal_password_file and need_authkey
            else None,
            plaintext_bind=plaintext_bind,
            **_leader_timing(src),
            tls_cert_file=tls_cert_file,
            tls_key_file=tls_key_file,
            tls_client_ca_file=tls_client_ca_file,
            keys_dir=keys_dir,
            http_token_file=http_token_file,
            http_token=load_http_token(http_token_file) if http_token_file and need_authkey else None,
            http_max_queues=src.get(
                "http_max_queues", "QUEUEKIT_HTTP_MAX_QUEUES", DEFAULT_HTTP_MAX_QUEUES, _positive_int
            ),
            bind=src.get("bind", "QUEUEKIT_BIND", Address("127.0.0.1", DEFAULT_PORT), _address(DEFAULT_PORT)),
            http=src.get(
                "http", "QUEUEKIT_HTTP", Address("127.0.0.1", DEFAULT_HTTP_PORT), _optional_address(DEFAULT_HTTP_PORT)
            ),
            authkey_file=authkey_file,
            authkey=load_authkey(authkey_file) if use_authkey else Secret(b""),
            data_dir=src.get("data_dir", "QUEUEKIT_DATA_DIR", None, _optional_path),
            sync=src.get("sync", "QUEUEKIT_SYNC", "full", _choice("full", "normal")),
            max_task_bytes=src.get("max_task_bytes", "QUEUEKIT_MAX_TASK_BYTES", DEFAULT_MAX_TASK_BYTES, _positive_int),
            max_attempts=src.get("max_attempts", "QUEUEKIT_MAX_ATTEMPTS", 5, _non_negative_int),
            retry_base_seconds=src.get("retry_base", "QUEUEKIT_RETRY_BASE_SECONDS", 1.0, _non_negative_float),
            retry_max_seconds=src.get("retry_max", "QUEUEKIT_RETRY_MAX_SECONDS", 300.0, _non_negative_float),
            lease_seconds=src.get("lease", "QUEUEKIT_LEASE_SECONDS", 30.0, _positive_float),
            max_connections=src.get("max_connections", "QUEUEKIT_MAX_CONNECTIONS", 1024, _positive_int),
            shutdown_grace_seconds=src.get(
                "shutdown_grace", "QUEUEKIT_SHUTDOWN_GRACE_SECONDS", 2.0, _non_negative_float
            ),
            log_level=_log_level(src),
            handshake_timeout=src.get("handshake_timeout", "QUEUEKIT_HANDSHAKE_TIMEOUT", 10.0, _positive_float),
            max_handshakes=src.get("max_handshakes", "QUEUEKIT_MAX_HANDSHAKES", 64, _positive_int),
            max_handshakes_per_address=src.get(
                "max_handshakes_per_address", "QUEUEKIT_MAX_HANDSHAKES_PER_ADDRESS", 8, _positive_int
            ),
            auth_failures_per_minute=src.get(
                "auth_failures_per_minute", "QUEUEKIT_AUTH_FAILURES_PER_MINUTE", 10, _positive_int
            ),
            max_message_bytes=src.get(
                "max_message_bytes",
                "QUEUEKIT_MAX_MESSAGE_BYTES",
                derived_max_message_bytes(
                    src.get("max_task_bytes", "QUEUEKIT_MAX_TASK_BYTES", DEFAULT_MAX_TASK_BYTES, _positive_int)
                ),
                _positive_int,
            ),
            frame_timeout=src.get("frame_timeout", "QUEUEKIT_FRAME_TIMEOUT", DEFAULT_FRAME_TIMEOUT, _positive_float),
            max_queues=src.get("max_queues", "QUEUEKIT_MAX_QUEUES", DEFAULT_MAX_QUEUES, _positive_int),
            max_result_bytes=src.get(
                "max_result_bytes", "QUEUEKIT_MAX_RESULT_BYTES", DEFAULT_MAX_RESULT_BYTES, _positive_int
            ),
            result_ttl=src.get("result_ttl", "QUEUEKIT_RESULT_TTL", DEFAULT_RESULT_TTL, _non_negative_float),
            result_max_count=src.get(
                "result_max_count", "QUEUEKIT_RESULT_MAX_COUNT", DEFAULT_RESULT_MAX_COUNT, _non_negative_int
            ),
            result_max_bytes=src.get(
                "result_max_bytes", "QUEUEKIT_RESULT_MAX_BYTES", DEFAULT_RESULT_MAX_BYTES, _non_negative_int
            ),
            dashboard_admin_token_file=(
                admin_file := src.get(
                    "dashboard_admin_token_file", "QUEUEKIT_DASHBOARD_ADMIN_TOKEN_FILE", None, _optional_path
                )
            ),
            dashboard_admin_token=load_http_token(
                admin_file, "dashboard admin token file", "QUEUEKIT_DASHBOARD_ADMIN_TOKEN_FILE"
            )
            if admin_file and need_authkey
            else None,
            dashboard_sample_seconds=src.get(
                "dashboard_sample_seconds", "QUEUEKIT_DASHBOARD_SAMPLE_SECONDS", 10.0, _positive_float
            ),
        )


@dataclasses.dataclass(frozen=True)
class ClientSettings:
    server: ServerList
    authkey_file: str
    authkey: Secret
    connect_timeout: float
    max_task_bytes: int
    log_level: str
    call_timeout: float = DEFAULT_CALL_TIMEOUT  # seconds a reply may take beyond the server's wait
    # TLS to the server: on when a CA file is given. The client's own certificate (mutual TLS)
    # has its own variables, QUEUEKIT_TLS_CLIENT_CERT_FILE/_KEY_FILE, so a shell or an env file
    # that also configures a server (QUEUEKIT_TLS_CERT_FILE/_KEY_FILE) never mixes the two.
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_server_name: str | None = None

    @classmethod
    def load(cls, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> ClientSettings:
        src = _Sources(flags, env)
        authkey_file = src.get("authkey_file", "QUEUEKIT_AUTHKEY_FILE", DEFAULT_AUTHKEY_FILE, str)
        return cls(
            server=src.get(
                "server", "QUEUEKIT_SERVER", ServerList([Address("localhost", DEFAULT_PORT)]), ServerList.parse
            ),
            authkey_file=authkey_file,
            authkey=load_authkey(authkey_file),
            connect_timeout=src.get("connect_timeout", "QUEUEKIT_CONNECT_TIMEOUT", 30.0, _positive_float),
            max_task_bytes=src.get("max_task_bytes", "QUEUEKIT_MAX_TASK_BYTES", DEFAULT_MAX_TASK_BYTES, _positive_int),
            log_level=_log_level(src),
            call_timeout=src.get("call_timeout", "QUEUEKIT_CALL_TIMEOUT", DEFAULT_CALL_TIMEOUT, _call_timeout),
            tls_ca_file=src.get("tls_ca_file", "QUEUEKIT_TLS_CA_FILE", None, _optional_path),
            tls_cert_file=src.get("tls_client_cert_file", "QUEUEKIT_TLS_CLIENT_CERT_FILE", None, _optional_path),
            tls_key_file=src.get("tls_client_key_file", "QUEUEKIT_TLS_CLIENT_KEY_FILE", None, _optional_path),
            tls_server_name=src.get("tls_server_name", "QUEUEKIT_TLS_SERVER_NAME", None, _optional_path),
        )


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    client: ClientSettings
    queues: tuple[str, ...]  # strict priority order: the first is emptied first
    handler: str
    concurrency: int
    prefetch: int
    lease_seconds: float
    drain_timeout: float
    task_timeout: float  # seconds a run may take unless the task says otherwise; 0: none
    pool: str  # thread | process
    health_file: str | None  # what `consume --probe` reads; None: not written

    @classmethod
    def load(cls, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> WorkerSettings:
        src = _Sources(flags, env)
        handler = src.get("handler", "QUEUEKIT_HANDLER", None, str)
        if not handler:
            raise ConfigError("no handler: pass --handler pkg.module:function or set QUEUEKIT_HANDLER")
        concurrency = src.get("concurrency", "QUEUEKIT_CONCURRENCY", 1, _positive_int)
        return cls(
            client=ClientSettings.load(flags, env),
            queues=src.get("queue", "QUEUEKIT_QUEUE", ("tasks",), _queue_list),
            handler=handler,
            concurrency=concurrency,
            prefetch=src.get("prefetch", "QUEUEKIT_PREFETCH", 2 * concurrency, _non_negative_int),
            lease_seconds=src.get("lease", "QUEUEKIT_LEASE_SECONDS", 30.0, _positive_float),
            drain_timeout=src.get("drain_timeout", "QUEUEKIT_DRAIN_TIMEOUT", 25.0, _non_negative_float),
            task_timeout=src.get("task_timeout", "QUEUEKIT_TASK_TIMEOUT", DEFAULT_TASK_TIMEOUT, _non_negative_float),
            pool=src.get("pool", "QUEUEKIT_POOL", "thread", _choice("thread", "process")),
            health_file=health_file_setting(flags, env),
        )


# Ten minutes, as dramatiq's default: longer than almost every real task, short enough that a hung
# handler frees its seat (and, in the thread pool, is noticed) the same hour (docs/ARCHITECTURE.md).
DEFAULT_TASK_TIMEOUT = 600.0


def health_file_setting(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """QUEUEKIT_HEALTH_FILE / --health-file: the consumer's health file; "off" or unset: none."""
    value = _Sources(flags, env).get("health_file", "QUEUEKIT_HEALTH_FILE", None, _optional_path)
    return None if value is None or value.lower() == "off" else value


def _queue_list(text: Any) -> tuple[str, ...]:
    """``high,default,low``: queue names in priority order, each once."""
    from .message import check_queue_name

    names = tuple(part.strip() for part in str(text).split(","))
    if not all(names):
        raise ValueError("an empty queue name (give names separated by commas, e.g. high,default,low)")
    if len(set(names)) != len(names):
        raise ValueError("a queue is named twice")
    try:
        return tuple(check_queue_name(name) for name in names)
    except QueuekitError as e:
        raise ValueError(str(e)) from None


DEFAULT_TUNNEL_MAX_CONNECTIONS = 256
DEFAULT_TUNNEL_IDLE_TIMEOUT = 3600.0


@dataclasses.dataclass(frozen=True)
class TunnelSettings:
    """``queuekit tunnel``: plaintext on ``listen`` (loopback unless ``allow_remote``), TLS to
    ``server``. No authkey: the clients' handshake passes through, inside TLS."""

    listen: Address
    server: Address
    allow_remote: bool
    tls_ca_file: str
    tls_cert_file: str | None
    tls_key_file: str | None
    tls_server_name: str | None
    max_connections: int
    idle_timeout: float  # 0: never
    handshake_timeout: float  # TCP connect + TLS handshake to the server
    log_level: str

    @classmethod
    def load(cls, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> TunnelSettings:
        src = _Sources(flags, env)
        tls_ca_file = src.get("tls_ca_file", "QUEUEKIT_TLS_CA_FILE", None, _optional_path)
        if not tls_ca_file:
            raise ConfigError(
                "queuekit tunnel forwards over TLS: set QUEUEKIT_TLS_CA_FILE (--tls-ca-file) to the CA that signed "
                "the server's certificate"
            )
        return cls(
            listen=src.get(
                "listen", "QUEUEKIT_TUNNEL_LISTEN", Address("127.0.0.1", DEFAULT_PORT), _address(DEFAULT_PORT)
            ),
            server=src.get("server", "QUEUEKIT_SERVER", Address("localhost", DEFAULT_PORT), _server_address),
            allow_remote=bool(src.flags.get("allow_remote")),
            tls_ca_file=tls_ca_file,
            tls_cert_file=src.get("tls_client_cert_file", "QUEUEKIT_TLS_CLIENT_CERT_FILE", None, _optional_path),
            tls_key_file=src.get("tls_client_key_file", "QUEUEKIT_TLS_CLIENT_KEY_FILE", None, _optional_path),
            tls_server_name=src.get("tls_server_name", "QUEUEKIT_TLS_SERVER_NAME", None, _optional_path),
            max_connections=src.get(
                "max_connections", "QUEUEKIT_TUNNEL_MAX_CONNECTIONS", DEFAULT_TUNNEL_MAX_CONNECTIONS, _positive_int
            ),
            idle_timeout=src.get(
                "idle_timeout", "QUEUEKIT_TUNNEL_IDLE_TIMEOUT", DEFAULT_TUNNEL_IDLE_TIMEOUT, _non_negative_float
            ),
            handshake_timeout=src.get("handshake_timeout", "QUEUEKIT_HANDSHAKE_TIMEOUT", 10.0, _positive_float),
            log_level=_log_level(src),
        )
