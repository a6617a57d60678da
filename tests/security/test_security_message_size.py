"""Gateway messages above a size limit are refused (close 1009), by the client and by the emulator.

* voice gateway, client side: frames above :data:`~cordvoice.voicegateway.connection.MAX_MESSAGE_SIZE`
  (1 MiB) from a server close the socket with 1009;
* main gateway, client side: above 64 MiB, and with zlib-stream compression a message that *inflates*
  beyond the limit (a compression bomb) too; both end that socket with 1009 and the client reconnects;
* emulator, both gateways: a client frame above 1 MiB gets 1009.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import zlib
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from cordvoice.emulator import Emulator
from cordvoice.gateway import client as gateway_client
from cordvoice.gateway import protocol as gateway_protocol
from cordvoice.gateway.client import Client
from cordvoice.voicegateway.connection import MAX_MESSAGE_SIZE, VoiceGatewayConnection

MIB = 1 << 20


def test_the_limits_are_what_the_docs_say() -> None:
    assert MAX_MESSAGE_SIZE == MIB
    assert gateway_protocol.MAX_MESSAGE_SIZE == gateway_client.MAX_MESSAGE_SIZE == 64 * MIB


async def test_client_voice_gateway_refuses_oversized_frames() -> None:
    closes: list[int | None] = []

    async def handler(ws: ServerConnection) -> None:
        await ws.send("x" * (MAX_MESSAGE_SIZE + 1))
        await ws.send('{"op":6,"d":{"t":1}}')
        try:
            await ws.wait_closed()
        finally:
            closes.append(ws.close_code)

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        conn = await VoiceGatewayConnection.open(f"127.0.0.1:{port}", ssl=False, open_timeout=5)
        async with asyncio.timeout(5):
            assert await conn.recv() is None, "the oversized frame is not delivered"
        await conn.aclose_quietly()
        async with asyncio.timeout(5):
            while not closes:
                await asyncio.sleep(0.01)
    assert closes == [1009]


def _shrink_main_gateway_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same code paths with a 256 KiB bound: the WebSocket's (shell) and the zlib stream's (core)."""
    monkeypatch.setattr(gateway_client, "MAX_MESSAGE_SIZE", 256 * 1024)
    monkeypatch.setattr(gateway_protocol, "MAX_MESSAGE_SIZE", 256 * 1024)


async def _main_gateway_close_codes(
    monkeypatch: pytest.MonkeyPatch, *, compress: bool, payload: dict[str, Any]
) -> list[int | None]:
    """A scripted main gateway: Hello, READY, then ``payload``; returns the close codes the client sent."""
    _shrink_main_gateway_limit(monkeypatch)
    closes: list[int | None] = []

    async def handler(ws: ServerConnection) -> None:
        deflate = zlib.compressobj()

        async def send(message: dict[str, Any]) -> None:
            text = json.dumps(message)
            if compress:
                await ws.send(deflate.compress(text.encode()) + deflate.flush(zlib.Z_SYNC_FLUSH))
            else:
                await ws.send(text)

        await send({"op": 10, "d": {"heartbeat_interval": 45000}})
        await ws.recv()  # Identify or Resume
        user = {"id": "1234567890", "username": "bot"}
        await send({"op": 0, "s": 1, "t": "READY", "d": {"session_id": "abc", "user": user, "guilds": []}})
        await send(payload)
        with contextlib.suppress(ConnectionClosed):
            await ws.wait_closed()
        closes.append(ws.close_code)

    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        client = Client("token", gateway_url=f"ws://127.0.0.1:{port}", compress=compress, backoff_base=0.01)
        async with client:
            async with asyncio.timeout(10):
                while len(closes) < 1:
                    await asyncio.sleep(0.01)
    return closes


async def test_client_main_gateway_refuses_oversized_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    big = {"op": 0, "s": 2, "t": "TYPING_START", "d": {"x": "y" * (300 * 1024)}}
    assert (await _main_gateway_close_codes(monkeypatch, compress=False, payload=big))[0] == 1009


async def test_client_main_gateway_refuses_a_compression_bomb(monkeypatch: pytest.MonkeyPatch) -> None:
    """2 MB of JSON deflates to a few KiB: under the frame limit, far over the message limit once inflated."""
    bomb = {"op": 0, "s": 2, "t": "TYPING_START", "d": {"x": " " * (2 * MIB)}}
    assert len(zlib.compress(json.dumps(bomb).encode())) < 16 * 1024
    assert (await _main_gateway_close_codes(monkeypatch, compress=True, payload=bomb))[0] == 1009


async def _emulator_close_code(url: str) -> int | None:
    async with connect(url, compression=None, max_size=None, open_timeout=5) as ws:
        await ws.send("{" + " " * MIB + "}")
        async with asyncio.timeout(5):
            try:
                while True:
                    await ws.recv()
            except ConnectionClosed:
                pass
        return ws.close_code


async def test_emulator_gateways_refuse_oversized_frames() -> None:
    async with Emulator(rate_limit=None) as emu:
        assert await _emulator_close_code(emu.gateway_url + "/?v=10&encoding=json") == 1009
        endpoint = emu.voice_server().endpoint
        assert await _emulator_close_code(f"ws://{endpoint}/?v=8") == 1009


def test_inflating_is_bounded_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bomb is refused without ever holding its inflated size: decompression stops past the limit."""
    import tracemalloc  # noqa: PLC0415

    from cordvoice.errors import ProtocolError  # noqa: PLC0415
    from cordvoice.gateway.protocol import GatewayProtocol  # noqa: PLC0415

    _shrink_main_gateway_limit(monkeypatch)
    deflate = zlib.compressobj()
    bomb = deflate.compress(b'{"op":0,"d":"' + b" " * (32 * MIB) + b'"}') + deflate.flush(zlib.Z_SYNC_FLUSH)
    protocol = GatewayProtocol("token", 0, compress=True)
    protocol.connection_started()
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            protocol.decode(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert protocol.stream_broken
    assert peak < 4 * MIB, f"decoding a 32 MiB bomb allocated {peak} bytes"


def test_an_unterminated_zlib_message_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames that never end the zlib-stream message (no ``00 00 ff ff``) cannot pile up past the limit."""
    from cordvoice.errors import ProtocolError  # noqa: PLC0415
    from cordvoice.gateway.protocol import GatewayProtocol  # noqa: PLC0415

    _shrink_main_gateway_limit(monkeypatch)
    protocol = GatewayProtocol("token", 0, compress=True)
    protocol.connection_started()
    fragment = bytes(range(256)) * 64  # 16 KiB, never the zlib-stream suffix
    with pytest.raises(ProtocolError):
        for _ in range(64):  # 1 MiB in all: four times the limit
            assert protocol.decode(fragment) is None
    assert protocol.stream_broken
