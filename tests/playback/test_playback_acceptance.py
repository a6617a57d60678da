"""Issue 5's acceptance scenarios: a bot plays through ``session.play`` and a simulated participant listens.

The participant is the emulator's own voice client: it decrypts transport and DAVE itself and records every
frame with its RTP fields and arrival time, so these tests judge what a listener actually hears. They run
in real time (the clock paces at 20 ms), which is why each one plays only as long as it must.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cordvoice import AudioError, SessionState
from cordvoice.audio import AudioSource, DCASource, SourceLike, TrackEndEvent, TrackErrorEvent, TrackState
from cordvoice.audio.oggwriter import OggOpusWriter
from cordvoice.audio.pcm import FRAME_BYTES
from cordvoice.audio.samples import demo_pcm, tone, write_demo_ogg
from cordvoice.audio.workers import get_workers

from .playback_helpers import (
    best_lag,
    dca_bytes,
    encode_frames,
    opus_packets,
    to_mono,
    tone_level,
    write_audio,
    write_mp3,
)
from .playback_world import audio_frames, hear, playback_world, timeline_pcm

pytestmark = pytest.mark.slow


async def test_playback_fidelity_30s_speech_and_music_at_128k(tmp_path: Path) -> None:
    """30 s of synthesized music plus speech, from a WAV file, encoded at 128 kbit/s, as a listener hears it.

    Metric: the Pearson correlation coefficient between the source and the decoded recording, over both
    channels, after aligning them by cross-correlation (the Opus codec delay is 312 samples). It is
    insensitive to overall gain, and it collapses if a single frame is lost, repeated, reordered or
    mistimed along the 1,500, because the waveforms then stop lining up; a perceptual score would forgive
    exactly those faults. We also require every frame to arrive and report the signal-to-error ratio.
    """
    pcm = demo_pcm(30.0)
    wav = tmp_path / "speech_and_music.wav"
    wav.write_bytes(write_audio(pcm, "wav", "pcm_s16le"))
    async with playback_world() as world:
        session, listener = await world.joined()
        session.player.bitrate = 128_000
        track = session.play(wav)
        async with asyncio.timeout(45):
            assert await track.wait() is TrackState.FINISHED
            await listener.wait_until(
                lambda: len(audio_frames(listener.frames_from(world.bot.user_id))) >= 1500
            )
        await asyncio.sleep(0.2)
        frames = listener.frames_from(world.bot.user_id)
        assert len(audio_frames(frames)) == 1500
        assert session.player.stats.late_frames == 0
        assert session.stats.frames_dropped == 0

    recorded = np.frombuffer(timeline_pcm(frames), dtype="<i2").astype(np.float64).reshape(-1, 2)
    source = np.frombuffer(pcm, dtype="<i2").astype(np.float64).reshape(-1, 2)
    lag = best_lag(source.mean(axis=1), recorded.mean(axis=1), 4800)
    length = min(len(source), len(recorded) - lag)
    assert length >= len(source) - 960
    a = source[:length].ravel()
    b = recorded[lag : lag + length].ravel()
    correlation = float(np.corrcoef(a, b)[0, 1])
    snr = 10 * np.log10(float(np.sum(a**2)) / float(np.sum((a - b) ** 2)))
    print(f"fidelity: lag {lag} samples, correlation {correlation:.4f}, SNR {snr:.1f} dB")
    assert correlation >= 0.95
    assert lag < 960  # the codec delay only: nothing was skipped at the start


async def test_playback_passthrough_is_byte_identical(tmp_path: Path) -> None:
    ogg = tmp_path / "demo.ogg"
    write_demo_ogg(ogg, 3.0)
    webm = tmp_path / "tone.webm"
    webm.write_bytes(write_audio(tone(660, 1.5, amplitude=0.3), "webm", "libopus", bit_rate=64_000))
    dca = dca_bytes(tone(880, 1.0, amplitude=0.3))
    expected = opus_packets(ogg) + opus_packets(webm) + list(DCASource(dca))
    async with playback_world() as world:
        session, listener = await world.joined()
        player = session.player
        tracks = [player.enqueue(ogg), player.enqueue(webm), player.enqueue(DCASource(dca))]
        async with asyncio.timeout(20):
            for track in tracks:
                assert await track.wait() is TrackState.FINISHED
            await listener.wait_until(lambda: len(listener.payloads_from(world.bot.user_id)) >= len(expected))
        await asyncio.sleep(0.2)
        received = listener.payloads_from(world.bot.user_id)
        frames = listener.frames_from(world.bot.user_id)
        assert player.stats.encoded_frames == 0
        assert player.stats.passthrough_frames == len(expected)

    assert received == expected
    assert all(f.dave for f in audio_frames(frames)), "passthrough still travels DAVE-encrypted"
    # Gapless: the three files follow each other without a single silence frame between them.
    audio_sequences = [f.sequence for f in audio_frames(frames)]
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(audio_sequences))


async def test_playback_two_tones_are_mixed_and_a_broken_file_changes_nothing(tmp_path: Path) -> None:
    broken_file = tmp_path / "broken.ogg"
    broken_file.write_bytes(b"OggS" + os.urandom(2000))
    async with playback_world() as world:
        session, listener = await world.joined()
        errors: list[TrackErrorEvent] = []
        session.player.on(TrackErrorEvent, errors.append)
        session.player.bitrate = 128_000
        low = session.play(tone(440, 3.0, amplitude=0.3))
        high = session.play(tone(1250, 3.0, amplitude=0.2))
        broken = session.play(broken_file)
        async with asyncio.timeout(10):
            with pytest.raises(AudioError):
                await broken.wait()
            await asyncio.gather(low.wait(), high.wait())
        await asyncio.sleep(0.2)
        frames = listener.frames_from(world.bot.user_id)
        assert [e.track for e in errors] == [broken]
        assert session.state is SessionState.READY

    mono = to_mono(timeline_pcm(frames))
    middle = mono[48_000:96_000]  # one second from the middle of the three
    assert tone_level(middle, 440) == pytest.approx(0.3, rel=0.1)
    assert tone_level(middle, 1250) == pytest.approx(0.2, rel=0.1)
    spectrum = np.abs(np.fft.rfft(middle * np.hanning(len(middle)))) ** 2
    freqs = np.fft.rfftfreq(len(middle), 1 / 48_000)
    near = (np.abs(freqs - 440) < 20) | (np.abs(freqs - 1250) < 20)
    assert spectrum[~near].sum() < 0.01 * spectrum.sum(), "nothing but the two tones (no clipping, no glitch)"


def staircase(seconds: int) -> bytes:
    """One second per step at 400, 500, 600... Hz: the frequency heard tells the position in the source."""
    return b"".join(tone(400 + 100 * k, 1.0, amplitude=0.4) for k in range(seconds))


async def test_playback_controls_are_heard(tmp_path: Path) -> None:
    wav = tmp_path / "staircase.wav"
    wav.write_bytes(write_audio(staircase(10), "wav", "pcm_s16le"))
    loop = asyncio.get_running_loop()
    async with playback_world() as world:
        session, listener = await world.joined()
        bot = world.bot.user_id
        track = session.play(wav)
        async with asyncio.timeout(20):
            await listener.wait_until(lambda: len(audio_frames(listener.frames_from(bot))) >= 35)
            paused_at = loop.time()
            track.pause()
            await asyncio.sleep(0.7)
            resumed_at = loop.time()
            track.resume()
            await asyncio.sleep(0.5)
            volume_at = loop.time()
            track.volume = 0.5
            await asyncio.sleep(0.5)
            seek_at = loop.time()
            await track.seek(7.0)
            await asyncio.sleep(0.5)
            stop_at = loop.time()
            track.stop()
            await asyncio.sleep(0.4)
        heard = hear(listener.frames_from(bot))

    def window(start: float, end: float) -> list:
        return [h for h in heard if start <= h.arrival < end]

    settle = 0.15  # the mixed lookahead (80 ms) plus a tick and the trip through the emulator
    last_before_pause = max(h.arrival for h in heard if h.audio and h.arrival < resumed_at)
    print(f"controls: pause heard after {(last_before_pause - paused_at) * 1000:.0f} ms")
    # Pause: within the settle time the audio stops, and nothing but the silence tail follows.
    during_pause = window(paused_at + settle, resumed_at)
    assert during_pause and not any(h.audio for h in during_pause)
    before_pause = [h for h in window(paused_at - 0.3, paused_at) if h.audio]
    # Resume: audio is back quickly and continues where it stopped (same step of the staircase).
    after_resume = [h for h in window(resumed_at, resumed_at + 0.3) if h.audio]
    assert after_resume and after_resume[0].arrival - resumed_at < settle
    assert after_resume[0].frequency == before_pause[-1].frequency == 400.0
    # Nothing was skipped or repeated: 35+ frames before, then the staircase goes on at frame 50 (1 s).
    played = [h for h in heard if h.audio and h.arrival < volume_at]
    first_500 = next(i for i, h in enumerate(played) if h.frequency == 500.0)
    assert abs(first_500 - 50) <= 1
    # Volume: half the amplitude.
    loud = statistics.median(h.rms for h in window(volume_at - 0.3, volume_at) if h.audio)
    quiet = statistics.median(h.rms for h in window(volume_at + settle, seek_at) if h.audio)
    assert quiet / loud == pytest.approx(0.5, rel=0.1)
    # Seek to 7 s: the 1100 Hz step.
    after_seek = [h for h in window(seek_at + settle, stop_at) if h.audio]
    assert len(after_seek) >= 10 and all(h.frequency == 1100.0 for h in after_seek)
    # Stop: the last playing track stopping drops the lookahead, so silence follows at once.
    assert not any(h.audio for h in window(stop_at + 0.06, stop_at + 1))


class SlowStart(AudioSource):
    """A source whose first frames trickle in (a slow network open), then come as fast as asked."""

    kind = "pcm"

    def __init__(self, pcm: bytes, *, slow_frames: int, delay: float) -> None:
        self.pcm = pcm
        self.position = 0
        self.count = 0
        self.slow_frames = slow_frames
        self.delay = delay
        self.name = "slow start"

    def read(self) -> bytes | None:
        if self.count < self.slow_frames:
            time.sleep(self.delay)
        self.count += 1
        chunk = self.pcm[self.position : self.position + FRAME_BYTES]
        self.position += len(chunk)
        return chunk or None


async def test_playback_slow_start_never_runs_fast() -> None:
    """discord.py #9120: after a slow start the player must not catch up by sending faster than 20 ms."""
    async with playback_world() as world:
        session, listener = await world.joined()
        bot = world.bot.user_id
        source = SlowStart(tone(500, 3.0, amplitude=0.3), slow_frames=5, delay=0.1)
        track = session.play(source)
        async with asyncio.timeout(15):
            assert await track.wait() is TrackState.FINISHED
            await listener.wait_until(lambda: len(audio_frames(listener.frames_from(bot))) >= 150)
        await asyncio.sleep(0.3)
        frames = listener.frames_from(bot)

    audio = audio_frames(frames)
    assert len(audio) == 150
    first = audio[0]
    after = [f for f in frames if (f.sequence - first.sequence) & 0xFFFF < 0x8000]
    offsets = [
        f.arrival - first.arrival - 0.020 * (((f.timestamp - first.timestamp) & 0xFFFF_FFFF) // 960)
        for f in after
    ]
    phase = statistics.median(offsets)
    deviations = [abs(o - phase) * 1000 for o in offsets]
    outside = [round(d, 2) for d in deviations if d >= 5.0]
    print(f"first seconds: {len(after)} frames, max deviation from the 20 ms grid {max(deviations):.2f} ms")
    # Every frame within 5 ms of the grid. A shared two-core VM delays the odd loop wake-up by a few ms
    # (measured up to ~6 ms with nothing of ours running), so at most two isolated frames may exceed
    # 5 ms, never 10 ms. Running fast looks nothing like that: after a slow start a catch-up burst puts
    # a whole run of consecutive frames tens of milliseconds off the grid.
    assert len(outside) <= 2 and max(deviations) < 10.0, outside
    # And no hole either: 150 audio frames took 149 ticks, the source having been buffered before the start.
    assert audio[-1].arrival - first.arrival == pytest.approx(149 * 0.020, abs=0.010)


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_playback_1000_short_tracks_leave_nothing_behind(tmp_path: Path) -> None:
    """Bounds: open fds +4, threads only up to the two pools' maxima, RSS +24 MiB after 1,000 tracks."""
    ogg = tmp_path / "short.ogg"
    with OggOpusWriter(ogg) as writer:
        writer.write(encode_frames(tone(600, 0.02))[0])  # one packet: one tick
    mp3 = write_mp3(tmp_path / "short.mp3", tone(700, 0.02))
    pcm = tone(500, 0.02, amplitude=0.2)
    dca = dca_bytes(tone(900, 0.02))
    one_of_each: list[Callable[[], SourceLike]] = [lambda: pcm, lambda: DCASource(dca), lambda: ogg]
    kinds = [*one_of_each * 3, lambda: mp3]  # files, bytes, passthrough, decoding: everything is opened

    async with playback_world() as world:
        session, listener = await world.joined()
        player = session.player
        ended: list[TrackState] = []
        player.on(TrackEndEvent, lambda e: ended.append(e.state))

        async def play(count: int) -> None:
            done = len(ended) + count
            for i in range(count):
                while len(player.queue) >= 3:
                    await asyncio.sleep(0.01)
                player.enqueue(kinds[i % len(kinds)]())
            while len(ended) < done:
                await asyncio.sleep(0.01)

        async with asyncio.timeout(90):
            await play(60)  # warm-up: pools, codecs and caches reach their steady size
            listener.clear_frames()
            fds, threads, rss = open_fds(), threading.active_count(), rss_bytes()
            workers = get_workers()
            spare_threads = (workers.source.max_threads - workers.source.threads) + (
                workers.codec.max_threads - workers.codec.threads
            )
            await play(1000)
            await asyncio.sleep(0.3)
        grown = (open_fds() - fds, threading.active_count() - threads, (rss_bytes() - rss) / 2**20)
        print(f"after 1000 tracks: fds {grown[0]:+d}, threads {grown[1]:+d}, RSS {grown[2]:+.1f} MiB")
        assert ended.count(TrackState.FINISHED) == 1060
        assert player.stats.tracks_failed == 0 and player.stats.close_errors == 0
        assert len(audio_frames(listener.frames_from(world.bot.user_id))) >= 1000
        assert grown[0] <= 4
        assert grown[1] <= spare_threads
        assert grown[2] < 24


async def test_playback_20_sessions_encoding_mp3_keep_the_loop_responsive(
    tmp_path: Path, emulator_process: Callable[[int], Awaitable[dict[str, Any]]]
) -> None:
    """20 DAVE sessions play an MP3 while the bots' loop is measured (in a process of its own)."""
    mp3 = write_mp3(tmp_path / "music.mp3", demo_pcm(12.0))
    info = await emulator_process(20)
    bot = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).with_name("loop_lag_bot.py")), str(mp3),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(120):
        out, _ = await bot.communicate(json.dumps(info).encode() + b"\n")
    assert bot.returncode == 0, "the bot process failed (its error is above)"
    report = json.loads(out)
    lags, sent, elapsed, cpu, heard = (report[k] for k in ("lags_ms", "sent", "elapsed", "cpu", "heard"))

    p99 = float(np.percentile(lags, 99))
    print(
        f"20 MP3 sessions: loop lag p50 {np.percentile(lags, 50):.2f} ms, p99 {p99:.2f} ms,"
        f" max {max(lags):.2f} ms;"
        f" CPU {cpu / elapsed * 100:.1f}% of a core = {cpu / sent * 1e6:.0f} us per frame sent"
        f" ({cpu / elapsed / 20 * 100:.2f}% per stream, 20 listening sessions included);"
        f" load {os.getloadavg()[0]:.2f}"
    )
    assert sent >= 20 * 50 * elapsed * 0.98, "every session kept sending in real time"
    assert heard >= 0.95 * sent, "the listening bot heard them"
    assert p99 < 5.0
