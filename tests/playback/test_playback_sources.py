"""Sources on their own: what each one reads, how it seeks, and how ``open_source`` chooses."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import av
import numpy as np
import pytest

from cordvoice.audio import container
from cordvoice.audio.pcm import FRAME_BYTES
from cordvoice.audio.samples import tone, write_demo_ogg
from cordvoice.audio.sources import (
    AsyncFramesSource,
    AutoSource,
    DCASource,
    FramesSource,
    OpusFileSource,
    PCMSource,
    PyAVSource,
    open_source,
)
from cordvoice.errors import AudioError, InvalidArgumentError

from .playback_helpers import dca_bytes, encode_frames, opus_packets, write_audio, write_mp3


@pytest.fixture
def ogg(tmp_path: Path) -> Path:
    path = tmp_path / "demo.ogg"
    write_demo_ogg(path, 1.0)
    return path


def test_opus_file_source_passes_packets_through(ogg: Path) -> None:
    with OpusFileSource(ogg) as source:
        assert source.kind == "opus"
        assert list(source) == opus_packets(ogg)
        assert source.duration == pytest.approx(1.0, abs=0.03)


def test_webm_opus_is_passed_through(tmp_path: Path) -> None:
    path = tmp_path / "tone.webm"
    path.write_bytes(write_audio(tone(440, 0.5), "webm", "libopus"))
    with AutoSource(path) as source:
        assert source.kind == "opus"
        assert list(source) == opus_packets(path)


def test_opus_file_seek_lands_on_the_packet_at_that_time(ogg: Path) -> None:
    packets = opus_packets(ogg)
    with OpusFileSource(ogg) as source:
        assert source.seekable
        source.seek(0.5)
        rest = list(source)
    assert rest == packets[-len(rest) :]
    assert abs(len(rest) - (len(packets) - 25)) <= 1


def test_auto_source_decodes_what_it_cannot_pass_through(tmp_path: Path) -> None:
    mp3 = write_mp3(tmp_path / "a.mp3", tone(440, 0.5))
    with AutoSource(mp3) as source:
        assert source.kind == "pcm"
        assert isinstance(source.inner, PyAVSource)
        frames = list(source)
    assert all(len(f) == FRAME_BYTES for f in frames)
    assert 24 <= len(frames) <= 28
    # 60 ms Opus packets cannot go to Discord as they are: decoded instead.
    long_packets = tmp_path / "long.ogg"
    long_packets.write_bytes(_ogg_with_frame_duration(60))
    with AutoSource(long_packets) as source:
        assert source.kind == "pcm"


def _ogg_with_frame_duration(ms: int) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=48_000)
        stream.layout = "stereo"
        stream.codec_context.options = {"frame_duration": str(ms)}
        frame = av.AudioFrame.from_ndarray(
            np.frombuffer(tone(440, 0.5), dtype="<i2").reshape(1, -1), format="s16", layout="stereo"
        )
        frame.sample_rate = 48_000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buffer.getvalue()


def test_dca_source_reads_and_seeks(tmp_path: Path) -> None:
    pcm = tone(330, 1.0)
    frames = encode_frames(pcm)
    path = tmp_path / "a.dca"
    path.write_bytes(dca_bytes(pcm))
    with AutoSource(path) as source:
        assert source.kind == "opus"
        assert list(source) == frames
    with DCASource(io.BytesIO(dca_bytes(pcm))) as source:
        assert source.seekable
        source.seek(0.4)
        assert list(source) == frames[20:]


def test_pcm_source_from_bytes_file_and_path(tmp_path: Path) -> None:
    pcm = tone(500, 0.3)
    path = tmp_path / "raw.pcm"
    path.write_bytes(pcm)
    for raw in (pcm, io.BytesIO(pcm), path):
        with PCMSource(raw) as source:
            assert source.seekable
            assert b"".join(source) == pcm
            source.seek(0.1)
            assert b"".join(source) == pcm[19200:]
    assert PCMSource(pcm).duration == pytest.approx(0.3)
    with pytest.raises(InvalidArgumentError):
        PCMSource(b"\x00\x01\x02")


def test_open_source_sniffs_containers_and_wraps_iterables(ogg: Path) -> None:
    data = ogg.read_bytes()
    assert isinstance(open_source(data), AutoSource)
    assert isinstance(open_source(io.BytesIO(data)), AutoSource)
    assert isinstance(open_source(data, kind="pcm"), PCMSource)
    assert isinstance(open_source(bytes(FRAME_BYTES)), PCMSource)
    assert isinstance(open_source(str(ogg)), AutoSource)
    assert isinstance(open_source([b"x"], kind="opus"), FramesSource)

    async def chunks() -> AsyncIterator[bytes]:
        yield b""

    wrapped = open_source(chunks())
    assert isinstance(wrapped, AsyncFramesSource)
    assert wrapped.kind == "pcm"
    with pytest.raises(InvalidArgumentError):
        open_source(42)  # type: ignore[arg-type]


def test_open_source_refuses_a_kind_it_would_ignore(ogg: Path) -> None:
    """Opus packets joined into bytes played as raw PCM (loud noise), and an unknown kind was ignored."""
    packets = opus_packets(ogg)[:10]
    for source in (b"".join(packets), io.BytesIO(b"".join(packets))):
        with pytest.raises(InvalidArgumentError, match="kind"):
            open_source(source, kind="opus")
    for kind in ("Opus", "mp3", ""):
        with pytest.raises(InvalidArgumentError, match="kind"):
            open_source(bytes(FRAME_BYTES), kind=kind)  # type: ignore[arg-type]
    # What kind="opus" is for still works: packets one by one, and a container (sniffed whatever the kind).
    assert isinstance(open_source(packets, kind="opus"), FramesSource)
    assert isinstance(open_source(ogg.read_bytes(), kind="opus"), AutoSource)


def test_open_source_recognises_mp3_bytes_without_an_id3_tag(tmp_path: Path) -> None:
    # What TTS services return: bare MP3 frames. Taken for raw PCM, they played as loud noise.
    pcm = tone(440.0, 0.5)
    tagged = write_mp3(tmp_path / "speech.mp3", pcm).read_bytes()
    assert tagged.startswith(b"ID3")
    tag_size = sum((byte & 0x7F) << (7 * (3 - index)) for index, byte in enumerate(tagged[6:10]))  # syncsafe
    bare = tagged[10 + tag_size :]
    assert bare[0] == 0xFF
    for data in (bare, io.BytesIO(bare)):
        source = open_source(data)
        assert isinstance(source, AutoSource)
        with source:
            decoded = b"".join(source)  # type: ignore[arg-type]
        assert abs(len(decoded) - len(pcm)) < 0.1 * len(pcm)
    # Raw PCM that happens to start like an MP3 frame header stays PCM (no second frame where it would be).
    assert isinstance(open_source(bare[:4] + bytes(FRAME_BYTES)), PCMSource)
    assert isinstance(open_source(bare[: len(bare) // 4 * 4], kind="pcm"), PCMSource)


def test_unreadable_files_raise_audio_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.mp3"
    with pytest.raises(AudioError):
        AutoSource(missing).open()
    garbage = tmp_path / "garbage.ogg"
    garbage.write_bytes(b"OggS" + bytes(100))
    source = AutoSource(garbage)
    with pytest.raises(AudioError):
        source.open()
        list(source)
    source.close()


@contextmanager
def silent_server(hold: float) -> Iterator[str]:
    """An HTTP URL on loopback whose server accepts connections and says nothing for ``hold`` seconds."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        held: list[socket.socket] = []
        listener.settimeout(0.05)
        while not stop.wait(0):
            try:
                connection, _ = listener.accept()
                held.append(connection)
                threading.Timer(hold, connection.close).start()
            except TimeoutError:
                continue
        for connection in held:
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/stream.ogg"
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_a_file_object_that_fails_its_first_read_is_an_audio_error() -> None:
    class Failing(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            raise OSError("input/output error")

    with pytest.raises(AudioError, match="input/output error"):
        AutoSource(Failing(b"DCA1")).open()


def test_a_url_that_never_answers_times_out_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    # With no timeout given, a dead server held a source thread (one of a few for the whole process) forever.
    monkeypatch.setattr(container, "NETWORK_TIMEOUT", 0.3)
    with silent_server(hold=5.0) as url:
        began = time.monotonic()
        with pytest.raises(AudioError, match="cannot open"):
            AutoSource(url).open()
        assert time.monotonic() - began < 2.5
    with pytest.raises(InvalidArgumentError, match="timeout"):
        PyAVSource("never-opened.wav", timeout=-1.0).open()


def test_auto_source_timeout_bounds_its_passthrough_probe_too() -> None:
    # The Opus probe opened the URL without the timeout: a server that never answers hung it for good.
    with silent_server(hold=5.0) as url:
        began = time.monotonic()
        with pytest.raises(AudioError, match="cannot open"):
            AutoSource(url, timeout=0.3).open()
        assert time.monotonic() - began < 2.5
