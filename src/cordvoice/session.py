"""A bot's voice connection in one guild: join, speak, survive what Discord does to it, leave.

A :class:`Session` is created by :meth:`cordvoice.Voice.join_channel`. One task (the *runner*) drives its
whole life: it waits for the main gateway's VOICE_STATE_UPDATE and VOICE_SERVER_UPDATE, opens the voice
WebSocket, sets up UDP and DAVE, then serves the socket until it ends, and asks the
:class:`~cordvoice.reconnect.ReconnectPolicy` what to do next. Everything that arrives from the main gateway
meanwhile (a server move, a kick, ``endpoint: null``, a replaced gateway session) *interrupts* the current
step: the runner sees it at its next await and acts on it.

What survives what:

* **resume** (4015, a network drop, three missed heartbeat ACKs): only the WebSocket is new. The UDP socket,
  SSRC, transport key and nonce counter, DAVE state and the transmit lane keep going; audio does not stop.
* **rejoin** (4004/4006/4009/4011, the gateway session lost) and **move** (a new VOICE_SERVER_UPDATE or
  channel): a fresh voice session (new socket, SSRC, key, DAVE group). Queued audio waits and continues on the
  new server.
* **final** (a kick, 4014/4022 without a move, 4017, 4021, ..., or the reconnect budget spent): exactly one
  :class:`~cordvoice.events.DisconnectedEvent`, no retry.

Sending rides the process-wide clock through :class:`~cordvoice.audio.transmit.TransmitLane` (see its module
for the backpressure, DAVE-not-ready and underrun policies).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import math
import ssl as ssl_module
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeAlias, TypeVar

import davey

from cordvoice.audio.clock import get_clock
from cordvoice.audio.opus import packet_samples
from cordvoice.audio.pcm import FRAME_SAMPLES
from cordvoice.audio.transmit import FrameProvider, FrameQueue, TransmitLane
from cordvoice.dave.session import DaveClient
from cordvoice.errors import (
    AudioError,
    DaveRequiredError,
    DisconnectedError,
    GatewayError,
    InvalidArgumentError,
    ProtocolError,
    VoiceError,
)
from cordvoice.events import (
    ClientConnectEvent,
    ClientDisconnectEvent,
    DaveEpochEvent,
    DisconnectedEvent,
    EventHub,
    MovedEvent,
    ReadyEvent,
    ReconnectAction,
    ReconnectingEvent,
    ResumedEvent,
    SessionEvent,
    SpeakingEvent,
    check_event_type,
    check_snowflake,
)
from cordvoice.gateway.adapter import VoiceAdapter
from cordvoice.gateway.events import VoiceServerUpdate, VoiceStateUpdate
from cordvoice.reconnect import ConnectionEnd, Decision, EndKind, ReconnectConfig, ReconnectPolicy
from cordvoice.udp.connection import DialFunc, ReceiveHook, UdpConnection, UdpStats
from cordvoice.udp.crypto import make_cipher
from cordvoice.udp.rtp import RtpHeader
from cordvoice.udp.sender import RtpSender
from cordvoice.voicegateway.connection import RESUME_CLOSE_CODE, VoiceGatewayConnection
from cordvoice.voicegateway.messages import SpeakingFlag
from cordvoice.voicegateway.protocol import (
    Credentials,
    DaveEpoch,
    HeartbeatAcked,
    HelloReceived,
    Malformed,
    NoUsableMode,
    Output,
    PeerDisconnected,
    PeersConnected,
    PeerSpeaking,
    ReadyReceived,
    ResumedReceived,
    Send,
    SessionDescribed,
    VoiceGatewayProtocol,
)

if TYPE_CHECKING:
    from cordvoice.audio.player import Player
    from cordvoice.audio.receiver import FrameStream, Receiver
    from cordvoice.audio.sources import SourceLike
    from cordvoice.audio.track import Track

__all__ = ["Session", "SessionConfig", "SessionState", "SessionStats"]

logger = logging.getLogger(__name__)

E = TypeVar("E", bound=SessionEvent)
_MAX_UNSENT = 32
"""Frames kept for re-sending after a resume (replies that could not go out while the socket died)."""
_SERVER_UPDATE_GRACE = 0.25
"""After a rejoin's or a channel move's VOICE_STATE_UPDATE, seconds to wait for a VOICE_SERVER_UPDATE before
reusing the token."""
_TICK_INTERVAL = 2.0
"""Seconds between the protocol core's ``tick`` calls on an established connection (DAVE stall recovery)."""
_LEAVE_TIMEOUT = 150.0
"""Bound on a leave's op 4. Discord allows 120 gateway payloads a minute, so a bot leaving many guilds at once
(``Voice.close()``) queues its leaves behind a minute or two of joins; only a hung adapter should hit this."""


class SessionState(enum.Enum):
    """Where a session is in its life."""

    CONNECTING = "connecting"
    """Joining: waiting for Discord's credentials, or the voice handshake."""
    READY = "ready"
    """Connected; audio can flow (once DAVE is ready, on DAVE calls)."""
    RESUMING = "resuming"
    """The WebSocket is being resumed; UDP keeps running."""
    RECONNECTING = "reconnecting"
    """A fresh connection is being made (rejoin, move, or waiting for one)."""
    DISCONNECTED = "disconnected"
    """Over for good."""


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Per-session settings; :class:`~cordvoice.Voice` builds it from its own arguments."""

    ssl: ssl_module.SSLContext | bool = True
    dial: DialFunc | None = None
    dave: bool = True
    queue_frames: int = 5
    reconnect: ReconnectConfig = field(default_factory=ReconnectConfig)
    open_timeout: float = 10.0
    handshake_timeout: float = 10.0
    discovery_timeout: float = 5.0
    idle_grace: float = 0.2


@dataclass(frozen=True, slots=True)
class SessionStats:
    """A snapshot of a session's counters (``session.stats``); nothing is dropped without a count here."""

    frames_sent: int
    silence_sent: int
    frames_dropped: int
    late_ticks: int
    skipped_ticks: int
    dave_withheld: int
    """Clock ticks on which audio waited because DAVE was required and not ready."""
    no_transport_ticks: int
    underruns: int
    resumes: int
    reconnects: int
    """Fresh connections after a failure (rejoins and fresh identifies)."""
    moves: int
    gateway_latency: float | None
    heartbeats_sent: int
    heartbeats_acked: int
    malformed_messages: int
    clock_lateness: dict[str, float | int]
    udp_received: int
    udp_rtp: int
    udp_rtcp: int
    udp_dropped: int
    udp_undecryptable: int
    udp_malformed: int
    udp_keepalives: int
    received_per_ssrc: dict[int, int]
    """Authenticated RTP packets per SSRC (at most ``MAX_TRACKED_SSRCS`` SSRCs are tracked one by one)."""
    dave_encrypted: int
    dave_encrypt_failures: int
    dave_recoveries: int
    udp_foreign: int = 0
    """Datagrams from an address other than the voice server's, dropped (also in ``udp_dropped``)."""
    udp_untracked_ssrcs: int = 0
    """Authenticated RTP packets of SSRCs beyond those ``received_per_ssrc`` tracks one by one."""
    replies_dropped: int = 0
    """Gateway replies that could not be sent while the socket died and did not fit the resend buffer."""
    udp_sent: int = 0
    """Datagrams other than audio sent on the socket (keep-alives, IP discovery)."""
    udp_send_errors: int = 0
    udp_before_key: int = 0
    """RTP received before the Session Description gave a key, dropped (also in ``udp_dropped``)."""
    udp_discovery: int = 0
    udp_socket_errors: int = 0
    """Errors the socket reported (ICMP port unreachable while the server restarts); not fatal."""
    udp_hook_errors: int = 0
    """Authenticated RTP packets the receive pipeline failed on (logged; the packet is lost)."""
    dave_encrypted_in_transition: int = 0
    """Of ``dave_encrypted``, frames sent with a new epoch's key before its transition executed (op 22):
    members that had not applied the commit yet could not decrypt them (davey switches keys at commit)."""


class _Interrupt(enum.Enum):
    """Main-gateway news that ends the current step (highest priority first)."""

    LEAVE = 0
    KICK = 1
    GATEWAY_LOST = 2
    SERVER_LOST = 3
    MOVE = 4


class _Final(Exception):
    """Internal: the session is over; carries what the Disconnected event says."""

    def __init__(
        self, reason: str, code: int | None, error: VoiceError | None, *, leave: bool = True
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.error = error
        self.leave = leave
        """Send op 4 with a null channel: Discord still thinks we are in the channel."""


class _UdpFailed(Exception):
    pass


_Outcome: TypeAlias = ConnectionEnd | _Interrupt


class Session:
    """One guild's voice connection. Get it from :meth:`cordvoice.Voice.join_channel`."""

    def __init__(
        self,
        adapter: VoiceAdapter,
        *,
        guild_id: int,
        channel_id: int,
        user_id: int,
        self_mute: bool = False,
        self_deaf: bool = False,
        config: SessionConfig | None = None,
        on_closed: Callable[[Session], None] | None = None,
    ) -> None:
        self.config = config or SessionConfig()
        self.guild_id = guild_id
        self._adapter = adapter
        self._user_id = user_id
        self._channel_id = channel_id
        self._voice_flags = (self_mute, self_deaf)
        """self_mute and self_deaf of the last op 4 that joined or moved: a rejoin asks with the same."""
        self._on_closed = on_closed
        self._loop = asyncio.get_running_loop()
        self._state = SessionState.CONNECTING
        self._policy = ReconnectPolicy(self.config.reconnect)

        # Main-gateway knowledge.
        self._vstate: VoiceStateUpdate | None = None
        self._vserver: VoiceServerUpdate | None = None
        self._state_gen = 0
        self._server_gen = 0
        self._null_server_gen = 0
        self._session_server_gen = 0
        """``_server_gen`` when the current voice session was made: later updates are news to it."""
        self._changed = asyncio.Event()
        self._interrupt: _Interrupt | None = None
        self._expect_null_state = 0
        self._last_close_code: int | None = None
        self._last_failure: str | None = None
        self._udp_failed = False
        self._unsent: list[str | bytes] = []
        self._replies_dropped = 0

        # The current voice session (one Identify) and its connection.
        self._protocol: VoiceGatewayProtocol | None = None
        self._creds_endpoint: str | None = None
        self._creds_token: str | None = None
        self._conn: VoiceGatewayConnection | None = None
        self._udp: UdpConnection | None = None
        self._udp_stats = UdpStats()
        self._sender: RtpSender | None = None
        self._dave_totals = [
            0,
            0,
            0,
        ]  # encrypt failures, recoveries, in-transition frames of replaced clients

        # Media.
        self._flags = int(SpeakingFlag.MICROPHONE)
        self._queue = FrameQueue(self.config.queue_frames)
        self._lane = TransmitLane(
            get_clock(self._loop),
            set_speaking=self._lane_speaking,
            idle_grace=self.config.idle_grace,
        )
        self._lane.set_provider(self._queue)
        self._receive_hook: ReceiveHook | None = None
        self._receiver_feeds: list[ReceiveHook] = []
        """Every receiver made with :meth:`Receiver.for_session` (``session.receiver`` and any made with other
        options), each fed beside the user's hook."""
        self._ssrc_users: dict[int, int] = {}
        self._speaking_task: asyncio.Task[None] | None = None
        self._speaking_unsent = False
        """An op 5 could not go out on the established session (no socket, or it died): a resume must send
        it, since op 9 brings no Session Description (whose op 5 carries the current flags)."""
        self._verification_cache: dict[tuple[int | None, int], str] = {}
        self._player: Player | None = None
        self._receiver: Receiver | None = None

        # Events and tasks.
        self._events = EventHub(self._spawn)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._joined: asyncio.Future[None] = self._loop.create_future()
        self._joined.add_done_callback(_consume_exception)
        self._final: DisconnectedEvent | None = None
        self._ending = False
        self._closed = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._leaving: asyncio.Task[None] | None = None
        self._never_asked = False
        """Set by Voice when the join's op 4 never went out: leaving then needs no op 4 (which could wait
        for a minute behind the gateway's send limit)."""
        self._resumes = 0
        self._reconnects = 0
        self._moves = 0
        self._malformed_before = 0
        self._heartbeats_before = [0, 0]

    def __repr__(self) -> str:
        return (
            f"<cordvoice.Session guild={self.guild_id} channel={self._channel_id} state={self._state.value} "
            f"ssrc={self.ssrc}>"
        )

    # ==== public state ===================================================================================

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def channel_id(self) -> int:
        """The channel the session is in (or joining)."""
        return self._channel_id

    @property
    def endpoint(self) -> str | None:
        return self._creds_endpoint

    @property
    def ssrc(self) -> int | None:
        return None if self._protocol is None else self._protocol.ssrc

    @property
    def mode(self) -> str | None:
        """The transport encryption mode in use."""
        return None if self._protocol is None else self._protocol.mode

    @property
    def dave_protocol_version(self) -> int | None:
        """0 for transport-only calls (stage channels), 1 with DAVE; None before Session Description."""
        return None if self._protocol is None else self._protocol.dave.protocol_version

    @property
    def dave_ready(self) -> bool:
        """True when audio is end-to-end encrypted (DAVE group ready), or the call needs no DAVE."""
        protocol = self._protocol
        if protocol is None or not protocol.established or self._final is not None:
            return False
        return not protocol.dave.dave_required or protocol.dave.ready

    @property
    def privacy_code(self) -> str | None:
        """The call's 30-digit voice privacy code (identical for every member), or None without DAVE."""
        return None if self._protocol is None else self._protocol.dave.privacy_code

    def verification_code(self, user_id: int) -> str | None:
        """The 45-digit pairwise code to compare with ``user_id`` out of band, or None.

        Warning: the first call per user and epoch costs one scrypt inside davey, which holds the GIL for
        0.2-0.4 s and so stalls every session's audio in the process. Call it on demand (a user asked to
        verify), never on a timer; results are cached until the DAVE epoch changes.
        """
        check_snowflake("user_id", user_id)
        protocol = self._protocol
        if protocol is None:
            return None
        key = (protocol.dave.epoch, user_id)
        code = self._verification_cache.get(key)
        if code is None:
            code = protocol.dave.verification_code(user_id)
            if code is not None:
                self._verification_cache[key] = code
        return code

    @property
    def latency(self) -> float | None:
        """Seconds between the last voice heartbeat and its ACK."""
        return None if self._protocol is None else self._protocol.latency

    @property
    def ssrc_users(self) -> dict[int, int]:
        """SSRC -> user id for the other members, from their op 5 (a copy)."""
        return dict(self._ssrc_users)

    @property
    def user_ids(self) -> frozenset[int]:
        """Other users announced in the call (op 11 minus op 13)."""
        protocol = self._protocol
        return frozenset() if protocol is None else protocol.dave.recognized_users

    @property
    def dave(self) -> DaveClient | None:
        """The current DAVE state machine (for the receive path's ``decrypt``)."""
        return None if self._protocol is None else self._protocol.dave

    @property
    def closed(self) -> bool:
        return self._final is not None

    @property
    def ending(self) -> bool:
        """True once the session has decided to end, while it may still be closing sockets or leaving the
        channel (its op 4 with no channel not sent yet); :attr:`closed` follows."""
        return self._ending or self._final is not None

    @property
    def disconnected_event(self) -> DisconnectedEvent | None:
        """How the session ended, once it has."""
        return self._final

    @property
    def last_failure(self) -> str | None:
        """Why the latest voice connection attempt failed (its ReconnectingEvent's reason), if one did."""
        return self._last_failure

    @property
    def stats(self) -> SessionStats:
        lane = self._lane.stats
        udp = self._udp_stats
        protocol = self._protocol
        dave = protocol.dave.stats if protocol is not None else None
        return SessionStats(
            frames_sent=lane.frames_sent,
            silence_sent=lane.silence_sent,
            frames_dropped=lane.dropped,
            late_ticks=self._lane.late,
            skipped_ticks=self._lane.skipped,
            dave_withheld=lane.dave_withheld,
            no_transport_ticks=lane.no_transport,
            underruns=lane.underruns,
            resumes=self._resumes,
            reconnects=self._reconnects,
            moves=self._moves,
            gateway_latency=self.latency,
            heartbeats_sent=self._heartbeats_before[0] + (protocol.heartbeats_sent if protocol else 0),
            heartbeats_acked=self._heartbeats_before[1] + (protocol.heartbeats_acked if protocol else 0),
            malformed_messages=self._malformed_before + (protocol.malformed if protocol else 0),
            clock_lateness=self._lane.lateness().summary(),
            udp_received=udp.received,
            udp_rtp=udp.rtp,
            udp_rtcp=udp.rtcp,
            udp_dropped=udp.dropped,
            udp_undecryptable=udp.undecryptable,
            udp_malformed=udp.malformed,
            udp_keepalives=udp.keepalives,
            received_per_ssrc=dict(udp.per_ssrc),
            dave_encrypted=lane.dave_encrypted,
            dave_encrypt_failures=self._dave_totals[0] + (dave.encrypt_failures if dave else 0),
            dave_recoveries=self._dave_totals[1] + (dave.recoveries if dave else 0),
            dave_encrypted_in_transition=self._dave_totals[2] + (dave.encrypted_in_transition if dave else 0),
            udp_foreign=udp.foreign,
            udp_untracked_ssrcs=udp.untracked_ssrcs,
            replies_dropped=self._replies_dropped,
            udp_sent=udp.sent,
            udp_send_errors=udp.send_errors,
            udp_before_key=udp.before_key,
            udp_discovery=udp.discovery,
            udp_socket_errors=udp.socket_errors,
            udp_hook_errors=udp.hook_errors,
        )

    # ==== events ========================================================================================

    def on(self, event_type: type[E], handler: Callable[[E], Awaitable[None] | None]) -> Callable[[], None]:
        """Call ``handler(event)`` for every event of ``event_type`` (or a subclass); returns an unsubscribe.

        Sync handlers run inline (keep them short); async ones run as tasks whose exceptions are logged.
        Subscribe to :class:`~cordvoice.events.SessionEvent` to get everything.
        """
        return self._events.on(event_type, handler)

    async def wait_for(
        self,
        event_type: type[E],
        check: Callable[[E], bool] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - mirrors discord.py's wait_for
    ) -> E:
        """The next event of ``event_type`` that passes ``check``; raises TimeoutError after ``timeout``.

        Raises DisconnectedError once the session has ended without such an event (its
        :class:`DisconnectedEvent`, the last one, is returned only if it is one and passes ``check``).
        """
        check_event_type(event_type)
        if timeout is not None and (
            not isinstance(timeout, int | float) or isinstance(timeout, bool) or math.isnan(timeout)
        ):
            raise InvalidArgumentError(f"timeout must be a number of seconds or None, got {timeout!r}")
        if self._final is not None:
            if isinstance(self._final, event_type) and (check is None or check(self._final)):
                return self._final
            raise self._closed_error()
        future: asyncio.Future[E] = self._loop.create_future()

        def on_event(event: SessionEvent) -> None:
            # One subscription to every event, so the session's end is judged in the same call: nothing can
            # follow a DisconnectedEvent that ``check`` rejects, however ``event_type`` relates to it.
            if future.done():
                return
            try:
                if isinstance(event, event_type) and (check is None or check(event)):
                    future.set_result(event)
                elif isinstance(event, DisconnectedEvent):
                    future.set_exception(self._closed_error())
            except Exception as exc:
                future.set_exception(exc)

        unsubscribe = self.on(SessionEvent, on_event)
        try:
            async with asyncio.timeout(timeout):
                return await future
        finally:
            unsubscribe()

    def _emit(self, event: SessionEvent) -> None:
        if isinstance(event, ReconnectingEvent):
            self._last_failure = event.reason
        self._events.emit(event)

    # ==== sending audio ====================================================================================

    async def speaking(self, flags: int = SpeakingFlag.MICROPHONE) -> None:
        """Send op 5 with ``flags`` (0 stops the indicator). Writing audio turns speaking on by itself."""
        self._check_loop()
        self._check_open()
        if not isinstance(flags, int) or not 0 <= flags <= 0xFFFF_FFFF:
            # Sent as is, the server would refuse it (4020) and end the session.
            raise InvalidArgumentError(f"speaking flags must be SpeakingFlag bits (a u32), got {flags!r}")
        self._flags = int(flags) or self._flags
        self._lane.mark_speaking(bool(flags))
        await self._send_speaking(int(flags))

    async def write(self, opus_frame: bytes) -> None:
        """Queue one 20 ms Opus frame; waits while the small queue is full (paced by the shared clock).

        Raises :class:`~cordvoice.errors.DisconnectedError` once the session has ended, and
        :class:`~cordvoice.errors.InvalidArgumentError` for bytes that are not one 20 ms Opus packet.
        """
        self._check_loop()
        self._check_open()
        if not isinstance(opus_frame, bytes | bytearray | memoryview):
            raise InvalidArgumentError(
                f"write() takes the bytes of one Opus frame, got {type(opus_frame).__name__}"
            )
        frame = bytes(opus_frame)
        if not frame:
            raise InvalidArgumentError("write() got an empty frame")
        try:
            samples = packet_samples(frame)
        except AudioError:
            samples = 0
        if samples != FRAME_SAMPLES:
            # Sent as is, PCM (the usual mix-up) decodes for nobody, and a 40/60 ms packet every 20 ms plays
            # too fast for the listeners.
            raise InvalidArgumentError(
                f"write() takes one 20 ms Opus frame; these {len(frame)} bytes are not one "
                f"({samples / 48:g} ms by their first byte): for PCM use session.play(pcm)"
            )
        if self._lane.provider is not self._queue:
            self._lane.set_provider(self._queue)
        await self._queue.put(frame)
        self._lane.wake()

    async def stop_speaking(self) -> None:
        """Send every queued frame, then five silence frames on the clock, then op 5 with speaking 0."""
        self._check_loop()
        if self._final is not None:
            return
        await self._lane.stop()
        task = self._speaking_task
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    @property
    def player(self) -> Player:
        """This session's :class:`~cordvoice.audio.player.Player` (created on first use).

        When it has audio it becomes the transmit lane's provider; :meth:`write` takes the lane back. Use
        one or the other at a time.
        """
        if self._player is None:
            from cordvoice.audio.player import Player  # noqa: PLC0415 - keeps `import cordvoice` light

            self._check_open()
            self._player = Player(on_audio=self._player_has_audio)
        return self._player

    def play(self, source: SourceLike, **options: Any) -> Track:
        """Play ``source`` now (mixed with anything else playing): ``self.player.play(source, **options)``."""
        self._check_loop()
        self._check_open()
        return self.player.play(source, **options)

    def _player_has_audio(self) -> None:
        player = self._player
        if player is not None and self._final is None:
            if self._lane.provider is not player:
                self._lane.set_provider(player)
            self._lane.wake()

    def set_provider(self, provider: FrameProvider | None) -> None:
        """Feed the transmit lane from ``provider`` instead of :meth:`write`'s queue (None: back to it).

        The provider is pulled once per 20 ms tick; call :meth:`wake` when it gets data after running dry.
        """
        if provider is not None and not callable(getattr(provider, "pull", None)):
            raise InvalidArgumentError(f"a frame provider has a pull() method; got {type(provider).__name__}")
        self._lane.set_provider(provider if provider is not None else self._queue)

    def wake(self) -> None:
        """Tell the transmit lane its provider has data again."""
        self._lane.wake()

    @property
    def queued_frames(self) -> int:
        return len(self._queue)

    # ==== receiving =======================================================================================

    @property
    def receiver(self) -> Receiver:
        """This session's :class:`~cordvoice.audio.receiver.Receiver`, created and hooked up on first use."""
        if self._receiver is None or self._receiver.closed:
            from cordvoice.audio.receiver import Receiver  # noqa: PLC0415 - keeps `import cordvoice` light

            self._check_open()
            self._receiver = Receiver.for_session(self)
        return self._receiver

    def listen(self, user_id: int | None = None, *, pcm: bool = False, maxsize: int = 3000) -> FrameStream:
        """Incoming frames of every user (or of ``user_id``), with PCM if ``pcm``: ``receiver.listen(...)``.

        ``async with session.listen() as frames: async for frame in frames: ...``
        """
        self._check_loop()
        return self.receiver.listen(user_id, pcm=pcm, maxsize=maxsize)

    @property
    def receive_hook(self) -> ReceiveHook | None:
        return self._receive_hook

    def set_receive_hook(self, hook: ReceiveHook | None) -> None:
        """Call ``hook(header, payload, arrival_time)`` for every authenticated RTP packet received.

        ``payload`` is transport-decrypted; in a DAVE call it is still a DAVE frame (decrypt it with
        ``session.dave.decrypt(user_id, payload)``, the user from :attr:`ssrc_users`). The hook runs beside
        :attr:`receiver` (after it), so ``listen()`` and recordings keep working.
        """
        if hook is not None and not callable(hook):
            raise InvalidArgumentError(f"a receive hook must be callable, got {type(hook).__name__}")
        self._receive_hook = hook
        self._route_received()

    def _add_receiver_feed(self, feed: ReceiveHook) -> None:
        """Hand received packets to a receiver too (:meth:`Receiver.for_session` calls this)."""
        self._receiver_feeds.append(feed)
        self._route_received()

    def _remove_receiver_feed(self, feed: ReceiveHook) -> None:
        """Stop feeding a receiver (it closed); the others and the user's hook keep theirs."""
        if feed in self._receiver_feeds:
            self._receiver_feeds.remove(feed)
            self._route_received()

    def _route_received(self) -> None:
        if self._udp is not None:
            self._udp.receive_hook = self._packet_hook()

    def _packet_hook(self) -> ReceiveHook | None:
        """The one callable the UDP layer calls per packet: the receivers', then the user's, in turn."""
        hooks = [*self._receiver_feeds, *([self._receive_hook] if self._receive_hook is not None else [])]
        if len(hooks) <= 1:
            return hooks[0] if hooks else None

        def each(header: RtpHeader, payload: bytes, arrival: float) -> None:
            for hook in hooks:
                hook(header, payload, arrival)

        return each

    # ==== lifecycle =======================================================================================

    def start(self) -> None:
        """Start the runner (``Voice.join_channel`` does this)."""
        if self._runner is None:
            self._runner = self._loop.create_task(self._run(), name=f"cordvoice-session-{self.guild_id}")

    async def wait_ready(self) -> None:
        """Wait until the first connection is ready; raises the error that ended the session instead."""
        await asyncio.shield(self._joined)

    async def wait_closed(self) -> DisconnectedEvent:
        """Wait until the session ended; returns its Disconnected event."""
        await self._closed.wait()
        assert self._final is not None
        return self._final

    async def disconnect(self) -> None:
        """Leave the voice channel and close everything (idempotent; concurrent calls share one leave)."""
        self._check_loop()
        if self._final is None:
            if self._leaving is None:
                self._leaving = self._loop.create_task(self._leave(), name="cordvoice-session-leave")
            await asyncio.shield(self._leaving)
        await self._drain_tasks()

    async def _leave(self) -> None:
        self._raise_interrupt(_Interrupt.LEAVE)
        runner = self._runner
        if runner is not None and not runner.done() and runner is not asyncio.current_task():
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner
        await self._teardown(leave_channel=self._final is None and not self._never_asked)
        self._finish("left the voice channel", None, None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.disconnect()

    # ==== main-gateway input (from Voice; must not block) =================================================

    def _on_voice_state(self, event: VoiceStateUpdate) -> None:
        if self._final is not None:
            return
        self._state_gen += 1
        if event.channel_id is None:
            if self._expect_null_state:
                self._expect_null_state -= 1  # the echo of our own "leave" half of a rejoin
            elif self._vstate is None:
                pass  # before our join was answered: the echo of an earlier leave in this guild
            elif self._interrupt is not _Interrupt.LEAVE:
                logger.info("guild %d: removed from the voice channel by Discord", self.guild_id)
                self._raise_interrupt(_Interrupt.KICK)
        else:
            self._vstate = event
            self._expect_null_state = 0  # any echo of our own leave came before this, on the same socket
            if self._protocol is not None and event.channel_id != self._channel_id:
                # Moved: its VOICE_SERVER_UPDATE may already have been acted on (any order, protocol.md §1.2).
                self._raise_interrupt(_Interrupt.MOVE)
        self._changed.set()

    def _on_voice_server(self, event: VoiceServerUpdate) -> None:
        if self._final is not None:
            return
        self._server_gen += 1
        self._vserver = event
        if event.endpoint is None:
            self._null_server_gen = self._server_gen
        if self._protocol is not None or self._conn is not None:
            if event.endpoint is None:
                self._raise_interrupt(_Interrupt.SERVER_LOST)
            elif event.endpoint != self._creds_endpoint or event.token != self._creds_token:
                self._raise_interrupt(_Interrupt.MOVE)
        self._changed.set()

    def _on_gateway_session_lost(self) -> None:
        if self._final is None:
            self._raise_interrupt(_Interrupt.GATEWAY_LOST)

    def _raise_interrupt(self, interrupt: _Interrupt) -> None:
        current = self._interrupt
        if current is None or interrupt.value < current.value:
            self._interrupt = interrupt
        self._changed.set()
        conn = self._conn
        if conn is not None:
            self._spawn(conn.close(1000, "cordvoice: voice session interrupted"), "cordvoice-close")

    def _take_interrupt(self) -> _Interrupt | None:
        interrupt, self._interrupt = self._interrupt, None
        return interrupt

    # ==== the runner =====================================================================================

    async def _run(self) -> None:
        try:
            await self._lifecycle()
        except _Final as final:
            await self._teardown(leave_channel=final.leave)
            self._finish(final.reason, final.code, final.error)
        except asyncio.CancelledError:
            await self._teardown(leave_channel=False)
            raise
        except Exception as exc:  # a bug: end the session loudly rather than hang
            logger.exception("guild %d: the voice session failed", self.guild_id)
            await self._teardown(leave_channel=True)
            self._finish(
                f"internal error: {exc!r}", None, VoiceError(f"cordvoice failed internally: {exc!r}")
            )

    async def _lifecycle(self) -> None:
        if await self._await_credentials(after_server_gen=0, within=None):
            self._new_voice_session()
        else:
            await self._handle_pending_interrupt()
        resume = False
        while True:
            outcome = await self._connect(resume=resume)
            resume = False
            if isinstance(outcome, _Interrupt):
                await self._handle_interrupt(outcome)
                continue
            if outcome.code is not None:
                self._last_close_code = outcome.code
            interrupt = self._take_interrupt()  # news that came while the socket was closing
            if interrupt is not None:
                await self._handle_interrupt(interrupt)
                continue
            decision = self._policy.decide(outcome, self._loop.time())
            resume = await self._carry_out(decision, outcome)

    async def _handle_pending_interrupt(self) -> None:
        interrupt = self._take_interrupt()
        assert interrupt is not None
        await self._handle_interrupt(interrupt)

    async def _handle_interrupt(self, interrupt: _Interrupt) -> None:
        if interrupt is _Interrupt.LEAVE:
            raise _Final("left the voice channel", None, None)
        if interrupt is _Interrupt.KICK:
            self._raise_kicked()
        if interrupt is _Interrupt.GATEWAY_LOST:
            end = ConnectionEnd(EndKind.GATEWAY_SESSION_LOST, established=self._established())
            decision = self._policy.decide(end, self._loop.time())
            await self._carry_out(decision, end)
            return
        if interrupt is _Interrupt.SERVER_LOST:
            await self._wait_for_server()
            return
        await self._start_move()

    def _raise_kicked(self) -> None:
        code = self._last_close_code
        info = f" (close code {code})" if code is not None else ""
        message = (
            f"removed from the voice channel by Discord: kicked, moved away or the channel was deleted{info}"
        )
        raise _Final(message, code, DisconnectedError(message, code=code), leave=False)

    async def _carry_out(self, decision: Decision, end: ConnectionEnd) -> bool:
        """Do what the policy decided; returns True when the next connection is a resume."""
        if decision.action is None:
            assert decision.error is not None
            error = decision.error
            if isinstance(error, DaveRequiredError):
                error = self._dave_required_error(end)
            raise _Final(str(error), decision.close_code, error)
        action = decision.action
        logger.info(
            "guild %d: voice connection lost (%s); %s attempt %d in %.2f s",
            self.guild_id,
            decision.reason,
            action.value,
            decision.attempt,
            decision.delay,
        )
        self._emit(
            ReconnectingEvent(
                self.guild_id, action, decision.attempt, decision.delay, decision.close_code, decision.reason
            )
        )
        if action is ReconnectAction.WAIT_FOR_MOVE:
            self._set_state(SessionState.RECONNECTING)
            self._close_voice_session()
            if await self._wait_for_move(decision.delay):
                return False
            final = self._policy.move_wait_expired(end)
            assert final.error is not None
            raise _Final(final.reason, final.close_code, final.error)
        if action is ReconnectAction.RESUME:
            self._set_state(SessionState.RESUMING)
            if not await self._sleep_unless_interrupted(decision.delay):
                return False
            self._resumes += 1
            return True
        self._set_state(SessionState.RECONNECTING)
        self._close_voice_session()
        if not await self._sleep_unless_interrupted(decision.delay):
            return False
        self._reconnects += 1
        if action is ReconnectAction.REJOIN and not await self._rejoin(decision.attempt):
            return False
        if await self._ensure_credentials():
            self._new_voice_session()
        else:
            await self._handle_pending_interrupt()
        return False

    async def _ensure_credentials(self) -> bool:
        """Usable credentials for a fresh Identify, waiting ``server_wait`` for them if need be.

        False if the main gateway lost its session meanwhile (see :meth:`_await_credentials`).
        """
        try:
            return await self._await_credentials(
                after_server_gen=-1, within=self.config.reconnect.server_wait
            )
        except TimeoutError:
            message = "Discord gave no voice server to connect to in time."
            raise _Final(message, None, DisconnectedError(message)) from None

    # ---- waiting for the main gateway ---------------------------------------------------------------------

    async def _await_credentials(self, *, after_server_gen: int, within: float | None) -> bool:
        """Wait for a voice state in a channel and a VOICE_SERVER_UPDATE newer than ``after_server_gen``.

        False, with the GATEWAY_LOST interrupt left pending, if the main gateway lost its session first: what
        was awaited (or the op 4 that asked for it) died with that session, so the caller must rejoin.
        """
        async with asyncio.timeout(within):
            while not self._have_credentials(after_server_gen):
                if self._interrupt is _Interrupt.GATEWAY_LOST:
                    return False
                await self._wait_changed()
        return True

    def _have_credentials(self, after_server_gen: int) -> bool:
        return (
            self._vstate is not None
            and self._vserver is not None
            and self._vserver.endpoint is not None
            and self._server_gen > after_server_gen
        )

    async def _wait_changed(self) -> None:
        """Wait for any main-gateway news; a kick or leave ends the wait with _Final."""
        self._changed.clear()
        self._check_fatal_interrupt()
        await self._changed.wait()
        self._check_fatal_interrupt()

    def _check_fatal_interrupt(self) -> None:
        if self._interrupt is _Interrupt.LEAVE:
            raise _Final("left the voice channel", None, None)
        if self._interrupt is _Interrupt.KICK:
            self._interrupt = None
            self._raise_kicked()

    async def _sleep_unless_interrupted(self, delay: float) -> bool:
        """Sleep ``delay`` s; False (and the interrupt handled) if main-gateway news arrived meanwhile."""
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    while self._interrupt is None:
                        await self._wait_changed()
        self._check_fatal_interrupt()
        interrupt = self._take_interrupt()
        if interrupt is None:
            return True
        await self._handle_interrupt(interrupt)
        return False

    async def _wait_for_move(self, wait: float) -> bool:
        """After 4014/4022: True if Discord announced a move (handled), False if ``wait`` s passed."""
        generation = self._server_gen
        try:
            async with asyncio.timeout(wait):
                while True:
                    interrupt = self._take_interrupt()
                    if interrupt is _Interrupt.SERVER_LOST:
                        await self._wait_for_server()
                        return True
                    if interrupt is not None and interrupt is not _Interrupt.MOVE:
                        await self._handle_interrupt(interrupt)
                        return True
                    if self._have_credentials(generation) or interrupt is _Interrupt.MOVE:
                        await self._start_move()
                        return True
                    await self._wait_changed()
        except TimeoutError:
            return False

    async def _wait_for_server(self) -> None:
        """``endpoint: null``: drop the connection and wait for the next voice server."""
        self._set_state(SessionState.RECONNECTING)
        self._close_voice_session()
        self._emit(
            ReconnectingEvent(
                self.guild_id,
                ReconnectAction.WAIT_FOR_SERVER,
                1,
                self.config.reconnect.server_wait,
                None,
                "Discord is allocating a new voice server",
            )
        )
        try:
            # Any VOICE_SERVER_UPDATE with an endpoint after the null one (it may already be here).
            found = await self._await_credentials(
                after_server_gen=self._null_server_gen, within=self.config.reconnect.server_wait
            )
        except TimeoutError:
            end = ConnectionEnd(EndKind.CLOSED, None, "no new voice server")
            final = self._policy.move_wait_expired(end)
            assert final.error is not None
            raise _Final(final.reason, None, final.error) from None
        if found:
            await self._start_move()
        else:
            await self._handle_pending_interrupt()

    async def _start_move(self) -> None:
        """A new VOICE_SERVER_UPDATE or channel: a fresh voice session there."""
        if self._server_gen == self._session_server_gen:
            # Only the channel changed so far. Discord issues a new token with every channel change, in
            # either order: give it a moment rather than connect twice.
            generation = self._server_gen
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_SERVER_UPDATE_GRACE):
                    while self._server_gen == generation and self._interrupt is None:
                        await self._wait_changed()
        if not self._have_credentials(self._null_server_gen):
            await self._wait_for_server()  # the latest update says "no server yet"
            return
        self._set_state(SessionState.RECONNECTING)
        previous_channel = self._channel_id
        previous_endpoint = self._creds_endpoint
        self._close_voice_session()
        self._new_voice_session()
        self._moves += 1
        assert self._creds_endpoint is not None
        logger.info(
            "guild %d: moving to channel %d on %s", self.guild_id, self._channel_id, self._creds_endpoint
        )
        self._emit(
            MovedEvent(
                self.guild_id, previous_channel, self._channel_id, previous_endpoint, self._creds_endpoint
            )
        )

    async def _rejoin(self, attempt: int) -> bool:
        """Op 4 again through the adapter until it brings credentials; False if an interrupt took over."""
        while True:
            try:
                if await self._rejoin_once(attempt):
                    return True
                await self._handle_pending_interrupt()  # the gateway session died with our op 4: again
                return False
            except (TimeoutError, GatewayError) as exc:
                cause = str(exc) or "no answer"  # a TimeoutError has no message
                end = ConnectionEnd(EndKind.NO_CREDENTIALS, reason=f"rejoin failed: {cause}")
            decision = self._policy.decide(end, self._loop.time())
            if decision.action is None:
                assert decision.error is not None
                raise _Final(decision.reason, None, decision.error)
            self._emit(
                ReconnectingEvent(
                    self.guild_id, decision.action, decision.attempt, decision.delay, None, decision.reason
                )
            )
            if not await self._sleep_unless_interrupted(decision.delay):
                return False
            self._reconnects += 1
            attempt = decision.attempt

    async def _rejoin_once(self, attempt: int) -> bool:
        """Op 4 and its answer; False, with the GATEWAY_LOST interrupt pending, if the main gateway lost its
        session meanwhile (the op 4 may have died with it: waiting would only run out ``rejoin_timeout``)."""
        generation = self._server_gen
        state_generation = self._state_gen
        timeout = self.config.reconnect.rejoin_timeout
        # Sent before the answer's deadline starts: every session rejoins at once when the main gateway loses
        # its session, and beyond the gateway's send limit their op 4s queue for up to a minute. The adapter
        # bounds its own wait (GatewayError when it cannot send).
        if attempt >= 2:
            # Leave and join again: Discord then always issues a new token.
            self._expect_null_state += 1
            await self._adapter.update_voice_state(self.guild_id, None)
        await self._adapter.update_voice_state(
            self.guild_id,
            self._channel_id,
            self_mute=self._voice_flags[0],
            self_deaf=self._voice_flags[1],
        )
        async with asyncio.timeout(timeout):
            while self._state_gen == state_generation and not self._have_credentials(generation):
                if self._interrupt is _Interrupt.GATEWAY_LOST:
                    return False
                await self._wait_changed()
        # The voice state answered; a new token usually follows within milliseconds. If none comes, the old
        # one may still be valid (Discord kept the voice session): it is tried, and if it is refused the next
        # attempt leaves and joins again, which always brings a new token.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(_SERVER_UPDATE_GRACE, timeout)):
                while not self._have_credentials(generation):
                    await self._wait_changed()
        return True

    # ---- one voice session ------------------------------------------------------------------------------

    def _new_voice_session(self) -> None:
        """Fresh credentials -> a new protocol core (new Identify, DAVE state, later a new UDP socket)."""
        vstate, vserver = self._vstate, self._vserver
        assert vstate is not None and vserver is not None and vserver.endpoint is not None
        if vstate.channel_id is not None:
            self._channel_id = vstate.channel_id
        self._fold_protocol_stats()
        credentials = Credentials(
            server_id=self.guild_id, user_id=self._user_id, session_id=vstate.session_id, token=vserver.token
        )
        protocol = VoiceGatewayProtocol(
            credentials,
            channel_id=self._channel_id,
            max_dave_protocol_version=davey.DAVE_PROTOCOL_VERSION if self.config.dave else 0,
        )
        protocol.speaking_flags = self._flags if self._lane.speaking else 0
        self._protocol = protocol
        self._unsent = []
        self._speaking_unsent = False  # its Session Description sends op 5 with the current flags
        self._creds_endpoint = vserver.endpoint
        self._creds_token = vserver.token
        self._session_server_gen = self._server_gen
        if self._interrupt in (_Interrupt.MOVE, _Interrupt.SERVER_LOST):
            self._interrupt = None  # news these credentials already include

    def _fold_protocol_stats(self) -> None:
        """Before a new protocol core replaces the current one: keep its counts (``stats`` adds the current
        core's own, so this runs only when it is replaced, never at the end, or they would count twice)."""
        old = self._protocol
        if old is None:
            return
        self._malformed_before += old.malformed
        self._heartbeats_before[0] += old.heartbeats_sent
        self._heartbeats_before[1] += old.heartbeats_acked
        stats = old.dave.stats
        self._dave_totals[0] += stats.encrypt_failures
        self._dave_totals[1] += stats.recoveries
        self._dave_totals[2] += stats.encrypted_in_transition

    def _established(self) -> bool:
        return self._protocol is not None and self._protocol.established

    async def _connect(self, *, resume: bool) -> _Outcome:
        """One WebSocket's life: open, Identify or Resume, serve until it ends or is interrupted."""
        protocol = self._protocol
        endpoint = self._creds_endpoint
        assert protocol is not None and endpoint is not None
        if self._interrupt is not None:
            return self._take_interrupt_or(ConnectionEnd(EndKind.NETWORK, established=protocol.established))
        if self._state is not SessionState.CONNECTING:
            self._set_state(SessionState.RESUMING if resume else SessionState.RECONNECTING)
        try:
            conn = await VoiceGatewayConnection.open(
                endpoint, ssl=self.config.ssl, open_timeout=self.config.open_timeout
            )
        except VoiceError as exc:
            logger.info("guild %d: %s", self.guild_id, exc)
            return ConnectionEnd(EndKind.NETWORK, reason=str(exc), established=protocol.established)
        self._conn = conn
        outcome: _Outcome = ConnectionEnd(EndKind.NETWORK, established=protocol.established)
        try:
            if self._interrupt is None:
                await conn.send(protocol.connection_opened())
                outcome = await self._serve(conn, protocol)
            else:
                outcome = self._take_interrupt_or(outcome)
            return outcome
        finally:
            self._conn = None
            # Keep the server's session alive (any code but 1000/1001) only when we mean to resume it.
            resumable = isinstance(outcome, ConnectionEnd) and protocol.established and self._final is None
            await conn.aclose_quietly(RESUME_CLOSE_CODE if resumable else 1000)

    def _take_interrupt_or(self, outcome: ConnectionEnd) -> _Outcome:
        interrupt = self._take_interrupt()
        return outcome if interrupt is None else interrupt

    async def _serve(self, conn: VoiceGatewayConnection, protocol: VoiceGatewayProtocol) -> _Outcome:
        loop = self._loop
        handshake_deadline: float | None = loop.time() + self.config.handshake_timeout
        next_tick = loop.time() + _TICK_INTERVAL
        while True:
            try:
                async with asyncio.timeout_at(handshake_deadline or next_tick):
                    frame = await conn.recv()
            except TimeoutError:
                if handshake_deadline is None:  # a quiet moment on an established connection
                    next_tick = loop.time() + _TICK_INTERVAL
                    for output in protocol.tick(loop.time()):
                        await self._apply(output, conn, protocol)
                    continue
                logger.info("guild %d: the voice handshake timed out", self.guild_id)
                await conn.close(RESUME_CLOSE_CODE, "handshake timeout")
                return self._take_interrupt_or(
                    ConnectionEnd(EndKind.HANDSHAKE_TIMEOUT, established=protocol.established)
                )
            if frame is None:
                return self._take_interrupt_or(self._connection_end(conn, protocol))
            for output in protocol.receive(frame, loop.time()):
                try:
                    done = await self._apply(output, conn, protocol)
                except _UdpFailed as exc:
                    return self._take_interrupt_or(
                        ConnectionEnd(EndKind.UDP_FAILED, reason=str(exc), established=protocol.established)
                    )
                if done:
                    handshake_deadline = None
            if self._interrupt is not None:
                return self._take_interrupt_or(self._connection_end(conn, protocol))

    def _connection_end(self, conn: VoiceGatewayConnection, protocol: VoiceGatewayProtocol) -> ConnectionEnd:
        established = protocol.established
        if self._udp_failed:
            return ConnectionEnd(EndKind.UDP_FAILED, reason="the UDP socket failed", established=established)
        if conn.zombie:
            return ConnectionEnd(
                EndKind.ZOMBIE, reason="three heartbeats were not acknowledged", established=established
            )
        code = conn.close_code
        if code is None:
            return ConnectionEnd(
                EndKind.NETWORK, reason="the voice WebSocket dropped", established=established
            )
        return ConnectionEnd(EndKind.CLOSED, code, conn.close_reason, established)

    async def _apply(
        self, output: Output, conn: VoiceGatewayConnection, protocol: VoiceGatewayProtocol
    ) -> bool:
        """Carry out one protocol output; True when it completes the handshake."""
        if isinstance(output, Send):
            if not await conn.send(output.frame):
                # The socket died under us. Its seq is acknowledged, so a resume will not replay what
                # prompted this reply (a key package, a commit, a transition ack): send it again then.
                if len(self._unsent) < _MAX_UNSENT:
                    self._unsent.append(output.frame)
                else:
                    self._replies_dropped += 1  # DAVE's stall recovery repairs what these would have said
        elif isinstance(output, HelloReceived):
            conn.start_heartbeat(output.interval, protocol.heartbeat)
        elif isinstance(output, ReadyReceived):
            await self._open_media(output, conn, protocol)
        elif isinstance(output, SessionDescribed):
            self._session_described(output, protocol)
            return True
        elif isinstance(output, ResumedReceived):
            if self._udp_failed:
                # It died while no WebSocket was up to end: a resume would keep the dead socket.
                raise _UdpFailed("the UDP socket failed while the voice WebSocket was down")
            unsent, self._unsent = self._unsent, []
            for frame in unsent:
                await conn.send(frame)
            if self._speaking_unsent:
                self._speaking_unsent = not await conn.send(protocol.speaking(protocol.speaking_flags))
            self._last_close_code = None  # a later end must not report the code this resume recovered from
            self._policy.connection_ready(self._loop.time())
            self._set_state(SessionState.READY)
            logger.info("guild %d: voice connection resumed", self.guild_id)
            self._emit(ResumedEvent(self.guild_id, self._policy.resumes))
            return True
        elif isinstance(output, PeerSpeaking):
            self._ssrc_users[output.ssrc] = output.user_id
            self._emit(SpeakingEvent(self.guild_id, output.user_id, output.ssrc, output.flags))
        elif isinstance(output, PeersConnected):
            self._emit(ClientConnectEvent(self.guild_id, output.user_ids))
        elif isinstance(output, PeerDisconnected):
            for ssrc in [s for s, u in self._ssrc_users.items() if u == output.user_id]:
                del self._ssrc_users[ssrc]
            self._emit(ClientDisconnectEvent(self.guild_id, output.user_id))
        elif isinstance(output, DaveEpoch):
            self._verification_cache.clear()
            self._emit(DaveEpochEvent(self.guild_id, output.epoch, output.privacy_code))
            self._lane.wake_if_pending()  # DAVE may have become ready
        elif isinstance(output, NoUsableMode):
            # Every server of this deployment offers the same modes: retrying cannot help.
            raise _Final(output.error, None, ProtocolError(output.error))
        elif isinstance(output, HeartbeatAcked | Malformed):
            pass
        return False

    async def _open_media(
        self, output: ReadyReceived, conn: VoiceGatewayConnection, protocol: VoiceGatewayProtocol
    ) -> None:
        ready = output.ready
        try:
            ipaddress.ip_address(ready.ip)
        except ValueError:
            raise _UdpFailed(
                f"Ready gave a media server address that is not an IP: {ready.ip[:60]!r}"
            ) from None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        try:
            udp = await UdpConnection.open(ready.ip, ready.port, dial=self.config.dial, stats=self._udp_stats)
        except VoiceError as exc:
            raise _UdpFailed(str(exc)) from exc
        self._udp = udp
        self._udp_failed = False
        udp.receive_hook = self._packet_hook()
        udp.on_lost = self._udp_lost
        try:
            found = await udp.discover(ready.ssrc, give_up_after=self.config.discovery_timeout)
        except VoiceError as exc:
            raise _UdpFailed(str(exc)) from exc
        await conn.send(protocol.select_protocol(found.address, found.port))

    def _session_described(self, output: SessionDescribed, protocol: VoiceGatewayProtocol) -> None:
        description = output.description
        udp = self._udp
        ready = protocol.ready
        assert udp is not None and ready is not None
        cipher = make_cipher(description.mode, description.secret_key)
        udp.cipher = cipher
        sequence, timestamp = self._lane.continuation() or (0, 0)
        self._sender = RtpSender(ready.ssrc, cipher, sequence=sequence, timestamp=timestamp)
        self._lane.attach(self._sender, protocol.dave, udp)
        self._last_close_code = None  # a later end must not report the code this connection recovered from
        self._policy.connection_ready(self._loop.time())
        self._set_state(SessionState.READY)
        logger.info(
            "guild %d: voice ready in channel %d (ssrc %d, %s, DAVE v%d)",
            self.guild_id,
            self._channel_id,
            ready.ssrc,
            description.mode,
            description.dave_protocol_version,
        )
        self._emit(
            ReadyEvent(
                self.guild_id,
                self._channel_id,
                self._creds_endpoint or "",
                ready.ssrc,
                description.mode,
                description.dave_protocol_version,
            )
        )
        if not self._joined.done():
            self._joined.set_result(None)

    def _udp_lost(self, exc: Exception | None) -> None:
        """The UDP socket died on its own: end the connection, or fail the next resume; the policy rejoins."""
        self._udp_failed = True
        self._lane.detach()
        conn = self._conn
        if conn is not None:
            self._spawn(conn.close(1000, "cordvoice: UDP failed"), "cordvoice-close")

    def _close_voice_session(self) -> None:
        """Forget the current voice session's media (a fresh Identify follows, or the end)."""
        self._lane.detach()
        self._sender = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        self._udp_failed = False
        self._ssrc_users.clear()

    # ---- sending helpers ---------------------------------------------------------------------------------

    def _lane_speaking(self, on: bool) -> None:
        flags = self._flags if on else 0
        protocol = self._protocol
        if protocol is not None:
            protocol.speaking_flags = flags
        self._speaking_task = self._spawn(self._send_speaking(flags), "cordvoice-speaking")

    async def _send_speaking(self, flags: int) -> None:
        protocol, conn = self._protocol, self._conn
        if protocol is None:
            return
        if conn is None or protocol.ssrc is None or not protocol.established:
            protocol.speaking_flags = flags  # sent with the next Session Description, or after a resume
            self._speaking_unsent = protocol.established
            return
        self._speaking_unsent = not await conn.send(protocol.speaking(flags))

    # ==== endings ===========================================================================================

    def _dave_required_error(self, end: ConnectionEnd) -> DaveRequiredError:
        if self.config.dave:
            message = (
                "The voice server requires DAVE end-to-end encryption (close 4017) although cordvoice "
                f"offered DAVE protocol version {davey.DAVE_PROTOCOL_VERSION} (davey {davey.__version__}); "
                "the server wants a version this davey does not support. Upgrade davey/cordvoice."
            )
        else:
            message = (
                "This channel requires DAVE end-to-end encryption (close 4017), but this Voice was created "
                "with dave=False, so cordvoice offered max_dave_protocol_version=0. Create Voice with "
                "dave=True (the default)."
            )
        return DaveRequiredError(message, code=end.code, reason=end.reason)

    async def _teardown(self, *, leave_channel: bool) -> None:
        """Close the socket, UDP and lane; optionally tell the main gateway we left (op 4 null)."""
        self._ending = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose_quietly(1000)
        self._close_voice_session()
        self._lane.close()
        if leave_channel:
            try:
                async with asyncio.timeout(_LEAVE_TIMEOUT):
                    await self._adapter.update_voice_state(self.guild_id, None)
            except (GatewayError, TimeoutError) as exc:
                logger.info("guild %d: could not tell the gateway we left voice: %s", self.guild_id, exc)
            except Exception:
                logger.exception("guild %d: the adapter failed to send the leave", self.guild_id)

    def _finish(self, reason: str, code: int | None, error: VoiceError | None) -> None:
        if self._final is not None:
            return
        self._final = DisconnectedEvent(self.guild_id, reason, code, error)
        self._set_state(SessionState.DISCONNECTED)
        self._lane.close()
        if self._player is not None:
            try:
                self._player.close()
            except Exception:
                logger.exception("guild %d: the player failed to close", self.guild_id)
        dropped = self._queue.close(self._closed_error())
        if dropped:
            self._lane.stats.dropped += dropped
            logger.info("guild %d: %d queued frame(s) were not sent", self.guild_id, dropped)
        if error is None:
            logger.info("guild %d: voice session ended: %s", self.guild_id, reason)
        else:
            logger.warning("guild %d: voice session ended: %s", self.guild_id, reason)
        if not self._joined.done():
            self._joined.set_exception(error or DisconnectedError(reason, code=code))
        self._emit(self._final)
        self._closed.set()
        if self._on_closed is not None:
            try:
                self._on_closed(self)
            except Exception:
                logger.exception("the session's close callback failed")

    def _closed_error(self) -> DisconnectedError:
        final = self._final
        if final is None:
            return DisconnectedError("the voice session is closing")
        return DisconnectedError(f"the voice session has ended: {final.reason}", code=final.close_code)

    def _check_loop(self) -> None:
        """A session's methods run on its event loop: from another thread (or loop) they would race its
        tasks, and a wait there is never woken (``asyncio.run(session.write(...))`` on a worker hung)."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop:
            raise VoiceError(
                "call the session from its own event loop; from another thread, use "
                "asyncio.run_coroutine_threadsafe(session.write(frame), loop) or loop.call_soon_threadsafe"
            )

    def _check_open(self) -> None:
        if self._final is not None:
            raise self._closed_error()

    def _set_state(self, state: SessionState) -> None:
        if self._state is not SessionState.DISCONNECTED:
            self._state = state

    # ==== task bookkeeping ==================================================================================

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            logger.error("guild %d: background task %s failed", self.guild_id, task.get_name(), exc_info=exc)

    async def _drain_tasks(self) -> None:
        current = asyncio.current_task()
        pending = [t for t in self._tasks if t is not current and not t.done()]
        if not pending:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await asyncio.gather(*pending, return_exceptions=True)
        for task in pending:
            if not task.done():
                task.cancel()


def _consume_exception(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
