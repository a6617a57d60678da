"""One live progress line on stderr, for commands that run for a while.

On a terminal the line rewrites itself in place (at most five times a second). Into a file or a pipe it
prints a new line only when the phase changes or every few seconds, so a CI log stays short.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressLine"]

_TTY_INTERVAL = 0.2
_LOG_INTERVAL = 2.5


class ProgressLine:
    """``update(text, phase=...)`` while working, ``finish()`` at the end; ``enabled=False`` is silent."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = enabled
        isatty = getattr(self._stream, "isatty", None)
        self._tty = bool(isatty()) if callable(isatty) else False
        self._last = 0.0
        self._phase: str | None = None
        self._width = 0

    def update(self, text: str, *, phase: str | None = None) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        new_phase = phase is not None and phase != self._phase
        interval = _TTY_INTERVAL if self._tty else _LOG_INTERVAL
        if not new_phase and now - self._last < interval:
            return
        self._last = now
        if phase is not None:
            self._phase = phase
        if self._tty:
            padding = max(0, self._width - len(text))
            self._stream.write("\r" + text + " " * padding)
            self._width = len(text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def finish(self) -> None:
        """End the line (on a terminal), so what follows starts on a fresh one."""
        if self._enabled and self._tty and self._width:
            self._stream.write("\n")
            self._stream.flush()
            self._width = 0
