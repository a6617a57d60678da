"""Read Opus packets out of Ogg Opus and WebM/Matroska files without re-encoding (passthrough).

Demuxing costs ~2-3 µs per packet against ~40-50 µs to decode and ~150 µs to re-encode
(performance-notes §3a), so a player should pass already-Opus files straight through. Discord expects
20 ms packets: :class:`OpusDemuxer` checks the first packet and refuses (or, with ``require_20ms=False``,
reports through :attr:`OpusDemuxer.frame_samples`) a file that uses other frame sizes, which the caller
must then decode and re-encode instead (:mod:`cordvoice.audio.decode`).

Blocking file I/O: run it on a worker thread. Containers are always closed: use the demuxer as a context
manager or call :meth:`OpusDemuxer.close`; :func:`iter_opus_packets` closes when its generator is closed.
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from typing import Final, NamedTuple

import av

from cordvoice.audio.container import OpenContainer, Source
from cordvoice.audio.opus import packet_samples
from cordvoice.audio.pcm import FRAME_SAMPLES, SAMPLE_RATE
from cordvoice.errors import AudioError, InvalidArgumentError

__all__ = ["OpusDemuxer", "OpusPacket", "iter_opus_packets"]

_MAX_SEEK_OFFSET: Final = 2**63 - 1
"""FFmpeg timestamps are int64: a later seek is clamped to this and lands at the end like any late seek."""


class OpusPacket(NamedTuple):
    """One Opus packet as stored in the file.

    ``samples`` is what the packet decodes to according to its TOC byte (960 for 20 ms); ``duration`` is what
    the container says it plays for, which is shorter for the last packet of a file with end trimming.
    ``pts`` is the presentation time in 48 kHz samples (negative during the pre-skip), or ``None``.
    """

    data: bytes
    samples: int
    duration: int
    pts: int | None

    @property
    def time(self) -> float | None:
        """Presentation time in seconds, or ``None``."""
        return None if self.pts is None else self.pts / SAMPLE_RATE


class OpusDemuxer(OpenContainer):
    """An open Ogg/WebM/Matroska file whose first audio stream is Opus.

    Raises :class:`AudioError` when the file cannot be opened, has no Opus audio stream, has more than two
    channels (multistream packets cannot be passed through), or (with ``require_20ms``) does not use 20 ms
    packets. ``options`` and ``timeout`` are FFmpeg's input options and the network timeout in seconds, as
    for the decoder.
    """

    def __init__(
        self,
        source: Source,
        *,
        require_20ms: bool = True,
        format: str | None = None,
        options: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> None:
        self._av_error: type[Exception] = av.FFmpegError
        super().__init__(source, format=format, options=options, timeout=timeout)
        try:
            self._setup(require_20ms)
        except BaseException:
            self._abandon()
            raise

    def _setup(self, require_20ms: bool) -> None:
        audio = self._container.streams.audio
        stream = next((s for s in audio if s.codec_context.name in ("opus", "libopus")), None)
        if stream is None:
            found = ", ".join(s.codec_context.name for s in audio) or "no audio stream"
            raise AudioError(f"{self._name} has no Opus audio ({found}); decode and re-encode it instead")
        self._stream = stream
        self.channels: int = stream.codec_context.channels
        if self.channels > 2:
            raise AudioError(f"{self._name} has {self.channels}-channel Opus, which cannot be passed through")
        time_base = stream.time_base or Fraction(1, SAMPLE_RATE)
        self._time_base = time_base
        # Integer rescaling to 48 kHz samples: Fraction arithmetic would cost microseconds per packet.
        self._scale_num = time_base.numerator * SAMPLE_RATE
        self._scale_den = time_base.denominator
        extradata = stream.codec_context.extradata
        self.opus_head: bytes | None = bytes(extradata) if extradata else None
        """The OpusHead header (pre-skip, channel count, gain), when the container carries one."""
        self._pending: list[OpusPacket] = []
        self._packets = self._read_packets()
        first = self._next_packet()
        if first is None:
            raise AudioError(f"{self._name} contains no Opus packets")
        self._pending.append(first)
        self.frame_samples = first.samples
        """Samples per channel in the first packet (960 when the file uses 20 ms frames)."""
        self._require_20ms = require_20ms
        if require_20ms and first.samples != FRAME_SAMPLES:
            raise AudioError(self._not_20ms(first.samples))

    def _not_20ms(self, samples: int) -> str:
        return (
            f"{self._name} uses {samples / 48:g} ms Opus packets; Discord needs 20 ms, so decode and "
            "re-encode it instead of passing it through"
        )

    @property
    def passthrough_ok(self) -> bool:
        """Whether the packets can go to Discord as they are (20 ms frames, at most two channels)."""
        return self.frame_samples == FRAME_SAMPLES

    def _to_samples(self, value: int | None) -> int | None:
        if value is None:
            return None
        return (value * self._scale_num + self._scale_den // 2) // self._scale_den

    def _read_packets(self) -> Iterator[OpusPacket]:
        to_samples = self._to_samples
        for packet in self._container.demux(self._stream):
            if not packet.size:  # the flush packet at end of stream
                continue
            data = bytes(packet)
            samples = packet_samples(data)
            duration = to_samples(packet.duration) or samples
            yield OpusPacket(data, samples, min(duration, samples), to_samples(packet.pts))

    def _next_packet(self) -> OpusPacket | None:
        try:
            return next(self._packets, None)
        except (self._av_error, OSError, ValueError) as exc:  # a file object's read errors arrive as they are
            raise AudioError(f"cannot read {self._name}: {exc}") from exc

    def read(self) -> OpusPacket | None:
        """Return the next packet, or ``None`` at the end of the file."""
        with self._lock:
            if self._closed:
                raise AudioError("the demuxer is closed")
            packet = self._pending.pop(0) if self._pending else self._next_packet()
        if packet is not None and self._require_20ms and packet.samples != FRAME_SAMPLES:
            raise AudioError(self._not_20ms(packet.samples))
        return packet

    def __iter__(self) -> Iterator[OpusPacket]:
        while (packet := self.read()) is not None:
            yield packet

    def seek(self, seconds: float) -> None:
        """Continue from ``seconds`` into the file: the next packet is the one playing at that time.

        A time past the end leaves nothing to read. Raises :class:`AudioError` when the input does not allow
        seeking.
        """
        if seconds < 0:
            raise InvalidArgumentError("cannot seek to a negative time")
        with self._lock:
            if self._closed:
                raise AudioError("the demuxer is closed")
            target = round(seconds * SAMPLE_RATE)
            try:
                offset = target * self._scale_den // self._scale_num  # the target in stream time units
                offset = min(offset, _MAX_SEEK_OFFSET)
                self._container.seek(offset, stream=self._stream, backward=True, any_frame=False)
            except (self._av_error, OSError, ValueError, OverflowError) as exc:
                raise AudioError(f"cannot seek in {self._name}: {exc}") from exc
            self._packets = self._read_packets()
            self._pending = []
            # Containers land on a page or cluster boundary before the target; skip to the packet that
            # plays at the target itself.
            while (packet := self._next_packet()) is not None:
                if packet.pts is None or packet.pts + packet.samples > target:
                    self._pending.append(packet)
                    break

    def close(self) -> None:
        """Close the container; idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._container.close()


def iter_opus_packets(
    source: Source, *, require_20ms: bool = True, start: float = 0.0
) -> Iterator[OpusPacket]:
    """Yield the Opus packets of a file in order; the file is closed when the generator finishes or closes."""
    with OpusDemuxer(source, require_20ms=require_20ms) as demuxer:
        if start:
            demuxer.seek(start)
        yield from demuxer
