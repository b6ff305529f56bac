import pytest

import queuekit
from support.procs import ServerProc, cleanup_all, write_key

pytestmark = pytest.mark.process


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/process" in str(item.fspath):
            item.add_marker(pytest.mark.process)


@pytest.fixture
def key_file(tmp_path):
    return write_key(tmp_path / "authkey")


@pytest.fixture
def server(tmp_path, key_file):
    proc = ServerProc(tmp_path, key_file)
    yield proc
    proc.stop()


@pytest.fixture
def client(server, key_file):
    c = queuekit.connect(server.address, authkey_file=str(key_file), connect_timeout=5)
    yield c
    c.close()


@pytest.fixture(autouse=True)
def _reap_processes():
    yield
    cleanup_all()
