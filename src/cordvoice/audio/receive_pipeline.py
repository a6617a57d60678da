"""The sans-IO core of voice receive: RTP packets in, per-user frames and speaking changes out.

Input is what the UDP layer delivers after transport decryption (RTP header, payload, arrival time) plus the
voice gateway's membership signals: op 5 (SSRC to user), op 11/op 13 (users in the call) and DAVE epoch
changes. Output, on every :meth:`ReceivePipeline.tick`, is the list of frames whose playout time has come,
in order per stream, plus decode jobs for the users whose PCM somebody wants and speaking changes.

Per packet (the hot path, all synchronous and allocation-light):

1. SSRC to stream. Packets from an SSRC no op 5 has named yet are held (bounded per SSRC, bounded number of
   SSRCs, bounded age) and replayed with their original arrival times once the SSRC is mapped; otherwise
   they expire and are counted.
2. DAVE decryption with the user's id. A frame whose key has not arrived (the sender applied the commit a
   moment before we did) raises :class:`~cordvoice.errors.DaveKeyPendingError`; it is held per stream and
   retried (oldest first) when the epoch changes or before a later frame of the same stream is decrypted,
   and dropped (counted ``undecryptable``) after ``key_hold`` seconds. Oldest first matters: davey refuses a
   nonce older than the first one it opened under a key. Holds are short on purpose: davey reports replays
   and tampered frames the same way as a missing key. Passthrough windows and the previous epoch's keys are
   davey's business (through :class:`~cordvoice.dave.session.DaveClient`); this core only sees results.
3. The per-SSRC :class:`~cordvoice.audio.jitter.JitterBuffer`, with the packet's arrival time, so a held frame
   is scheduled where it would have played had it decrypted on arrival.

Per tick (one call for all streams, from the process-wide 20 ms clock): only streams with buffered packets
are visited; each pops its due frames. Lost slots come out as concealed frames. Every frame also gets a
``timeline_time`` for recorders (the sender's RTP clock anchored at the smallest transit; see
``ReceivePipeline._convert``), so a stall does not stretch recordings while real pauses stay. Decoding is
not done here: for users whose PCM is wanted, :meth:`tick` returns :class:`DecodeJob` items that the shell
runs in a batch on a worker thread with :func:`~cordvoice.audio.opus.decode_slots` (libopus releases the
GIL), so a receiver that only wants Opus never pays for a decoder.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from heapq import heapify, heappop, heappush
from typing import Final, Literal, NamedTuple

from cordvoice.audio.jitter import FrameKind, JitterBuffer, JitterFrame, JitterStats, PushResult
from cordvoice.audio.opus import (
    OPUS_SILENCE,
    SLOT_DECODE,
    SLOT_LOST,
    STATUS_ERROR,
    STATUS_FEC,
    OpusDecoder,
    packet_samples,
)
from cordvoice.audio.pcm import FRAME_SAMPLES, SAMPLE_RATE
from cordvoice.errors import (
    AudioError,
    DaveDecryptError,
    DaveKeyPendingError,
    DecryptionError,
    InvalidArgumentError,
    ProtocolError,
    VoiceError,
)
from cordvoice.udp.crypto import TransportCipher
from cordvoice.udp.rtp import OPUS_PAYLOAD_TYPE, RtpHeader, is_rtcp

__all__ = [
    "DEFAULT_JITTER_DELAY",
    "DEFAULT_JITTER_MAX_PACKETS",
    "DecodeJob",
    "DecryptFn",
    "PipelineCounters",
    "ReceivePipeline",
    "SpeakingChange",
    "TickOutput",
    "UserStats",
    "VoiceFrame",
]

logger = logging.getLogger(__name__)

DecryptFn = Callable[[int, bytes], bytes]
"""``decrypt(user_id, frame) -> opus``; raises DaveKeyPendingError (hold) or DaveDecryptError (drop)."""

DEFAULT_JITTER_DELAY: Final = 0.060
DEFAULT_JITTER_MAX_PACKETS: Final = 250
"""5 s per stream. After an event-loop stall, a burst of packets lands at once and the jitter buffer keeps
them on their (now later) schedule; a buffer smaller than the burst would then stay full and drop one packet
for every packet that arrives, for as long as the talkspurt lasts. 250 absorbs stalls of up to ~5 s."""
_VOICED_MIN_BYTES: Final = 4
"""Opus packets this small are silence or DTX comfort noise (``F8 FF FE`` is 3 bytes), not speech."""

_HALF_FRAME_S: Final = FRAME_SAMPLES / SAMPLE_RATE / 2
_TRANSIT_HEAP_LIMIT: Final = 4 * DEFAULT_JITTER_MAX_PACKETS
"""Compact a stream's transit heap beyond this (stale entries sink below the top only slowly)."""
_SAMPLES_BY_TOC: Final = tuple(0 if toc & 3 == 3 else packet_samples(bytes((toc,))) for toc in range(256))
"""Samples of an Opus packet by its first (TOC) byte; 0 where the answer needs the next byte (code 3)."""
_ACCEPTED: Final = PushResult.ACCEPTED
_AUDIO: Final = FrameKind.AUDIO
_GAP: Final = FrameKind.GAP
_new_tuple: Final = tuple.__new__
"""Builds a NamedTuple from a full tuple of its fields, skipping its Python-level ``__new__`` (hot paths)."""


def _check_seconds(name: str, value: object) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < math.inf:
        raise InvalidArgumentError(f"{name} must be a finite number of seconds >= 0, got {value!r}")


def _check_count(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidArgumentError(f"{name} must be an integer of at least {minimum}, got {value!r}")


class VoiceFrame(NamedTuple):
    """One 20 ms slot of one user's audio, in playout order.

    Times are on the receiver's clock (``time.monotonic()``). ``playout_time`` is when the jitter buffer
    releases the slot. ``timeline_time`` is where the slot belongs on a timeline shared by every user, the
    one recorders place audio on: the sender's RTP clock, anchored at the stream's smallest transit delay.
    It equals ``playout_time`` in a healthy stream, but a burst after a stall (ours or the network's) does not
    stretch it, while a real pause does. ``opus`` is None for a concealed slot (a packet that never came);
    ``pcm`` (48 kHz stereo s16) is present only on streams opened with PCM.
    """

    user_id: int
    ssrc: int
    sequence: int
    timestamp: int
    arrival_time: float | None
    playout_time: float
    timeline_time: float
    opus: bytes | None
    pcm: bytes | None = None
    concealed: bool = False
    samples: int = FRAME_SAMPLES

    @property
    def duration(self) -> float:
        return self.samples / SAMPLE_RATE

    @property
    def end_time(self) -> float:
        """Where the slot ends on the timeline (``timeline_time`` plus its duration)."""
        return self.timeline_time + self.samples / SAMPLE_RATE

    @property
    def is_silence(self) -> bool:
        """The 3-byte Opus silence frame clients send when they stop talking."""
        return self.opus == OPUS_SILENCE


class SpeakingChange(NamedTuple):
    """A user started or stopped speaking.

    ``source`` says who decided: ``"gateway"`` (op 5 flags became non-zero / zero) or ``"audio"`` (voiced
    frames started; none for ``hangover`` seconds). ``time`` is on the receiver's clock.
    """

    user_id: int
    speaking: bool
    source: Literal["gateway", "audio"]
    time: float
    ssrc: int


class DecodeJob(NamedTuple):
    """Work for one slot: decode ``data``, or conceal (with FEC from ``data`` when it is the next packet)."""

    decoder: OpusDecoder
    kind: int
    data: bytes | None
    samples: int


@dataclass(slots=True)
class UserStats:
    """What happened to one user's audio; every frame that did not play is in one of these counters.

    ``received`` counts RTP packets that reached the user's stream. ``lost`` counts slots whose packet never
    came (``concealed`` of them were filled by concealment, the rest fell inside a silence gap). ``late`` and
    ``duplicate`` are packets the jitter buffer refused; ``undecryptable`` the frames DAVE could not open
    (including held frames whose key never came); ``dropped`` packets discarded for other reasons
    (malformed Opus, jitter overflow, a restarted stream). ``key_held``/``key_recovered`` count frames that
    waited for their key and those that then decrypted.
    """

    received: int = 0
    delivered: int = 0
    lost: int = 0
    concealed: int = 0
    late: int = 0
    duplicate: int = 0
    undecryptable: int = 0
    dropped: int = 0
    key_held: int = 0
    key_recovered: int = 0
    decoded: int = 0
    fec_recovered: int = 0
    """Lost slots decoded from the next packet's in-band FEC (SILK/hybrid packets only)."""
    decode_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True)
class PipelineCounters:
    """Packets dropped before they could be attributed to a user, by reason, and hold bookkeeping."""

    packets: int = 0
    rtcp: int = 0
    malformed: int = 0
    transport_undecryptable: int = 0
    other_payload_type: int = 0
    unknown_ssrc_held: int = 0
    unknown_ssrc_replayed: int = 0
    unknown_ssrc_dropped: int = 0
    decode_backlog_dropped: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, int]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "reasons"}
        out.update({f"reason_{key}": value for key, value in self.reasons.items()})
        return out


class TickOutput(NamedTuple):
    """What one :meth:`ReceivePipeline.tick` produced.

    ``jobs`` pairs an index into ``frames`` with the decode job whose PCM belongs to that frame.
    """

    frames: list[VoiceFrame]
    jobs: list[tuple[int, DecodeJob]]
    speaking: list[SpeakingChange]


_EMPTY_TICK: Final = TickOutput([], [], [])


class _Held(NamedTuple):
    sequence: int
    timestamp: int
    payload: bytes
    arrival: float


class _Stream:
    """One SSRC: its jitter buffer, decoder, frames waiting for a DAVE key and audio-activity state."""

    __slots__ = (
        "base",
        "decoder",
        "jitter",
        "key_pending",
        "last_end",
        "last_voiced_end",
        "newest_ext",
        "newest_ts",
        "speaking",
        "ssrc",
        "stats",
        "transits",
        "user_id",
        "voiced_run",
    )

    def __init__(self, ssrc: int, user_id: int, jitter: JitterBuffer, stats: UserStats) -> None:
        self.ssrc = ssrc
        self.user_id = user_id
        self.jitter = jitter
        self.stats = stats
        """The user's counters (the same object for every stream of that user)."""
        self.decoder: OpusDecoder | None = None
        self.key_pending: deque[_Held] = deque()
        self.speaking = False
        self.voiced_run = 0
        self.last_voiced_end = 0.0
        # Timeline estimate (see _convert): unwrapped numbers of the newest packet, a min-heap of
        # (arrival - timestamp / rate, extended sequence) of accepted packets, the current anchor.
        self.newest_ext = -1
        self.newest_ts = 0
        self.transits: list[tuple[float, int]] = []
        self.base: float | None = None
        self.last_end: float | None = None


class _User:
    __slots__ = ("gateway_speaking", "retired", "ssrcs", "stats")

    def __init__(self) -> None:
        self.stats = UserStats()
        self.retired = JitterStats()
        """Jitter counters of this user's streams that are gone (their live counters are summed on demand)."""
        self.ssrcs: set[int] = set()
        self.gateway_speaking = False


class ReceivePipeline:
    """Receive state for one voice connection (all users); see the module docstring.

    ``decrypt`` is the DAVE decrypt callable (``DaveClient.decrypt``); pass ``None`` for a call without
    end-to-end encryption. Times are seconds on one monotonic clock, the one the arrival times use.
    """

    def __init__(
        self,
        decrypt: DecryptFn | None = None,
        *,
        jitter_delay: float = DEFAULT_JITTER_DELAY,
        jitter_max_packets: int = DEFAULT_JITTER_MAX_PACKETS,
        max_conceal: int = 5,
        key_hold: float = 1.0,
        key_hold_max: int = 64,
        unknown_hold: float = 2.0,
        unknown_per_ssrc: int = 100,
        unknown_max_ssrcs: int = 32,
        activity_start_frames: int = 2,
        activity_hangover: float = 0.3,
        timeline_tolerance: float | None = None,
    ) -> None:
        # Receiver(**options) lands here: a NaN hangover never ended anyone's speaking, and a str or a float
        # count failed later, inside a tick or on the packet path.
        times: dict[str, float | None] = {"jitter_delay": jitter_delay, "key_hold": key_hold}
        times["unknown_hold"] = unknown_hold
        times |= {"activity_hangover": activity_hangover, "timeline_tolerance": timeline_tolerance}
        for name, value in times.items():
            if value is not None or name != "timeline_tolerance":
                _check_seconds(name, value)
        counts = {"jitter_max_packets": jitter_max_packets, "key_hold_max": key_hold_max}
        counts |= {"unknown_per_ssrc": unknown_per_ssrc, "unknown_max_ssrcs": unknown_max_ssrcs}
        counts |= {"activity_start_frames": activity_start_frames}
        for name, value in counts.items():
            _check_count(name, value, 1)
        _check_count("max_conceal", max_conceal, 0)
        # Build one jitter buffer now so a bad delay or size fails here, not on the first packet.
        JitterBuffer(delay=jitter_delay, max_packets=jitter_max_packets, max_conceal=max_conceal)
        self._decrypt = decrypt
        self.jitter_delay = jitter_delay
        self._jitter_max_packets = jitter_max_packets
        self._max_conceal = max_conceal
        self.key_hold = key_hold
        self._key_hold_max = key_hold_max
        self.unknown_hold = unknown_hold
        self._unknown_per_ssrc = unknown_per_ssrc
        self._unknown_max_ssrcs = unknown_max_ssrcs
        self._activity_start = activity_start_frames
        self.activity_hangover = activity_hangover
        self.timeline_tolerance = (
            max(0.1, 2 * jitter_delay) if timeline_tolerance is None else timeline_tolerance
        )
        """Transit changes smaller than this move no audio on the timeline (they are jitter or stalls)."""
        self.counters = PipelineCounters()
        self._ssrc_users: dict[int, int] = {}
        self._streams: dict[int, _Stream] = {}
        self._users: dict[int, _User] = {}
        self._unknown: dict[int, deque[_Held]] = {}
        self._active: dict[_Stream, None] = {}  # insertion-ordered set of streams with buffered packets
        self._key_waiting: dict[_Stream, None] = {}
        self._audio_speaking: dict[_Stream, None] = {}
        self._speaking_out: list[SpeakingChange] = []
        self._retired_frames: list[tuple[_Stream, list[JitterFrame]]] = []
        self._recognized: set[int] = set()

    # ---------------------------------------------------------------------------------------------
    # State

    @property
    def ssrc_users(self) -> dict[int, int]:
        """The SSRC to user id map op 5 built (a copy)."""
        return dict(self._ssrc_users)

    @property
    def recognized_users(self) -> frozenset[int]:
        """Users op 11 announced and op 13 has not removed."""
        return frozenset(self._recognized)

    @property
    def users(self) -> list[int]:
        """Every user whose audio reached this pipeline (departed users included, for their stats)."""
        return list(self._users)

    def stats(self, user_id: int) -> UserStats:
        """A snapshot of one user's counters (zeros for a user never heard)."""
        user = self._users.get(user_id)
        if user is None:
            return UserStats()
        snapshot = UserStats(**user.stats.as_dict())
        totals = [user.retired] + [
            self._streams[ssrc].jitter.stats for ssrc in user.ssrcs if ssrc in self._streams
        ]
        for jitter in totals:
            snapshot.lost += jitter.lost
            snapshot.late += jitter.late
            snapshot.duplicate += jitter.duplicates
            snapshot.dropped += jitter.overflow + jitter.discarded
        return snapshot

    def all_stats(self) -> dict[int, UserStats]:
        return {user_id: self.stats(user_id) for user_id in self._users}

    def record_decodes(self, results: Iterable[tuple[int, int]]) -> None:
        """Count decode results, ``(user_id, status)`` each: the shell calls this when a tick's batch comes
        back from its worker."""
        users = self._users
        for user_id, status in results:
            user = users.get(user_id)
            if user is None:
                continue
            stats = user.stats
            stats.decoded += 1
            if status == STATUS_FEC:
                stats.fec_recovered += 1
            elif status == STATUS_ERROR:
                stats.decode_errors += 1

    @property
    def buffered(self) -> int:
        """Packets held anywhere in the pipeline (jitter buffers, key holds, unknown SSRCs)."""
        return sum(len(s.jitter) + len(s.key_pending) for s in self._streams.values()) + sum(
            len(q) for q in self._unknown.values()
        )

    # ---------------------------------------------------------------------------------------------
    # Gateway inputs

    def on_speaking(self, user_id: int, ssrc: int, flags: int, now: float) -> None:
        """Op 5: ``ssrc`` belongs to ``user_id``; flags 0 means it stopped speaking."""
        user = self._map(ssrc, user_id, now)
        speaking = flags != 0
        if speaking != user.gateway_speaking:
            user.gateway_speaking = speaking
            self._speaking_out.append(SpeakingChange(user_id, speaking, "gateway", now, ssrc))

    def map_ssrc(self, ssrc: int, user_id: int, now: float = 0.0) -> None:
        """Bind ``ssrc`` to ``user_id`` without a speaking change (a map learned before this pipeline).

        Packets held for this SSRC are replayed now.
        """
        self._map(ssrc, user_id, now)

    def _map(self, ssrc: int, user_id: int, now: float) -> _User:
        previous = self._ssrc_users.get(ssrc)
        if previous is not None and previous != user_id:
            self._retire_stream(ssrc, now)
            # Also when no stream was open yet: a stale entry would credit the new owner's counters to the
            # previous user and let the previous user's op 13 retire the new owner's stream.
            self._users[previous].ssrcs.discard(ssrc)
        self._ssrc_users[ssrc] = user_id
        user = self._user(user_id)
        user.ssrcs.add(ssrc)
        held = self._unknown.pop(ssrc, None)
        if held:
            self.counters.unknown_ssrc_replayed += len(held)
            stream = self._streams.get(ssrc) or self._open_stream(ssrc)
            for item in held:
                self._receive(stream, item.sequence, item.timestamp, item.payload, item.arrival)
        return user

    def on_clients_connect(self, user_ids: Iterable[int]) -> None:
        """Op 11."""
        self._recognized.update(int(u) for u in user_ids)

    def on_client_disconnect(self, user_id: int, now: float) -> None:
        """Op 13: the user left. Its last buffered frames go out with the next tick (it will send no more)."""
        self._recognized.discard(user_id)
        user = self._users.get(user_id)
        if user is None:
            return
        for ssrc in list(user.ssrcs):
            self._retire_stream(ssrc, now)
            if self._ssrc_users.get(ssrc) == user_id:
                del self._ssrc_users[ssrc]
        user.ssrcs.clear()
        if user.gateway_speaking:
            user.gateway_speaking = False
            self._speaking_out.append(SpeakingChange(user_id, False, "gateway", now, 0))

    def on_epoch_changed(self, now: float) -> None:
        """The DAVE group changed: frames waiting for a key get another try."""
        for stream in list(self._key_waiting):
            self._retry_held(stream, now)

    # ---------------------------------------------------------------------------------------------
    # Media input

    def feed_datagram(self, data: bytes, arrival: float, cipher: TransportCipher) -> None:
        """A raw datagram from the media socket: drop RTCP and bad packets (counted), open, then :meth:`feed`.

        For shells that receive raw bytes; the client's UDP layer normally opens packets itself and calls
        :meth:`feed`.
        """
        counters = self.counters
        if is_rtcp(data):
            counters.rtcp += 1
            return
        try:
            header, payload = cipher.open_rtp(data)
        except DecryptionError:
            counters.transport_undecryptable += 1
            return
        except ProtocolError:
            counters.malformed += 1
            return
        self.feed(header, payload, arrival)

    def feed(self, header: RtpHeader, payload: bytes, arrival: float) -> None:
        """One transport-decrypted RTP packet (extension body and padding already stripped)."""
        counters = self.counters
        counters.packets += 1
        if header.payload_type != OPUS_PAYLOAD_TYPE:
            counters.other_payload_type += 1
            return
        ssrc = header.ssrc
        stream = self._streams.get(ssrc)
        if stream is None:
            if ssrc not in self._ssrc_users:
                self._hold_unknown(ssrc, _Held(header.sequence, header.timestamp, payload, arrival))
                return
            stream = self._open_stream(ssrc)
        self._receive(stream, header.sequence, header.timestamp, payload, arrival)

    def _hold_unknown(self, ssrc: int, item: _Held) -> None:
        counters = self.counters
        queue = self._unknown.get(ssrc)
        if queue is None:
            if len(self._unknown) >= self._unknown_max_ssrcs:
                # Evict the SSRC held longest: a flood of random SSRCs must not grow memory.
                oldest = next(iter(self._unknown))
                counters.unknown_ssrc_dropped += len(self._unknown.pop(oldest))
            queue = self._unknown[ssrc] = deque()
        if len(queue) >= self._unknown_per_ssrc:
            queue.popleft()
            counters.unknown_ssrc_dropped += 1
        queue.append(item)
        counters.unknown_ssrc_held += 1

    def _receive(
        self, stream: _Stream, sequence: int, timestamp: int, payload: bytes, arrival: float
    ) -> None:
        """DAVE-decrypt one packet of ``stream`` and push it into its jitter buffer (the per-packet path)."""
        user_stats = stream.stats
        user_stats.received += 1
        decrypt = self._decrypt
        if decrypt is None:
            opus = payload
        else:
            if stream.key_pending:
                # Held frames first, oldest first: davey refuses nonces older than the first one it opened
                # with a key, so a newer frame that decrypted first would make the held ones unreadable.
                self._retry_held(stream, arrival, probe=True)
            try:
                opus = decrypt(stream.user_id, payload)
            except DaveKeyPendingError:
                self._hold_for_key(stream, user_stats, _Held(sequence, timestamp, payload, arrival))
                return
            except DaveDecryptError:
                user_stats.undecryptable += 1
                return
            except VoiceError as exc:  # a decrypt callable outside its contract: still only a lost frame
                logger.debug("decrypt failed unexpectedly: %s", exc)
                user_stats.undecryptable += 1
                return
        self._push(stream, user_stats, sequence, timestamp, opus, arrival=arrival)

    def _hold_for_key(self, stream: _Stream, user_stats: UserStats, item: _Held) -> None:
        held = stream.key_pending
        if len(held) >= self._key_hold_max:
            held.popleft()
            user_stats.undecryptable += 1
        held.append(item)
        self._key_waiting[stream] = None
        user_stats.key_held += 1

    def _push(
        self,
        stream: _Stream,
        user_stats: UserStats,
        sequence: int,
        timestamp: int,
        opus: bytes,
        *,
        arrival: float,
    ) -> None:
        samples = _SAMPLES_BY_TOC[opus[0]] if opus else 0
        if not samples:  # empty, or a TOC byte the table cannot answer alone (code 3: a frame count byte)
            try:
                samples = packet_samples(opus)
            except AudioError:
                user_stats.dropped += 1
                self.counters.reasons["bad_opus"] += 1
                return
        jitter = stream.jitter
        restarts = jitter.stats.restarts
        result = jitter.push(sequence, timestamp, arrival, opus, samples=samples)
        if jitter.stats.restarts != restarts:
            # The sender restarted its stream (new sequence and timestamp origins). The old transits and
            # numbers cannot be compared with the new ones (stale heap entries would pin the anchor and
            # erase every later pause), so the timeline estimate starts over; last_end keeps it monotonic.
            stream.newest_ext = -1
            stream.transits = []
            stream.base = None
        if result is _ACCEPTED:
            # Remember the accepted packet's transit (arrival minus its RTP time) for the timeline placement
            # in _convert, with its sequence and timestamp extended relative to the stream's newest packet.
            newest = stream.newest_ext
            if newest < 0:
                ext, ts = (1 << 16) + sequence, (1 << 32) + timestamp
            else:
                newest_ts = stream.newest_ts
                ext = newest + (((sequence - newest + 0x8000) & 0xFFFF) - 0x8000)
                ts = newest_ts + (((timestamp - newest_ts + 0x8000_0000) & 0xFFFF_FFFF) - 0x8000_0000)
            if ext > newest:
                stream.newest_ext = ext
                stream.newest_ts = ts
            heappush(stream.transits, (arrival - ts / SAMPLE_RATE, ext))
            self._active[stream] = None

    def _retry_held(self, stream: _Stream, now: float, *, probe: bool = False) -> None:
        """Try the frames waiting for a key again, in arrival order.

        With ``probe``, stop at once if the oldest still has no key (a new packet is arriving: one attempt
        per packet, not one per held frame). Frames still pending stay held until ``key_hold`` expires.
        """
        held = stream.key_pending
        if not held:
            self._key_waiting.pop(stream, None)
            return
        decrypt = self._decrypt
        assert decrypt is not None  # nothing is held without a decrypt callable
        user_stats = stream.stats
        still: deque[_Held] = deque()
        stream.key_pending = still
        attempts = 0
        while held:
            item = held.popleft()
            if now - item.arrival > self.key_hold:
                user_stats.undecryptable += 1
                continue
            attempts += 1
            try:
                opus = decrypt(stream.user_id, item.payload)
            except DaveKeyPendingError:
                still.append(item)
                if probe and attempts == 1:
                    still.extend(held)
                    break
                continue
            except (DaveDecryptError, VoiceError):
                user_stats.undecryptable += 1
                continue
            user_stats.key_recovered += 1
            self._push(stream, user_stats, item.sequence, item.timestamp, opus, arrival=item.arrival)
        if not still:
            self._key_waiting.pop(stream, None)

    # ---------------------------------------------------------------------------------------------
    # Output

    def tick(self, now: float, wants_pcm: Callable[[int], bool] | None = None) -> TickOutput:
        """Everything due at ``now``: frames in order per stream, their decode jobs, speaking changes.

        ``wants_pcm(user_id)`` says whose frames need PCM; those get a :class:`DecodeJob` each.
        """
        self._expire(now)
        active = self._active
        speaking = self._speaking_out
        if not active and not speaking and not self._audio_speaking and not self._retired_frames:
            return _EMPTY_TICK
        self._speaking_out = []
        frames: list[VoiceFrame] = []
        jobs: list[tuple[int, DecodeJob]] = []
        self._flush_retired(frames, jobs, wants_pcm, speaking)
        finished: list[_Stream] = []
        for stream in active:
            popped = stream.jitter.pop(now)
            if popped:
                self._convert(
                    stream, popped, frames=frames, jobs=jobs, wants_pcm=wants_pcm, speaking=speaking
                )
            if not len(stream.jitter):
                finished.append(stream)
        for stream in finished:
            del active[stream]
        if self._audio_speaking:
            self._check_hangover(now, speaking)
        return TickOutput(frames, jobs, speaking)

    def drain(self, now: float, wants_pcm: Callable[[int], bool] | None = None) -> TickOutput:
        """Everything still buffered, regardless of time (the receiver is closing)."""
        frames: list[VoiceFrame] = []
        jobs: list[tuple[int, DecodeJob]] = []
        speaking = self._speaking_out
        self._speaking_out = []
        self._flush_retired(frames, jobs, wants_pcm, speaking)
        for stream in list(self._streams.values()):
            self._drop_held(stream)
            popped = stream.jitter.drain()
            if popped:
                self._convert(
                    stream, popped, frames=frames, jobs=jobs, wants_pcm=wants_pcm, speaking=speaking
                )
            if stream.speaking:
                stream.speaking = False
                speaking.append(SpeakingChange(stream.user_id, False, "audio", now, stream.ssrc))
        self._active.clear()
        self._audio_speaking.clear()
        for ssrc in list(self._unknown):
            self.counters.unknown_ssrc_dropped += len(self._unknown.pop(ssrc))
        return TickOutput(frames, jobs, speaking)

    def _flush_retired(
        self,
        frames: list[VoiceFrame],
        jobs: list[tuple[int, DecodeJob]],
        wants_pcm: Callable[[int], bool] | None,
        speaking: list[SpeakingChange],
    ) -> None:
        retired, self._retired_frames = self._retired_frames, []
        for stream, popped in retired:
            self._convert(stream, popped, frames=frames, jobs=jobs, wants_pcm=wants_pcm, speaking=speaking)
            # Membership, not pop(): the dict is a set and its values are all None.
            if stream in self._audio_speaking:
                del self._audio_speaking[stream]
                stream.speaking = False
                speaking.append(
                    SpeakingChange(stream.user_id, False, "audio", stream.last_voiced_end, stream.ssrc)
                )

    def _convert(
        self,
        stream: _Stream,
        popped: list[JitterFrame],
        *,
        frames: list[VoiceFrame],
        jobs: list[tuple[int, DecodeJob]],
        wants_pcm: Callable[[int], bool] | None,
        speaking: list[SpeakingChange],
    ) -> None:
        """Turn one stream's popped jitter-buffer frames into voice frames, decode jobs and speaking changes.

        Every frame is placed on the shared timeline here (``timeline_time``; inline, as it runs for every
        frame): position = anchor + the frame's RTP time, the anchor being the smallest transit among this
        and the later packets already here (the heap ``_push`` fills). A stall delays a burst of packets but
        the last ones of the burst arrive on time, so the anchor holds and nothing stretches; a pause without
        a timestamp jump delays every later packet, so the anchor moves by the pause (beyond the tolerance).
        The position never overlaps the previous slot.
        """
        user_id = stream.user_id
        ssrc = stream.ssrc
        user_stats = stream.stats
        decoder: OpusDecoder | None = None
        if wants_pcm is not None and wants_pcm(user_id):
            decoder = stream.decoder
            if decoder is None:
                decoder = stream.decoder = OpusDecoder()
        start = self._activity_start
        delay = self.jitter_delay
        tolerance = self.timeline_tolerance
        newest = stream.newest_ext
        newest_ts = stream.newest_ts
        transits = stream.transits
        base = stream.base
        last_end = stream.last_end
        append = frames.append
        for kind, sequence, timestamp, playout, samples, opus, arrival, next_payload, _lost in popped:
            if kind is _GAP:
                # A GAP only moves the timeline: the next frame's playout time already says where.
                stream.voiced_run = 0
                continue
            # Timeline placement (see the docstring), with sequence and timestamp extended around the newest.
            ext = newest + (((sequence - newest + 0x8000) & 0xFFFF) - 0x8000)
            rtp_time = (
                newest_ts + (((timestamp - newest_ts + 0x8000_0000) & 0xFFFF_FFFF) - 0x8000_0000)
            ) / SAMPLE_RATE + delay
            while transits and transits[0][1] < ext:
                heappop(transits)
            if transits:
                lowest = transits[0][0]
                if base is None or not base - tolerance <= lowest <= base + tolerance:
                    base = lowest
            elif base is None:
                base = (last_end or 0.0) - rtp_time
            position = base + rtp_time
            if last_end is not None and position < last_end - _HALF_FRAME_S:
                # Timestamps went back (or a faster path appeared): stay monotonic.
                base += last_end - position
                position = last_end
            last_end = position + samples / SAMPLE_RATE
            if len(transits) > _TRANSIT_HEAP_LIMIT:
                transits = stream.transits = [entry for entry in transits if entry[1] >= ext]
                heapify(transits)
            if kind is _AUDIO:
                assert opus is not None
                if decoder is not None:
                    jobs.append((len(frames), _new_tuple(DecodeJob, (decoder, SLOT_DECODE, opus, samples))))
                # VoiceFrame's fields in order (see the class).
                fields = (user_id, ssrc, sequence, timestamp, arrival, playout, position, opus, None, False)
                append(_new_tuple(VoiceFrame, (*fields, samples)))
                user_stats.delivered += 1
                if len(opus) >= _VOICED_MIN_BYTES:
                    voiced_run = stream.voiced_run = stream.voiced_run + 1
                    stream.last_voiced_end = playout + samples / SAMPLE_RATE
                    if voiced_run >= start and not stream.speaking:
                        stream.speaking = True
                        self._audio_speaking[stream] = None
                        speaking.append(SpeakingChange(user_id, True, "audio", playout, ssrc))
                else:
                    stream.voiced_run = 0
            else:  # LOST: concealed (with FEC from the next packet when it is here)
                if decoder is not None:
                    jobs.append((len(frames), DecodeJob(decoder, SLOT_LOST, next_payload, samples)))
                append(
                    VoiceFrame(
                        user_id, ssrc, sequence, timestamp, None, playout, position, None, None, True, samples
                    )
                )
                user_stats.concealed += 1
        stream.base = base
        stream.last_end = last_end

    def _check_hangover(self, now: float, speaking: list[SpeakingChange]) -> None:
        hangover = self.activity_hangover
        stopped = [s for s in self._audio_speaking if now - s.last_voiced_end >= hangover]
        for stream in stopped:
            del self._audio_speaking[stream]
            stream.speaking = False
            stream.voiced_run = 0
            speaking.append(
                SpeakingChange(stream.user_id, False, "audio", stream.last_voiced_end + hangover, stream.ssrc)
            )

    # ---------------------------------------------------------------------------------------------
    # Internals

    def _user(self, user_id: int) -> _User:
        user = self._users.get(user_id)
        if user is None:
            user = self._users[user_id] = _User()
        return user

    def _open_stream(self, ssrc: int) -> _Stream:
        user_id = self._ssrc_users[ssrc]
        jitter = JitterBuffer(
            delay=self.jitter_delay, max_packets=self._jitter_max_packets, max_conceal=self._max_conceal
        )
        user = self._user(user_id)
        stream = self._streams[ssrc] = _Stream(ssrc, user_id, jitter, user.stats)
        user.ssrcs.add(ssrc)
        return stream

    def _retire_stream(self, ssrc: int, now: float) -> None:
        """Forget one SSRC's stream (its user left, or the SSRC moved); its last frames go out next tick."""
        stream = self._streams.pop(ssrc, None)
        if stream is None:
            return
        self._drop_held(stream)
        popped = stream.jitter.drain()
        self._active.pop(stream, None)
        if popped:
            # _flush_retired ends its audio speaking after these last frames (ending it here too would
            # report stop, start, stop for a user who leaves mid-speech).
            self._retired_frames.append((stream, popped))
        elif stream in self._audio_speaking:
            del self._audio_speaking[stream]
            stream.speaking = False
            self._speaking_out.append(SpeakingChange(stream.user_id, False, "audio", now, ssrc))
        user = self._users[stream.user_id]
        retired, live = user.retired, stream.jitter.stats
        for name in ("lost", "late", "duplicates", "overflow", "discarded"):
            setattr(retired, name, getattr(retired, name) + getattr(live, name))
        user.ssrcs.discard(ssrc)

    def _drop_held(self, stream: _Stream) -> None:
        if stream.key_pending:
            self._users[stream.user_id].stats.undecryptable += len(stream.key_pending)
            stream.key_pending = deque()
        self._key_waiting.pop(stream, None)

    def _expire(self, now: float) -> None:
        """Drop held frames whose key never came and unknown-SSRC packets nobody claimed."""
        if self._key_waiting:
            limit = now - self.key_hold
            for stream in list(self._key_waiting):
                held = stream.key_pending
                stats = self._users[stream.user_id].stats
                while held and held[0].arrival < limit:
                    held.popleft()
                    stats.undecryptable += 1
                if not held:
                    del self._key_waiting[stream]
        if self._unknown:
            limit = now - self.unknown_hold
            for ssrc in list(self._unknown):
                queue = self._unknown[ssrc]
                while queue and queue[0].arrival < limit:
                    queue.popleft()
                    self.counters.unknown_ssrc_dropped += 1
                if not queue:
                    del self._unknown[ssrc]
