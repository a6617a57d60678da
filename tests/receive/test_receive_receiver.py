"""The asyncio Receiver and the sinks, fed in real time (no sockets), with real Opus and real davey."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
import time
import wave
from collections.abc import AsyncIterable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import av
import numpy as np
import pytest

from cordvoice.audio.mixer import soft_clip_to_int16
from cordvoice.audio.opus import OpusDecoder
from cordvoice.audio.receive_pipeline import DecodeJob, VoiceFrame
from cordvoice.audio.receiver import FrameStream, Receiver, _split_jobs
from cordvoice.audio.samples import speech_like, tone
from cordvoice.audio.sinks import (
    CallbackSink,
    MixedWavSink,
    OggOpusSink,
    PerUserOggSink,
    PerUserWavSink,
    WavSink,
    record_to_directory,
)
from cordvoice.errors import InvalidArgumentError

from .receive_helpers import DaveGroup, aligned_correlation, encode_pcm, rtp_header, to_mono

SSRC_A = 0xA0A0
SSRC_B = 0xB0B0
USER_A = 701
USER_B = 702
T = TypeVar("T")


async def feed_paced(
    receiver: Receiver,
    frames: list[bytes],
    *,
    ssrc: int,
    start_seq: int = 0,
    encrypt: Callable[[bytes], bytes | None] | None = None,
) -> None:
    """Feed one packet every 20 ms on absolute deadlines, the way a sender paces them."""
    start = time.monotonic()
    for index, frame in enumerate(frames):
        delay = start + index * 0.020 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        payload = encrypt(frame) if encrypt is not None else frame
        assert payload is not None
        seq = start_seq + index
        receiver.feed(rtp_header(seq, seq * 960, ssrc), payload)


async def collect(stream: AsyncIterable[T], limit: float = 10.0) -> list[T]:
    """Everything a stream yields until it ends (within ``limit`` seconds)."""
    async with asyncio.timeout(limit):
        return [item async for item in stream]


def read_wav(path: Path) -> tuple[bytes, int]:
    with wave.open(str(path), "rb") as reader:
        assert (reader.getnchannels(), reader.getsampwidth(), reader.getframerate()) == (2, 2, 48_000)
        frames = reader.getnframes()
        return reader.readframes(frames), frames


async def test_pcm_listener_gets_decoded_dave_audio_in_order() -> None:
    pcm = speech_like(1.5, voice=0)
    frames = encode_pcm(pcm)
    group = DaveGroup()
    ours = group.join(1)
    sender = group.join(USER_A)
    group.settle()
    receiver = Receiver(ours.decrypt)
    receiver.on_speaking(USER_A, SSRC_A, 1)
    everyone = receiver.listen()
    decoded = receiver.listen(USER_A, pcm=True)
    other = receiver.listen(USER_B)
    await feed_paced(receiver, frames, ssrc=SSRC_A, encrypt=sender.encrypt)
    await asyncio.sleep(0.15)
    await receiver.close()
    opus_frames = await collect(everyone)
    pcm_frames = await collect(decoded)
    assert await collect(other) == []
    assert [f.opus for f in opus_frames] == frames
    assert all(f.pcm is None for f in opus_frames)
    assert [f.sequence for f in pcm_frames] == list(range(len(frames)))
    out = b"".join(f.pcm or b"" for f in pcm_frames)
    correlation, _ = aligned_correlation(to_mono(pcm), to_mono(out), 2000)
    assert correlation > 0.95
    stats = receiver.stats(USER_A)
    assert stats.decoded == len(frames) and stats.undecryptable == 0 and stats.lost == 0
    # Playout is 20 ms apart on the receiver's clock, about the jitter delay after arrival.
    first = opus_frames[0]
    assert first.arrival_time is not None
    assert 0.05 < first.playout_time - first.arrival_time < 0.08


async def test_a_shut_down_executor_counts_decode_errors_and_close_returns() -> None:
    frames = encode_pcm(tone(440.0, 0.3))
    pool = ThreadPoolExecutor(1)
    pool.shutdown()
    receiver = Receiver(None, executor=pool)
    receiver.on_speaking(USER_A, SSRC_A, 1)
    decoded = receiver.listen(USER_A, pcm=True)
    await feed_paced(receiver, frames, ssrc=SSRC_A)
    async with asyncio.timeout(5):
        await receiver.close()
    got = await collect(decoded)
    assert len(got) == len(frames), "frames still arrive, with silence for the PCM that failed"
    assert receiver.stats(USER_A).decode_errors == len(frames)


@contextlib.contextmanager
def closing_while_decoding(tmp_path: Path) -> Iterator[tuple[Receiver, WavSink, FrameStream]]:
    """A receiver holding 5 frames of USER_A, whose close() will wait for their decode until the block ends.

    Yields it with a WAV sink and an Opus stream attached.
    """
    pool = ThreadPoolExecutor(1)
    busy = threading.Event()
    pool.submit(busy.wait, 10)  # the decode of close()'s last frames waits behind this
    try:
        receiver = Receiver(None, executor=pool)
        receiver.on_speaking(USER_A, SSRC_A, 1)
        wav = WavSink(tmp_path / "a.wav", USER_A)
        receiver.add_sink(wav)
        frames = receiver.listen()
        for seq, packet in enumerate(encode_pcm(tone(440.0, 0.1))):
            receiver.feed(rtp_header(seq, seq * 960, SSRC_A), packet)
        yield receiver, wav, frames
    finally:
        busy.set()
        pool.shutdown()


async def test_a_close_cancelled_while_decoding_still_ends_the_streams_and_finishes_the_files(
    tmp_path: Path,
) -> None:
    """A task cancelled in close() (a shutdown, a timeout) must not leave WAV headers empty, streams open."""
    with closing_while_decoding(tmp_path) as (receiver, wav, frames):
        closing = asyncio.ensure_future(receiver.close())
        await asyncio.sleep(0.05)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert len(await collect(frames, 2.0)) == 5
        assert wav.samples_written == 0
        assert read_wav(tmp_path / "a.wav")[1] == 0  # closed: a header for what was written


async def test_a_second_close_returns_once_the_first_has_finished_the_files(tmp_path: Path) -> None:
    """The session closes its receiver itself when it ends; the bot's own close must not return before it."""
    with closing_while_decoding(tmp_path) as (receiver, wav, frames):
        first = asyncio.ensure_future(receiver.close())  # the session's, on DisconnectedEvent
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(receiver.close())  # the bot's, right after wait_closed()
        await asyncio.sleep(0.05)
        assert not second.done(), "returned while the files were still being written"
    async with asyncio.timeout(5):
        await second
    assert first.done() and wav.samples_written == 5 * 960
    assert read_wav(tmp_path / "a.wav")[1] == 5 * 960
    assert len(await collect(frames, 2.0)) == 5


@pytest.mark.parametrize(
    "not_a_sink", [["a list of sinks"], "meeting", None, object(), CallbackSink.__init__]
)
async def test_adding_something_that_is_not_a_sink_is_refused(tmp_path: Path, not_a_sink: object) -> None:
    """``add_sink(record_to_directory(...))`` (the list, not each sink) is an easy slip: say so."""
    receiver = Receiver(None)
    with pytest.raises(InvalidArgumentError, match="not an audio sink"):
        receiver.add_sink(not_a_sink)  # type: ignore[arg-type]
    assert receiver.sinks == []
    await receiver.close()


async def test_slow_consumer_is_bounded_and_counts_drops() -> None:
    frames = encode_pcm(tone(440.0, 0.6))
    receiver = Receiver(None)
    receiver.on_speaking(USER_A, SSRC_A, 1)
    slow = receiver.listen(maxsize=5)
    await feed_paced(receiver, frames, ssrc=SSRC_A)
    await receiver.close()
    assert len(slow) == 5
    assert slow.dropped == len(frames) - 5 and slow.delivered == len(frames)
    got = await collect(slow)
    assert [f.sequence for f in got] == list(range(len(frames) - 5, len(frames)))


@pytest.mark.parametrize("user_id", [str(USER_A), 0, -1, 1 << 64, True, 701.0])
async def test_listen_and_stats_refuse_a_user_id_that_no_frame_can_match(user_id: object) -> None:
    """A user id read from a config file or a command line is a str: it matched no frame, silently, and
    its stats were all zeros (nothing lost, it seemed)."""
    receiver = Receiver(None)
    try:
        with pytest.raises(InvalidArgumentError, match="user_id"):
            receiver.listen(user_id)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="user_id"):
            receiver.stats(user_id)  # type: ignore[arg-type]
    finally:
        await receiver.close()


@pytest.mark.parametrize("maxsize", [0, -1, math.nan, math.inf, 2.5, "10", True])
async def test_streams_refuse_a_bound_that_is_not_a_positive_integer(maxsize: object) -> None:
    """NaN compared false with the queue's length: the stream kept every frame, never dropping one."""
    receiver = Receiver(None)
    try:
        with pytest.raises(InvalidArgumentError, match="maxsize"):
            receiver.listen(maxsize=maxsize)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="maxsize"):
            receiver.speaking_events(maxsize)  # type: ignore[arg-type]
    finally:
        await receiver.close()


async def test_speaking_events_and_closed_streams_end() -> None:
    frames = encode_pcm(speech_like(0.6, voice=3))
    receiver = Receiver(None, activity_hangover=0.1)
    events = receiver.speaking_events()
    receiver.on_speaking(USER_A, SSRC_A, 1)
    await feed_paced(receiver, frames, ssrc=SSRC_A)
    receiver.on_speaking(USER_A, SSRC_A, 0)
    await asyncio.sleep(0.3)
    await receiver.close()
    changes = [(c.source, c.speaking) for c in await collect(events)]
    assert changes == [("gateway", True), ("audio", True), ("gateway", False), ("audio", False)]
    late = receiver.listen()
    assert await collect(late, 1.0) == []  # a stream opened after close ends at once


async def test_recording_sinks_keep_silences_and_align_users(tmp_path: Path) -> None:
    """A speaks 0.6 s, pauses 0.8 s, speaks 0.6 s; B starts 0.4 s later: files keep the pauses in place."""
    pcm_a = tone(330.0, 0.6, 0.4)
    pcm_b = tone(550.0, 1.0, 0.4)
    frames_a = encode_pcm(pcm_a)
    frames_b = encode_pcm(pcm_b)
    receiver = Receiver(None)
    receiver.on_speaking(USER_A, SSRC_A, 1)
    receiver.on_speaking(USER_B, SSRC_B, 1)
    start = time.monotonic() + 0.060  # where the first frame will play: arrival + jitter delay
    sinks = record_to_directory(tmp_path, start_time=start)
    for sink in sinks:
        receiver.add_sink(sink)
    got: list[VoiceFrame] = []
    receiver.add_sink(CallbackSink(got.append))

    async def speaker_a() -> None:
        await feed_paced(receiver, frames_a, ssrc=SSRC_A)
        await asyncio.sleep(0.8)
        # discord.py-style: the sequence continues, the timestamp does not jump over the pause.
        await feed_paced(receiver, frames_a, ssrc=SSRC_A, start_seq=len(frames_a))

    async def speaker_b() -> None:
        await asyncio.sleep(0.4)
        await feed_paced(receiver, frames_b, ssrc=SSRC_B)

    await asyncio.gather(speaker_a(), speaker_b())
    await asyncio.sleep(0.15)
    end = time.monotonic()
    for sink in sinks:
        receiver.remove_sink(sink)
    await receiver.close()
    for sink in sinks:
        sink.close()
    assert len(got) == 2 * len(frames_a) + len(frames_b)
    a_wav, a_len = read_wav(tmp_path / f"{USER_A}.wav")
    b_wav, b_len = read_wav(tmp_path / f"{USER_B}.wav")
    mixed, mixed_len = read_wav(tmp_path / "mixed.wav")
    # A: 0.6 + 0.8 (+ scheduling slack) + 0.6 s; B ends ~1.4 s after the start. Silences kept, not squeezed.
    assert 1.95 < a_len / 48_000 < 2.15, a_len / 48_000
    assert 1.35 < b_len / 48_000 < 1.5, b_len / 48_000
    assert mixed_len == max(a_len, b_len)
    a = to_mono(a_wav)
    level = [float(np.sqrt(np.mean(a[i : i + 4800] ** 2))) for i in range(0, len(a) - 4800, 4800)]
    assert min(level[7:12]) < 1e-3 < min(level[1:5])  # the pause is silent, the talk is not
    b = to_mono(b_wav)
    assert float(np.sqrt(np.mean(b[: int(0.35 * 48_000)] ** 2))) < 1e-3  # B's late start is silence
    # The mix is the sum of the aligned per-user files, soft-clipped. The curve leaves every sample under its
    # knee bit-exact; the decoder's overshoot where A resumes as B ends can reach the knee in some runs.
    mix = np.frombuffer(mixed, dtype="<i2").astype(np.int32)
    summed = np.zeros_like(mix)
    summed[: len(a_wav) // 2] += np.frombuffer(a_wav, dtype="<i2")
    summed[: len(b_wav) // 2] += np.frombuffer(b_wav, dtype="<i2")
    assert np.array_equal(mix, soft_clip_to_int16(summed.astype(np.float32)))
    # Ogg Opus: the received packets as they came, decodable, on the same timeline.
    with av.open(str(tmp_path / f"{USER_A}.opus")) as container:
        packets = [bytes(p) for p in container.demux(audio=0) if p.size]
    assert [p for p in packets if len(p) > 3] == frames_a + frames_a
    assert 1.95 < len(packets) * 0.02 < 2.15
    assert end > start


async def test_wav_and_ogg_sinks_for_one_user_and_padding_to_an_end(tmp_path: Path) -> None:
    frames = encode_pcm(tone(440.0, 0.4))
    receiver = Receiver(None)
    receiver.on_speaking(USER_A, SSRC_A, 1)
    receiver.on_speaking(USER_B, SSRC_B, 1)
    wav = receiver.add_sink(WavSink(tmp_path / "a.wav", USER_A))
    ogg = receiver.add_sink(OggOpusSink(tmp_path / "a.opus", USER_A))
    mixed = receiver.add_sink(MixedWavSink(tmp_path / "mix.wav"))
    per_user = receiver.add_sink(PerUserOggSink(tmp_path / "ogg"))
    per_user_wav = receiver.add_sink(PerUserWavSink(tmp_path / "wav"))
    await asyncio.gather(feed_paced(receiver, frames, ssrc=SSRC_A), feed_paced(receiver, frames, ssrc=SSRC_B))
    await asyncio.sleep(0.12)
    first_play = time.monotonic() - 0.4 - 0.12 + 0.06
    await receiver.close(close_sinks=False)
    for sink in (wav, ogg, mixed, per_user, per_user_wav):
        sink.close(end_time=first_play + 1.0)  # type: ignore[call-arg]
    _, wav_len = read_wav(tmp_path / "a.wav")
    assert abs(wav_len / 48_000 - 1.0) < 0.03
    assert isinstance(per_user, PerUserOggSink) and set(per_user.paths) == {USER_A, USER_B}
    with av.open(str(tmp_path / "a.opus")) as container:
        decoded = b"".join(f.to_ndarray().tobytes() for f in container.decode(audio=0))
    assert isinstance(ogg, OggOpusSink)
    assert abs(ogg.samples_written / 48_000 - 1.0) < 0.03
    # FFmpeg decodes to planar float32; the file has no pre-skip, so it decodes to the timeline's length.
    assert len(decoded) // 8 == ogg.samples_written


async def test_a_failing_sink_is_detached_and_others_continue(tmp_path: Path) -> None:
    frames = encode_pcm(tone(440.0, 0.2))
    receiver = Receiver(None)
    receiver.on_speaking(USER_A, SSRC_A, 1)

    class Broken:
        wants_pcm = False
        closes = 0

        def write(self, frame: VoiceFrame) -> None:
            raise OSError("disk full")

        def close(self) -> None:
            self.closes += 1
            raise OSError("still full")

    broken = receiver.add_sink(Broken())
    calls: list[int] = []

    def explode(frame: VoiceFrame) -> None:
        calls.append(frame.sequence)
        raise ValueError("user bug")

    callback = CallbackSink(explode)
    receiver.add_sink(callback)
    await feed_paced(receiver, frames, ssrc=SSRC_A)
    await receiver.close()
    # Detached and closed once, right away; the failed close is counted too, and stops nothing.
    assert broken not in receiver.sinks and isinstance(broken, Broken) and broken.closes == 1
    assert receiver.sink_errors == 2
    assert calls == list(range(len(frames))) and callback.errors == len(frames)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full to fail writes with ENOSPC")
async def test_a_failed_per_user_sink_is_closed_so_the_files_it_wrote_are_finished(tmp_path: Path) -> None:
    """B's file is a full disk: the whole per-user sink fails, and A's WAV must still get its final header."""
    frames = encode_pcm(tone(440.0, 0.4))
    (tmp_path / f"{USER_B}.wav").symlink_to("/dev/full")
    receiver = Receiver(None)
    receiver.on_speaking(USER_A, SSRC_A, 1)
    receiver.on_speaking(USER_B, SSRC_B, 1)
    per_user = receiver.add_sink(PerUserWavSink(tmp_path))
    await feed_paced(receiver, frames, ssrc=SSRC_A)
    await asyncio.sleep(0.12)  # A's frames are played out, decoded and written
    await feed_paced(receiver, frames, ssrc=SSRC_B)  # B's third frame overflows the write buffer: ENOSPC
    await asyncio.sleep(0.12)
    await receiver.close()
    assert receiver.sink_errors == 2  # B's write, then B's file failing to finish when the sink is closed
    assert isinstance(per_user, PerUserWavSink)
    written = per_user.sinks[USER_A].samples_written
    assert written >= len(frames) * 960
    pcm, length = read_wav(tmp_path / f"{USER_A}.wav")
    assert length == written  # the header was finished, not left as the first write wrote it
    assert float(np.sqrt(np.mean(to_mono(pcm) ** 2))) > 1e-2  # and it holds A's tone


def test_split_jobs_keeps_each_decoder_on_one_thread() -> None:
    decoders = [OpusDecoder() for _ in range(30)]
    jobs = [(i, DecodeJob(decoders[i // 3], 0, b"x", 960)) for i in range(90)]
    chunks = _split_jobs(jobs, 2)
    assert len(chunks) == 2 and sum(map(len, chunks)) == 90
    seen = [{id(job.decoder) for _, job in chunk} for chunk in chunks]
    assert not seen[0] & seen[1]
    assert _split_jobs(jobs[:10], 4) == [jobs[:10]]


@pytest.mark.parametrize("users", [60])
async def test_many_users_decode_in_parallel_batches(users: int) -> None:
    frames = encode_pcm(speech_like(0.4, voice=1))
    receiver = Receiver(None, decode_threads=2)
    for user in range(users):
        receiver.on_speaking(10_000 + user, 50_000 + user, 1)
    stream = receiver.listen(pcm=True, maxsize=users * len(frames))
    start = time.monotonic()
    for index, frame in enumerate(frames):
        delay = start + index * 0.02 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        for user in range(users):
            receiver.feed(rtp_header(index, index * 960, 50_000 + user), frame)
    await asyncio.sleep(0.1)
    await receiver.close()
    got = await collect(stream)
    assert len(got) == users * len(frames)
    assert all(f.pcm is not None and len(f.pcm) == 3840 for f in got)
    per_user = {}
    for frame in got:
        per_user.setdefault(frame.user_id, []).append(frame.sequence)
    assert all(seqs == list(range(len(frames))) for seqs in per_user.values())
    assert stream.dropped == 0
