"""One log line per event on stderr: ``key=value`` pairs (logfmt, the default) or one JSON object.

    ts=2026-11-26T15:41:59.123Z level=info component=server event=server_ready bind=0.0.0.0:50000
    {"ts": "2026-11-26T15:41:59.123Z", "level": "info", "component": "server", "event": "server_ready", "bind": ...}

``QUEUEKIT_LOG_FORMAT=json`` picks the second (log pipelines that parse JSON, e.g. Kubernetes'),
with the same fields in the same order. In logfmt, values that contain spaces, quotes, ``=`` or
newlines are written as JSON strings, so every event stays on one line and
``grep event=dead_lettered`` finds it; in JSON, numbers and booleans keep their type and anything
else is its ``str``. A traceback rides on the same line as its event (``traceback``). Callers
never pass secrets here.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, TextIO

from .errors import ConfigError

ExcInfo = BaseException | bool | None  # what logging accepts as exc_info here

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("logfmt", "json")
_ROOT = "queuekit"
_BASE = ("ts", "level", "component", "event")  # the fields every line starts with


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    if not text or any(c in text for c in ' "=\n\r\t\\'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _json_value(value: object) -> object:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)  # JSON has no NaN
    return str(value)


def _stamp(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class Event:
    """One event, rendered when a handler writes it (``str``: logfmt; :meth:`as_json`)."""

    __slots__ = ("ts", "level", "component", "event", "fields")

    def __init__(self, level: str, component: str, event: str, fields: dict):
        self.ts = _stamp(time.time())
        self.level = level
        self.component = component
        self.event = event
        self.fields = fields

    def __str__(self) -> str:
        parts = [f"ts={self.ts}", f"level={self.level}", f"component={self.component}", f"event={self.event}"]
        parts.extend(f"{key}={_format_value(value)}" for key, value in self.fields.items() if value is not None)
        return " ".join(parts)

    def as_json(self, traceback: str | None = None) -> str:
        out: dict[str, object] = {"ts": self.ts, "level": self.level, "component": self.component, "event": self.event}
        for key, value in self.fields.items():
            if value is not None:
                # A field named like a base field must not replace it.
                out[f"{key}_" if key in _BASE else key] = _json_value(value)
        if traceback is not None:
            out["traceback"] = traceback
        return json.dumps(out, ensure_ascii=False)


def format_event(level: str, component: str, event: str, fields: dict) -> str:
    """The logfmt line of one event."""
    return str(Event(level, component, event, fields))


class _LineFormatter(logging.Formatter):
    def __init__(self, fmt: str = "logfmt"):
        super().__init__()
        self.json = fmt == "json"

    def format(self, record: logging.LogRecord) -> str:
        event = record.args[0] if isinstance(record.args, tuple) and record.args else None
        traceback = self.formatException(record.exc_info) if record.exc_info else None
        if self.json:
            if not isinstance(event, Event):  # a foreign record on our logger: still one JSON object
                event = Event(record.levelname.lower(), record.name, "message", {"message": record.getMessage()})
            return event.as_json(traceback)
        line = record.getMessage()
        if traceback is not None:
            line += " traceback=" + json.dumps(traceback)  # keep the traceback on the event's line
        return line


def log_format(env: dict[str, str] | None = None) -> str:
    """``QUEUEKIT_LOG_FORMAT`` (default logfmt); :class:`ConfigError` for anything else."""
    raw = (os.environ if env is None else env).get("QUEUEKIT_LOG_FORMAT", "")
    value = raw.strip().lower() or "logfmt"
    if value not in FORMATS:
        raise ConfigError(f"invalid QUEUEKIT_LOG_FORMAT={raw!r}: must be one of {', '.join(FORMATS)}")
    return value


def configure(level: str = "info", stream: TextIO | None = None, fmt: str = "logfmt") -> None:
    """Install the line formatter (``fmt``: logfmt or json) on the ``queuekit`` logger. Idempotent."""
    if level not in _LEVELS:
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)}, not {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    root = logging.getLogger(_ROOT)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_LineFormatter(fmt))
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    root.propagate = False


class EventLog:
    """A component's event logger: ``log.info("server_ready", bind="0.0.0.0:50000")``."""

    def __init__(self, component: str):
        self.component = component
        self._logger = logging.getLogger(f"{_ROOT}.{component}")

    def _emit(self, levelno: int, level: str, event: str, fields: dict, exc_info: ExcInfo = None) -> None:
        if self._logger.isEnabledFor(levelno):
            self._logger.log(levelno, "%s", Event(level, self.component, event, fields), exc_info=exc_info)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, "warning", event, fields)

    def error(self, event: str, exc_info: ExcInfo = None, **fields: Any) -> None:
        self._emit(logging.ERROR, "error", event, fields, exc_info=exc_info)


def get(component: str) -> EventLog:
    return EventLog(component)
