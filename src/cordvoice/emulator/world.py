"""A ready-made emulated world (bots, guilds, channels) and its description, for the CLI and pytest plugin.

:func:`populate` fills a started or unstarted :class:`~cordvoice.emulator.Emulator` with bots that are members
of every guild, and in each guild DAVE voice channels and stage channels. :func:`describe` turns a running
emulator into the plain JSON-able dictionary ``cordvoice emulate --json`` prints and ``GET /_emulator/info``
returns: where to connect, the tokens, and the ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cordvoice.emulator.state import Bot, Channel, Guild
from cordvoice.errors import EmulatorError

if TYPE_CHECKING:
    from cordvoice.emulator.server import Emulator

__all__ = ["GuildWorld", "World", "describe", "populate"]


@dataclass(frozen=True)
class GuildWorld:
    """One populated guild and its channels."""

    guild: Guild
    voice_channels: list[Channel] = field(default_factory=list)
    stage_channels: list[Channel] = field(default_factory=list)


@dataclass(frozen=True)
class World:
    """What :func:`populate` created, in creation order."""

    bots: list[Bot]
    guilds: list[GuildWorld]


def populate(
    emu: Emulator,
    *,
    guilds: int = 1,
    voice_channels: int = 1,
    stage_channels: int = 1,
    bots: int = 1,
) -> World:
    """Create ``bots`` bots and ``guilds`` guilds (every bot in every guild), each with its channels.

    Voice channels require DAVE (as on Discord since 2026-03-02); stage channels run DAVE version 0.
    """
    if min(guilds, voice_channels, stage_channels, bots) < 0 or guilds < 1 or bots < 1:
        raise EmulatorError("need at least one guild and one bot, and no negative counts")
    created_bots = [
        emu.create_bot("cordvoice-bot" if bots == 1 else f"cordvoice-bot-{n}") for n in range(1, bots + 1)
    ]
    member_ids = [bot.user_id for bot in created_bots]
    created: list[GuildWorld] = []
    for g in range(1, guilds + 1):
        guild = emu.create_guild(
            "cordvoice guild" if guilds == 1 else f"cordvoice guild {g}", members=member_ids
        )
        voice = [
            emu.create_voice_channel(guild.id, "General" if voice_channels == 1 else f"Voice {n}")
            for n in range(1, voice_channels + 1)
        ]
        stages = [
            emu.create_stage_channel(guild.id, "Stage" if stage_channels == 1 else f"Stage {n}")
            for n in range(1, stage_channels + 1)
        ]
        created.append(GuildWorld(guild, voice, stages))
    return World(created_bots, created)


def describe(emu: Emulator) -> dict[str, Any]:
    """Everything a client needs to connect to a running emulator, as JSON-able data (ids as strings)."""
    state = emu.state
    bots = [
        {"id": str(user.id), "name": user.name, "token": user.token}
        for user in state.users.values()
        if user.bot and user.token is not None
    ]
    guilds = []
    for guild in state.guilds.values():
        channels = list(guild.channels.values())
        guilds.append(
            {
                "id": str(guild.id),
                "name": guild.name,
                "voice_channels": [
                    {"id": str(c.id), "name": c.name, "dave_required": c.dave_required}
                    for c in channels
                    if not c.is_stage
                ],
                "stage_channels": [{"id": str(c.id), "name": c.name} for c in channels if c.is_stage],
            }
        )
    voice_servers = []
    for server_id, server in sorted(state.voice_servers.items()):
        entry: dict[str, Any] = {"id": server_id, "endpoint": server.endpoint}
        handle = emu.voice_server_handles.get(server_id)
        media = getattr(handle, "media", None)
        if media is not None and not media.closed:
            host, port = media.address
            entry["udp"] = f"{host}:{port}"
        voice_servers.append(entry)
    return {
        "gateway_url": emu.gateway_url,
        "api_base": emu.api_base,
        "tls": emu.tls is not None,
        "ca_file": None if emu.ca_file is None else str(emu.ca_file),
        "control_url": emu.control_url,
        "control_token": emu.control_token,
        "voice_servers": voice_servers,
        "bots": bots,
        "guilds": guilds,
    }
