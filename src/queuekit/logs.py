"""One log line per event, ``key=value`` pairs, on stderr.

    ts=2026-11-26T15:41:59.123Z level=info component=server event=server_ready bind=0.0.0.0:50000

Values that contain spaces, quotes, ``=`` or newlines are written as JSON strings, so every event
stays on one line and ``grep event=dead_lettered`` finds it. Callers never pass secrets here.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

ExcInfo = BaseException | bool | None  # what logging accepts as exc_info here

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_ROOT = "queuekit"


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    if not text or any(c in text for c in ' "=\n\r\t\\'):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_event(level: str, component: str, event: str, fields: dict) -> str:
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    parts = [f"ts={stamp}", f"level={level}", f"component={component}", f"event={event}"]
    parts.extend(f"{key}={_format_value(value)}" for key, value in fields.items() if value is not None)
    return " ".join(parts)


class _LineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = record.getMessage()
        if record.exc_info:
            # Keep the traceback on the same line as its event.
            line += " traceback=" + json.dumps(self.formatException(record.exc_info))
        return line


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """Install the line formatter on the ``queuekit`` logger. Idempotent."""
    if level not in _LEVELS:
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)}, not {level!r}")
    root = logging.getLogger(_ROOT)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_LineFormatter())
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
            self._logger.log(levelno, "%s", format_event(level, self.component, event, fields), exc_info=exc_info)

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
