"""Decode any file or URL PyAV can open into 20 ms frames of 48 kHz stereo s16 PCM.

This is the non-passthrough input of the player: MP3, WAV, Vorbis, AAC, video soundtracks, network streams.
Each frame is exactly :data:`~cordvoice.audio.pcm.FRAME_BYTES` long (the last one padded with zeros), ready
for the mixer and the Opus encoder. Decoding blocks and releases the GIL, so call :meth:`PCMDecoder.read`
from a worker thread. Every container is closed, on errors and early stops too.

A corrupt packet is skipped and counted in :attr:`PCMDecoder.decode_errors` instead of ending the track,
because slightly damaged MP3s are common; a run of many bad packets in a row is an error.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from fractions import Fraction
from typing import Any, Final

import av

from cordvoice.audio.container import OpenContainer, Source
from cordvoice.audio.pcm import CHANNELS, SAMPLE_RATE, SAMPLE_WIDTH, FrameChunker
from cordvoice.errors import AudioError, InvalidArgumentError

__all__ = ["PCMDecoder", "iter_pcm_frames"]

_MAX_CONSECUTIVE_ERRORS: Final = 50
_MAX_SEEK_OFFSET: Final = 2**63 - 1
"""FFmpeg timestamps are int64: a later seek is clamped to this and lands at the end like any late seek."""
_BYTES_PER_SAMPLE: Final = CHANNELS * SAMPLE_WIDTH
_SEEK_PREROLL: Final = SAMPLE_RATE * 80 // 1000
"""A seek decodes from 80 ms (Opus's recommended pre-roll) before its target and trims that off."""


class PCMDecoder(OpenContainer):
    """Decode the first audio stream of a file, file-like object or URL to 20 ms PCM frames.

    ``options`` are FFmpeg format options (e.g. ``{"reconnect": "1"}`` for HTTP); ``timeout`` bounds
    network opens and reads in seconds (None: ``NETWORK_TIMEOUT``, 20 s; ``math.inf``: unbounded);
    ``start`` seeks before the first frame. With ``pad=False`` the last frame is left short instead of
    padded with zeros, for callers that join the end to more audio (a looping track starts over right
    after it).
    """

    def __init__(
        self,
        source: Source,
        *,
        format: str | None = None,
        options: dict[str, str] | None = None,
        timeout: float | None = None,
        start: float = 0.0,
        pad: bool = True,
    ) -> None:
        self._av: Any = av
        self._pad = pad
        self.decode_errors = 0
        """Packets that failed to decode and were skipped."""
        super().__init__(source, format=format, options=options, timeout=timeout)
        try:
            if not self._container.streams.audio:
                raise AudioError(f"{self._name} has no audio stream")
            self._stream = self._container.streams.audio[0]
            self._time_base = self._stream.time_base
            self._chunker = FrameChunker()
            self._start_pts: int = self._stream.start_time or 0
            self._frames = self._generate(None)
            if start:
                self._seek_locked(start)
        except BaseException:
            self._abandon()
            raise

    @property
    def codec(self) -> str:
        """Name of the source's codec (``mp3float``, ``vorbis``, ``pcm_s16le``...)."""
        return str(self._stream.codec_context.name)

    @property
    def source_rate(self) -> int:
        """Sample rate of the source before resampling."""
        return int(self._stream.codec_context.sample_rate or 0)

    def _new_resampler(self) -> Any:
        return self._av.AudioResampler(format="s16", layout="stereo", rate=SAMPLE_RATE)

    def _generate(self, target: int | None) -> Generator[bytes, None, None]:
        """Frames from the current position.

        After a seek, ``target`` is the wanted position in 48 kHz samples from the stream start: output
        before it (containers land on a packet boundary earlier than asked) is dropped.
        """
        av = self._av
        resampler = self._new_resampler()
        layout: tuple[str, str, int] | None = None
        chunker = self._chunker
        chunker.clear()
        skip = 0

        def emit(frame: Any) -> Iterator[bytes]:
            """Resample ``frame`` (``None`` drains the resampler) and chunk what comes out."""
            nonlocal skip
            for out in resampler.resample(frame):
                data, skip = self._trim(out, skip)
                if data:
                    yield from chunker.feed(data)

        consecutive_errors = 0
        for packet in self._container.demux(self._stream):
            try:
                decoded = packet.decode()
            except av.InvalidDataError:
                self.decode_errors += 1
                consecutive_errors += 1
                if consecutive_errors > _MAX_CONSECUTIVE_ERRORS:
                    raise AudioError(f"{self._name}: too many undecodable packets in a row") from None
                continue
            consecutive_errors = 0
            for frame in decoded:
                if target is not None:
                    skip = self._samples_before(frame, target)
                    target = None
                # Concatenated MP3s and radio streams change rate or channels mid-stream; a resampler is
                # built for one input format, so drain it and start a new one.
                key = (frame.format.name, frame.layout.name, frame.sample_rate)
                if key != layout:
                    if layout is not None:
                        yield from emit(None)
                        resampler = self._new_resampler()
                    layout = key
                yield from emit(frame)
        yield from emit(None)
        pending = chunker.pending
        last = chunker.flush()
        if last is not None:
            yield last if self._pad else last[:pending]

    def _samples_before(self, frame: Any, target: int) -> int:
        """How many output samples of ``frame`` (the first after a seek) lie before ``target``."""
        if frame.pts is None or frame.time_base is None:
            return 0
        start: Fraction = (frame.pts - self._start_pts) * frame.time_base * SAMPLE_RATE
        return max(0, round(target - start))

    @staticmethod
    def _trim(frame: Any, skip: int) -> tuple[memoryview, int]:
        """The frame's packed s16 bytes (a view: planes carry alignment padding) minus ``skip`` samples."""
        samples = frame.samples
        data = memoryview(frame.planes[0])[: samples * _BYTES_PER_SAMPLE]
        if skip <= 0:
            return data, 0
        if skip >= samples:
            return data[:0], skip - samples
        return data[skip * _BYTES_PER_SAMPLE :], 0

    def read(self) -> bytes | None:
        """Return the next 20 ms frame (the last may be short with ``pad=False``), or ``None`` at the end.

        Blocking: call it from a worker thread.
        """
        with self._lock:
            if self._closed:
                raise AudioError("the decoder is closed")
            try:
                return next(self._frames, None)
            except AudioError:
                raise
            except (self._av.FFmpegError, OSError, ValueError) as exc:
                raise AudioError(f"cannot decode {self._name}: {exc}") from exc

    def __iter__(self) -> Iterator[bytes]:
        while (frame := self.read()) is not None:
            yield frame

    def seek(self, seconds: float) -> None:
        """Continue decoding from ``seconds`` (sample-accurate when the container has timestamps).

        A time past the end leaves nothing to read. A failed seek raises :class:`AudioError` and does not
        end decoding.
        """
        with self._lock:
            if self._closed:
                raise AudioError("the decoder is closed")
            self._seek_locked(seconds)

    def _seek_locked(self, seconds: float) -> None:
        if seconds < 0:
            raise InvalidArgumentError("cannot seek to a negative time")
        target = round(seconds * SAMPLE_RATE)
        # Land a little early and decode up to the target: the output before it is trimmed, and the decoder
        # gets its warm-up (Opus in Matroska re-skips its codec delay after a seek, MP3 needs its bit
        # reservoir) on audio that is thrown away.
        early = max(0, target - _SEEK_PREROLL)
        try:
            if self._time_base is not None:
                offset = self._start_pts + int(Fraction(early, SAMPLE_RATE) / self._time_base)
                stream = self._stream
            else:
                offset = early * 1_000_000 // SAMPLE_RATE
                stream = None
            offset = min(offset, _MAX_SEEK_OFFSET)
            self._container.seek(offset, stream=stream, backward=True, any_frame=False)
        except (self._av.FFmpegError, OSError, ValueError, OverflowError) as exc:
            raise AudioError(f"cannot seek in {self._name}: {exc}") from exc
        # Only now: after a failed seek the old generator still decodes from where it was.
        self._frames.close()
        self._frames = self._generate(target)

    def close(self) -> None:
        """Stop decoding and close the container; idempotent, safe from another thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._frames.close()
            finally:
                self._container.close()


def iter_pcm_frames(source: Source, *, start: float = 0.0, **options: Any) -> Iterator[bytes]:
    """Yield 20 ms PCM frames of ``source``; the container closes when the generator ends or is closed."""
    with PCMDecoder(source, start=start, **options) as decoder:
        yield from decoder
