"""Recording sinks driven directly with frames: timeline placement, windowed mixing, late frames."""

from __future__ import annotations

import gc
import os
import tracemalloc
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from cordvoice.audio.opus import OPUS_SILENCE, OpusDecoder, OpusEncoder
from cordvoice.audio.pcm import iter_frames
from cordvoice.audio.receive_pipeline import VoiceFrame
from cordvoice.audio.sinks import (
    CallbackSink,
    MixedWavSink,
    OggOpusSink,
    PerUserOggSink,
    PerUserWavSink,
    Timeline,
    WavSink,
    record_to_directory,
)
from cordvoice.errors import AudioError, InvalidArgumentError

RATE = 48_000


def frame(
    user: int, seq: int, playout: float, value: int, *, opus: bytes = b"\xfc\x00\x01\x02"
) -> VoiceFrame:
    pcm = np.full(960 * 2, value, dtype="<i2").tobytes()
    return VoiceFrame(user, user, seq, seq * 960, playout, playout, playout, opus, pcm)


def samples(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as reader:
        return np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2").reshape(-1, 2)[:, 0]


def av_packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return [bytes(packet) for packet in container.demux(stream) if packet.size]


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


def test_closing_at_an_end_cuts_audio_placed_past_it(tmp_path: Path) -> None:
    """A receiver's close flushes frames that play after the recording stopped: every WAV ends at end_time."""
    timeline = Timeline(20.0)
    per_user = PerUserWavSink(tmp_path, timeline=timeline)
    mixed = MixedWavSink(tmp_path / "mixed.wav", timeline=timeline, window=0.1)
    for sink in (per_user, mixed):
        for index in range(60):  # 1.2 s of speech, for a recording stopped at 1.01 s
            sink.write(frame(1, index, 20.0 + index * 0.02, 50))
        sink.close(end_time=21.01)
    for path in (tmp_path / "1.wav", tmp_path / "mixed.wav"):
        audio = samples(path)
        assert len(audio) == round(1.01 * RATE) and set(audio.tolist()) == {50}, path.name
        with wave.open(str(path), "rb") as reader:  # a well-formed header for the cut length
            assert (reader.getnchannels(), reader.getframerate(), reader.getsampwidth()) == (2, RATE, 2)
    assert per_user.sinks[1].samples_written == round(1.01 * RATE)


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


def test_a_wav_path_that_cannot_be_created_raises_audio_error_and_leaves_nothing_half_built(
    tmp_path: Path,
) -> None:
    blocked = tmp_path / "taken"
    blocked.mkdir()  # a directory in the way of the file
    for make in (lambda: WavSink(blocked), lambda: MixedWavSink(blocked)):
        with pytest.raises(AudioError, match="cannot create"):
            make()
        # A half-built wave writer's finalizer would raise here (an unraisable AttributeError).
        gc.collect()


def test_closing_per_user_sinks_closes_every_user_even_after_one_fails(tmp_path: Path) -> None:
    (tmp_path / "1.wav").symlink_to("/dev/full")  # user 1's file: every flush fails (ENOSPC)
    per_user = PerUserWavSink(tmp_path)
    for user in (1, 2, 3):
        per_user.write(frame(user, 0, 1.0, 5))
    with pytest.raises(AudioError, match=r"1\.wav"):
        per_user.close()
    for user in (2, 3):  # the users after the failed one got finished files
        assert samples(tmp_path / f"{user}.wav").tolist() == [5] * 960
    per_user.close()  # idempotent: the failure is not raised again


def test_per_user_close_names_how_many_failed(tmp_path: Path) -> None:
    for user in (1, 3):
        (tmp_path / f"{user}.opus").symlink_to("/dev/full")
    per_user = PerUserOggSink(tmp_path)
    for user in (1, 2, 3):
        per_user.write(frame(user, 0, 1.0, 5))
    with pytest.raises(AudioError, match="2 of 3") as caught:
        per_user.close()
    assert isinstance(caught.value.__cause__, AudioError)  # the first failure, for the traceback
    assert av_packets(tmp_path / "2.opus") == [b"\xfc\x00\x01\x02"]


def open_files_to(target: str) -> int:
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == target)


def test_an_ogg_sink_whose_end_padding_fails_still_closes_its_file(tmp_path: Path) -> None:
    (tmp_path / "user.opus").symlink_to("/dev/full")
    before = open_files_to("/dev/full")
    sink = OggOpusSink(tmp_path / "user.opus", start_time=1.0)
    sink.write(frame(1, 0, 1.0, 5))
    with pytest.raises(AudioError) as caught:
        sink.close(end_time=61.0)  # a minute of silence pages overflows the buffer: the write fails
    # Closed by close() itself, not later by the garbage collector (the traceback still holds the writer).
    assert open_files_to("/dev/full") == before
    assert "No space left" in str(caught.value)


def av_decoded(path: Path) -> np.ndarray:
    """The left channel of what FFmpeg decodes, scaled to s16 (the Ogg header's pre-skip applied)."""
    with av.open(str(path)) as container:
        planes = [frame.to_ndarray()[0] for frame in container.decode(audio=0)]
    audio = np.concatenate(planes)
    return audio * 32768 if audio.dtype.kind == "f" else audio


def test_a_users_ogg_file_lines_up_with_the_wav_file_sample_for_sample(tmp_path: Path) -> None:
    """The Ogg file must not drop an encoder delay the WAV file keeps: both are one timeline."""
    source = np.zeros((2 * RATE, 2), dtype="<i2")
    source[RATE : RATE + 480] = 20_000  # a click at 1 s
    encoder, decoder = OpusEncoder(), OpusDecoder()
    timeline = Timeline(100.0)
    wav = WavSink(tmp_path / "u.wav", 1, timeline=timeline)
    ogg = OggOpusSink(tmp_path / "u.opus", 1, timeline=timeline)
    for index, pcm in enumerate(iter_frames(source.tobytes())):
        packet = encoder.encode(pcm)
        t = 100.0 + index * 0.02
        voice = VoiceFrame(1, 1, index, index * 960, t, t, t, packet, decoder.decode(packet))
        wav.write(voice)
        ogg.write(voice)
    for sink in (wav, ogg):
        sink.close(end_time=102.0)
    from_wav, from_ogg = samples(tmp_path / "u.wav"), av_decoded(tmp_path / "u.opus")
    assert len(from_ogg) == len(from_wav) == 2 * RATE
    click = int(np.argmax(np.abs(from_wav) > 5000))
    assert int(np.argmax(np.abs(from_ogg) > 5000)) == click


def test_an_ogg_talk_spurt_starting_half_a_frame_off_the_grid_loses_no_packet(tmp_path: Path) -> None:
    """The silence filling a pause may overshoot by half a frame: the spurt's packets are not late for it."""
    sink = OggOpusSink(tmp_path / "u.opus", 1, start_time=10.0)
    sink.write(frame(1, 0, 10.0, 5))
    for index in range(10):  # after a pause, starting 1.5 frames after the first packet's end
        sink.write(frame(1, 1 + index, 10.05 + index * 0.02, 5))
    sink.close()
    assert sink.late == 0
    assert av_packets(tmp_path / "u.opus").count(b"\xfc\x00\x01\x02") == 11


def test_silence_across_a_long_pause_is_written_without_holding_it_in_memory(tmp_path: Path) -> None:
    """A member first heard an hour in (or gone an hour before the end) must not cost a GB of RAM at once."""
    timeline = Timeline(0.0)
    per_user = PerUserWavSink(tmp_path, timeline=timeline)
    mixed = MixedWavSink(tmp_path / "mixed.wav", timeline=timeline)
    tracemalloc.start()
    try:
        for sink in (per_user, mixed):
            sink.write(frame(1, 0, 0.0, 5))
            sink.write(frame(2, 0, 30.0, 7))  # 30 s of silence before user 2, in every file
            sink.close(end_time=60.0)  # and 30 s after
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3_000_000, f"{peak:,} bytes at once for 30 s of silence (5.8 MB)"
    for name, voiced in (("1.wav", 960), ("2.wav", 960), ("mixed.wav", 2 * 960)):
        audio = samples(tmp_path / name)
        assert len(audio) == 60 * RATE and np.count_nonzero(audio) == voiced, name


def test_a_wav_file_past_4_gib_reads_to_its_end(tmp_path: Path) -> None:
    """Past 6.2 hours the sizes do not fit: FFmpeg must still read every hour; the silence costs no disk."""
    sink = WavSink(tmp_path / "long.wav", 1, start_time=0.0)
    sink.write(frame(1, 0, 0.0, 5))
    sink.write(frame(1, 1, 7 * 3600.0, 9))  # a member who spoke at the start and 7 hours later
    sink.close(end_time=7 * 3600.0 + 1.0)
    path = tmp_path / "long.wav"
    assert path.stat().st_size == 44 + (7 * 3600 + 1) * RATE * 4
    assert path.stat().st_blocks * 512 < 10_000_000, "the pause is a hole, not 4.8 GB of zeros"
    with av.open(str(path)) as container:
        assert container.duration is not None and round(container.duration / 1e6) == 7 * 3600 + 1
        container.seek(7 * 3600 * 1_000_000)
        first = next(container.decode(audio=0)).to_ndarray().reshape(-1)
    assert first[0] == 9


def test_a_folder_that_cannot_be_created_raises_audio_error(tmp_path: Path) -> None:
    """Like a file that cannot be created: the project's error, not a bare OSError."""
    taken = tmp_path / "taken"
    taken.write_bytes(b"a file where the folder should be")
    for make in (
        lambda: PerUserWavSink(taken),
        lambda: PerUserOggSink(taken / "sub"),
        lambda: record_to_directory(taken),
    ):
        with pytest.raises(AudioError, match="cannot create"):
            make()


@pytest.mark.parametrize(
    "filename",
    [
        "{user}.wav",
        "{user_id}-{0}.wav",
        "{user_id",
        "{user_id:q}.wav",
        "{user_id.x}",
        "{user_id[0]}",
        "all.wav",
    ],
)
def test_a_bad_filename_template_is_refused_when_the_sink_is_made(tmp_path: Path, filename: str) -> None:
    """Not on the first frame, where the receiver would detach the sink and record nobody."""
    with pytest.raises(InvalidArgumentError, match="filename"):
        PerUserWavSink(tmp_path, filename=filename)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), "12.5"])
def test_a_start_or_end_that_is_not_a_time_is_refused(tmp_path: Path, bad: float) -> None:
    with pytest.raises(InvalidArgumentError, match="start_time"):
        WavSink(tmp_path / "a.wav", 1, start_time=bad)
    with pytest.raises(InvalidArgumentError, match="start"):
        Timeline(bad)
    with pytest.raises(InvalidArgumentError, match="start_time"):
        record_to_directory(tmp_path / "rec", start_time=bad)
    assert not (tmp_path / "rec").exists()
    for sink in (WavSink(tmp_path / "b.wav", 1, start_time=0.0), MixedWavSink(tmp_path / "m.wav")):
        sink.write(frame(1, 0, 0.0, 5))
        with pytest.raises(InvalidArgumentError, match="end_time"):
            sink.close(end_time=bad)
        sink.close()  # still open: the refused close wrote nothing
        assert len(samples(sink.path)) == 960


def test_a_sink_for_the_first_user_heard_is_not_taken_by_silence_frames(tmp_path: Path) -> None:
    """Someone who had just stopped talking sends silence frames first: the first user *heard* speaks next."""
    wav = WavSink(tmp_path / "first.wav", start_time=1.0)
    ogg = OggOpusSink(tmp_path / "first.opus", start_time=1.0)
    for sink in (wav, ogg):
        sink.write(frame(1, 0, 1.0, 0, opus=OPUS_SILENCE))
        sink.write(frame(2, 0, 1.02, 7))
        sink.close()
    assert wav.user_id == ogg.user_id == 2
    assert samples(tmp_path / "first.wav")[-960:].tolist() == [7] * 960
    assert av_packets(tmp_path / "first.opus")[-1] == b"\xfc\x00\x01\x02"


def test_one_user_sinks_refuse_a_user_id_no_frame_can_match(tmp_path: Path) -> None:
    """``WavSink(path, user_id="42")`` (an id read from a config file) wrote an empty file, silently."""
    for make in (
        lambda: WavSink(tmp_path / "a.wav", "42"),  # type: ignore[arg-type]
        lambda: OggOpusSink(tmp_path / "a.opus", "42"),  # type: ignore[arg-type]
        lambda: CallbackSink(print, user_id="42"),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidArgumentError, match="user_id"):
            make()
    assert list(tmp_path.iterdir()) == [], "no file is left behind"
    with pytest.raises(InvalidArgumentError, match="callback"):
        CallbackSink("print")  # type: ignore[arg-type]
