"""The client side of one voice session on the voice gateway (v8), sans-IO.

:class:`VoiceGatewayProtocol` lives from one Identify to the end of that voice session, across the WebSocket
connections a resume opens. The shell hands it each received frame with the time and sends what it returns;
it owns no socket and no timer. It keeps:

* ``seq``: the last sequence number of *every* numbered server message, JSON or binary, including opcodes it
  ignores and messages it cannot parse (when the number itself is readable), for Heartbeat and Resume;
* heartbeat state: nonces in flight, the count of unacknowledged heartbeats (three means a zombie socket), and
  the round-trip latency of the last acknowledged one;
* what the server told it: Hello, Ready, Session Description;
* the DAVE state machine (:class:`~cordvoice.dave.session.DaveClient`): ops 21-31 are answered here, so DAVE
  replies go out in order with everything else.

Outputs are small dataclasses (:data:`Output`); :class:`Send` carries a frame to transmit, the others tell the
shell what happened. A frame the client cannot parse is counted (``malformed``) and reported as
:class:`Malformed`; it never raises.
"""

from __future__ import annotations

import json
import logging
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import TypeAlias

from cordvoice.dave.session import (
    DaveAction,
    DaveClient,
    EpochChanged,
    SendCommitWelcome,
    SendInvalidCommitWelcome,
    SendKeyPackage,
    SendTransitionReady,
)
from cordvoice.errors import InvalidArgumentError, ProtocolError
from cordvoice.udp.crypto import choose_mode
from cordvoice.voicegateway.messages import (
    ClientDisconnect,
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
    Ready,
    Resume,
    Resumed,
    SelectProtocol,
    ServerMessage,
    SessionDescription,
    Speaking,
    Unknown,
    decode_server,
    encode_client,
)

__all__ = [
    "MAX_UNACKED_HEARTBEATS",
    "Credentials",
    "DaveEpoch",
    "HeartbeatAcked",
    "HelloReceived",
    "Malformed",
    "NoUsableMode",
    "Output",
    "PeerDisconnected",
    "PeerSpeaking",
    "PeersConnected",
    "ReadyReceived",
    "ResumedReceived",
    "Send",
    "SessionDescribed",
    "VoiceGatewayProtocol",
]

logger = logging.getLogger(__name__)

MAX_UNACKED_HEARTBEATS = 3
"""Heartbeats without an ACK after which the socket is a zombie: close it and resume (protocol.md §2.3)."""

_SEQ = struct.Struct(">H")


@dataclass(frozen=True, slots=True)
class Credentials:
    """What Identify and Resume prove: the session id (VOICE_STATE_UPDATE) and token (VOICE_SERVER_UPDATE)."""

    server_id: int
    user_id: int
    session_id: str
    token: str = field(repr=False)


# ---- outputs ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Transmit this frame (text for JSON ops, bytes for binary DAVE ops)."""

    frame: str | bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """Start heartbeating every ``interval`` seconds."""

    interval: float


@dataclass(frozen=True, slots=True)
class ReadyReceived:
    """Open UDP to ``ready.ip:ready.port``, run IP discovery, then Select Protocol."""

    ready: Ready
    mode: str


@dataclass(frozen=True, slots=True)
class SessionDescribed:
    """The transport key and mode: media may flow (op 5 is already queued before this output)."""

    description: SessionDescription


@dataclass(frozen=True, slots=True)
class ResumedReceived:
    """Op 9: the resume worked; replayed messages follow as ordinary frames."""


@dataclass(frozen=True, slots=True)
class PeerSpeaking:
    """Another member's op 5: ``ssrc`` belongs to ``user_id``."""

    user_id: int
    ssrc: int
    flags: int


@dataclass(frozen=True, slots=True)
class PeersConnected:
    user_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PeerDisconnected:
    user_id: int


@dataclass(frozen=True, slots=True)
class DaveEpoch:
    """The DAVE group changed (epoch None: no usable group)."""

    epoch: int | None
    privacy_code: str | None


@dataclass(frozen=True, slots=True)
class HeartbeatAcked:
    latency: float


@dataclass(frozen=True, slots=True)
class NoUsableMode:
    """Ready offered no transport mode this client supports: no connection to this server can work."""

    error: str


@dataclass(frozen=True, slots=True)
class Malformed:
    """A server frame the client could not use; it was dropped and counted."""

    error: str


Output: TypeAlias = (
    Send
    | HelloReceived
    | ReadyReceived
    | SessionDescribed
    | ResumedReceived
    | PeerSpeaking
    | PeersConnected
    | PeerDisconnected
    | DaveEpoch
    | HeartbeatAcked
    | NoUsableMode
    | Malformed
)


class VoiceGatewayProtocol:
    """One voice session's gateway state (see the module docstring)."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        channel_id: int,
        max_dave_protocol_version: int,
        dave: DaveClient | None = None,
    ) -> None:
        if max_dave_protocol_version < 0:
            raise InvalidArgumentError("max_dave_protocol_version must be >= 0")
        self.credentials = credentials
        self.channel_id = channel_id
        self.max_dave_protocol_version = max_dave_protocol_version
        self.dave = dave or DaveClient()
        self.seq: int | None = None
        self.hello: Hello | None = None
        self.ready: Ready | None = None
        self.mode: str | None = None
        self.description: SessionDescription | None = None
        self.speaking_flags = 0
        """Flags the op 5 after Session Description carries (the session keeps this current)."""
        self.latency: float | None = None
        self.malformed = 0
        self.ignored: Counter[int] = Counter()
        self.heartbeats_sent = 0
        self.heartbeats_acked = 0
        self._in_flight: dict[int, float] = {}
        self._unacked = 0
        self._last_nonce = 0
        self._resuming = False
        """This connection opened with Resume and op 9 has not answered it yet."""

    # ---- state -----------------------------------------------------------------------------------

    @property
    def established(self) -> bool:
        """Session Description arrived: the session can be resumed and media can flow."""
        return self.description is not None

    @property
    def ssrc(self) -> int | None:
        return None if self.ready is None else self.ready.ssrc

    @property
    def unacked_heartbeats(self) -> int:
        return self._unacked

    # ---- connection lifecycle ----------------------------------------------------------------------

    def connection_opened(self) -> str:
        """A new WebSocket is open: the frame to send first (Resume once established, else Identify).

        Heartbeat bookkeeping starts over: ACKs for the old socket's heartbeats will never come.
        """
        self._in_flight.clear()
        self._unacked = 0
        self.hello = None
        creds = self.credentials
        self._resuming = self.established
        if self.established:
            return _text(
                Resume(
                    server_id=creds.server_id,
                    session_id=creds.session_id,
                    token=creds.token,
                    seq_ack=self.seq,
                )
            )
        return _text(
            Identify(
                server_id=creds.server_id,
                user_id=creds.user_id,
                session_id=creds.session_id,
                token=creds.token,
                max_dave_protocol_version=self.max_dave_protocol_version,
            )
        )

    def heartbeat(self, now: float) -> str | None:
        """The next heartbeat, or None when ``MAX_UNACKED_HEARTBEATS`` are unanswered (close and resume)."""
        if self._unacked >= MAX_UNACKED_HEARTBEATS:
            return None
        # The nonce is a millisecond timestamp as Discord's clients send, kept strictly increasing so that two
        # heartbeats within one millisecond (tiny test intervals) cannot share one.
        nonce = max(int(now * 1000), self._last_nonce + 1)
        self._last_nonce = nonce
        self._in_flight[nonce] = now
        if len(self._in_flight) > MAX_UNACKED_HEARTBEATS + 1:
            self._in_flight.pop(next(iter(self._in_flight)))
        self._unacked += 1
        self.heartbeats_sent += 1
        return _text(Heartbeat(nonce=nonce, seq_ack=self.seq))

    def tick(self, now: float) -> list[Output]:
        """Time passing (the shell calls it every couple of seconds): DAVE's recovery from a stalled group."""
        if not self.established:
            return []
        return self._dave(self.dave.check_progress(now))

    def select_protocol(self, address: str, port: int) -> str:
        """Op 1 with our discovered address and the mode chosen from Ready."""
        if self.mode is None:
            raise InvalidArgumentError("select_protocol before Ready")
        return _text(SelectProtocol(address=address, port=port, mode=self.mode))

    def speaking(self, flags: int) -> str:
        """Op 5 with our SSRC."""
        ssrc = self.ssrc
        if ssrc is None:
            raise InvalidArgumentError("speaking before Ready")
        self.speaking_flags = int(flags)
        return _text(Speaking(speaking=int(flags), ssrc=ssrc, delay=0))

    # ---- input -----------------------------------------------------------------------------------

    def receive(self, frame: str | bytes, now: float) -> list[Output]:
        """Handle one server frame; never raises on bad input."""
        try:
            decoded = decode_server(frame)
        except ProtocolError as exc:
            self._track_unparsed_seq(frame)
            return [self._malformed(str(exc))]
        if decoded.seq is not None:
            self.seq = decoded.seq
        try:
            return self._handle(decoded.message, now)
        except ProtocolError as exc:
            return [self._malformed(str(exc))]

    def _handle(self, message: ServerMessage, now: float) -> list[Output]:
        if isinstance(message, HeartbeatAck):
            return self._ack(message.nonce, now)
        if isinstance(message, Hello):
            self.hello = message
            return [HelloReceived(message.heartbeat_interval / 1000.0)]
        if isinstance(message, Ready):
            return self._ready(message)
        if isinstance(message, SessionDescription):
            return self._session_description(message)
        if isinstance(message, Resumed):
            if not self._resuming:
                # Not an answer to our Resume (an Identify, or a second op 9): no session was resumed.
                raise ProtocolError("op 9 Resumed without a Resume to answer")
            self._resuming = False
            return [ResumedReceived()]
        if isinstance(message, Speaking):
            if message.user_id is None:
                raise ProtocolError("op 5 from the server has no user_id")
            return [PeerSpeaking(message.user_id, message.ssrc, message.speaking)]
        dave = self.dave
        if isinstance(message, ClientsConnect):
            return [*self._dave(dave.on_clients_connect(message.user_ids)), PeersConnected(message.user_ids)]
        if isinstance(message, ClientDisconnect):
            left = message.user_id
            return [*self._dave(dave.on_client_disconnect(left)), PeerDisconnected(left)]
        if isinstance(message, DavePrepareTransition):
            return self._dave(dave.on_prepare_transition(message.transition_id, message.protocol_version))
        if isinstance(message, DaveExecuteTransition):
            return self._dave(self.dave.on_execute_transition(message.transition_id))
        if isinstance(message, DavePrepareEpoch):
            return self._dave(self.dave.on_prepare_epoch(message.epoch, message.protocol_version))
        if isinstance(message, DaveMlsExternalSender):
            return self._dave(self.dave.on_external_sender(message.external_sender))
        if isinstance(message, DaveMlsProposals):
            return self._dave(self.dave.on_proposals(int(message.operation), message.proposals))
        if isinstance(message, DaveMlsAnnounceCommitTransition):
            return self._dave(self.dave.on_announce_commit(message.transition_id, message.commit))
        if isinstance(message, DaveMlsWelcome):
            return self._dave(self.dave.on_welcome(message.transition_id, message.welcome))
        if isinstance(message, Unknown):
            self.ignored[message.op] += 1
            return []
        self.ignored[int(message.op)] += 1  # pragma: no cover - every server message type is handled above
        return []

    def _ack(self, nonce: int, now: float) -> list[Output]:
        sent_at = self._in_flight.pop(nonce, None)
        if sent_at is None:
            self.ignored[6] += 1  # an ACK for nothing we have in flight: stale, or a confused server
            return []
        # Older heartbeats still in flight are answered implicitly: the socket is alive. Newer ones are not,
        # so they still count towards a zombie connection.
        for older in [n for n in self._in_flight if n < nonce]:
            del self._in_flight[older]
        self._unacked = len(self._in_flight)
        self.heartbeats_acked += 1
        self.latency = max(0.0, now - sent_at)
        return [HeartbeatAcked(self.latency)]

    def _ready(self, message: Ready) -> list[Output]:
        if self.ready is not None:
            raise ProtocolError("op 2 Ready arrived twice in one voice session")
        try:
            mode = choose_mode(message.modes)
        except ProtocolError as exc:
            return [NoUsableMode(str(exc))]
        self.ready = message
        self.mode = mode
        return [ReadyReceived(message, mode)]

    def _session_description(self, message: SessionDescription) -> list[Output]:
        if self.ready is None:
            raise ProtocolError("op 4 Session Description before Ready")
        if message.mode != self.mode:
            raise ProtocolError(f"op 4 selects mode {message.mode!r}, but we asked for {self.mode!r}")
        current = self.description
        if current is not None and current.secret_key == message.secret_key:
            # A repeat of the key in use says nothing new, and applying it would restart the transport nonce
            # counter under that key (AES-GCM nonce reuse) and reset the DAVE group: count it and move on.
            self.ignored[4] += 1
            logger.warning("ignored a repeated op 4 Session Description carrying the key already in use")
            return []
        self.description = message
        out: list[Output] = [
            # op 5 before anything else: it binds our SSRC (protocol.md §2.4), as discord.py does.
            Send(self.speaking(self.speaking_flags)),
            SessionDescribed(message),
        ]
        out += self._dave(
            self.dave.on_session_description(
                message.dave_protocol_version, self.credentials.user_id, self.channel_id
            )
        )
        return out

    def _dave(self, actions: list[DaveAction]) -> list[Output]:
        out: list[Output] = []
        for action in actions:
            if isinstance(action, SendKeyPackage):
                out.append(Send(_binary(DaveMlsKeyPackage(key_package=action.data))))
            elif isinstance(action, SendCommitWelcome):
                out.append(Send(_binary(DaveMlsCommitWelcome(commit_welcome=action.data))))
            elif isinstance(action, SendTransitionReady):
                out.append(Send(_text(DaveTransitionReady(transition_id=action.transition_id))))
            elif isinstance(action, SendInvalidCommitWelcome):
                out.append(Send(_text(DaveMlsInvalidCommitWelcome(transition_id=action.transition_id))))
            elif isinstance(action, EpochChanged):
                out.append(DaveEpoch(action.epoch, action.privacy_code))
        return out

    def _malformed(self, error: str) -> Malformed:
        self.malformed += 1
        logger.warning("dropped a malformed voice gateway frame: %s", error)
        return Malformed(error)

    def _track_unparsed_seq(self, frame: object) -> None:
        """Keep ``seq`` current even for a frame whose body we could not use."""
        if isinstance(frame, bytes | bytearray | memoryview):
            if len(frame) >= 3:
                self.seq = _SEQ.unpack_from(frame)[0]
            return
        if not isinstance(frame, str):
            return
        try:
            payload = json.loads(frame)
        except (ValueError, RecursionError):
            return
        if isinstance(payload, dict):
            seq = payload.get("seq")
            if type(seq) is int and 0 <= seq <= 0xFFFF_FFFF:
                self.seq = seq


def _text(
    message: Identify
    | Resume
    | Heartbeat
    | SelectProtocol
    | Speaking
    | DaveTransitionReady
    | DaveMlsInvalidCommitWelcome,
) -> str:
    frame = encode_client(message)
    assert isinstance(frame, str)
    return frame


def _binary(message: DaveMlsKeyPackage | DaveMlsCommitWelcome) -> bytes:
    frame = encode_client(message)
    assert isinstance(frame, bytes)
    return frame
