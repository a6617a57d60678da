"""The player driven directly through ``pull()``, the way a transmit lane drives it (no session needed)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from cordvoice.audio.dca import encode_dca
from cordvoice.audio.opus import OpusEncoder, packet_samples
from cordvoice.audio.pcm import FRAME_BYTES, SAMPLE_RATE, iter_frames
from cordvoice.audio.player import Player
from cordvoice.audio.samples import tone, write_demo_ogg
from cordvoice.audio.sources import AsyncAudioSource, AudioSource, DCASource
from cordvoice.audio.track import (
    START_FRAMES,
    TrackEndEvent,
    TrackErrorEvent,
    TrackEvent,
    TrackStartEvent,
    TrackState,
)
from cordvoice.errors import AudioError, InvalidArgumentError

from .playback_helpers import (
    decode_packets,
    encode_frames,
    frame_levels,
    opus_packets,
    pull_n,
    pull_until_done,
    to_mono,
    tone_level,
    write_audio,
    write_mp3,
)


@pytest.fixture
def ogg(tmp_path: Path) -> Path:
    path = tmp_path / "demo.ogg"
    write_demo_ogg(path, 1.0)
    return path


def audible(packets: list[bytes | None]) -> list[bytes]:
    return [p for p in packets if p is not None]


class CountingSource(AudioSource):
    """PCM from bytes that records open/close calls and can fail or stall on demand."""

    kind = "pcm"

    def __init__(self, pcm: bytes, *, fail_after: int | None = None, delay_first: float = 0.0) -> None:
        self.pcm = pcm
        self.position = 0
        self.reads = 0
        self.opened = 0
        self.closed = 0
        self.fail_after = fail_after
        self.delay_first = delay_first
        self.name = "counting"
        self.threads: set[str] = set()

    def open(self) -> None:
        self.opened += 1

    def read(self) -> bytes | None:
        self.threads.add(threading.current_thread().name)
        if self.fail_after is not None and self.reads >= self.fail_after:
            raise OSError("disk on fire")
        if self.reads == 0 and self.delay_first:
            time.sleep(self.delay_first)
        self.reads += 1
        chunk = self.pcm[self.position : self.position + FRAME_BYTES]
        self.position += len(chunk)
        return chunk or None

    def close(self) -> None:
        self.closed += 1


async def test_single_opus_track_is_passed_through_byte_for_byte(ogg: Path) -> None:
    player = Player()
    events: list[TrackEvent] = []
    player.on(TrackEvent, events.append)
    track = player.play(ogg)
    out = await pull_until_done(player)
    assert await track.wait() is TrackState.FINISHED
    assert audible(out) == opus_packets(ogg)
    assert player.stats.passthrough_frames == len(opus_packets(ogg))
    assert player.stats.encoded_frames == 0
    assert [type(e) for e in events] == [TrackStartEvent, TrackEndEvent]
    assert track.frames_passthrough == len(opus_packets(ogg))
    player.close()


async def test_pcm_is_encoded_off_the_loop_and_sounds_like_the_source(tmp_path: Path) -> None:
    pcm = tone(1000, 1.0, amplitude=0.5)
    player = Player(bitrate=128_000)
    source = CountingSource(pcm)
    track = player.play(source)
    out = await pull_until_done(player)
    await track.wait()
    packets = audible(out)
    assert all(packet_samples(p) == 960 for p in packets)
    assert len(packets) == 50
    decoded = to_mono(decode_packets(packets))
    assert tone_level(decoded, 1000) == pytest.approx(0.5, rel=0.05)
    assert source.opened == 1
    assert source.closed == 1
    assert all(name.startswith("cordvoice-source") for name in source.threads)
    assert player.stats.encoded_frames == 50
    player.close()


async def test_a_lone_pcm_track_at_unity_is_encoded_unmixed_and_bit_exact() -> None:
    """The usual case skips the mixer: the packets equal a fresh encoder's on the same frames, in order."""
    pcm = tone(700, 1.0, amplitude=0.9)  # loud: any mixing (soft clip) on the way would change the packets
    player = Player(bitrate=96_000)
    track = player.play(pcm)
    packets = audible(await pull_until_done(player))
    await track.wait()
    with OpusEncoder(bitrate=96_000, complexity=10, vbr="constrained") as encoder:
        expected = [encoder.encode(frame) for frame in iter_frames(pcm)]
    assert packets == expected
    assert player.stats.late_frames == 0
    player.close()


async def test_two_tracks_are_mixed_and_a_lone_opus_track_returns_to_passthrough(ogg: Path) -> None:
    player = Player(bitrate=128_000)
    low = player.play(tone(440, 0.6, amplitude=0.3))
    high = player.play(tone(2000, 0.6, amplitude=0.2))
    out = await pull_until_done(player)
    await asyncio.gather(low.wait(), high.wait())
    mono = to_mono(decode_packets(audible(out)))
    assert tone_level(mono, 440) == pytest.approx(0.3, rel=0.1)
    assert tone_level(mono, 2000) == pytest.approx(0.2, rel=0.1)
    assert player.stats.passthrough_frames == 0

    opus = player.play(ogg)
    beep = player.play(tone(600, 0.2))
    out = await pull_until_done(player)
    await asyncio.gather(opus.wait(), beep.wait())
    packets = opus_packets(ogg)
    # Mixed while the beep plays, then the Ogg's own packets again, byte for byte, to the end.
    tail = audible(out)[-20:]
    assert tail == packets[-20:]
    assert player.stats.passthrough_frames >= len(packets) - 20
    player.close()


async def test_volume_pause_resume_and_stop(ogg: Path) -> None:
    player = Player()
    track = player.play(tone(800, 5.0, amplitude=0.4))
    first = await pull_n(player, 40)
    track.volume = 0.25
    second = await pull_n(player, 40)
    track.pause()
    assert track.state is TrackState.PAUSED
    paused = await pull_n(player, 20)
    track.resume()
    resumed = await pull_n(player, 20)
    before_stop = track.position
    track.stop()
    after_stop = await pull_n(player, 5)
    assert track.state is TrackState.STOPPED
    assert await track.wait() is TrackState.STOPPED

    full = frame_levels(decode_packets(audible(first)[-20:]))
    quiet = frame_levels(decode_packets(audible(second)[-20:]))
    assert np.median(quiet) / np.median(full) == pytest.approx(0.25, rel=0.1)
    assert sum(p is not None for p in paused) <= 4  # the lookahead plays out, then nothing
    assert paused[-10:] == [None] * 10
    assert sum(p is not None for p in resumed) >= 15
    assert after_stop == [None] * 5
    assert 2.0 < before_stop < 3.0
    with pytest.raises(InvalidArgumentError):
        track.volume = 3.0
    player.close()


async def test_seek_moves_the_position_and_the_audio(tmp_path: Path) -> None:
    # One second at 300 Hz, then one at 1200 Hz: after seeking to 1.2 s only 1200 Hz is left.
    pcm = tone(300, 1.0, amplitude=0.4) + tone(1200, 1.0, amplitude=0.4)
    mp3 = write_mp3(tmp_path / "two.mp3", pcm)
    player = Player(bitrate=128_000)
    track = player.play(mp3)
    await pull_n(player, 10)
    assert track.seekable
    await track.seek(1.2)
    assert track.position == pytest.approx(1.2)
    out = await pull_until_done(player)
    assert await track.wait() is TrackState.FINISHED
    mono = to_mono(decode_packets(audible(out)))[4800:]
    assert tone_level(mono, 1200) > 0.3
    assert tone_level(mono, 300) < 0.02
    assert 36 <= len(audible(out)) <= 45

    unseekable = player.play(_trickle([bytes(FRAME_BYTES)] * 50))
    with pytest.raises(AudioError):
        await unseekable.seek(1.0)
    unseekable.stop()
    player.close()


async def test_a_seek_past_the_end_ends_the_track(tmp_path: Path) -> None:
    mp3 = write_mp3(tmp_path / "a.mp3", tone(440, 2.0))
    player = Player()
    track = player.play(mp3)
    await pull_n(player, 10)
    await track.seek(1e12)  # too far for an int64 in MP3 time units: must not fail the track
    out = await pull_until_done(player)
    assert len(audible(out)) < 10  # at most what the player had already taken
    assert await track.wait() is TrackState.FINISHED
    player.close()


class NearSeeks(CountingSource):
    """Seeks up to one second in, and fails further, like a stream that only keeps a short window."""

    @property
    def seekable(self) -> bool:
        return True

    def seek(self, seconds: float) -> None:
        if seconds > 1.0:
            raise AudioError("too far")
        self.position = round(seconds * SAMPLE_RATE) * 4


async def test_a_failed_seek_leaves_the_track_playing_at_its_position() -> None:
    source = NearSeeks(tone(440, 2.0))
    player = Player()
    track = player.play(source)
    await pull_n(player, 20)
    position = track.position
    with pytest.raises(AudioError, match="too far"):
        await track.seek(1.5)
    assert track.position >= position
    out = await pull_until_done(player)
    assert audible(out)
    assert await track.wait() is TrackState.FINISHED
    # The frames the failed seek dropped from the buffer still count: the position follows the source.
    assert track.position == pytest.approx(2.0)
    player.close()


async def _agen(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def _trickle(chunks: list[bytes]) -> AsyncIterator[bytes]:
    return _agen(chunks)


async def test_loop_repeats_a_seekable_source() -> None:
    pcm = tone(700, 0.2)
    player = Player()
    track = player.play(pcm, loop=True)
    out = await pull_n(player, 60)
    assert track.loops >= 3
    assert track.state is TrackState.PLAYING
    track.loop = False
    rest = await pull_until_done(player)
    assert await track.wait() is TrackState.FINISHED
    produced = audible(out) + audible(rest)
    assert len(produced) % 10 == 0  # whole 200 ms repetitions
    assert len(produced) >= 50
    player.close()


async def test_loop_turned_on_near_the_end_still_loops() -> None:
    # The read-ahead reaches a source's end up to 500 ms before it is heard: a loop asked for then must loop.
    player = Player()
    track = player.play(tone(700, 1.0))
    await pull_n(player, 40)
    assert track._eof  # the source has been read to its end; 10 frames are left to play
    track.loop = True
    await pull_n(player, 60)
    assert track.loops >= 1
    assert track.state is TrackState.PLAYING
    player.close()


async def test_loop_turned_off_ends_the_track_at_the_end_of_this_pass(ogg: Path) -> None:
    # The read-ahead (1 s of Opus) already holds the start of the next pass when the loop is turned off in the
    # last second: that start must not be heard, and turning the loop on again continues from the start.
    packets = opus_packets(ogg)
    player = Player()
    track = player.play(ogg, loop=True)
    out = await pull_n(player, 2 * len(packets) - 20)
    assert track.loops == 2  # the third pass is buffered
    track.loop = False
    out += await pull_until_done(player)
    assert audible(out) == packets * 2
    assert track.loops == 1
    assert await track.wait() is TrackState.FINISHED

    again = player.play(ogg, loop=True)
    out = await pull_n(player, len(packets) - 20)
    again.loop = False
    again.loop = True
    out += await pull_n(player, len(packets))
    again.stop()
    assert audible(out) == (packets * 2)[: len(audible(out))]
    player.close()


async def test_a_decoded_file_loops_without_a_gap(tmp_path: Path) -> None:
    # 210 ms (10.5 frames) of a sine that ends in phase: looped seamlessly, every frame is equally loud. A
    # decoder that pads its last frame would put 10 ms of silence into every repetition.
    path = tmp_path / "loop.wav"
    path.write_bytes(write_audio(tone(700, 0.21), "wav", "pcm_s16le"))
    player = Player()
    track = player.play(path, loop=True)
    out = await pull_n(player, 60)
    assert track.loops >= 3
    levels = frame_levels(decode_packets(audible(out)))[3:]  # past the Opus decoder's warm-up
    assert levels.min() > 0.9 * float(np.median(levels))
    player.close()


async def test_queue_advances_gaplessly(ogg: Path, tmp_path: Path) -> None:
    player = Player()
    starts: list[str] = []
    player.on(TrackStartEvent, lambda e: starts.append(e.track.name))
    a = player.enqueue(tone(400, 0.4), name="a")
    b = player.enqueue(tone(500, 0.4), name="b")
    c = player.enqueue(ogg, name="c")
    d = player.enqueue(ogg, name="d")
    assert player.current is a
    assert player.queue == (b, c, d)
    assert b.state is TrackState.QUEUED
    out = await pull_until_done(player)
    for track in (a, b, c, d):
        assert await track.wait() is TrackState.FINISHED
    assert starts == ["a", "b", "c", "d"]
    first = next(i for i, p in enumerate(out) if p is not None)
    last = max(i for i, p in enumerate(out) if p is not None)
    gaps = [i for i in range(first, last) if out[i] is None]
    assert len(gaps) <= 1  # PCM -> Opus passthrough may cost one tick; PCM -> PCM and Opus -> Opus none
    assert audible(out)[-len(opus_packets(ogg)) :] == opus_packets(ogg)
    player.close()


async def test_a_seek_on_a_waiting_queue_track_returns_and_the_track_starts_there() -> None:
    player = Player()
    player.enqueue(tone(400, 0.2), name="first")
    player.enqueue(tone(500, 0.2), name="second")
    third = player.enqueue(tone(600, 1.0), name="third")
    async with asyncio.timeout(2):  # it waited for the tracks before it to play
        await third.seek(0.6)
    assert third.position == pytest.approx(0.6)
    out = await pull_until_done(player)
    assert len(audible(out)) == 10 + 10 + 20
    assert await third.wait() is TrackState.FINISHED
    player.close()


@pytest.mark.parametrize("rendered", ["pcm", "opus at half volume"])
async def test_queue_change_from_passthrough_to_a_rendered_track_is_gapless(
    rendered: str, tmp_path: Path
) -> None:
    # The next track's first render must start before the passthrough packets run out, not after.
    ogg = tmp_path / "short.ogg"
    write_demo_ogg(ogg, 0.4)
    packets = opus_packets(ogg)
    player = Player()
    first = player.enqueue(ogg)
    if rendered == "pcm":
        second, second_frames = player.enqueue(tone(500, 0.4)), 20
    else:
        second, second_frames = player.enqueue(ogg, volume=0.5), len(packets)
    out = await pull_until_done(player, interval=0.02)  # paced like the transmit lane
    assert await first.wait() is TrackState.FINISHED
    assert await second.wait() is TrackState.FINISHED
    start = next(i for i, p in enumerate(out) if p is not None)
    end = max(i for i, p in enumerate(out) if p is not None)
    assert [i - start for i in range(start, end) if out[i] is None] == []
    assert player.stats.late_frames == 0
    assert audible(out)[: len(packets)] == packets  # the first track is still passed through as is
    assert player.stats.passthrough_frames == len(packets)
    assert player.stats.encoded_frames == len(audible(out)) - len(packets) == second_frames
    player.close()


async def test_skip_and_clear_queue() -> None:
    player = Player()
    a = player.enqueue(tone(400, 5.0))
    b = player.enqueue(tone(500, 5.0))
    c = player.enqueue(tone(600, 5.0))
    await pull_n(player, 10)
    assert player.skip() is a
    assert a.state is TrackState.STOPPED
    assert player.current is b
    player.clear_queue()
    assert c.state is TrackState.STOPPED
    assert player.queue == ()
    player.stop()
    assert b.state is TrackState.STOPPED
    assert await pull_n(player, 3) == [None] * 3
    player.close()


async def test_clear_queue_opens_none_of_the_waiting_sources() -> None:
    # Removing the next track prefetches the one after it: clearing 20 URLs opened (and closed) all 20.
    player = Player()
    sources = [CountingSource(tone(400, 0.5)) for _ in range(20)]
    for source in sources:
        player.enqueue(source)
    await pull_n(player, 5)
    player.clear_queue()
    await asyncio.sleep(0.3)
    assert sum(source.opened for source in sources[2:]) == 0  # the current track and the prefetched next one
    assert all(source.closed == 1 for source in sources[1:])
    player.close()


async def test_a_failing_source_ends_its_track_and_the_rest_plays_on() -> None:
    player = Player()
    errors: list[TrackErrorEvent] = []
    player.on(TrackErrorEvent, errors.append)
    broken = CountingSource(tone(300, 2.0), fail_after=30)
    good = player.play(tone(900, 1.0))
    bad = player.play(broken)
    out = await pull_until_done(player)
    with pytest.raises(AudioError) as caught:
        await bad.wait()
    assert isinstance(caught.value.__cause__, OSError)
    assert bad.state is TrackState.FAILED
    assert bad.error is caught.value
    assert await good.wait() is TrackState.FINISHED
    assert len(audible(out)) >= 50
    assert [e.track for e in errors] == [bad]
    assert broken.closed == 1
    assert player.stats.source_errors == 1

    missing = player.play("/nonexistent/file.mp3")
    with pytest.raises(AudioError):
        async with asyncio.timeout(5):
            await missing.wait()
    player.close()


async def test_a_source_error_lets_the_frames_read_before_it_play(tmp_path: Path) -> None:
    # A DCA file cut off inside a frame header's promise: every intact packet plays, then the track fails.
    packets = encode_frames(tone(440, 2.9))  # 145: the error comes in the middle of a fill
    path = tmp_path / "cut.dca"
    path.write_bytes(encode_dca(packets) + b"\x40\x00" + bytes(10))
    player = Player()
    errors: list[TrackErrorEvent] = []
    player.on(TrackErrorEvent, errors.append)
    track = player.play(DCASource(path))
    out = await pull_until_done(player)
    assert audible(out) == packets
    with pytest.raises(AudioError, match="truncated"):
        await track.wait()
    assert [e.track for e in errors] == [track]

    # Fewer frames than START_FRAMES before the error: the track still starts and plays them.
    short = CountingSource(tone(300, 1.0), fail_after=START_FRAMES - 2)
    track = player.play(short)
    out = await pull_until_done(player)
    assert len(audible(out)) == START_FRAMES - 2
    assert track.state is TrackState.FAILED
    assert track.error is not None and isinstance(track.error.__cause__, OSError)
    assert short.closed == 1
    player.close()


class FlakyAsync(AsyncAudioSource):
    """Reads ``good`` PCM frames, then fails; closing takes a while, like a socket."""

    kind = "pcm"

    def __init__(self, good: int) -> None:
        self.good = good
        self.reads = 0
        self.closed = 0

    async def read(self) -> bytes | None:
        self.reads += 1
        if self.reads > self.good:
            raise ConnectionResetError("peer went away")
        return tone(500, 0.02)

    async def aclose(self) -> None:
        await asyncio.sleep(0.1)
        self.closed += 1


@pytest.mark.parametrize("good", [0, 3])
async def test_a_failing_async_source_is_still_closed(good: int) -> None:
    # With nothing buffered the feeder ends the track itself; with frames buffered the track ends while the
    # feeder awaits aclose(). Either way the close must not be cancelled.
    player = Player()
    source = FlakyAsync(good)
    track = player.play(source)
    out = await pull_until_done(player)
    assert len(audible(out)) == good
    with pytest.raises(AudioError) as caught:
        await track.wait()
    assert isinstance(caught.value.__cause__, ConnectionResetError)
    async with asyncio.timeout(5):
        while not source.closed:
            await asyncio.sleep(0.01)
    assert source.closed == 1
    player.close()


async def test_an_async_source_stopped_before_it_was_read_is_closed() -> None:
    player = Player()
    source = FlakyAsync(10)
    track = player.play(source)
    track.stop()
    async with asyncio.timeout(5):
        while not source.closed:
            await asyncio.sleep(0.01)
    assert source.reads == 0 and source.closed == 1
    player.close()


async def test_a_slow_start_never_makes_playback_run_fast() -> None:
    player = Player()
    source = CountingSource(tone(600, 1.0), delay_first=0.3)
    track = player.play(source)
    out = await pull_n(player, 20, interval=0.02)
    assert out[:10] == [None] * 10  # 200 ms of nothing while the source is stalled
    rest = await pull_until_done(player, interval=0.02)
    await track.wait()
    stream = out + rest
    first = next(i for i, p in enumerate(stream) if p is not None)
    played = stream[first : first + 50]
    assert None not in played  # once started, one frame per tick: no burst, no hole
    assert len(audible(stream)) == 50
    assert track.underruns == 0


async def test_async_sources_and_custom_opus_sources() -> None:
    player = Player()
    chunks = [tone(440, 0.5)[i : i + 1000] for i in range(0, 96_000, 1000)]  # odd sizes are re-chunked
    track = player.play(_trickle(chunks))
    out = await pull_until_done(player)
    await track.wait()
    assert len(audible(out)) == 25

    class WrongFrames(AudioSource):
        kind = "opus"

        def read(self) -> bytes | None:
            return b"\x00" + bytes(40)  # a 10 ms SILK packet: not allowed

    bad = player.play(WrongFrames())
    with pytest.raises(AudioError, match="20 ms"):
        async with asyncio.timeout(5):
            await bad.wait()

    class Ticker(AsyncAudioSource):
        kind = "pcm"

        def __init__(self) -> None:
            self.count = 0
            self.closed = False

        async def read(self) -> bytes | None:
            await asyncio.sleep(0.001)
            self.count += 1
            return None if self.count > 30 else tone(1000, 0.02)

        async def aclose(self) -> None:
            self.closed = True

    ticker = Ticker()
    track = player.play(ticker)
    out = await pull_until_done(player)
    await track.wait()
    assert len(audible(out)) == 30
    assert ticker.closed
    player.close()


async def test_closing_the_player_stops_tracks_and_closes_sources() -> None:
    player = Player()
    sources = [CountingSource(tone(300 + 100 * i, 3.0)) for i in range(3)]
    tracks = [player.play(s) for s in sources]
    await pull_n(player, 10)
    player.close()
    for track in tracks:
        assert await track.wait() is TrackState.STOPPED
    async with asyncio.timeout(5):
        while any(s.closed == 0 for s in sources):
            await asyncio.sleep(0.01)
    assert [s.closed for s in sources] == [1, 1, 1]
    assert player.pull() is None
    with pytest.raises(AudioError):
        player.play(b"")


async def test_player_on_refuses_a_handler_that_cannot_be_called() -> None:
    player = Player()
    try:
        with pytest.raises(InvalidArgumentError, match="handler"):
            player.on(TrackEndEvent, None)  # type: ignore[arg-type]
    finally:
        player.close()


async def test_player_encoder_settings_must_be_integers() -> None:
    """``player.bitrate = 64e3`` was taken, and every track then failed: "mixing failed: TypeError"."""
    for option in ("bitrate", "complexity", "expected_loss"):
        with pytest.raises(InvalidArgumentError, match=option):
            Player(**{option: 64e3 if option == "bitrate" else 5.0})  # type: ignore[arg-type]
    for lookahead in (4.0, "4", None, True, 1):  # 4.0 sent 4 frames, then an ERROR and silence every tick
        with pytest.raises(InvalidArgumentError, match="lookahead"):
            Player(lookahead=lookahead)  # type: ignore[arg-type]
    player = Player()
    try:
        with pytest.raises(InvalidArgumentError, match="bitrate"):
            player.bitrate = 64e3  # type: ignore[assignment]
        assert player.bitrate == 96_000
    finally:
        player.close()


async def test_start_threshold_constant_is_a_few_frames() -> None:
    assert 2 <= START_FRAMES <= 10
    assert SAMPLE_RATE == 48_000


async def test_start_offset_seeks_first_and_fails_on_unseekable_sources() -> None:
    pcm = tone(300, 1.0, amplitude=0.4) + tone(1200, 1.0, amplitude=0.4)
    player = Player(bitrate=128_000)
    track = player.play(pcm, start=1.0)
    out = await pull_until_done(player)
    assert await track.wait() is TrackState.FINISHED
    assert len(audible(out)) == 50
    mono = to_mono(decode_packets(audible(out)))[4800:]
    assert tone_level(mono, 1200) > 0.3

    with pytest.raises(InvalidArgumentError):
        player.play(_trickle([bytes(FRAME_BYTES)] * 10), start=1.0)
    live = player.play(_trickle([bytes(FRAME_BYTES)] * 10))
    assert live.state is TrackState.LOADING
    with pytest.raises(InvalidArgumentError):
        live.loop = True
    live.stop()
    player.close()


async def test_loud_mixes_are_soft_clipped_not_wrapped() -> None:
    player = Player(bitrate=128_000)
    a = player.play(tone(300, 1.0, amplitude=0.7))
    b = player.play(tone(500, 1.0, amplitude=0.7))
    out = await pull_until_done(player)
    await asyncio.gather(a.wait(), b.wait())
    pcm = np.frombuffer(decode_packets(audible(out)), dtype="<i2").astype(np.float64) / 32768.0
    assert np.abs(pcm).max() <= 1.0
    # Wrapping would flip loud peaks to the opposite sign and spray energy everywhere; soft clipping keeps
    # both tones dominant.
    mono = to_mono(decode_packets(audible(out)))[4800:-4800]
    assert tone_level(mono, 300) > 0.5
    assert tone_level(mono, 500) > 0.5
    player.close()
