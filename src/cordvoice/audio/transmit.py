"""The sending half of a session: one Opus frame per tick of the process-wide 20 ms clock.

:class:`TransmitLane` subscribes to :func:`~cordvoice.audio.clock.get_clock` only while it has something to
do (audio, a silence tail, or a grace period) and unsubscribes when idle, so a thousand quiet sessions cost
nothing. Each tick it pulls at most one frame from its :class:`FrameProvider`, passes it through DAVE, seals
it with the session's :class:`~cordvoice.udp.sender.RtpSender` and sends it.

Policies, in one place:

* **Backpressure, not buffering.** A provider is pulled once per tick; :class:`FrameQueue` (what
  ``Session.write`` feeds) holds at most a few frames and makes ``put`` wait.
* **DAVE not ready.** When the call requires DAVE and the MLS group is not ready (joining, a recovery), the
  lane does not pull at all: the producer waits on backpressure and no frame is lost or sent in clear. Only
  the silence tail goes out meanwhile (silence is never E2E-encrypted). Ticks spent waiting are counted
  (``dave_withheld``).
* **No transport.** Between a server move or rejoin and the next Session Description the lane has no sender:
  it does not pull either, so playback continues where it stopped.
* **Underrun.** When the provider has nothing, up to five silence frames follow the last audio frame
  (protocol.md §4.3); after ``idle_grace`` more seconds without audio the lane turns speaking off and goes
  idle. Audio coming back turns speaking on again.
* **Timestamps follow wall time.** Ticks without a packet advance the RTP timestamp by 960 (sequence numbers
  stay contiguous), and so does the time spent idle, so receivers keep the stream aligned.
* Every frame that was pulled but not sent is counted in ``dropped``; late ticks (caught up by the clock) in
  ``late``, and ticks the clock skipped after a stall in ``skipped``.

The provider seam: ``set_provider`` swaps what feeds the lane (the next layer's Player or mixer is just
another :class:`FrameProvider`); call :meth:`TransmitLane.wake` whenever a provider gets data while the lane
may be idle. A provider that is ``Sized`` tells the lane whether frames are waiting (it then goes idle
rather than tick while blocked with nothing queued).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cordvoice.audio.clock import FRAME_INTERVAL, Clock, ClockSubscription
from cordvoice.dave.session import DaveClient
from cordvoice.errors import InvalidArgumentError
from cordvoice.metrics import Histogram
from cordvoice.udp.rtp import FRAME_SAMPLES, OPUS_SILENCE
from cordvoice.udp.sender import RtpSender

__all__ = [
    "SILENCE_FRAMES",
    "FrameProvider",
    "FrameQueue",
    "PacketSink",
    "TransmitLane",
    "TransmitStats",
]

logger = logging.getLogger(__name__)

SILENCE_FRAMES = 5
"""Silence frames sent after the last audio frame of a talk spurt."""
_HALF_FRAME = FRAME_INTERVAL / 2
_MAX_FRAME = 1275 * 3
"""Largest plausible Opus packet for 20 ms (three 1275-byte frames); anything bigger is a caller's mistake."""


@runtime_checkable
class FrameProvider(Protocol):
    """Whatever feeds a session's transmit lane. ``pull`` is called on the clock tick and must not block.

    A provider whose ``pull`` does real work (starting an encoder job) says so with an integer attribute
    ``tick_weight`` (:data:`~cordvoice.audio.clock.HEAVY_TICK`); the clock then puts fewer such streams in
    one wake-up. Without it a pull counts as cheap (1).
    """

    def pull(self) -> bytes | None:
        """The next 20 ms Opus frame, or None when there is none right now (an underrun)."""
        ...


class FrameQueue:
    """A small bounded FIFO of Opus frames: the :class:`FrameProvider` behind ``Session.write``.

    ``put`` waits while the queue is full (backpressure); ``pull`` takes one frame and wakes one waiting
    writer; ``wait_empty`` waits until everything queued was pulled.
    """

    __slots__ = ("_empty_waiters", "_error", "_frames", "_putters", "maxsize")

    def __init__(self, maxsize: int = 5) -> None:
        if maxsize < 1:
            raise InvalidArgumentError(f"the frame queue needs room for at least one frame, got {maxsize}")
        self.maxsize = maxsize
        self._frames: collections.deque[bytes] = collections.deque()
        self._putters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._empty_waiters: list[asyncio.Future[None]] = []
        self._error: BaseException | None = None

    def __len__(self) -> int:
        return len(self._frames)

    async def put(self, frame: bytes) -> None:
        """Queue one frame, waiting for room. Raises the error given to :meth:`close` once closed."""
        while True:
            if self._error is not None:
                raise self._error
            if len(self._frames) < self.maxsize:
                self._frames.append(frame)
                return
            waiter = asyncio.get_running_loop().create_future()
            self._putters.append(waiter)
            try:
                await waiter
            except BaseException:
                waiter.cancel()
                # A cancelled writer must not swallow the wake-up meant for the next one.
                self._wake_putter()
                raise

    def pull(self) -> bytes | None:
        frames = self._frames
        if not frames:
            return None
        frame = frames.popleft()
        self._wake_putter()
        if not frames:
            self._wake_empty()
        return frame

    async def wait_empty(self) -> None:
        """Return once every queued frame has been pulled (or the queue was cleared or closed)."""
        if not self._frames or self._error is not None:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._empty_waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._empty_waiters:
                self._empty_waiters.remove(waiter)

    def clear(self) -> int:
        """Drop every queued frame; returns how many."""
        count = len(self._frames)
        self._frames.clear()
        for _ in range(self.maxsize):
            self._wake_putter()
        self._wake_empty()
        return count

    def close(self, error: BaseException) -> int:
        """Refuse further frames with ``error``, wake every waiter, drop what is queued (returns how many)."""
        self._error = error
        dropped = len(self._frames)
        self._frames.clear()
        while self._putters:
            self._wake_putter()
        self._wake_empty()
        return dropped

    def _wake_putter(self) -> None:
        while self._putters:
            waiter = self._putters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _wake_empty(self) -> None:
        waiters, self._empty_waiters = self._empty_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class PacketSink(Protocol):
    """Where a lane's datagrams go: a :class:`~cordvoice.udp.connection.UdpConnection`, or a test's wire."""

    direct_send: Callable[[bytes], object] | None
    """A plain socket send for audio packets while one is usable (None: use :meth:`send`)."""

    def send(self, datagram: bytes) -> bool:
        """Send one datagram; False (counted by the sink) when it cannot go out."""
        ...

    def send_failed(self, datagram: bytes, exc: OSError) -> bool:
        """``direct_send`` raised ``exc`` for ``datagram``: deal with it like :meth:`send` would."""
        ...


@dataclass(slots=True)
class TransmitStats:
    """Counters of one lane (they survive resumes, moves and rejoins)."""

    frames_sent: int = 0
    silence_sent: int = 0
    dropped: int = 0
    """Frames pulled from the provider and never sent (DAVE encryption failed, the socket was closed)."""
    late: int = 0
    """Ticks served late by the clock's catch-up after a stall (counted when a subscription ends)."""
    skipped: int = 0
    """Ticks the clock skipped after a long stall (counted when a subscription ends)."""
    dave_encrypted: int = 0
    """Frames end-to-end encrypted (DAVE) before sending."""
    dave_withheld: int = 0
    """Ticks on which the lane did not pull because DAVE was required but not ready."""
    no_transport: int = 0
    """Ticks on which the lane did not pull because no voice connection was ready."""
    underruns: int = 0
    """Times the provider ran dry right after audio without a stop being requested (talk spurts that
    ended by underrun: the silence tail follows)."""
    activations: int = 0


class TransmitLane:
    """Paces one session's outgoing audio on the shared clock (see the module docstring)."""

    # Slots: the tick reads a dozen of these for every packet of every stream, and at a thousand streams
    # each extra memory block a packet touches (an instance dict's values) is a cache miss.
    __slots__ = (
        "_clock",
        "_closed",
        "_detached_at",
        "_direct_send",
        "_empty_ticks",
        "_grace_ticks",
        "_idle_sender",
        "_idle_since",
        "_last_sender",
        "_lateness",
        "_next_deadline",
        "_set_speaking",
        "_silence_left",
        "_sink",
        "_speaking",
        "_stop_waiters",
        "_sub",
        "dave",
        "provider",
        "sender",
        "stats",
    )

    def __init__(
        self,
        clock: Clock,
        *,
        set_speaking: Callable[[bool], None],
        idle_grace: float = 0.2,
    ) -> None:
        self._clock = clock
        self._sink: PacketSink | None = None
        self._direct_send: Callable[[bytes], object] | None = None
        self._set_speaking = set_speaking
        self._grace_ticks = max(1, round(idle_grace / FRAME_INTERVAL))
        self.provider: FrameProvider | None = None
        self.sender: RtpSender | None = None
        self.dave: DaveClient | None = None
        self.stats = TransmitStats()
        self._lateness = Histogram()
        self._sub: ClockSubscription | None = None
        self._speaking = False
        self._silence_left = 0
        self._empty_ticks = 0
        self._idle_since: float | None = None
        self._idle_sender: RtpSender | None = None
        self._last_sender: RtpSender | None = None
        self._detached_at: float | None = None
        self._stop_waiters: list[asyncio.Future[None]] = []
        self._next_deadline = 0.0
        """The deadline the next tick should serve; a later one means the clock skipped ticks (a stall)."""
        self._closed = False

    # ---- state -----------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Subscribed to the clock."""
        return self._sub is not None

    @property
    def speaking(self) -> bool:
        return self._speaking

    @property
    def blocked(self) -> bool:
        """Audio cannot go out now: no connection, or DAVE required and not ready."""
        if self.sender is None:
            return True
        dave = self.dave
        return dave is not None and dave.dave_required and not dave.ready

    @property
    def late(self) -> int:
        return self.stats.late + (self._sub.catchup_ticks if self._sub is not None else 0)

    @property
    def skipped(self) -> int:
        return self.stats.skipped + (self._sub.skipped_ticks if self._sub is not None else 0)

    def lateness(self) -> Histogram:
        """Lateness (ms) of every tick this lane was served, across all its subscriptions so far."""
        sub = self._sub
        if sub is not None and sub.active and not self._lateness.count:
            return sub.lateness  # already a fresh histogram, and there is nothing earlier to merge
        merged = self._lateness.copy()
        if sub is not None:
            merged.merge(sub.lateness)
        return merged

    # ---- control ---------------------------------------------------------------------------------

    def set_provider(self, provider: FrameProvider | None) -> None:
        """Replace what feeds the lane (None: nothing). The old provider is simply no longer pulled."""
        self.provider = provider
        self.wake_if_pending()

    def wake_if_pending(self) -> None:
        """Start ticking if the provider reports queued frames (or cannot tell)."""
        if self._has_pending():
            self.wake()

    def continuation(self) -> tuple[int, int] | None:
        """``(sequence, timestamp)`` a new sender should start at to continue the previous one, if any.

        After a move or rejoin the SSRC changes, but keeping the numbers monotonic (the timestamp advanced by
        the time spent without a connection) costs nothing and keeps recordings aligned.
        """
        previous = self._last_sender
        if previous is None:
            return None
        timestamp = (previous.timestamp + FRAME_SAMPLES * self._frames_since(self._detached_at)) & 0xFFFF_FFFF
        return previous.sequence, timestamp

    def attach(self, sender: RtpSender, dave: DaveClient | None, sink: PacketSink) -> None:
        """A voice connection is ready: seal with ``sender`` (the same one after a resume) and hand each
        datagram to ``sink`` (the connection, so a packet goes straight to its socket)."""
        self.sender = sender
        self._sink = sink
        self._direct_send = sink.direct_send
        self._last_sender = sender
        self._detached_at = None
        self.dave = dave
        if self._sub is not None or self._speaking or self._has_pending():
            self.wake()

    def detach(self) -> None:
        """The voice connection is gone until a fresh one (move, rejoin): keep the provider, stop sending."""
        if self.sender is not None:
            self._detached_at = self._clock.time()
        self.sender = None
        self._sink = None
        self._direct_send = None
        self.dave = None
        self._silence_left = 0

    def mark_speaking(self, speaking: bool) -> None:
        """The session sent op 5 itself (``Session.speaking``): keep the lane's idea of it in step."""
        self._speaking = speaking

    def wake(self) -> None:
        """Start ticking if idle; providers call this when data arrives."""
        if self._closed or self._sub is not None:
            return
        if self.sender is not None and self.sender is self._idle_sender and self._idle_since is not None:
            self.sender.skip(self._frames_since(self._idle_since))
        self._idle_since = None
        self._next_deadline = 0.0  # the idle time is skipped above: the first tick must not count it again
        self._empty_ticks = 0
        self.stats.activations += 1
        weight = getattr(self.provider, "tick_weight", 1)
        self._sub = self._clock.subscribe(self._tick, weight=weight, on_error=self._tick_failed)

    async def stop(self) -> None:
        """Send what the provider still has, then the silence tail, then turn speaking off and go idle.

        While DAVE is required but not ready, or no connection is ready, queued frames wait (see the module
        docstring); bound the call with ``asyncio.timeout`` if that matters.
        """
        if self._closed or (self._sub is None and not self._speaking and not self._has_pending()):
            return
        waiter = asyncio.get_running_loop().create_future()
        self._stop_waiters.append(waiter)
        self.wake()
        try:
            await waiter
        finally:
            if waiter in self._stop_waiters:
                self._stop_waiters.remove(waiter)

    def close(self) -> None:
        """Unsubscribe for good and release every waiter."""
        self._closed = True
        self._unsubscribe()
        self._idle_since = None
        self.sender = None
        self._sink = None
        self._direct_send = None
        self.dave = None
        self._release_stop_waiters()

    # ---- the tick --------------------------------------------------------------------------------

    def _tick(self, deadline: float) -> None:
        sender = self.sender
        expected, self._next_deadline = self._next_deadline, deadline + FRAME_INTERVAL
        if deadline > expected + _HALF_FRAME and expected and sender is not None:
            # The clock skipped ticks after a stall: keep the RTP timestamp on wall time (a gap, not a shift).
            sender.skip(round((deadline - expected) / FRAME_INTERVAL))
        if sender is None:
            self.stats.no_transport += 1
            self._no_audio(None, blocked=True)
            return
        dave = self.dave
        encrypt = None
        if dave is not None:
            encrypt = dave.encryptor  # an attribute, not dave.ready: this runs for every packet
            if encrypt is None and dave.dave_required:
                self.stats.dave_withheld += 1
                self._no_audio(sender, blocked=True)
                return
        provider = self.provider
        frame = provider.pull() if provider is not None else None
        if frame is None:
            if self._silence_left == SILENCE_FRAMES and not self._stop_waiters:
                self.stats.underruns += 1  # the provider ran dry mid-stream (not a requested stop)
            self._no_audio(sender, blocked=False)
            return
        if not self._speaking:
            self._speaking = True
            self._set_speaking(True)
        self._empty_ticks = 0
        self._silence_left = SILENCE_FRAMES
        stats = self.stats
        payload: bytes | None = frame
        if len(frame) > _MAX_FRAME:
            logger.warning("dropped a %d-byte frame: too large for one 20 ms Opus packet", len(frame))
            payload = None
        elif encrypt is not None and frame != OPUS_SILENCE:  # silence is never end-to-end encrypted
            try:
                payload = encrypt(frame)
            except ValueError as exc:
                payload = None
                if dave is not None:
                    dave.encrypt_failed(exc)
            else:
                stats.dave_encrypted += 1
        if payload is None:
            stats.dropped += 1
            sender.skip(1)
        elif self._send_audio(sender.build(payload)):
            stats.frames_sent += 1
        else:
            stats.dropped += 1

    def _send_audio(self, packet: bytes) -> bool:
        """Hand an audio packet to the sink's ``direct_send`` (kept on the lane: at 1,000 sessions every
        object a packet touches costs cache misses), or to ``send`` while the sink has no direct path."""
        direct = self._direct_send
        if direct is not None:
            try:
                direct(packet)
            except OSError as exc:
                # Busy or broken: the sink queues or counts it; come back once it offers a direct path again.
                self._direct_send = None
                if self._sink is None:
                    return False
                return self._sink.send_failed(packet, exc)
            return True
        sink = self._sink
        if sink is None:
            return False
        sent = sink.send(packet)
        self._direct_send = sink.direct_send  # after the send: it may have queued, or found the queue drained
        return sent

    def _no_audio(self, sender: RtpSender | None, *, blocked: bool) -> None:
        """A tick without an audio frame: the silence tail, then the grace period, then idle."""
        if sender is not None:
            if self._silence_left > 0:
                self._silence_left -= 1
                if self._send_audio(sender.build(OPUS_SILENCE)):
                    self.stats.silence_sent += 1
                return
            sender.skip(1)
        self._empty_ticks += 1
        if blocked and self._has_pending():
            return  # the frames wait for DAVE or a connection; keep ticking
        if self._stop_waiters:
            self._go_idle()
            self._release_stop_waiters()
        elif self._empty_ticks >= self._grace_ticks:
            self._go_idle()

    def _has_pending(self) -> bool:
        provider = self.provider
        if provider is None:
            return False
        if isinstance(provider, Sized):
            return len(provider) > 0
        return True  # a provider that cannot tell is assumed to have more

    def _go_idle(self) -> None:
        if self._speaking:
            self._speaking = False
            self._set_speaking(False)
        self._unsubscribe()
        self._idle_since = self._clock.time()
        self._idle_sender = self.sender

    def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            sub.cancel()
            self._absorb(sub)

    def _absorb(self, sub: ClockSubscription) -> None:
        self.stats.skipped += sub.skipped_ticks
        self.stats.late += sub.catchup_ticks
        self._lateness.merge(sub.lateness)

    def _release_stop_waiters(self) -> None:
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _tick_failed(self, exc: BaseException) -> None:
        # The clock already unsubscribed us and logged the traceback. Go idle as after the silence tail
        # (speaking off, the idle time kept on the RTP timestamp), so the next write restarts cleanly.
        self.stats.dropped += 1
        self._go_idle()
        self._release_stop_waiters()
        logger.error("the transmit lane stopped after an error (%s); the next write restarts it", exc)

    def _frames_since(self, since: float | None) -> int:
        if since is None:
            return 0
        return max(0, round((self._clock.time() - since) / FRAME_INTERVAL))
