"""A scripted raw voice server and a fake main-gateway adapter, for tests that need exact server behaviour.

:class:`RawVoiceServer` speaks just enough of the voice gateway (Hello, Ready, IP discovery, Session
Description with DAVE version 0) to bring a cordvoice session up, then hands the socket to a test's script,
which can send anything at all. :class:`FakeAdapter` answers cordvoice's op 4 with a VOICE_STATE_UPDATE and a
VOICE_SERVER_UPDATE pointing at it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from cordvoice.gateway.adapter import VoiceEventListener
from cordvoice.gateway.events import VoiceServerUpdate, VoiceStateUpdate
from cordvoice.udp import discovery
from cordvoice.udp.crypto import MODE_AES256_GCM, TransportCipher, make_cipher

Script = Callable[["RawConnection"], Awaitable[None]]


def close_first(count: int, code: int, reason: str) -> Script:
    """A script that closes each of the first ``count`` connections with ``code`` after the handshake and
    keeps every later one open."""

    async def script(conn: RawConnection) -> None:
        if len(conn.server.connections) <= count:
            await conn.ws.close(code, reason)
            return
        while True:  # the connection lives as long as the handler
            await conn.recv_json(within=3600)

    return script


@dataclass
class RawConnection:
    """One client socket on the raw server, after (or instead of) the handshake."""

    server: RawVoiceServer
    ws: ServerConnection
    received: list[Any] = field(default_factory=list)
    seq: int = 0
    ssrc: int = 0
    client_address: tuple[str, int] | None = None
    cipher: TransportCipher | None = None
    key: bytes = b""

    async def send(self, op: int, d: Any, *, numbered: bool = True) -> None:
        payload: dict[str, Any] = {"op": op, "d": d}
        if numbered:
            self.seq += 1
            payload["seq"] = self.seq
        await self.ws.send(json.dumps(payload))

    async def send_binary(self, op: int, body: bytes) -> None:
        self.seq = (self.seq + 1) & 0xFFFF
        await self.ws.send(self.seq.to_bytes(2, "big") + bytes((op,)) + body)

    async def recv_json(self, within: float = 5.0) -> dict[str, Any]:
        """The next text frame from the client that is not a heartbeat (heartbeats are answered)."""
        async with asyncio.timeout(within):
            while True:
                frame = await self.ws.recv()
                if isinstance(frame, bytes):
                    self.received.append(frame)
                    continue
                message = json.loads(frame)
                self.received.append(message)
                if message.get("op") == 3:
                    if self.server.ack_heartbeats:
                        await self.send(6, {"t": message["d"]["t"]}, numbered=False)
                    continue
                return message

    def udp_send(self, datagram: bytes) -> None:
        assert self.client_address is not None
        self.server.udp_send(datagram, self.client_address)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: RawVoiceServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.server.datagrams.append((data, addr))
        if len(data) == discovery.PACKET_SIZE and data[:2] == b"\x00\x01":
            self.server.discovery_requests += 1
            if self.server.discovery_requests <= self.server.ignore_discovery:
                return
            ssrc = discovery.parse_request(data)
            self.server.udp_send(discovery.build_response(ssrc, addr[0], addr[1]), addr)


class RawVoiceServer:
    """A voice gateway + UDP socket on loopback that runs a test's script on each connection."""

    def __init__(
        self, script: Script | None = None, *, handshake: bool = True, dave_version: int = 0
    ) -> None:
        self.script = script
        self.handshake = handshake
        self.dave_version = dave_version
        self.ack_heartbeats = True
        self.ignore_discovery = 0
        """Ignore this many IP discovery requests (UDP loss)."""
        self.discovery_requests = 0
        self.connections: list[RawConnection] = []
        self.close_codes: list[int | None] = []
        self.datagrams: list[tuple[bytes, tuple[str, int]]] = []
        self._ws_server: Server | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    @property
    def endpoint(self) -> str:
        assert self._ws_server is not None
        return f"127.0.0.1:{self._ws_server.sockets[0].getsockname()[1]}"

    @property
    def udp_port(self) -> int:
        assert self._udp is not None
        return int(self._udp.get_extra_info("sockname")[1])

    async def __aenter__(self) -> RawVoiceServer:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=("127.0.0.1", 0))
        self._udp = transport
        self._ws_server = await serve(self._handle, "127.0.0.1", 0, compression=None, ping_interval=None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._ws_server is not None
        self._ws_server.close()
        await self._ws_server.wait_closed()
        if self._udp is not None:
            self._udp.close()

    def udp_send(self, datagram: bytes, address: tuple[str, int]) -> None:
        assert self._udp is not None
        self._udp.sendto(datagram, address)

    async def _handle(self, ws: ServerConnection) -> None:
        conn = RawConnection(self, ws)
        self.connections.append(conn)
        try:
            if self.handshake:
                await self._handshake(conn)
            if self.script is not None:
                await self.script(conn)
            else:
                while True:
                    await conn.recv_json(within=3600)
        except (ConnectionClosed, TimeoutError):
            pass
        finally:
            received = ws.protocol.close_rcvd
            self.close_codes.append(None if received is None else received.code)

    async def _handshake(self, conn: RawConnection) -> None:
        await conn.send(8, {"heartbeat_interval": 5000, "v": 8}, numbered=False)
        first = await conn.recv_json()
        if first["op"] == 7:  # Resume: accept it
            await conn.send(9, None, numbered=False)
            return
        assert first["op"] == 0, first
        conn.ssrc = 4242
        await conn.send(
            2, {"ssrc": conn.ssrc, "ip": "127.0.0.1", "port": self.udp_port, "modes": [MODE_AES256_GCM]}
        )
        select = await conn.recv_json()
        assert select["op"] == 1, select
        data = select["d"]["data"]
        conn.client_address = (data["address"], data["port"])
        conn.key = secrets.token_bytes(32)
        conn.cipher = make_cipher(data["mode"], conn.key)
        await conn.send(
            4,
            {"mode": data["mode"], "secret_key": list(conn.key), "dave_protocol_version": self.dave_version},
        )


class FakeAdapter:
    """Answers op 4 like Discord would, pointing every join at ``endpoint`` with a fresh token."""

    def __init__(self, endpoint: str, *, user_id: int = 4242, answer: bool = True) -> None:
        self.endpoint: str | None = endpoint
        self._user_id = user_id
        self.answer = answer
        self.requests: list[tuple[int, int | None]] = []
        self.listener: VoiceEventListener | None = None
        self.session_id = secrets.token_hex(8)

    @property
    def user_id(self) -> int:
        return self._user_id

    def set_listener(self, listener: VoiceEventListener | None) -> None:
        self.listener = listener

    async def update_voice_state(
        self, guild_id: int, channel_id: int | None, *, self_mute: bool = False, self_deaf: bool = False
    ) -> None:
        self.requests.append((guild_id, channel_id))
        if not self.answer:
            return
        loop = asyncio.get_running_loop()
        loop.call_soon(self._answer, guild_id, channel_id)

    def _answer(self, guild_id: int, channel_id: int | None) -> None:
        listener = self.listener
        if listener is None:
            return
        listener.on_voice_state_update(
            VoiceStateUpdate(
                guild_id=guild_id, channel_id=channel_id, user_id=self._user_id, session_id=self.session_id
            )
        )
        if channel_id is not None:
            self.announce_server(guild_id)

    def announce_server(self, guild_id: int, endpoint: str | None = "same") -> None:
        listener = self.listener
        assert listener is not None
        target = self.endpoint if endpoint == "same" else endpoint
        listener.on_voice_server_update(
            VoiceServerUpdate(guild_id=guild_id, token=secrets.token_hex(8), endpoint=target)
        )
