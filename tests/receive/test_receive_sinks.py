"""Recording sinks driven directly with frames: timeline placement, windowed mixing, late frames."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from cordvoice.audio.opus import OPUS_SILENCE
from cordvoice.audio.receive_pipeline import VoiceFrame
from cordvoice.audio.sinks import MixedWavSink, PerUserWavSink, Timeline, WavSink

RATE = 48_000


def frame(
    user: int, seq: int, playout: float, value: int, *, opus: bytes = b"\xfc\x00\x01\x02"
) -> VoiceFrame:
    pcm = np.full(960 * 2, value, dtype="<i2").tobytes()
    return VoiceFrame(user, user, seq, seq * 960, playout, playout, playout, opus, pcm)


def samples(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as reader:
        return np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2").reshape(-1, 2)[:, 0]


def test_mixed_sink_sums_users_across_many_windows_and_counts_late_frames(tmp_path: Path) -> None:
    sink = MixedWavSink(tmp_path / "mix.wav", start_time=10.0, window=0.2)
    # 3 s of user 1 (value 100) and, from 1 s on, user 2 (value 10), interleaved per tick like a receiver.
    for index in range(150):
        t = 10.0 + index * 0.02
        sink.write(frame(1, index, t, 100))
        if t >= 11.0:
            sink.write(frame(2, index, t, 10))
    sink.write(frame(3, 0, 10.5, 1000))  # 2.5 s late for its place (window 0.2 s): dropped, counted
    sink.write(frame(1, 999, 13.0, 0, opus=OPUS_SILENCE))  # Discord's silence frame: not audio, no extent
    sink.close()
    mixed = samples(tmp_path / "mix.wav")
    assert len(mixed) == 3 * RATE
    assert sink.late == 1
    assert set(mixed[: RATE - 1].tolist()) == {100}
    assert set(mixed[RATE + 1 :].tolist()) == {110}


def test_per_user_files_share_a_timeline_and_pad_gaps(tmp_path: Path) -> None:
    timeline = Timeline(5.0)
    per_user = PerUserWavSink(tmp_path / "users", timeline=timeline)
    single = WavSink(tmp_path / "one.wav", 2, timeline=timeline)
    per_user.write(frame(1, 0, 5.0, 7))
    per_user.write(frame(1, 1, 5.5, 7))  # a 480 ms pause before it
    for sink in (per_user, single):
        sink.write(frame(2, 0, 5.2, 9))
    per_user.write(frame(1, 2, 5.5, 7))  # a repeat of an already written slot: late
    per_user.close(end_time=6.0)
    single.close()
    one = samples(per_user.paths[1])
    two = samples(per_user.paths[2])
    assert len(one) == len(two) == RATE
    assert one[:960].tolist() == [7] * 960 and not one[960 : int(0.5 * RATE)].any()
    assert not two[: int(0.2 * RATE)].any() and two[int(0.2 * RATE)] == 9
    assert per_user.late == 1
    assert np.array_equal(samples(tmp_path / "one.wav"), two[: int(0.22 * RATE)])


def test_a_frame_overlapping_its_predecessor_is_trimmed_alike_in_the_mix(tmp_path: Path) -> None:
    """Timeline rounding can place a user's next frame a sample early; the mix must not add it twice."""
    timeline = Timeline(10.0)
    per_user = PerUserWavSink(tmp_path, timeline=timeline)
    mixed = MixedWavSink(tmp_path / "mixed.wav", timeline=timeline)
    overlap = 1 / RATE
    for sink in (per_user, mixed):
        sink.write(frame(1, 0, 10.0, 100))
        sink.write(frame(1, 1, 10.02 - overlap, 100))  # starts one sample before the first one ends
        sink.write(frame(2, 0, 10.0, 10))
        sink.close()
    mix = samples(tmp_path / "mixed.wav")
    user = samples(tmp_path / "1.wav")
    assert len(user) == 2 * 960 - 1 and set(user.tolist()) == {100}
    assert mix.tolist() == [110] * 960 + [100] * 959, "the overlapping sample counted once"
