"""The emulator's world: users, bots, guilds, voice channels, voice states and the voice-server directory.

Sans-IO: plain data plus methods that change it and return what changed. The asyncio shells (the main
gateway now, the voice servers later) turn a returned :class:`VoiceStateChange` into wire messages; nothing
here sends, awaits or reads a clock other than for snowflake timestamps.

Voice sessions are the link between the two gateways. When a member's voice state enters a channel (or
moves, or its old voice session was revoked), the state issues a :class:`VoiceSession`: a fresh token and the
endpoint of the voice server that currently serves the guild. The main gateway sends it as
VOICE_SERVER_UPDATE; a voice server checks a voice Identify against it with
:meth:`EmulatorState.lookup_voice_session`.

Every lookup by id raises :class:`~cordvoice.errors.EmulatorError` when the id is unknown, so a typo in a test
fails loudly instead of producing silence.
"""

from __future__ import annotations

import base64
import datetime
import enum
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from cordvoice.errors import EmulatorError

__all__ = [
    "DISCORD_EPOCH_MS",
    "Bot",
    "Channel",
    "ChannelType",
    "EmulatorState",
    "Guild",
    "Member",
    "SnowflakeGenerator",
    "User",
    "VoiceChangeCause",
    "VoiceServer",
    "VoiceSession",
    "VoiceState",
    "VoiceStateChange",
]

DISCORD_EPOCH_MS = 1_420_070_400_000
"""Milliseconds from the Unix epoch to 2015-01-01, the zero of Discord snowflakes."""

_SNOWFLAKE_INCREMENT_BITS = 12

# The permissions @everyone gets in an emulated guild: view, send, connect, speak, voice activity, stream,
# request to speak. Enough for any voice bot; the emulator does not enforce permissions.
_EVERYONE_PERMISSIONS = (1 << 10) | (1 << 11) | (1 << 20) | (1 << 21) | (1 << 25) | (1 << 9) | (1 << 32)


class SnowflakeGenerator:
    """Makes strictly increasing Discord-style snowflakes (timestamp, worker, process, increment).

    Realistic ids matter: libraries derive creation times from them and some sort by them.
    """

    def __init__(
        self, *, worker_id: int = 1, process_id: int = 0, clock: Callable[[], float] = time.time
    ) -> None:
        if not 0 <= worker_id < 32 or not 0 <= process_id < 32:
            raise EmulatorError("snowflake worker_id and process_id must be in 0..31")
        self._clock = clock
        self._prefix = (worker_id << 17) | (process_id << 12)
        self._last_ms = 0
        self._increment = 0

    def next(self) -> int:
        """Return a new id, greater than every id returned before."""
        ms = max(int(self._clock() * 1000) - DISCORD_EPOCH_MS, self._last_ms)
        if ms == self._last_ms:
            self._increment += 1
            if self._increment >= 1 << _SNOWFLAKE_INCREMENT_BITS:
                ms += 1
                self._increment = 0
        else:
            self._increment = 0
        self._last_ms = ms
        return (ms << 22) | self._prefix | self._increment


def _iso_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def _make_bot_token(user_id: int) -> str:
    """A token shaped like Discord's: base64(user id) . base64(timestamp) . random HMAC-like part."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    return ".".join(
        (
            b64(str(user_id).encode("ascii")),
            b64(int(time.time()).to_bytes(4, "big")),
            b64(secrets.token_bytes(27)),
        )
    )


class ChannelType(enum.IntEnum):
    """Discord channel types the emulator models (the voice-capable ones)."""

    GUILD_VOICE = 2
    GUILD_STAGE_VOICE = 13


class VoiceChangeCause(enum.Enum):
    """Why a voice state or voice session changed; the voice side picks its close code from it."""

    GATEWAY_REQUEST = "gateway_request"  # the member sent op 4 on the main gateway
    API = "api"  # the emulator's Python API (simulated participants, tests)
    KICK = "kick"  # a moderator disconnected the member
    SERVER_FLAGS = "server_flags"  # server mute/deaf/suppress changed
    CHANNEL_DELETED = "channel_deleted"
    GATEWAY_SESSION_ENDED = "gateway_session_ended"  # the member's main-gateway session is gone
    SERVER_MOVE = "server_move"  # the guild moved to another voice server


@dataclass
class User:
    """A Discord user: a bot (with a token) or a simulated human participant (without one)."""

    id: int
    name: str
    bot: bool
    token: str | None = field(default=None, repr=False)

    def to_payload(self) -> dict[str, Any]:
        """The user object as Discord sends it."""
        return {
            "id": str(self.id),
            "username": self.name,
            "discriminator": "0",
            "global_name": None if self.bot else self.name,
            "avatar": None,
            "bot": self.bot,
            "system": False,
            "mfa_enabled": False,
            "verified": True,
            "flags": 0,
            "public_flags": 0,
        }


@dataclass(frozen=True)
class Bot:
    """What a test needs to log a bot in: its token and user id (also its application id)."""

    user_id: int
    name: str
    token: str = field(repr=False)

    @property
    def application_id(self) -> int:
        return self.user_id


@dataclass
class Channel:
    """A voice or stage channel.

    ``dave_required``: the voice server refuses clients without DAVE (close 4017). Stage channels run DAVE
    protocol version 0 (no end-to-end encryption), as Discord does.
    """

    id: int
    guild_id: int
    name: str
    type: ChannelType
    position: int
    user_limit: int | None = None
    bitrate: int = 64_000
    dave_required: bool = True

    @property
    def is_stage(self) -> bool:
        return self.type is ChannelType.GUILD_STAGE_VOICE

    @property
    def dave_protocol_version(self) -> int:
        """The DAVE version the channel's voice server announces (0 = transport encryption only)."""
        return 0 if self.is_stage else 1

    def to_payload(self) -> dict[str, Any]:
        """The channel object as Discord sends it in GUILD_CREATE and CHANNEL_* dispatches."""
        return {
            "id": str(self.id),
            "type": int(self.type),
            "guild_id": str(self.guild_id),
            "name": self.name,
            "position": self.position,
            "permission_overwrites": [],
            "bitrate": self.bitrate,
            "user_limit": self.user_limit or 0,
            "rtc_region": None,
            "video_quality_mode": 1,
            "nsfw": False,
            "parent_id": None,
            "rate_limit_per_user": 0,
            "last_message_id": None,
            "flags": 0,
        }


@dataclass
class Member:
    """A user's membership of a guild, with the server-side voice flags a moderator controls."""

    user_id: int
    joined_at: str
    mute: bool = False
    deaf: bool = False


@dataclass(frozen=True)
class VoiceState:
    """A member connected to a voice channel. Leaving removes the state; there is no channel-less state."""

    guild_id: int
    user_id: int
    channel_id: int
    session_id: str
    self_mute: bool = False
    self_deaf: bool = False
    mute: bool = False
    deaf: bool = False
    suppress: bool = False
    self_video: bool = False
    self_stream: bool = False


@dataclass(frozen=True)
class VoiceSession:
    """The credentials of one voice connection: what VOICE_SERVER_UPDATE carries and voice Identify proves."""

    guild_id: int
    user_id: int
    channel_id: int
    session_id: str
    token: str = field(repr=False)
    voice_server_id: int
    endpoint: str

    @property
    def server_id(self) -> int:
        """The voice Identify's ``server_id``: the guild id for guild channels."""
        return self.guild_id


@dataclass
class VoiceServer:
    """A registered voice server (voice gateway + UDP media) and the endpoint clients dial."""

    id: int
    endpoint: str


@dataclass(frozen=True)
class VoiceStateChange:
    """One change to a member's voice presence, for the shells to turn into messages.

    ``before``/``after`` are the voice states (``None`` = not in voice). ``issued`` is a new voice session to
    announce with VOICE_SERVER_UPDATE; ``revoked`` is the voice session that stopped being valid (its voice
    connection must end). A server move has ``before == after`` and both sessions set.
    """

    guild_id: int
    user_id: int
    before: VoiceState | None
    after: VoiceState | None
    cause: VoiceChangeCause
    issued: VoiceSession | None = None
    revoked: VoiceSession | None = None

    @property
    def left(self) -> bool:
        return self.before is not None and self.after is None

    @property
    def joined(self) -> bool:
        return self.before is None and self.after is not None

    @property
    def moved(self) -> bool:
        return (
            self.before is not None
            and self.after is not None
            and self.before.channel_id != self.after.channel_id
        )


@dataclass
class Guild:
    """A guild with its members, voice channels, voice states and assigned voice server."""

    id: int
    name: str
    owner_id: int | None
    created_at: str
    members: dict[int, Member] = field(default_factory=dict)
    channels: dict[int, Channel] = field(default_factory=dict)
    voice_states: dict[int, VoiceState] = field(default_factory=dict)
    voice_server_id: int | None = None

    def everyone_role_payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": "@everyone",
            "permissions": str(_EVERYONE_PERMISSIONS),
            "position": 0,
            "color": 0,
            "hoist": False,
            "managed": False,
            "mentionable": False,
            "icon": None,
            "unicode_emoji": None,
            "flags": 0,
        }


class EmulatorState:
    """Everything the emulated Discord knows, with validated, change-returning mutators."""

    def __init__(self, *, snowflakes: SnowflakeGenerator | None = None) -> None:
        self._ids = snowflakes or SnowflakeGenerator()
        self.users: dict[int, User] = {}
        self.guilds: dict[int, Guild] = {}
        self.voice_servers: dict[int, VoiceServer] = {}
        self._channel_guild: dict[int, int] = {}
        self._tokens: dict[str, int] = {}
        # (guild_id, user_id) -> the member's current voice session; absent once revoked or left.
        self._voice_sessions: dict[tuple[int, int], VoiceSession] = {}
        self._next_voice_server_id = 1

    def new_id(self) -> int:
        """A fresh snowflake from the emulator's generator."""
        return self._ids.next()

    # ---- users and bots -------------------------------------------------------------------------------

    def create_user(self, name: str, *, bot: bool = False) -> User:
        """A user (a simulated participant unless ``bot``); bots also get a token."""
        if not name:
            raise EmulatorError("a user needs a non-empty name")
        user = User(id=self.new_id(), name=name, bot=bot)
        if bot:
            user.token = _make_bot_token(user.id)
            self._tokens[user.token] = user.id
        self.users[user.id] = user
        return user

    def create_bot(self, name: str) -> Bot:
        """A bot user with a token that the main gateway and REST accept."""
        user = self.create_user(name, bot=True)
        assert user.token is not None
        return Bot(user_id=user.id, name=user.name, token=user.token)

    def user(self, user_id: int) -> User:
        try:
            return self.users[user_id]
        except KeyError:
            raise EmulatorError(f"unknown user id {user_id}") from None

    def user_for_token(self, token: str) -> User | None:
        """The bot owning ``token``, or ``None`` for a wrong token (the caller answers 401 / 4004)."""
        user_id = self._tokens.get(token)
        return None if user_id is None else self.users[user_id]

    # ---- guilds and channels --------------------------------------------------------------------------

    def create_guild(self, name: str, *, owner_id: int | None = None, members: Iterable[int] = ()) -> Guild:
        """A guild; ``members`` (user ids) join it at once, the owner too."""
        if not name:
            raise EmulatorError("a guild needs a non-empty name")
        member_ids = list(members)
        if owner_id is not None:
            member_ids.insert(0, owner_id)
        for user_id in member_ids:
            self.user(user_id)
        guild = Guild(id=self.new_id(), name=name, owner_id=owner_id, created_at=_iso_now())
        self.guilds[guild.id] = guild
        for user_id in member_ids:
            self.add_member(guild.id, user_id)
        return guild

    def guild(self, guild_id: int) -> Guild:
        try:
            return self.guilds[guild_id]
        except KeyError:
            raise EmulatorError(f"unknown guild id {guild_id}") from None

    def add_member(self, guild_id: int, user_id: int) -> bool:
        """Make ``user_id`` a member of the guild; returns False when it already was."""
        guild = self.guild(guild_id)
        self.user(user_id)
        if user_id in guild.members:
            return False
        guild.members[user_id] = Member(user_id=user_id, joined_at=_iso_now())
        return True

    def member(self, guild_id: int, user_id: int) -> Member:
        guild = self.guild(guild_id)
        try:
            return guild.members[user_id]
        except KeyError:
            raise EmulatorError(f"user {user_id} is not a member of guild {guild_id}") from None

    def guilds_of(self, user_id: int) -> list[Guild]:
        """The guilds ``user_id`` is a member of, oldest first."""
        return [guild for guild in self.guilds.values() if user_id in guild.members]

    def create_channel(
        self,
        guild_id: int,
        name: str,
        channel_type: ChannelType,
        *,
        user_limit: int | None = None,
        dave_required: bool | None = None,
        bitrate: int = 64_000,
    ) -> Channel:
        """A voice or stage channel. DAVE is required by default on voice channels and never on stages."""
        guild = self.guild(guild_id)
        if not name:
            raise EmulatorError("a channel needs a non-empty name")
        if user_limit is not None and not 0 < user_limit <= 99:
            raise EmulatorError("user_limit must be in 1..99 (or None for no limit)")
        if dave_required is None:
            dave_required = channel_type is ChannelType.GUILD_VOICE
        if dave_required and channel_type is ChannelType.GUILD_STAGE_VOICE:
            raise EmulatorError("stage channels run DAVE version 0; they cannot require DAVE")
        channel = Channel(
            id=self.new_id(),
            guild_id=guild_id,
            name=name,
            type=channel_type,
            position=len(guild.channels),
            user_limit=user_limit,
            bitrate=bitrate,
            dave_required=dave_required,
        )
        guild.channels[channel.id] = channel
        self._channel_guild[channel.id] = guild_id
        return channel

    def channel(self, channel_id: int) -> Channel:
        try:
            guild_id = self._channel_guild[channel_id]
        except KeyError:
            raise EmulatorError(f"unknown channel id {channel_id}") from None
        return self.guilds[guild_id].channels[channel_id]

    def delete_channel(self, channel_id: int) -> tuple[Channel, list[VoiceStateChange]]:
        """Remove a channel; everyone in it leaves voice (cause CHANNEL_DELETED)."""
        channel = self.channel(channel_id)
        guild = self.guilds[channel.guild_id]
        changes = [
            self._remove_voice_state(guild, state.user_id, VoiceChangeCause.CHANNEL_DELETED)
            for state in self.voice_states_in(channel_id)
        ]
        del guild.channels[channel_id]
        del self._channel_guild[channel_id]
        return channel, changes

    def voice_states_in(self, channel_id: int) -> list[VoiceState]:
        """Who is connected to a channel, in join order."""
        channel = self.channel(channel_id)
        guild = self.guilds[channel.guild_id]
        return [state for state in guild.voice_states.values() if state.channel_id == channel_id]

    # ---- voice servers --------------------------------------------------------------------------------

    def reserve_voice_server_id(self) -> int:
        """An id for a voice server about to start (it needs its id before it knows its endpoint)."""
        server_id = self._next_voice_server_id
        self._next_voice_server_id += 1
        return server_id

    def register_voice_server(self, endpoint: str, *, server_id: int | None = None) -> VoiceServer:
        """Make a running voice server (``host:port``) available for new voice sessions."""
        if not endpoint or "://" in endpoint:
            raise EmulatorError("a voice server endpoint is host:port, without a scheme")
        if server_id is None:
            server_id = self.reserve_voice_server_id()
        elif server_id in self.voice_servers or not 0 < server_id < self._next_voice_server_id:
            raise EmulatorError(f"voice server id {server_id} was not reserved or is already registered")
        server = VoiceServer(id=server_id, endpoint=endpoint)
        self.voice_servers[server.id] = server
        return server

    def voice_server(self, server_id: int) -> VoiceServer:
        try:
            return self.voice_servers[server_id]
        except KeyError:
            raise EmulatorError(f"unknown voice server id {server_id}") from None

    def unregister_voice_server(self, server_id: int) -> None:
        """Forget a voice server; refused while a guild or a voice session still uses it."""
        self.voice_server(server_id)
        if any(guild.voice_server_id == server_id for guild in self.guilds.values()):
            raise EmulatorError(f"voice server {server_id} still serves a guild; move the guild first")
        del self.voice_servers[server_id]

    def guild_voice_server(self, guild_id: int) -> VoiceServer:
        """The voice server serving the guild, assigning the least-loaded one on first use."""
        guild = self.guild(guild_id)
        if guild.voice_server_id is None:
            if not self.voice_servers:
                raise EmulatorError("no voice server is registered: cannot place a voice session")
            load = dict.fromkeys(self.voice_servers, 0)
            for other in self.guilds.values():
                if other.voice_server_id is not None:
                    load[other.voice_server_id] += 1
            guild.voice_server_id = min(load, key=lambda server_id: (load[server_id], server_id))
        return self.voice_servers[guild.voice_server_id]

    def move_guild(self, guild_id: int, server_id: int) -> list[VoiceStateChange]:
        """Reassign the guild to another voice server: every voice session is revoked and reissued there."""
        guild = self.guild(guild_id)
        self.voice_server(server_id)
        guild.voice_server_id = server_id
        changes = []
        for state in guild.voice_states.values():
            revoked = self._voice_sessions.pop((guild_id, state.user_id), None)
            issued = self._issue_voice_session(guild, state)
            changes.append(
                VoiceStateChange(
                    guild_id, state.user_id, state, state, VoiceChangeCause.SERVER_MOVE, issued, revoked
                )
            )
        return changes

    # ---- voice states and sessions ----------------------------------------------------------------------

    def voice_state(self, guild_id: int, user_id: int) -> VoiceState | None:
        return self.guild(guild_id).voice_states.get(user_id)

    def channel_is_full(self, channel_id: int, user_id: int) -> bool:
        """True when joining would exceed the user limit (a member already inside never counts as new)."""
        channel = self.channel(channel_id)
        if channel.user_limit is None:
            return False
        inside = self.voice_states_in(channel_id)
        return all(state.user_id != user_id for state in inside) and len(inside) >= channel.user_limit

    def update_voice_state(
        self,
        guild_id: int,
        user_id: int,
        channel_id: int | None,
        *,
        session_id: str,
        self_mute: bool = False,
        self_deaf: bool = False,
        self_video: bool = False,
        cause: VoiceChangeCause = VoiceChangeCause.API,
    ) -> VoiceStateChange | None:
        """Join, move, leave or update flags, as op 4 does; ``None`` when leaving while not in voice.

        A new voice session (token) is issued when the channel changes, when the gateway session changes, or
        when the previous voice session was revoked; a flags-only update keeps the current one.
        """
        guild = self.guild(guild_id)
        member = self.member(guild_id, user_id)
        if channel_id is None:
            if user_id not in guild.voice_states:
                return None
            return self._remove_voice_state(guild, user_id, cause)
        channel = self.channel(channel_id)
        if channel.guild_id != guild_id:
            raise EmulatorError(f"channel {channel_id} is not in guild {guild_id}")
        if self.channel_is_full(channel_id, user_id):
            raise EmulatorError(f"channel {channel_id} is full ({channel.user_limit} users)")
        if not session_id:
            raise EmulatorError("a voice state needs a session id")
        before = guild.voice_states.get(user_id)
        after = VoiceState(
            guild_id=guild_id,
            user_id=user_id,
            channel_id=channel_id,
            session_id=session_id,
            self_mute=self_mute,
            self_deaf=self_deaf,
            mute=member.mute,
            deaf=member.deaf,
            suppress=channel.is_stage
            if before is None or before.channel_id != channel_id
            else before.suppress,
            self_video=self_video,
        )
        guild.voice_states[user_id] = after
        current = self._voice_sessions.get((guild_id, user_id))
        keep_session = (
            before is not None
            and current is not None
            and before.channel_id == channel_id
            and before.session_id == session_id
        )
        if keep_session:
            return VoiceStateChange(guild_id, user_id, before, after, cause)
        revoked = self._voice_sessions.pop((guild_id, user_id), None)
        issued = self._issue_voice_session(guild, after)
        return VoiceStateChange(guild_id, user_id, before, after, cause, issued, revoked)

    def set_server_voice_flags(
        self,
        guild_id: int,
        user_id: int,
        *,
        mute: bool | None = None,
        deaf: bool | None = None,
        suppress: bool | None = None,
    ) -> VoiceStateChange | None:
        """Server mute/deafen a member (kept across joins) or (un)suppress them on a stage.

        Returns the change to announce, or ``None`` when the member is not in voice.
        """
        guild = self.guild(guild_id)
        member = self.member(guild_id, user_id)
        if mute is not None:
            member.mute = mute
        if deaf is not None:
            member.deaf = deaf
        before = guild.voice_states.get(user_id)
        if before is None:
            return None
        after = replace(
            before,
            mute=member.mute,
            deaf=member.deaf,
            suppress=before.suppress if suppress is None else suppress,
        )
        guild.voice_states[user_id] = after
        return VoiceStateChange(guild_id, user_id, before, after, VoiceChangeCause.SERVER_FLAGS)

    def disconnect_member(
        self, guild_id: int, user_id: int, *, cause: VoiceChangeCause
    ) -> VoiceStateChange | None:
        """Take a member out of voice (a kick, for instance); ``None`` when they were not in voice."""
        guild = self.guild(guild_id)
        self.member(guild_id, user_id)
        if user_id not in guild.voice_states:
            return None
        return self._remove_voice_state(guild, user_id, cause)

    def end_gateway_session(self, session_id: str) -> list[VoiceStateChange]:
        """A main-gateway session ended: every voice state that belonged to it goes away."""
        changes: list[VoiceStateChange] = []
        for guild in self.guilds.values():
            owned = [state.user_id for state in guild.voice_states.values() if state.session_id == session_id]
            changes.extend(
                self._remove_voice_state(guild, user_id, VoiceChangeCause.GATEWAY_SESSION_ENDED)
                for user_id in owned
            )
        return changes

    def revoke_voice_session(self, guild_id: int, user_id: int) -> VoiceSession | None:
        """Invalidate a member's voice session (e.g. after the voice server answered 4006).

        The voice state stays; the member's next op 4 for the same channel then gets a new token.
        """
        self.member(guild_id, user_id)
        return self._voice_sessions.pop((guild_id, user_id), None)

    def voice_session(self, guild_id: int, user_id: int) -> VoiceSession | None:
        """The member's current voice session, if any."""
        self.member(guild_id, user_id)
        return self._voice_sessions.get((guild_id, user_id))

    def voice_sessions_on(self, voice_server_id: int) -> list[VoiceSession]:
        """Every current voice session placed on one voice server."""
        return [s for s in self._voice_sessions.values() if s.voice_server_id == voice_server_id]

    def lookup_voice_session(
        self, server_id: int, user_id: int, session_id: str, token: str
    ) -> VoiceSession | None:
        """Check a voice Identify/Resume: the current session matching all four values, else ``None``.

        Never raises on unknown values: they come from the network, and the voice server answers them with a
        close code (4004 authentication failed, 4006 session no longer valid).
        """
        session = self._voice_sessions.get((server_id, user_id))
        if session is None or session.session_id != session_id:
            return None
        if not secrets.compare_digest(session.token.encode(), token.encode("utf-8", "replace")):
            return None
        return session

    def _issue_voice_session(self, guild: Guild, state: VoiceState) -> VoiceSession:
        server = self.guild_voice_server(guild.id)
        session = VoiceSession(
            guild_id=guild.id,
            user_id=state.user_id,
            channel_id=state.channel_id,
            session_id=state.session_id,
            token=secrets.token_hex(8),
            voice_server_id=server.id,
            endpoint=server.endpoint,
        )
        self._voice_sessions[(guild.id, state.user_id)] = session
        return session

    def _remove_voice_state(self, guild: Guild, user_id: int, cause: VoiceChangeCause) -> VoiceStateChange:
        before = guild.voice_states.pop(user_id)
        revoked = self._voice_sessions.pop((guild.id, user_id), None)
        return VoiceStateChange(guild.id, user_id, before, None, cause, None, revoked)

    # ---- wire forms shared by the gateway and REST --------------------------------------------------------

    def member_payload(self, guild_id: int, user_id: int) -> dict[str, Any]:
        """The guild member object as Discord sends it (GUILD_CREATE members, VOICE_STATE_UPDATE member)."""
        member = self.member(guild_id, user_id)
        return {
            "user": self.user(user_id).to_payload(),
            "nick": None,
            "avatar": None,
            "roles": [],
            "joined_at": member.joined_at,
            "premium_since": None,
            "deaf": member.deaf,
            "mute": member.mute,
            "flags": 0,
            "pending": False,
            "communication_disabled_until": None,
        }

    def voice_state_payload(
        self, guild_id: int, user_id: int, state: VoiceState | None, *, with_guild: bool = True
    ) -> dict[str, Any]:
        """VOICE_STATE_UPDATE's payload; ``state=None`` is the "left voice" form with a null channel.

        Without ``with_guild`` it is the GUILD_CREATE form: no ``guild_id`` and no ``member`` (members are
        listed beside it).
        """
        member = self.member(guild_id, user_id)
        payload: dict[str, Any] = {
            "channel_id": None if state is None else str(state.channel_id),
            "user_id": str(user_id),
            "session_id": "" if state is None else state.session_id,
            "deaf": member.deaf if state is None else state.deaf,
            "mute": member.mute if state is None else state.mute,
            "self_deaf": False if state is None else state.self_deaf,
            "self_mute": False if state is None else state.self_mute,
            "self_video": False if state is None else state.self_video,
            "suppress": False if state is None else state.suppress,
            "request_to_speak_timestamp": None,
        }
        if state is not None and state.self_stream:
            payload["self_stream"] = True
        if with_guild:
            payload["guild_id"] = str(guild_id)
            payload["member"] = self.member_payload(guild_id, user_id)
        return payload

    def guild_payload(self, guild_id: int, *, for_user: int, with_voice_states: bool) -> dict[str, Any]:
        """GUILD_CREATE's payload as ``for_user`` sees it.

        Members: the receiver and everyone in voice (what Discord sends without the members intent).
        Voice states only when the receiver has the GUILD_VOICE_STATES intent.
        """
        guild = self.guild(guild_id)
        member_ids = [for_user] + [uid for uid in guild.voice_states if uid != for_user]
        payload: dict[str, Any] = {
            "id": str(guild.id),
            "name": guild.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": str(guild.owner_id or for_user),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "premium_progress_bar_enabled": False,
            "preferred_locale": "en-US",
            "features": [],
            "roles": [guild.everyone_role_payload()],
            "emojis": [],
            "stickers": [],
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "safety_alerts_channel_id": None,
            "vanity_url_code": None,
            "application_id": None,
            "max_members": 500_000,
            "max_video_channel_users": 25,
            "joined_at": guild.members[for_user].joined_at,
            "large": False,
            "unavailable": False,
            "member_count": len(guild.members),
            "members": [self.member_payload(guild_id, uid) for uid in member_ids],
            "channels": [channel.to_payload() for channel in guild.channels.values()],
            "threads": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }
        if with_voice_states:
            payload["voice_states"] = [
                self.voice_state_payload(guild_id, state.user_id, state, with_guild=False)
                for state in guild.voice_states.values()
            ]
        return payload
