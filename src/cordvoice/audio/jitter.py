"""A sans-IO jitter buffer for one incoming RTP stream (one SSRC).

Packets go in with :meth:`JitterBuffer.push` as they arrive, in any order; :meth:`JitterBuffer.pop` returns,
in sequence order, every frame whose playout time has come. The caller owns the clock: it passes the time
(any monotonic clock, in seconds) and may ask :meth:`JitterBuffer.next_deadline` when to call again.

How a packet's playout time is chosen, when it arrives: the first packet of a talkspurt is scheduled
``delay`` after its arrival, and every later packet at that time plus its RTP timestamp distance (48 kHz).
So within a talkspurt frames are exactly 20 ms apart, and a recorder can place every output frame on one
local timeline shared by all users (``playout_time``), whatever the senders' random RTP timestamp origins.
A new talkspurt (a new schedule) starts when a packet's timestamp jumps (DTX) or when it would otherwise be
late (a pause without a timestamp jump, or a network stall longer than ``delay``); the output then shows a
``GAP``, so the timeline stretches instead of dropping audio. Because all of this is decided on arrival,
the output does not depend on how often the caller pops.

What comes out is one :class:`JitterFrame` per 20 ms slot, plus gap markers:

* ``AUDIO``: a packet, with its payload, sequence, RTP timestamp, arrival and playout time.
* ``LOST``: a slot whose packet never came although a later one did (so loss is certain). The caller
  conceals it, with FEC when ``next_payload`` (the following packet) is present. At most ``max_conceal``
  consecutive slots are reported this way; longer holes become a gap.
* ``GAP``: the timeline jumps: the sender was silent (DTX: its RTP timestamps jumped, or packets simply
  stopped and resumed), a long hole, a stall that forced a new schedule, or a sender restart. ``samples``
  says how long the silence is on the playout timeline, ``lost`` how many packets are known missing in it.
  Nothing is concealed across a gap.

Packets that arrive after their slot was played (or skipped) are dropped as ``late``; repeats as
``duplicates``. The buffer never holds more than ``max_packets``; beyond that the oldest half is dropped
(``overflow``) and the schedule is pulled forward, so a backlog does not leave lasting latency. A
sequence jump beyond the plausible window, or a step back whose timestamp did not go back, is held on
probation: if the very next packet continues it, the sender restarted its stream and the buffer starts
over (``restarts``); otherwise the stray packet is ``discarded``. Every dropped packet is counted in
:class:`JitterStats`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass
from typing import Final, NamedTuple

from cordvoice.audio.pcm import FRAME_SAMPLES, SAMPLE_RATE
from cordvoice.errors import InvalidArgumentError
from cordvoice.udp.rtp import seq_delta, ts_delta

__all__ = ["FrameKind", "JitterBuffer", "JitterFrame", "JitterStats", "PushResult"]

_SEQ_MASK: Final = 0xFFFF
_TS_MASK: Final = 0xFFFF_FFFF
_MAX_MISORDER: Final = 100
"""Packets this far behind the playout point are classified as late/duplicate; further back is a jump."""
_MAX_DROPOUT: Final = 3000
"""Forward sequence jumps up to this many packets (60 s) are losses; larger ones are jumps (RFC 3550)."""
_MAX_EARLY: Final = 2.0
"""A packet scheduled this many seconds beyond its arrival + delay has an implausible timestamp."""
_RECENT: Final = 128
"""Played packets remembered to classify repeats; more than _MAX_MISORDER, so every packet in the window
behind the playout point that was played is still remembered (a slot is only overwritten 128 packets on)."""


def _is_count(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


class FrameKind(enum.Enum):
    AUDIO = "audio"
    LOST = "lost"
    GAP = "gap"


class PushResult(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    LATE = "late"
    HELD = "held"
    """Far outside the window: kept aside until the next packet shows whether the sender restarted."""


class JitterFrame(NamedTuple):
    """One slot of output, in playout order (a NamedTuple: immutable and ~4x cheaper than a frozen dataclass).

    ``sequence`` and ``timestamp`` are the RTP values (16 and 32 bit) of the slot; for a ``GAP`` they are
    those of the packet that ends the gap, and ``playout_time`` is when the silence starts. ``samples`` is
    the slot length at 48 kHz (960 for a 20 ms frame; the silence length for a gap).
    """

    kind: FrameKind
    sequence: int
    timestamp: int
    playout_time: float
    samples: int
    payload: bytes | None = None
    """The packet (``AUDIO`` only)."""
    arrival_time: float | None = None
    """When the packet arrived (``AUDIO`` only)."""
    next_payload: bytes | None = None
    """For ``LOST``: the packet right after the lost one, if already buffered; pass it to
    ``OpusDecoder.decode_fec`` to recover this slot from its in-band FEC."""
    lost: int = 0
    """For ``GAP``: packets known to be missing inside the gap (already counted in ``stats.lost``)."""


_AUDIO: Final = FrameKind.AUDIO
_new_frame: Final = tuple.__new__
"""Builds a :class:`JitterFrame` from a full tuple of its fields without the NamedTuple's Python-level
``__new__`` (a third of the frame's cost on the per-packet path)."""


@dataclass(slots=True)
class JitterStats:
    """Counters for one stream. ``lost`` counts slots reported missing (as ``LOST`` or inside a ``GAP``)."""

    received: int = 0
    accepted: int = 0
    duplicates: int = 0
    late: int = 0
    lost: int = 0
    reordered: int = 0
    overflow: int = 0
    gaps: int = 0
    restarts: int = 0
    discarded: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True)
class _Entry:
    ext: int  # extended (unwrapped) sequence number
    ts: int  # extended (unwrapped) RTP timestamp
    arrival: float
    payload: bytes
    samples: int
    play: float  # scheduled playout time


class JitterBuffer:
    """Reorder, de-duplicate and schedule one SSRC's packets; see the module docstring.

    ``delay`` is the target buffering in seconds (default 60 ms: three frames of protection against
    jitter and reordering). ``max_conceal`` is the longest run of consecutive lost frames reported as
    ``LOST`` (default 5 = 100 ms, about as far as Opus PLC sounds natural); longer holes become a ``GAP``.

    Scheduling is decided when a packet arrives, never by how often :meth:`pop` is called, so the output
    timeline is the same whether the caller pops every millisecond or once a second.
    """

    # Slots: a thousand users' buffers are each touched twice per packet, each time with cold caches.
    __slots__ = (
        "_anchor_time",
        "_anchor_ts",
        "_buffer",
        "_emitted",
        "_gap_lost",
        "_last_end",
        "_newest",
        "_next_ext",
        "_next_ts",
        "_played",
        "_probation",
        "_started",
        "_time_tolerance",
        "_tolerance",
        "clock_rate",
        "delay",
        "frame_samples",
        "max_conceal",
        "max_packets",
        "stats",
    )

    def __init__(
        self,
        *,
        delay: float = 0.060,
        max_packets: int = 50,
        max_conceal: int = 5,
        frame_samples: int = FRAME_SAMPLES,
        clock_rate: int = SAMPLE_RATE,
    ) -> None:
        # Types too: a str raised TypeError here, and a float count got through to fail on the packet path.
        if not isinstance(delay, int | float) or isinstance(delay, bool) or not 0.0 <= delay <= 10.0:
            raise InvalidArgumentError(f"delay must be between 0 and 10 seconds, got {delay!r}")
        if not _is_count(max_packets, 1):
            raise InvalidArgumentError(f"max_packets must be an integer of at least 1, got {max_packets!r}")
        if not _is_count(max_conceal, 0):
            raise InvalidArgumentError(f"max_conceal must be an integer >= 0, got {max_conceal!r}")
        if not (_is_count(frame_samples, 1) and _is_count(clock_rate, 1)):
            raise InvalidArgumentError("frame_samples and clock_rate must be positive integers")
        self.delay = delay
        self.max_packets = max_packets
        self.max_conceal = max_conceal
        self.frame_samples = frame_samples
        self.clock_rate = clock_rate
        self.stats = JitterStats()
        self._tolerance = frame_samples // 2  # timestamp slack, in samples
        self._time_tolerance = self._tolerance / clock_rate
        self._buffer: dict[int, _Entry] = {}
        self._played = [-1] * _RECENT
        """Recently played packets by extended sequence modulo _RECENT (tells a late packet from a repeat)."""
        self._probation: tuple[int, int, float, bytes, int] | None = None
        self._started = False
        self._next_ext = 0  # next slot to output
        self._next_ts = 0
        self._newest: _Entry | None = None  # the highest sequence accepted so far (may be played already)
        self._anchor_ts = 0  # schedule of the current talkspurt: anchor_ts plays at anchor_time
        self._anchor_time = 0.0
        self._last_end: float | None = None  # playout time where the last emitted slot ends
        self._emitted = False  # anything emitted since the stream (re)started
        self._gap_lost = 0  # missing packets to report with the next gap

    # ---------------------------------------------------------------- input

    def __len__(self) -> int:
        """Packets currently buffered."""
        return len(self._buffer)

    def push(
        self,
        sequence: int,
        timestamp: int,
        arrival_time: float,
        payload: bytes,
        *,
        samples: int | None = None,
    ) -> PushResult:
        """Add one packet; ``samples`` is its duration at 48 kHz if not the usual 20 ms."""
        sequence &= _SEQ_MASK
        timestamp &= _TS_MASK
        duration = self.frame_samples if samples is None else samples
        if duration <= 0:
            raise InvalidArgumentError("samples must be positive")
        self.stats.received += 1
        newest = self._newest
        if newest is not None and self._started and self._probation is None:
            # The common case, inline: the packet right after the newest one, on the current schedule. It
            # computes exactly what _accept/_store/_schedule_newest would; anything else takes that path.
            next_ext = self._next_ext
            delta = ((sequence - next_ext + 0x8000) & _SEQ_MASK) - 0x8000
            ext = next_ext + delta
            if ext == newest.ext + 1 and delta <= _MAX_DROPOUT:
                next_ts = self._next_ts
                ts = next_ts + (((timestamp - next_ts + 0x8000_0000) & _TS_MASK) - 0x8000_0000)
                play = self._anchor_time + (ts - self._anchor_ts) / self.clock_rate
                if (
                    abs(ts - newest.ts - newest.samples) <= self._tolerance
                    and arrival_time <= play <= arrival_time + self.delay + _MAX_EARLY
                ):
                    self.stats.accepted += 1
                    entry = _Entry(ext, ts, arrival_time, payload, duration, play)
                    self._newest = entry
                    buffer = self._buffer
                    buffer[ext] = entry
                    if len(buffer) > self.max_packets:
                        self._shed(arrival_time)
                    return PushResult.ACCEPTED
        elif not self._started:
            self._start(sequence, timestamp, arrival_time, payload, duration)
            return PushResult.ACCEPTED
        return self._accept(sequence, timestamp, arrival_time, payload, duration)

    def _accept(
        self, sequence: int, timestamp: int, arrival: float, payload: bytes, samples: int
    ) -> PushResult:
        stats = self.stats
        delta = seq_delta(sequence, self._next_ext & _SEQ_MASK)
        ext = self._next_ext + delta
        ts = self._next_ts + ts_delta(timestamp, self._next_ts & _TS_MASK)

        if -_MAX_MISORDER <= delta < 0:
            if ts >= self._next_ts:
                # Behind by sequence but not by timestamp: not an old packet but a sender that started over
                # near its old sequence (refused as late until the sequence caught up, up to 2 s of audio).
                return self._jump(sequence, timestamp, arrival, payload, samples)
            if not self._emitted and self._buffer and len(self._buffer) < self.max_packets:
                # Nothing played yet: an earlier packet of the first talkspurt arrived after a later one.
                self._next_ext = ext
                self._next_ts = ts
                self._store(ext, ts, arrival, payload, samples)
                return PushResult.ACCEPTED
            if self._played[ext % _RECENT] == ext:
                stats.duplicates += 1
                return PushResult.DUPLICATE
            stats.late += 1
            return PushResult.LATE
        if ext in self._buffer:
            stats.duplicates += 1
            return PushResult.DUPLICATE
        if delta > _MAX_DROPOUT or delta < -_MAX_MISORDER:
            return self._jump(sequence, timestamp, arrival, payload, samples)
        if self._probation is not None:
            self._probation = None
            stats.discarded += 1
        self._store(ext, ts, arrival, payload, samples)
        return PushResult.ACCEPTED

    def _start(self, sequence: int, timestamp: int, arrival: float, payload: bytes, samples: int) -> None:
        self._started = True
        self._buffer.clear()
        self._played = [-1] * _RECENT
        self._probation = None
        # Extended numbers start well above zero so early reordering never goes negative (cosmetic).
        self._next_ext = (1 << 16) + sequence
        self._next_ts = (1 << 32) + timestamp
        self._newest = None
        self._emitted = False
        self._gap_lost = 0
        self._store(self._next_ext, self._next_ts, arrival, payload, samples)

    def _store(self, ext: int, ts: int, arrival: float, payload: bytes, samples: int) -> None:
        stats = self.stats
        stats.accepted += 1
        newest = self._newest
        if newest is None or ext > newest.ext:
            self._schedule_newest(ext, ts, arrival)
            entry = _Entry(ext, ts, arrival, payload, samples, self._playout(ts))
            self._newest = entry
        else:
            stats.reordered += 1
            # An older packet plays before the next buffered one; its timestamp says how long before.
            successor = self._buffer[min(e for e in self._buffer if e > ext)]
            play = successor.play - (successor.ts - ts) / self.clock_rate
            entry = _Entry(ext, ts, arrival, payload, samples, min(play, successor.play))
        self._buffer[ext] = entry
        if len(self._buffer) > self.max_packets:
            self._shed(arrival)

    def _shed(self, now: float) -> None:
        """The buffer overflowed: playout fell behind by more than it holds (e.g. after a long stall).

        Dropping one packet per arrival would keep the buffer full, and the latency, for the rest of the
        talkspurt. Instead drop the oldest down to half the capacity and pull the schedule forward so the
        newest packet plays ``delay`` from now; the dropped packets surface as a gap.
        """
        stats = self.stats
        for ext in sorted(self._buffer)[: len(self._buffer) - max(1, self.max_packets // 2)]:
            del self._buffer[ext]
            stats.overflow += 1
        newest = self._newest
        if newest is None:
            return
        shift = now + self.delay - newest.play
        if shift < 0:
            for entry in self._buffer.values():
                entry.play += shift
            if newest.ext not in self._buffer:
                newest.play += shift
            self._anchor_time += shift

    def _schedule_newest(self, ext: int, ts: int, arrival: float) -> None:
        """Keep the schedule for a new newest packet, or start a new one (a talkspurt) when it no longer fits.

        The schedule is replaced when the packet would be late (a stall, or a sender that paused without
        advancing its timestamps), when its timestamp jumped (DTX silence), or when it would wait
        implausibly long. The new schedule plays it ``delay`` after its arrival, never before the audio
        already scheduled.
        """
        newest = self._newest
        if newest is None:
            self._anchor_ts = ts
            self._anchor_time = arrival + self.delay
            if self._last_end is not None:
                self._anchor_time = max(self._anchor_time, self._last_end)
            return
        missing = ext - newest.ext - 1
        expected_ts = newest.ts + newest.samples + missing * self.frame_samples
        jumped = abs(ts - expected_ts) > self._tolerance
        scheduled = self._playout(ts)
        if not (jumped or scheduled < arrival or scheduled > arrival + self.delay + _MAX_EARLY):
            return
        earliest = newest.play + newest.samples / self.clock_rate
        if not jumped:
            earliest += missing * self.frame_samples / self.clock_rate  # room for the missing slots
        anchor_time = arrival + self.delay
        if round((anchor_time - earliest) * self.clock_rate) <= self._tolerance:
            # Early, or less than half a frame late: stay contiguous rather than open a tiny gap.
            anchor_time = earliest
        self._anchor_ts = ts
        self._anchor_time = anchor_time

    def _jump(
        self, sequence: int, timestamp: int, arrival: float, payload: bytes, samples: int
    ) -> PushResult:
        held = self._probation
        self._probation = None
        if held is not None and sequence == (held[0] + 1) & _SEQ_MASK:
            # Two consecutive packets agree: the sender restarted its sequence. Start over from them; the
            # old stream's last buffered packets cannot be ordered against the new ones and are dropped.
            self.stats.restarts += 1
            self.stats.discarded += len(self._buffer)
            self._start(*held)
            return self._accept(sequence, timestamp, arrival, payload, samples)
        if held is not None:
            self.stats.discarded += 1
        self._probation = (sequence, timestamp, arrival, payload, samples)
        return PushResult.HELD

    # ---------------------------------------------------------------- output

    def _playout(self, ts: int) -> float:
        return self._anchor_time + (ts - self._anchor_ts) / self.clock_rate

    def _plan(self) -> tuple[float, _Entry | None, bool] | None:
        """What the next output step is: (due time, entry to play or None, conceal?) or None if idle.

        ``(t, entry, False)`` plays ``entry``; ``(t, None, True)`` reports the next slot lost;
        ``(t, head, False)`` with ``head.ext > next`` skips a hole and plays ``head`` after a gap.
        """
        buffer = self._buffer
        if not buffer:
            return None
        entry = buffer.get(self._next_ext)
        if entry is not None:
            return entry.play, entry, False
        head = buffer[min(buffer)]
        missing = head.ext - self._next_ext
        span = head.ts - self._next_ts
        slot_time = head.play - span / self.clock_rate
        contiguous = self._last_end is None or abs(slot_time - self._last_end) <= self._time_tolerance
        consistent = abs(span - missing * self.frame_samples) <= self._tolerance
        if missing <= self.max_conceal and consistent and contiguous:
            return slot_time, None, True
        return head.play, head, False

    def next_deadline(self) -> float | None:
        """When :meth:`pop` will next have something to return, or ``None`` while nothing is buffered."""
        plan = self._plan()
        return None if plan is None else plan[0]

    def pop(self, now: float) -> list[JitterFrame]:
        """Return every frame due at ``now`` (possibly none), in playout order."""
        out: list[JitterFrame] = []
        buffer = self._buffer
        rate = self.clock_rate
        while buffer:
            ext = self._next_ext
            entry = buffer.get(ext)
            if entry is not None and not self._gap_lost:
                # The common case, inline: the next slot's packet is here and follows the last one without
                # a gap (what _plan/_emit/_gap_before/_advance would do, with the same arithmetic).
                due = entry.play
                if due > now:
                    break
                last_end = self._last_end
                if last_end is not None and due < last_end:
                    due = last_end
                if last_end is None or round((due - last_end) * rate) <= self._tolerance:
                    del buffer[ext]
                    ts = entry.ts
                    samples = entry.samples
                    out.append(
                        _new_frame(
                            JitterFrame,
                            (
                                _AUDIO,
                                ext & _SEQ_MASK,
                                ts & _TS_MASK,
                                due,
                                samples,
                                entry.payload,
                                entry.arrival,
                                None,
                                0,
                            ),
                        )
                    )
                    self._next_ext = ext + 1
                    self._next_ts = ts + samples
                    self._last_end = due + samples / rate
                    self._emitted = True
                    self._played[ext % _RECENT] = ext
                    continue
            plan = self._plan()
            if plan is None:
                break
            due, entry, conceal = plan
            if due > now:
                break
            self._emit(out, due, entry, conceal)
        return out

    def drain(self) -> list[JitterFrame]:
        """Return everything still buffered, regardless of time (the stream ended).

        A packet still held on probation (a sequence jump nothing confirmed) is counted as discarded.
        """
        if self._probation is not None:
            self._probation = None
            self.stats.discarded += 1
        return self.pop(math.inf)

    def _emit(self, out: list[JitterFrame], due: float, entry: _Entry | None, conceal: bool) -> None:
        stats = self.stats
        if self._last_end is not None and due < self._last_end:
            due = self._last_end  # the sender's timestamps went backwards: never overlap played audio
        if conceal:
            self._gap_before(out, due, self._next_ts, self._next_ext)
            following = self._buffer.get(self._next_ext + 1)
            out.append(
                JitterFrame(
                    FrameKind.LOST,
                    self._next_ext & _SEQ_MASK,
                    self._next_ts & _TS_MASK,
                    due,
                    self.frame_samples,
                    next_payload=following.payload if following is not None else None,
                )
            )
            stats.lost += 1
            self._advance(self._next_ext, self._next_ts, self.frame_samples, due, played=False)
            return
        assert entry is not None
        if entry.ext != self._next_ext:
            missing = entry.ext - self._next_ext
            stats.lost += missing
            self._gap_lost += missing
        self._gap_before(out, due, entry.ts, entry.ext)
        del self._buffer[entry.ext]
        out.append(
            JitterFrame(
                FrameKind.AUDIO,
                entry.ext & _SEQ_MASK,
                entry.ts & _TS_MASK,
                due,
                entry.samples,
                payload=entry.payload,
                arrival_time=entry.arrival,
            )
        )
        self._advance(entry.ext, entry.ts, entry.samples, due, played=True)

    def _gap_before(self, out: list[JitterFrame], due: float, ts: int, ext: int) -> None:
        start = due if self._last_end is None else self._last_end
        silence = round((due - start) * self.clock_rate)
        if silence > self._tolerance or self._gap_lost:
            out.append(
                JitterFrame(
                    FrameKind.GAP, ext & _SEQ_MASK, ts & _TS_MASK, start, max(silence, 0), lost=self._gap_lost
                )
            )
            self.stats.gaps += 1
            self._gap_lost = 0

    def _advance(self, ext: int, ts: int, samples: int, due: float, *, played: bool) -> None:
        self._next_ext = ext + 1
        self._next_ts = ts + samples
        self._last_end = due + samples / self.clock_rate
        self._emitted = True
        if played:
            self._played[ext % _RECENT] = ext

    def reset(self) -> None:
        """Forget the stream; the next packet starts a new schedule.

        Statistics and the playout position are kept, so a recorder's timeline stays monotonic. Buffered
        packets are dropped and counted as ``discarded``.
        """
        self._started = False
        self.stats.discarded += len(self._buffer) + (self._probation is not None)
        self._buffer.clear()
        self._probation = None
        self._gap_lost = 0
