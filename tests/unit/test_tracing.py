"""queuekit.tracing without OpenTelemetry (nothing imported, headers untouched, handler calls
unchanged) and with its API but no SDK (no-op: no headers). The trace across processes is in
tests/process/test_tracing_e2e.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

WITHOUT_OTEL = """
import sys
sys.modules["opentelemetry"] = None  # as if not installed: importing it raises ImportError
from types import SimpleNamespace
from queuekit import client, tracing, worker
assert not tracing.available()
assert tracing.inject("q", None) is None
headers = {"a": "b"}
out = tracing.inject("q", headers)
assert out == headers and out is not headers
task = SimpleNamespace(queue="q", id=1, attempts=0, headers=None)
with tracing.process(task):
    pass
try:
    with tracing.process(task):
        raise KeyError("goes on")
except KeyError:
    pass
else:
    raise AssertionError("the exception was swallowed")
print("ok", sorted(m for m, v in sys.modules.items() if m.startswith("opentelemetry") and v is not None))
"""

NO_SDK = """
import opentelemetry.trace  # what an application that uses OpenTelemetry has done
from types import SimpleNamespace
from queuekit import tracing
assert tracing.available()
assert tracing.inject("q", None) is None  # the API's default no-op tracer: invalid span, no headers
assert tracing.inject("q", {"a": "b"}) == {"a": "b"}
with tracing.process(SimpleNamespace(queue="q", id=1, attempts=0, headers={"traceparent": "garbage"})):
    pass
print("ok")
"""


def run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout


def test_without_opentelemetry_nothing_is_imported_or_added():
    assert run(WITHOUT_OTEL).strip() == "ok []"


def test_importing_queuekit_does_not_import_opentelemetry():
    code = "import sys, queuekit, queuekit.client, queuekit.worker, queuekit.tracing; "
    code += "print([m for m in sys.modules if m.startswith('opentelemetry')])"
    assert run(code).strip() == "[]"


NOT_IMPORTED = """
import sys
from types import SimpleNamespace
from queuekit import tracing
assert tracing.inject("q", {"a": "b"}) == {"a": "b"}
with tracing.process(SimpleNamespace(queue="q", id=1, attempts=0, headers={"traceparent": "x"})):
    pass
print([m for m in sys.modules if m.startswith("opentelemetry")])
"""


def test_installed_but_not_imported_by_the_application_is_never_imported():
    """Importing OpenTelemetry takes most of a second: queuekit leaves it to the application."""
    pytest.importorskip("opentelemetry.trace")
    assert run(NOT_IMPORTED).strip() == "[]"


def test_with_the_api_but_no_sdk_nothing_is_added():
    pytest.importorskip("opentelemetry.trace")
    assert run(NO_SDK).strip() == "ok"
