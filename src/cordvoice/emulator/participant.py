"""Simulated voice participants: independent Discord voice clients that tests listen and speak through.

A :class:`Participant` joins a voice server over the real wire protocol: a voice WebSocket (Identify, Hello,
Ready, IP discovery over its own UDP socket, Select Protocol, Session Description, heartbeats) and RTP. Its
DAVE side is a small client written directly on ``davey`` that behaves like discord.py 2.7.1's handlers
(dave-notes.md §2), made sturdier: davey failures are counted instead of killing the reader, and Adds are
checked against the users announced by op 11/13 (``check_user_ids``). It never uses cordvoice's own client
code, so a test that hears the library through a participant is not marking its own homework.

It needs nothing but the credentials of a voice session, so it can also run in another process (a
benchmark): :meth:`Participant.connect` takes the endpoint, ids and token. With ``resume=True`` it resumes
(op 7, keeping its UDP socket, keys and DAVE state) after a close that protocol.md §3 calls resumable (4015,
1006 and other non-4xxx failures), as a well-behaved client does. ``Emulator.add_participant``
creates the user, puts it in the channel through the emulator's state (as the main gateway would), and
connects it.

Everything received is recorded per user, transport- and DAVE-decrypted, with RTP fields and arrival times
(:class:`ReceivedFrame`); failures are counted in :class:`ParticipantStats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import davey
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from cordvoice.emulator.sfu import enlarge_receive_buffer
from cordvoice.emulator.state import VoiceSession
from cordvoice.errors import ConnectionClosedError, DaveRequiredError, EmulatorError, ProtocolError
from cordvoice.udp import discovery
from cordvoice.udp.crypto import TransportCipher, choose_mode, make_cipher
from cordvoice.udp.rtp import FRAME_DURATION, OPUS_PAYLOAD_TYPE, OPUS_SILENCE, RtpHeader, is_rtcp
from cordvoice.udp.sender import RtpSender
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
    SpeakingFlag,
    decode_server,
    encode_client,
)
from cordvoice.wirelog import WIRE_LOGGER

__all__ = ["Participant", "ParticipantStats", "ReceivedFrame"]

logger = logging.getLogger(__name__)

_DAVE_MARKER = b"\xfa\xfa"
_SILENCE_FRAMES = 5
_MAX_UNMAPPED = 500
#: SSRCs whose packets are held at once waiting for an op 5; packets of further ones are dropped (counted).
_MAX_UNMAPPED_SSRCS = 64
_DISCOVERY_RETRY = 0.5
_MAX_HEARTBEAT_PERIOD = 5.0
#: Resumes in a row without a Resumed in between before the participant gives up.
_MAX_RESUME_ATTEMPTS = 5


def _resumable(code: int | None) -> bool:
    """protocol.md §3: resume after 4015 and after transport failures (no close frame, 1006, other < 4000)."""
    if code is None or code == CloseCode.VOICE_SERVER_CRASHED:
        return True
    return code < 4000 and code not in (1000, 1001)


class ReceivedFrame(NamedTuple):
    """One Opus frame a participant received: decrypted payload, RTP fields, loop time of arrival."""

    user_id: int
    ssrc: int
    sequence: int
    timestamp: int
    marker: bool
    payload: bytes
    arrival: float
    dave: bool
    """The frame arrived DAVE-encrypted (and was decrypted)."""


@dataclass
class ParticipantStats:
    """What a participant sent, and everything it could not use."""

    sent_packets: int = 0
    sent_encrypted: int = 0
    sent_plain: int = 0
    """Opus frames sent without DAVE although the channel uses it (the group was not ready yet)."""
    received_packets: int = 0
    late_discovery: int = 0
    before_key: int = 0
    """Packets that arrived before Session Description gave us the key (the SFU may send right away)."""
    transport_undecryptable: int = 0
    other_payload_type: int = 0
    """RTP packets whose payload type is not 120 (Opus): not audio to any client, so never a frame here."""
    rtcp: int = 0
    unmapped_ssrc: int = 0
    """Packets from an SSRC no op 5 had named yet (held and delivered once one does)."""
    unmapped_dropped: int = 0
    """Of those, packets dropped: beyond :data:`_MAX_UNMAPPED` per SSRC, or of too many unnamed SSRCs."""
    dave_undecryptable: Counter[int] = field(default_factory=Counter)
    """Frames per sender that DAVE could not decrypt."""
    dave_errors: Counter[str] = field(default_factory=Counter)
    """davey calls that failed, by handler (``proposals``, ``commit``, ``welcome``, ...)."""
    recoveries: int = 0
    """op 31 sent (a failed commit or Welcome, real or forced)."""
    heartbeat_acks: int = 0
    opcodes_received: Counter[int] = field(default_factory=Counter)
    resumes: int = 0
    """op 7 sent (only with ``resume=True``)."""
    resumed: int = 0
    """op 9 received."""


class _DaveClient:
    """DAVE on davey, shaped like discord.py 2.7.1's handlers (dave-notes.md §2) but never raising."""

    def __init__(self, user_id: int, channel_id: int, stats: ParticipantStats, check_user_ids: bool) -> None:
        self.user_id = user_id
        self.channel_id = channel_id
        self.stats = stats
        self.check_user_ids = check_user_ids
        self.session: davey.DaveSession | None = None
        self.version = 0
        self.pending: dict[int, int] = {}
        self.recognized: set[int] = {user_id}
        self.fail_next = 0

    @property
    def can_encrypt(self) -> bool:
        return self.version != 0 and self.session is not None and self.session.ready

    def _reinit(self) -> list[ClientMessage]:
        if self.version > 0:
            if self.session is None:
                self.session = davey.DaveSession(self.version, self.user_id, self.channel_id)
            else:
                self.session.reinit(self.version, self.user_id, self.channel_id)
            return [DaveMlsKeyPackage(key_package=self.session.get_serialized_key_package())]
        if self.session is not None:
            self.session.reset()
            self.session.set_passthrough_mode(True, 10)
        return []

    def on_session_description(self, version: int) -> list[ClientMessage]:
        self.version = version
        return self._reinit()

    def on_external_sender(self, data: bytes) -> list[ClientMessage]:
        if self.session is not None:
            self._call("external_sender", self.session.set_external_sender, data)
        return []

    def on_proposals(self, operation: ProposalsOperation, vector: bytes) -> list[ClientMessage]:
        if self.session is None:
            return []
        op_type = (
            davey.ProposalsOperationType.append
            if operation is ProposalsOperation.APPEND
            else davey.ProposalsOperationType.revoke
        )
        expected = sorted(self.recognized) if self.check_user_ids else None
        _, result = self._call("proposals", self.session.process_proposals, op_type, vector, expected)
        if isinstance(result, davey.CommitWelcome):
            welcome = result.welcome or b""
            return [DaveMlsCommitWelcome(commit_welcome=result.commit + welcome)]
        return []

    def on_commit_or_welcome(self, transition_id: int, data: bytes, *, welcome: bool) -> list[ClientMessage]:
        if self.session is None:
            return []
        if self.fail_next:
            self.fail_next -= 1
            return self._recover(transition_id)
        apply = self.session.process_welcome if welcome else self.session.process_commit
        ok, _ = self._call("welcome" if welcome else "commit", apply, data)
        if not ok:
            return self._recover(transition_id)
        if transition_id != 0:
            self.pending[transition_id] = self.version
            return [DaveTransitionReady(transition_id=transition_id)]
        return []

    def _recover(self, transition_id: int) -> list[ClientMessage]:
        self.stats.recoveries += 1
        return [DaveMlsInvalidCommitWelcome(transition_id=transition_id), *self._reinit()]

    def on_prepare_transition(self, protocol_version: int, transition_id: int) -> list[ClientMessage]:
        self.pending[transition_id] = protocol_version
        if transition_id == 0:
            self.on_execute_transition(0)
            return []
        if protocol_version == 0 and self.session is not None:
            self.session.set_passthrough_mode(True, 120)
        return [DaveTransitionReady(transition_id=transition_id)]

    def on_execute_transition(self, transition_id: int) -> None:
        version = self.pending.pop(transition_id, None)
        if version is None:
            self.stats.dave_errors["execute_unknown_transition"] += 1
            return
        self.version = version

    def on_prepare_epoch(self, protocol_version: int, epoch: int) -> list[ClientMessage]:
        if epoch != 1:
            return []
        self.version = protocol_version
        return self._reinit()

    def decrypt(self, user_id: int, payload: bytes) -> bytes | None:
        session = self.session
        if session is None:
            return payload
        try:
            data: bytes = session.decrypt(user_id, davey.MediaType.audio, payload)
        except ValueError:
            self.stats.dave_undecryptable[user_id] += 1
            return None
        return data

    def _call(self, what: str, function: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        """``(True, result)``, or ``(False, None)`` after counting a davey failure."""
        try:
            return True, function(*args)
        except ValueError as exc:  # every davey failure is a ValueError (dave-notes.md §1)
            self.stats.dave_errors[what] += 1
            logger.info("participant %d: davey %s failed: %s", self.user_id, what, exc)
            return False, None


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, participant: Participant) -> None:
        self._participant = participant

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # CPython's selector transport reads with recvfrom(256 KiB) and pays an mmap/munmap per datagram
        # (performance-notes.md §2); uvloop has no such attribute and no such problem.
        if hasattr(transport, "max_size"):
            transport.max_size = 4096
        sock = transport.get_extra_info("socket")
        if sock is not None:
            enlarge_receive_buffer(sock, 1 << 20)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._participant._datagram(data)

    def error_received(self, exc: Exception) -> None:
        logger.debug("participant UDP error: %s", exc)


class Participant:
    """A simulated voice client in one channel. Create it with :meth:`connect` or ``emu.add_participant``."""

    def __init__(
        self,
        ws: ClientConnection,
        *,
        server_id: int,
        user_id: int,
        session_id: str,
        channel_id: int,
        dave: bool,
        check_user_ids: bool,
        name: str | None,
        endpoint: str = "",
        token: str = "",
        ssl_context: ssl.SSLContext | None = None,
        resume: bool = False,
    ) -> None:
        self.server_id = server_id
        self.user_id = user_id
        self.session_id = session_id
        self.channel_id = channel_id
        self.name = name or f"participant-{user_id}"
        self.max_dave_protocol_version = 1 if dave else 0
        self.stats = ParticipantStats()
        self.clients: set[int] = set()
        """Other users in the call, as op 11 and op 13 announced them."""
        self.speaking_events: list[tuple[int, int, int]] = []
        """``(user_id, ssrc, flags)`` of every op 5 the server relayed."""
        self.ssrc = 0
        self.mode: str | None = None
        self.dave_protocol_version: int | None = None
        self.close_code: int | None = None
        self.closes: list[int | None] = []
        """The close code of every voice socket that ended, in order (None: no close frame)."""
        self.resume = resume
        """Resume after a resumable close instead of ending (see the module docstring)."""
        self.on_leave: Callable[[], None] | None = None
        """Called by :meth:`leave` first (the emulator uses it to clear the voice state)."""
        self._ws = ws
        self._endpoint = endpoint
        self._token = token
        self._ssl_context = ssl_context
        self._closing = False
        self._resume_attempts = 0
        self._loop = asyncio.get_running_loop()
        self._dave = _DaveClient(user_id, channel_id, self.stats, check_user_ids)
        self._seq: int | None = None
        self._unsent: list[ClientMessage] = []
        """Messages (replies, play's op 5) the socket died under, sent once a resume succeeds."""
        self._cipher: TransportCipher | None = None
        self._sender: RtpSender | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._discovery: asyncio.Future[bytes] | None = None
        self._ssrc_users: dict[int, int] = {}
        self._frames: dict[int, list[ReceivedFrame]] = {}
        self._unmapped: dict[int, deque[tuple[RtpHeader, bytes, float]]] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._described = asyncio.Event()
        self._closed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reader: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    # ---- joining ---------------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        *,
        endpoint: str,
        server_id: int,
        user_id: int,
        session_id: str,
        token: str,
        channel_id: int,
        ssl_context: ssl.SSLContext | None = None,
        dave: bool = True,
        check_user_ids: bool = True,
        name: str | None = None,
        fail_commits: int = 0,
        resume: bool = False,
        timeout: float = 10.0,  # noqa: ASYNC109 - bounds the whole handshake
    ) -> Participant:
        """Dial ``endpoint`` (``host:port``) and run the handshake until Session Description arrived.

        ``fail_commits``: treat the first N op 29/op 30 as failures (see :meth:`fail_next_commit`).
        ``resume``: resume after resumable closes (4015, 1006) instead of ending.

        Raises :class:`~cordvoice.errors.DaveRequiredError` on 4017 and
        :class:`~cordvoice.errors.ConnectionClosedError` on any other close before that.
        """
        ws = await _dial(endpoint, ssl_context, timeout)
        participant = cls(
            ws,
            server_id=server_id,
            user_id=user_id,
            session_id=session_id,
            channel_id=channel_id,
            dave=dave,
            check_user_ids=check_user_ids,
            name=name,
            endpoint=endpoint,
            token=token,
            ssl_context=ssl_context,
            resume=resume,
        )
        participant.fail_next_commit(fail_commits)
        identify = Identify(
            server_id=server_id,
            user_id=user_id,
            session_id=session_id,
            token=token,
            max_dave_protocol_version=participant.max_dave_protocol_version,
        )
        try:
            try:
                await participant._send(identify)
            except ConnectionClosed as exc:  # closed before Identify: there is no session to resume
                code = exc.rcvd.code if exc.rcvd is not None else None
                raise ConnectionClosedError(f"the voice socket closed (code {code})", code=code) from None
            participant._reader = asyncio.create_task(
                participant._read(), name=f"cordvoice-participant-{user_id}"
            )
            async with asyncio.timeout(timeout):
                await participant._wait_until(participant._described.is_set)
        except BaseException:
            await participant.close()
            raise
        return participant

    @classmethod
    async def from_session(cls, session: VoiceSession, **options: Any) -> Participant:
        """:meth:`connect` with the credentials of a :class:`~cordvoice.emulator.state.VoiceSession`.

        A voice session is plain data, so another process (a benchmark) can receive it and connect.
        """
        return await cls.connect(
            endpoint=session.endpoint,
            server_id=session.server_id,
            user_id=session.user_id,
            session_id=session.session_id,
            token=session.token,
            channel_id=session.channel_id,
            **options,
        )

    # ---- what tests use --------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return not self._closed.is_set()

    @property
    def dave_ready(self) -> bool:
        """The participant is in an established DAVE group and encrypts what it sends."""
        return self._dave.can_encrypt

    @property
    def epoch(self) -> int | None:
        session = self._dave.session
        return None if session is None else session.epoch

    @property
    def privacy_code(self) -> str | None:
        session = self._dave.session
        return None if session is None else session.voice_privacy_code

    @property
    def dave_session(self) -> davey.DaveSession | None:
        """The participant's own davey session (read-only use, e.g. verification codes)."""
        return self._dave.session

    def fail_next_commit(self, count: int = 1) -> None:
        """Treat the next ``count`` op 29/op 30 as failed: answer op 31 and start over with a key package."""
        if count < 0:
            raise EmulatorError("count must be >= 0")
        self._dave.fail_next += count

    def frames_from(self, user_id: int) -> list[ReceivedFrame]:
        """Every frame received from ``user_id`` so far, in arrival order."""
        return list(self._frames.get(user_id, ()))

    def payloads_from(self, user_id: int, *, include_silence: bool = False) -> list[bytes]:
        """The decrypted Opus payloads from ``user_id``, without the 3-byte silence frames by default."""
        return [
            f.payload for f in self._frames.get(user_id, ()) if include_silence or f.payload != OPUS_SILENCE
        ]

    def clear_frames(self) -> None:
        """Forget what was received (counters stay)."""
        self._frames.clear()

    async def wait_for_frames(self, user_id: int, count: int, timeout: float = 5.0) -> list[ReceivedFrame]:  # noqa: ASYNC109
        """Wait until ``count`` frames from ``user_id`` arrived; returns all received so far."""
        async with asyncio.timeout(timeout):
            await self._wait_until(lambda: len(self._frames.get(user_id, ())) >= count)
        return self.frames_from(user_id)

    async def wait_dave_ready(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            await self._wait_until(lambda: self.dave_ready)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until ``predicate()`` holds; it is re-checked after every message and frame."""
        async with asyncio.timeout(timeout):
            await self._wait_until(predicate)

    async def wait_closed(self, timeout: float = 5.0) -> int | None:  # noqa: ASYNC109
        """Wait until the voice socket closed; returns the close code."""
        async with asyncio.timeout(timeout):
            await self._closed.wait()
        return self.close_code

    async def play(
        self, frames: Iterable[bytes], *, silence: bool = True, interval: float = FRAME_DURATION
    ) -> int:
        """Send Opus frames paced at 20 ms: op 5 first, DAVE when the group is ready, 5 silence frames last.

        ``interval`` changes the pacing (RTP timestamps still step by 960): a test that needs many packets,
        not real time, can send faster. Returns how many frames (silence excluded) were sent.
        """
        if not 0.0 <= interval < math.inf:  # NaN would skip the pacing, infinity hang after one frame
            raise EmulatorError(f"interval must be finite and >= 0 seconds, got {interval!r}")
        sender = self._sender
        if sender is None or self._udp is None:
            raise EmulatorError("the participant has no transport yet (handshake not finished)")
        await self._send_while_open(Speaking(speaking=SpeakingFlag.MICROPHONE, ssrc=self.ssrc))
        start = self._loop.time()
        sent = 0
        for frame in frames:
            self._check_open()
            self._send_frame(frame, dave=True)
            sent += 1
            await self._sleep_until(start + sent * interval)
        if silence:
            for index in range(_SILENCE_FRAMES):
                self._check_open()
                self._send_frame(OPUS_SILENCE, dave=False)
                await self._sleep_until(start + (sent + index + 1) * interval)
        await self._send_while_open(Speaking(speaking=SpeakingFlag.NONE, ssrc=self.ssrc))
        return sent

    def send_datagram(self, data: bytes) -> None:
        """Send raw bytes to the media server from this participant's UDP socket (for bad-input tests)."""
        if self._udp is None:
            raise EmulatorError("the participant has no UDP socket yet")
        self._udp.sendto(data)

    async def send_raw(self, frame: str | bytes) -> None:
        """Send a raw WebSocket frame (for bad-input tests)."""
        await self._send_while_open(frame)

    async def leave(self) -> None:
        """Leave: the emulator clears the voice state (the server then closes with 4014), then close."""
        if self.on_leave is not None:
            hook, self.on_leave = self.on_leave, None
            hook()
            with contextlib.suppress(TimeoutError):
                await self.wait_closed(2.0)
        await self.close()

    async def close(self) -> None:
        """Close the voice socket (1000) and the UDP socket. Idempotent."""
        self._closing = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await self._ws.close(1000)
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._udp is not None:
            self._udp.close()
        self._closed.set()
        self._notify()

    def __repr__(self) -> str:
        return f"Participant(user_id={self.user_id}, channel_id={self.channel_id}, ssrc={self.ssrc})"

    # ---- media -----------------------------------------------------------------------------------

    def _send_frame(self, frame: bytes, *, dave: bool) -> None:
        assert self._sender is not None and self._udp is not None
        payload = frame
        if dave and self._dave.version > 0:
            if self._dave.can_encrypt:
                assert self._dave.session is not None
                payload = self._dave.session.encrypt_opus(frame)
                self.stats.sent_encrypted += 1
            else:
                self.stats.sent_plain += 1
        self._udp.sendto(self._sender.build(payload))
        self.stats.sent_packets += 1

    def _datagram(self, data: bytes) -> None:
        if len(data) == discovery.PACKET_SIZE and data[:2] == b"\x00\x02":
            pending = self._discovery
            if pending is not None and not pending.done():
                pending.set_result(data)
            else:
                self.stats.late_discovery += 1  # the answer to a retried request
            return
        self.stats.received_packets += 1
        cipher = self._cipher
        if cipher is None:
            self.stats.before_key += 1
        elif is_rtcp(data):
            self.stats.rtcp += 1
        else:
            try:
                header, payload = cipher.open_rtp(data)
            except ProtocolError:
                self.stats.transport_undecryptable += 1
            else:
                if header.payload_type != OPUS_PAYLOAD_TYPE:
                    self.stats.other_payload_type += 1
                    self._notify()
                    return
                now = self._loop.time()
                user_id = self._ssrc_users.get(header.ssrc)
                if user_id is not None:
                    self._accept(user_id, header, payload, now)
                    return
                self.stats.unmapped_ssrc += 1
                held = self._unmapped.get(header.ssrc)
                if held is None:
                    if len(self._unmapped) >= _MAX_UNMAPPED_SSRCS:
                        self.stats.unmapped_dropped += 1
                        self._notify()
                        return
                    held = self._unmapped[header.ssrc] = deque(maxlen=_MAX_UNMAPPED)
                if len(held) == _MAX_UNMAPPED:
                    self.stats.unmapped_dropped += 1  # the deque drops the oldest
                held.append((header, payload, now))
        self._notify()  # a counter moved: waiters on stats re-check

    def _accept(self, user_id: int, header: RtpHeader, payload: bytes, now: float) -> None:
        encrypted = payload.endswith(_DAVE_MARKER)
        opus = self._dave.decrypt(user_id, payload)
        if opus is None:
            self._notify()  # dave_undecryptable moved: waiters on it re-check
            return
        frame = ReceivedFrame(
            user_id, header.ssrc, header.sequence, header.timestamp, header.marker, opus, now, encrypted
        )
        self._frames.setdefault(user_id, []).append(frame)
        self._notify()

    # ---- gateway ---------------------------------------------------------------------------------

    async def _send(self, message: ClientMessage) -> None:
        await self._ws.send(encode_client(message))

    async def _send_all(self, messages: list[ClientMessage]) -> None:
        """Send replies in order; with ``resume``, those the socket died under go out once op 9 answers."""
        for index, message in enumerate(messages):
            try:
                await self._send(message)
            except ConnectionClosed:
                if not self.resume:
                    raise
                # What prompted them is acknowledged, so the resume will not replay it: send them then.
                self._unsent.extend(messages[index:])
                return

    async def _read(self) -> None:
        try:
            while True:
                await self._read_socket(self._ws)
                code = self._ws.close_code
                self.closes.append(code)
                if not (self.resume and not self._closing and _resumable(code)):
                    break
                if not await self._resume():
                    break
        except Exception:  # a bug here must be visible: log it, count it, and hang up
            logger.exception("participant %d stopped reading its voice socket", self.user_id)
            self.stats.dave_errors["reader_failed"] += 1
            await self._ws.close(1011)
        finally:
            self.close_code = self._ws.close_code
            if self._heartbeat is not None:
                self._heartbeat.cancel()
            self._closed.set()
            self._notify()

    async def _read_socket(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:
                try:
                    decoded = decode_server(frame)
                except ProtocolError as exc:
                    self.stats.dave_errors["undecodable_server_frame"] += 1
                    logger.warning("participant %d got an undecodable frame: %s", self.user_id, exc)
                    continue
                if decoded.seq is not None:
                    self._seq = decoded.seq
                self.stats.opcodes_received[int(decoded.message.op)] += 1
                await self._handle(decoded.message)
                self._notify()

    async def _resume(self) -> bool:
        """Open a new socket to the same endpoint and send op 7; False when that is impossible."""
        if self._resume_attempts >= _MAX_RESUME_ATTEMPTS:
            logger.info("participant %d gives up after %d resumes", self.user_id, self._resume_attempts)
            return False
        self._resume_attempts += 1
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        try:
            ws = await _dial(self._endpoint, self._ssl_context, 5.0)
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            logger.info("participant %d could not reconnect to resume: %s", self.user_id, exc)
            return False
        if self._closing:  # close() ran while we dialled: it must not wait on this new socket
            await ws.close(1000)
            return False
        self._ws = ws
        self.stats.resumes += 1
        resume = Resume(
            server_id=self.server_id, session_id=self.session_id, token=self._token, seq_ack=self._seq
        )
        with contextlib.suppress(ConnectionClosed):  # the reader sees the close code next
            await self._send(resume)
        return True

    async def _handle(self, message: ServerMessage) -> None:
        dave = self._dave
        if isinstance(message, Hello):
            if self._heartbeat is None or self._heartbeat.done():
                period = min(message.heartbeat_interval / 1000.0, _MAX_HEARTBEAT_PERIOD)
                self._heartbeat = asyncio.create_task(self._heartbeats(period))
        elif isinstance(message, Resumed):
            self.stats.resumed += 1
            self._resume_attempts = 0
            unsent, self._unsent = self._unsent, []
            await self._send_all(unsent)
        elif isinstance(message, HeartbeatAck):
            self.stats.heartbeat_acks += 1
        elif isinstance(message, Ready):
            self.ssrc = message.ssrc
            self._spawn(self._select_protocol(message))
        elif isinstance(message, SessionDescription):
            self._session_description(message)
            binding = Speaking(speaking=SpeakingFlag.NONE, ssrc=self.ssrc)  # binds our SSRC
            await self._send_all([binding, *dave.on_session_description(message.dave_protocol_version)])
            self._described.set()
        elif isinstance(message, Speaking):
            if message.user_id is not None:
                self.speaking_events.append((message.user_id, message.ssrc, message.speaking))
                self._map_ssrc(message.ssrc, message.user_id)
        elif isinstance(message, ClientsConnect):
            self.clients.update(message.user_ids)
            dave.recognized.update(message.user_ids)
        elif isinstance(message, ClientDisconnect):
            self.clients.discard(message.user_id)
            dave.recognized.discard(message.user_id)
        elif isinstance(message, DaveMlsExternalSender):
            await self._send_all(dave.on_external_sender(message.external_sender))
        elif isinstance(message, DaveMlsProposals):
            await self._send_all(dave.on_proposals(message.operation, message.proposals))
        elif isinstance(message, DaveMlsAnnounceCommitTransition):
            await self._send_all(
                dave.on_commit_or_welcome(message.transition_id, message.commit, welcome=False)
            )
        elif isinstance(message, DaveMlsWelcome):
            await self._send_all(
                dave.on_commit_or_welcome(message.transition_id, message.welcome, welcome=True)
            )
        elif isinstance(message, DavePrepareTransition):
            await self._send_all(dave.on_prepare_transition(message.protocol_version, message.transition_id))
        elif isinstance(message, DaveExecuteTransition):
            dave.on_execute_transition(message.transition_id)
        elif isinstance(message, DavePrepareEpoch):
            await self._send_all(dave.on_prepare_epoch(message.protocol_version, message.epoch))

    def _session_description(self, message: SessionDescription) -> None:
        self.mode = message.mode
        self.dave_protocol_version = message.dave_protocol_version
        self._cipher = make_cipher(message.mode, message.secret_key)
        if self._sender is None:
            self._sender = RtpSender(self.ssrc, self._cipher)
        else:  # a new key for the same SSRC: keep the counters running
            self._sender = RtpSender(
                self.ssrc,
                self._cipher,
                sequence=self._sender.sequence,
                timestamp=self._sender.timestamp,
                nonce=self._sender.nonce,
            )

    def _map_ssrc(self, ssrc: int, user_id: int) -> None:
        self._ssrc_users[ssrc] = user_id
        held = self._unmapped.pop(ssrc, None)
        if held:
            for header, payload, arrival in held:
                self._accept(user_id, header, payload, arrival)

    async def _select_protocol(self, ready: Ready) -> None:
        loop = self._loop
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Udp(self), remote_addr=(ready.ip, ready.port)
        )
        self._udp = transport
        request = discovery.build_request(ready.ssrc)
        while True:
            self._discovery = loop.create_future()
            transport.sendto(request)
            try:
                async with asyncio.timeout(_DISCOVERY_RETRY):
                    response = await self._discovery
                break
            except TimeoutError:
                continue
        result = discovery.parse_response(response)
        mode = choose_mode(ready.modes)
        await self._send_all([SelectProtocol(address=result.address, port=result.port, mode=mode)])

    async def _heartbeats(self, period: float) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(period)
                await self._send(Heartbeat(nonce=int(time.time() * 1000), seq_ack=self._seq))

    # ---- plumbing --------------------------------------------------------------------------------

    def _spawn(self, coroutine: Any) -> None:
        task: asyncio.Task[Any] = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("participant %d task failed", self.user_id, exc_info=task.exception())
            self.stats.dave_errors["task_failed"] += 1

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            self._check_open()
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            await waiter

    def _check_open(self) -> None:
        """Raise the project's error once the participant is closed (left, kicked, or closed by a fault)."""
        if self._closed.is_set():
            code = self.close_code
            if code == CloseCode.E2EE_REQUIRED:
                raise DaveRequiredError("the channel requires DAVE (close 4017)", code=code)
            raise ConnectionClosedError(f"the voice socket closed (code {code})", code=code)

    async def _send_while_open(self, message: ClientMessage | str | bytes) -> None:
        """Send for the public API: a closed socket is a ConnectionClosedError, not websockets' exception."""
        self._check_open()
        frame = message if isinstance(message, (str, bytes)) else encode_client(message)
        try:
            await self._ws.send(frame)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            resuming = self.resume and not self._closing and _resumable(code)
            if resuming and not isinstance(message, str | bytes):
                self._unsent.append(message)  # it goes out once op 9 answers the resume
                return
            raise ConnectionClosedError(f"the voice socket closed (code {code})", code=code) from None

    async def _sleep_until(self, deadline: float) -> None:
        delay = deadline - self._loop.time()
        await asyncio.sleep(delay if delay > 0 else 0)  # behind schedule: still let others run


async def _dial(endpoint: str, ssl_context: ssl.SSLContext | None, timeout: float) -> ClientConnection:  # noqa: ASYNC109
    scheme = "wss" if ssl_context is not None else "ws"
    return await connect(
        f"{scheme}://{endpoint}/?v=8",
        ssl=ssl_context,
        compression=None,  # saves CPU when hundreds run in one process; discord.py tests deflate
        ping_interval=None,
        open_timeout=timeout,
        close_timeout=2.0,
        max_size=1 << 20,
        logger=WIRE_LOGGER,
    )
