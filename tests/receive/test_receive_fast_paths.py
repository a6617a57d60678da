"""The receive path's shortcuts give the same results as the general code they bypass.

The per-packet path has inline fast paths (plain RTP headers in ``open_rtp``, in-order packets in the jitter
buffer, whole-tick delivery to consumers) and the UDP layer reads every queued datagram per wake-up; each
test checks one of them against the general path or against what a consumer must observe.
"""

from __future__ import annotations

import asyncio
import random
import socket

import pytest

from cordvoice.audio.jitter import FrameKind, JitterBuffer
from cordvoice.audio.receiver import BoundedStream
from cordvoice.errors import DecryptionError
from cordvoice.udp.connection import UdpConnection
from cordvoice.udp.crypto import MODE_AES256_GCM, MODE_XCHACHA20_POLY1305, make_cipher
from cordvoice.udp.rtp import RtpHeader, build_header, parse_rtp


@pytest.mark.parametrize("mode", [MODE_AES256_GCM, MODE_XCHACHA20_POLY1305])
def test_open_rtp_plain_header_matches_the_general_parser(mode: str) -> None:
    rng = random.Random(7)
    cipher = make_cipher(mode, bytes(range(32)))
    for index in range(300):
        header = bytearray(build_header(rng.getrandbits(16), rng.getrandbits(32), rng.getrandbits(32)))
        header[1] = rng.choice((0x78, 0xF8, 0x00, 0x7F, 0xFF))  # marker on and off, other payload types
        payload = rng.randbytes(rng.choice((1, 3, 120)))
        packet = cipher.seal(bytes(header), payload, index)
        opened, plain = cipher.open_rtp(packet)
        assert type(opened) is RtpHeader
        assert opened == parse_rtp(packet)
        assert plain == payload
    tampered = bytearray(cipher.seal(build_header(1, 2, 3), b"\xfc\x00\x01", 999))
    tampered[-5] ^= 1
    with pytest.raises(DecryptionError):
        cipher.open_rtp(bytes(tampered))


def test_jitter_in_order_fast_path_matches_reordered_delivery() -> None:
    """In-order packets (the inline path) play like the same packets pairwise swapped (the general path)."""
    count = 60
    in_order = JitterBuffer(max_packets=500)
    swapped = JitterBuffer(max_packets=500)
    arrivals = [(index, 0.020 * index) for index in range(count)]
    for index, arrival in arrivals:
        in_order.push(index, 960 * index, arrival, bytes([index]))
    order = list(range(count))
    for pair in range(1, count - 1, 2):
        order[pair], order[pair + 1] = order[pair + 1], order[pair]
    for index in order:
        swapped.push(index, 960 * index, 0.020 * index, bytes([index]))
    first, second = in_order.drain(), swapped.drain()
    assert [f.payload for f in first] == [bytes([i]) for i in range(count)]
    assert [f[:3] + f[4:6] for f in first] == [f[:3] + f[4:6] for f in second]
    assert [f.playout_time for f in first] == pytest.approx([f.playout_time for f in second])
    assert all(f.kind is FrameKind.AUDIO for f in first)
    assert in_order.stats.accepted == swapped.stats.accepted == count
    assert swapped.stats.reordered > 0 and in_order.stats.reordered == 0


def test_bounded_stream_put_all_equals_one_by_one() -> None:
    one: BoundedStream[int] = BoundedStream(5)
    batch: BoundedStream[int] = BoundedStream(5)
    for chunk in ([1, 2], [3, 4, 5, 6, 7], [8], list(range(9, 21))):
        for item in chunk:
            one._put(item)
        batch._put_all(chunk)
        assert list(batch._queue) == list(one._queue)
        assert (batch.dropped, batch.delivered) == (one.dropped, one.delivered)
    assert list(batch._queue) == [16, 17, 18, 19, 20]
    assert batch.dropped == 15


async def test_udp_reads_every_queued_datagram_in_one_wake_up() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    host, port = server.getsockname()
    udp = await UdpConnection.open(host, port)
    try:
        if not udp._drains:
            pytest.skip("this event loop batches datagram reads itself (uvloop)")
        cipher = make_cipher(MODE_AES256_GCM, bytes(32))
        udp.cipher = cipher
        arrivals: list[tuple[int, float]] = []
        udp.receive_hook = lambda header, payload, arrival: arrivals.append((header.sequence, arrival))
        local = udp.local_address
        assert local is not None
        count = 40
        # Queue them all before the loop looks at the socket: one wake-up must take them all, in order.
        for sequence in range(count):
            packet = cipher.seal(build_header(sequence, 960 * sequence, 42), b"\xfc\x01\x02", sequence)
            server.sendto(packet, local)
        server.sendto(b"\x81\xc9" + bytes(30), local)  # an RTCP packet in the middle of the batch is counted
        server.sendto(cipher.seal(build_header(count, 960 * count, 42), b"\xfc\x01\x02", count), local)
        async with asyncio.timeout(5):
            while len(arrivals) < count + 1:
                await asyncio.sleep(0.001)
        assert [sequence for sequence, _ in arrivals] == list(range(count + 1))
        assert len({arrival for _, arrival in arrivals}) == 1  # one read batch, one arrival time
        assert udp.stats.rtp == count + 1 and udp.stats.rtcp == 1
        assert udp.stats.received == count + 2
    finally:
        udp.close()
        server.close()
