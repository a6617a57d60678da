"""One 20 ms scheduler for every voice stream in the process.

A thread or a free-running timer per stream collapses at a few hundred streams and bursts when
the machine hiccups. Instead, each event loop gets a single :class:`Clock`. Streams subscribe and
are spread over ``slots`` phases inside the 20 ms period, so ticks never pile up on one instant, and
the clock keeps exactly one loop timer armed: the next slot deadline that has subscribers.
Deadlines are absolute (``t0 + slot offset + k * period``) so they never drift, and a stall is
caught up by at most ``max_catchup`` extra ticks before the schedule is re-anchored: playback
resumes at normal speed instead of racing through the backlog.

Every wake-up of the loop has a fixed price (the timer, ``epoll_wait``, the loop's iteration: 70-120 µs of
CPU on a virtual machine, docs/benchmarks.md), so the process-wide clock from :func:`get_clock` *packs*
subscribers: a slot takes streams up to ``slot_capacity`` units of work before the next one opens, and slots
open in an order that keeps the open ones far apart in the period. A stream says what its tick weighs when it
subscribes: an Opus passthrough stream weighs 1 (about 10 µs per tick); a player that starts an encoder job
on its tick, or a receiver, weighs :data:`HEAVY_TICK`. A hundred passthrough streams then cost one wake-up
per 20 ms instead of twenty, while the slots of encoding players stay small, because their encoder jobs
start in one burst and larger bursts showed in the loop's lag. Once every slot is full, new streams spread
evenly over the least loaded slots. ``slot_capacity=None`` always spreads evenly.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from cordvoice.audio.wake_timer import make_wake_timer
from cordvoice.errors import InvalidArgumentError
from cordvoice.metrics import Histogram

logger = logging.getLogger(__name__)

FRAME_INTERVAL = 0.020
"""Seconds per Opus frame: Discord voice is 20 ms frames of 48 kHz audio."""

SLOT_CAPACITY = 100
"""Units of tick weight a slot of the shared clock takes before another slot opens (module docstring).
100 passthrough streams are a 1 ms burst per slot (docs/benchmarks.md: 29 -> 21 µs per packet at 100
sessions against a capacity of 10)."""

HEAVY_TICK = 10
"""The weight of a tick that starts codec work: a playing :class:`~cordvoice.audio.player.Player` (encoder
jobs) or a :class:`~cordvoice.audio.receiver.Receiver` (every user's playout, decode jobs): 10 per slot.
Measured with 20 MP3 players on one loop: 10 per slot keeps the loop lag p99 under 4 ms at 15% less CPU
than spreading; 25 or 50 per slot doubled the lag's p99."""

EARLY_WAKE = 0.002
"""A timer that fires this early (seconds) serves its slot at once instead of re-arming (uvloop)."""

TickCallback = Callable[[float], None]
"""Called once per period with the absolute deadline (loop time) the tick serves. Must not block."""


class ClockSubscription:
    """A stream's place on the clock; ``cancel()`` it when the stream ends.

    Every stream of a slot is served by the same wake-ups, so the clock keeps the slot's record (lateness,
    catch-up and skipped ticks) once, not per stream: a subscription reads the part of that record made while
    it was subscribed. That keeps the per-stream work of a tick down to the callback itself.
    """

    __slots__ = ("_clock", "_final", "_slot", "_start", "callback", "on_error", "slot", "weight")

    def __init__(
        self,
        clock: Clock,
        slot: _Slot,
        callback: TickCallback,
        weight: int,
        on_error: Callable[[BaseException], None] | None,
    ) -> None:
        self.callback = callback
        self.slot = slot.index
        self.weight = weight
        self.on_error = on_error
        self._clock: Clock | None = clock
        self._slot = slot
        self._start = (slot.lateness.copy(), slot.catchup_ticks, slot.skipped_ticks)
        self._final: tuple[Histogram, int, int] | None = None

    @property
    def active(self) -> bool:
        return self._clock is not None

    @property
    def lateness(self) -> Histogram:
        """Lateness (ms) of every tick served to this subscription (see :meth:`Histogram.since`)."""
        if self._final is not None:
            return self._final[0]
        return self._slot.lateness.since(self._start[0])

    @property
    def ticks(self) -> int:
        if self._final is not None:
            return self._final[0].count
        return self._slot.lateness.count - self._start[0].count

    @property
    def catchup_ticks(self) -> int:
        """Ticks served late, right after another, to catch up after a stall."""
        if self._final is not None:
            return self._final[1]
        return self._slot.catchup_ticks - self._start[1]

    @property
    def skipped_ticks(self) -> int:
        """Ticks never served: the clock re-anchored after a stall longer than its catch-up."""
        if self._final is not None:
            return self._final[2]
        return self._slot.skipped_ticks - self._start[2]

    def cancel(self) -> None:
        clock = self._clock
        if clock is not None:
            self._end()
            clock._remove(self)

    def _end(self) -> None:
        self._final = (self.lateness, self.catchup_ticks, self.skipped_ticks)
        self._clock = None


@dataclass(eq=False)
class _Slot:
    index: int
    deadline: float = 0.0
    members: tuple[ClockSubscription, ...] = ()
    load: int = 0
    """Sum of the members' weights."""
    scheduled: bool = False
    lateness: Histogram = field(default_factory=Histogram)
    catchup_ticks: int = 0
    skipped_ticks: int = 0


class Clock:
    """The process-wide (per event loop) pacing clock; get it with :func:`get_clock`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        interval: float = FRAME_INTERVAL,
        slots: int = 20,
        max_catchup: int = 2,
        slot_capacity: int | None = None,
    ) -> None:
        if interval <= 0:
            raise InvalidArgumentError(f"clock interval must be positive, got {interval}")
        if slots < 1:
            raise InvalidArgumentError(f"clock needs at least one slot, got {slots}")
        if slot_capacity is not None and slot_capacity < 1:
            raise InvalidArgumentError(f"slot_capacity must be at least 1, got {slot_capacity}")
        if max_catchup < 0:
            raise InvalidArgumentError(f"max_catchup cannot be negative, got {max_catchup}")
        self._loop_ref = weakref.ref(loop)
        """Weak: the per-loop registry (:func:`get_clock`) is keyed weakly by the loop, and a strong reference
        from its value back to the key would keep every loop that ever used a clock alive."""
        self.interval = interval
        self.max_catchup = max_catchup
        self._slot_offset = interval / slots
        self._slots = [_Slot(i) for i in range(slots)]
        self._next_slot = 0
        self.slot_capacity = slot_capacity
        self._opening_order = _spread_order(slots)
        self._heap: list[tuple[float, int]] = []
        self._timer = make_wake_timer(loop, self._wake)
        self._armed = False
        self._timer_when = 0.0
        """When the armed timer fires (uvloop's ``call_at`` returns a plain Handle, without ``when()``, for a
        deadline past or under 0.5 ms away)."""
        self._t0 = loop.time()
        self.lateness = Histogram()
        """Lateness of every slot wake-up, in ms: the clock's own health, across all streams."""
        self.stalls = 0
        """Wake-ups that found a slot more than one period behind (the loop was blocked)."""
        self.callback_errors = 0

    @property
    def subscribers(self) -> int:
        return sum(len(slot.members) for slot in self._slots)

    def slot_loads(self) -> list[int]:
        """Each slot's total weight, in slot order: how the clock spread its streams."""
        return [slot.load for slot in self._slots]

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop_ref()
        if loop is None:
            raise RuntimeError("this clock's event loop no longer exists")
        return loop

    def time(self) -> float:
        """The shared clock's notion of now: the event loop's monotonic time."""
        return self._loop.time()

    def subscribe(
        self,
        callback: TickCallback,
        *,
        weight: int = 1,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> ClockSubscription:
        """Call ``callback(deadline)`` every period, starting at the next free phase.

        ``weight`` is what one tick costs relative to an Opus passthrough stream's (1); it decides how many
        streams share a slot (see the module docstring). If the callback raises, the subscription is
        cancelled, the error is logged and counted, and
        ``on_error`` (when given) is told, so the owning stream can end with that reason.
        """
        if weight < 1:
            raise InvalidArgumentError(f"a tick's weight must be at least 1, got {weight}")
        slot = self._pick_slot(weight)
        sub = ClockSubscription(self, slot, callback, weight, on_error)
        slot.members = (*slot.members, sub)
        slot.load += weight
        if not slot.scheduled:
            slot.deadline = self._first_deadline(slot.index)
            self._push(slot)
        return sub

    def close(self) -> None:
        """Stop the timer and drop every subscription (used when the loop shuts down)."""
        for slot in self._slots:
            for sub in slot.members:
                sub._end()
            slot.members = ()
            slot.load = 0
            slot.scheduled = False
        self._heap.clear()
        self._armed = False
        self._timer.close()

    # -- internals ---------------------------------------------------------------------------------

    def _pick_slot(self, weight: int) -> _Slot:
        capacity = self.slot_capacity
        if capacity is not None:
            packed = self._pick_packed(capacity, weight)
            if packed is not None:
                return packed
        # Least-loaded slot, scanning from a rotating start so equal slots fill round-robin.
        n = len(self._slots)
        best = self._slots[self._next_slot]
        for i in range(n):
            candidate = self._slots[(self._next_slot + i) % n]
            if candidate.load < best.load:
                best = candidate
        self._next_slot = (best.index + 1) % n
        return best

    def _pick_packed(self, capacity: int, weight: int) -> _Slot | None:
        """The fullest open slot with room, else the next empty one in opening order; None if all are full."""
        best: _Slot | None = None
        for slot in self._slots:
            load = slot.load
            if load > 0 and load + weight <= capacity and (best is None or load > best.load):
                best = slot
        if best is not None:
            return best
        for index in self._opening_order:
            if not self._slots[index].members:
                return self._slots[index]
        return None

    def _first_deadline(self, index: int) -> float:
        now = self._loop.time()
        phase = self._t0 + index * self._slot_offset
        periods = max(0, int((now - phase) // self.interval) + 1)
        return phase + periods * self.interval

    def _push(self, slot: _Slot) -> None:
        slot.scheduled = True
        heapq.heappush(self._heap, (slot.deadline, slot.index))
        self._arm()

    def _arm(self) -> None:
        if not self._heap:
            self._timer.close()  # idle: hold no descriptor until a stream subscribes again
            return
        when = self._heap[0][0]
        if self._armed and self._timer_when <= when:
            return
        self._timer.arm(when)
        self._armed = True
        self._timer_when = when

    def _remove(self, sub: ClockSubscription) -> None:
        slot = self._slots[sub.slot]
        slot.members = tuple(m for m in slot.members if m is not sub)
        slot.load -= sub.weight
        # An emptied slot keeps its heap entry; _wake drops it lazily.

    def _wake(self) -> None:
        self._armed = False
        now = self._loop.time()
        heap = self._heap
        if heap and 0.0 < heap[0][0] - now <= EARLY_WAKE:
            # Woken before anything is due: uvloop's millisecond timers fire up to ~1 ms early. Re-arming
            # would spin until the deadline (hundreds of wake-ups per tick), so serve the slot now, on time.
            now = heap[0][0]
        while heap and heap[0][0] <= now:
            deadline, index = heapq.heappop(heap)
            slot = self._slots[index]
            if not slot.members:
                slot.scheduled = False
                continue
            behind = int((now - deadline) // self.interval)
            ticks = 1 + min(behind, self.max_catchup)
            if behind > 0:
                self.stalls += 1
            self.lateness.record((now - deadline) * 1000.0)
            for k in range(ticks):
                self._fire(slot, deadline + k * self.interval, now, catchup=k > 0)
            skipped = behind - self.max_catchup if behind > self.max_catchup else 0
            slot.skipped_ticks += skipped
            slot.deadline = deadline + (ticks + skipped) * self.interval
            if slot.members:
                heapq.heappush(heap, (slot.deadline, index))
            else:
                slot.scheduled = False
        self._arm()

    def _fire(self, slot: _Slot, deadline: float, now: float, *, catchup: bool) -> None:
        slot.lateness.record((now - deadline) * 1000.0)
        if catchup:
            slot.catchup_ticks += 1
        for sub in slot.members:
            if sub._clock is None:
                continue
            try:
                sub.callback(deadline)
            except Exception as exc:  # a broken stream must not stop every other stream
                self.callback_errors += 1
                logger.exception("clock subscriber failed; it is unsubscribed")
                sub.cancel()
                if sub.on_error is not None:
                    try:
                        sub.on_error(exc)
                    except Exception:
                        logger.exception("clock subscriber's error handler failed")


def _spread_order(slots: int) -> list[int]:
    """Slot indices in the order slots open: each next one as far as possible from those already open."""
    order = [0]
    while len(order) < slots:

        def gap(index: int) -> int:
            return min(min((index - o) % slots, (o - index) % slots) for o in order)

        order.append(max((i for i in range(slots) if i not in order), key=lambda i: (gap(i), -i)))
    return order


_clocks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Clock] = weakref.WeakKeyDictionary()


def get_clock(loop: asyncio.AbstractEventLoop | None = None) -> Clock:
    """The one clock of ``loop`` (default: the running loop), created on first use; it packs its slots."""
    if loop is None:
        loop = asyncio.get_running_loop()
    clock = _clocks.get(loop)
    if clock is None:
        clock = _clocks[loop] = Clock(loop, slot_capacity=SLOT_CAPACITY)
    return clock
