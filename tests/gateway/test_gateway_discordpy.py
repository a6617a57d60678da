"""discord.py 2.7 as an independent peer: it logs in to the emulator and asks to join voice.

discord.py has no setting for its endpoints, so these tests point it at the emulator for their own duration
only with :func:`~cordvoice.emulator.for_discordpy.discordpy_pointed_at` (``Client.connect`` never asks
``/gateway/bot``). With TLS, discord.py trusts the emulator's CA through
:func:`~cordvoice.emulator.for_discordpy.discordpy_connector` passed as ``connector=``; the same aiohttp
session later dials the ``wss://`` voice endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import discord
import pytest

from cordvoice.emulator import Emulator
from cordvoice.emulator.for_discordpy import discordpy_connector, discordpy_pointed_at

from .conftest import World, build_world

DiscordpyBot = Callable[..., contextlib.AbstractAsyncContextManager[discord.Client]]
"""The ``discordpy_bot`` fixture (tests/conftest.py)."""


async def test_discordpy_logs_in_and_gets_voice_events(world: World, discordpy_bot: DiscordpyBot) -> None:
    emu = world.emu
    voice_updates: asyncio.Queue[tuple[discord.Member, discord.VoiceState]] = asyncio.Queue()
    resumed = asyncio.Event()
    async with discordpy_bot(emu, world.bot.token) as client:

        @client.event
        async def on_voice_state_update(
            member: discord.Member, before: discord.VoiceState, after: discord.VoiceState
        ) -> None:
            voice_updates.put_nowait((member, after))

        @client.event
        async def on_resumed() -> None:
            resumed.set()

        assert client.user is not None and client.user.id == world.bot.user_id
        assert client.application_id == world.bot.user_id
        (connection,) = emu.gateway_connections
        assert connection.compress, "discord.py asks for zlib-stream"
        guild = client.get_guild(world.guild.id)
        assert guild is not None and guild.name == "test guild"
        channel = guild.get_channel(world.channel.id)
        assert isinstance(channel, discord.VoiceChannel) and channel.name == "General"
        assert guild.me is not None

        assert client.ws is not None
        server_update = client.ws.wait_for("VOICE_SERVER_UPDATE", lambda d: int(d["guild_id"]) == guild.id)
        await guild.change_voice_state(channel=channel, self_deaf=True)
        async with asyncio.timeout(5):
            data = await server_update
            member, after = await voice_updates.get()
        assert data["endpoint"] == emu.state.guild_voice_server(guild.id).endpoint
        assert member.id == world.bot.user_id and after.channel == channel and after.self_deaf
        assert after.session_id == client.ws.session_id
        assert (
            emu.state.lookup_voice_session(guild.id, member.id, after.session_id, data["token"]) is not None
        )
        assert guild.me.voice is not None and guild.me.voice.channel == channel

        # A participant joins while discord.py's socket is cut: discord.py resumes and still hears it.
        human = emu.create_user("participant")
        emu.add_member(guild.id, human.id)
        await emu.main_gateway.drop(user_id=world.bot.user_id)
        emu.set_voice_state(guild.id, human.id, world.other_channel.id)
        async with asyncio.timeout(10):
            await resumed.wait()
            member, after = await voice_updates.get()
        assert (
            member.id == human.id and after.channel is not None and after.channel.id == world.other_channel.id
        )
        assert emu.main_gateway.stats.resumes == 1

        await guild.change_voice_state(channel=None)
        async with asyncio.timeout(5):
            member, after = await voice_updates.get()
        assert member.id == world.bot.user_id and after.channel is None
    # discord.py 2.7.1's reader answers the closing handshake with 4000 before its close(1000) goes out, so
    # the session stays resumable (as it would on Discord) until resume_timeout.
    async with asyncio.timeout(5):
        while emu.gateway_connections:
            await asyncio.sleep(0.01)
    assert emu.rest.stats.requests["/users/@me"] == 1
    assert emu.rest.stats.requests["/oauth2/applications/@me"] == 1
    assert emu.rest.stats.not_found == 0


async def test_discordpy_over_tls_trusts_the_emulator_ca(discordpy_bot: DiscordpyBot) -> None:
    async with Emulator(tls=True) as emu:
        world = build_world(emu)
        async with discordpy_bot(emu, world.bot.token, connector=discordpy_connector(emu)) as client:
            guild = client.get_guild(world.guild.id)
            assert guild is not None and guild.get_channel(world.channel.id) is not None
            assert emu.gateway_url.startswith("wss://")


async def test_discordpy_bad_token_is_refused() -> None:
    async with Emulator() as emu:
        client = discord.Client(intents=discord.Intents.none())
        with discordpy_pointed_at(emu), pytest.raises(discord.LoginFailure):
            await client.login("wrong-token")
        await client.close()
        assert emu.rest.stats.unauthorized == 1
