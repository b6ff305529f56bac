"""Fixtures for the integration tests: real containers on real Docker bridge networks.

The images are built once per session (``queuekit-<name>:test-<session id>``); everything is
labelled ``queuekit.test=<session id>`` and swept at session end, also after failures.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from support import dockerkit as dk

dk.configure_env()  # before testcontainers is imported: it reads its settings at import time

sys.path.insert(0, str(Path(__file__).parent))

from qkstack import Stack  # noqa: E402

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent
# Numbers worth reading in the summary (scaling ratio, timings), filled in by the tests.
METRICS: dict[str, str] = {}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).is_relative_to(HERE):
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def pytest_terminal_summary(terminalreporter):
    if METRICS:
        terminalreporter.section("queuekit integration measurements")
        for key, value in METRICS.items():
            terminalreporter.write_line(f"{key}: {value}")


def pytest_sessionfinish(session):
    if dk.session_active():  # only if this session touched Docker
        dk.sweep()


@pytest.fixture(scope="session")
def docker_ready():
    reason = dk.docker_unavailable_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    yield
    dk.sweep()


@pytest.fixture(scope="session")
def images(docker_ready) -> dict[str, str]:
    """queuekit-{server,consumer,producer}:test-<sid>, built once from the repository root (or from
    $QUEUEKIT_TEST_BUILD_CONTEXT: another checkout, e.g. a deliberately broken one)."""
    refs = dk.build_images(context=os.environ.get("QUEUEKIT_TEST_BUILD_CONTEXT") or None)
    yield refs
    dk.remove_images(refs.values())


def _failed(request) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return rep is None or rep.failed


@pytest.fixture
def stack(images, request, tmp_path_factory):
    """A fresh stack on a network of its own; on failure its containers' logs are printed."""
    hint = request.node.name.removeprefix("test_").replace("_", "-")[:20]
    workdir = tmp_path_factory.mktemp(hint)
    workdir.chmod(0o755)
    s = Stack(images, workdir, hint)
    yield s
    if _failed(request):
        print(f"\n===== containers of {request.node.name} =====\n{s.dump()}")
    s.close()


@pytest.fixture
def metrics():
    return METRICS
