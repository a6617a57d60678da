"""The shared 20 ms clock: cadence, staggering, bounded catch-up after a stall, error isolation."""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
import weakref

import pytest

from cordvoice.audio.clock import FRAME_INTERVAL, Clock, get_clock
from cordvoice.errors import InvalidArgumentError
from cordvoice.metrics import Histogram


async def test_ticks_follow_absolute_deadlines() -> None:
    clock = Clock(asyncio.get_running_loop())
    deadlines: list[float] = []
    done = asyncio.Event()

    def tick(deadline: float) -> None:
        deadlines.append(deadline)
        if len(deadlines) == 25:
            done.set()

    sub = clock.subscribe(tick)
    async with asyncio.timeout(5):
        await done.wait()
    sub.cancel()
    steps = [b - a for a, b in itertools.pairwise(deadlines)]
    assert all(abs(s - FRAME_INTERVAL) < 1e-9 for s in steps)
    assert sub.lateness.count == len(deadlines)
    assert sub.lateness.percentile(50) < 10  # loose: CI is noisy; the bench measures for real
    clock.close()


async def test_subscribers_are_staggered_over_slots() -> None:
    clock = Clock(asyncio.get_running_loop(), slots=20)
    subs = [clock.subscribe(lambda d: None) for _ in range(60)]
    per_slot = [0] * 20
    for sub in subs:
        per_slot[sub.slot] += 1
    assert per_slot == [3] * 20
    assert clock.subscribers == 60
    for sub in subs:
        sub.cancel()
    assert clock.subscribers == 0
    clock.close()


async def test_stall_catches_up_at_most_max_catchup_frames() -> None:
    loop = asyncio.get_running_loop()
    clock = Clock(loop, max_catchup=2)
    fired: list[tuple[float, float]] = []
    sub = clock.subscribe(lambda d: fired.append((d, loop.time())))
    async with asyncio.timeout(5):
        while len(fired) < 3:
            await asyncio.sleep(0.005)
    time.sleep(0.150)  # block the loop for 7.5 periods, the way a blocking call would
    stalled_at = loop.time()
    async with asyncio.timeout(5):
        while len(fired) < 12:
            await asyncio.sleep(0.005)
    sub.cancel()
    burst = [f for f in fired if abs(f[1] - stalled_at) < 0.004]
    assert 1 <= len(burst) <= 1 + clock.max_catchup
    assert sub.skipped_ticks >= 4
    assert clock.stalls >= 1
    # After re-anchoring, deadlines stay on the original 20 ms grid.
    grid = fired[0][0]
    for deadline, _ in fired:
        periods = (deadline - grid) / FRAME_INTERVAL
        assert abs(periods - round(periods)) < 1e-6
    clock.close()


async def test_failing_subscriber_is_isolated() -> None:
    clock = Clock(asyncio.get_running_loop(), slots=1)
    errors: list[BaseException] = []
    healthy: list[float] = []

    def broken(_: float) -> None:
        raise RuntimeError("boom")

    bad = clock.subscribe(broken, on_error=errors.append)
    good = clock.subscribe(healthy.append)
    async with asyncio.timeout(5):
        while len(healthy) < 5:
            await asyncio.sleep(0.005)
    assert not bad.active
    assert good.active
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert clock.callback_errors == 1
    good.cancel()
    clock.close()


async def test_idle_clock_arms_no_timer() -> None:
    clock = Clock(asyncio.get_running_loop())
    ticks: list[float] = []
    sub = clock.subscribe(ticks.append)
    async with asyncio.timeout(5):
        while not ticks:
            await asyncio.sleep(0.005)
    sub.cancel()
    await asyncio.sleep(0.05)  # the stale slot entry fires once and is dropped
    assert not clock._armed
    count = len(ticks)
    await asyncio.sleep(0.05)
    assert len(ticks) == count


async def test_get_clock_is_one_per_loop() -> None:
    assert get_clock() is get_clock(asyncio.get_running_loop())


def test_clock_rejects_bad_arguments() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(InvalidArgumentError):
            Clock(loop, interval=0)
        with pytest.raises(InvalidArgumentError):
            Clock(loop, slots=0)
        with pytest.raises(InvalidArgumentError):
            Clock(loop, max_catchup=-1)
    finally:
        loop.close()


def test_histogram_percentiles_and_merge() -> None:
    h = Histogram()
    for v in [0.1] * 98 + [7.0, 300.0]:
        h.record(v)
    assert h.percentile(50) == 0.25
    assert h.percentile(99) == 7.0
    assert h.percentile(100) == 300.0
    assert h.max_ms == 300.0
    other = Histogram()
    other.record(-0.5)
    h.merge(other)
    assert h.count == 101 and h.min_ms == -0.5
    assert h.summary()["p50"] == 0.25
    assert Histogram().summary()["count"] == 0
    with pytest.raises(InvalidArgumentError):
        h.percentile(101)


def test_histogram_since_reports_only_the_window_after_a_copy() -> None:
    slot = Histogram()
    for value in (0.1, 7.0, 40.0):
        slot.record(value)
    before = slot.copy()
    for value in (0.6, 1.1, 1.2):
        slot.record(value)
    window = slot.since(before)
    assert window.count == 3 and abs(window.total_ms - 2.9) < 1e-9
    assert window.percentile(50) == 1.25 and window.max_ms == 1.25, "max not known exactly: its bucket bound"
    assert window.min_ms == 0.5, "min not known exactly: the lower bound of its bucket"
    slot.record(60.0)
    slot.record(-0.5)
    window = slot.since(before)
    assert window.max_ms == 60.0 and window.min_ms == -0.5, "extremes set in the window are exact"
    assert slot.since(slot.copy()).count == 0
    with pytest.raises(InvalidArgumentError):
        slot.since(Histogram([1.0, 2.0]))


async def test_subscriptions_read_their_share_of_the_slot_record() -> None:
    loop = asyncio.get_running_loop()
    clock = Clock(loop, slots=1)
    first = clock.subscribe(lambda d: None)
    async with asyncio.timeout(5):
        while first.ticks < 3:
            await asyncio.sleep(0.01)
        second = clock.subscribe(lambda d: None)
        while second.ticks < 2:
            await asyncio.sleep(0.01)
    first.cancel()
    frozen = first.ticks
    assert frozen >= 5 and first.lateness.count == frozen
    async with asyncio.timeout(5):
        while second.ticks < frozen:
            await asyncio.sleep(0.01)
    assert first.ticks == frozen, "a cancelled subscription's record stops"
    assert second.ticks < clock.lateness.count, "the later subscription sees only its own ticks"
    clock.close()
    assert not second.active and second.ticks >= frozen


def test_a_loops_clock_does_not_keep_the_loop_alive() -> None:
    loop = asyncio.new_event_loop()
    clock = get_clock(loop)
    assert get_clock(loop) is clock
    gone = weakref.ref(loop)
    loop.close()
    del loop
    gc.collect()
    assert gone() is None, "the registry and the clock let a closed loop go"
    with pytest.raises(RuntimeError):
        clock.time()
