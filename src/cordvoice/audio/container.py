"""An audio file or URL opened with FFmpeg (PyAV): what the PCM decoder and the Opus demuxer share.

Both open a container, pick a stream, and must close the container on every path, including a failed set-up;
both answer how long the input is and whether it can seek. The reading itself differs (decode and resample
against passthrough packets), so it stays in :mod:`cordvoice.audio.decode` and :mod:`cordvoice.audio.demux`.
"""

from __future__ import annotations

import math
import os
import threading
from fractions import Fraction
from typing import IO, Any

import av

from cordvoice.audio.closeable import Closeable
from cordvoice.errors import AudioError, InvalidArgumentError

__all__ = ["NETWORK_TIMEOUT", "OpenContainer", "Source", "describe_source"]

NETWORK_TIMEOUT = 20.0
"""Seconds an open or a read may block when the caller gives no ``timeout``: a URL whose server stops
answering fails its track instead of holding one of the few source threads for good. ``math.inf`` waits
forever."""

Source = str | os.PathLike[str] | IO[bytes]
"""A path, a URL or a binary file object: whatever ``av.open`` reads."""


def describe_source(source: Source) -> str:
    """The source as error messages name it: the path or URL, or the file object's type."""
    if isinstance(source, str | os.PathLike):
        return repr(os.fspath(source))
    return f"<{type(source).__name__}>"


class OpenContainer(Closeable):
    """An open FFmpeg container and the stream the subclass reads from it.

    The constructor opens the container (an :class:`AudioError` if FFmpeg cannot); the subclass then sets
    ``_stream`` and ``_time_base`` and calls :meth:`_abandon` if its own set-up fails, so that nothing is left
    open. ``_lock`` serialises reads, seeks and ``close`` across threads.
    """

    _stream: Any
    _time_base: Fraction | None

    def __init__(
        self,
        source: Source,
        *,
        format: str | None = None,
        options: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._name = describe_source(source)
        if timeout is None:
            timeout = NETWORK_TIMEOUT
        elif not timeout > 0:
            raise InvalidArgumentError(f"timeout must be a positive number of seconds, got {timeout!r}")
        try:
            self._container: Any = av.open(
                source,
                mode="r",
                format=format,
                options=options or {},
                timeout=None if math.isinf(timeout) else timeout,
            )
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise AudioError(f"cannot open {self._name}: {exc}") from exc

    def _abandon(self) -> None:
        """The subclass's set-up failed: close the container and count as closed."""
        self._closed = True
        self._container.close()

    @property
    def duration(self) -> float | None:
        """Length in seconds when the container knows it."""
        if self._stream.duration is not None and self._time_base is not None:
            return float(self._stream.duration * self._time_base)
        if self._container.duration is not None:
            return float(self._container.duration) / 1_000_000
        return None

    @property
    def seekable(self) -> bool:
        """Whether ``seek`` can work: an input with a known length (a file; not a pipe or a live stream)."""
        return not self._closed and bool(self._container.duration)
