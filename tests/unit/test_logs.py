"""Log lines (queuekit.logs) in both formats: logfmt (default) and QUEUEKIT_LOG_FORMAT=json, one
event per line with the same fields; tracebacks on the event's line; a bad format refused."""

import io
import json
import re

import pytest

from queuekit import logs
from queuekit.errors import ConfigError


@pytest.fixture
def capture():
    """configure(fmt) -> the stream the queuekit logger writes to; the default is restored after."""
    stream = io.StringIO()
    yield lambda fmt: (logs.configure("debug", stream, fmt), stream)[1]
    logs.configure("info")


def emit(log: logs.EventLog) -> None:
    log.info("server_ready", bind="0.0.0.0:50000", durable=True, n=3, ratio=0.5, gone=None)
    log.warning("odd", text='say "hi"\nthere', level="x")  # a field named like a base field
    try:
        raise RuntimeError("boom")
    except RuntimeError as e:
        log.error("failed", exc_info=e, task=7)


def test_logfmt_is_the_default_and_unchanged(capture):
    stream = capture("logfmt")
    emit(logs.get("server"))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert re.fullmatch(
        r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=info component=server event=server_ready "
        r"bind=0\.0\.0\.0:50000 durable=true n=3 ratio=0\.5",
        lines[0],
    )
    assert lines[1].endswith('event=odd text="say \\"hi\\"\\nthere" level=x')
    assert "event=failed task=7 traceback=" in lines[2] and "RuntimeError: boom" in lines[2]
    assert logs.log_format({}) == "logfmt"


def test_json_has_the_same_fields_one_object_per_line(capture):
    stream = capture("json")
    emit(logs.get("server"))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    first, second, third = (json.loads(line) for line in lines)
    assert list(first) == ["ts", "level", "component", "event", "bind", "durable", "n", "ratio"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert first["level"] == "info" and first["component"] == "server" and first["event"] == "server_ready"
    assert (first["bind"], first["durable"], first["n"], first["ratio"]) == ("0.0.0.0:50000", True, 3, 0.5)
    assert second["text"] == 'say "hi"\nthere'
    assert second["level"] == "warning" and second["level_"] == "x"  # the base field is never replaced
    assert third["task"] == 7 and "RuntimeError: boom" in third["traceback"]


def test_json_values_are_always_valid_json(capture):
    stream = capture("json")
    logs.get("x").info("odd_values", nan=float("nan"), inf=float("inf"), obj=ValueError("v"), path=b"\xff")
    line = json.loads(stream.getvalue())  # json.loads refuses NaN only when asked: check by hand
    assert "NaN" not in stream.getvalue() and "Infinity" not in stream.getvalue()
    assert line["nan"] == "nan" and line["inf"] == "inf" and line["obj"] == "v" and line["path"] == "b'\\xff'"


def test_the_format_setting():
    assert logs.log_format({"QUEUEKIT_LOG_FORMAT": "JSON "}) == "json"
    assert logs.log_format({"QUEUEKIT_LOG_FORMAT": ""}) == "logfmt"
    with pytest.raises(ConfigError, match="QUEUEKIT_LOG_FORMAT='xml': must be one of logfmt, json"):
        logs.log_format({"QUEUEKIT_LOG_FORMAT": "xml"})
