"""Containers: the Ogg Opus writer, the Ogg/WebM demuxer, the PCM file decoder and the DCA format."""

from __future__ import annotations

import io
import json
import os
import struct
import time
from pathlib import Path

import av
import numpy as np
import pytest

from cordvoice.audio.dca import DCAReader, DCAWriter, encode_dca, iter_dca
from cordvoice.audio.decode import PCMDecoder, iter_pcm_frames
from cordvoice.audio.demux import OpusDemuxer, iter_opus_packets
from cordvoice.audio.oggwriter import OggOpusWriter, ogg_crc32
from cordvoice.audio.opus import OPUS_SILENCE, OpusDecoder, OpusEncoder
from cordvoice.audio.pcm import FRAME_BYTES, iter_frames
from cordvoice.audio.samples import demo_pcm, speech_like
from cordvoice.errors import AudioError, InvalidArgumentError

from .audio_helpers import compare, write_container


@pytest.fixture(scope="module")
def pcm() -> bytes:
    return demo_pcm(3.0)


@pytest.fixture(scope="module")
def packets(pcm: bytes) -> list[bytes]:
    with OpusEncoder(bitrate=96_000) as encoder:
        return [encoder.encode(frame) for frame in iter_frames(pcm)]


def demux_with_pyav(data: bytes) -> list[bytes]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        return [bytes(packet) for packet in container.demux(stream) if packet.size]


# ---------------------------------------------------------------------------------------------- Ogg writer


def reference_crc(data: bytes) -> int:
    """Bit-by-bit CRC-32 as RFC 3533 defines it (polynomial 0x04C11DB7, MSB first, no reflection)."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def test_ogg_crc_matches_the_bitwise_definition() -> None:
    for data in (b"", b"OggS", os.urandom(1000)):
        assert ogg_crc32(data) == reference_crc(data)


def parse_pages(data: bytes) -> list[dict[str, object]]:
    pages = []
    offset = 0
    while offset < len(data):
        magic, version, flags, granule, serial, sequence, crc, count = struct.unpack_from(
            "<4sBBqIIIB", data, offset
        )
        assert magic == b"OggS" and version == 0
        lacing = data[offset + 27 : offset + 27 + count]
        size = 27 + count + sum(lacing)
        page = data[offset : offset + size]
        assert ogg_crc32(page[:22] + b"\0\0\0\0" + page[26:]) == crc
        pages.append(
            {"flags": flags, "granule": granule, "serial": serial, "sequence": sequence, "lacing": lacing}
        )
        offset += size
    return pages


def test_ogg_writer_round_trips_packets_through_pyav(packets: list[bytes], tmp_path: Path) -> None:
    path = tmp_path / "out.opus"
    with OggOpusWriter(path, serial=1234, tags={"ARTIST": "cordvoice"}) as writer:
        for packet in packets:
            writer.write(packet)
        assert writer.packets_written == len(packets)
        assert writer.samples_written == len(packets) * 960
    data = path.read_bytes()
    assert demux_with_pyav(data) == packets
    pages = parse_pages(data)
    assert pages[0]["flags"] == 0x02 and pages[-1]["flags"] & 0x04  # BOS first, EOS last
    assert [page["sequence"] for page in pages] == list(range(len(pages)))
    assert {page["serial"] for page in pages} == {1234}
    assert pages[0]["granule"] == pages[1]["granule"] == 0
    assert pages[-1]["granule"] == len(packets) * 960
    audio_granules = [page["granule"] for page in pages[2:]]
    assert audio_granules == sorted(audio_granules)
    with av.open(str(path)) as container:
        assert container.streams.audio[0].metadata.get("ARTIST") == "cordvoice"


def test_ogg_writer_splits_large_packets_across_pages_and_trims_the_end() -> None:
    big = bytes([0xFC]) + os.urandom(70_000)  # more than one page can hold (255 x 255 bytes)
    small = [bytes([0xFC]) + os.urandom(n) for n in (254, 255, 509, 510)]  # lacing edge cases
    buffer = io.BytesIO()
    writer = OggOpusWriter(buffer, serial=7, max_page_samples=960)
    for packet in [*small, big, *small]:
        writer.write(packet)
    writer.close(end_trim=500)
    assert buffer.closed is False  # a caller's file object is left open
    data = buffer.getvalue()
    assert demux_with_pyav(data) == [*small, big, *small]
    pages = parse_pages(data)
    assert any(page["flags"] & 0x01 for page in pages)  # a continued page exists
    assert any(page["granule"] == -1 for page in pages)  # a page on which no packet completes
    assert pages[-1]["granule"] == 9 * 960 - 500


def test_ogg_writer_page_full_at_a_packet_boundary_starts_the_next_packet_on_a_fresh_page() -> None:
    # 42 max-size packets (6 lacing values each) + one of 600 bytes (3): exactly a page's 255 lacing values.
    filling = [bytes([0xFC]) + os.urandom(1274) for _ in range(42)] + [bytes([0xFC]) + os.urandom(599)]
    last = bytes([0xFC]) + os.urandom(100)
    buffer = io.BytesIO()
    writer = OggOpusWriter(buffer, serial=9)
    for packet in [*filling, last]:
        writer.write(packet)
    writer.close(end_trim=500)  # the last packet is alone on the last page, whose samples are trimmable
    data = buffer.getvalue()
    assert demux_with_pyav(data) == [*filling, last]  # a wrong 'continued' flag makes FFmpeg drop a packet
    full, fresh = parse_pages(data)[2:]
    assert len(full["lacing"]) == 255 and full["granule"] == 43 * 960
    assert fresh["flags"] == 0x04 and fresh["granule"] == 44 * 960 - 500  # EOS, not 'continued'


def test_ogg_writer_counts_a_spilled_packet_on_the_page_it_completes_on() -> None:
    # 42 max-size packets (6 lacing values each) fill 252 of a page's 255; the 43rd spills onto the next.
    spilling = [bytes([0xFC]) + os.urandom(1274) for _ in range(43)]
    buffer = io.BytesIO()
    writer = OggOpusWriter(buffer)
    for packet in [*spilling, *[OPUS_SILENCE] * 60]:
        writer.write(packet)
    writer.close()
    assert demux_with_pyav(buffer.getvalue()) == [*spilling, *[OPUS_SILENCE] * 60]
    granules = [page["granule"] for page in parse_pages(buffer.getvalue())[2:]]
    # The continued page holds the spilled packet and 49 more: 1 s, the page limit, not 51 packets.
    assert granules == [42 * 960, (43 + 49) * 960, 103 * 960]


def test_ogg_writer_trims_the_end_of_a_packet_that_spilled_onto_the_last_page() -> None:
    first = bytes([0xFC]) + os.urandom(200 * 255)  # 201 lacing values
    spilled = bytes([0xFC]) + os.urandom(100 * 255)  # 101: 54 fit on the first page, 47 go on the last
    buffer = io.BytesIO()
    writer = OggOpusWriter(buffer)
    writer.write(first)
    writer.write(spilled)
    writer.close(end_trim=500)  # the last page completes the spilled packet: its samples are trimmable
    assert demux_with_pyav(buffer.getvalue()) == [first, spilled]
    head, tail = parse_pages(buffer.getvalue())[2:]
    assert head["granule"] == 960 and len(head["lacing"]) == 255
    assert tail["flags"] == 0x05 and tail["granule"] == 2 * 960 - 500  # continued, EOS


def test_ogg_writer_reports_a_failed_final_flush_as_audio_error(tmp_path: Path) -> None:
    path = tmp_path / "full.opus"
    path.symlink_to("/dev/full")  # every flush fails with ENOSPC
    writer = OggOpusWriter(path)
    writer.write(OPUS_SILENCE)
    with pytest.raises(AudioError, match="No space left"):
        writer.close()
    with pytest.raises(AudioError):
        writer.write(OPUS_SILENCE)  # closed all the same


def test_ogg_writer_silence_and_argument_checks() -> None:
    buffer = io.BytesIO()
    with OggOpusWriter(buffer) as writer:
        writer.write_silence(3)
        writer.flush()
        with pytest.raises(InvalidArgumentError):
            writer.close(end_trim=10)  # nothing pending after flush(): the end cannot be trimmed
        with pytest.raises(InvalidArgumentError):
            writer.write(b"")
        with pytest.raises(AudioError):
            writer.write(b"\xfb")  # malformed TOC: duration unknown
    assert demux_with_pyav(buffer.getvalue()) == [OPUS_SILENCE] * 3
    with pytest.raises(AudioError):
        writer.write(OPUS_SILENCE)
    with pytest.raises(InvalidArgumentError):
        OggOpusWriter(io.BytesIO(), channels=3)
    with pytest.raises(InvalidArgumentError):
        OggOpusWriter(io.BytesIO(), tags={"A=B": "c"})


# ---------------------------------------------------------------------------------------------- demuxer


@pytest.mark.parametrize("container_format", ["ogg", "webm", "matroska"])
def test_demuxer_passes_packets_through_untouched(pcm: bytes, container_format: str) -> None:
    data = write_container(pcm, container_format, "libopus", bit_rate=96_000)
    expected = demux_with_pyav(data)
    with OpusDemuxer(io.BytesIO(data)) as demuxer:
        assert demuxer.passthrough_ok and demuxer.frame_samples == 960
        assert demuxer.opus_head is not None and demuxer.opus_head.startswith(b"OpusHead")
        assert demuxer.duration == pytest.approx(3.0, abs=0.03)
        got = list(demuxer)
    assert [packet.data for packet in got] == expected
    assert all(packet.samples == 960 for packet in got)
    assert got[-1].duration < 960  # the container's end trim
    starts = [packet.pts for packet in got]
    assert starts == sorted(starts)
    assert starts[1] - starts[0] == pytest.approx(960, abs=48)  # WebM times are in ms
    assert demuxer.closed


@pytest.mark.parametrize("container_format", ["ogg", "webm"])
def test_demuxer_seeks(pcm: bytes, container_format: str) -> None:
    data = write_container(pcm, container_format, "libopus")
    with OpusDemuxer(io.BytesIO(data)) as demuxer:
        everything = list(demuxer)
        demuxer.seek(1.5)
        rest = list(demuxer)
        demuxer.seek(0.0)
        again = list(demuxer)
    assert [p.data for p in again] == [p.data for p in everything]
    first = rest[0]
    assert first.pts is not None and first.pts <= 1.5 * 48_000 < first.pts + 960
    assert [p.data for p in rest] == [p.data for p in everything[-len(rest) :]]


def test_iter_opus_packets_from_a_path_and_with_start(packets: list[bytes], tmp_path: Path) -> None:
    path = tmp_path / "x.opus"
    with OggOpusWriter(path) as writer:
        for packet in packets:
            writer.write(packet)
    assert [p.data for p in iter_opus_packets(path)] == packets
    later = [p.data for p in iter_opus_packets(str(path), start=1.0)]
    assert later == packets[-len(later) :] and 90 <= len(later) <= 110


def test_demuxer_reports_non_20ms_frames(pcm: bytes) -> None:
    data = write_container(pcm, "ogg", "libopus", options={"frame_duration": "60"})
    with pytest.raises(AudioError, match="60 ms"):
        OpusDemuxer(io.BytesIO(data))
    with OpusDemuxer(io.BytesIO(data), require_20ms=False) as demuxer:
        assert demuxer.frame_samples == 2880 and not demuxer.passthrough_ok
        assert all(packet.samples == 2880 for packet in demuxer)


def test_demuxer_rejects_non_opus_and_garbage(pcm: bytes) -> None:
    flac = write_container(pcm[: FRAME_BYTES * 20], "flac", "flac")
    with pytest.raises(AudioError, match="no Opus"):
        OpusDemuxer(io.BytesIO(flac))
    with pytest.raises(AudioError):
        OpusDemuxer(io.BytesIO(b"not a media file" * 100))
    with pytest.raises(AudioError):
        OpusDemuxer("/nonexistent/file.opus")


class FailingFile(io.BytesIO):
    """A file whose reads fail with an OSError once ``broken`` is set (a disk or mount going away)."""

    broken = False

    def read(self, size: int | None = -1) -> bytes:
        if self.broken:
            raise OSError("input/output error")
        return super().read(size)


def test_a_read_error_mid_file_is_an_audio_error(pcm: bytes) -> None:
    ogg = FailingFile(write_container(pcm + pcm, "ogg", "libopus"))
    with OpusDemuxer(ogg) as demuxer, pytest.raises(AudioError, match="input/output"):
        ogg.broken = True
        list(demuxer)
    mp3 = FailingFile(write_container(pcm + pcm, "mp3", "libmp3lame", sample_format="s16p"))
    with PCMDecoder(mp3) as decoder, pytest.raises(AudioError, match="input/output"):
        mp3.broken = True
        list(decoder)


# ---------------------------------------------------------------------------------------------- decoder


def test_decoder_returns_exact_frames_identical_for_48k_wav(pcm: bytes) -> None:
    short = pcm[: len(pcm) - 1000]  # not a whole number of frames
    data = write_container(short, "wav", "pcm_s16le")
    with PCMDecoder(io.BytesIO(data)) as decoder:
        assert decoder.codec == "pcm_s16le" and decoder.source_rate == 48_000
        frames = list(decoder)
    assert {len(frame) for frame in frames} == {FRAME_BYTES}
    joined = b"".join(frames)
    assert joined[: len(short)] == short
    assert joined[len(short) :] == bytes(len(joined) - len(short))


@pytest.mark.parametrize(
    ("container_format", "codec", "rate", "layout", "sample_format", "min_correlation"),
    [
        ("wav", "pcm_s16le", 22_050, "mono", "s16", 0.9),
        ("mp3", "libmp3lame", 44_100, "stereo", "s16p", 0.95),
        ("flac", "flac", 44_100, "stereo", "s16", 0.95),
        ("adts", "aac", 32_000, "stereo", "fltp", 0.95),
        ("webm", "libopus", 48_000, "stereo", "s16", 0.95),
    ],
)
def test_decoder_resamples_other_formats(
    container_format: str, codec: str, rate: int, layout: str, sample_format: str, min_correlation: float
) -> None:
    source = speech_like(2.0, voice=3)
    data = write_container(
        source, container_format, codec, rate=rate, layout=layout, sample_format=sample_format
    )
    frames = list(iter_pcm_frames(io.BytesIO(data)))
    assert {len(frame) for frame in frames} == {FRAME_BYTES}
    assert 100 <= len(frames) <= 104  # AAC in ADTS keeps its encoder priming
    assert compare(source, b"".join(frames), max_lag=3000).correlation > min_correlation


def test_decoder_follows_a_rate_or_channel_change_mid_stream() -> None:
    # Concatenated MP3s (podcasts, radio streams) switch sample rate or channels between frames.
    first, second, third = (speech_like(1.0, voice=voice) for voice in (0, 1, 2))
    data = (
        write_container(first, "mp3", "libmp3lame", rate=44_100, sample_format="s16p")
        + write_container(second, "mp3", "libmp3lame", rate=48_000, sample_format="s16p")
        + write_container(third, "mp3", "libmp3lame", rate=44_100, layout="mono", sample_format="s16p")
    )
    with PCMDecoder(io.BytesIO(data)) as decoder:
        frames = list(decoder)
    assert {len(frame) for frame in frames} == {FRAME_BYTES}
    assert 150 <= len(frames) <= 156
    pcm = b"".join(frames)
    second_part = pcm[48_000 * 4 : 96_000 * 4 + 8000]
    assert compare(second, second_part, max_lag=4000).correlation > 0.95
    assert compare(third, pcm[96_000 * 4 :], max_lag=4000).correlation > 0.9


def test_decoder_seeks_sample_accurately_in_wav(pcm: bytes) -> None:
    data = write_container(pcm, "wav", "pcm_s16le")
    with PCMDecoder(io.BytesIO(data), start=1.01) as decoder:
        assert decoder.seekable and decoder.duration == pytest.approx(3.0)
        first = decoder.read()
        decoder.seek(0.5)
        again = decoder.read()
    offset = round(1.01 * 48_000) * 4
    assert first == pcm[offset : offset + FRAME_BYTES]
    assert again == pcm[24_000 * 4 : 24_000 * 4 + FRAME_BYTES]


def test_decoder_seek_lands_on_the_right_audio_in_mp3(pcm: bytes) -> None:
    data = write_container(pcm, "mp3", "libmp3lame", rate=44_100, sample_format="s16p")
    with PCMDecoder(io.BytesIO(data)) as decoder:
        whole = b"".join(decoder)
        decoder.seek(1.0)
        after = b"".join(decoder)
    # Skip the decoder's warm-up after the seek, then the audio must line up with the same place.
    start = 48_000 * 4 + 4800 * 4
    match = compare(
        whole[start : start + 48_000 * 4], after[4800 * 4 : 4800 * 4 + 48_000 * 4 + 4000], max_lag=1000
    )
    assert match.lag <= 2 and match.correlation > 0.99


@pytest.mark.parametrize(
    ("container_format", "codec", "sample_format"),
    [("mp3", "libmp3lame", "s16p"), ("webm", "libopus", "s16")],
)
def test_decoder_output_right_after_a_seek_is_clean(
    container_format: str, codec: str, sample_format: str
) -> None:
    # A decoder started cold at the target garbles its first tens of milliseconds (MP3's bit reservoir,
    # Opus's pre-roll): an audible glitch on every seek. It must warm up on audio that is trimmed off.
    noise = np.random.default_rng(7).standard_normal(3 * 48_000)
    noise = np.convolve(noise, np.ones(8) / 8, mode="same") * 0.2  # not periodic: one lag matches
    pcm = (np.repeat(noise, 2) * 32767).astype("<i2").tobytes()
    data = write_container(pcm, container_format, codec, sample_format=sample_format)
    with PCMDecoder(io.BytesIO(data)) as decoder:
        whole = b"".join(decoder)
        for seconds in (0.237, 0.374, 1.333):
            decoder.seek(seconds)
            after = b"".join(decoder)
            # The first 50 ms after the seek against the whole decode from 1000 samples earlier: lag 1000
            # (give or take the half millisecond Matroska's timestamps round off).
            start = round(seconds * 48_000) - 1000
            match = compare(after[: 2400 * 4], whole[start * 4 : (start + 4400) * 4], max_lag=2000)
            assert abs(match.lag - 1000) <= 24 and match.correlation > 0.99, (seconds, match)


def test_seeks_past_the_end_leave_nothing_to_read(pcm: bytes) -> None:
    # 1e12 s does not fit an int64 in MP3 time units (1/14112000 s): it must land at the end, not overflow.
    mp3 = write_container(pcm, "mp3", "libmp3lame", rate=44_100, sample_format="s16p")
    with PCMDecoder(io.BytesIO(mp3)) as decoder:
        for seconds in (5.0, 1e12, 1e300):
            decoder.seek(seconds)
            assert decoder.read() is None
        decoder.seek(0.0)
        assert len(list(decoder)) >= 150
    ogg = write_container(pcm, "ogg", "libopus")
    with OpusDemuxer(io.BytesIO(ogg)) as demuxer:
        everything = list(demuxer)
        for seconds in (5.0, 1e12, 1e300):
            demuxer.seek(seconds)
            assert demuxer.read() is None
        demuxer.seek(0.0)
        assert list(demuxer) == everything


def test_decoder_closes_on_early_stop_and_errors(pcm: bytes) -> None:
    data = write_container(pcm, "wav", "pcm_s16le")
    frames = iter_pcm_frames(io.BytesIO(data))
    assert len(next(frames)) == FRAME_BYTES
    frames.close()  # early stop closes the container (no error, no leak)
    decoder = PCMDecoder(io.BytesIO(data))
    decoder.close()
    decoder.close()
    with pytest.raises(AudioError):
        decoder.read()
    with pytest.raises(AudioError):
        PCMDecoder(io.BytesIO(b"\x00" * 5000))
    with pytest.raises(AudioError):
        PCMDecoder("/nonexistent/audio.mp3")
    with pytest.raises(AudioError, match="no audio"):
        PCMDecoder(io.BytesIO(_video_only()))


def _video_only() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height = 32, 32
        frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), dtype=np.uint8), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- DCA


def test_dca0_and_dca1_round_trip(packets: list[bytes], tmp_path: Path) -> None:
    plain = encode_dca(packets)
    assert plain[:2] == struct.pack("<h", len(packets[0]))
    assert list(iter_dca(plain)) == packets
    metadata = {"dca": {"version": 1, "tool": {"name": "cordvoice"}}, "opus": {"sample_rate": 48000}}
    path = tmp_path / "x.dca"
    with DCAWriter(path, metadata=metadata) as writer:
        for packet in packets:
            writer.write(packet)
    raw = path.read_bytes()
    assert raw.startswith(b"DCA1")
    (length,) = struct.unpack_from("<i", raw, 4)
    assert json.loads(raw[8 : 8 + length]) == metadata
    with DCAReader(path) as reader:
        assert reader.metadata == metadata
        assert list(reader) == packets
        assert reader.frames_read == len(packets)


class Trickle(io.RawIOBase):
    """A pipe-like reader that returns at most 3 bytes per read."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._data.read(min(size, 3) if size >= 0 else 3)


def test_dca_reader_tolerates_short_reads(packets: list[bytes]) -> None:
    data = encode_dca(packets[:20], metadata={"a": 1})
    with DCAReader(Trickle(data)) as reader:  # type: ignore[arg-type]
        assert list(reader) == packets[:20]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x05", "cut short"),
        (b"\x05\x00abc", "truncated"),
        (b"\x00\x00", "invalid DCA frame length 0"),
        (b"\xff\xff" + b"x" * 10, "invalid DCA frame length -1"),
        (b"DCA2\x00\x00\x00\x00", "unsupported DCA version"),
        (b"DCA1\x10\x00", "metadata length"),
        (b"DCA1\xff\xff\xff\x7f{}", "out of range"),
        (b"DCA1\x05\x00\x00\x00{}", "truncated"),
        (b"DCA1\x02\x00\x00\x00[]", "JSON object"),
        (b"DCA1\x02\x00\x00\x00\xff\xfe", "not valid JSON"),
        (b"DCA1\xa0\x86\x01\x00" + b"[" * 100_000, "not valid JSON"),  # nested past the recursion limit
    ],
)
def test_malformed_dca_raises_audio_error(data: bytes, message: str) -> None:
    with pytest.raises(AudioError, match=message):
        list(iter_dca(data))


def test_dca_writer_checks_frames() -> None:
    writer = DCAWriter(io.BytesIO())
    with pytest.raises(InvalidArgumentError):
        writer.write(b"")
    with pytest.raises(InvalidArgumentError):
        writer.write(b"x" * 40_000)
    writer.close()
    with pytest.raises(AudioError):
        writer.write(b"x")
    with pytest.raises(InvalidArgumentError):
        DCAWriter(io.BytesIO(), metadata={"x": object()})
    assert list(iter_dca(b"")) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count file descriptors")
def test_opening_and_closing_many_times_leaks_no_file_descriptors(
    packets: list[bytes], tmp_path: Path
) -> None:
    ogg = tmp_path / "a.opus"
    with OggOpusWriter(ogg) as writer:
        for packet in packets[:10]:
            writer.write(packet)
    wav = tmp_path / "a.wav"
    wav.write_bytes(write_container(b"\x00" * FRAME_BYTES * 5, "wav", "pcm_s16le"))

    def cycle() -> None:
        with OpusDemuxer(ogg) as demuxer:
            next(iter(demuxer))
        frames = iter_pcm_frames(wav)
        next(frames)
        frames.close()
        with OpusEncoder() as encoder, OpusDecoder() as decoder:
            decoder.decode(encoder.encode(bytes(FRAME_BYTES)))
        list(iter_dca(encode_dca(packets[:3])))

    cycle()  # warm up lazy imports and caches
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(200):
        cycle()
    assert len(os.listdir("/proc/self/fd")) <= before


@pytest.mark.parametrize("max_page_samples", [48_000, 20 * 48_000])
def test_ogg_writer_writes_an_hour_of_silence_at_once_as_packet_by_packet(max_page_samples: int) -> None:
    """A recorder fills a member's hour-long absence at once: quickly, the same bytes as one by one."""
    frames = 3600 * 50
    files = []
    for bulk in (True, False):
        buffer = io.BytesIO()
        writer = OggOpusWriter(buffer, serial=7, max_page_samples=max_page_samples)
        writer.write(b"\xfc\x01\x02")
        started = time.perf_counter()
        if bulk:
            writer.write_silence(frames)
            elapsed = time.perf_counter() - started
        else:
            for _ in range(frames):
                writer.write(OPUS_SILENCE, 960)
        writer.write(b"\xfc\x03\x04")
        writer.close(end_trim=100)
        files.append(buffer.getvalue())
    assert files[0] == files[1]
    assert elapsed < 0.08, f"{elapsed * 1000:.0f} ms with the event loop held (packet by packet: 160)"
