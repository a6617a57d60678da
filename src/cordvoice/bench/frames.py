"""Real Opus frames for the benchmarks, encoded once per process, and a provider that loops them."""

from __future__ import annotations

import functools

from cordvoice.audio.opus import OpusEncoder
from cordvoice.audio.pcm import FRAME_BYTES, iter_frames
from cordvoice.audio.samples import speech_like

__all__ = ["LoopingFrames", "opus_frames"]

DEFAULT_BITRATE = 64_000
"""A normal Discord channel's bitrate; about 160-byte frames for speech."""


@functools.cache
def opus_frames(seconds: float = 1.0, bitrate: int = DEFAULT_BITRATE, voice: int = 0) -> tuple[bytes, ...]:
    """``seconds`` of speech-like audio as 20 ms Opus packets (libopus, constrained VBR)."""
    pcm = speech_like(seconds, voice=voice)
    with OpusEncoder(bitrate=bitrate) as encoder:
        return tuple(encoder.encode(frame) for frame in iter_frames(pcm) if len(frame) == FRAME_BYTES)


class LoopingFrames:
    """A :class:`~cordvoice.audio.transmit.FrameProvider` that never runs dry: the same frames, in a loop.

    It is not ``Sized`` on purpose, so the transmit lane keeps ticking. ``pulled`` counts frames handed out.
    """

    __slots__ = ("_frames", "_index", "pulled")

    def __init__(self, frames: tuple[bytes, ...], offset: int = 0) -> None:
        self._frames = frames
        self._index = offset % len(frames)
        self.pulled = 0

    def pull(self) -> bytes | None:
        frame = self._frames[self._index]
        self._index = (self._index + 1) % len(self._frames)
        self.pulled += 1
        return frame
