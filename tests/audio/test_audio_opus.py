"""The Opus codec binding: real libopus (PyAV's bundled copy) through ctypes, and the PyAV fallback."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from cordvoice.audio.opus import (
    OPUS_SILENCE,
    OpusDecoder,
    OpusEncoder,
    libopus_path,
    libopus_version,
    packet_samples,
)
from cordvoice.audio.pcm import FRAME_BYTES, iter_frames, rms
from cordvoice.audio.samples import speech_like
from cordvoice.errors import AudioError, InvalidArgumentError

from .audio_helpers import compare, to_float

LOOKAHEAD = 312


@pytest.fixture(scope="module")
def speech() -> bytes:
    return speech_like(3.0, voice=1)


@pytest.fixture(scope="module")
def speech_frames(speech: bytes) -> list[bytes]:
    return list(iter_frames(speech))


def encode_all(frames: list[bytes], **settings: object) -> list[bytes]:
    with OpusEncoder(**settings) as encoder:  # type: ignore[arg-type]
        return [encoder.encode(frame) for frame in frames]


def decode_all(packets: list[bytes], backend: str = "auto") -> bytes:
    with OpusDecoder(backend=backend) as decoder:  # type: ignore[arg-type]
        return b"".join(decoder.decode(packet) for packet in packets)


def test_bundled_libopus_is_loaded() -> None:
    version = libopus_version()
    assert version is not None and version.startswith("libopus 1.")
    assert libopus_path() is not None


@pytest.mark.parametrize(
    ("packet", "samples"),
    [
        (b"\xfc\x01", 960),  # CELT FB 20 ms stereo, one frame
        (OPUS_SILENCE, 960),
        (b"\x00", 480),  # SILK NB 10 ms
        (b"\x18", 2880),  # SILK NB 60 ms
        (b"\x71", 960),  # hybrid FB 10 ms, code 1: two frames
        (b"\xe2\x00", 240),  # CELT FB 2.5 ms, code 2: two frames
        (b"\x1b\x02", 5760),  # SILK NB 60 ms, code 3: two frames = 120 ms
        (b"\xfb\x03", 2880),  # code 3, three 20 ms frames
    ],
)
def test_packet_samples_reads_the_toc(packet: bytes, samples: int) -> None:
    assert packet_samples(packet) == samples


@pytest.mark.parametrize("packet", [b"", b"\xfb", b"\xfb\x00", b"\xfb\x07"])
def test_packet_samples_rejects_malformed_packets(packet: bytes) -> None:
    with pytest.raises(AudioError):
        packet_samples(packet)


@pytest.mark.parametrize("bitrate", [96_000, 128_000])
def test_round_trip_keeps_the_signal(speech: bytes, speech_frames: list[bytes], bitrate: int) -> None:
    packets = encode_all(speech_frames, bitrate=bitrate)
    assert all(packet_samples(packet) == 960 for packet in packets)
    # Constrained VBR stays near the target: bytes per 20 ms packet = bitrate / 8 / 50.
    mean_size = sum(map(len, packets)) / len(packets)
    assert 0.6 * bitrate / 400 < mean_size < 1.25 * bitrate / 400
    decoded = decode_all(packets)
    assert len(decoded) == len(packets) * FRAME_BYTES
    match = compare(speech, decoded)
    assert match.lag == LOOKAHEAD
    assert match.correlation > 0.97
    assert match.snr_db > 12.0


def test_bitrate_can_change_between_frames(speech_frames: list[bytes]) -> None:
    with OpusEncoder(bitrate=128_000) as encoder:
        high = [encoder.encode(frame) for frame in speech_frames[:60]]
        encoder.set_bitrate(24_000)
        assert encoder.bitrate == 24_000
        low = [encoder.encode(frame) for frame in speech_frames[60:120]]
    assert sum(map(len, low)) * 3 < sum(map(len, high))


def test_plc_extrapolates_and_fades(speech_frames: list[bytes]) -> None:
    packets = encode_all(speech_frames, bitrate=64_000)
    loudest = max(range(20, 120), key=lambda index: rms(speech_frames[index]))
    with OpusDecoder() as decoder:
        assert decoder.has_plc and decoder.has_fec
        for packet in packets[: loudest + 1]:
            decoder.decode(packet)
        concealed = [decoder.conceal() for _ in range(12)]
    assert all(len(frame) == FRAME_BYTES for frame in concealed)
    assert rms(concealed[0]) > 0.005  # not silence: PLC continues the signal
    assert rms(concealed[-1]) < rms(concealed[0]) / 2  # and fades out


def _aligned_snr(estimate: bytes, truth: bytes) -> float:
    a, b = to_float(estimate), to_float(truth)
    return float(10 * np.log10((np.sum(b**2) + 1e-9) / (np.sum((a - b) ** 2) + 1e-9)))


def test_fec_recovers_a_lost_frame_better_than_plc(speech_frames: list[bytes]) -> None:
    packets = encode_all(speech_frames, bitrate=48_000, application="voip", fec=True, expected_loss=20)
    reference = decode_all(packets)
    gains = []
    for lost in range(20, 140, 6):
        truth = reference[lost * FRAME_BYTES : (lost + 1) * FRAME_BYTES]
        if rms(truth) < 0.01:
            continue  # a pause: both methods are trivially right
        results = {}
        for mode in ("plc", "fec"):
            with OpusDecoder() as decoder:
                for packet in packets[:lost]:
                    decoder.decode(packet)
                if mode == "plc":
                    results[mode] = decoder.conceal()
                else:
                    results[mode] = decoder.decode_fec(packets[lost + 1])
                    assert len(decoder.decode(packets[lost + 1])) == FRAME_BYTES
        gains.append(_aligned_snr(results["fec"], truth) - _aligned_snr(results["plc"], truth))
    assert len(gains) >= 8
    assert float(np.mean(gains)) > 3.0


def test_decode_fec_without_fec_data_equals_plc(speech_frames: list[bytes]) -> None:
    packets = encode_all(speech_frames[:30], bitrate=128_000)  # CELT, no FEC
    outputs = []
    for use_fec in (False, True):
        with OpusDecoder() as decoder:
            for packet in packets[:20]:
                decoder.decode(packet)
            outputs.append(decoder.decode_fec(packets[21]) if use_fec else decoder.conceal())
    assert outputs[0] == outputs[1]


def test_mono_silence_frame_decodes_to_stereo_silence() -> None:
    with OpusDecoder() as decoder:
        pcm = decoder.decode(OPUS_SILENCE)
    assert len(pcm) == FRAME_BYTES
    assert rms(pcm) < 1e-4


def test_bad_input_raises_audio_or_argument_errors() -> None:
    with OpusDecoder() as decoder:
        with pytest.raises(AudioError):
            decoder.decode(b"")
        with pytest.raises(AudioError):
            decoder.decode(b"\xfb")  # code 3 without its frame count
        with pytest.raises(InvalidArgumentError):
            decoder.conceal(100)
        assert len(decoder.decode(OPUS_SILENCE)) == FRAME_BYTES  # still usable after errors
    with OpusEncoder() as encoder:
        with pytest.raises(InvalidArgumentError):
            encoder.encode(b"\x00" * 1000)
        with pytest.raises(InvalidArgumentError):
            encoder.encode("not bytes")  # type: ignore[arg-type]
        assert packet_samples(encoder.encode(bytes(FRAME_BYTES // 2))) == 480  # 10 ms frames work too
    with pytest.raises(InvalidArgumentError):
        OpusEncoder(bitrate=1_000)
    with pytest.raises(InvalidArgumentError):
        OpusEncoder(expected_loss=101)
    with pytest.raises(InvalidArgumentError):
        OpusEncoder(application="music")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("option", "value"), [("bitrate", 64e3), ("complexity", 5.5), ("expected_loss", 10.0)]
)
def test_encoder_settings_must_be_integers(option: str, value: float) -> None:
    """A float (64e3) passed the range check; libopus's ctl then raised TypeError at the first frame."""
    with pytest.raises(InvalidArgumentError, match=option):
        OpusEncoder(**{option: value})  # type: ignore[arg-type]
    with OpusEncoder() as encoder:
        setter = {"bitrate": encoder.set_bitrate, "expected_loss": encoder.set_expected_loss}.get(option)
        if setter is not None:
            with pytest.raises(InvalidArgumentError, match=option):
                setter(value)  # type: ignore[arg-type]
        assert len(encoder.encode(bytes(FRAME_BYTES))) > 0


def test_closed_codecs_refuse_work() -> None:
    encoder = OpusEncoder()
    encoder.close()
    encoder.close()  # idempotent
    assert encoder.closed
    with pytest.raises(AudioError):
        encoder.encode(bytes(FRAME_BYTES))
    decoder = OpusDecoder()
    decoder.close()
    with pytest.raises(AudioError):
        decoder.decode(OPUS_SILENCE)


def test_close_from_another_thread_never_frees_state_mid_call(speech_frames: list[bytes]) -> None:
    encoder = OpusEncoder()
    outcome: list[str] = []

    def work() -> None:
        try:
            while True:
                for frame in speech_frames:
                    encoder.encode(frame)
        except AudioError:
            outcome.append("closed")

    thread = threading.Thread(target=work)
    thread.start()
    encoder.close()
    thread.join(timeout=10)
    assert outcome == ["closed"]


def test_encoders_on_two_threads_match_sequential_output(speech_frames: list[bytes]) -> None:
    expected = encode_all(speech_frames[:50], bitrate=96_000)
    results: list[list[bytes]] = [[], []]

    def work(index: int) -> None:
        results[index] = encode_all(speech_frames[:50], bitrate=96_000)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [expected, expected]


def test_pyav_fallback_encodes_and_decodes(speech: bytes, speech_frames: list[bytes]) -> None:
    with OpusEncoder(bitrate=96_000, backend="pyav") as encoder:
        assert encoder.backend == "pyav"
        packets = [encoder.encode(frame) for frame in speech_frames]
        encoder.set_bitrate(64_000)  # reopens the FFmpeg context
        assert packet_samples(encoder.encode(speech_frames[0])) == 960
    with OpusDecoder(backend="pyav") as decoder:
        assert not decoder.has_plc and not decoder.has_fec
        decoded = b"".join(decoder.decode(packet) for packet in packets)
        assert decoder.conceal() == bytes(FRAME_BYTES)
        assert decoder.decode_fec(packets[3]) == bytes(FRAME_BYTES)
    match = compare(speech, decoded)
    assert match.lag == LOOKAHEAD
    assert match.correlation > 0.97
    # The ctypes decoder reads the fallback's packets too: same codec underneath.
    assert compare(speech, decode_all(packets)).correlation > 0.97


def test_encode_frames_matches_encoding_one_by_one(speech_frames: list[bytes]) -> None:
    frames = speech_frames[:20]
    with OpusEncoder(bitrate=96_000) as one, OpusEncoder(bitrate=96_000) as batch:
        expected = [one.encode(frame) for frame in frames]
        assert batch.encode_frames([bytearray(frames[0]), *frames[1:]]) == expected
        with pytest.raises(InvalidArgumentError):
            batch.encode_frames([frames[0], b"\x00" * 10])  # refused before anything is encoded
    with pytest.raises(AudioError):
        batch.encode_frames(frames[:1])
