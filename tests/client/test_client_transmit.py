"""The transmit lane on the real shared clock: pacing, silence tail, underrun, DAVE/transport waits, queue."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from cordvoice.audio.clock import HEAVY_TICK, get_clock
from cordvoice.audio.transmit import SILENCE_FRAMES, FrameQueue, TransmitLane
from cordvoice.errors import DisconnectedError, InvalidArgumentError
from cordvoice.udp.crypto import MODE_AES256_GCM, make_cipher
from cordvoice.udp.rtp import OPUS_SILENCE
from cordvoice.udp.sender import RtpSender

from .conftest import wait_until

CIPHER = make_cipher(MODE_AES256_GCM, bytes(32))


@dataclass
class FakeDave:
    """Stands in for DaveClient: required or not, ready or not, and a visible 'encryption'."""

    dave_required: bool = True
    ready: bool = False
    fail: bool = False
    encrypted: int = 0
    failures: int = 0

    @property
    def encryptor(self) -> Callable[[bytes], bytes] | None:
        return self._encrypt if self.ready and self.dave_required else None

    def _encrypt(self, opus: bytes) -> bytes:
        if self.fail:
            raise ValueError("encryption failed")
        self.encrypted += 1
        return b"E" + opus

    def encrypt_failed(self, exc: ValueError) -> None:
        self.failures += 1


@dataclass
class Wire:
    packets: list[tuple[int, int, bytes]] = field(default_factory=list)
    speaking: list[bool] = field(default_factory=list)
    up: bool = True

    direct_send: Callable[[bytes], object] | None = None

    def send_failed(self, datagram: bytes, exc: OSError) -> bool:
        raise AssertionError("the wire has no direct send")

    def send(self, datagram: bytes) -> bool:
        if not self.up:
            return False
        header, payload = CIPHER.open_rtp(datagram)
        self.packets.append((header.sequence, header.timestamp, payload))
        return True

    def payloads(self) -> list[bytes]:
        return [p for _, _, p in self.packets]


@dataclass
class DirectWire(Wire):
    """A wire with a direct path like a connected UdpConnection's; its ``refuse_at``-th call says "busy"."""

    refuse_at: int = -1
    calls: int = 0
    direct: int = 0
    refused: int = 0

    def __post_init__(self) -> None:
        self.direct_send = self.send_directly

    def send_directly(self, datagram: bytes) -> None:
        index, self.calls = self.calls, self.calls + 1
        if index == self.refuse_at:
            raise BlockingIOError
        self.direct += 1
        Wire.send(self, datagram)

    def send_failed(self, datagram: bytes, exc: OSError) -> bool:
        assert isinstance(exc, BlockingIOError)
        self.refused += 1
        self.direct_send = None  # queued, as the connection does
        return Wire.send(self, datagram)

    def send(self, datagram: bytes) -> bool:
        self.direct_send = self.send_directly  # the queue has drained by the next send, as on a real socket
        return Wire.send(self, datagram)


def make_lane(wire: Wire, *, grace: float = 0.1) -> TransmitLane:
    return TransmitLane(get_clock(), set_speaking=wire.speaking.append, idle_grace=grace)


async def test_client_lane_sends_in_order_then_silence_then_goes_idle() -> None:
    wire, queue = Wire(), FrameQueue(3)
    lane = make_lane(wire)
    lane.set_provider(queue)
    lane.attach(RtpSender(1, CIPHER, sequence=65530, timestamp=2**32 - 1920), None, wire)
    frames = [bytes([i]) * 20 for i in range(12)]
    async with asyncio.timeout(5):
        for frame in frames:
            await queue.put(frame)
            lane.wake()
        assert len(queue) <= 3, "bounded: the writer waited"
        await lane.stop()
    assert wire.payloads() == [*frames, *([OPUS_SILENCE] * SILENCE_FRAMES)]
    sequences = [s for s, _, _ in wire.packets]
    assert sequences == [(65530 + i) & 0xFFFF for i in range(17)], "contiguous across the wrap"
    stamps = [t for _, t, _ in wire.packets]
    assert all((b - a) & 0xFFFF_FFFF == 960 for a, b in itertools.pairwise(stamps))
    assert wire.speaking == [True, False]
    assert not lane.active and get_clock().subscribers == 0
    assert lane.stats.frames_sent == 12 and lane.stats.silence_sent == 5 and lane.stats.underruns == 0
    assert lane.lateness().count >= 17


async def test_client_lane_lateness_spans_its_subscriptions() -> None:
    wire, queue = Wire(), FrameQueue(3)
    lane = make_lane(wire)
    lane.set_provider(queue)
    lane.attach(RtpSender(1, CIPHER), None, wire)
    async with asyncio.timeout(5):
        for _ in range(3):
            await queue.put(b"a" * 20)
            lane.wake()
        while lane.lateness().count < 3:
            await asyncio.sleep(0.01)
        first = lane.lateness()
        first.record(999.0)
        assert lane.lateness().max_ms < 999.0, "each call returns a histogram of its own"
        await lane.stop()
        assert not lane.active
        after_first = lane.lateness().count
        assert after_first >= 3 + SILENCE_FRAMES
        for _ in range(3):
            await queue.put(b"b" * 20)
            lane.wake()
        assert lane.active
        while lane.lateness().count < after_first + 3:
            await asyncio.sleep(0.01)
        await lane.stop()
    assert lane.lateness().count >= after_first + 3 + SILENCE_FRAMES, "the second subscription adds on"


async def test_client_lane_underrun_tail_grace_and_timestamp_gap() -> None:
    wire, queue = Wire(), FrameQueue(5)
    lane = make_lane(wire, grace=0.06)
    lane.set_provider(queue)
    lane.attach(RtpSender(1, CIPHER), None, wire)
    for frame in (b"a", b"b"):
        await queue.put(frame)
    lane.wake()
    await wait_until(lambda: not lane.active)
    assert wire.payloads() == [b"a", b"b", *([OPUS_SILENCE] * 5)]
    assert wire.speaking == [True, False] and lane.stats.underruns == 1
    last_ts = wire.packets[-1][1]
    idle_from = time.monotonic()
    await asyncio.sleep(0.5)
    await queue.put(b"c")
    idle_frames = (time.monotonic() - idle_from) / 0.020
    lane.wake()
    await lane.stop()
    sequence, timestamp, payload = wire.packets[7]
    assert payload == b"c" and sequence == wire.packets[6][0] + 1, "sequence numbers stay contiguous"
    gap_frames = ((timestamp - last_ts) & 0xFFFF_FFFF) // 960
    # The idle time once, plus the three grace ticks after the tail and the wait for the next tick.
    assert abs(gap_frames - (idle_frames + 4)) <= 4, "the timestamp follows wall time while idle, once"
    assert wire.speaking == [True, False, True, False]


async def test_client_lane_sends_directly_and_steps_aside_after_a_refusal() -> None:
    wire, queue = DirectWire(refuse_at=3), FrameQueue(8)
    lane = make_lane(wire)
    lane.set_provider(queue)
    lane.attach(RtpSender(1, CIPHER), None, wire)
    for i in range(7):
        await queue.put(bytes([i]))
    await lane.stop()
    assert wire.payloads() == [bytes([i]) for i in range(7)] + [OPUS_SILENCE] * SILENCE_FRAMES
    assert wire.refused == 1, "the refused packet went to send_failed, in its place"
    # 0-2 direct; 3 refused; 4 through send (which finds the queue drained); 5, 6 and the silence direct.
    assert wire.direct == 3 + 2 + SILENCE_FRAMES
    assert lane.stats.frames_sent == 7 and lane.stats.dropped == 0


async def test_client_lane_does_not_pull_while_dave_is_not_ready() -> None:
    wire, queue = Wire(), FrameQueue(2)
    lane = make_lane(wire)
    lane.set_provider(queue)
    dave = FakeDave()
    lane.attach(RtpSender(1, CIPHER), dave, wire)  # type: ignore[arg-type]
    writer = asyncio.ensure_future(asyncio.gather(*(queue.put(bytes([i])) for i in range(4))))
    lane.wake()
    await asyncio.sleep(0.15)
    assert len(queue) == 2 and not writer.done(), "frames wait in the queue; the writer is held"
    assert wire.packets == [] and lane.stats.dave_withheld >= 5 and lane.active
    dave.ready = True
    async with asyncio.timeout(5):
        await writer
        await lane.stop()
    assert wire.payloads()[:4] == [b"E\x00", b"E\x01", b"E\x02", b"E\x03"]
    assert dave.encrypted == 4 and lane.stats.dave_encrypted == 4 and lane.stats.dropped == 0


async def test_client_lane_silence_only_while_dave_becomes_unready_mid_stream() -> None:
    wire, queue = Wire(), FrameQueue(5)
    lane = make_lane(wire)
    lane.set_provider(queue)
    dave = FakeDave(ready=True)
    lane.attach(RtpSender(1, CIPHER), dave, wire)  # type: ignore[arg-type]
    await queue.put(b"x")
    lane.wake()
    await wait_until(lambda: wire.payloads() == [b"Ex"])
    dave.ready = False  # a recovery: the group is being rebuilt
    for frame in (b"y", b"z"):
        await queue.put(frame)
    await asyncio.sleep(0.2)
    assert wire.payloads() == [b"Ex", *([OPUS_SILENCE] * 5)], "only the silence tail, nothing in clear"
    dave.ready = True
    await lane.stop()
    assert wire.payloads()[6:8] == [b"Ey", b"Ez"]


async def test_client_lane_waits_without_transport_and_continues_numbering() -> None:
    wire, queue = Wire(), FrameQueue(5)
    lane = make_lane(wire)
    lane.set_provider(queue)
    lane.attach(RtpSender(1, CIPHER, sequence=100), None, wire)
    await queue.put(b"1")
    lane.wake()
    await wait_until(lambda: len(wire.packets) == 1)
    lane.detach()
    await queue.put(b"2")
    await asyncio.sleep(0.1)
    assert len(wire.packets) <= 6 and len(queue) == 1 and lane.stats.no_transport > 0
    continuation = lane.continuation()
    assert continuation is not None
    sequence, _ = continuation
    lane.attach(RtpSender(2, CIPHER, sequence=sequence, timestamp=continuation[1]), None, wire)
    await lane.stop()
    assert b"2" in wire.payloads()
    new_first = next(s for s, _, p in wire.packets if p == b"2")
    assert new_first == wire.packets[0][0] + 1


async def test_client_lane_counts_dropped_frames() -> None:
    wire, queue = Wire(), FrameQueue(5)
    lane = make_lane(wire)
    lane.set_provider(queue)
    dave = FakeDave(ready=True, fail=True)
    lane.attach(RtpSender(1, CIPHER), dave, wire)  # type: ignore[arg-type]
    await queue.put(b"will-fail")
    await queue.put(b"x" * 5000)  # larger than any 20 ms Opus packet
    lane.wake()
    await lane.stop()
    assert lane.stats.dropped == 2 and lane.stats.frames_sent == 0
    assert dave.failures == 1, "the failed encryption was reported to the DAVE client"
    wire.up = False
    dave.fail = False
    await queue.put(b"socket-closed")
    lane.wake()
    await lane.stop()
    assert lane.stats.dropped == 3


async def test_client_lane_close_releases_stop_waiters() -> None:
    lane = make_lane(Wire())
    queue = FrameQueue(2)
    lane.set_provider(queue)
    await queue.put(b"x")
    stopping = asyncio.ensure_future(lane.stop())  # no transport: it would wait
    await asyncio.sleep(0.05)
    assert not stopping.done()
    lane.close()
    async with asyncio.timeout(1):
        await stopping
    assert get_clock().subscribers == 0


async def test_client_frame_queue_backpressure_close_and_cancel() -> None:
    queue = FrameQueue(2)
    with pytest.raises(InvalidArgumentError):
        FrameQueue(0)
    await queue.put(b"1")
    await queue.put(b"2")
    third = asyncio.ensure_future(queue.put(b"3"))
    fourth = asyncio.ensure_future(queue.put(b"4"))
    await asyncio.sleep(0)
    assert not third.done()
    third.cancel()
    await asyncio.gather(third, return_exceptions=True)
    assert queue.pull() == b"1"
    await asyncio.sleep(0)
    assert fourth.done(), "a cancelled writer does not swallow the wake-up"
    assert [queue.pull(), queue.pull(), queue.pull()] == [b"2", b"4", None]
    empty = asyncio.ensure_future(queue.wait_empty())
    await asyncio.sleep(0)
    assert empty.done()
    await queue.put(b"5")
    await queue.put(b"6")
    blocked = asyncio.ensure_future(queue.put(b"7"))
    await asyncio.sleep(0)
    assert queue.clear() == 2
    await blocked
    assert queue.close(DisconnectedError("gone")) == 1
    with pytest.raises(DisconnectedError):
        await queue.put(b"8")


class EndlessFrames:
    def pull(self) -> bytes:
        return b"f"


async def test_client_lane_timestamps_stay_on_wall_time_when_the_clock_skips_ticks() -> None:
    """After a stall longer than the clock's catch-up, skipped ticks become a timestamp gap, not a shift."""
    wire = Wire()
    lane = make_lane(wire)
    lane.set_provider(EndlessFrames())
    lane.attach(RtpSender(1, CIPHER), None, wire)
    lane.wake()
    async with asyncio.timeout(5):
        await wait_until(lambda: len(wire.packets) >= 5)
        sent_before = len(wire.packets)
        time.sleep(0.15)  # blocking the loop on purpose: a stall of 7 periods
        await wait_until(lambda: len(wire.packets) >= sent_before + 10)
    lane.close()
    assert lane.skipped >= 3, "the clock skipped ticks (more than max_catchup behind)"
    sequences = [s for s, _, _ in wire.packets]
    assert sequences == list(range(len(sequences))), "no sequence gap: nothing was lost"
    steps = [(b - a) // 960 for (_, a, _), (_, b, _) in itertools.pairwise(wire.packets)]
    assert sum(steps) - (len(steps)) == lane.skipped, "every skipped tick advanced the timestamp once"
    assert max(steps) == 1 + lane.skipped


async def test_client_lane_subscribes_with_its_providers_tick_weight() -> None:
    class HeavyFrames(EndlessFrames):
        tick_weight = HEAVY_TICK

    clock = get_clock()
    lanes = [make_lane(Wire()) for _ in range(2)]
    lanes[0].set_provider(EndlessFrames())
    lanes[1].set_provider(HeavyFrames())
    for lane in lanes:
        lane.attach(RtpSender(1, CIPHER), None, Wire())
        lane.wake()
    assert sum(clock.slot_loads()) == 1 + HEAVY_TICK
    for lane in lanes:
        lane.close()
    assert sum(clock.slot_loads()) == 0


async def test_client_lane_turns_speaking_off_when_its_provider_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class BreaksOnTenth:
        pulls = 0

        def pull(self) -> bytes | None:
            self.pulls += 1
            if self.pulls == 10:
                raise RuntimeError("provider bug")
            return b"x"

    wire = Wire()
    lane = make_lane(wire)
    lane.set_provider(BreaksOnTenth())
    lane.attach(RtpSender(1, CIPHER), None, wire)
    lane.wake()
    await wait_until(lambda: not lane.active)
    assert wire.payloads() == [b"x"] * 9 and lane.stats.dropped == 1
    assert wire.speaking == [True, False], "the talk spurt ends; speaking is not left on"
    assert "the transmit lane stopped after an error" in caplog.text
    queue = FrameQueue(2)
    lane.set_provider(queue)
    await queue.put(b"y")
    await lane.stop()
    assert wire.payloads()[9] == b"y" and wire.speaking == [True, False, True, False], "restartable"
