"""The main-gateway dispatches a voice connection depends on, parsed into frozen dataclasses (sans-IO).

VOICE_STATE_UPDATE carries the ``session_id`` for voice Identify and tells a bot it moved or was kicked;
VOICE_SERVER_UPDATE carries the voice token and the endpoint (``None`` while Discord reallocates the voice
server). GUILD_CREATE and CHANNEL_* feed the small guild cache of the standalone client.

Every parser takes the dispatch's ``d`` as decoded from JSON and raises only
:class:`~cordvoice.errors.ProtocolError` on bad input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cordvoice.errors import ProtocolError

__all__ = [
    "GuildSnapshot",
    "VoiceChannelInfo",
    "VoiceServerUpdate",
    "VoiceStateUpdate",
    "parse_channel",
    "parse_guild_create",
    "parse_snowflake",
    "parse_voice_server_update",
    "parse_voice_state_update",
]

_VOICE_CHANNEL_TYPES = frozenset({2, 13})  # GUILD_VOICE, GUILD_STAGE_VOICE
_STAGE_CHANNEL_TYPE = 13


def parse_snowflake(value: object, name: str) -> int:
    """A Discord id: a decimal string (or, leniently, an integer) in 1..2**64-1."""
    if isinstance(value, str) and value.isascii() and value.isdecimal() and len(value) <= 20:
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise ProtocolError(f"{name} is not a snowflake: {value!r:.40}")
    if not 0 < number < 1 << 64:
        raise ProtocolError(f"{name} is out of the snowflake range: {number}")
    return number


def _object(data: object, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ProtocolError(f"{what} payload is not an object")
    return data


def _optional_snowflake(data: dict[str, Any], name: str) -> int | None:
    value = data.get(name)
    return None if value is None else parse_snowflake(value, name)


def _flag(data: dict[str, Any], name: str) -> bool:
    value = data.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ProtocolError(f"{name} is not a boolean")
    return value


def _string(data: dict[str, Any], name: str, *, allow_empty: bool = False) -> str:
    value = data.get(name)
    if not isinstance(value, str) or (not value and not allow_empty):
        raise ProtocolError(f"{name} is missing or not a string")
    return value


@dataclass(frozen=True, slots=True)
class VoiceStateUpdate:
    """A user's voice state in a guild; ``channel_id is None`` means they left (or were kicked)."""

    guild_id: int
    channel_id: int | None
    user_id: int
    session_id: str = field(repr=False)
    """With the voice token, what Identify and Resume need (and the main gateway's session id): kept out of
    reprs and so out of logs, like the token."""
    self_mute: bool = False
    self_deaf: bool = False
    mute: bool = False
    deaf: bool = False
    suppress: bool = False
    self_video: bool = False
    self_stream: bool = False


@dataclass(frozen=True, slots=True)
class VoiceServerUpdate:
    """Where and with which token to open the voice WebSocket.

    ``endpoint`` is ``host[:port]`` (a leading ``wss://`` is stripped); ``None`` means the voice server went
    away and another VOICE_SERVER_UPDATE will follow: drop the voice connection and wait.
    """

    guild_id: int
    token: str = field(repr=False)
    endpoint: str | None

    def voice_gateway_url(self, *, version: int = 8, secure: bool = True) -> str:
        """The voice WebSocket URL, ``wss://endpoint/?v=8`` (``secure=False``: ``ws://``, for tests)."""
        if self.endpoint is None:
            raise ProtocolError("VOICE_SERVER_UPDATE has no endpoint yet: wait for the next one")
        return f"{'wss' if secure else 'ws'}://{self.endpoint}/?v={version}"


def parse_voice_state_update(data: object, *, guild_id: int | None = None) -> VoiceStateUpdate:
    """Parse VOICE_STATE_UPDATE's ``d`` (or a GUILD_CREATE voice state, passing the guild's ``guild_id``)."""
    payload = _object(data, "VOICE_STATE_UPDATE")
    parsed_guild = _optional_snowflake(payload, "guild_id")
    if parsed_guild is None:
        if guild_id is None:
            raise ProtocolError("voice state has no guild_id")
        parsed_guild = guild_id
    if "channel_id" not in payload:
        raise ProtocolError("voice state has no channel_id field")
    return VoiceStateUpdate(
        guild_id=parsed_guild,
        channel_id=_optional_snowflake(payload, "channel_id"),
        user_id=parse_snowflake(payload.get("user_id"), "user_id"),
        # Discord sends an empty session id in some "left voice" states; only a missing one is malformed.
        session_id=_string(payload, "session_id", allow_empty=True),
        self_mute=_flag(payload, "self_mute"),
        self_deaf=_flag(payload, "self_deaf"),
        mute=_flag(payload, "mute"),
        deaf=_flag(payload, "deaf"),
        suppress=_flag(payload, "suppress"),
        self_video=_flag(payload, "self_video"),
        self_stream=_flag(payload, "self_stream"),
    )


def parse_voice_server_update(data: object) -> VoiceServerUpdate:
    """Parse VOICE_SERVER_UPDATE's ``d``."""
    payload = _object(data, "VOICE_SERVER_UPDATE")
    raw_endpoint = payload.get("endpoint")
    endpoint: str | None
    if raw_endpoint is None:
        endpoint = None
    elif isinstance(raw_endpoint, str):
        endpoint = raw_endpoint.removeprefix("wss://").rstrip("/")
        if not endpoint or not endpoint.isascii() or any(c.isspace() or c in "/?#@" for c in endpoint):
            raise ProtocolError(f"VOICE_SERVER_UPDATE endpoint is not host[:port]: {raw_endpoint!r:.60}")
    else:
        raise ProtocolError("VOICE_SERVER_UPDATE endpoint is not a string or null")
    return VoiceServerUpdate(
        guild_id=parse_snowflake(payload.get("guild_id"), "guild_id"),
        token=_string(payload, "token"),
        endpoint=endpoint,
    )


@dataclass(frozen=True, slots=True)
class VoiceChannelInfo:
    """A voice or stage channel as the gateway described it."""

    id: int
    guild_id: int
    name: str
    type: int
    user_limit: int | None = None

    @property
    def is_stage(self) -> bool:
        return self.type == _STAGE_CHANNEL_TYPE


@dataclass(frozen=True, slots=True)
class GuildSnapshot:
    """The voice-relevant part of GUILD_CREATE."""

    id: int
    name: str
    voice_channels: tuple[VoiceChannelInfo, ...]
    voice_states: tuple[VoiceStateUpdate, ...]


def parse_channel(data: object, *, guild_id: int | None = None) -> VoiceChannelInfo | None:
    """Parse a channel object; ``None`` for channels that are not voice or stage channels."""
    payload = _object(data, "channel")
    kind = payload.get("type")
    if not isinstance(kind, int) or isinstance(kind, bool):
        raise ProtocolError("channel type is not an integer")
    channel_id = parse_snowflake(payload.get("id"), "id")
    if kind not in _VOICE_CHANNEL_TYPES:
        return None
    parsed_guild = _optional_snowflake(payload, "guild_id") or guild_id
    if parsed_guild is None:
        raise ProtocolError("voice channel has no guild_id")
    name = payload.get("name")
    limit = payload.get("user_limit", 0)
    if limit is None:
        limit = 0
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ProtocolError("channel user_limit is not a non-negative integer")
    return VoiceChannelInfo(
        id=channel_id,
        guild_id=parsed_guild,
        name=name if isinstance(name, str) else "",
        type=kind,
        user_limit=limit or None,
    )


def _list(payload: dict[str, Any], name: str) -> list[Any]:
    value = payload.get(name, [])
    if value is None:
        return []
    if not isinstance(value, list):
        raise ProtocolError(f"GUILD_CREATE {name} is not a list")
    return value


def parse_guild_create(data: object) -> GuildSnapshot:
    """Parse GUILD_CREATE's ``d``: the guild's voice channels and voice states."""
    payload = _object(data, "GUILD_CREATE")
    guild_id = parse_snowflake(payload.get("id"), "id")
    channels = []
    for raw in _list(payload, "channels"):
        channel = parse_channel(raw, guild_id=guild_id)
        if channel is not None:
            channels.append(channel)
    states = tuple(parse_voice_state_update(raw, guild_id=guild_id) for raw in _list(payload, "voice_states"))
    name = payload.get("name")
    return GuildSnapshot(
        id=guild_id,
        name=name if isinstance(name, str) else "",
        voice_channels=tuple(channels),
        voice_states=states,
    )
