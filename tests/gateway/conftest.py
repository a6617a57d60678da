"""Fixtures for the main-gateway tests: an emulator with one bot, one guild and a voice channel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from cordvoice.emulator import Bot, Channel, Emulator, Guild
from cordvoice.gateway import VoiceServerUpdate, VoiceStateUpdate


@dataclass
class World:
    emu: Emulator
    bot: Bot
    guild: Guild
    channel: Channel
    other_channel: Channel


def build_world(emu: Emulator) -> World:
    bot = emu.create_bot("cordvoice-test-bot")
    guild = emu.create_guild("test guild", members=[bot.user_id])
    channel = emu.create_voice_channel(guild.id, "General")
    other = emu.create_voice_channel(guild.id, "Other")
    return World(emu, bot, guild, channel, other)


@pytest.fixture
async def world() -> AsyncIterator[World]:
    async with Emulator() as emu:
        yield build_world(emu)


class Recorder:
    """A VoiceEventListener that queues everything it hears, for tests to await."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[VoiceStateUpdate | VoiceServerUpdate | str] = asyncio.Queue()
        self.sessions_lost = 0

    def on_voice_state_update(self, event: VoiceStateUpdate) -> None:
        self.events.put_nowait(event)

    def on_voice_server_update(self, event: VoiceServerUpdate) -> None:
        self.events.put_nowait(event)

    def on_gateway_session_lost(self) -> None:
        self.sessions_lost += 1
        self.events.put_nowait("session_lost")

    async def next(self) -> VoiceStateUpdate | VoiceServerUpdate | str:
        async with asyncio.timeout(5.0):
            return await self.events.get()

    async def pair(self) -> tuple[VoiceStateUpdate, VoiceServerUpdate]:
        """The next VOICE_STATE_UPDATE and VOICE_SERVER_UPDATE, in whichever order they come."""
        first, second = await self.next(), await self.next()
        states = [e for e in (first, second) if isinstance(e, VoiceStateUpdate)]
        servers = [e for e in (first, second) if isinstance(e, VoiceServerUpdate)]
        assert len(states) == 1 and len(servers) == 1, (first, second)
        return states[0], servers[0]
