"""CPU per stream of the playback path (run by hand: ``python -m tests.playback.bench_playback [streams]``).

Two measurements, each over 8 s of steady state on the shared 20 ms clock:

1. **Player only**: N players pulled by clock subscriptions, as a transmit lane pulls them, for an Ogg Opus
   file (passthrough) and for an MP3 file (decode, resample, encode at 128 kbit/s). This is what playback
   itself costs, on the loop thread and the worker threads together.
2. **End to end**: N sessions of one bot joined to the in-process emulator, each with a listening
   participant, playing the same files. The process then also runs transport and DAVE encryption, the
   emulator's SFU and N participants decrypting everything, so the difference between the two files is what
   encoding costs on top of passthrough.
"""

from __future__ import annotations

import asyncio
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cordvoice.audio.clock import get_clock
from cordvoice.audio.player import Player
from cordvoice.audio.samples import demo_pcm, write_demo_ogg

from .playback_helpers import write_mp3
from .playback_world import playback_world

SECONDS = 8.0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(seconds: float, count_frames: Callable[[], int]) -> tuple[float, float, int, float]:
    """(CPU seconds, wall seconds, frames, loop lag p99 ms) over ``seconds``."""
    loop = asyncio.get_running_loop()
    lags = []
    cpu, frames, started = cpu_seconds(), count_frames(), loop.time()
    while loop.time() - started < seconds:
        before = time.perf_counter()
        await asyncio.sleep(0.005)
        lags.append((time.perf_counter() - before - 0.005) * 1000)
    return cpu_seconds() - cpu, loop.time() - started, count_frames() - frames, float(np.percentile(lags, 99))


async def players_only(path: Path, streams: int) -> str:
    clock = get_clock()
    players = [Player(bitrate=128_000) for _ in range(streams)]
    sent = [0]

    def lane(player: Player) -> None:
        if player.pull() is not None:
            sent[0] += 1

    subscriptions = [clock.subscribe(lambda _, p=p: lane(p)) for p in players]
    for player in players:
        player.play(path, loop=True)
    await asyncio.sleep(1.0)
    cpu, wall, frames, lag = await measure(SECONDS, lambda: sent[0])
    for sub in subscriptions:
        sub.cancel()
    for player in players:
        player.close()
    return report(f"player only, {path.suffix[1:]}", streams, cpu, wall, frames, lag)


async def end_to_end(path: Path, streams: int) -> str:
    async with playback_world(guilds=streams) as world:
        await asyncio.gather(*(world.listener(i) for i in range(streams)))
        sessions = await asyncio.gather(*(world.join(i) for i in range(streams)))
        while not all(s.dave_ready for s in sessions):
            await asyncio.sleep(0.05)
        for session in sessions:
            session.player.bitrate = 128_000
            session.play(path, loop=True)
        await asyncio.sleep(1.0)
        cpu, wall, frames, lag = await measure(SECONDS, lambda: sum(s.stats.frames_sent for s in sessions))
    return report(f"end to end, {path.suffix[1:]}", streams, cpu, wall, frames, lag)


def report(label: str, streams: int, cpu: float, wall: float, frames: int, lag: float) -> str:
    return (
        f"{label:24} {streams:3} streams: {cpu / frames * 1e6:6.1f} us CPU per frame,"
        f" {cpu / wall / streams * 100:5.2f}% of a core per stream, {frames / wall / streams:4.1f} frames/s"
        f" per stream, loop lag p99 {lag:.2f} ms"
    )


async def main(streams: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        ogg = Path(folder) / "music.ogg"
        write_demo_ogg(ogg, 10.0, bitrate=128_000)
        mp3 = write_mp3(Path(folder) / "music.mp3", demo_pcm(10.0))
        for line in [
            await players_only(ogg, streams),
            await players_only(mp3, streams),
            await end_to_end(ogg, streams),
            await end_to_end(mp3, streams),
        ]:
            print(line)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20))
