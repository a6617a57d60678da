"""One bot in many guilds: concurrent joins, leaves and close() on one Voice and one gateway client, with the
emulator's gateway rate limit on (120 payloads a minute, closing with 4008 above it)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from cordvoice import JoinTimeoutError, ReadyEvent, SessionState, Voice
from cordvoice.emulator import Bot, Channel, Emulator, Guild
from cordvoice.gateway import Client
from cordvoice.gateway.client import _SendLimiter

from .conftest import FAST_RECONNECT


@dataclass
class ManyGuilds:
    emu: Emulator
    bot: Bot
    rooms: list[tuple[Guild, Channel]]
    client: Client
    voice: Voice

    def in_voice(self) -> list[int]:
        """Guilds where the emulator still has the bot in a voice channel."""
        state, user_id = self.emu.state, self.bot.user_id
        return [guild.id for guild, _ in self.rooms if state.voice_state(guild.id, user_id) is not None]


@contextlib.asynccontextmanager
async def many_guilds(count: int, *, send_limit: tuple[int, float] | None) -> AsyncIterator[ManyGuilds]:
    """A bot in ``count`` guilds (one voice channel each), logged in with ``send_limit``, and its Voice."""
    async with Emulator() as emu:
        bot = emu.create_bot("cordvoice-scale-test")
        rooms = []
        for index in range(count):
            guild = emu.create_guild(f"guild {index}", members=[bot.user_id])
            rooms.append((guild, emu.create_voice_channel(guild.id, "General")))
        client = Client(bot.token, gateway_url=emu.gateway_url, api_base=emu.api_base, send_limit=send_limit)
        async with client:
            voice = Voice(client, ssl=False, reconnect=FAST_RECONNECT, join_timeout=30.0)
            try:
                yield ManyGuilds(emu, bot, rooms, client, voice)
            finally:
                await voice.close()


async def test_close_leaves_every_channel_when_the_leaves_wait_for_the_send_limit() -> None:
    # Identify and two joins fill the client's send limit; the two leaves wait for slots (6 s), as a bot's
    # leaves do behind a minute of joins under Discord's 120/min. They used to give up after 5 s, leaving the
    # bot in the channels on Discord although close() had returned.
    async with many_guilds(2, send_limit=(3, 6.0)) as world:
        await asyncio.gather(*(world.voice.join_channel(g.id, c.id) for g, c in world.rooms))
        assert len(world.in_voice()) == 2
        async with asyncio.timeout(20):
            await world.voice.close()
        async with asyncio.timeout(5):
            while world.in_voice():
                await asyncio.sleep(0.01)
        assert world.client.stats.connects == 1, "no 4008 from the emulator's rate limit"


async def test_every_session_rejoins_when_the_rejoins_wait_for_the_send_limit() -> None:
    # After the main gateway loses its session, every voice session rejoins at once; beyond the send limit
    # their op 4s queue (a bot in more than ~110 voice channels under Discord's 120/min). rejoin_timeout
    # (3 s here) is for Discord's answer: it counted the queue, so the later sessions spent their rejoin
    # budget waiting for a slot and ended, and a retry's leave could go out without its join.
    async with many_guilds(4, send_limit=None) as world:
        sessions = await asyncio.gather(*(world.voice.join_channel(g.id, c.id) for g, c in world.rooms))
        world.client._limiter = _SendLimiter(1, 5.0)  # the new Identify, then one op 4 every 5 s
        ready = [asyncio.ensure_future(s.wait_for(ReadyEvent, timeout=40.0)) for s in sessions]
        gateway_session = world.client.session_id
        assert gateway_session is not None
        world.emu.main_gateway.invalidate_session(gateway_session, resumable=False)
        await asyncio.gather(*ready)
        assert all(session.state is SessionState.READY for session in sessions)
        assert len(world.in_voice()) == 4
        world.client._limiter = None  # the leaves on the way out need not wait 5 s each


async def test_a_join_whose_op4_waits_for_the_send_limit_times_out_saying_so() -> None:
    async with many_guilds(2, send_limit=(2, 30.0)) as world:  # Identify and the first join fill it
        (first, first_channel), (second, second_channel) = world.rooms
        await world.voice.join_channel(first.id, first_channel.id)
        started = asyncio.get_running_loop().time()
        with pytest.raises(JoinTimeoutError) as caught:
            await world.voice.join_channel(second.id, second_channel.id, timeout=0.5)
        # It used to blame the channel ("check that the channel exists, is not full..."), and then waited for
        # a leave's turn in the queue (Discord was never asked to join: nothing to leave).
        assert "was not sent yet" in str(caught.value), caught.value
        assert asyncio.get_running_loop().time() - started < 3.0
        assert world.in_voice() == [first.id]
        world.client._limiter = None  # the leave on the way out need not wait
