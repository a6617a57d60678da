"""Every buffer a peer can fill has a bound: unknown SSRCs, jitter buffers, DAVE key holds, replay buffers,
queues. Each test floods one buffer far past its bound and checks that it stays within it, and that what
did not fit was counted.
"""

from __future__ import annotations

import asyncio
import random
import socket

import pytest

from cordvoice.audio.jitter import JitterBuffer
from cordvoice.audio.receive_pipeline import ReceivePipeline
from cordvoice.audio.receiver import Receiver
from cordvoice.audio.transmit import FrameQueue
from cordvoice.emulator import Emulator, VoiceServerConfig
from cordvoice.emulator.main_gateway_protocol import GatewaySession
from cordvoice.errors import DaveKeyPendingError
from cordvoice.udp.connection import MAX_TRACKED_SSRCS, UdpConnection
from cordvoice.udp.crypto import MODE_AES256_GCM, make_cipher
from cordvoice.udp.rtp import build_header, parse_rtp

FLOOD = 5_000


def _header(sequence: int, ssrc: int):  # type: ignore[no-untyped-def]
    return parse_rtp(build_header(sequence & 0xFFFF, (sequence * 960) & 0xFFFF_FFFF, ssrc))


# ---- unknown SSRCs -----------------------------------------------------------------------------------------


async def test_udp_per_ssrc_counts_are_bounded() -> None:
    """Authenticated packets from thousands of SSRCs: per-SSRC counting stops at MAX_TRACKED_SSRCS."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    udp = await UdpConnection.open(*server.getsockname())
    try:
        cipher = make_cipher(MODE_AES256_GCM, bytes(32))
        udp.cipher = cipher
        local = udp.local_address
        assert local is not None
        ssrcs = random.Random(1).sample(range(1, 2**32), 3 * MAX_TRACKED_SSRCS)
        for index, ssrc in enumerate(ssrcs):
            server.sendto(cipher.seal(build_header(index, index * 960, ssrc), b"\xfc", index), local)
            if index % 64 == 63:
                await asyncio.sleep(0.005)  # let the loop drain the socket
        async with asyncio.timeout(5):
            while udp.stats.rtp < len(ssrcs):
                await asyncio.sleep(0.005)
        assert len(udp.stats.per_ssrc) == MAX_TRACKED_SSRCS
        assert udp.stats.untracked_ssrcs == len(ssrcs) - MAX_TRACKED_SSRCS
    finally:
        udp.close()
        server.close()


def test_receive_pipeline_holds_unknown_ssrcs_within_bounds() -> None:
    pipeline = ReceivePipeline(None, unknown_per_ssrc=100, unknown_max_ssrcs=32)
    for index in range(FLOOD * 4):
        ssrc = 1000 + index % 200  # 200 SSRCs nobody named
        pipeline.feed(_header(index // 200, ssrc), b"\xfc\x00", 1.0 + index * 1e-5)
        assert pipeline.buffered <= 32 * 100
    counters = pipeline.counters
    assert counters.unknown_ssrc_dropped > 0
    assert counters.unknown_ssrc_held == FLOOD * 4
    assert counters.unknown_ssrc_held - counters.unknown_ssrc_dropped == pipeline.buffered


def test_receive_pipeline_holds_one_flooding_unknown_ssrc_within_bounds() -> None:
    """One SSRC nobody named, flooding: its queue keeps the newest ``unknown_per_ssrc`` packets only."""
    pipeline = ReceivePipeline(None, unknown_per_ssrc=100, unknown_max_ssrcs=32)
    for index in range(FLOOD):
        pipeline.feed(_header(index, 4242), b"\xfc\x00", 1.0 + index * 1e-5)
        assert pipeline.buffered <= 100
    assert pipeline.buffered == 100
    assert pipeline.counters.unknown_ssrc_dropped == FLOOD - 100


# ---- jitter buffers and key holds --------------------------------------------------------------------------


def test_jitter_buffer_never_exceeds_max_packets() -> None:
    jitter = JitterBuffer(delay=0.06, max_packets=50)
    rng = random.Random(2)
    for index in range(FLOOD):
        sequence = index + rng.randrange(-20, 20)  # reordered, never played out
        jitter.push(sequence, sequence * 960, 1.0, b"\xfc")
        assert len(jitter) <= 50
    assert jitter.stats.overflow > 0


def test_receive_pipeline_jitter_buffers_are_bounded() -> None:
    pipeline = ReceivePipeline(None, jitter_max_packets=120)
    pipeline.map_ssrc(77, 1)
    for index in range(FLOOD):
        pipeline.feed(_header(index, 77), b"\xfc\x00", 1.0)  # a burst that never plays out
        assert pipeline.buffered <= 120
    assert pipeline.stats(1).dropped > 0


def test_dave_key_holds_are_bounded() -> None:
    """Frames waiting for a DAVE key that never comes: at most ``key_hold_max`` wait per stream."""

    def pending(user_id: int, frame: bytes) -> bytes:
        raise DaveKeyPendingError("no key yet", reason="no_key")

    pipeline = ReceivePipeline(pending, key_hold_max=64, key_hold=60.0)
    pipeline.map_ssrc(77, 1)
    for index in range(FLOOD):
        pipeline.feed(_header(index, 77), b"\xfc\x00" + bytes(20) + b"\xfa\xfa", 1.0 + index * 0.02)
        assert pipeline.buffered <= 64 + 1
    assert pipeline.stats(1).undecryptable > 0


# ---- queues ------------------------------------------------------------------------------------------------


async def test_a_slow_listener_loses_its_oldest_frames_not_memory() -> None:
    receiver = Receiver(None)
    try:
        stream = receiver.listen(maxsize=10)
        receiver.on_speaking(5, 77, 1)
        for index in range(300):
            receiver.feed(_header(index, 77), b"\xfc\x00")
            if index % 5 == 4:
                await asyncio.sleep(0.02)  # the playout clock ticks; nobody reads the stream
        async with asyncio.timeout(5):
            while stream.dropped == 0:
                await asyncio.sleep(0.02)
        assert len(stream) <= 10
        assert stream.delivered == len(stream) + stream.dropped
    finally:
        await receiver.close()


async def test_write_waits_instead_of_buffering() -> None:
    queue = FrameQueue(5)
    for _ in range(5):
        await queue.put(b"\xfc")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await queue.put(b"\xfc")
    assert len(queue) == 5


# ---- replay buffers ----------------------------------------------------------------------------------------


def test_main_gateway_replay_buffer_is_bounded() -> None:
    session = GatewaySession("s", 1, 0, (0, 1), replay_limit=10)
    for index in range(FLOOD):
        session.dispatch("TYPING_START", {"n": index})
    kept = session.missed_since(FLOOD - 10)
    assert kept is not None and len(kept) == 10
    assert session.missed_since(FLOOD - 11) is None, "older dispatches were evicted: a resume gets op 9"


async def test_voice_gateway_replay_buffer_is_bounded() -> None:
    """v8 buffered resume keeps the last ``replay_limit`` numbered messages per voice session, no more."""
    async with Emulator(rate_limit=None, voice_config=VoiceServerConfig(replay_limit=16)) as emu:
        guild = emu.create_guild("g")
        channel = emu.create_voice_channel(guild.id, "General")
        stayer = await emu.add_participant(channel.id, name="stayer")
        for index in range(6):  # each visit sends the stayer op 11, op 5, op 13 and DAVE messages
            visitor = await emu.add_participant(channel.id, name=f"visitor-{index}")
            await visitor.wait_dave_ready(10)
            await visitor.leave()
        record = emu.voice_server().core.live_record(stayer.user_id)
        assert record is not None
        assert record.sent_total > 16
        kept = record.missed_since(record.seq - 16)
        assert kept is not None and len(kept) == 16
        assert record.missed_since(record.seq - 17) is None
