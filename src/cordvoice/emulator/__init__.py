"""A strict local emulator of Discord for tests and demos: main gateway, REST and (soon) voice servers.

Start with :class:`Emulator`::

    async with Emulator() as emu:
        bot = emu.create_bot("my-bot")
        guild = emu.create_guild("test", members=[bot.user_id])
        channel = emu.create_voice_channel(guild.id)
        # point a client at emu.gateway_url / emu.api_base and log in with bot.token
"""

from __future__ import annotations

from cordvoice.emulator.main_gateway import (
    GatewayCloseCode,
    GatewayConnection,
    GatewaySession,
    MainGateway,
    MainGatewayStats,
    VoiceStateHook,
)
from cordvoice.emulator.server import Emulator, VoiceServerFactory, VoiceServerHandle
from cordvoice.emulator.state import (
    Bot,
    Channel,
    ChannelType,
    EmulatorState,
    Guild,
    User,
    VoiceChangeCause,
    VoiceServer,
    VoiceSession,
    VoiceState,
    VoiceStateChange,
)
from cordvoice.emulator.tls import TlsMaterial

__all__ = [
    "Bot",
    "Channel",
    "ChannelType",
    "Emulator",
    "EmulatorState",
    "GatewayCloseCode",
    "GatewayConnection",
    "GatewaySession",
    "Guild",
    "MainGateway",
    "MainGatewayStats",
    "TlsMaterial",
    "User",
    "VoiceChangeCause",
    "VoiceServer",
    "VoiceServerFactory",
    "VoiceServerHandle",
    "VoiceSession",
    "VoiceState",
    "VoiceStateChange",
    "VoiceStateHook",
]
