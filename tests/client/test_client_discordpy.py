"""A discord.py 2.7 bot joins and plays through cordvoice's VoiceProtocol against the emulator.

discord.py has no endpoint settings, so (as in tests/gateway) its REST base and gateway URL are pointed at
the emulator for the test's duration only. Over TLS it trusts the emulator's CA through its aiohttp connector
for the main gateway, and cordvoice's Voice gets the same CA for the voice gateway.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import discord
import pytest

import cordvoice.discordpy
from cordvoice import (
    DaveRequiredError,
    DisconnectedEvent,
    GatewayError,
    ReadyEvent,
    SessionState,
    Voice,
    VoiceError,
)
from cordvoice.emulator import Emulator, Participant
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


@dataclass
class DpyGuild:
    """A discord.py bot logged in to the emulator, in one guild with the voice channels asked for."""

    emu: Emulator
    bot_id: int
    guild_id: int
    client: discord.Client
    guild: discord.Guild
    channel_ids: list[int]

    def channel(self, index: int = 0) -> discord.VoiceChannel:
        channel = self.guild.get_channel(self.channel_ids[index])
        assert isinstance(channel, discord.VoiceChannel)
        return channel

    def voice_state_channel(self) -> int | None:
        state = self.emu.state.voice_state(self.guild_id, self.bot_id)
        return None if state is None else state.channel_id

    async def connect_with_listener(self) -> tuple[Voice, Participant, cordvoice.discordpy.VoiceClient]:
        """A cordvoice voice client in the first channel with a DAVE listener, ready to play to it."""
        voice = Voice.from_discordpy(self.client, ssl=False)
        listener = await self.emu.add_participant(self.channel_ids[0], name="listener")
        vc = await self.channel().connect(cls=cordvoice.discordpy.VoiceClient, timeout=10)
        await listener.wait_dave_ready()
        await wait_until(lambda: vc.session.dave_ready)  # audio waits for the DAVE group
        return voice, listener, vc


@contextlib.asynccontextmanager
async def dpy_guild(
    discordpy_bot: DiscordpyBot, *channels: str, reconnect: bool = False
) -> AsyncIterator[DpyGuild]:
    async with Emulator(tls=False, rate_limit=None) as emu:
        bot = emu.create_bot("discordpy-bot")
        guild_info = emu.create_guild("dpy guild", members=[bot.user_id])
        channel_ids = [emu.create_voice_channel(guild_info.id, name).id for name in channels or ("Music",)]
        async with discordpy_bot(emu, bot.token, reconnect=reconnect) as client:
            guild = client.get_guild(guild_info.id)
            assert guild is not None
            yield DpyGuild(emu, bot.user_id, guild_info.id, client, guild, channel_ids)


async def test_client_discordpy_failed_connect_leaves_no_voice_client(discordpy_bot: DiscordpyBot) -> None:
    # discord.py itself cleans up only after a timeout; a refused join must not leave the guild "connected".
    async with dpy_guild(discordpy_bot) as world:  # the channel requires DAVE
        Voice.from_discordpy(world.client, ssl=False, dave=False)
        for _ in range(2):  # the second attempt fails the same way, not with "Already connected"
            with pytest.raises(DaveRequiredError):
                await world.channel().connect(cls=cordvoice.discordpy.VoiceClient, timeout=10)
            assert world.guild.voice_client is None
        await wait_until(lambda: world.voice_state_channel() is None)


async def test_client_discordpy_stale_voice_client_spares_the_new_one(
    discordpy_bot: DiscordpyBot,
) -> None:
    async with dpy_guild(discordpy_bot, "Music", "Lounge") as world:
        voice = Voice.from_discordpy(world.client, ssl=False)
        guild, channel, other = world.guild, world.channel(0), world.channel(1)

        stale = await channel.connect(cls=cordvoice.discordpy.VoiceClient, timeout=10)
        assert stale.session is not None
        ended = asyncio.ensure_future(stale.session.wait_for(DisconnectedEvent, timeout=5))
        world.emu.disconnect_member(world.guild_id, world.bot_id)
        await ended
        assert guild.voice_client is None

        vc = await channel.connect(cls=cordvoice.discordpy.VoiceClient, timeout=10, self_deaf=True)
        assert vc.session is not None
        await stale.disconnect()  # e.g. an old command handler still holds it
        assert vc.is_connected() and guild.voice_client is vc
        with pytest.raises(VoiceError):
            await stale.move_to(other)
        assert vc.session.channel_id == channel.id

        # The live client moves, keeping the self-deafen it connected with; move_to(None) leaves.
        await vc.move_to(other, timeout=10)
        assert vc.is_connected() and vc.channel is other and vc.session.channel_id == other.id
        state = world.emu.state.voice_state(world.guild_id, world.bot_id)
        assert state is not None and state.channel_id == other.id and state.self_deaf
        await vc.move_to(None)
        assert guild.voice_client is None and not vc.is_connected()
        await voice.close()


async def test_client_discordpy_connects_again_after_its_voice_is_closed(discordpy_bot: DiscordpyBot) -> None:
    async with dpy_guild(discordpy_bot) as world:
        voice = Voice.from_discordpy(world.client, ssl=False)
        vc = await world.channel().connect(cls=cordvoice.discordpy.VoiceClient, timeout=10)
        await voice.close()
        assert world.guild.voice_client is None and not vc.is_connected()

        # A fresh Voice with the closed one's options: ssl=False, or this emulator could not be reached.
        vc2 = await world.channel().connect(cls=cordvoice.discordpy.VoiceClient, timeout=10)
        assert vc2.voice is not voice and Voice.from_discordpy(world.client) is vc2.voice
        assert vc2.session is not None and vc2.session.state is SessionState.READY
        await vc2.voice.close()


async def test_client_discordpy_disconnect_during_connect_ends_the_join(discordpy_bot: DiscordpyBot) -> None:
    async with dpy_guild(discordpy_bot) as world:
        voice = Voice.from_discordpy(world.client, ssl=False)
        world.emu.faults.pause_udp(guild_id=world.guild_id)  # IP discovery hangs: the join stays in progress
        connecting = asyncio.ensure_future(
            world.channel().connect(cls=cordvoice.discordpy.VoiceClient, timeout=10)
        )
        await wait_until(lambda: world.voice_state_channel() is not None)
        vc = world.guild.voice_client
        assert isinstance(vc, cordvoice.discordpy.VoiceClient) and not vc.is_connected()
        with pytest.raises(VoiceError):
            vc.session  # noqa: B018 - not joined yet

        await vc.disconnect()
        async with asyncio.timeout(2):  # well before the join's own timeouts
            with pytest.raises(VoiceError) as info:
                await connecting
        assert not isinstance(info.value, TimeoutError)
        assert world.guild.voice_client is None
        await wait_until(lambda: world.voice_state_channel() is None)
        await voice.close()


async def test_client_discordpy_connect_timeout_is_the_join_timeout(discordpy_bot: DiscordpyBot) -> None:
    # discord.py always passes connect()'s timeout (60 s by default): that, not the Voice's join_timeout,
    # bounds the join, as docs/adapters.md says.
    async with dpy_guild(discordpy_bot) as world:
        voice = Voice.from_discordpy(world.client, ssl=False, join_timeout=0.2)
        world.emu.faults.pause_udp(guild_id=world.guild_id)  # IP discovery hangs: the join never completes
        connecting = asyncio.ensure_future(
            world.channel().connect(cls=cordvoice.discordpy.VoiceClient, timeout=1.5)
        )
        await asyncio.sleep(0.8)
        assert not connecting.done(), "the Voice's join_timeout does not apply to connect()"
        async with asyncio.timeout(5):
            with pytest.raises(TimeoutError):
                await connecting
        assert world.guild.voice_client is None
        await voice.close()


class _OpusFrames(discord.AudioSource):
    """A custom discord.py source of Opus packets; ``fail`` raises it from read() instead of ending."""

    def __init__(self, frames: tuple[bytes, ...], fail: Exception | None = None) -> None:
        self.frames = list(frames)
        self.fail = fail
        self.cleaned = 0

    def read(self) -> bytes:
        if self.frames:
            return self.frames.pop(0)
        if self.fail is not None:
            raise self.fail
        return b""

    def is_opus(self) -> bool:
        return True

    def cleanup(self) -> None:
        self.cleaned += 1


async def test_client_discordpy_plays_discordpy_audio_sources(discordpy_bot: DiscordpyBot) -> None:
    # A discord.py bot's vc.play(source, after=...) and the calls around it work as in discord.py.
    async with dpy_guild(discordpy_bot) as world:
        voice, listener, vc = await world.connect_with_listener()
        loop_thread = threading.get_ident()
        afters: list[tuple[Exception | None, bool]] = []

        def after(error: Exception | None) -> None:
            afters.append((error, threading.get_ident() != loop_thread))

        # An Opus source passes through untouched; after(None) runs once, off the event loop's thread.
        frames = opus_frames(25, voice=3)
        opus = _OpusFrames(frames)
        vc.play(opus, after=after)
        assert vc.is_playing() and not vc.is_paused() and vc.source is opus
        with pytest.raises(discord.ClientException):
            vc.play(_OpusFrames(frames))
        await wait_until(lambda: afters == [(None, True)])
        await listener.wait_until(lambda: len(listener.payloads_from(world.bot_id)) >= len(frames))
        assert listener.payloads_from(world.bot_id) == list(frames)
        assert not vc.is_playing() and vc.source is None and opus.cleaned == 1

        # PCM through discord.py's own classes; pause, resume, a source swap, then stop: after(None) once.
        pcm = discord.PCMVolumeTransformer(discord.PCMAudio(io.BytesIO(bytes(3840 * 500))), volume=0.5)
        vc.play(pcm, after=after)
        vc.pause()
        assert vc.is_paused() and not vc.is_playing()
        vc.resume()
        assert vc.is_playing()
        swapped = discord.PCMAudio(io.BytesIO(bytes(3840 * 500)))
        vc.source = swapped
        assert vc.source is swapped
        vc.stop()
        assert not vc.is_playing() and vc.source is None
        await wait_until(lambda: len(afters) == 2)
        assert afters[1] == (None, True)

        # A source that fails: after gets its own exception; after may chain the next play() from its thread.
        chained = _OpusFrames(frames[:5])
        vc.play(
            _OpusFrames(frames[:5], fail=ValueError("broken")), after=lambda e: (after(e), vc.play(chained))
        )
        await wait_until(lambda: len(afters) == 3 and chained.cleaned == 1)
        assert isinstance(afters[2][0], ValueError) and str(afters[2][0]) == "broken"
        with pytest.raises(TypeError):
            vc.play(b"not a source")  # type: ignore[arg-type]

        # Disconnecting while playing ends the source: after(None), once.
        vc.play(discord.PCMAudio(io.BytesIO(bytes(3840 * 500))), after=after)
        await vc.disconnect()
        await wait_until(lambda: len(afters) == 4)
        await asyncio.sleep(0.1)
        assert afters[3] == (None, True) and len(afters) == 4
        with pytest.raises(discord.ClientException):
            vc.play(_OpusFrames(frames))
        await voice.close()


async def test_client_discordpy_gateway_resume_keeps_voice_reidentify_ends_it(
    discordpy_bot: DiscordpyBot,
) -> None:
    # As docs/adapters.md says: discord.py's resume keeps the voice session; a re-identify (discord.py then
    # forgets its voice clients) ends it as a kick does, and the bot connects again.
    async with dpy_guild(discordpy_bot, reconnect=True) as world:
        voice = Voice.from_discordpy(world.client, ssl=False)
        vc = await world.channel().connect(cls=cordvoice.discordpy.VoiceClient, timeout=10)
        session = vc.session
        ws = world.client.ws
        first = ws.session_id
        await world.emu.main_gateway.drop(user_id=world.bot_id, code=4000)
        await wait_until(lambda: world.client.ws is not ws and world.client.ws.session_id == first, within=10)
        await asyncio.sleep(0.5)
        assert session.state is SessionState.READY and world.guild.voice_client is vc

        ended = asyncio.ensure_future(session.wait_for(DisconnectedEvent, timeout=10))
        world.emu.main_gateway.invalidate_session(first)
        await ended
        await wait_until(lambda: world.client.is_ready() and world.client.ws.session_id not in (first, None))
        guild = world.client.get_guild(world.guild_id)
        assert guild is not None and guild.voice_client is None and not vc.is_connected()
        channel = guild.get_channel(world.channel_ids[0])
        assert isinstance(channel, discord.VoiceChannel)
        vc2 = await channel.connect(cls=cordvoice.discordpy.VoiceClient, timeout=10)
        assert vc2.session.state is SessionState.READY and guild.voice_client is vc2
        await voice.close()


async def test_client_discordpy_voice_join_channel_without_a_voice_client_fails_at_once(
    discordpy_bot: DiscordpyBot,
) -> None:
    # discord.py passes voice events only to a registered voice client: a bare Voice.join_channel would sit in
    # the channel for 30 s and then blame the channel. It fails at once, saying how to join, without joining.
    async with dpy_guild(discordpy_bot) as world:
        voice = Voice.from_discordpy(world.client, ssl=False)
        async with asyncio.timeout(2):
            with pytest.raises(GatewayError, match=r"channel\.connect"):
                await voice.join_channel(world.guild_id, world.channel_ids[0])
        assert world.voice_state_channel() is None and voice.session(world.guild_id) is None

        vc = await world.channel().connect(cls=cordvoice.discordpy.VoiceClient, timeout=10)
        assert await voice.join_channel(world.guild_id, world.channel_ids[0]) is vc.session
        await voice.close()


async def test_client_discordpy_rejoin_and_move_keep_flags_set_through_discordpy(
    discordpy_bot: DiscordpyBot,
) -> None:
    # discord.py's way to deafen a connected bot is guild.change_voice_state(); like discord.py's own voice
    # client, a rejoin or a move keeps the flags the bot's voice state has now, not those of connect().
    async with dpy_guild(discordpy_bot, "Music", "Lounge") as world:
        voice = Voice.from_discordpy(world.client, ssl=False)
        vc = await world.channel().connect(cls=cordvoice.discordpy.VoiceClient, timeout=10)
        session = vc.session

        def flags() -> tuple[bool, bool] | None:
            state = world.emu.state.voice_state(world.guild_id, world.bot_id)
            return None if state is None else (state.self_mute, state.self_deaf)

        await world.guild.change_voice_state(channel=world.channel(), self_mute=True, self_deaf=True)
        await wait_until(lambda: flags() == (True, True))
        await asyncio.sleep(0.1)  # discord.py hands the voice state to the voice client in a task

        ready = asyncio.ensure_future(session.wait_for(ReadyEvent, timeout=10))
        await world.emu.faults.close_client(
            world.bot_id, 4006
        )  # the voice session is gone: cordvoice rejoins
        await ready
        assert flags() == (True, True)

        await vc.move_to(world.channel(1), timeout=10)
        assert world.voice_state_channel() == world.channel_ids[1] and flags() == (True, True)
        await voice.close()


async def test_client_discordpy_after_gets_its_own_thread(discordpy_bot: DiscordpyBot) -> None:
    # discord.py's FAQ: after() blocks on run_coroutine_threadsafe(...).result(), and that coroutine often
    # uses run_in_executor(None, ...) (e.g. to look up the next song). after() must not take one of the
    # default executor's few threads, or a handful of guilds ending songs at once deadlock the bot.
    async with dpy_guild(discordpy_bot) as world:
        voice, _, vc = await world.connect_with_listener()
        loop = asyncio.get_running_loop()
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # as if the others were busy
        loop.set_default_executor(executor)
        finished = threading.Event()

        async def next_song() -> int:
            return await loop.run_in_executor(None, lambda: 1)

        def after(error: Exception | None) -> None:
            asyncio.run_coroutine_threadsafe(next_song(), loop).result(timeout=3)
            finished.set()

        vc.play(_OpusFrames(opus_frames(3)), after=after)
        await wait_until(finished.is_set)
        await voice.close()
