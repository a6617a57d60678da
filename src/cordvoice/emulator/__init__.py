"""A strict local emulator of Discord for tests and demos: main gateway, REST, voice servers and participants.

Start with :class:`Emulator`::

    async with Emulator() as emu:
        bot = emu.create_bot("my-bot")
        guild = emu.create_guild("test", members=[bot.user_id])
        channel = emu.create_voice_channel(guild.id)
        # point a client at emu.gateway_url / emu.api_base and log in with bot.token
        listener = await emu.add_participant(channel.id)   # hears the bot, DAVE-decrypted
"""

from __future__ import annotations

from cordvoice.emulator.inspection import ClientInspection, RtpStats, RtpSummary, SpeakingEvent
from cordvoice.emulator.main_gateway import (
    GatewayCloseCode,
    GatewayConnection,
    GatewaySession,
    MainGateway,
    MainGatewayStats,
    VoiceStateHook,
)
from cordvoice.emulator.participant import Participant, ParticipantStats, ReceivedFrame
from cordvoice.emulator.server import Emulator, VoiceServerFactory, VoiceServerHandle
from cordvoice.emulator.sfu import MediaEndpoint, MediaServer
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
from cordvoice.emulator.voice_protocol import VoiceServerConfig, VoiceServerStats
from cordvoice.emulator.voice_server import EmulatedVoiceServer

__all__ = [
    "Bot",
    "Channel",
    "ChannelType",
    "ClientInspection",
    "EmulatedVoiceServer",
    "Emulator",
    "EmulatorState",
    "GatewayCloseCode",
    "GatewayConnection",
    "GatewaySession",
    "Guild",
    "MainGateway",
    "MainGatewayStats",
    "MediaEndpoint",
    "MediaServer",
    "Participant",
    "ParticipantStats",
    "ReceivedFrame",
    "RtpStats",
    "RtpSummary",
    "SpeakingEvent",
    "TlsMaterial",
    "User",
    "VoiceChangeCause",
    "VoiceServer",
    "VoiceServerConfig",
    "VoiceServerFactory",
    "VoiceServerHandle",
    "VoiceServerStats",
    "VoiceSession",
    "VoiceState",
    "VoiceStateChange",
    "VoiceStateHook",
]
