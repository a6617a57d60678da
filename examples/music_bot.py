"""A music bot with a queue: add tracks, skip, pause, resume, change the volume, list what is queued.

On Discord, with the bot token in $DISCORD_TOKEN, type commands on the console while it plays::

    DISCORD_TOKEN=... python examples/music_bot.py --guild 123 --channel 456 song.mp3 https://host/radio.ogg
    > add other.flac
    > skip | pause | resume | volume 0.5 | queue | quit

On the local emulator (no token, no network): three synthesised tracks, a scripted session (pause, resume,
skip) and a simulated listener; it exits 0 when the listener heard the first and the last track::

    python examples/music_bot.py --emulator
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

import cordvoice
from cordvoice.audio import Track, TrackEndEvent, TrackStartEvent
from cordvoice.audio.opus import OpusDecoder
from cordvoice.audio.samples import melody, tone
from cordvoice.emulator import DiscordEmulator
from cordvoice.gateway import Client


class MusicBot:
    """The queue and its commands, on one voice session."""

    def __init__(self, session: cordvoice.Session) -> None:
        self.player = session.player
        self.player.on(TrackStartEvent, lambda event: print(f"now playing: {event.track.name}"))
        self.player.on(TrackEndEvent, lambda event: print(f"ended: {event.track.name} ({event.state.value})"))

    def add(self, source: str) -> Track:
        """Queue a file or URL; it starts when everything before it has played (without a gap)."""
        track = self.player.enqueue(source, name=Path(source).name or source)
        waiting = len(self.player.queue)
        print(f"queued: {track.name} ({f'{waiting} in the queue' if waiting else 'plays now'})")
        return track

    def handle(self, line: str) -> bool:
        """Run one console command; False when the bot should stop."""
        command, _, argument = line.strip().partition(" ")
        current = self.player.current
        if command == "add" and argument:
            self.add(argument)
        elif command == "skip":
            self.player.skip()
        elif command == "pause" and current is not None:
            current.pause()
        elif command == "resume" and current is not None:
            current.resume()
        elif command == "volume" and current is not None:
            current.volume = float(argument)
        elif command == "queue":
            playing = f"{current.name} at {current.position:.1f} s" if current else "nothing"
            print(f"playing {playing}; queued: {[track.name for track in self.player.queue]}")
        elif command == "quit":
            return False
        else:
            print("commands: add PATH_OR_URL | skip | pause | resume | volume 0.0-2.0 | queue | quit")
        return True

    async def wait_idle(self) -> None:
        """Until the queue has played out."""
        while self.player.current is not None or self.player.queue:
            current = self.player.current
            if current is not None:
                await current.wait()
            else:
                await asyncio.sleep(0.05)


async def on_discord(guild_id: int, channel_id: int, sources: list[str]) -> None:
    async with Client(os.environ["DISCORD_TOKEN"]) as client, cordvoice.Voice(client) as voice:
        session = await voice.join_channel(guild_id, channel_id)
        bot = MusicBot(session)
        for source in sources:
            bot.add(source)
        while bot.handle(await asyncio.to_thread(input, "> ")):
            pass


async def on_emulator() -> int:
    with tempfile.TemporaryDirectory() as folder:
        tracks = {"a440.wav": tone(440.0, 1.5), "tune.wav": melody(2.0), "e660.wav": tone(660.0, 1.5)}
        for name, pcm in tracks.items():
            write_wav(Path(folder) / name, pcm)
        async with DiscordEmulator() as emu:
            listener = await emu.listener()  # a simulated member who records what it hears
            client = Client(emu.bot.token, gateway_url=emu.gateway_url, api_base=emu.api_base)
            async with client, cordvoice.Voice(client, ssl=emu.voice_ssl) as voice:
                session = await voice.join_channel(emu.guild_id, emu.channel_id)
                bot = MusicBot(session)
                for name in tracks:
                    bot.add(str(Path(folder) / name))
                bot.handle("queue")
                await until_playing(bot, "tune.wav")
                for command, pause in (("pause", 0.4), ("resume", 0.4), ("queue", 0.0), ("skip", 0.0)):
                    await asyncio.sleep(pause)
                    print(f"> {command}")
                    bot.handle(command)
                await bot.wait_idle()
                await session.stop_speaking()
            await asyncio.sleep(0.2)  # the last frames reach the listener
            heard = listener.payloads_from(emu.bot.user_id)
    first, last = dominant_frequency(heard[5:45]), dominant_frequency(heard[-40:])
    print(f"the listener heard {len(heard)} frames: {first:.0f} Hz first, {last:.0f} Hz last")
    return 0 if abs(first - 440) < 30 and abs(last - 660) < 30 else 1


async def until_playing(bot: MusicBot, name: str) -> None:
    """Wait until the track called ``name`` starts."""
    started = asyncio.Event()

    def on_start(event: TrackStartEvent) -> None:
        if event.track.name == name:
            started.set()

    unsubscribe = bot.player.on(TrackStartEvent, on_start)
    try:
        await asyncio.wait_for(started.wait(), 10)
    finally:
        unsubscribe()


def write_wav(path: Path, pcm: bytes) -> None:
    with wave.open(str(path), "wb") as file:
        file.setnchannels(2)
        file.setsampwidth(2)
        file.setframerate(48_000)
        file.writeframes(pcm)


def dominant_frequency(frames: list[bytes]) -> float:
    """The strongest frequency (Hz) in a run of Opus frames, decoded."""
    with OpusDecoder() as decoder:
        pcm = b"".join(decoder.decode(frame) for frame in frames)
    mono = np.frombuffer(pcm, dtype="<i2").reshape(-1, 2).mean(axis=1)
    spectrum = np.abs(np.fft.rfft(mono * np.hanning(len(mono))))
    return float(spectrum.argmax() * 48_000 / len(mono))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--emulator", action="store_true", help="run a scripted session on the local emulator"
    )
    parser.add_argument("--guild", type=int)
    parser.add_argument("--channel", type=int)
    parser.add_argument("sources", nargs="*", help="files or URLs to queue at start")
    args = parser.parse_args()
    if args.emulator:
        return asyncio.run(on_emulator())
    if args.guild is None or args.channel is None or "DISCORD_TOKEN" not in os.environ:
        parser.error("set $DISCORD_TOKEN and give --guild and --channel (or use --emulator)")
    asyncio.run(on_discord(args.guild, args.channel, args.sources))
    return 0


if __name__ == "__main__":
    sys.exit(main())
