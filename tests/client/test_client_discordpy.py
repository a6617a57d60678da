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
from cordvoice import DaveRequiredError, DisconnectedEvent, SessionState, Voice, VoiceError
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


async def test_client_discordpy_failed_connect_leaves_no_voice_client(discordpy_bot: DiscordpyBot) -> None:
    # discord.py itself cleans up only after a timeout; a refused join must not leave the guild "connected".
    async with Emulator(tls=False, rate_limit=None) as emu:
        bot = emu.create_bot("discordpy-bot")
        guild_info = emu.create_guild("dpy guild", members=[bot.user_id])
        channel_info = emu.create_voice_channel(guild_info.id, "Music")  # requires DAVE
        async with discordpy_bot(emu, bot.token) as client:
            Voice.from_discordpy(client, ssl=False, dave=False)
            guild = client.get_guild(guild_info.id)
            assert guild is not None
            channel = guild.get_channel(channel_info.id)
            assert isinstance(channel, discord.VoiceChannel)

            for _ in range(2):  # the second attempt fails the same way, not with "Already connected"
                with pytest.raises(DaveRequiredError):
                    await channel.connect(cls=cordvoice.discordpy.VoiceClient, timeout=10)
                assert guild.voice_client is None
            await wait_until(lambda: emu.state.voice_state(guild_info.id, bot.user_id) is None)


async def test_client_discordpy_stale_voice_client_spares_the_new_one(
    discordpy_bot: DiscordpyBot,
) -> None:
    async with Emulator(tls=False, rate_limit=None) as emu:
        bot = emu.create_bot("discordpy-bot")
        guild_info = emu.create_guild("dpy guild", members=[bot.user_id])
        music = emu.create_voice_channel(guild_info.id, "Music")
        lounge = emu.create_voice_channel(guild_info.id, "Lounge")
        async with discordpy_bot(emu, bot.token) as client:
            voice = Voice.from_discordpy(client, ssl=False)
            guild = client.get_guild(guild_info.id)
            assert guild is not None
            channel = guild.get_channel(music.id)
            other = guild.get_channel(lounge.id)
            assert isinstance(channel, discord.VoiceChannel) and isinstance(other, discord.VoiceChannel)

            stale = await channel.connect(cls=cordvoice.discordpy.VoiceClient, timeout=10)
            assert stale.session is not None
            ended = asyncio.ensure_future(stale.session.wait_for(DisconnectedEvent, timeout=5))
            emu.disconnect_member(guild_info.id, bot.user_id)
            await ended
            assert guild.voice_client is None

            vc = await channel.connect(cls=cordvoice.discordpy.VoiceClient, timeout=10, self_deaf=True)
            assert vc.session is not None
            await stale.disconnect()  # e.g. an old command handler still holds it
            assert vc.is_connected() and guild.voice_client is vc
            with pytest.raises(VoiceError):
                await stale.move_to(other)
            assert vc.session.channel_id == music.id

            # The live client moves, keeping the self-deafen it connected with; move_to(None) leaves.
            await vc.move_to(other, timeout=10)
            assert vc.is_connected() and vc.channel is other and vc.session.channel_id == lounge.id
            state = emu.state.voice_state(guild_info.id, bot.user_id)
            assert state is not None and state.channel_id == lounge.id and state.self_deaf
            await vc.move_to(None)
            assert guild.voice_client is None and not vc.is_connected()
            await voice.close()


async def test_client_discordpy_connects_again_after_its_voice_is_closed(discordpy_bot: DiscordpyBot) -> None:
    async with Emulator(tls=False, rate_limit=None) as emu:
        bot = emu.create_bot("discordpy-bot")
        guild_info = emu.create_guild("dpy guild", members=[bot.user_id])
        channel_info = emu.create_voice_channel(guild_info.id, "Music")
        async with discordpy_bot(emu, bot.token) as client:
            voice = Voice.from_discordpy(client, ssl=False)
            guild = client.get_guild(guild_info.id)
            assert guild is not None
            channel = guild.get_channel(channel_info.id)
            assert isinstance(channel, discord.VoiceChannel)
            vc = await channel.connect(cls=cordvoice.discordpy.VoiceClient, timeout=10)
            await voice.close()
            assert guild.voice_client is None and not vc.is_connected()

            # A fresh Voice with the closed one's options: ssl=False, or this emulator could not be reached.
            vc2 = await channel.connect(cls=cordvoice.discordpy.VoiceClient, timeout=10)
            assert vc2.voice is not voice and Voice.from_discordpy(client) is vc2.voice
            assert vc2.session is not None and vc2.session.state is SessionState.READY
            await vc2.voice.close()


async def test_client_discordpy_disconnect_during_connect_ends_the_join(discordpy_bot: DiscordpyBot) -> None:
    async with Emulator(tls=False, rate_limit=None) as emu:
        bot = emu.create_bot("discordpy-bot")
        guild_info = emu.create_guild("dpy guild", members=[bot.user_id])
        channel_info = emu.create_voice_channel(guild_info.id, "Music")
        async with discordpy_bot(emu, bot.token) as client:
            voice = Voice.from_discordpy(client, ssl=False)
            guild = client.get_guild(guild_info.id)
            assert guild is not None
            channel = guild.get_channel(channel_info.id)
            assert isinstance(channel, discord.VoiceChannel)
            emu.faults.pause_udp(guild_id=guild_info.id)  # IP discovery hangs: the join stays in progress
            connecting = asyncio.ensure_future(
                channel.connect(cls=cordvoice.discordpy.VoiceClient, timeout=10)
            )
            await wait_until(lambda: emu.state.voice_state(guild_info.id, bot.user_id) is not None)
            vc = guild.voice_client
            assert isinstance(vc, cordvoice.discordpy.VoiceClient) and vc.session is None

            await vc.disconnect()
            async with asyncio.timeout(2):  # well before the join's own timeouts
                with pytest.raises(VoiceError) as info:
                    await connecting
            assert not isinstance(info.value, TimeoutError)
            assert guild.voice_client is None
            await wait_until(lambda: emu.state.voice_state(guild_info.id, bot.user_id) is None)
            await voice.close()
