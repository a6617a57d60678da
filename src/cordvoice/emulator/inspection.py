"""What the emulator saw a client do, for tests: opcodes, speaking flags, RTP pacing and DAVE membership.

:class:`RtpStats` sits on the media server's hot path (one call per authenticated packet), so it keeps
running counters and a fixed-bucket histogram and allocates nothing per packet. :class:`ClientActivity`
is what the voice gateway records per voice session; :class:`ClientInspection` is the frozen snapshot a test
reads through ``Emulator.inspect(user_id)``.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field

from cordvoice.metrics import Histogram

__all__ = [
    "ClientActivity",
    "ClientInspection",
    "RtpStats",
    "RtpSummary",
    "SpeakingEvent",
]

_CLOCK_RATE = 48_000.0
#: A silence longer than this between two packets starts a new talk spurt: lateness is measured against a
#: fresh 20 ms grid, because discord.py (for one) does not advance its timestamps while paused.
_SPURT_GAP = 0.2
#: Distinct timestamp steps remembered; anything beyond is counted under ``other``.
_MAX_STEP_KINDS = 32
_HISTORY = 10_000


class RtpStats:
    """Arrival statistics of one sender's authenticated RTP packets, as the media server saw them.

    * ``sequence_gaps`` / ``lost``: how many times the sequence jumped forward by more than one, and how many
      numbers were skipped in total. ``duplicates`` repeat the highest number; ``out_of_order`` are older.
    * ``timestamp_steps``: timestamp increments between consecutive in-order packets (960 for 20 ms Opus).
    * ``lateness``: milliseconds behind a 20 ms grid anchored at the earliest packet of each talk spurt and
      advanced by the RTP timestamp, so a sender that paces well stays near 0. A silence of more than
      ``spurt_gap`` seconds between two packets starts a new spurt; ``spurt_gap=None`` never does, for
      streams that never pause (benchmarks), where such a gap is the sender stalling and must count.
    * ``jitter_ms``: RFC 3550 interarrival jitter.
    * ``undecryptable``: packets from this sender's address that failed transport authentication.
    * ``replayed_nonces``: authentic packets dropped for a transport nonce already used (or too old to tell).
    """

    __slots__ = (
        "_anchor",
        "_anchor_ts",
        "_last_transit",
        "_spurt_gap",
        "bytes",
        "duplicates",
        "first_arrival",
        "highest_sequence",
        "jitter_ms",
        "last_arrival",
        "last_timestamp",
        "lateness",
        "lost",
        "out_of_order",
        "packets",
        "replayed_nonces",
        "sequence_gaps",
        "timestamp_steps",
        "undecryptable",
    )

    def __init__(self, spurt_gap: float | None = _SPURT_GAP) -> None:
        self._spurt_gap = math.inf if spurt_gap is None else spurt_gap
        self.packets = 0
        self.bytes = 0
        self.undecryptable = 0
        self.replayed_nonces = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.sequence_gaps = 0
        self.lost = 0
        self.timestamp_steps: Counter[int | str] = Counter()
        self.lateness = Histogram()
        self.jitter_ms = 0.0
        self.first_arrival: float | None = None
        self.last_arrival = 0.0
        self.highest_sequence = 0
        self.last_timestamp = 0
        self._anchor = 0.0
        self._anchor_ts = 0
        self._last_transit = 0.0

    def record(self, sequence: int, timestamp: int, size: int, now: float) -> None:
        """One authenticated packet arrived at ``now`` (seconds)."""
        self.bytes += size
        if not self.packets:
            self.packets = 1
            self.first_arrival = self.last_arrival = self._anchor = now
            self.highest_sequence = sequence
            self.last_timestamp = self._anchor_ts = timestamp
            self._last_transit = now - timestamp / _CLOCK_RATE
            self.lateness.record(0.0)
            return
        self.packets += 1
        delta = ((sequence - self.highest_sequence + 0x8000) & 0xFFFF) - 0x8000
        if delta <= 0:
            if delta == 0:
                self.duplicates += 1
            else:
                self.out_of_order += 1
            return
        if delta > 1:
            self.sequence_gaps += 1
            self.lost += delta - 1
        self.highest_sequence = sequence
        step = ((timestamp - self.last_timestamp + 0x8000_0000) & 0xFFFF_FFFF) - 0x8000_0000
        steps = self.timestamp_steps
        if step in steps or len(steps) < _MAX_STEP_KINDS:
            steps[step] += 1
        else:
            steps["other"] += 1
        self.last_timestamp = timestamp
        transit = now - timestamp / _CLOCK_RATE
        if now - self.last_arrival > self._spurt_gap:
            self._anchor = now
            self._anchor_ts = timestamp
        else:
            # RFC 3550 §6.4.1, with wrap-around ignored: a wrap only perturbs one sample.
            difference = abs(transit - self._last_transit) * 1000.0
            self.jitter_ms += (difference - self.jitter_ms) / 16.0
        self._last_transit = transit
        self.last_arrival = now
        elapsed = ((timestamp - self._anchor_ts) & 0xFFFF_FFFF) / _CLOCK_RATE
        late = now - (self._anchor + elapsed)
        if late < 0.0:
            # Earlier than the grid: the grid was anchored on a late packet. Re-anchor on this one.
            self._anchor = now - elapsed
            late = 0.0
        self.lateness.record(late * 1000.0)

    def summary(self) -> RtpSummary:
        return RtpSummary(
            packets=self.packets,
            bytes=self.bytes,
            undecryptable=self.undecryptable,
            replayed_nonces=self.replayed_nonces,
            duplicates=self.duplicates,
            out_of_order=self.out_of_order,
            sequence_gaps=self.sequence_gaps,
            lost=self.lost,
            timestamp_steps=dict(self.timestamp_steps),
            lateness_ms=self.lateness.summary(),
            jitter_ms=round(self.jitter_ms, 3),
            first_arrival=self.first_arrival,
            last_arrival=self.last_arrival if self.packets else None,
        )


@dataclass(frozen=True)
class RtpSummary:
    """A snapshot of :class:`RtpStats` (``lateness_ms`` holds count, p50, p99, max and mean)."""

    packets: int
    bytes: int
    undecryptable: int
    replayed_nonces: int
    duplicates: int
    out_of_order: int
    sequence_gaps: int
    lost: int
    timestamp_steps: dict[int | str, int]
    lateness_ms: dict[str, float | int]
    jitter_ms: float
    first_arrival: float | None
    last_arrival: float | None


@dataclass(frozen=True, slots=True)
class SpeakingEvent:
    """An op 5 the client sent: when (loop time), the flags and the SSRC it named."""

    time: float
    flags: int
    ssrc: int


@dataclass
class ClientActivity:
    """The voice gateway's running record of one voice session's client (bounded histories)."""

    opcodes: Counter[int] = field(default_factory=Counter)
    opcode_order: deque[int] = field(default_factory=lambda: deque(maxlen=_HISTORY))
    speaking: deque[SpeakingEvent] = field(default_factory=lambda: deque(maxlen=_HISTORY))
    closes_sent: list[int] = field(default_factory=list)
    connections: int = 0
    resumes: int = 0
    last_seq_ack: int | None = None
    heartbeats: int = 0
    acks_withheld: int = 0
    dave_ignored: int = 0
    """DAVE opcodes received on a session without DAVE (dropped)."""

    def opcode(self, op: int) -> None:
        self.opcodes[op] += 1
        self.opcode_order.append(op)


@dataclass(frozen=True)
class ClientInspection:
    """Everything the emulator knows about one client's voice session, frozen at the time of the call.

    ``opcodes``/``opcode_order``: what the client sent (order bounded to the last 10,000). ``rtp``: its
    media as the SFU received it. ``forwarded_to_client``: packets the SFU sent it. ``dave_epoch`` and
    ``dave_roster`` (user id -> leaf) are the delivery service's view of the client's channel;
    ``dave_member`` says whether this client holds a leaf in it. ``faults``: what ``emu.faults`` did to the
    user (closes, crashes, moves, kicks, withheld ACKs, impaired and injected datagrams), by kind.
    """

    user_id: int
    guild_id: int
    channel_id: int
    session_id: str
    ssrc: int
    mode: str | None
    dave_protocol_version: int
    max_dave_protocol_version: int
    connected: bool
    ended: bool
    opcodes: dict[int, int]
    opcode_order: tuple[int, ...]
    speaking: tuple[SpeakingEvent, ...]
    rtp: RtpSummary
    forwarded_to_client: int
    closes_sent: tuple[int, ...]
    connections: int
    resumes: int
    last_seq_ack: int | None
    heartbeats: int
    dave_epoch: int | None
    dave_roster: dict[int, int]
    dave_member: bool
    dave_counters: dict[str, int]
    identified_at: float
    """Loop time (``asyncio`` clock) of the Identify that opened this voice session."""
    faults: dict[str, int] = field(default_factory=dict)
    """Faults injected against this user (``emu.faults``), by kind, over all its voice sessions."""

    @property
    def speaking_flags(self) -> list[int]:
        """The flags of every op 5 the client sent, in order."""
        return [event.flags for event in self.speaking]
