"""What the commands show on a terminal, and only there: ``stats --watch`` redrawn in place, and
``produce``'s progress line. Output to a pipe or a file stays plain lines a script can read."""

from __future__ import annotations

import time
from typing import TextIO

CLEAR_HOME = "\x1b[H\x1b[2J"  # cursor home, clear the screen (ANSI/VT100: every terminal emulator)
CLEAR_LINE = "\r\x1b[K"  # back to the line start, clear to its end


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class Progress:
    """``produced N tasks, R/s`` rewritten in place on ``stream`` (a terminal), at most every
    ``interval`` seconds; :meth:`close` leaves the last count on its own line."""

    def __init__(self, stream: TextIO, interval: float = 0.2):
        self._stream = stream
        self._interval = interval
        self._started = time.monotonic()
        self._shown_at = float("-inf")
        self._count = 0

    def _line(self) -> str:
        elapsed = time.monotonic() - self._started
        rate = self._count / elapsed if elapsed > 0 else 0.0
        return f"produced {self._count:,} tasks, {rate:,.0f}/s, {elapsed:.1f} s"

    def update(self, count: int) -> None:
        self._count = count
        now = time.monotonic()
        if now - self._shown_at >= self._interval:
            self._shown_at = now
            self._stream.write(CLEAR_LINE + self._line())
            self._stream.flush()

    def close(self) -> None:
        """The final count, and a newline, so what follows (a result, an error) starts clean."""
        self._stream.write(CLEAR_LINE + self._line() + "\n")
        self._stream.flush()
