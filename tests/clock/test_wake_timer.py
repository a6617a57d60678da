"""The clock's timer: a timerfd on asyncio's selector loop (Linux), else call_at, with one contract."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
import weakref

import pytest

from cordvoice.audio.clock import Clock, get_clock
from cordvoice.audio.wake_timer import WakeTimer, _CallAt, _TimerFd, make_wake_timer

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timerfd is Linux-only")


async def _fires(timer: WakeTimer, fired: list[float], count: int) -> None:
    async with asyncio.timeout(5):
        while len(fired) < count:
            await asyncio.sleep(0.002)


@linux_only
async def test_asyncio_loop_gets_a_timerfd_that_fires_at_its_deadline_not_before() -> None:
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    timer = make_wake_timer(loop, lambda: fired.append(time.monotonic()))
    assert isinstance(timer, _TimerFd)
    deadlines = []
    for _ in range(5):
        deadline = loop.time() + 0.01
        deadlines.append(deadline)
        timer.arm(deadline)
        await _fires(timer, fired, len(deadlines))
    timer.close()
    assert all(at >= deadline for at, deadline in zip(fired, deadlines, strict=True))


@pytest.mark.parametrize("kind", ["timerfd", "call_at"])
async def test_arm_replaces_cancel_drops_and_a_past_deadline_fires_at_once(kind: str) -> None:
    if kind == "timerfd" and not sys.platform.startswith("linux"):
        pytest.skip("timerfd is Linux-only")
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    timer: WakeTimer = (_TimerFd if kind == "timerfd" else _CallAt)(loop, lambda: fired.append(loop.time()))

    timer.arm(loop.time() + 10.0)
    timer.arm(loop.time() + 0.01)  # replaces the far one
    await _fires(timer, fired, 1)

    timer.arm(loop.time() + 0.01)
    timer.cancel()
    await asyncio.sleep(0.05)
    assert len(fired) == 1, "a cancelled wake-up fired"

    timer.arm(loop.time() - 1.0)
    await _fires(timer, fired, 2)

    timer.close()
    timer.arm(loop.time())  # usable again after close
    await _fires(timer, fired, 3)
    timer.close()
    await asyncio.sleep(0.02)
    assert len(fired) == 3


@linux_only
async def test_close_releases_the_descriptor() -> None:
    timer = _TimerFd(asyncio.get_running_loop(), lambda: None)
    timer.arm(time.monotonic() + 1.0)
    fd = timer._fd
    os.fstat(fd)
    timer.close()
    with pytest.raises(OSError):
        os.fstat(fd)


@linux_only
def test_a_dropped_loops_clock_does_not_leak_its_descriptor() -> None:
    def run_once() -> tuple[int, weakref.ref[asyncio.AbstractEventLoop]]:
        loop = asyncio.new_event_loop()

        async def tick_once() -> int:
            ticks: list[float] = []
            sub = get_clock().subscribe(ticks.append)
            async with asyncio.timeout(5):
                while not ticks:
                    await asyncio.sleep(0.005)
            sub.cancel()
            timer = get_clock()._timer
            assert isinstance(timer, _TimerFd)
            return timer._fd

        fd = loop.run_until_complete(tick_once())
        loop.close()  # the clock is never closed: only dropped with its loop
        return fd, weakref.ref(loop)

    fd, gone = run_once()
    gc.collect()
    assert gone() is None
    with pytest.raises(OSError):
        os.fstat(fd)


def test_uvloop_keeps_call_at() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def kind() -> type:
        return type(Clock(asyncio.get_running_loop())._timer)

    assert uvloop.run(kind()) is _CallAt


@linux_only
async def test_an_idle_clock_holds_no_descriptor() -> None:
    clock = Clock(asyncio.get_running_loop())
    timer = clock._timer
    assert isinstance(timer, _TimerFd)
    ticks: list[float] = []
    sub = clock.subscribe(ticks.append)
    async with asyncio.timeout(5):
        while not ticks:
            await asyncio.sleep(0.005)
    assert timer._fd >= 0
    sub.cancel()
    await asyncio.sleep(0.05)  # the slot's stale entry fires once and is dropped: nothing is left to wake for
    assert timer._fd == -1
    sub = clock.subscribe(ticks.append)  # and it wakes again when a stream comes back
    count = len(ticks)
    async with asyncio.timeout(5):
        while len(ticks) == count:
            await asyncio.sleep(0.005)
    sub.cancel()
    clock.close()
