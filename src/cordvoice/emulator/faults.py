"""Fault injection: everything that can go wrong with Discord, on demand, as ``emu.faults``.

One object per :class:`~cordvoice.emulator.Emulator` gathers the faults a voice client must survive and drives
the hooks the voice servers and the main gateway already have; it adds only the UDP impairment and the packet
crafting. Every fault is counted, globally in :attr:`Faults.counts` and per user in
``emu.inspect(user_id).faults`` (the user whose socket, session or packets the fault hit).

Voice gateway (the user's live voice session, wherever it runs):

* :meth:`Faults.close_client` with any close code; :meth:`Faults.drop_client` (TCP cut, no close frame);
* :meth:`Faults.crash` a voice server (4015 to every socket; sessions stay resumable);
* :meth:`Faults.withhold_acks` (the next N heartbeats, or until :meth:`Faults.restore_acks`).

Main gateway and state (the wire shows the dispatches, then the voice side closes):

* :meth:`Faults.move_guild` / :meth:`Faults.move_client` to another voice server, optionally announcing
  ``endpoint: null`` first (VOICE_SERVER_UPDATE), then new tokens; old voice sockets close with 4022;
* :meth:`Faults.kick` (VOICE_STATE_UPDATE with a null channel, then 4014);
  :meth:`Faults.delete_channel` (CHANNEL_DELETE, null-channel voice states, then 4022).

UDP (the media server's forwarding path):

* :meth:`Faults.impair`: seeded loss, duplication, reordering, delay and jitter, per receiving user or for
  everyone; :meth:`Faults.clear_impairment`;
* :meth:`Faults.pause_udp` / :meth:`Faults.resume_udp`: the media server drops everything both ways;
* crafted datagrams to a client: :meth:`Faults.inject_raw`, :meth:`Faults.inject_garbage`,
  :meth:`Faults.inject_rtp` (header extension, padding, CSRCs, any SSRC, sealed with the client's key or a
  wrong one) and :meth:`Faults.inject_rtcp`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import os
import random
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cordvoice.emulator.sfu import Address, ForwardHook, MediaEndpoint, MediaServer, check_datagram_size
from cordvoice.emulator.state import VoiceServer
from cordvoice.emulator.voice_protocol import check_close_code
from cordvoice.errors import EmulatorError, InvalidArgumentError
from cordvoice.udp.crypto import make_cipher
from cordvoice.udp.rtp import OPUS_PAYLOAD_TYPE, OPUS_SILENCE, RTP_VERSION
from cordvoice.voicegateway.closecodes import CloseCode

if TYPE_CHECKING:
    from cordvoice.emulator.server import Emulator
    from cordvoice.emulator.voice_server import EmulatedVoiceServer

__all__ = ["EXTENSION_PROFILE", "Faults", "Impairment", "ImpairmentConfig", "check_move_pause"]

logger = logging.getLogger(__name__)

#: The RFC 8285 one-byte header extension profile official Discord clients use.
EXTENSION_PROFILE = 0xBEDE
#: A packet held back for reordering goes out anyway after this long if no successor comes.
REORDER_HOLD_LIMIT = 0.1
_RTCP_RECEIVER_REPORT = 201
_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF
_FIXED_HEADER = struct.Struct(">BBHII")
_RTCP_HEADER = struct.Struct(">BBHI")


def check_move_pause(pause: float) -> None:
    """Refuse a move's pause that is negative or NaN (it meant nothing) or endless (members kept
    ``endpoint: null`` for good, and the call never returned)."""
    if not 0.0 <= pause < math.inf:
        raise InvalidArgumentError(f"pause must be finite and >= 0 seconds, got {pause!r}")


@dataclass(frozen=True)
class ImpairmentConfig:
    """What an impairment does to each forwarded datagram (probabilities 0..1, times in seconds).

    * ``loss``: the chance a packet is dropped;
    * ``duplicate``: the chance a packet is sent twice;
    * ``reorder``: the expected fraction of packets delivered right after their successor (below 0.5);
    * ``delay``: added to every packet; ``jitter``: a further uniform random delay in ``[0, jitter]``, which
      reorders packets on its own once it exceeds the packet spacing (20 ms);
    * ``seed``: makes the random choices repeatable.
    """

    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InvalidArgumentError(f"{name} must be in 0..1, got {value!r}")
        if not 0.0 <= self.reorder < 0.5:
            raise InvalidArgumentError(f"reorder must be in 0..0.5 (exclusive), got {self.reorder!r}")
        if not (0.0 <= self.delay < math.inf and 0.0 <= self.jitter < math.inf):  # NaN fails too
            raise InvalidArgumentError(
                f"delay and jitter must be finite and >= 0 seconds, got {self.delay!r} and {self.jitter!r}"
            )


class Impairment:
    """A running :class:`ImpairmentConfig`: its random generator, its counters and its delay queue.

    Delayed packets wait in one heap ordered by (due time, arrival), drained by a single timer, so equal
    delays keep their order and only jitter or a reorder choice changes it. A packet chosen for reordering is
    held until the next packet for the same receiver has gone out (at most :data:`REORDER_HOLD_LIMIT`).
    """

    def __init__(self, config: ImpairmentConfig, user_id: int | None) -> None:
        self.config = config
        self.user_id = user_id
        """The receiving user it applies to (None: every receiver without its own impairment)."""
        self.counters: Counter[str] = Counter()
        """``forwarded`` (seen), ``lost``, ``duplicated``, ``reordered``, ``delayed``."""
        self._rng = random.Random(config.seed)
        # A held packet is released right after its successor; holding with this probability (and never two
        # in a row) makes the fraction of packets that arrive after their successor equal ``reorder``.
        self._hold_probability = config.reorder / (1.0 - config.reorder)
        self._loop = asyncio.get_running_loop()
        self._held: dict[MediaEndpoint, tuple[list[bytes], Address, MediaServer, asyncio.TimerHandle]] = {}
        self._queue: list[tuple[float, int, bytes, Address, MediaServer]] = []
        self._order = itertools.count()
        self._timer: asyncio.Handle | None = None
        self._timer_when = 0.0
        """When the armed timer fires (uvloop's ``call_at`` returns a plain Handle, without ``when()``, for a
        deadline under 0.5 ms away)."""

    def forward(
        self, packet: bytes, address: Address, receiver: MediaEndpoint, media: MediaServer
    ) -> Counter[str]:
        """Impair one forwarded packet; returns what happened to it (for the per-user fault counts)."""
        config = self.config
        rng = self._rng
        events: Counter[str] = Counter()
        self.counters["forwarded"] += 1
        if config.loss and rng.random() < config.loss:
            events["udp_lost"] += 1
            self.counters["lost"] += 1
            return events
        copies = [packet]
        if config.duplicate and rng.random() < config.duplicate:
            copies.append(packet)
            events["udp_duplicated"] += 1
            self.counters["duplicated"] += 1
        held = self._held.pop(receiver, None)
        if held is None and self._hold_probability and rng.random() < self._hold_probability:
            timer = self._loop.call_later(REORDER_HOLD_LIMIT, self._release_stale, receiver)
            self._held[receiver] = (copies, address, media, timer)
            events["udp_reordered"] += 1
            self.counters["reordered"] += 1
            return events
        delayed = sum(self._emit(copy, address, media) for copy in copies)
        if delayed:
            events["udp_delayed"] += delayed
        if held is not None:
            held_copies, held_address, held_media, timer = held
            timer.cancel()
            for copy in held_copies:
                self._emit(copy, held_address, held_media)
        return events

    def close(self) -> None:
        """Drop whatever is still held or queued (the emulator is shutting down)."""
        for _, _, _, timer in self._held.values():
            timer.cancel()
        self._held.clear()
        self._queue.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def flush(self) -> None:
        """Send everything held or queued now (the impairment is being removed)."""
        for receiver in list(self._held):
            self._release_stale(receiver)
        queue, self._queue = self._queue, []
        for _, _, packet, address, media in sorted(queue):
            media.send_datagram(packet, address)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _emit(self, packet: bytes, address: Address, media: MediaServer) -> int:
        """Send now, or queue for later; returns 1 if the packet was delayed."""
        config = self.config
        delay = config.delay + (self._rng.uniform(0.0, config.jitter) if config.jitter else 0.0)
        if delay <= 0.0 and not self._queue:
            media.send_datagram(packet, address)
            return 0
        # Queued even without a delay of its own when earlier packets still wait: it must not overtake them.
        due = self._loop.time() + delay
        heapq.heappush(self._queue, (due, next(self._order), packet, address, media))
        self._schedule()
        if delay <= 0.0:
            return 0
        self.counters["delayed"] += 1
        return 1

    def _schedule(self) -> None:
        if not self._queue:
            return
        due = self._queue[0][0]
        if self._timer is not None:
            if self._timer_when <= due:
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(due, self._drain)
        self._timer_when = due

    def _drain(self) -> None:
        self._timer = None
        now = self._loop.time()
        queue = self._queue
        while queue and queue[0][0] <= now:
            _, _, packet, address, media = heapq.heappop(queue)
            media.send_datagram(packet, address)
        self._schedule()

    def _release_stale(self, receiver: MediaEndpoint) -> None:
        held = self._held.pop(receiver, None)
        if held is not None:
            copies, address, media, timer = held
            timer.cancel()
            for copy in copies:
                self._emit(copy, address, media)

    def __repr__(self) -> str:
        return f"Impairment(user_id={self.user_id}, {self.config}, counters={dict(self.counters)})"


class Faults:
    """The emulator's fault injection API (``emu.faults``); see the module docstring for the list."""

    def __init__(self, emulator: Emulator) -> None:
        self._emu = emulator
        self.counts: Counter[str] = Counter()
        """Every fault injected, by kind (``close``, ``crash``, ``udp_lost``, ``inject_rtp``, ...)."""
        self._by_user: dict[int, Counter[str]] = {}
        self._impairments: dict[int | None, Impairment] = {}
        self._hooked: dict[int, tuple[MediaServer, ForwardHook]] = {}

    def for_user(self, user_id: int) -> dict[str, int]:
        """The faults that hit ``user_id`` so far, by kind (also in ``emu.inspect(user_id).faults``)."""
        return dict(self._by_user.get(user_id, ()))

    # ---- voice gateway -------------------------------------------------------------------------------

    async def close_client(
        self, user_id: int, code: int, reason: str = "closed by the emulator", *, guild_id: int | None = None
    ) -> int:
        """Close the user's voice socket with ``code``; 4015 and codes below 4000 keep the session.

        Any code a close frame can carry works (1004-1006 and 1015 cannot be sent: InvalidArgumentError).
        Returns how many sockets were closed (0 if the session had no socket at that moment).
        """
        check_close_code(code)
        server = self._server_of(user_id, guild_id)
        closed = await server.close_client(user_id, code, reason, guild_id=guild_id)
        self._count("close", user_id, closed)
        self._count(f"close_{code}", user_id, closed)
        return closed

    async def drop_client(self, user_id: int, *, guild_id: int | None = None) -> int:
        """Cut the user's voice TCP connection without a close frame (the client sees 1006)."""
        server = self._server_of(user_id, guild_id)
        dropped = await server.drop_client(user_id, guild_id=guild_id)
        self._count("drop", user_id, dropped)
        return dropped

    async def crash(
        self,
        server_id: int | None = None,
        *,
        guild_id: int | None = None,
        code: int = CloseCode.VOICE_SERVER_CRASHED,
    ) -> int:
        """Crash a voice server: every socket on it closes with 4015, every session stays resumable.

        ``server_id`` or ``guild_id`` chooses the server (default: the first one). Returns the sockets closed.
        """
        check_close_code(code)
        server = self._emu.voice_server(server_id, guild_id=guild_id)
        users = [c.session.user_id for c in server.core.connections.values() if c.session and not c.closing]
        closed = await server.crash(code)
        self.counts["crash"] += 1
        for user_id in users:
            self._count("crashed", user_id)
        return closed

    def withhold_acks(self, user_id: int, count: int | None = None, *, guild_id: int | None = None) -> None:
        """Leave the user's next ``count`` heartbeats unanswered (None: until :meth:`restore_acks`)."""
        self._server_of(user_id, guild_id).withhold_acks(user_id, True, guild_id=guild_id, count=count)
        self._count("withhold_acks", user_id)

    def restore_acks(self, user_id: int, *, guild_id: int | None = None) -> None:
        """Answer the user's heartbeats again."""
        self._server_of(user_id, guild_id).withhold_acks(user_id, False, guild_id=guild_id)

    # ---- main gateway and state -----------------------------------------------------------------------

    async def move_guild(
        self,
        guild_id: int,
        server_id: int | None = None,
        *,
        null_endpoint_first: bool = False,
        pause: float = 0.0,
    ) -> VoiceServer:
        """Move a guild's calls to another voice server (default: another running one, or a new one).

        Everyone in voice gets VOICE_SERVER_UPDATE with a new token and endpoint (with
        ``null_endpoint_first``, first ``endpoint: null`` and ``pause`` seconds later the new one); their old
        voice sockets close with 4022. Returns the new voice server.
        """
        check_move_pause(pause)
        emu = self._emu
        current = emu.state.guild_voice_server(guild_id).id
        if server_id is None:
            others = sorted(sid for sid in emu.voice_server_handles if sid != current)
            server_id = others[0] if others else (await emu.add_voice_server()).id
        elif server_id == current:
            raise EmulatorError(f"guild {guild_id} is already on voice server {server_id}")
        changes = await emu.move_guild(
            guild_id, server_id, null_endpoint_first=null_endpoint_first, pause=pause
        )
        self.counts["move"] += 1
        for change in changes:
            self._count("moved_null_endpoint" if null_endpoint_first else "moved", change.user_id)
        return emu.state.voice_server(server_id)

    async def move_client(
        self,
        user_id: int,
        server_id: int | None = None,
        *,
        guild_id: int | None = None,
        null_endpoint_first: bool = False,
        pause: float = 0.0,
    ) -> VoiceServer:
        """Move the user's call to another voice server.

        Discord runs a whole call on one voice server, so everyone in the user's guild moves with it (see
        :meth:`move_guild`). ``guild_id`` is needed only when the user is in voice in several guilds.
        """
        return await self.move_guild(
            self._voice_guild_of(user_id, guild_id),
            server_id,
            null_endpoint_first=null_endpoint_first,
            pause=pause,
        )

    def kick(self, user_id: int, *, guild_id: int | None = None) -> bool:
        """Disconnect the user from voice: VOICE_STATE_UPDATE with a null channel, then close 4014."""
        change = self._emu.disconnect_member(self._voice_guild_of(user_id, guild_id), user_id)
        if change is not None:
            self._count("kick", user_id)
        return change is not None

    def delete_channel(self, channel_id: int) -> int:
        """Delete a channel: CHANNEL_DELETE, null-channel voice states, 4022 on every voice socket in it.

        Returns how many members were in it.
        """
        changes = self._emu.delete_channel(channel_id)
        self.counts["delete_channel"] += 1
        for change in changes:
            self._count("channel_deleted", change.user_id)
        return len(changes)

    # ---- UDP ------------------------------------------------------------------------------------------

    def impair(
        self,
        user_id: int | None = None,
        *,
        loss: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        delay: float = 0.0,
        jitter: float = 0.0,
        seed: int | None = None,
    ) -> Impairment:
        """Impair the audio the media servers forward to ``user_id`` (None: to everyone without their own).

        Replaces that user's (or the global) previous impairment; see :class:`ImpairmentConfig`. Returns the
        running :class:`Impairment` (its ``counters`` say what it did).
        """
        config = ImpairmentConfig(loss, duplicate, reorder, delay, jitter, seed)
        self.clear_impairment(user_id)
        impairment = Impairment(config, user_id)
        self._impairments[user_id] = impairment
        if user_id is None:
            self.counts["impair"] += 1
        else:
            self._count("impair", user_id)
        self._install_hooks()
        return impairment

    def clear_impairment(self, user_id: int | None = None) -> None:
        """Stop impairing ``user_id``'s audio (None: the global impairment); held packets go out now."""
        impairment = self._impairments.pop(user_id, None)
        if impairment is not None:
            impairment.flush()
        if not self._impairments:
            self._remove_hooks()

    def clear_impairments(self) -> None:
        """Stop every impairment."""
        for user_id in list(self._impairments):
            self.clear_impairment(user_id)

    def pause_udp(self, server_id: int | None = None, *, guild_id: int | None = None) -> None:
        """Stop the media server: every datagram in and out is dropped (and counted) until resumed."""
        server = self._emu.voice_server(server_id, guild_id=guild_id)
        server.media.paused = True
        self.counts["pause_udp"] += 1
        for record in list(server.core.sessions.values()):
            self._count("udp_paused", record.user_id)

    def resume_udp(self, server_id: int | None = None, *, guild_id: int | None = None) -> None:
        """Restart a paused media server."""
        self._emu.voice_server(server_id, guild_id=guild_id).media.paused = False

    # ---- crafted datagrams ----------------------------------------------------------------------------

    def inject_raw(self, user_id: int, data: bytes, *, guild_id: int | None = None) -> bytes:
        """Send ``data`` as one datagram from the media server to the user's UDP address."""
        media, endpoint = self._media_of(user_id, guild_id)
        media.inject(endpoint, bytes(data))
        self._count("inject_raw", user_id)
        return bytes(data)

    def inject_garbage(
        self, user_id: int, size: int = 64, *, seed: int | None = None, guild_id: int | None = None
    ) -> bytes:
        """Send ``size`` random bytes (seeded if asked) to the user; returns them."""
        if not 0 <= size <= 4096:
            raise InvalidArgumentError("size must be in 0..4096")
        data = random.Random(seed).randbytes(size) if seed is not None else os.urandom(size)
        media, endpoint = self._media_of(user_id, guild_id)
        media.inject(endpoint, data)
        self._count("inject_garbage", user_id)
        return data

    def inject_rtp(
        self,
        user_id: int,
        *,
        ssrc: int | None = None,
        sequence: int = 0,
        timestamp: int = 0,
        payload: bytes = OPUS_SILENCE,
        marker: bool = False,
        payload_type: int = OPUS_PAYLOAD_TYPE,
        extension: bytes | None = None,
        extension_profile: int = EXTENSION_PROFILE,
        padding: int = 0,
        csrcs: Iterable[int] = (),
        wrong_key: bool = False,
        guild_id: int | None = None,
    ) -> bytes:
        """Send the user a crafted RTP packet sealed with its transport key (as the SFU would); returns it.

        ``ssrc`` None is an SSRC nobody in the call has. ``extension`` is the header extension body (padded to
        32-bit words; the 4-byte preamble stays in clear, the body is encrypted, as in the rtpsize modes);
        ``padding`` adds that many padding bytes (the last one holds the count) and sets P; ``csrcs`` (up to
        15) go in clear after the fixed header. ``payload`` goes in as is (a DAVE frame or plain Opus).
        ``wrong_key`` seals with a random key instead: the client must drop it. Uses (and advances) the
        server's nonce counter for this client unless ``wrong_key``.
        """
        csrc_list = list(csrcs)
        if len(csrc_list) > 15 or not all(0 <= c <= _U32 for c in csrc_list):
            raise InvalidArgumentError("csrcs: at most 15 values in 0..2**32-1")
        if not 0 <= padding <= 255 or not 0 <= payload_type <= 127:
            raise InvalidArgumentError("padding must be in 0..255 and payload_type in 0..127")
        if not 0 <= sequence <= _U16 or not 0 <= timestamp <= _U32:
            raise InvalidArgumentError("sequence is a u16 and timestamp a u32")
        media, endpoint = self._media_of(user_id, guild_id)
        if ssrc is None:
            ssrc = media.allocate_ssrc()
        elif not 0 <= ssrc <= _U32:
            raise InvalidArgumentError("ssrc is a u32")
        byte0 = (RTP_VERSION << 6) | len(csrc_list)
        if padding:
            byte0 |= 0x20
        if extension is not None:
            byte0 |= 0x10
        byte1 = (0x80 if marker else 0) | payload_type
        header = _FIXED_HEADER.pack(byte0, byte1, sequence, timestamp, ssrc)
        header += b"".join(c.to_bytes(4, "big") for c in csrc_list)
        body = b""
        if extension is not None:
            body = bytes(extension) + bytes(-len(extension) % 4)
            if len(body) // 4 > _U16 or not 0 <= extension_profile <= _U16:
                raise InvalidArgumentError("extension too long, or profile outside u16")
            header += struct.pack(">HH", extension_profile, len(body) // 4)
        plaintext = body + bytes(payload)
        if padding:
            plaintext += bytes(padding - 1) + bytes((padding,))
        packet = self._seal(endpoint, header, plaintext, wrong_key)
        media.inject(endpoint, packet)
        self._count("inject_rtp_wrong_key" if wrong_key else "inject_rtp", user_id)
        return packet

    def inject_rtcp(
        self,
        user_id: int,
        *,
        packet_type: int = _RTCP_RECEIVER_REPORT,
        ssrc: int = 0,
        body: bytes | None = None,
        wrong_key: bool = False,
        guild_id: int | None = None,
    ) -> bytes:
        """Send the user a sealed RTCP packet (default: a receiver report about its own stream); returns it.

        The first 8 bytes (header, sender SSRC) stay in clear, the rest is encrypted, as in the rtpsize modes.
        """
        if not 200 <= packet_type <= 204:
            raise InvalidArgumentError("RTCP packet types are 200..204")
        if not 0 <= ssrc <= _U32:
            raise InvalidArgumentError("ssrc is a u32")
        media, endpoint = self._media_of(user_id, guild_id)
        count = 0
        if body is None:  # one report block: SSRC, loss fraction/total, highest seq, jitter, LSR, DLSR
            body = struct.pack(">IIIIII", endpoint.ssrc, 0, 0, 0, 0, 0)
            count = 1
        body = bytes(body) + bytes(-len(body) % 4)
        check_datagram_size(_RTCP_HEADER.size + len(body))  # before its length field overflows
        header = _RTCP_HEADER.pack((RTP_VERSION << 6) | count, packet_type, (8 + len(body)) // 4 - 1, ssrc)
        packet = self._seal(endpoint, header, body, wrong_key)
        media.inject(endpoint, packet)
        self._count("inject_rtcp", user_id)
        return packet

    # ---- life cycle (driven by the emulator) ------------------------------------------------------------

    def voice_server_added(self, server: EmulatedVoiceServer) -> None:
        """A new voice server started: impairments apply to it too."""
        if self._impairments:
            self._hook(server.media)

    def close(self) -> None:
        """Cancel every pending delayed or held packet."""
        for impairment in self._impairments.values():
            impairment.close()
        self._impairments.clear()
        self._remove_hooks()

    # ---- helpers --------------------------------------------------------------------------------------

    def _count(self, kind: str, user_id: int, times: int = 1) -> None:
        if times <= 0:
            return
        self.counts[kind] += times
        counter = self._by_user.get(user_id)
        if counter is None:
            counter = self._by_user[user_id] = Counter()
        counter[kind] += times

    def _server_of(self, user_id: int, guild_id: int | None) -> EmulatedVoiceServer:
        """The voice server holding the user's live voice session."""
        for server in self._emu._emulated_voice_servers():
            if server.core.live_record(user_id, guild_id) is not None:
                return server
        raise EmulatorError(f"user {user_id} has no live voice session on any voice server")

    def _media_of(self, user_id: int, guild_id: int | None) -> tuple[MediaServer, MediaEndpoint]:
        server = self._server_of(user_id, guild_id)
        return server.media, server.media_endpoint(user_id, guild_id=guild_id)

    def _voice_guild_of(self, user_id: int, guild_id: int | None) -> int:
        if guild_id is not None:
            return guild_id
        guilds = [g.id for g in self._emu.state.guilds.values() if user_id in g.voice_states]
        if len(guilds) != 1:
            raise EmulatorError(
                f"user {user_id} is in voice in {len(guilds)} guilds; pass guild_id to choose one"
            )
        return guilds[0]

    @staticmethod
    def _seal(endpoint: MediaEndpoint, header: bytes, plaintext: bytes, wrong_key: bool) -> bytes:
        if not wrong_key:
            return endpoint.seal(header, plaintext)
        if endpoint.cipher is None:
            raise EmulatorError(f"user {endpoint.user_id} has not selected a transport mode yet")
        return make_cipher(endpoint.cipher.mode, os.urandom(32)).seal(header, plaintext, endpoint.nonce)

    def _install_hooks(self) -> None:
        for server in self._emu._emulated_voice_servers():
            self._hook(server.media)

    def _hook(self, media: MediaServer) -> None:
        if id(media) in self._hooked:
            return
        if media.forward_hook is not None:
            raise EmulatorError("the media server already has a forward_hook; remove it before impairing UDP")
        impairments = self._impairments
        by_user = self._by_user
        counts = self.counts

        def forward(packet: bytes, address: Address, sender: MediaEndpoint, receiver: MediaEndpoint) -> None:
            impairment = impairments.get(receiver.user_id) or impairments.get(None)
            if impairment is None:
                media.send_datagram(packet, address)
                return
            events = impairment.forward(packet, address, receiver, media)
            if events:
                counts.update(events)
                user_counts = by_user.get(receiver.user_id)
                if user_counts is None:
                    user_counts = by_user[receiver.user_id] = Counter()
                user_counts.update(events)

        media.forward_hook = forward
        self._hooked[id(media)] = (media, forward)

    def _remove_hooks(self) -> None:
        for media, hook in self._hooked.values():
            if media.forward_hook is hook:
                media.forward_hook = None
        self._hooked.clear()
