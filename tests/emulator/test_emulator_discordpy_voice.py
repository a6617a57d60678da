"""Interop with an independent client: discord.py 2.7.1 joins a DAVE channel and plays an Ogg Opus file.

discord.py always dials ``wss://`` for voice, so the emulator runs with TLS and discord.py trusts its CA
through ``discordpy_connector(emu)``; ``discordpy_pointed_at(emu)`` points its REST base and gateway at the
emulator for the test's duration only. There is no ffmpeg
binary here, so the file's packets reach discord.py through a tiny ``AudioSource`` with ``is_opus() -> True``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from pathlib import Path

import discord

from cordvoice.audio.demux import iter_opus_packets
from cordvoice.audio.samples import write_demo_ogg
from cordvoice.emulator import Emulator
from cordvoice.emulator.for_discordpy import discordpy_connector
from cordvoice.udp.crypto import MODE_XCHACHA20_POLY1305
from cordvoice.udp.rtp import OPUS_SILENCE

from .emulator_helpers import build_voice_world

DiscordpyBot = Callable[..., contextlib.AbstractAsyncContextManager[discord.Client]]
"""The ``discordpy_bot`` fixture (tests/conftest.py)."""


class OpusPackets(discord.AudioSource):
    """Already-encoded Opus packets, one per 20 ms read."""

    def __init__(self, packets: list[bytes]) -> None:
        self._packets = iter(packets)

    def read(self) -> bytes:
        return next(self._packets, b"")

    def is_opus(self) -> bool:
        return True


async def test_discordpy_plays_an_ogg_file_that_a_participant_hears_dave_decrypted(
    tmp_path: Path, discordpy_bot: DiscordpyBot
) -> None:
    ogg = tmp_path / "clip.opus"
    await asyncio.to_thread(write_demo_ogg, ogg, 2.0)
    packets = [packet.data for packet in iter_opus_packets(ogg)]
    assert len(packets) == 101  # 2 s of 20 ms frames plus the flush frame

    async with Emulator(tls=True) as emu:
        world = build_voice_world(emu)
        listener = await emu.add_participant(world.channel.id, name="listener")
        async with discordpy_bot(emu, world.bot.token, connector=discordpy_connector(emu)) as client:
            channel = client.get_channel(world.channel.id)
            assert isinstance(channel, discord.VoiceChannel)
            voice = await channel.connect(timeout=10)
            assert isinstance(voice, discord.VoiceClient)
            # discord.py sends plain Opus until its DAVE group is ready; start once both sides agree.
            async with asyncio.timeout(10):
                while not (listener.privacy_code and voice.voice_privacy_code == listener.privacy_code):
                    await asyncio.sleep(0.02)
            assert listener.epoch == 1

            finished = asyncio.Event()
            voice.play(OpusPackets(packets), after=lambda _: client.loop.call_soon_threadsafe(finished.set))
            async with asyncio.timeout(15):
                await finished.wait()
            frames = await listener.wait_for_frames(world.bot.user_id, len(packets) + 5, timeout=5)

            heard = [f for f in frames if f.payload != OPUS_SILENCE]
            assert [f.payload for f in heard] == packets, "byte-identical, complete and in order"
            assert all(f.dave for f in heard), "every frame travelled DAVE-encrypted"
            assert [f.payload for f in frames[len(heard) :]] == [OPUS_SILENCE] * 5
            sequences = [f.sequence for f in frames]
            assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(sequences))
            assert {f.ssrc for f in frames} == {voice.ssrc}
            assert listener.stats.dave_undecryptable.total() == 0
            assert listener.stats.transport_undecryptable == 0

            seen = emu.inspect(world.bot.user_id)
            assert seen.mode == MODE_XCHACHA20_POLY1305  # discord.py's only AEAD mode
            assert seen.dave_protocol_version == 1 and seen.dave_member
            assert seen.opcode_order[:3] == (0, 1, 5), "Identify, Select Protocol, Speaking(0) first"
            assert seen.speaking_flags[0] == 0 and 1 in seen.speaking_flags
            assert seen.rtp.lost == 0 and seen.rtp.undecryptable == 0
            assert set(seen.rtp.timestamp_steps) == {960}
            assert seen.rtp.packets == len(packets) + 5
            assert emu.voice_server().media.counters["undecryptable"] == 0

            await voice.disconnect()
            await listener.wait_until(lambda: world.bot.user_id not in listener.clients)
            assert emu.inspect(world.bot.user_id).ended, "leaving ends the voice session (op 13 to the rest)"
            # Left alone, the listener is reset (op 24 epoch 1, op 21 tid 0) back to a pending group.
            await listener.wait_until(lambda: listener.epoch == 0 and not listener.dave_ready)
