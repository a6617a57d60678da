"""The main Discord gateway side of voice: events, the adapter protocol and a standalone client.

* :mod:`cordvoice.gateway.events`: VOICE_STATE_UPDATE / VOICE_SERVER_UPDATE (and GUILD_CREATE) parsing;
* :mod:`cordvoice.gateway.adapter`: :class:`VoiceAdapter` and :class:`VoiceEventListener`, the seam between
  cordvoice's ``Voice`` and whatever holds the bot's gateway connection;
* :mod:`cordvoice.gateway.client`: :class:`Client`, a standalone main-gateway client implementing the adapter.
  Its sans-IO core is :class:`~cordvoice.gateway.protocol.GatewayProtocol`.
"""

from __future__ import annotations

from cordvoice.gateway.adapter import VoiceAdapter, VoiceEventListener
from cordvoice.gateway.client import (
    DEFAULT_INTENTS,
    DISCORD_API_BASE,
    Client,
    GatewayClientStats,
    GuildInfo,
    Intents,
)
from cordvoice.gateway.events import (
    GuildSnapshot,
    VoiceChannelInfo,
    VoiceServerUpdate,
    VoiceStateUpdate,
    parse_voice_server_update,
    parse_voice_state_update,
)

__all__ = [
    "DEFAULT_INTENTS",
    "DISCORD_API_BASE",
    "Client",
    "GatewayClientStats",
    "GuildInfo",
    "GuildSnapshot",
    "Intents",
    "VoiceAdapter",
    "VoiceChannelInfo",
    "VoiceEventListener",
    "VoiceServerUpdate",
    "VoiceStateUpdate",
    "parse_voice_server_update",
    "parse_voice_state_update",
]
