"""The emulated voice gateway (v8), sans-IO: the voice sessions, calls and DAVE delivery services of a server.

:class:`VoiceServerCore` takes decoded events from its asyncio shell (a socket opened, a frame received, a
socket lost, the time passed, a voice state changed on the main gateway) and answers through each socket's
:class:`VoiceOutbox`. It never awaits or reads a clock; the shell passes ``now`` and calls :meth:`poll` at
:meth:`next_deadline`.

Model (protocol.md §1-§3, §6.9):

* A **voice session** (:class:`VoiceSessionRecord`) starts with a valid Identify and outlives its socket for
  ``resume_window`` seconds: SSRC, key, UDP registration, DAVE membership, and the numbered messages
  (a bounded replay buffer) survive, so Resume (op 7) answers op 9 and replays everything after ``seq_ack``,
  or closes with 4006 when the session is gone or the buffer no longer reaches back that far.
* Every server message except Hello, Heartbeat ACK and Resumed carries ``seq`` (one u16 counter per session
  for JSON and binary frames).
* A **call** is the set of sessions in one channel on this server: op 11 and op 13 announce arrivals and
  departures, op 5 is relayed with the speaker's user id and SSRC, and one
  :class:`~cordvoice.emulator.dave_ds.DaveDeliveryService` per DAVE channel turns key packages, commits and
  transition acks into ops 21-30. A session joins the delivery service right after its op 4 (so op 25 comes
  after op 4, as discord.py needs).
* Client mistakes close the socket with protocol.md's code: 4001 unknown opcode, 4002 undecodable, 4003
  before Identify, 4004 bad credentials, 4005 second Identify, 4006 resume refused, 4009 heartbeat timeout,
  4012 unknown protocol, 4016 unknown/deprecated mode, 4017 DAVE required, 4020 malformed fields.

Decisions where protocol.md is silent: heartbeats are accepted before Identify; a second Select Protocol is
a 4020; a voice session ends (members see op 13) when its client closes with 1000/1001, when the server closes
it with a non-resumable code, or when the resume window runs out; tokens are never revoked here (leaving,
moving and kicking revoke them in the main gateway's state, and the voice side then closes with 4014, or
4022 for a deleted channel or a server move).

Delivery order: :meth:`VoiceServerCore.set_delivery_order` makes a channel's batches (all messages one input
produces) go out per connection in a seeded shuffled order with small random delays; a connection's own
messages are never reordered (the shell's per-connection queue is FIFO).
"""

from __future__ import annotations

import ipaddress
import logging
import random
import secrets
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from cordvoice.emulator.dave_ds import (
    DEFAULT_TRANSITION_TIMEOUT,
    DaveDeliveryService,
    DsAction,
    DsOutput,
    SendAnnounceCommit,
    SendExecuteTransition,
    SendExternalSender,
    SendPrepareEpoch,
    SendPrepareTransition,
    SendProposals,
    SendWelcome,
)
from cordvoice.emulator.inspection import ClientActivity, ClientInspection, SpeakingEvent
from cordvoice.emulator.sfu import MediaEndpoint, MediaServer
from cordvoice.emulator.state import EmulatorState, VoiceChangeCause, VoiceSession, VoiceStateChange
from cordvoice.errors import EmulatorError, FrameDecodeError, InvalidArgumentError, ProtocolError
from cordvoice.udp.crypto import MODE_AES256_GCM, MODE_XCHACHA20_POLY1305, make_cipher
from cordvoice.voicegateway.closecodes import CloseCode
from cordvoice.voicegateway.messages import (
    ClientDisconnect,
    ClientMessage,
    ClientsConnect,
    DaveExecuteTransition,
    DaveMlsAnnounceCommitTransition,
    DaveMlsCommitWelcome,
    DaveMlsExternalSender,
    DaveMlsInvalidCommitWelcome,
    DaveMlsKeyPackage,
    DaveMlsProposals,
    DaveMlsWelcome,
    DavePrepareEpoch,
    DavePrepareTransition,
    DaveTransitionReady,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Identify,
    ProposalsOperation,
    Ready,
    Resume,
    Resumed,
    SelectProtocol,
    ServerMessage,
    SessionDescription,
    Speaking,
    Unknown,
    decode_client,
    encode_server,
)

__all__ = [
    "DEPRECATED_MODES",
    "GATEWAY_VERSION",
    "VoiceCall",
    "VoiceConnection",
    "VoiceOutbox",
    "VoiceServerConfig",
    "VoiceServerCore",
    "VoiceServerStats",
    "VoiceSessionRecord",
    "check_close_code",
    "close_code_for",
]

logger = logging.getLogger(__name__)

GATEWAY_VERSION = 8
#: Names Discord discontinued on 2024-11-18 but may still list in Ready; selecting one is a 4016.
DEPRECATED_MODES: tuple[str, ...] = (
    "xsalsa20_poly1305_lite_rtpsize",
    "aead_aes256_gcm",
    "xsalsa20_poly1305_lite",
    "xsalsa20_poly1305_suffix",
    "xsalsa20_poly1305",
)
_SEQ_MASK = 0xFFFF
#: Client opcodes Discord's own clients send and the server accepts without acting (counted).
_IGNORED_CLIENT_OPS = frozenset({12, 15, 16})
_MAX_REASON = 120
_HISTORY_PER_USER = 16


#: Codes below 3000 that a close frame may carry (RFC 6455 §7.4: 1004-1006 and 1015 are never sent).
_SENDABLE_PROTOCOL_CODES = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})


def check_close_code(code: int) -> None:
    """Refuse a code no close frame can carry: the socket would fail with 1011, or not close at all."""
    if code not in _SENDABLE_PROTOCOL_CODES and not 3000 <= code <= 4999:
        raise InvalidArgumentError(
            f"close code {code} cannot be sent in a close frame (1000-1003, 1007-1014 or 3000-4999)"
        )


def close_code_for(cause: VoiceChangeCause) -> int:
    """The close code a voice socket gets when the main gateway revokes its session for ``cause``."""
    if cause in (VoiceChangeCause.CHANNEL_DELETED, VoiceChangeCause.SERVER_MOVE):
        return CloseCode.CALL_TERMINATED
    return CloseCode.DISCONNECTED


def _resumable(code: int) -> bool:
    """Closes after which the voice session survives for a Resume (protocol.md §3)."""
    return code < 4000 or code == CloseCode.VOICE_SERVER_CRASHED


@dataclass
class VoiceServerConfig:
    """Behaviour knobs of one emulated voice server (change them before clients connect)."""

    heartbeat_interval_ms: float = 13_750.0
    heartbeat_timeout: float | None = None
    """Seconds without a heartbeat before the socket is closed with 4009 (default: two intervals)."""
    resume_window: float = 30.0
    """Seconds a voice session survives without a socket."""
    replay_limit: int = 1000
    """Numbered messages kept per session for Resume (at most 32768, half the u16 sequence space)."""
    offer_aes: bool = True
    """Offer ``aead_aes256_gcm_rtpsize``; False exercises the XChaCha fallback."""
    advertise_deprecated_modes: bool = False
    """Also list the discontinued mode names in Ready (after the AEAD modes); selecting one is a 4016."""
    transition_timeout: float = DEFAULT_TRANSITION_TIMEOUT

    def __post_init__(self) -> None:
        if self.heartbeat_interval_ms <= 0 or self.resume_window <= 0 or self.transition_timeout <= 0:
            raise EmulatorError(
                "heartbeat_interval_ms, resume_window and transition_timeout must be positive"
            )
        if not 0 < self.replay_limit <= 0x8000:
            raise EmulatorError("replay_limit must be in 1..32768")

    @property
    def heartbeat_deadline(self) -> float:
        if self.heartbeat_timeout is not None:
            return self.heartbeat_timeout
        return 2 * self.heartbeat_interval_ms / 1000.0

    @property
    def usable_modes(self) -> tuple[str, ...]:
        if self.offer_aes:
            return (MODE_AES256_GCM, MODE_XCHACHA20_POLY1305)
        return (MODE_XCHACHA20_POLY1305,)

    @property
    def ready_modes(self) -> tuple[str, ...]:
        return self.usable_modes + (DEPRECATED_MODES if self.advertise_deprecated_modes else ())


class VoiceOutbox(Protocol):
    """Where the core puts one socket's output; the shell sends it in order."""

    def send(self, frame: str | bytes, delay: float) -> None:
        """Queue a frame to go out ``delay`` seconds from now (never before frames queued earlier)."""

    def close(self, code: int, reason: str) -> None:
        """Close the socket with ``code`` after the frames already queued."""

    def abort(self) -> None:
        """Drop the TCP connection now, without a close frame."""


@dataclass(frozen=True, slots=True)
class _Close:
    code: int
    reason: str


class VoiceConnection:
    """One voice WebSocket's protocol state."""

    def __init__(self, connection_id: int, outbox: VoiceOutbox, heartbeat_deadline: float) -> None:
        self.id = connection_id
        self.outbox = outbox
        self.heartbeat_deadline = heartbeat_deadline
        self.session: VoiceSessionRecord | None = None
        self.channel_id: int | None = None
        self.closing = False
        self.sent_close: int | None = None
        self.opcodes: Counter[int] = Counter()

    def __repr__(self) -> str:
        user = None if self.session is None else self.session.user_id
        return f"VoiceConnection(id={self.id}, user={user}, closing={self.closing})"


class VoiceSessionRecord:
    """One voice session, from its Identify until it ends; it outlives sockets for the resume window."""

    def __init__(
        self,
        voice: VoiceSession,
        media: MediaEndpoint,
        *,
        max_dave_version: int,
        dave_version: int,
        replay_limit: int,
        identified_at: float = 0.0,
    ) -> None:
        self.voice = voice
        self.identified_at = identified_at
        """Loop time of the Identify that opened it (orders a user's sessions across voice servers)."""
        self.media = media
        self.max_dave_version = max_dave_version
        self.dave_version = dave_version
        self.dave_connected = False
        self.mode: str | None = None
        self.speaking: int | None = None
        self.connection: VoiceConnection | None = None
        self.detached_at: float | None = None
        self.ended = False
        self.withhold_acks = False
        self.acks_to_withhold: int | None = None
        """With ``withhold_acks``: how many more heartbeats go unanswered (None: until restored)."""
        self.seq = 0
        self.sent_total = 0
        self.replay: deque[str | bytes] = deque(maxlen=replay_limit)
        self.activity = ClientActivity()

    @property
    def user_id(self) -> int:
        return self.voice.user_id

    @property
    def guild_id(self) -> int:
        return self.voice.guild_id

    @property
    def channel_id(self) -> int:
        return self.voice.channel_id

    @property
    def ssrc(self) -> int:
        return self.media.ssrc

    def missed_since(self, seq_ack: int | None) -> list[str | bytes] | None:
        """The numbered frames after ``seq_ack`` (None: after nothing), or None if they are not all kept."""
        if seq_ack is None:
            count = self.sent_total
        else:
            count = (self.seq - seq_ack) & _SEQ_MASK
            if count > self.sent_total:
                return None  # acknowledges a number never sent
        if count > len(self.replay):
            return None
        return list(self.replay)[len(self.replay) - count :]

    def __repr__(self) -> str:
        return (
            f"VoiceSessionRecord(user={self.user_id}, channel={self.channel_id}, ssrc={self.ssrc}, "
            f"connected={self.connection is not None}, ended={self.ended})"
        )


@dataclass
class VoiceCall:
    """The sessions of one channel on this server, and its DAVE delivery service (version-1 channels)."""

    channel_id: int
    guild_id: int
    members: dict[int, VoiceSessionRecord] = field(default_factory=dict)
    dave: DaveDeliveryService | None = None


@dataclass
class VoiceServerStats:
    """Counters of one voice server's gateway side (the media side counts in ``MediaServer.counters``)."""

    connections: int = 0
    frames_received: int = 0
    """Every WebSocket message clients sent, valid or not."""
    identifies: int = 0
    resumes: int = 0
    replayed: int = 0
    heartbeats: int = 0
    acks_withheld: int = 0
    sessions_ended: int = 0
    sessions_expired: int = 0
    internal_errors: int = 0
    closes: Counter[int] = field(default_factory=Counter)
    """Close codes sent, by code."""
    ignored_ops: Counter[int] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    """Inputs ignored without closing, by reason."""


@dataclass
class _DeliveryOrder:
    rng: random.Random
    max_delay: float


class _Refuse(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


_Item = str | bytes | _Close


class VoiceServerCore:
    """The protocol state of one emulated voice server (see the module docstring)."""

    def __init__(
        self,
        state: EmulatorState,
        server_id: int,
        media: MediaServer,
        media_address: tuple[str, int],
        config: VoiceServerConfig | None = None,
    ) -> None:
        self.state = state
        self.server_id = server_id
        self.media = media
        self.media_address = media_address
        self.config = config or VoiceServerConfig()
        self.stats = VoiceServerStats()
        self.connections: dict[int, VoiceConnection] = {}
        self.sessions: dict[tuple[int, int], VoiceSessionRecord] = {}
        self.calls: dict[int, VoiceCall] = {}
        self._by_token: dict[str, VoiceSessionRecord] = {}
        self._history: dict[int, deque[VoiceSessionRecord]] = {}
        self._delivery: dict[int, _DeliveryOrder] = {}
        self._batch: list[tuple[VoiceConnection, _Item]] = []
        self._next_connection_id = 1
        self.deadlines_changed = False
        """Set whenever :meth:`next_deadline` may have moved; the shell clears it after rescheduling."""

    # ==== entry points (each one flushes its output) ========================================================

    def open_connection(self, outbox: VoiceOutbox, now: float) -> VoiceConnection:
        """A socket opened: it gets Hello and must Identify or Resume."""
        conn = VoiceConnection(self._next_connection_id, outbox, now + self.config.heartbeat_deadline)
        self._next_connection_id += 1
        self.connections[conn.id] = conn
        self.stats.connections += 1
        self._control(
            conn, Hello(heartbeat_interval=self.config.heartbeat_interval_ms, version=GATEWAY_VERSION)
        )
        self._flush()
        return conn

    def refuse_connection(self, conn: VoiceConnection, code: int, reason: str, now: float) -> None:
        """Close a socket the shell refuses (e.g. a bad ``v`` in the URL)."""
        self._close(conn, code, reason, now)
        self._flush()

    def receive(self, conn: VoiceConnection, frame: str | bytes, now: float) -> None:
        """One WebSocket message from a client."""
        self.stats.frames_received += 1
        if conn.closing:
            self.stats.dropped["after_close"] += 1
            return
        try:
            self._receive(conn, frame, now)
        except _Refuse as exc:
            logger.info(
                "emulated voice server %d closes connection %d: %d %s",
                self.server_id,
                conn.id,
                exc.code,
                exc.reason,
            )
            self._close(conn, exc.code, exc.reason, now)
        except Exception:  # a bug in the emulator costs this socket (1011), never the server
            logger.exception("emulated voice server %d failed on a client frame", self.server_id)
            self.stats.internal_errors += 1
            self._close(conn, 1011, "internal error", now)
        self._flush()

    def heartbeat_expired(self, conn: VoiceConnection, now: float) -> None:
        """No heartbeat arrived before ``conn.heartbeat_deadline``: 4009, the session is over."""
        self._close(conn, CloseCode.SESSION_TIMEOUT, "heartbeat timed out", now)
        self._flush()

    def connection_lost(self, conn: VoiceConnection, now: float, client_code: int | None) -> None:
        """The socket is gone; ``client_code`` is the close code the client sent, if it started the close."""
        conn.closing = True
        self.connections.pop(conn.id, None)
        record = conn.session
        if record is not None and record.connection is conn:
            record.connection = None
            if conn.sent_close is None and client_code in (1000, 1001):
                self._end_session(record, now)
            elif not record.ended:
                record.detached_at = now
                self.deadlines_changed = True
        self._flush()

    def poll(self, now: float) -> None:
        """Expire sessions past their resume window and time out DAVE transitions."""
        window = self.config.resume_window
        for record in list(self.sessions.values()):
            if (
                record.connection is None
                and record.detached_at is not None
                and now >= record.detached_at + window
            ):
                self.stats.sessions_expired += 1
                logger.info(
                    "voice session of user %d expired after %.1f s without a socket", record.user_id, window
                )
                self._end_session(record, now)
        for call in list(self.calls.values()):
            dave = call.dave
            if dave is not None:
                deadline = dave.next_deadline()
                if deadline is not None and deadline <= now:
                    self._route(call, dave.poll(now))
        self.deadlines_changed = True
        self._flush()

    def next_deadline(self) -> float | None:
        """When :meth:`poll` must run next, or None."""
        window = self.config.resume_window
        deadlines = [
            record.detached_at + window
            for record in self.sessions.values()
            if record.connection is None and record.detached_at is not None
        ]
        for call in self.calls.values():
            if call.dave is not None:
                deadline = call.dave.next_deadline()
                if deadline is not None:
                    deadlines.append(deadline)
        return min(deadlines, default=None)

    def voice_state_changed(self, change: VoiceStateChange, now: float) -> None:
        """The main gateway revoked a voice session on this server: end it with 4014 (or 4022)."""
        revoked = change.revoked
        if revoked is None or revoked.voice_server_id != self.server_id:
            return
        record = self._by_token.get(revoked.token)
        if record is None or record.voice != revoked:
            return
        code = close_code_for(change.cause)
        self._end_session(record, now, close=(code, f"voice session revoked: {change.cause.value}"))
        self._flush()

    # ==== faults and inspection ============================================================================

    def set_delivery_order(self, channel_id: int, seed: int | None, max_delay: float = 0.005) -> None:
        """Shuffle a channel's batches across connections with delays up to ``max_delay`` s (None: off)."""
        if seed is None:
            self._delivery.pop(channel_id, None)
            return
        if max_delay < 0:
            raise EmulatorError("max_delay must be >= 0")
        self._delivery[channel_id] = _DeliveryOrder(random.Random(seed), max_delay)

    def records(self, user_id: int, guild_id: int | None = None) -> list[VoiceSessionRecord]:
        """Every voice session of ``user_id`` this server remembers, oldest first (ended ones included)."""
        return [r for r in self._history.get(user_id, ()) if guild_id is None or r.guild_id == guild_id]

    def live_record(self, user_id: int, guild_id: int | None = None) -> VoiceSessionRecord | None:
        live = [r for r in self.records(user_id, guild_id) if not r.ended]
        return live[-1] if live else None

    def close_client(
        self, user_id: int, code: int, reason: str, now: float, *, guild_id: int | None = None
    ) -> int:
        """Close the user's live voice socket(s) with ``code``; the session survives resumable codes."""
        check_close_code(code)
        count = 0
        for record in self.records(user_id, guild_id):
            if record.connection is not None and not record.connection.closing:
                self._close(record.connection, code, reason, now)
                count += 1
        self._flush()
        return count

    def crash(self, now: float, code: int = CloseCode.VOICE_SERVER_CRASHED) -> int:
        """Close every socket with ``code`` (4015: sessions are kept for Resume); returns how many."""
        check_close_code(code)
        connections = [c for c in self.connections.values() if not c.closing]
        for conn in connections:
            self._close(conn, code, "voice server crashed", now)
        self._flush()
        return len(connections)

    def drop_client(self, user_id: int, *, guild_id: int | None = None) -> int:
        """Cut the user's TCP connection without a close frame (like 1006); the session stays resumable."""
        count = 0
        for record in self.records(user_id, guild_id):
            conn = record.connection
            if conn is not None and not conn.closing:
                conn.closing = True
                conn.outbox.abort()
                count += 1
        return count

    def set_withhold_acks(
        self, user_id: int, withhold: bool, *, guild_id: int | None = None, count: int | None = None
    ) -> None:
        """Stop (or restart) answering the user's heartbeats; ``count`` limits it to the next N heartbeats."""
        if count is not None and count < 1:
            raise InvalidArgumentError("count must be >= 1 (or None: until restored)")
        record = self.live_record(user_id, guild_id)
        if record is None:
            raise EmulatorError(f"user {user_id} has no live voice session on server {self.server_id}")
        record.withhold_acks = withhold
        record.acks_to_withhold = count if withhold else None

    def inspect(self, user_id: int, guild_id: int | None = None) -> ClientInspection | None:
        """A snapshot of the user's newest voice session on this server, or None."""
        history = self.records(user_id, guild_id)
        if not history:
            return None
        record = history[-1]
        call = self.calls.get(record.channel_id)
        dave = call.dave if call is not None and not record.ended else None
        roster = dict(dave.roster) if dave is not None else {}
        activity = record.activity
        return ClientInspection(
            user_id=record.user_id,
            guild_id=record.guild_id,
            channel_id=record.channel_id,
            session_id=record.voice.session_id,
            ssrc=record.ssrc,
            mode=record.mode,
            dave_protocol_version=record.dave_version,
            max_dave_protocol_version=record.max_dave_version,
            connected=record.connection is not None,
            ended=record.ended,
            opcodes=dict(activity.opcodes),
            opcode_order=tuple(activity.opcode_order),
            speaking=tuple(activity.speaking),
            rtp=record.media.stats.summary(),
            forwarded_to_client=record.media.forwarded_to_client,
            closes_sent=tuple(activity.closes_sent),
            connections=activity.connections,
            resumes=activity.resumes,
            last_seq_ack=activity.last_seq_ack,
            heartbeats=activity.heartbeats,
            dave_epoch=None if dave is None else dave.epoch,
            dave_roster=roster,
            dave_member=record.user_id in roster,
            dave_counters={} if dave is None else dict(dave.counters),
            identified_at=record.identified_at,
        )

    # ==== input handling ===================================================================================

    def _receive(self, conn: VoiceConnection, frame: str | bytes, now: float) -> None:
        message = self._decode(frame)
        op = int(message.op)
        conn.opcodes[op] += 1
        record = conn.session
        if record is not None:
            record.activity.opcode(op)
        if isinstance(message, Unknown):
            if op in _IGNORED_CLIENT_OPS:
                self.stats.ignored_ops[op] += 1
                return
            raise _Refuse(CloseCode.UNKNOWN_OPCODE, f"unknown opcode {op}")
        if isinstance(message, Heartbeat):
            self._heartbeat(conn, message, now)
            return
        if isinstance(message, Identify):
            self._identify(conn, message, now)
            return
        if isinstance(message, Resume):
            self._resume(conn, message, now)
            return
        if record is None:
            raise _Refuse(CloseCode.NOT_AUTHENTICATED, "not authenticated: send Identify first")
        if isinstance(message, SelectProtocol):
            self._select_protocol(record, message, now)
        elif isinstance(message, Speaking):
            self._speaking(record, message, now)
        else:
            self._dave_input(record, message, now)

    @staticmethod
    def _decode(frame: str | bytes) -> ClientMessage:
        """Decode a client frame; envelope failures are 4002, bad fields of a known opcode 4020."""
        try:
            return decode_client(frame)
        except FrameDecodeError as exc:
            raise _Refuse(CloseCode.DECODE_ERROR, str(exc)) from None
        except ProtocolError as exc:
            raise _Refuse(CloseCode.BAD_REQUEST, str(exc)) from None

    def _heartbeat(self, conn: VoiceConnection, message: Heartbeat, now: float) -> None:
        conn.heartbeat_deadline = now + self.config.heartbeat_deadline
        self.stats.heartbeats += 1
        record = conn.session
        if record is not None:
            record.activity.heartbeats += 1
            record.activity.last_seq_ack = message.seq_ack
            if record.withhold_acks:
                record.activity.acks_withheld += 1
                self.stats.acks_withheld += 1
                if record.acks_to_withhold is not None:
                    record.acks_to_withhold -= 1
                    if record.acks_to_withhold <= 0:
                        record.withhold_acks = False
                        record.acks_to_withhold = None
                return
        self._control(conn, HeartbeatAck(nonce=message.nonce))

    def _identify(self, conn: VoiceConnection, message: Identify, now: float) -> None:
        if conn.session is not None:
            raise _Refuse(CloseCode.ALREADY_AUTHENTICATED, "already authenticated")
        voice = self.state.lookup_voice_session(
            message.server_id, message.user_id, message.session_id, message.token
        )
        if voice is None or voice.voice_server_id != self.server_id:
            raise _Refuse(CloseCode.AUTHENTICATION_FAILED, "authentication failed")
        try:
            channel = self.state.channel(voice.channel_id)
        except EmulatorError:
            raise _Refuse(CloseCode.AUTHENTICATION_FAILED, "the session's channel no longer exists") from None
        if channel.dave_required and message.max_dave_protocol_version < 1:
            raise _Refuse(CloseCode.E2EE_REQUIRED, "this channel requires the DAVE protocol (E2EE)")
        old = self.sessions.get((voice.guild_id, voice.user_id))
        if old is not None:
            self._end_session(
                old, now, close=(CloseCode.SESSION_NO_LONGER_VALID, "replaced by a new Identify")
            )
        media = self.media.register(voice.user_id, self.media.allocate_ssrc(), voice.channel_id)
        record = VoiceSessionRecord(
            voice,
            media,
            max_dave_version=message.max_dave_protocol_version,
            dave_version=min(message.max_dave_protocol_version, channel.dave_protocol_version),
            replay_limit=self.config.replay_limit,
            identified_at=now,
        )
        record.activity.opcode(int(message.op))
        self.sessions[(voice.guild_id, voice.user_id)] = record
        self._by_token[voice.token] = record
        history = self._history.setdefault(voice.user_id, deque(maxlen=_HISTORY_PER_USER))
        history.append(record)
        self.stats.identifies += 1
        self._attach(record, conn)
        call = self.calls.get(voice.channel_id)
        if call is None:
            call = self.calls[voice.channel_id] = VoiceCall(voice.channel_id, voice.guild_id)
        others = list(call.members.values())
        call.members[voice.user_id] = record
        host, port = self.media_address
        self._emit(record, Ready(ssrc=record.ssrc, ip=host, port=port, modes=self.config.ready_modes))
        if others:
            self._emit(record, ClientsConnect(user_ids=tuple(other.user_id for other in others)))
        for other in others:
            self._emit(other, ClientsConnect(user_ids=(record.user_id,)))

    def _resume(self, conn: VoiceConnection, message: Resume, now: float) -> None:
        if conn.session is not None:
            raise _Refuse(CloseCode.ALREADY_AUTHENTICATED, "already authenticated")
        record = self._by_token.get(message.token)
        if (
            record is None
            or record.ended
            or record.voice.session_id != message.session_id
            or record.guild_id != message.server_id
        ):
            raise _Refuse(CloseCode.SESSION_NO_LONGER_VALID, "session no longer valid")
        missed = record.missed_since(message.seq_ack)
        if missed is None:
            # The session is over for every socket: one still attached would live on unauthenticated.
            ended = (CloseCode.SESSION_NO_LONGER_VALID, "session no longer valid")
            self._end_session(record, now, close=ended)
            raise _Refuse(
                CloseCode.SESSION_NO_LONGER_VALID, "the messages after seq_ack are no longer buffered"
            )
        old = record.connection
        if old is not None:
            record.connection = None
            old.session = None
            self._close(old, 1001, "session resumed on another connection", now)
        record.activity.opcode(int(message.op))
        record.activity.resumes += 1
        self.stats.resumes += 1
        self.stats.replayed += len(missed)
        self._attach(record, conn)
        self._control(conn, Resumed())
        for frame in missed:
            self._batch.append((conn, frame))

    def _attach(self, record: VoiceSessionRecord, conn: VoiceConnection) -> None:
        record.connection = conn
        record.detached_at = None
        record.activity.connections += 1
        conn.session = record
        conn.channel_id = record.channel_id
        self.deadlines_changed = True

    def _select_protocol(self, record: VoiceSessionRecord, message: SelectProtocol, now: float) -> None:
        if record.mode is not None:
            raise _Refuse(CloseCode.BAD_REQUEST, "the protocol was already selected for this session")
        if message.protocol != "udp":
            raise _Refuse(CloseCode.UNKNOWN_PROTOCOL, f"unknown protocol {message.protocol[:40]!r}")
        if message.mode not in self.config.usable_modes:
            raise _Refuse(CloseCode.UNKNOWN_ENCRYPTION_MODE, f"unknown encryption mode {message.mode[:60]!r}")
        try:
            address = str(ipaddress.ip_address(message.address))
        except ValueError:
            raise _Refuse(CloseCode.BAD_REQUEST, "data.address is not an IP address") from None
        if not 0 < message.port <= 0xFFFF:
            raise _Refuse(CloseCode.BAD_REQUEST, "data.port must be 1..65535")
        key = secrets.token_bytes(32)
        record.mode = message.mode
        self.media.select(record.media, (address, message.port), make_cipher(message.mode, key))
        self._emit(
            record,
            SessionDescription(
                mode=message.mode,
                secret_key=key,
                dave_protocol_version=record.dave_version,
                audio_codec="opus",
                video_codec="H264",
                media_session_id=secrets.token_hex(16),
            ),
        )
        call = self.calls[record.channel_id]
        if record.dave_version > 0:
            if call.dave is None:
                call.dave = DaveDeliveryService(
                    record.channel_id,
                    protocol_version=record.dave_version,
                    transition_timeout=self.config.transition_timeout,
                    now=now,
                )
            record.dave_connected = True
            self._route(call, call.dave.member_connected(record.user_id, now=now))
        for other in call.members.values():
            if other is not record and other.speaking is not None:
                self._emit(record, Speaking(speaking=other.speaking, ssrc=other.ssrc, user_id=other.user_id))

    def _speaking(self, record: VoiceSessionRecord, message: Speaking, now: float) -> None:
        if message.ssrc != record.ssrc:
            raise _Refuse(CloseCode.BAD_REQUEST, f"op 5 names SSRC {message.ssrc}, not the session's")
        record.speaking = message.speaking
        record.activity.speaking.append(SpeakingEvent(now, message.speaking, message.ssrc))
        self.media.bind_speaking(record.media)
        relay = Speaking(speaking=message.speaking, ssrc=record.ssrc, user_id=record.user_id)
        for other in self.calls[record.channel_id].members.values():
            if other is not record:
                self._emit(other, relay)

    def _dave_input(self, record: VoiceSessionRecord, message: ClientMessage, now: float) -> None:
        call = self.calls[record.channel_id]
        dave = call.dave
        if dave is None or not record.dave_connected:
            record.activity.dave_ignored += 1
            self.stats.dropped["dave_without_session"] += 1
            return
        user_id = record.user_id
        if isinstance(message, DaveMlsKeyPackage):
            out = dave.key_package_received(user_id, message.key_package, now=now)
        elif isinstance(message, DaveMlsCommitWelcome):
            out = dave.commit_welcome_received(user_id, message.commit_welcome, now=now)
        elif isinstance(message, DaveTransitionReady):
            out = dave.transition_ready(user_id, message.transition_id, now=now)
        elif isinstance(message, DaveMlsInvalidCommitWelcome):
            out = dave.invalid_commit_welcome(user_id, message.transition_id, now=now)
        else:  # pragma: no cover - every client message type is handled above
            raise _Refuse(CloseCode.UNKNOWN_OPCODE, f"unexpected opcode {int(message.op)}")
        self._route(call, out)

    # ==== sessions ========================================================================================

    def _end_session(
        self, record: VoiceSessionRecord, now: float, close: tuple[int, str] | None = None
    ) -> None:
        """The member leaves the call: op 13 to the rest, out of the DAVE group and the media server."""
        if record.ended:
            return
        record.ended = True
        self.stats.sessions_ended += 1
        self.deadlines_changed = True
        conn = record.connection
        record.connection = None
        if conn is not None:
            if close is not None:
                self._close(conn, close[0], close[1], now)
            conn.session = None
        key = (record.guild_id, record.user_id)
        if self.sessions.get(key) is record:
            del self.sessions[key]
        if self._by_token.get(record.voice.token) is record:
            del self._by_token[record.voice.token]
        call = self.calls.get(record.channel_id)
        if call is not None and call.members.get(record.user_id) is record:
            del call.members[record.user_id]
            for other in call.members.values():
                self._emit(other, ClientDisconnect(user_id=record.user_id))
            if record.dave_connected and call.dave is not None:
                self._route(call, call.dave.member_disconnected(record.user_id, now=now))
            if not call.members:
                del self.calls[record.channel_id]
        self.media.unregister(record.media)

    # ==== output ==========================================================================================

    def _route(self, call: VoiceCall, out: DsOutput) -> None:
        self.deadlines_changed = True
        for user_id, action in out:
            target = call.members.get(user_id)
            if target is None:
                self.stats.dropped["dave_action_for_absent_member"] += 1
                continue
            self._emit(target, _dave_message(action))

    def _emit(self, record: VoiceSessionRecord, message: ServerMessage) -> None:
        """Number a message, keep it for replay, and queue it if the session has a socket."""
        record.seq = (record.seq + 1) & _SEQ_MASK
        frame = encode_server(message, record.seq)
        record.replay.append(frame)
        record.sent_total += 1
        if record.connection is not None:
            self._batch.append((record.connection, frame))

    def _control(self, conn: VoiceConnection, message: ServerMessage) -> None:
        """An unnumbered per-socket message (Hello, Heartbeat ACK, Resumed)."""
        self._batch.append((conn, encode_server(message)))

    def _close(self, conn: VoiceConnection, code: int, reason: str, now: float) -> None:
        if conn.closing:
            return
        conn.closing = True
        conn.sent_close = code
        self.stats.closes[code] += 1
        record = conn.session
        if record is not None:
            record.activity.closes_sent.append(code)
        self._batch.append((conn, _Close(code, _truncate(reason))))
        if record is not None and not _resumable(code):
            self._end_session(record, now)

    def _flush(self) -> None:
        """Hand this input's output to the sockets, shuffled per channel where configured."""
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        groups: dict[VoiceConnection, list[_Item]] = {}
        for conn, item in batch:
            groups.setdefault(conn, []).append(item)
        shuffled: dict[int, list[tuple[VoiceConnection, list[_Item]]]] = {}
        for conn, items in groups.items():
            if conn.channel_id is not None and conn.channel_id in self._delivery:
                shuffled.setdefault(conn.channel_id, []).append((conn, items))
            else:
                _deliver(conn, items, 0.0)
        for channel_id, entries in shuffled.items():
            order = self._delivery[channel_id]
            order.rng.shuffle(entries)
            for conn, items in entries:
                _deliver(conn, items, order.rng.uniform(0.0, order.max_delay))


def _deliver(conn: VoiceConnection, items: Iterable[_Item], delay: float) -> None:
    for item in items:
        if isinstance(item, _Close):
            conn.outbox.close(item.code, item.reason)
        else:
            conn.outbox.send(item, delay)


def _truncate(reason: str) -> str:
    """WebSocket close reasons must fit in 123 bytes."""
    encoded = reason.encode("utf-8")
    if len(encoded) <= _MAX_REASON:
        return reason
    return encoded[:_MAX_REASON].decode("utf-8", "ignore")


def _dave_message(action: DsAction) -> ServerMessage:
    if isinstance(action, SendExternalSender):
        return DaveMlsExternalSender(external_sender=action.data)
    if isinstance(action, SendProposals):
        return DaveMlsProposals(operation=ProposalsOperation(action.op_type), proposals=action.proposals)
    if isinstance(action, SendAnnounceCommit):
        return DaveMlsAnnounceCommitTransition(transition_id=action.transition_id, commit=action.commit)
    if isinstance(action, SendWelcome):
        return DaveMlsWelcome(transition_id=action.transition_id, welcome=action.welcome)
    if isinstance(action, SendPrepareTransition):
        return DavePrepareTransition(
            protocol_version=action.protocol_version, transition_id=action.transition_id
        )
    if isinstance(action, SendExecuteTransition):
        return DaveExecuteTransition(transition_id=action.transition_id)
    if isinstance(action, SendPrepareEpoch):
        return DavePrepareEpoch(protocol_version=action.protocol_version, epoch=action.epoch)
    raise EmulatorError(f"unknown DAVE action {action!r}")  # pragma: no cover
