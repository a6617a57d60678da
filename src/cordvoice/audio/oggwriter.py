"""Write Opus packets into an Ogg Opus file (RFC 7845 over RFC 3533) without re-encoding.

Recording what Discord delivers is lossless only if the received packets are stored as they are: this writer
wraps them in Ogg pages (OpusHead and OpusTags header pages, lacing, granule positions, CRC). A recorder that
wants silences kept in place writes :meth:`OggOpusWriter.write_silence` for the gaps, since Ogg Opus has no
other way to express a pause (granule positions must match the packets' durations).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable, Mapping
from typing import IO, TYPE_CHECKING, Final

from cordvoice.audio.opus import OPUS_SILENCE, packet_samples
from cordvoice.audio.pcm import FRAME_SAMPLES, SAMPLE_RATE, BytesLike
from cordvoice.errors import AudioError, InvalidArgumentError

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["DEFAULT_PRE_SKIP", "OggOpusWriter", "ogg_crc32"]

DEFAULT_PRE_SKIP: Final = 312
"""libopus's encoder delay at 48 kHz (application audio or voip), the usual OpusHead pre-skip."""

_PAGE_HEADER: Final = struct.Struct("<4sBBqIIIB")
_OPUS_HEAD: Final = struct.Struct("<8sBBHIhB")
_CONTINUED: Final = 0x01
_FIRST: Final = 0x02
_LAST: Final = 0x04
_MAX_SEGMENTS: Final = 255

# Ogg's CRC is CRC-32/MPEG-2 style (polynomial 0x04C11DB7, not reflected, initial 0, no final xor). zlib
# computes the reflected variant in C, so reflect every input byte and the result instead of looping in
# Python: a 4 KiB page costs microseconds instead of milliseconds.
_REFLECT_BYTE: Final = bytes(int(f"{value:08b}"[::-1], 2) for value in range(256))


def ogg_crc32(data: BytesLike) -> int:
    """The Ogg page checksum of ``data`` (computed with the CRC field zeroed)."""
    reflected = zlib.crc32(bytes(data).translate(_REFLECT_BYTE), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{reflected:032b}"[::-1], 2)


def _lacing(length: int) -> list[int]:
    return [255] * (length // 255) + [length % 255]


class OggOpusWriter:
    """Stream Opus packets into an Ogg Opus file or binary file-like object.

    Pages are flushed once they hold ``max_page_samples`` (default 1 s, the RFC's recommendation), so a
    crash loses at most about a second. A path is opened and closed by the writer; a file object passed
    in is flushed but left open.
    """

    def __init__(
        self,
        dest: str | os.PathLike[str] | IO[bytes],
        *,
        channels: int = 2,
        pre_skip: int = DEFAULT_PRE_SKIP,
        input_sample_rate: int = SAMPLE_RATE,
        output_gain: int = 0,
        serial: int | None = None,
        vendor: str = "cordvoice",
        tags: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        max_page_samples: int = SAMPLE_RATE,
    ) -> None:
        if channels not in (1, 2):
            raise InvalidArgumentError("channels must be 1 or 2 (channel mapping family 0)")
        if not 0 <= pre_skip <= 0xFFFF:
            raise InvalidArgumentError("pre_skip must fit in 16 bits")
        if not -32768 <= output_gain <= 32767:
            raise InvalidArgumentError("output_gain (Q7.8 dB) must fit in 16 bits")
        if not 0 <= input_sample_rate <= 0xFFFFFFFF:
            raise InvalidArgumentError("input_sample_rate must fit in 32 bits")
        if max_page_samples < FRAME_SAMPLES:
            raise InvalidArgumentError("max_page_samples must be at least one 20 ms frame (960)")
        if serial is None:
            serial = int.from_bytes(os.urandom(4), "little")
        if not 0 <= serial <= 0xFFFFFFFF:
            raise InvalidArgumentError("serial must fit in 32 bits")
        if isinstance(dest, str | os.PathLike):
            try:
                self._file: IO[bytes] = open(dest, "wb")  # noqa: SIM115 - owned and closed by close()
            except OSError as exc:
                raise AudioError(f"cannot create {os.fspath(dest)!r}: {exc}") from exc
            self._owns_file = True
        else:
            self._file = dest
            self._owns_file = False
        self.serial = serial
        self.pre_skip = pre_skip
        self._max_page_samples = max_page_samples
        self._sequence = 0
        self._segments: list[int] = []
        self._body: list[bytes] = []
        self._page_flags = _FIRST
        self._page_granule = -1  # granule of the last packet completed on the pending page
        self._page_start_granule = 0  # granule before the pending page's first packet that completes on it
        # Granule positions count every decoded sample, the pre-skip ones included (RFC 7845 §4).
        self._granule = 0
        self._packets = 0
        self._closed = False
        try:
            head = _OPUS_HEAD.pack(b"OpusHead", 1, channels, pre_skip, input_sample_rate, output_gain, 0)
            self._add_packet(head, 0)
            self._emit_page()
            self._add_packet(_opus_tags(vendor, tags), 0)
            self._emit_page()  # audio must start on a fresh page
        except BaseException:
            self._abort()
            raise

    @property
    def packets_written(self) -> int:
        """Audio packets written so far (header packets excluded)."""
        return self._packets

    @property
    def samples_written(self) -> int:
        """Samples per channel the packets written so far decode to (pre-skip samples included)."""
        return self._granule

    def write(self, packet: BytesLike, samples: int | None = None) -> None:
        """Append one Opus packet; ``samples`` (48 kHz) defaults to the duration its TOC byte declares."""
        self._check_open()
        if not packet:
            raise InvalidArgumentError("an Ogg Opus packet must not be empty")
        if samples is None:
            samples = packet_samples(packet)
        elif samples <= 0:
            raise InvalidArgumentError("samples must be positive")
        # Flush *before* adding, so the last packet written is always still pending: close() can then
        # mark it end-of-stream and apply an end trim. A page whose 255 lacing values are used up is
        # flushed here too, so the packet starts a fresh page (not flagged as continuing one).
        if self._page_full(samples):
            self._emit_page()
        self._granule += samples
        self._packets += 1
        self._add_packet(bytes(packet), self._granule)

    def write_silence(self, frames: int = 1) -> None:
        """Append ``frames`` 20 ms frames of Opus silence (to keep a pause in place on the timeline).

        Whole pages of it are built at once: an hour's pause is 180,000 packets, which one by one held the
        event loop of a recorder for 0.16 s.
        """
        if frames < 0:
            raise InvalidArgumentError("frames must be >= 0")
        self._check_open()
        per_page = min(_MAX_SEGMENTS, self._max_page_samples // FRAME_SAMPLES)
        while frames > 0:
            if frames > per_page and self._page_full(FRAME_SAMPLES):
                # What per_page calls of write() would do, the page left pending as write() leaves it.
                self._emit_page()
                self._granule += per_page * FRAME_SAMPLES
                self._packets += per_page
                self._segments = [len(OPUS_SILENCE)] * per_page
                self._body = [OPUS_SILENCE * per_page]
                self._page_granule = self._granule
                frames -= per_page
            else:
                self.write(OPUS_SILENCE, FRAME_SAMPLES)
                frames -= 1

    def flush(self) -> None:
        """Write the pending page and flush the file (the data is then readable by other processes)."""
        self._check_open()
        if self._segments:
            self._emit_page()
        self._flush_file()

    def close(self, end_trim: int = 0) -> None:
        """Write the end-of-stream page and close (an owned file). Idempotent.

        ``end_trim`` samples are cut from the end of the last page's audio (encoder padding), which is
        only possible when that page still holds at least as many samples, i.e. without a prior flush.
        """
        if self._closed:
            return
        pending = self._granule - self._page_start_granule if self._segments else 0
        if not 0 <= end_trim <= pending:
            raise InvalidArgumentError(f"end_trim must be between 0 and {pending} (the last page's samples)")
        try:
            self._page_flags |= _LAST
            self._page_granule = self._granule - end_trim
            self._emit_page()
            self._flush_file()
        finally:
            self._abort()

    def _abort(self) -> None:
        self._closed = True
        if self._owns_file:
            try:
                self._file.close()  # flushes what is buffered, so it can fail like a write
            except OSError as exc:
                raise AudioError(f"cannot write the Ogg file: {exc}") from exc

    def _check_open(self) -> None:
        if self._closed:
            raise AudioError("the Ogg Opus writer is closed")

    def _flush_file(self) -> None:
        try:
            self._file.flush()
        except OSError as exc:
            raise AudioError(f"cannot write the Ogg file: {exc}") from exc

    def _page_full(self, samples: int) -> bool:
        """Whether a packet of ``samples`` must start a new page (the pending one has no room for it)."""
        return bool(self._segments) and (
            len(self._segments) == _MAX_SEGMENTS
            or self._granule + samples - self._page_start_granule > self._max_page_samples
        )

    def _add_packet(self, data: bytes, granule_after: int) -> None:
        # The pending page must have room for at least one lacing value (write() flushes a full page
        # first), so a page emitted here always ends mid-packet and the next one rightly continues it.
        lacing = _lacing(len(data))
        offset = 0
        while True:
            room = _MAX_SEGMENTS - len(self._segments)
            taken, lacing = lacing[:room], lacing[room:]
            size = sum(taken)
            self._segments.extend(taken)
            self._body.append(data[offset : offset + size])
            offset += size
            if not lacing:
                self._page_granule = granule_after
                return
            # The packet spills over: this page ends mid-packet, the next one continues it.
            self._emit_page()
            self._page_flags |= _CONTINUED

    def _emit_page(self) -> None:
        header = _PAGE_HEADER.pack(
            b"OggS",
            0,
            self._page_flags,
            self._page_granule,
            self.serial,
            self._sequence,
            0,
            len(self._segments),
        )
        page = b"".join((header, bytes(self._segments), *self._body))
        crc = ogg_crc32(page)
        page = page[:22] + crc.to_bytes(4, "little") + page[26:]
        try:
            self._file.write(page)
        except (OSError, ValueError) as exc:
            raise AudioError(f"cannot write the Ogg file: {exc}") from exc
        self._sequence += 1
        self._segments = []
        self._body = []
        self._page_flags = 0
        # A packet that spilled over completes on the next page, so its samples count there: the next page
        # starts where the last packet completed so far ends (a page on which none completes changes nothing).
        if self._page_granule >= 0:
            self._page_start_granule = self._page_granule
        self._page_granule = -1

    def __enter__(self) -> OggOpusWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:
            # Still finish the file so everything written so far stays playable.
            try:
                self.close()
            except Exception:
                self._abort()


def _opus_tags(vendor: str, tags: Mapping[str, str] | Iterable[tuple[str, str]]) -> bytes:
    items = tags.items() if isinstance(tags, Mapping) else tags
    comments = []
    for key, value in items:
        if not key or "=" in key or not key.isascii():
            raise InvalidArgumentError(f"invalid Vorbis comment key {key!r}")
        comments.append(f"{key}={value}".encode())
    vendor_bytes = vendor.encode()
    parts = [b"OpusTags", len(vendor_bytes).to_bytes(4, "little"), vendor_bytes]
    parts.append(len(comments).to_bytes(4, "little"))
    for comment in comments:
        parts.extend((len(comment).to_bytes(4, "little"), comment))
    return b"".join(parts)
