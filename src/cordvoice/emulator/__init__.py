"""A strict local emulator of Discord for tests and demos: main gateway, REST, voice servers and participants.

Start with :class:`Emulator`::

    async with Emulator() as emu:
        bot = emu.create_bot("my-bot")
        guild = emu.create_guild("test", members=[bot.user_id])
        channel = emu.create_voice_channel(guild.id)
        # point a client at emu.gateway_url / emu.api_base and log in with bot.token
        listener = await emu.add_participant(channel.id)   # hears the bot, DAVE-decrypted
        await emu.faults.close_client(bot.user_id, 4015)     # and make it suffer

Names are imported on first use (PEP 562), so ``import cordvoice.emulator`` (the pytest plugin does) stays
cheap until a test touches the emulator.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cordvoice.emulator.faults import Faults, Impairment, ImpairmentConfig
    from cordvoice.emulator.fixture import DiscordEmulator
    from cordvoice.emulator.inspection import ClientInspection, RtpStats, RtpSummary, SpeakingEvent
    from cordvoice.emulator.main_gateway_protocol import (
        GatewayCloseCode,
        GatewayConnection,
        GatewaySession,
        MainGatewayStats,
        VoiceStateHook,
    )
    from cordvoice.emulator.main_gateway_server import MainGateway
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

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "Bot": "cordvoice.emulator.state",
    "Channel": "cordvoice.emulator.state",
    "ChannelType": "cordvoice.emulator.state",
    "ClientInspection": "cordvoice.emulator.inspection",
    "DiscordEmulator": "cordvoice.emulator.fixture",
    "EmulatedVoiceServer": "cordvoice.emulator.voice_server",
    "Emulator": "cordvoice.emulator.server",
    "EmulatorState": "cordvoice.emulator.state",
    "Faults": "cordvoice.emulator.faults",
    "GatewayCloseCode": "cordvoice.emulator.main_gateway_protocol",
    "GatewayConnection": "cordvoice.emulator.main_gateway_protocol",
    "GatewaySession": "cordvoice.emulator.main_gateway_protocol",
    "Guild": "cordvoice.emulator.state",
    "Impairment": "cordvoice.emulator.faults",
    "ImpairmentConfig": "cordvoice.emulator.faults",
    "MainGateway": "cordvoice.emulator.main_gateway_server",
    "MainGatewayStats": "cordvoice.emulator.main_gateway_protocol",
    "MediaEndpoint": "cordvoice.emulator.sfu",
    "MediaServer": "cordvoice.emulator.sfu",
    "Participant": "cordvoice.emulator.participant",
    "ParticipantStats": "cordvoice.emulator.participant",
    "ReceivedFrame": "cordvoice.emulator.participant",
    "RtpStats": "cordvoice.emulator.inspection",
    "RtpSummary": "cordvoice.emulator.inspection",
    "SpeakingEvent": "cordvoice.emulator.inspection",
    "TlsMaterial": "cordvoice.emulator.tls",
    "User": "cordvoice.emulator.state",
    "VoiceChangeCause": "cordvoice.emulator.state",
    "VoiceServer": "cordvoice.emulator.state",
    "VoiceServerConfig": "cordvoice.emulator.voice_protocol",
    "VoiceServerFactory": "cordvoice.emulator.server",
    "VoiceServerHandle": "cordvoice.emulator.server",
    "VoiceServerStats": "cordvoice.emulator.voice_protocol",
    "VoiceSession": "cordvoice.emulator.state",
    "VoiceState": "cordvoice.emulator.state",
    "VoiceStateChange": "cordvoice.emulator.state",
    "VoiceStateHook": "cordvoice.emulator.main_gateway_protocol",
}

__all__ = [
    "Bot",
    "Channel",
    "ChannelType",
    "ClientInspection",
    "DiscordEmulator",
    "EmulatedVoiceServer",
    "Emulator",
    "EmulatorState",
    "Faults",
    "GatewayCloseCode",
    "GatewayConnection",
    "GatewaySession",
    "Guild",
    "Impairment",
    "ImpairmentConfig",
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # Not cached in globals(): importlib's sys.modules lookup is cheap, and a fresh lookup stays right when a
    # test harness (pytester) drops and re-imports modules.
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
