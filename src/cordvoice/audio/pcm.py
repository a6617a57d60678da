"""Discord's PCM format and small numpy helpers around it.

Everything in cordvoice's audio pipeline moves 20 ms frames of 48 kHz stereo signed 16-bit little-endian
interleaved PCM, as ``bytes`` of exactly :data:`FRAME_BYTES`. These helpers view, measure and re-chunk
such frames with numpy, because per-sample Python loops cost milliseconds per frame (volume and mixing live
in :mod:`cordvoice.audio.mixer`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import IO, Final, TypeAlias

import numpy as np
import numpy.typing as npt

from cordvoice.errors import InvalidArgumentError

__all__ = [
    "CHANNELS",
    "FRAME_BYTES",
    "FRAME_DURATION",
    "FRAME_SAMPLES",
    "SAMPLE_RATE",
    "SAMPLE_WIDTH",
    "SILENCE_FRAME",
    "BytesLike",
    "FrameChunker",
    "Int16Array",
    "aiter_frames",
    "as_array",
    "dbfs",
    "iter_frames",
    "iter_frames_from_file",
    "peak",
    "rms",
    "silence",
]

SAMPLE_RATE: Final = 48_000
"""Samples per second per channel; Discord's Opus clock."""
CHANNELS: Final = 2
SAMPLE_WIDTH: Final = 2
"""Bytes per sample (s16)."""
FRAME_SAMPLES: Final = 960
"""Samples per channel in one 20 ms frame; also the RTP timestamp step per frame."""
FRAME_BYTES: Final = FRAME_SAMPLES * CHANNELS * SAMPLE_WIDTH
"""3840: bytes in one 20 ms stereo s16 frame."""
FRAME_DURATION: Final = FRAME_SAMPLES / SAMPLE_RATE
"""0.02 seconds."""
SILENCE_FRAME: Final = bytes(FRAME_BYTES)

BytesLike: TypeAlias = bytes | bytearray | memoryview
Int16Array: TypeAlias = npt.NDArray[np.int16]

_FULL_SCALE: Final = 32768.0
_BIG_ENDIAN: Final = sys.byteorder == "big"


def as_array(pcm: BytesLike) -> Int16Array:
    """View s16le PCM as an int16 array without copying (read-only when ``pcm`` is ``bytes``)."""
    if len(pcm) % SAMPLE_WIDTH:
        raise InvalidArgumentError(f"PCM length {len(pcm)} is not a whole number of 16-bit samples")
    array = np.frombuffer(pcm, dtype="<i2")
    return array.astype(np.int16) if _BIG_ENDIAN else array


def silence(samples: int = FRAME_SAMPLES) -> bytes:
    """Return ``samples`` per channel of stereo digital silence."""
    if samples < 0:
        raise InvalidArgumentError("samples must be >= 0")
    return bytes(samples * CHANNELS * SAMPLE_WIDTH)


def rms(pcm: BytesLike) -> float:
    """Root mean square level of s16 PCM, as a fraction of full scale (0.0 to 1.0)."""
    array = as_array(pcm)
    if array.size == 0:
        return 0.0
    as_float = array.astype(np.float32)
    return float(math.sqrt(float(np.dot(as_float, as_float)) / array.size)) / _FULL_SCALE


def peak(pcm: BytesLike) -> float:
    """Largest absolute sample of s16 PCM, as a fraction of full scale (0.0 to 1.0)."""
    array = as_array(pcm)
    if array.size == 0:
        return 0.0
    # max(-min, max) avoids np.abs overflowing on -32768.
    return max(-int(array.min()), int(array.max())) / _FULL_SCALE


def dbfs(level: float) -> float:
    """Convert a level from :func:`rms` or :func:`peak` to dBFS (``-inf`` for silence)."""
    return 20.0 * math.log10(level) if level > 0.0 else -math.inf


class FrameChunker:
    """Re-chunk a stream of arbitrary byte chunks into exact 20 ms frames.

    PCM from files, sockets or async iterators arrives in arbitrary sizes; the player needs
    :data:`FRAME_BYTES` per tick. ``feed`` returns every frame completed so far; ``flush`` returns the final
    partial frame padded with zeros (or nothing if there is none).
    """

    __slots__ = ("_buffer", "_frame_bytes")

    def __init__(self, frame_bytes: int = FRAME_BYTES) -> None:
        if frame_bytes <= 0 or frame_bytes % (CHANNELS * SAMPLE_WIDTH):
            raise InvalidArgumentError("frame_bytes must be a positive multiple of 4")
        self._frame_bytes = frame_bytes
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held back until a frame completes."""
        return len(self._buffer)

    def feed(self, chunk: BytesLike) -> list[bytes]:
        """Add ``chunk`` and return the frames it completes (possibly none)."""
        size = self._frame_bytes
        if not self._buffer and len(chunk) == size:
            return [bytes(chunk)]  # the common case for well-behaved sources: no copying through the buffer
        self._buffer += chunk
        count = len(self._buffer) // size
        if not count:
            return []
        view = memoryview(self._buffer)
        try:
            frames = [bytes(view[i * size : (i + 1) * size]) for i in range(count)]
        finally:
            view.release()
        del self._buffer[: count * size]
        return frames

    def flush(self) -> bytes | None:
        """Return the last partial frame padded with zeros, or ``None`` when nothing is pending."""
        if not self._buffer:
            return None
        frame = bytes(self._buffer) + bytes(self._frame_bytes - len(self._buffer))
        self._buffer.clear()
        return frame

    def clear(self) -> None:
        """Forget pending bytes (after a seek)."""
        self._buffer.clear()


def iter_frames(data: BytesLike | Iterable[BytesLike], *, pad: bool = True) -> Iterator[bytes]:
    """Yield 20 ms frames from one bytes object or an iterable of chunks; pad the last one with zeros.

    With ``pad=False`` a trailing partial frame is dropped instead.
    """
    chunker = FrameChunker()
    chunks: Iterable[BytesLike] = (data,) if isinstance(data, bytes | bytearray | memoryview) else data
    for chunk in chunks:
        yield from chunker.feed(chunk)
    last = chunker.flush()
    if last is not None and pad:
        yield last


def iter_frames_from_file(file: IO[bytes], *, pad: bool = True) -> Iterator[bytes]:
    """Yield 20 ms frames read from a binary file-like object until EOF (blocking: use a worker thread)."""
    chunker = FrameChunker()
    while True:
        chunk = file.read(FRAME_BYTES)
        if not chunk:
            break
        yield from chunker.feed(chunk)
    last = chunker.flush()
    if last is not None and pad:
        yield last


async def aiter_frames(chunks: AsyncIterable[BytesLike], *, pad: bool = True) -> AsyncIterator[bytes]:
    """Yield 20 ms frames from an async iterable of arbitrary PCM chunks (TTS engines, network streams)."""
    chunker = FrameChunker()
    async for chunk in chunks:
        for frame in chunker.feed(chunk):
            yield frame
    last = chunker.flush()
    if last is not None and pad:
        yield last
