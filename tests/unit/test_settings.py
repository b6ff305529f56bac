import os

import pytest

from queuekit import cli
from queuekit import settings as settings_module
from queuekit.client import Client
from queuekit.errors import AuthkeyFileError, ConfigError
from queuekit.settings import Address, ClientSettings, Secret, ServerSettings, WorkerSettings, load_authkey

KEY = b"0123456789abcdef0123456789abcdef"


@pytest.fixture
def keyfile(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(KEY + b"\n")
    return str(path)


def test_authkey_trailing_newline_is_stripped(tmp_path, keyfile):
    assert load_authkey(keyfile).reveal() == KEY
    crlf = tmp_path / "crlf"
    crlf.write_bytes(KEY + b"\r\n")
    assert load_authkey(str(crlf)).reveal() == KEY


@pytest.mark.parametrize(
    "content, message",
    [(b"", "is empty"), (b"\n", "is empty"), (b"short\n", "holds 5 bytes"), (b"x" * 31 + b"\n", "holds 31 bytes")],
)
def test_short_or_empty_key_is_refused_with_the_fix(tmp_path, content, message):
    path = tmp_path / "key"
    path.write_bytes(content)
    with pytest.raises(AuthkeyFileError, match=message) as e:
        load_authkey(str(path))
    assert str(path) in str(e.value) and "queuekit keygen" in str(e.value)


def test_missing_key_file_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(AuthkeyFileError, match="does not exist") as e:
        load_authkey(str(tmp_path / "nope"))
    assert "nope" in str(e.value) and "queuekit keygen" in str(e.value)


def test_directory_instead_of_key_file(tmp_path):
    with pytest.raises(AuthkeyFileError, match="is a directory"):
        load_authkey(str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file; the container tests run this as uid 10001")
def test_unreadable_key_file(keyfile):
    os.chmod(keyfile, 0)
    with pytest.raises(AuthkeyFileError, match="not readable"):
        load_authkey(keyfile)


def test_settings_repr_never_shows_the_key(keyfile):
    settings = ServerSettings.load({"authkey_file": keyfile}, env={})
    for text in (repr(settings), str(settings), repr(ClientSettings.load({"authkey_file": keyfile}, env={}))):
        assert KEY.decode() not in text and "redacted" in text
    with pytest.raises(TypeError):
        __import__("pickle").dumps(settings.authkey)


def test_defaults(keyfile):
    s = ServerSettings.load({}, env={"QUEUEKIT_AUTHKEY_FILE": keyfile})
    assert (str(s.bind), str(s.http), s.data_dir, s.sync, s.max_task_bytes, s.max_attempts) == (
        "127.0.0.1:50000",
        "127.0.0.1:8080",
        None,
        "full",
        1048576,
        5,
    )
    c = ClientSettings.load({}, env={"QUEUEKIT_AUTHKEY_FILE": keyfile})
    assert str(c.server) == "localhost:50000"
    w = WorkerSettings.load({"handler": "m:f"}, env={"QUEUEKIT_AUTHKEY_FILE": keyfile, "QUEUEKIT_CONCURRENCY": "3"})
    assert (w.queues, w.concurrency, w.prefetch, w.lease_seconds, w.drain_timeout) == (("tasks",), 3, 6, 30.0, 25.0)


def test_default_authkey_path_is_the_secret_mount(monkeypatch):
    """Without flag or env every command reads the key from the secret mount. Which files exist on
    this machine does not matter (inside the images that path exists): the loader is replaced by
    one that records the path it was asked for."""
    secret_mount = "/run/secrets/queuekit_authkey"  # the documented contract (images, Compose, k8s)
    assert settings_module.DEFAULT_AUTHKEY_FILE == secret_mount
    asked = []

    def fake_load(path):
        asked.append(path)
        return Secret(KEY)

    monkeypatch.setattr(settings_module, "load_authkey", fake_load)
    server = ServerSettings.load({}, env={})
    client = ClientSettings.load({}, env={})
    worker = WorkerSettings.load({"handler": "m:f"}, env={})
    assert asked == [secret_mount] * 3
    assert server.authkey_file == client.authkey_file == worker.client.authkey_file == secret_mount
    assert server.authkey.reveal() == KEY
    # ...and the default is only a default: env, then flag, win over it.
    env = {"QUEUEKIT_AUTHKEY_FILE": "/env/key"}
    assert ServerSettings.load({}, env=env).authkey_file == "/env/key"
    assert ServerSettings.load({"authkey_file": "/flag/key"}, env=env).authkey_file == "/flag/key"
    assert asked[3:] == ["/env/key", "/flag/key"]


def test_flag_wins_over_env(keyfile):
    env = {"QUEUEKIT_AUTHKEY_FILE": keyfile, "QUEUEKIT_BIND": "127.0.0.1:1", "QUEUEKIT_HTTP": "off"}
    s = ServerSettings.load({"bind": "127.0.0.2:2"}, env=env)
    assert str(s.bind) == "127.0.0.2:2" and s.http is None


@pytest.mark.parametrize(
    "env, source",
    [
        ({"QUEUEKIT_BIND": "host:notaport"}, "QUEUEKIT_BIND"),
        ({"QUEUEKIT_SYNC": "sometimes"}, "QUEUEKIT_SYNC"),
        ({"QUEUEKIT_MAX_TASK_BYTES": "-1"}, "QUEUEKIT_MAX_TASK_BYTES"),
    ],
)
def test_bad_values_name_their_source(keyfile, env, source):
    with pytest.raises(ConfigError, match=source):
        ServerSettings.load({}, env={"QUEUEKIT_AUTHKEY_FILE": keyfile, **env})


def test_call_timeout_from_env_and_flag(keyfile):
    env = {"QUEUEKIT_AUTHKEY_FILE": keyfile}
    assert ClientSettings.load({}, env=env).call_timeout == 10.0
    assert ClientSettings.load({}, env={**env, "QUEUEKIT_CALL_TIMEOUT": "2.5"}).call_timeout == 2.5
    assert ClientSettings.load({"call_timeout": 4.0}, env={**env, "QUEUEKIT_CALL_TIMEOUT": "2.5"}).call_timeout == 4.0
    worker = WorkerSettings.load({"handler": "m:f"}, env={**env, "QUEUEKIT_CALL_TIMEOUT": "3"})
    assert worker.client.call_timeout == 3.0


@pytest.mark.parametrize(
    "text, why",
    [
        ("0", "must be a number of seconds > 0"),
        ("-1", "must be a number of seconds > 0"),
        ("nan", "must be a number of seconds > 0"),
        ("inf", "must be a number of seconds > 0"),
        ("ten", "could not convert string to float"),
    ],
)
def test_bad_call_timeout(keyfile, text, why):
    with pytest.raises(ConfigError, match=rf"invalid QUEUEKIT_CALL_TIMEOUT='{text}': {why}"):
        ClientSettings.load({}, env={"QUEUEKIT_AUTHKEY_FILE": keyfile, "QUEUEKIT_CALL_TIMEOUT": text})


def test_bad_call_timeout_flag(keyfile):
    with pytest.raises(ConfigError, match=r"invalid --call-timeout=0\.0: must be a number of seconds > 0"):
        ClientSettings.load({"call_timeout": 0.0}, env={"QUEUEKIT_AUTHKEY_FILE": keyfile})


def test_client_commands_pass_the_call_timeout_on(keyfile, monkeypatch):
    """Every client command builds its Client in cli._client (consume, produce, stats, status,
    cancel, result, dead, check)."""
    monkeypatch.setenv("QUEUEKIT_CALL_TIMEOUT", "4")
    assert cli._client({"authkey_file": keyfile}, "test").call_timeout == 4.0
    assert cli._client({"authkey_file": keyfile, "call_timeout": 2.5}, "test").call_timeout == 2.5
    monkeypatch.delenv("QUEUEKIT_CALL_TIMEOUT")
    assert cli._client({"authkey_file": keyfile}, "test").call_timeout == 10.0


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf")])
def test_client_refuses_a_bad_call_timeout(value):
    with pytest.raises(ConfigError, match="call_timeout must be a number of seconds > 0"):
        Client("localhost:50000", KEY, call_timeout=value)


def test_consumer_needs_a_handler(keyfile):
    with pytest.raises(ConfigError, match="QUEUEKIT_HANDLER"):
        WorkerSettings.load({}, env={"QUEUEKIT_AUTHKEY_FILE": keyfile})


@pytest.mark.parametrize(
    "text, expected", [("h:1", ("h", 1)), ("[::1]:5", ("::1", 5)), (":7", ("0.0.0.0", 7)), ("host", ("host", 50000))]
)
def test_address_parsing(text, expected):
    assert Address.parse(text, 50000).tuple() == expected


@pytest.mark.parametrize("text", ["::1:5", "h:x", "h:70000", "[::1"])
def test_bad_addresses(text):
    with pytest.raises(ValueError):
        Address.parse(text)


def test_client_needs_a_server_host(keyfile):
    with pytest.raises(ConfigError, match="QUEUEKIT_SERVER"):
        ClientSettings.load({}, env={"QUEUEKIT_AUTHKEY_FILE": keyfile, "QUEUEKIT_SERVER": ":50000"})
