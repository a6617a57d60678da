"""The client hot-path changes the benchmarks motivated, and the benchmark helpers that need no emulator.

* the shared clock packs streams into few slots (fewer loop wake-ups) and still staggers them once full;
* the UDP connection sends on its connected socket directly, falling back to the transport (which queues)
  when the kernel says "try again", without reordering datagrams;
* py-spy profile summaries, percentile helpers, the child-process runner's error reporting, the looping
  frame provider, the in-memory DAVE group and the readings of how the measured core was shared.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cordvoice.audio.clock import HEAVY_TICK, SLOT_CAPACITY, Clock, _spread_order, get_clock
from cordvoice.audio.wake_timer import make_wake_timer
from cordvoice.bench.dave_group import DaveGroup
from cordvoice.bench.frames import LoopingFrames, opus_frames
from cordvoice.bench.host import window_stats
from cordvoice.bench.join import _median_p95
from cordvoice.bench.machine import CoreShare
from cordvoice.bench.process import BenchError, ChildProcess
from cordvoice.bench.profile import summarize
from cordvoice.bench.send_cordvoice import percentiles
from cordvoice.errors import InvalidArgumentError
from cordvoice.metrics import Histogram
from cordvoice.udp.connection import UdpConnection

# ---- the clock -------------------------------------------------------------------------------------------


def test_spread_order_opens_distant_slots_first() -> None:
    order = _spread_order(20)
    assert sorted(order) == list(range(20))
    assert order[:4] == [0, 10, 5, 15]
    assert _spread_order(1) == [0]


async def test_packed_clock_fills_a_slot_before_opening_the_next() -> None:
    clock = Clock(asyncio.get_running_loop(), slots=20, slot_capacity=50)
    subs = [clock.subscribe(lambda d: None) for _ in range(120)]
    per_slot: dict[int, int] = {}
    for sub in subs:
        per_slot[sub.slot] = per_slot.get(sub.slot, 0) + 1
    assert per_slot == {0: 50, 10: 50, 5: 20}
    for sub in subs[:30]:  # slot 0 drops to 20: the fullest slot with room gets the next streams
        sub.cancel()
    assert clock.subscribe(lambda d: None).slot in (0, 5)
    clock.close()


async def test_packed_clock_counts_tick_weights_not_streams() -> None:
    clock = Clock(asyncio.get_running_loop(), slots=20, slot_capacity=SLOT_CAPACITY)
    light = [clock.subscribe(lambda d: None) for _ in range(SLOT_CAPACITY)]
    assert len({sub.slot for sub in light}) == 1, "a slot takes SLOT_CAPACITY passthrough streams"
    heavy = [clock.subscribe(lambda d: None, weight=HEAVY_TICK) for _ in range(25)]
    heavy_slots = {sub.slot for sub in heavy}
    assert light[0].slot not in heavy_slots, "the full slot takes no more"
    assert len(heavy_slots) == 3 and sorted(clock.slot_loads(), reverse=True)[:3] == [100, 100, 100]
    for sub in heavy[:10]:
        sub.cancel()
    loads = sorted(load for load in clock.slot_loads() if load)
    assert loads == [50, 100, 100], "a cancel gives the weight back"
    with pytest.raises(InvalidArgumentError):
        clock.subscribe(lambda d: None, weight=0)
    clock.close()
    assert clock.slot_loads() == [0] * 20


async def test_packed_clock_spreads_evenly_once_every_slot_is_full() -> None:
    clock = Clock(asyncio.get_running_loop(), slots=4, slot_capacity=2)
    subs = [clock.subscribe(lambda d: None) for _ in range(12)]
    per_slot = [0] * 4
    for sub in subs:
        per_slot[sub.slot] += 1
    assert per_slot == [3, 3, 3, 3]
    clock.close()


async def test_packed_streams_still_tick_every_period_on_absolute_deadlines() -> None:
    clock = Clock(asyncio.get_running_loop(), slot_capacity=SLOT_CAPACITY)
    seen: dict[int, list[float]] = {i: [] for i in range(3)}
    done = asyncio.Event()

    def tick(index: int, deadline: float) -> None:
        seen[index].append(deadline)
        if all(len(v) >= 5 for v in seen.values()):
            done.set()

    subs = [clock.subscribe(lambda d, i=i: tick(i, d)) for i in range(3)]
    async with asyncio.timeout(5):
        await done.wait()
    assert len({sub.slot for sub in subs}) == 1, "three streams share one wake-up"
    for deadlines in seen.values():
        steps = [b - a for a, b in itertools.pairwise(deadlines)]
        assert all(abs(step - 0.020) < 1e-9 for step in steps)
        assert all(sub.lateness.count >= 5 for sub in subs)
    clock.close()


async def test_process_clock_packs_and_capacity_is_validated() -> None:
    assert get_clock().slot_capacity == SLOT_CAPACITY
    with pytest.raises(InvalidArgumentError):
        Clock(asyncio.get_running_loop(), slot_capacity=0)


# ---- the UDP send path -----------------------------------------------------------------------------------


class _FlakySocket:
    """Wraps the real socket: refuses the sends whose index is in ``again`` (EAGAIN) or ``refuse``."""

    def __init__(self, real: socket.socket, again: set[int], refuse: set[int]) -> None:
        self._real = real
        self._again = again
        self._refuse = refuse
        self.calls = 0

    def send(self, data: bytes) -> int:
        index = self.calls
        self.calls += 1
        if index in self._again:
            raise BlockingIOError
        if index in self._refuse:
            raise ConnectionRefusedError
        return self._real.send(data)


@pytest.fixture
async def receiver() -> Any:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    yield sock
    sock.close()


async def test_udp_sends_directly_and_falls_back_in_order(receiver: socket.socket) -> None:
    udp = await UdpConnection.open("127.0.0.1", receiver.getsockname()[1])
    try:
        assert udp._sock is not None
        flaky = _FlakySocket(udp._sock, again={2}, refuse={5})
        udp._sock = flaky  # type: ignore[assignment]
        results = [udp.send(bytes([i]) * 20) for i in range(8)]
        assert results == [True] * 5 + [False] + [True] * 2
        received = [(await asyncio.to_thread(receiver.recv, 100))[0] for _ in range(7)]
        assert received == [0, 1, 2, 3, 4, 6, 7], "the EAGAIN datagram went through the transport, in order"
        assert udp.stats.sent == 7 and udp.stats.socket_errors == 1
        assert flaky.calls == 8, "one socket call per datagram: datagram 2 was not retried there"
    finally:
        udp.close()
    assert not udp.send(b"late"), "closed: refused and counted"
    assert udp.stats.send_errors == 1


async def test_udp_direct_send_steps_aside_while_the_transport_queues(receiver: socket.socket) -> None:
    udp = await UdpConnection.open("127.0.0.1", receiver.getsockname()[1])
    try:
        assert udp.direct_send is not None, "a connected socket: audio goes straight to it"
        udp.direct_send(b"\x00" * 20)
        assert udp.send_failed(b"\x01" * 20, BlockingIOError()), "busy: queued in the transport"
        assert udp.direct_send is None, "nothing may overtake the queued datagram"
        assert udp.send(b"\x02" * 20)
        received = [(await asyncio.to_thread(receiver.recv, 100))[0] for _ in range(3)]
        assert received == [0, 1, 2]
        assert udp.send(b"\x03" * 20) and udp.direct_send is not None, "the queue drained: direct again"
        assert not udp.send_failed(b"\x04" * 20, ConnectionRefusedError())
        assert udp.stats.socket_errors == 1
    finally:
        udp.close()
    assert udp.direct_send is None


# ---- benchmark helpers -----------------------------------------------------------------------------------


def test_profile_summary_counts_self_and_inclusive(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "thread (1): MainThread;a (x.py:1);b (pkg/y.py:2) 3\n"
        "thread (1): MainThread;a (x.py:1);c (z.py:9) 1\n"
        "garbage line\n",
        encoding="utf-8",
    )
    result = summarize(raw)
    assert result["samples"] == 4
    assert dict(result["self"]) == {"b (y.py)": 75.0, "c (z.py)": 25.0}
    assert dict(result["inclusive"])["a (x.py)"] == 100.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_core_share_counts_the_pinned_process_and_nothing_for_an_unpinned_one() -> None:
    cores = os.sched_getaffinity(0)
    if len(cores) < 2:
        assert CoreShare.take(os.getpid()) is not None  # a one-core machine pins everything already
        return
    assert CoreShare.take(os.getpid()) is None  # several cores: no single core to read
    os.sched_setaffinity(0, {min(cores)})
    try:
        before = CoreShare.take(os.getpid())
        assert before is not None and before.core == min(cores)
        spin_until = time.process_time() + 0.3
        while time.process_time() < spin_until:
            pass
        after = CoreShare.take(os.getpid())
    finally:
        os.sched_setaffinity(0, cores)
    assert after is not None
    share = after.since(before)
    assert 200 <= share["process_ms"] <= 1000  # 0.3 s of CPU, read in 10 ms ticks
    assert share["other_processes_ms"] >= 0 and share["steal_ms"] >= 0
    assert CoreShare.take(2**22 + 12345) is None  # no such process


def test_percentiles_by_rank() -> None:
    assert percentiles([]) == {"p50": 0.0, "p95": 0.0, "max": 0.0}
    assert percentiles([float(x) for x in range(1, 101)]) == {"p50": 50.0, "p95": 95.0, "max": 100.0}
    # Nearest rank is ceil(n * p / 100): round() halves to even put the median of five at the second.
    assert percentiles([1.0, 2.0, 3.0, 4.0, 5.0])["p50"] == 3.0
    assert _median_p95([float(x) for x in range(1, 31)])["p95"] == 29.0  # rank 28.5 -> 29
    late = Histogram()
    for index in range(150):  # two packets in 150 (1.3%) were late: the p99 must show it
        late.record(40.0 if index < 2 else 0.1)
    assert late.percentile(99) == 40.0
    assert late.percentile(50) == 0.25


def test_child_process_reports_a_failing_command() -> None:
    child = ChildProcess("cordvoice.bench.frames:LoopingFrames", name="frames", options={"frames": (b"x",)})
    with child, pytest.raises(BenchError, match="cmd_nothing"):
        child.call("nothing", timeout=30)
    with pytest.raises(BenchError, match="not running"):
        child.call("nothing")


def test_looping_frames_and_a_real_dave_group() -> None:
    frames = opus_frames()
    assert len(frames) == 50 and all(len(f) > 10 for f in frames)
    provider = LoopingFrames(frames, offset=49)
    assert [provider.pull(), provider.pull()] == [frames[49], frames[0]]
    assert provider.pulled == 2
    group = DaveGroup()
    for user in (1, 2, 3):
        group.join(user)
    group.settle()
    assert group.ready
    sealed = group.clients[3].encrypt(frames[0])
    assert sealed is not None and sealed != frames[0]
    assert group.clients[1].decrypt(3, sealed) == frames[0]


def test_clock_on_uvloop_survives_a_past_deadline() -> None:
    """uvloop's ``call_at`` returns a plain Handle (no ``when()``) for a deadline already past."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        clock = Clock(loop, slot_capacity=1)
        ticks: list[float] = []
        first = clock.subscribe(ticks.append)
        clock._arm()  # nothing to change: the armed timer is kept
        clock._timer_when = loop.time() + 1.0  # pretend the armed timer is late: re-arm at a past deadline
        clock._heap[0] = (loop.time() - 0.05, clock._heap[0][1])
        clock._arm()  # call_at in the past: a plain Handle on uvloop
        second = clock.subscribe(ticks.append)  # arms again while that Handle is pending
        async with asyncio.timeout(5):
            while len(ticks) < 4:
                await asyncio.sleep(0.01)
        first.cancel()
        second.cancel()
        clock.close()
        return len(ticks)

    assert uvloop.run(scenario()) >= 4


def test_clock_on_uvloop_wakes_once_per_tick() -> None:
    """uvloop fires timers up to ~1 ms early; the clock must serve the slot, not spin until the deadline."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        clock = Clock(loop, slot_capacity=10)
        wakes = [0]

        def counting_wake() -> None:
            wakes[0] += 1
            clock._wake()

        clock._timer = make_wake_timer(loop, counting_wake)
        ticks: list[float] = []
        sub = clock.subscribe(ticks.append)
        await asyncio.sleep(0.5)
        sub.cancel()
        clock.close()
        return wakes[0], len(ticks)

    wakes, ticks = uvloop.run(scenario())
    assert ticks >= 20
    assert wakes <= ticks + 2, f"{wakes} wake-ups for {ticks} ticks: the clock spins"


@pytest.mark.parametrize("stall", [0.19, 0.25, 0.5])
def test_window_stats_count_a_stall_of_any_length(stall: float) -> None:
    # A continuous stream stalls, then sends what it owes in a burst (discord.py's AudioPlayer catches up
    # so): the first packet after the stall is late by the stall, however long it was.
    stats = window_stats()
    now, sequence = 0.0, 0
    for _ in range(50):
        stats.record(sequence, sequence * 960, 100, now)
        now, sequence = now + 0.020, sequence + 1
    burst = now - 0.020 + stall
    for index in range(round(stall / 0.020)):
        stats.record(sequence, sequence * 960, 100, burst + index * 1e-4)
        sequence += 1
    assert stats.lateness.max_ms >= (stall - 0.020) * 1000 - 1
    assert stats.lost == 0


def test_child_process_that_does_not_start_in_time_is_stopped() -> None:
    child = ChildProcess("cordvoice.bench.frames:LoopingFrames", name="frames", options={"frames": (b"x",)})
    with pytest.raises(BenchError, match="did not answer 'start'"):
        child.start(timeout=0.001)  # the spawned interpreter is still importing
    process = child._process
    assert process is None or not process.is_alive()
    with pytest.raises(BenchError, match="not running"):
        child.call("nothing")
