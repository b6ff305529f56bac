"""``make certs``: the development CA, server and client certificates, their modes, and a real TLS
server using them (loopback), checked by queuekit clients and by Python 3.13's strict verification.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import stat
import subprocess

import pytest
from cryptography import x509

import queuekit
from queuekit.errors import TLSError
from support.procs import ROOT, ServerProc

# CI installs openssl (.ci/run): there a missing command fails the tests instead of skipping them.
pytestmark = pytest.mark.skipif(
    (shutil.which("openssl") is None or shutil.which("make") is None) and not os.environ.get("CI"),
    reason="needs openssl and make",
)

FILES = ("ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key")
SERVICE_NAMES = [
    f"{svc}{suffix}"
    for svc in ("queuekit-server", "queuekit-server-headless")
    for suffix in ("", ".queuekit-dev.svc", ".queuekit-dev.svc.cluster.local")
]


def make_certs(directory, **env) -> subprocess.CompletedProcess:
    out = subprocess.run(
        ["make", "--no-print-directory", "certs", f"CERTS_DIR={directory}"],
        cwd=str(ROOT),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out


@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("make-certs") / "tls"
    make_certs(directory)
    return directory


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_and_modes(certs_dir):
    assert sorted(p.name for p in certs_dir.iterdir()) == sorted(FILES)
    assert mode(certs_dir) == 0o700
    for name in ("ca.crt", "server.crt", "client.crt"):
        assert mode(certs_dir / name) == 0o644, name
    assert mode(certs_dir / "ca.key") == 0o600 and os.stat(certs_dir / "ca.key").st_uid == os.getuid()
    for name in ("server.key", "client.key"):
        st = os.stat(certs_dir / name)
        if os.getuid() == 0:  # as `make secrets` does: the containers' uid owns the keys they read
            assert (st.st_uid, st.st_gid, mode(certs_dir / name)) == (10001, 10001, 0o600), name
        else:
            assert (st.st_uid, mode(certs_dir / name)) == (os.getuid(), 0o640), name


def test_names_and_usages(certs_dir):
    server = x509.load_pem_x509_certificate((certs_dir / "server.crt").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"server", "localhost", *SERVICE_NAMES}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    usages = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    client = x509.load_pem_x509_certificate((certs_dir / "client.crt").read_bytes())
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    ca = x509.load_pem_x509_certificate((certs_dir / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for leaf in (server, client):
        assert leaf.issuer == ca.subject


def test_idempotent_and_force_renews(tmp_path):
    directory = tmp_path / "tls"
    first = make_certs(directory)
    assert first.stdout.count("certs: created") == len(FILES)
    before = {name: (directory / name).read_bytes() for name in FILES}
    again = make_certs(directory)
    assert "created" not in again.stdout
    assert {name: (directory / name).read_bytes() for name in FILES} == before
    # A missing client key: only the client's key and certificate are made again.
    (directory / "client.key").unlink()
    partial = make_certs(directory)
    assert partial.stdout.count("certs: created") == 2 and "client.crt" in partial.stdout
    assert (directory / "server.crt").read_bytes() == before["server.crt"]
    renewed = make_certs(directory, FORCE="1")
    assert renewed.stdout.count("certs: created") == len(FILES)
    assert all((directory / name).read_bytes() != before[name] for name in FILES)


@pytest.fixture
def tls_server(tmp_path, key_file, certs_dir):
    proc = ServerProc(
        tmp_path,
        key_file,
        "--tls-cert-file",
        str(certs_dir / "server.crt"),
        "--tls-key-file",
        str(certs_dir / "server.key"),
        "--tls-client-ca-file",
        str(certs_dir / "ca.crt"),
    )
    yield proc
    proc.stop()


def strict_handshake(port: int, name: str, certs_dir) -> str:
    """A TLS handshake with Python 3.13's default verification flags (strict X.509), whatever
    Python runs the test; returns the negotiated version."""
    context = ssl.create_default_context(cafile=str(certs_dir / "ca.crt"))
    context.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
    context.load_cert_chain(str(certs_dir / "client.crt"), str(certs_dir / "client.key"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=name) as tls:
            return tls.version() or ""


def test_a_server_with_these_files_serves_each_local_name_with_mutual_tls(tls_server, key_file, certs_dir):
    tls = {
        "tls_ca_file": str(certs_dir / "ca.crt"),
        "tls_cert_file": str(certs_dir / "client.crt"),
        "tls_key_file": str(certs_dir / "client.key"),
    }
    for address in (f"localhost:{tls_server.port}", f"127.0.0.1:{tls_server.port}"):
        with queuekit.connect(address, authkey_file=str(key_file), connect_timeout=5, **tls) as client:
            client.queue("certs").put(address)
            assert client.queue("certs").get(timeout=5).payload == address
    for name in ("localhost", "127.0.0.1"):
        assert strict_handshake(tls_server.port, name, certs_dir) in ("TLSv1.2", "TLSv1.3")
    # The check is real: a name the certificate does not hold is refused.
    with pytest.raises(TLSError, match="not valid for 'queue.example.org'"):
        queuekit.connect(
            f"127.0.0.1:{tls_server.port}",
            authkey_file=str(key_file),
            connect_timeout=5,
            tls_server_name="queue.example.org",
            **tls,
        )
    lines = [line for line in tls_server.log().splitlines() if "event=client_connected" in line]
    assert len(lines) == 2 and all(line.endswith("tls=true") for line in lines)
