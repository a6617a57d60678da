"""An echo bot: whenever someone stops talking, it plays back what they just said.

It listens to every member (DAVE-decrypted Opus frames, no decoding needed), collects each person's words,
and when the receiver says that person stopped speaking, plays their frames back into the channel. Two
people finishing at once are mixed.

On Discord, with the bot token in $DISCORD_TOKEN (Ctrl-C to stop)::

    DISCORD_TOKEN=... python examples/echo_bot.py --guild 123 --channel 456

On the local emulator (no token, no network): two simulated members say something in turn; it exits 0
when each heard their own words come back::

    python examples/echo_bot.py --emulator
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections import defaultdict
from collections.abc import Callable

import cordvoice
from cordvoice.audio.opus import OpusEncoder
from cordvoice.audio.pcm import iter_frames
from cordvoice.audio.samples import speech_like
from cordvoice.emulator import DiscordEmulator, Participant
from cordvoice.gateway import Client


async def echo(session: cordvoice.Session) -> None:
    """Run the echo loop until cancelled."""
    said: dict[int, list[bytes]] = defaultdict(list)

    async def collect() -> None:
        async with session.listen() as frames:  # everyone's frames, in order, as Opus
            async for frame in frames:
                if frame.opus is not None and not frame.is_silence:
                    said[frame.user_id].append(frame.opus)

    async def play_back() -> None:
        async with session.receiver.speaking_events() as changes:
            async for change in changes:
                if change.speaking or change.source != "audio":
                    continue
                await asyncio.sleep(0.1)  # let collect() take the last frames
                words = said.pop(change.user_id, [])
                if words:
                    print(f"echoing {len(words) * 0.02:.1f} s from user {change.user_id}")
                    session.play(words, kind="opus", name=f"echo of {change.user_id}")

    await asyncio.gather(collect(), play_back())


async def on_discord(guild_id: int, channel_id: int) -> None:
    async with Client(os.environ["DISCORD_TOKEN"]) as client, cordvoice.Voice(client) as voice:
        session = await voice.join_channel(guild_id, channel_id)
        await echo(session)


async def on_emulator() -> int:
    async with DiscordEmulator() as emu:
        client = Client(emu.bot.token, gateway_url=emu.gateway_url, api_base=emu.api_base)
        async with client, cordvoice.Voice(client, ssl=emu.voice_ssl) as voice:
            session = await voice.join_channel(emu.guild_id, emu.channel_id)
            echoing = asyncio.ensure_future(echo(session))
            members = [await emu.add_participant(emu.channel_id, name=name) for name in ("alice", "bob")]
            await wait_same_group(session, members)
            ok = True
            for voice_number, member in enumerate(members, start=1):
                with OpusEncoder() as encoder:
                    words = [encoder.encode(pcm) for pcm in iter_frames(speech_like(1.0, voice=voice_number))]
                member.clear_frames()
                await member.play(words)
                # What comes back must be exactly what was said, frame for frame.
                try:
                    await member.wait_until(heard_back(member, emu.bot.user_id, words), 5.0)
                    print(f"{member.name} heard their {len(words)} frames come back")
                except TimeoutError:
                    print(f"{member.name} did not hear their words come back")
                    ok = False
            echoing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await echoing
    return 0 if ok else 1


def heard_back(member: Participant, bot_id: int, words: list[bytes]) -> Callable[[], bool]:
    return lambda: member.payloads_from(bot_id) == words


async def wait_same_group(session: cordvoice.Session, members: list[Participant]) -> None:
    """Wait (up to 10 s) until everyone is in one DAVE group, so that everyone can decrypt every frame."""
    for _ in range(500):
        dave = session.dave
        if dave is not None and dave.ready and all(m.dave_ready and m.epoch == dave.epoch for m in members):
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("the DAVE group did not settle in 10 s")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--emulator", action="store_true", help="run a scripted talk on the local emulator")
    parser.add_argument("--guild", type=int)
    parser.add_argument("--channel", type=int)
    args = parser.parse_args()
    if args.emulator:
        return asyncio.run(on_emulator())
    if args.guild is None or args.channel is None or "DISCORD_TOKEN" not in os.environ:
        parser.error("set $DISCORD_TOKEN and give --guild and --channel (or use --emulator)")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(on_discord(args.guild, args.channel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
