"""A discord.py 2.7 bot joins and plays through cordvoice's VoiceProtocol against the emulator.

discord.py has no endpoint settings, so (as in tests/gateway) its REST base and gateway URL are pointed at
the emulator for the test's duration only. Over TLS it trusts the emulator's CA through its aiohttp connector
for the main gateway, and cordvoice's Voice gets the same CA for the voice gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import discord
import pytest

import cordvoice.discordpy
from cordvoice import DisconnectedEvent, SessionState, Voice
from cordvoice.emulator import Emulator
from cordvoice.emulator.for_discordpy import discordpy_connector
from cordvoice.udp.rtp import OPUS_SILENCE

from .conftest import LoopErrors, opus_frames, wait_until

DiscordpyBot = Callable[..., contextlib.AbstractAsyncContextManager[discord.Client]]
"""The ``discordpy_bot`` fixture (tests/conftest.py)."""


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
async def test_client_discordpy_bot_joins_and_plays(
    loop_errors: LoopErrors, tls: bool, discordpy_bot: DiscordpyBot
) -> None:
    async with Emulator(tls=tls, rate_limit=None) as emu:
        bot = emu.create_bot("discordpy-bot")
        guild_info = emu.create_guild("dpy guild", members=[bot.user_id])
        channel_info = emu.create_voice_channel(guild_info.id, "Music")
        listener = await emu.add_participant(channel_info.id, name="listener")
        async with discordpy_bot(emu, bot.token, connector=discordpy_connector(emu)) as client:
            voice = Voice.from_discordpy(client, ssl=emu.client_ssl_context() if tls else False)
            assert Voice.from_discordpy(client) is voice, "one Voice per discord.Client"
            guild = client.get_guild(guild_info.id)
            assert guild is not None
            channel = guild.get_channel(channel_info.id)
            assert isinstance(channel, discord.VoiceChannel)

            vc = await channel.connect(cls=cordvoice.discordpy.VoiceClient, timeout=10)
            assert isinstance(vc, cordvoice.discordpy.VoiceClient)
            assert guild.voice_client is vc and vc.is_connected()
            session = vc.session
            assert session is not None and session.state is SessionState.READY
            assert session.channel_id == channel_info.id
            await listener.wait_dave_ready()
            await wait_until(lambda: session.dave_ready)

            frames = opus_frames(50, voice=10)
            async with asyncio.timeout(10):
                for frame in frames:
                    await session.write(frame)
                await session.stop_speaking()
                received = await listener.wait_for_frames(bot.user_id, 55)
            assert [f.payload for f in received] == [*frames, *([OPUS_SILENCE] * 5)]
            assert vc.latency < 1.0

            await vc.disconnect()
            assert guild.voice_client is None and not vc.is_connected()
            assert session.closed
            await wait_until(lambda: emu.state.voice_state(guild_info.id, bot.user_id) is None)

            # Connecting again works (the VoiceProtocol was cleaned up), and a kick cleans up by itself.
            vc2 = await channel.connect(cls=cordvoice.discordpy.VoiceClient, timeout=10)
            assert vc2 is not vc and vc2.session is not None
            ended = asyncio.ensure_future(vc2.session.wait_for(DisconnectedEvent, timeout=5))
            emu.disconnect_member(guild_info.id, bot.user_id)
            await ended
            assert guild.voice_client is None
            await voice.close()
