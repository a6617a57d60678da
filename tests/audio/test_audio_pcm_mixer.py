"""PCM helpers, frame chunking, the soft-clipping mixer and the generated sample signals."""

from __future__ import annotations

import asyncio
import io
import math
from collections.abc import AsyncIterator

import av
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cordvoice.audio.mixer import Mixer, apply_volume, mix, soft_clip
from cordvoice.audio.pcm import (
    FRAME_BYTES,
    SILENCE_FRAME,
    FrameChunker,
    aiter_frames,
    as_array,
    dbfs,
    iter_frames,
    iter_frames_from_file,
    peak,
    rms,
    silence,
)
from cordvoice.audio.samples import VOICES, demo_pcm, melody, speech_like, tone, write_demo_ogg
from cordvoice.errors import InvalidArgumentError

from .audio_helpers import to_float


def frame_of(values: np.ndarray) -> bytes:
    return np.asarray(values, dtype="<i2").tobytes()


def test_levels_of_a_known_sine() -> None:
    pcm = tone(1000.0, 0.1, amplitude=0.5)
    assert rms(pcm) == pytest.approx(0.5 / math.sqrt(2), rel=1e-3)
    assert peak(pcm) == pytest.approx(0.5, rel=1e-3)
    assert dbfs(rms(pcm)) == pytest.approx(-9.03, abs=0.05)
    assert dbfs(0.0) == -math.inf
    assert rms(b"") == 0.0 and peak(b"") == 0.0
    assert peak(frame_of([-32768, 0])) == 1.0  # no int16 overflow in abs()


def test_as_array_is_a_zero_copy_view() -> None:
    data = bytearray(frame_of([1, -2, 3, -4]))
    view = as_array(data)
    data[0] = 9
    assert view[0] == 9
    with pytest.raises(InvalidArgumentError):
        as_array(b"\x00")


def test_silence_lengths() -> None:
    assert silence() == SILENCE_FRAME and len(SILENCE_FRAME) == FRAME_BYTES
    assert silence(10) == bytes(40)


@given(st.lists(st.binary(max_size=9000), max_size=12))
def test_chunker_rechunks_any_split_and_pads_the_tail(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    frames = list(iter_frames(chunks))
    assert all(len(frame) == FRAME_BYTES for frame in frames)
    assert len(frames) == math.ceil(len(data) / FRAME_BYTES)
    joined = b"".join(frames)
    assert joined[: len(data)] == data
    assert joined[len(data) :] == bytes(len(joined) - len(data))


def test_chunker_unpadded_drops_the_partial_tail_and_reports_pending() -> None:
    chunker = FrameChunker()
    assert chunker.feed(b"\x01" * 5000) == [b"\x01" * FRAME_BYTES]
    assert chunker.pending == 5000 - FRAME_BYTES
    chunker.clear()
    assert chunker.flush() is None
    assert list(iter_frames(b"\x02" * 5000, pad=False)) == [b"\x02" * FRAME_BYTES]


async def test_frames_from_a_file_object_and_an_async_iterator() -> None:
    data = bytes(range(256)) * 40  # 10240 bytes: 2 frames + a partial one
    from_file = list(iter_frames_from_file(io.BytesIO(data)))
    assert len(from_file) == 3 and b"".join(from_file)[: len(data)] == data

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]

    async with asyncio.timeout(5):
        assert [frame async for frame in aiter_frames(chunks())] == from_file


def test_mixing_quiet_frames_is_an_exact_sum() -> None:
    rng = np.random.default_rng(3)
    a = rng.integers(-8000, 8000, 1920)
    b = rng.integers(-8000, 8000, 1920)
    assert mix([frame_of(a), frame_of(b)]) == frame_of(a + b)
    assert mix([frame_of(a)]) == frame_of(a)
    assert mix([frame_of(a), frame_of(b)], [0.5, 0.0]) == frame_of(np.rint(a * 0.5))


def test_soft_clipper_is_linear_below_threshold_and_bounded_above() -> None:
    x = np.linspace(-3.0, 3.0, 6001, dtype=np.float32)
    y = soft_clip(x.copy(), 0.8)
    linear = np.abs(x) <= 0.8
    assert np.array_equal(y[linear], x[linear])
    assert np.all(np.abs(y) <= 1.0)
    assert np.all(np.abs(y[np.abs(x) <= 1.0]) < 0.96)
    assert np.all(np.diff(y) >= 0)  # monotonic: no fold-over
    slope = np.diff(y) / np.diff(x)
    assert np.max(np.abs(np.diff(slope))) < 0.01  # smooth: no corner at the knee
    assert y[np.argmin(np.abs(x - 1.0))] == pytest.approx(0.8 + 0.2 * math.tanh(1.0), abs=1e-3)
    with pytest.raises(InvalidArgumentError):
        soft_clip(x.copy(), 1.0)


def test_loud_mix_soft_clips_instead_of_wrapping() -> None:
    loud = tone(440.0, 0.02, amplitude=0.9)
    mixed = mix([loud, loud, loud])
    assert peak(mixed) < 1.0
    assert peak(mixed) > 0.95  # still loud: clipped softly, not attenuated
    # Where the inputs are quiet (zero crossings), the sum stays linear: 3x the input.
    source = to_float(loud)[:, 0]
    out = to_float(mixed)[:, 0]
    quiet = np.abs(source * 3) < 0.7
    assert np.allclose(out[quiet], 3 * source[quiet], atol=2 / 32768)


def test_two_tones_keep_their_levels_in_the_spectrum() -> None:
    low = tone(440.0, 0.2, amplitude=0.3)
    high = tone(1500.0, 0.2, amplitude=0.15)
    mixed = b"".join(
        mix([low[i : i + FRAME_BYTES], high[i : i + FRAME_BYTES]]) for i in range(0, len(low), FRAME_BYTES)
    )
    left = to_float(mixed)[:, 0]
    spectrum = np.abs(np.fft.rfft(left * np.hanning(len(left))))
    frequencies = np.fft.rfftfreq(len(left), 1 / 48_000)
    level = {f: spectrum[np.argmin(np.abs(frequencies - f))] for f in (440.0, 1500.0)}
    assert level[440.0] / level[1500.0] == pytest.approx(2.0, rel=0.02)


def test_volume_scales_and_soft_clips() -> None:
    pcm = tone(300.0, 0.02, amplitude=0.4)
    assert apply_volume(pcm, 1.0) is pcm
    assert apply_volume(pcm, 0.0) == bytes(len(pcm))
    assert rms(apply_volume(pcm, 0.5)) == pytest.approx(rms(pcm) / 2, rel=1e-3)
    assert peak(apply_volume(pcm, 4.0)) < 1.0
    with pytest.raises(InvalidArgumentError):
        apply_volume(pcm, -1.0)
    with pytest.raises(InvalidArgumentError):
        apply_volume(pcm, math.nan)


def test_mixer_argument_checks() -> None:
    mixer = Mixer(threshold=0.5)
    with pytest.raises(InvalidArgumentError):
        mixer.mix([])
    with pytest.raises(InvalidArgumentError):
        mixer.mix([SILENCE_FRAME, b"\x00\x00"])
    with pytest.raises(InvalidArgumentError):
        mixer.mix([SILENCE_FRAME], [1.0, 2.0])
    with pytest.raises(InvalidArgumentError):
        mixer.mix([SILENCE_FRAME, SILENCE_FRAME], [1.0, math.inf])
    with pytest.raises(InvalidArgumentError):
        Mixer(threshold=0.0)
    with pytest.raises(InvalidArgumentError):
        mixer.mix([b"\x00\x00\x00", b"\x00\x00\x00"])
    assert mixer.mix([b"", b""]) == b"" and mixer.mix([b"", b""], [0.5, 1.0]) == b""


# ---------------------------------------------------------------------------------------------- samples


def test_samples_are_deterministic_and_well_formed() -> None:
    assert speech_like(1.0, voice=2) == speech_like(1.0, voice=2)
    assert len(speech_like(0.1, voice=-1001)) == 0.1 * 48_000 * 4  # any int picks a voice
    assert melody(1.0) == melody(1.0)
    assert len(demo_pcm(1.5)) == 1.5 * 48_000 * 4
    for pcm in (speech_like(2.0), melody(2.0), demo_pcm(2.0)):
        assert rms(pcm) > 0.05 and peak(pcm) < 1.0


def test_voices_are_distinct_speech_like_signals() -> None:
    voices = [to_float(speech_like(4.0, voice=v))[:, 0] for v in range(len(VOICES))]
    for i in range(len(voices)):
        for j in range(i + 1, len(voices)):
            assert abs(np.corrcoef(voices[i], voices[j])[0, 1]) < 0.2
    # Speech-like: energy comes and goes (syllables and pauses) and sits below 4 kHz.
    frames = voices[0][: len(voices[0]) // 960 * 960].reshape(-1, 960)
    energy = np.sqrt(np.mean(frames**2, axis=1))
    assert np.mean(energy < 0.1 * energy.max()) > 0.1
    spectrum = np.abs(np.fft.rfft(voices[0])) ** 2
    frequencies = np.fft.rfftfreq(len(voices[0]), 1 / 48_000)
    assert spectrum[frequencies < 4000].sum() / spectrum.sum() > 0.95


def test_demo_ogg_decodes_to_exactly_the_demo_pcm_length() -> None:
    buffer = io.BytesIO()
    packets = write_demo_ogg(buffer, 2.0)
    data = buffer.getvalue()
    assert packets == 101
    assert len(data) < 200_000 / 5  # 2 s; a 10 s demo stays well under the 200 KB budget
    with av.open(io.BytesIO(data)) as container:
        decoded = sum(frame.samples for frame in container.decode(audio=0))
    assert decoded == 2 * 48_000


def test_sample_argument_checks() -> None:
    with pytest.raises(InvalidArgumentError):
        tone(30_000.0, 1.0)
    with pytest.raises(InvalidArgumentError):
        speech_like(0.0)
