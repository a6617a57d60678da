"""A recorder bot: join a voice channel and record everyone in it, DAVE-decrypted, for a while.

It writes ``<user id>.wav`` and ``<user id>.opus`` per member and ``mixed.wav``, all on one timeline, so the
files line up sample for sample and keep the pauses where they were.

On Discord, with the bot token in $DISCORD_TOKEN::

    DISCORD_TOKEN=... python examples/recorder_bot.py --guild 123 --channel 456 --seconds 60 --out meeting

On the local emulator (no token, no network): two simulated members take turns talking while the bot
records; it exits 0 when both were recorded::

    python examples/recorder_bot.py --emulator
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

import cordvoice
from cordvoice.audio.opus import OpusEncoder
from cordvoice.audio.pcm import iter_frames
from cordvoice.audio.samples import speech_like
from cordvoice.audio.sinks import record_to_directory
from cordvoice.emulator import DiscordEmulator, Participant
from cordvoice.gateway import Client


async def record(session: cordvoice.Session, folder: Path, seconds: float) -> None:
    """Record everyone in the session's channel into ``folder`` for ``seconds``."""
    receiver = session.receiver
    start = time.monotonic()
    for sink in record_to_directory(folder, start_time=start):
        receiver.add_sink(sink)
    await asyncio.sleep(seconds)
    await receiver.close()  # plays out what is buffered and finishes the files
    for user_id, stats in receiver.all_stats().items():
        print(
            f"user {user_id}: {stats.delivered} frames, {stats.lost} lost, {stats.undecryptable} unreadable"
        )
    print(f"wrote {folder}/: <user id>.wav and .opus per member, and mixed.wav")


async def on_discord(guild_id: int, channel_id: int, seconds: float, folder: Path) -> None:
    async with Client(os.environ["DISCORD_TOKEN"]) as client, cordvoice.Voice(client) as voice:
        session = await voice.join_channel(guild_id, channel_id, self_mute=True)
        await record(session, folder, seconds)


async def on_emulator() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        async with DiscordEmulator() as emu:
            client = Client(emu.bot.token, gateway_url=emu.gateway_url, api_base=emu.api_base)
            async with client, cordvoice.Voice(client, ssl=emu.voice_ssl) as voice:
                session = await voice.join_channel(emu.guild_id, emu.channel_id, self_mute=True)
                alice = await emu.add_participant(emu.channel_id, name="alice")
                bob = await emu.add_participant(emu.channel_id, name="bob")
                talking = asyncio.ensure_future(take_turns(session, [alice, bob]))
                await record(session, folder, seconds=3.0)
                await talking
            levels = {user: loudness(folder / f"{user}.wav") for user in (alice.user_id, bob.user_id)}
    print("levels (RMS of each recording):", {user: round(level) for user, level in levels.items()})
    return 0 if all(level > 200 for level in levels.values()) else 1


async def wait_same_group(session: cordvoice.Session, members: list[Participant]) -> None:
    """Wait (up to 10 s) until everyone is in one DAVE group, so that everyone can decrypt every frame."""
    for _ in range(500):
        dave = session.dave
        if dave is not None and dave.ready and all(m.dave_ready and m.epoch == dave.epoch for m in members):
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("the DAVE group did not settle in 10 s")


async def take_turns(session: cordvoice.Session, members: list[Participant]) -> None:
    """Each simulated member says something (a synthesised voice), one after the other."""
    await wait_same_group(session, members)
    for voice, member in enumerate(members, start=1):
        with OpusEncoder() as encoder:
            frames = [encoder.encode(pcm) for pcm in iter_frames(speech_like(1.0, voice=voice))]
        await member.play(frames)


def loudness(path: Path) -> float:
    with wave.open(str(path)) as file:
        samples = np.frombuffer(file.readframes(file.getnframes()), dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--emulator", action="store_true", help="record a scripted talk on the local emulator"
    )
    parser.add_argument("--guild", type=int)
    parser.add_argument("--channel", type=int)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=Path("recording"))
    args = parser.parse_args()
    if args.emulator:
        return asyncio.run(on_emulator())
    if args.guild is None or args.channel is None or "DISCORD_TOKEN" not in os.environ:
        parser.error("set $DISCORD_TOKEN and give --guild and --channel (or use --emulator)")
    asyncio.run(on_discord(args.guild, args.channel, args.seconds, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
