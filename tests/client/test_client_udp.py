"""The session's UDP socket: connected, no receive-size trap, discovery, keepalives, hostile datagrams."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from cordvoice.errors import VoiceError
from cordvoice.session import SessionStats
from cordvoice.udp import connection as udp_connection
from cordvoice.udp import discovery
from cordvoice.udp.connection import UdpConnection, UdpStats
from cordvoice.udp.crypto import MODE_XCHACHA20_POLY1305, make_cipher
from cordvoice.udp.rtp import build_header

from .conftest import wait_until


class Peer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.transport: asyncio.DatagramTransport | None = None
        self.answer_discovery = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append((data, addr))
        if self.answer_discovery and len(data) == 74 and data[:2] == b"\x00\x01":
            assert self.transport is not None
            self.transport.sendto(
                discovery.build_response(discovery.parse_request(data), "203.0.113.7", 50000), addr
            )

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)


@pytest.fixture
async def peer() -> AsyncIterator[tuple[Peer, int]]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    try:
        yield protocol, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


async def test_client_udp_connected_socket_and_small_receive_size(peer: tuple[Peer, int]) -> None:
    _, port = peer
    udp = await UdpConnection.open("127.0.0.1", port)
    try:
        transport = udp._transport
        assert transport is not None
        assert transport.get_extra_info("peername") == ("127.0.0.1", port), "connected (remote_addr)"
        if hasattr(transport, "max_size"):
            assert transport.max_size == 4096, "not asyncio's 256 KiB per datagram"
        result = await udp.discover(1234)
        assert (result.ssrc, result.address, result.port) == (1234, "203.0.113.7", 50000)
        assert udp.stats.discovery == 1
    finally:
        udp.close()


async def test_client_udp_discovery_times_out_clearly(peer: tuple[Peer, int]) -> None:
    server, port = peer
    server.answer_discovery = False
    udp = await UdpConnection.open("127.0.0.1", port)
    try:
        with pytest.raises(VoiceError, match="did not answer IP discovery"):
            await udp.discover(1, give_up_after=0.35, retry_interval=0.1)
        requests = [d for d, _ in server.received if len(d) == 74]
        assert 3 <= len(requests) <= 5, "re-sent every retry_interval"
    finally:
        udp.close()


async def test_client_udp_keepalive(monkeypatch: pytest.MonkeyPatch, peer: tuple[Peer, int]) -> None:
    monkeypatch.setattr(udp_connection, "KEEPALIVE_INTERVAL", 0.03)
    server, port = peer
    udp = await UdpConnection.open("127.0.0.1", port)
    try:
        await wait_until(lambda: sum(len(d) == 8 for d, _ in server.received) >= 3)
        keepalives = [d for d, _ in server.received if len(d) == 8]
        assert udp.stats.keepalives >= 3
        assert [struct.unpack("<I4x", d)[0] for d in keepalives[:3]] == [1, 2, 3]
    finally:
        udp.close()
    count = udp.stats.keepalives
    await asyncio.sleep(0.1)
    assert udp.stats.keepalives == count, "the keepalive stops with the socket"


async def test_client_udp_receive_path_classifies_every_datagram(peer: tuple[Peer, int]) -> None:
    server, port = peer
    udp = await UdpConnection.open("127.0.0.1", port)
    hooked: list[tuple[int, bytes]] = []
    local = udp.local_address
    assert local is not None
    try:
        rtp = build_header(7, 960, 55) + b"payload-before-key" + bytes(20)
        server.send(rtp, local)  # before Session Description: no key yet
        await wait_until(lambda: udp.stats.before_key == 1)
        cipher = make_cipher(MODE_XCHACHA20_POLY1305, bytes(range(32)))
        udp.cipher = cipher

        def hook(header: object, payload: bytes, arrival: float) -> None:
            hooked.append((header.ssrc, payload))  # type: ignore[attr-defined]
            if payload == b"boom":
                raise RuntimeError("a broken hook")

        udp.receive_hook = hook
        good = cipher.seal(build_header(1, 0, 55), b"opus!", 0)
        boom = cipher.seal(build_header(2, 960, 55), b"boom", 1)
        other_key = make_cipher(MODE_XCHACHA20_POLY1305, bytes(32)).seal(build_header(3, 0, 55), b"x", 0)
        for datagram in (
            good,
            boom,
            other_key,
            b"",
            b"\x01",
            b"\x81\xc9" + bytes(30),  # RTCP receiver report
            b"\x80\x78" + bytes(10),  # truncated RTP
            b"\x40\x78" + bytes(40),  # RTP version 1
            b"\x00\x02\x00\x46" + b"\xff" * 70,  # discovery-shaped garbage
            bytes(range(256)) * 6,
        ):
            server.send(datagram, local)
        await wait_until(lambda: udp.stats.received >= 10)
        stats = udp.stats
        assert hooked == [(55, b"opus!"), (55, b"boom")]
        assert stats.rtp == 2 and stats.per_ssrc == {55: 2} and stats.hook_errors == 1
        assert stats.undecryptable == 1 and stats.rtcp == 1
        assert stats.malformed >= 3
        assert stats.received == stats.rtp + stats.rtcp + stats.dropped + stats.discovery
    finally:
        udp.close()


async def test_client_udp_dial_hook(peer: tuple[Peer, int]) -> None:
    _, port = peer
    made: list[socket.socket] = []

    async def dial(host: str, remote_port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        made.append(sock)
        return sock

    udp = await UdpConnection.open("127.0.0.1", port, dial=dial)
    try:
        assert len(made) == 1 and udp.local_address == made[0].getsockname()
        assert made[0].getpeername() == ("127.0.0.1", port), "connected for us"
        assert (await udp.discover(9)).ssrc == 9
    finally:
        udp.close()

    async def bad_dial(host: str, remote_port: int) -> socket.socket:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    with pytest.raises(VoiceError):
        await UdpConnection.open("127.0.0.1", port, dial=bad_dial)


def test_session_stats_carry_every_udp_counter() -> None:
    # SessionStats promises nothing is dropped without a count there: each socket counter is a udp_ field.
    session_fields = {field.name for field in dataclasses.fields(SessionStats)}
    udp_counters = {field.name for field in dataclasses.fields(UdpStats)} - {"per_ssrc"}
    assert {f"udp_{name}" for name in udp_counters} <= session_fields


async def test_client_udp_open_cancelled_midway_is_quiet(
    peer: tuple[Peer, int], caplog: pytest.LogCaptureFixture
) -> None:
    # A leave during a join cancels the open; its half-made transport closing is not an "unexpected" loss.
    _, port = peer
    caplog.set_level("WARNING", logger="cordvoice.udp.connection")

    async def dial(host: str, remote_port: int) -> socket.socket:  # no resolver thread: cancel at each step
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    for yields in range(4):
        opening = asyncio.ensure_future(UdpConnection.open("127.0.0.1", port, dial=dial))
        for _ in range(yields):
            await asyncio.sleep(0)
        opening.cancel()
        try:
            udp = await opening
        except asyncio.CancelledError:
            continue
        udp.close()
    for _ in range(5):
        await asyncio.sleep(0)
    assert "closed unexpectedly" not in caplog.text


@pytest.mark.parametrize("host", ["a..b", "x" * 64 + ".example"])
async def test_client_udp_open_a_host_name_idna_refuses_is_a_voice_error(host: str) -> None:
    """The name fails its IDNA encoding before any lookup: a UnicodeError escaped the project's errors."""
    with pytest.raises(VoiceError, match="could not open a UDP socket"):
        await UdpConnection.open(host, 9)
