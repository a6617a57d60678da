"""UDP datagrams from any address but the voice server are ignored and counted.

cordvoice connects its UDP socket to the voice server, so the kernel already discards datagrams from anyone
else (checked last). The receive path checks the source address too, and counts what it drops
(``UdpStats.foreign``, ``SessionStats.udp_foreign``): that is what protects a socket a ``dial`` hook hands
over and that does not connect. Such a socket is used here (a real UDP socket whose ``connect`` does
nothing), so datagrams from a third socket really arrive, including a packet sealed with the session's own
transport key: it must be dropped unread, while the voice server's own traffic flows.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from cordvoice import SessionState, Voice
from cordvoice.emulator import Emulator
from cordvoice.gateway import Client
from cordvoice.udp import discovery
from cordvoice.udp.connection import UdpConnection
from cordvoice.udp.crypto import MODE_AES256_GCM, make_cipher
from cordvoice.udp.rtp import build_header


class UnconnectableSocket(socket.socket):
    """A UDP socket that stays unconnected whatever it is asked (as some dial hooks' sockets do)."""

    def connect(self, address: Any) -> None:
        self.asked_to_connect = address


async def unconnectable_dial(host: str, port: int) -> socket.socket:
    sock = UnconnectableSocket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    DIALED.append(sock)
    return sock


DIALED: list[UnconnectableSocket] = []


def _udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


async def _wait(predicate: Any, within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_foreign_datagrams_are_dropped_and_counted_on_an_unconnected_socket() -> None:
    loop = asyncio.get_running_loop()
    server, stranger = _udp(), _udp()
    server_host, server_port = server.getsockname()
    DIALED.clear()
    udp = await UdpConnection.open(server_host, server_port, dial=unconnectable_dial)
    hooked: list[bytes] = []
    udp.receive_hook = lambda header, payload, arrival: hooked.append(payload)
    try:
        sock = DIALED[0]
        local = sock.getsockname()
        assert sock.asked_to_connect == (server_host, server_port)
        try:
            sock.getpeername()
            raise AssertionError("the socket must stay unconnected for this test")
        except OSError:
            pass
        # IP discovery works over sendto; the answer comes from the server's address.
        discovering = asyncio.ensure_future(udp.discover(77, give_up_after=5.0))
        request, client_addr = await loop.sock_recvfrom(server, 2048)
        assert discovery.parse_request(request) == 77 and client_addr == local
        server.sendto(discovery.build_response(77, "127.0.0.1", local[1]), local)
        assert (await discovering).ssrc == 77

        key = bytes(range(32))
        cipher = make_cipher(MODE_AES256_GCM, key)
        udp.cipher = cipher
        sealed = cipher.seal(build_header(1, 960, 4242), b"\xfc\x01from-the-server", 1)
        forged = cipher.seal(build_header(2, 1920, 4242), b"\xfc\x02from-a-stranger", 2)
        before = udp.stats.received
        stranger.sendto(forged, local)  # correctly sealed, wrong source
        stranger.sendto(b"\x00" * 40, local)
        stranger.sendto(discovery.build_response(77, "6.6.6.6", 6666), local)
        server.sendto(sealed, local)
        await _wait(lambda: udp.stats.received >= before + 4)
        stats = udp.stats
        assert stats.foreign == 3
        assert stats.rtp == 1 and hooked == [b"\xfc\x01from-the-server"]
        assert stats.malformed == 0 and stats.undecryptable == 0 and stats.discovery == 1
        assert stats.received == stats.rtp + stats.rtcp + stats.dropped + stats.discovery
        # Sending still goes to the server (sendto on the unconnected socket).
        assert udp.send(b"keepalive")
        data, _ = await loop.sock_recvfrom(server, 2048)
        assert data == b"keepalive"
    finally:
        udp.close()
        server.close()
        stranger.close()


async def test_a_session_on_an_unconnected_socket_ignores_strangers() -> None:
    DIALED.clear()
    stranger = _udp()
    async with Emulator(rate_limit=None) as emu:
        bot = emu.create_bot("udp-bot")
        guild = emu.create_guild("g", members=[bot.user_id])
        channel = emu.create_voice_channel(guild.id, "General")
        listener = await emu.add_participant(channel.id, name="listener")
        speaker = await emu.add_participant(channel.id, name="speaker")
        async with Client(
            bot.token, gateway_url=emu.gateway_url, api_base=emu.api_base, send_limit=None
        ) as client:
            voice = Voice(client, ssl=False, dial=unconnectable_dial, join_timeout=10.0)
            try:
                session = await voice.join_channel(guild.id, channel.id)
                await _wait(lambda: session.dave_ready and speaker.dave_ready and listener.dave_ready, 10)
                local = DIALED[-1].getsockname()
                # A packet sealed with the bot's own transport key (the server's copy), from a stranger.
                endpoint = emu.voice_server().media_endpoint(bot.user_id)
                forged = endpoint.seal(build_header(9, 960 * 9, speaker.ssrc), b"\xf8\xff\xfe")
                for _ in range(20):
                    stranger.sendto(forged, local)
                    stranger.sendto(b"\x80\x78" + bytes(30), local)
                await _wait(lambda: session.stats.udp_foreign >= 40)
                received_before = session.stats.received_per_ssrc.get(speaker.ssrc, 0)
                await speaker.play([b"\xfc" + bytes(40)] * 10)
                await _wait(
                    lambda: session.stats.received_per_ssrc.get(speaker.ssrc, 0) >= received_before + 15
                )
                for index in range(10):
                    await session.write(bytes([0xFC, index]) + bytes(50))
                await session.stop_speaking()
                await _wait(lambda: len(listener.frames_from(bot.user_id)) >= 15)
                stats = session.stats
                assert stats.udp_foreign == 40 and stats.udp_malformed == 0 and stats.udp_undecryptable == 0
                assert session.state is SessionState.READY
            finally:
                await voice.close()
    stranger.close()


async def test_the_kernel_already_drops_strangers_on_a_connected_socket() -> None:
    server, stranger = _udp(), _udp()
    udp = await UdpConnection.open(*server.getsockname())
    try:
        local = udp.local_address
        assert local is not None
        stranger.sendto(b"\x80\x78" + bytes(40), local)
        server.sendto(b"\x80\xc9" + bytes(40), local)  # RTCP from the server: counted
        await _wait(lambda: udp.stats.received >= 1)
        await asyncio.sleep(0.05)
        assert udp.stats.received == 1 and udp.stats.rtcp == 1 and udp.stats.foreign == 0
    finally:
        udp.close()
        server.close()
        stranger.close()
