"""The emulator's main Discord gateway, sans-IO: the v10 JSON subset a voice bot needs.

Hello, Identify, Ready and GUILD_CREATE, heartbeats, Resume with replay, Invalid Session, op 4 voice requests
answered with VOICE_STATE_UPDATE and VOICE_SERVER_UPDATE, and the documented close codes for client mistakes.

* :class:`GatewayHub` holds every session and fans world changes out to them.
* :class:`GatewayConnection` is one socket's protocol state.

Both take decoded input and the current time and push payloads into an :class:`Outbox`; they never await.
The asyncio shell that owns the sockets is :mod:`cordvoice.emulator.main_gateway_server`.

Sessions outlive their sockets for ``resume_timeout`` seconds (or until the client closes with 1000/1001) and
keep the last ``replay_limit`` dispatches so that Resume replays what the client missed. When a session ends,
the voice states it owned end too (the voice side sees cause ``GATEWAY_SESSION_ENDED``).
"""

from __future__ import annotations

import enum
import json
import logging
import secrets
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from cordvoice.emulator.state import EmulatorState, VoiceChangeCause, VoiceSession, VoiceStateChange
from cordvoice.errors import ProtocolError
from cordvoice.gateway.events import parse_snowflake

__all__ = [
    "SUPPORTED_API_VERSIONS",
    "GatewayCloseCode",
    "GatewayConnection",
    "GatewayHub",
    "GatewayOp",
    "GatewaySession",
    "Intent",
    "MainGatewayStats",
    "Outbox",
    "VoiceStateHook",
]

logger = logging.getLogger(__name__)


class GatewayOp(enum.IntEnum):
    """Main gateway opcodes."""

    DISPATCH = 0
    HEARTBEAT = 1
    IDENTIFY = 2
    PRESENCE_UPDATE = 3
    VOICE_STATE_UPDATE = 4
    RESUME = 6
    RECONNECT = 7
    REQUEST_GUILD_MEMBERS = 8
    INVALID_SESSION = 9
    HELLO = 10
    HEARTBEAT_ACK = 11
    REQUEST_SOUNDBOARD_SOUNDS = 31


class GatewayCloseCode(enum.IntEnum):
    """Main gateway close codes (Discord's documented table)."""

    UNKNOWN_ERROR = 4000
    UNKNOWN_OPCODE = 4001
    DECODE_ERROR = 4002
    NOT_AUTHENTICATED = 4003
    AUTHENTICATION_FAILED = 4004
    ALREADY_AUTHENTICATED = 4005
    INVALID_SEQ = 4007
    RATE_LIMITED = 4008
    SESSION_TIMED_OUT = 4009
    INVALID_SHARD = 4010
    INVALID_API_VERSION = 4012
    INVALID_INTENTS = 4013


class Intent(enum.IntFlag):
    """The gateway intents the emulator acts on."""

    GUILDS = 1 << 0
    GUILD_VOICE_STATES = 1 << 7


# Every intent bit Discord defines (0-21, 24, 25); anything else is closed with 4013.
_KNOWN_INTENTS = ((1 << 22) - 1) | (1 << 24) | (1 << 25)
# Discord closes a connection whose client payload exceeds 4096 bytes with 4002.
MAX_CLIENT_PAYLOAD = 4096
# A text frame of more than this many characters may exceed the limit in UTF-8 (up to 4 bytes each).
_SURELY_SMALL = MAX_CLIENT_PAYLOAD // 4


def _payload_size(message: str | bytes) -> int:
    """Bytes on the wire: the limit is in bytes, and a text frame's characters can take up to four each."""
    if isinstance(message, bytes) or len(message) <= _SURELY_SMALL:
        return len(message)
    return len(message.encode())


# Client ops the emulator accepts and deliberately does nothing with (counted in ``ignored_ops``).
_ACCEPTED_NOOPS = frozenset(
    {GatewayOp.PRESENCE_UPDATE, GatewayOp.REQUEST_GUILD_MEMBERS, GatewayOp.REQUEST_SOUNDBOARD_SOUNDS}
)
SUPPORTED_API_VERSIONS = frozenset({"9", "10"})

VoiceStateHook = Callable[[VoiceStateChange], None]
"""Called with every voice state change after the gateway announced it (the voice side's entry point)."""


def _control(op: GatewayOp, data: Any = None) -> dict[str, Any]:
    return {"op": int(op), "d": data, "s": None, "t": None}


@dataclass
class MainGatewayStats:
    """Counters for everything the main gateway did, refused or could not deliver."""

    connections: int = 0
    messages_received: int = 0
    """Every WebSocket message clients sent, valid or not."""
    identifies: int = 0
    identifies_by_user: Counter[int] = field(default_factory=Counter)
    resumes: int = 0
    invalid_sessions: int = 0
    heartbeats: int = 0
    acks_withheld: int = 0
    dispatches: int = 0
    replayed: int = 0
    voice_requests: int = 0
    voice_requests_ignored: int = 0
    ignored_ops: int = 0
    expired_sessions: int = 0
    hook_errors: int = 0
    internal_errors: int = 0
    """Client messages the emulator failed on (a bug): that socket got 1011, nothing else stopped."""
    undelivered: int = 0
    closes: Counter[int] = field(default_factory=Counter)
    """Close codes the emulator sent, by code."""


class Outbox(Protocol):
    """Where a connection core puts its output; the shell moves it onto the socket in order."""

    def send(self, payload: dict[str, Any]) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


class _PayloadError(Exception):
    """A client payload broke the protocol; carries the close code to answer with."""

    def __init__(self, code: GatewayCloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _snowflake(value: object, name: str) -> int:
    """A snowflake sent by a client (decimal string or integer); anything else is a decode error."""
    try:
        return parse_snowflake(value, name)
    except ProtocolError as exc:
        raise _PayloadError(GatewayCloseCode.DECODE_ERROR, str(exc)) from None


def _flag(data: dict[str, Any], name: str, *, required: bool) -> bool:
    value = data.get(name, None if required else False)
    if not isinstance(value, bool):
        raise _PayloadError(GatewayCloseCode.DECODE_ERROR, f"{name} must be a boolean")
    return value


class GatewaySession:
    """One main-gateway session: its sequence counter, replay buffer and (maybe) attached connection."""

    def __init__(
        self, session_id: str, user_id: int, intents: int, shard: tuple[int, int], *, replay_limit: int
    ) -> None:
        self.session_id = session_id
        self.user_id = user_id
        self.intents = intents
        self.shard = shard
        self.seq = 0
        self.connection: GatewayConnection | None = None
        self.detached_at: float | None = None
        self._replay: deque[dict[str, Any]] = deque(maxlen=replay_limit)

    def wants(self, intent: Intent) -> bool:
        return bool(self.intents & intent.value)

    def handles_guild(self, guild_id: int) -> bool:
        shard_id, shard_count = self.shard
        return (guild_id >> 22) % shard_count == shard_id

    def dispatch(self, event: str, data: dict[str, Any]) -> dict[str, Any]:
        """Number the event, keep it for replay and hand it to the attached connection, if any."""
        self.seq += 1
        payload = {"op": int(GatewayOp.DISPATCH), "d": data, "s": self.seq, "t": event}
        self._replay.append(payload)
        if self.connection is not None:
            self.connection.deliver(payload)
        return payload

    def missed_since(self, seq: int) -> list[dict[str, Any]] | None:
        """Dispatches numbered above ``seq``, or ``None`` when some were already evicted from the buffer."""
        if seq >= self.seq:
            return []
        if not self._replay or self._replay[0]["s"] > seq + 1:
            return None
        return [payload for payload in self._replay if payload["s"] > seq]


class GatewayHub:
    """Every session of the emulated gateway and the fan-out of state changes to them (sans-IO)."""

    def __init__(
        self,
        state: EmulatorState,
        *,
        gateway_url: str = "",
        replay_limit: int = 1000,
        voice_server_update_first: bool = False,
    ) -> None:
        self.state = state
        self.gateway_url = gateway_url
        self.replay_limit = replay_limit
        self.voice_server_update_first = voice_server_update_first
        self.sessions: dict[str, GatewaySession] = {}
        self.stats = MainGatewayStats()
        self.voice_hooks: list[VoiceStateHook] = []

    # ---- sessions -------------------------------------------------------------------------------------

    def start_session(self, user_id: int, intents: int, shard: tuple[int, int]) -> GatewaySession:
        session = GatewaySession(
            secrets.token_hex(16), user_id, intents, shard, replay_limit=self.replay_limit
        )
        self.sessions[session.session_id] = session
        return session

    def ready(self, session: GatewaySession) -> None:
        """Dispatch READY, then one GUILD_CREATE per guild, as Discord does right after Identify.

        GUILD_CREATE belongs to the GUILDS intent: without it READY still lists the guilds as unavailable and
        nothing follows, so a bot that forgot the intent finds no channels here either.
        """
        guilds = [g for g in self.state.guilds_of(session.user_id) if session.handles_guild(g.id)]
        user = self.state.user(session.user_id)
        ready: dict[str, Any] = {
            "v": 10,
            "user": user.to_payload(),
            "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
            "session_id": session.session_id,
            "session_type": "normal",
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(user.id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "user_settings": {},
            "geo_ordered_rtc_regions": ["emulator"],
            "_trace": ["cordvoice-emulator"],
        }
        if session.shard != (0, 1):
            ready["shard"] = list(session.shard)
        self.dispatch(session, "READY", ready)
        if not session.wants(Intent.GUILDS):
            return
        for guild in guilds:
            self._send_guild_create(session, guild.id)

    def end_session(self, session_id: str) -> None:
        """Forget a session for good; the voice states it owned leave voice."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        if session.connection is not None:
            session.connection.session = None
            session.connection = None
        for change in self.state.end_gateway_session(session_id):
            self.apply_voice_change(change)

    def expire_sessions(self, now: float, resume_timeout: float) -> int:
        """End the sessions that nobody resumed within ``resume_timeout`` seconds."""
        expired = [
            s.session_id
            for s in self.sessions.values()
            if s.detached_at is not None and now - s.detached_at >= resume_timeout
        ]
        for session_id in expired:
            logger.debug("gateway session expired without resume")
            self.end_session(session_id)
        self.stats.expired_sessions += len(expired)
        return len(expired)

    def sessions_of(self, user_id: int) -> list[GatewaySession]:
        return [s for s in self.sessions.values() if s.user_id == user_id]

    # ---- dispatch fan-out -------------------------------------------------------------------------------

    def dispatch(self, session: GatewaySession, event: str, data: dict[str, Any]) -> None:
        """One dispatch to one session (numbered, buffered for replay, delivered if attached)."""
        session.dispatch(event, data)
        self.stats.dispatches += 1

    def _guild_sessions(self, guild_id: int, intent: Intent) -> Iterator[GatewaySession]:
        guild = self.state.guilds.get(guild_id)
        if guild is None:
            return
        bit = intent.value  # once: IntFlag arithmetic is slow, and this runs per session per dispatch
        members = guild.members
        for session in list(self.sessions.values()):
            if session.intents & bit and session.user_id in members and session.handles_guild(guild_id):
                yield session

    def dispatch_to_guild(self, guild_id: int, event: str, data: dict[str, Any], *, intent: Intent) -> int:
        """Send one dispatch to every session that is in the guild and asked for ``intent``."""
        count = 0
        for session in self._guild_sessions(guild_id, intent):
            self.dispatch(session, event, data)
            count += 1
        return count

    def _send_guild_create(self, session: GatewaySession, guild_id: int) -> None:
        payload = self.state.guild_payload(
            guild_id, for_user=session.user_id, with_voice_states=session.wants(Intent.GUILD_VOICE_STATES)
        )
        self.dispatch(session, "GUILD_CREATE", payload)

    def announce_member_added(self, guild_id: int, user_id: int) -> None:
        """The user joined a guild: its live sessions with the GUILDS intent get GUILD_CREATE."""
        for session in self.sessions_of(user_id):
            if session.handles_guild(guild_id) and session.wants(Intent.GUILDS):
                self._send_guild_create(session, guild_id)

    def announce_channel(self, event: str, channel_payload: dict[str, Any], guild_id: int) -> None:
        """CHANNEL_CREATE / CHANNEL_DELETE to the guild (GUILDS intent)."""
        self.dispatch_to_guild(guild_id, event, channel_payload, intent=Intent.GUILDS)

    def send_voice_server_update(self, voice_session: VoiceSession, *, endpoint: str | None) -> bool:
        """VOICE_SERVER_UPDATE to the gateway session that owns a voice session; False if it has none.

        ``endpoint=None`` is Discord's "your voice server went away, wait for another" form.
        """
        session = self.sessions.get(voice_session.session_id)
        if session is None:
            return False
        data = {"token": voice_session.token, "guild_id": str(voice_session.guild_id), "endpoint": endpoint}
        self.dispatch(session, "VOICE_SERVER_UPDATE", data)
        return True

    def apply_voice_change(self, change: VoiceStateChange, *, reannounce: VoiceSession | None = None) -> None:
        """Announce a voice change on the wire, then tell the voice side (hooks).

        Every change but a server move is announced with VOICE_STATE_UPDATE, even when nothing visible changed
        (an op 4 repeating the current state is still answered); an issued session with VOICE_SERVER_UPDATE.
        ``reannounce`` is a still-valid session to announce again with VOICE_SERVER_UPDATE (a repeated op 4).
        """
        state_changed = change.cause is not VoiceChangeCause.SERVER_MOVE
        server_update = change.issued if change.issued is not None else reannounce
        if server_update is not None and self.voice_server_update_first:
            self.send_voice_server_update(server_update, endpoint=server_update.endpoint)
        if state_changed:
            data = self.state.voice_state_payload(change.guild_id, change.user_id, change.after)
            self.dispatch_to_guild(
                change.guild_id, "VOICE_STATE_UPDATE", data, intent=Intent.GUILD_VOICE_STATES
            )
        if server_update is not None and not self.voice_server_update_first:
            self.send_voice_server_update(server_update, endpoint=server_update.endpoint)
        for hook in list(self.voice_hooks):
            try:
                hook(change)
            except Exception:
                self.stats.hook_errors += 1
                logger.exception("a voice state hook failed on %s", change.cause.value)

    # ---- op 4 -----------------------------------------------------------------------------------------

    def request_voice_state(self, session: GatewaySession, data: object) -> None:
        """Op 4 from a client. Malformed payloads raise; requests Discord ignores are counted and dropped."""
        if not isinstance(data, dict):
            raise _PayloadError(GatewayCloseCode.DECODE_ERROR, "op 4 needs an object")
        guild_id = _snowflake(data.get("guild_id"), "guild_id")
        raw_channel = data.get("channel_id")
        channel_id = None if raw_channel is None else _snowflake(raw_channel, "channel_id")
        self_mute = _flag(data, "self_mute", required=True)
        self_deaf = _flag(data, "self_deaf", required=True)
        self_video = _flag(data, "self_video", required=False)
        self.stats.voice_requests += 1
        guild = self.state.guilds.get(guild_id)
        reason = None
        if guild is None or session.user_id not in guild.members:
            reason = "unknown guild or not a member"
        elif channel_id is not None and channel_id not in guild.channels:
            reason = "channel is not a voice channel of this guild"
        elif channel_id is not None and self.state.channel_is_full(channel_id, session.user_id):
            reason = "channel is full"
        if reason is not None:
            self.stats.voice_requests_ignored += 1
            logger.warning("emulator ignored op 4 (as Discord would): %s", reason)
            return
        change = self.state.update_voice_state(
            guild_id,
            session.user_id,
            channel_id,
            session_id=session.session_id,
            self_mute=self_mute,
            self_deaf=self_deaf,
            self_video=self_video,
            cause=VoiceChangeCause.GATEWAY_REQUEST,
        )
        if change is None:
            self.stats.voice_requests_ignored += 1
            return
        self.apply_voice_change(change, reannounce=self._repeated_join(change))

    def _repeated_join(self, change: VoiceStateChange) -> VoiceSession | None:
        """The still-valid voice session when op 4 repeated the member's channel and flags exactly.

        discord.py (after 4015 and failed handshakes) and discord.js (``rejoin``) re-send op 4 for the channel
        they are in and wait for both VOICE_STATE_UPDATE and VOICE_SERVER_UPDATE, so a repeat gets both: the
        same token and endpoint while the voice session is valid (a revoked one was already reissued, with a
        new token, by the state). A flags-only change (self mute or deafen) gets only the state update, or
        every such toggle would make those libraries reconnect.
        """
        before, after = change.before, change.after
        if change.issued is not None or before is None or after is None or before != after:
            return None
        return self.state.voice_session(change.guild_id, change.user_id)


class _Phase(enum.Enum):
    WAITING = "waiting"  # before Identify/Resume (or after a non-resumable Invalid Session)
    READY = "ready"
    CLOSING = "closing"


class GatewayConnection:
    """One main-gateway socket's protocol state (sans-IO): decoded input in, payloads to the outbox."""

    def __init__(
        self,
        hub: GatewayHub,
        outbox: Outbox,
        *,
        connection_id: int,
        now: float,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        rate_limit: tuple[int, float] | None,
        compress: bool,
    ) -> None:
        self.hub = hub
        self.outbox = outbox
        self.id = connection_id
        self.compress = compress
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeat_deadline = now + heartbeat_timeout
        self.rate_limit = rate_limit
        self.phase = _Phase.WAITING
        self.session: GatewaySession | None = None
        self.user_id: int | None = None
        self.opcodes: Counter[int] = Counter()
        self.sent_close: int | None = None
        self.ack_heartbeats = True
        """Fault injection: ``False`` withholds heartbeat ACKs (the client should see a zombie socket)."""
        self._window_start = now
        self._window_count = 0

    @property
    def closing(self) -> bool:
        return self.phase is _Phase.CLOSING

    @property
    def session_id(self) -> str | None:
        return None if self.session is None else self.session.session_id

    def open(self) -> None:
        self.outbox.send(
            _control(GatewayOp.HELLO, {"heartbeat_interval": round(self.heartbeat_interval * 1000)})
        )

    def deliver(self, payload: dict[str, Any]) -> None:
        """A dispatch from the attached session."""
        if self.closing:
            self.hub.stats.undelivered += 1
            return
        self.outbox.send(payload)

    def abort(self) -> None:
        """The shell cut the socket without a close frame (a network drop): send nothing more."""
        self.phase = _Phase.CLOSING

    def close(self, code: int, reason: str) -> None:
        """Close the socket from the server side; the session (if any) stays resumable unless ended."""
        if self.closing:
            return
        self.phase = _Phase.CLOSING
        self.sent_close = code
        self.hub.stats.closes[code] += 1
        self.outbox.close(code, reason)

    def receive(self, message: str | bytes, now: float) -> None:
        """One WebSocket message from the client."""
        self.hub.stats.messages_received += 1
        if self.closing:
            return
        try:
            self._receive(message, now)
        except _PayloadError as exc:
            logger.info("emulator gateway closes connection %d: %d %s", self.id, exc.code, exc.reason)
            self.close(exc.code, exc.reason)
        except Exception:  # a bug in the emulator costs this socket (1011), never the server
            logger.exception("emulator gateway failed on a client message")
            self.hub.stats.internal_errors += 1
            self.close(1011, "internal error")

    def heartbeat_expired(self) -> None:
        """No heartbeat arrived in time: 4009, and the session is over ("start a new one")."""
        if self.closing:
            return
        if self.session is not None:
            self.hub.end_session(self.session.session_id)
        self.close(GatewayCloseCode.SESSION_TIMED_OUT, "heartbeat timed out")

    def connection_lost(self, now: float, client_code: int | None) -> None:
        """The socket is gone. A client close with 1000/1001 ends the session; anything else keeps it."""
        session = self.session
        self.phase = _Phase.CLOSING
        if session is None:
            return
        self.session = None
        if session.connection is not self:
            return
        session.connection = None
        session.detached_at = now
        if self.sent_close is None and client_code in (1000, 1001):
            self.hub.end_session(session.session_id)

    def invalidate(self, *, resumable: bool) -> None:
        """Send op 9. Not resumable: the session ends and the client may Identify on this socket."""
        if self.closing:
            return
        self.outbox.send(_control(GatewayOp.INVALID_SESSION, resumable))
        self.hub.stats.invalid_sessions += 1
        if not resumable:
            if self.session is not None:
                self.hub.end_session(self.session.session_id)
            self.phase = _Phase.WAITING

    def request_reconnect(self) -> None:
        if not self.closing:
            self.outbox.send(_control(GatewayOp.RECONNECT))

    # ---- decoding -------------------------------------------------------------------------------------

    def _receive(self, message: str | bytes, now: float) -> None:
        self._count_rate(now)
        if _payload_size(message) > MAX_CLIENT_PAYLOAD:
            raise _PayloadError(
                GatewayCloseCode.DECODE_ERROR, f"payload larger than {MAX_CLIENT_PAYLOAD} bytes"
            )
        try:
            payload = json.loads(message)
        except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting raises RecursionError
            raise _PayloadError(GatewayCloseCode.DECODE_ERROR, "payload is not valid JSON") from None
        if not isinstance(payload, dict):
            raise _PayloadError(GatewayCloseCode.DECODE_ERROR, "payload is not a JSON object")
        op = payload.get("op")
        if not isinstance(op, int) or isinstance(op, bool):
            raise _PayloadError(GatewayCloseCode.DECODE_ERROR, "payload has no integer op")
        self.opcodes[op] += 1
        data = payload.get("d")
        if op == GatewayOp.HEARTBEAT:
            self._heartbeat(data, now)
        elif op in (GatewayOp.IDENTIFY, GatewayOp.RESUME):
            if self.phase is _Phase.READY:
                raise _PayloadError(GatewayCloseCode.ALREADY_AUTHENTICATED, "already authenticated")
            if op == GatewayOp.IDENTIFY:
                self._identify(data)
            else:
                self._resume(data)
        elif op in _ACCEPTED_NOOPS or op == GatewayOp.VOICE_STATE_UPDATE:
            if self.session is None:
                raise _PayloadError(GatewayCloseCode.NOT_AUTHENTICATED, "not authenticated")
            if op == GatewayOp.VOICE_STATE_UPDATE:
                self.hub.request_voice_state(self.session, data)
            else:
                self.hub.stats.ignored_ops += 1
        else:
            raise _PayloadError(GatewayCloseCode.UNKNOWN_OPCODE, f"unknown opcode {op}")

    def _count_rate(self, now: float) -> None:
        if self.rate_limit is None:
            return
        limit, period = self.rate_limit
        if now - self._window_start >= period:
            self._window_start = now
            self._window_count = 0
        self._window_count += 1
        if self._window_count > limit:
            raise _PayloadError(GatewayCloseCode.RATE_LIMITED, "sending payloads too quickly")

    def _heartbeat(self, data: object, now: float) -> None:
        if data is not None and (not isinstance(data, int) or isinstance(data, bool) or data < 0):
            raise _PayloadError(
                GatewayCloseCode.DECODE_ERROR, "heartbeat d must be the last sequence or null"
            )
        self.heartbeat_deadline = now + self.heartbeat_timeout
        self.hub.stats.heartbeats += 1
        if self.ack_heartbeats:
            self.outbox.send(_control(GatewayOp.HEARTBEAT_ACK))
        else:
            self.hub.stats.acks_withheld += 1

    def _authenticate(self, token: object) -> int:
        if not isinstance(token, str):
            raise _PayloadError(GatewayCloseCode.DECODE_ERROR, "token must be a string")
        user = self.hub.state.user_for_token(token.removeprefix("Bot "))
        if user is None:
            raise _PayloadError(GatewayCloseCode.AUTHENTICATION_FAILED, "authentication failed")
        return user.id

    def _identify(self, data: object) -> None:
        if not isinstance(data, dict) or not isinstance(data.get("properties"), dict):
            raise _PayloadError(GatewayCloseCode.DECODE_ERROR, "identify needs an object with properties")
        intents = data.get("intents")
        if not isinstance(intents, int) or isinstance(intents, bool):
            raise _PayloadError(GatewayCloseCode.DECODE_ERROR, "identify needs integer intents")
        user_id = self._authenticate(data.get("token"))
        if intents < 0 or intents & ~_KNOWN_INTENTS:
            raise _PayloadError(GatewayCloseCode.INVALID_INTENTS, "invalid intents")
        shard = (0, 1)
        raw_shard = data.get("shard")
        if raw_shard is not None:
            valid = (
                isinstance(raw_shard, list)
                and len(raw_shard) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) for n in raw_shard)
                and 0 <= raw_shard[0] < raw_shard[1]
            )
            if not valid:
                raise _PayloadError(GatewayCloseCode.INVALID_SHARD, "invalid shard")
            shard = (raw_shard[0], raw_shard[1])
        session = self.hub.start_session(user_id, intents, shard)
        self.hub.stats.identifies += 1
        self.hub.stats.identifies_by_user[user_id] += 1
        self._attach(session)
        self.hub.ready(session)

    def _resume(self, data: object) -> None:
        if not isinstance(data, dict):
            raise _PayloadError(GatewayCloseCode.DECODE_ERROR, "resume needs an object")
        session_id = data.get("session_id")
        seq = data.get("seq")
        if seq is None:
            seq = 0
        if not isinstance(session_id, str) or not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise _PayloadError(GatewayCloseCode.DECODE_ERROR, "resume needs session_id and seq")
        user_id = self._authenticate(data.get("token"))
        session = self.hub.sessions.get(session_id)
        if session is None or session.user_id != user_id:
            logger.info("emulator gateway: resume of an unknown session; answering op 9")
            self.invalidate(resumable=False)
            return
        if seq > session.seq:
            # "Reconnect and start a new session": the session is over.
            self.hub.end_session(session.session_id)
            raise _PayloadError(GatewayCloseCode.INVALID_SEQ, "resume seq is ahead of the session")
        missed = session.missed_since(seq)
        if missed is None:
            logger.info("emulator gateway: resume seq older than the replay buffer; answering op 9")
            self.hub.end_session(session.session_id)
            self.invalidate(resumable=False)
            return
        if session.connection is not None:
            session.connection.session = None
            session.connection.close(GatewayCloseCode.UNKNOWN_ERROR, "session resumed on another connection")
        self._attach(session)
        for payload in missed:
            self.outbox.send(payload)
        self.hub.stats.replayed += len(missed)
        self.hub.stats.resumes += 1
        self.hub.dispatch(session, "RESUMED", {"_trace": ["cordvoice-emulator"]})

    def _attach(self, session: GatewaySession) -> None:
        session.connection = self
        session.detached_at = None
        self.session = session
        self.user_id = session.user_id
        self.phase = _Phase.READY
