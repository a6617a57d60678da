"""A quiet voice member: it joins a channel over the real protocol, completes the DAVE group, and never
reads media.

A DAVE channel needs a second member before its group forms, so every channel of a send benchmark gets one.
:class:`~cordvoice.emulator.participant.Participant` would do, but it reads, decrypts and keeps every frame
it hears, which at a thousand channels is more work than the emulator's SFU itself. This member uses the
client's own sans-IO voice gateway core (:class:`~cordvoice.voicegateway.protocol.VoiceGatewayProtocol`,
DAVE included) with the thinnest shell: one WebSocket, heartbeats, and a UDP socket that is read only for
IP discovery. Afterwards its receive buffer is left to fill and the kernel drops what the SFU forwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from cordvoice.emulator.state import VoiceSession
from cordvoice.errors import EmulatorError
from cordvoice.udp import discovery
from cordvoice.voicegateway.protocol import (
    Credentials,
    DaveEpoch,
    HelloReceived,
    ReadyReceived,
    Send,
    SessionDescribed,
    VoiceGatewayProtocol,
)

__all__ = ["QuietMember"]

logger = logging.getLogger(__name__)

_DISCOVERY_RETRY = 0.5
_SMALLEST_BUFFER = 1  # the kernel rounds it up to its minimum (a few KiB)


class QuietMember:
    """One member of one channel; build it with :meth:`join` and :meth:`close` it at the end."""

    def __init__(self, session: VoiceSession, ws: ClientConnection) -> None:
        self.session = session
        self.protocol = VoiceGatewayProtocol(
            Credentials(session.server_id, session.user_id, session.session_id, session.token),
            channel_id=session.channel_id,
            max_dave_protocol_version=1,
        )
        self._ws = ws
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = None
        self._described = asyncio.Event()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.failures = 0
        """Tasks of this member that ended with an error (logged)."""

    @classmethod
    async def join(
        cls,
        session: VoiceSession,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,  # noqa: ASYNC109 - bounds the handshake
    ) -> QuietMember:
        """Connect with ``session``'s credentials and return once Session Description arrived."""
        scheme = "wss" if ssl_context is not None else "ws"
        ws = await connect(
            f"{scheme}://{session.endpoint}/?v=8",
            ssl=ssl_context,
            compression=None,
            ping_interval=None,
            open_timeout=timeout,
            close_timeout=2.0,
            max_size=1 << 20,
        )
        member = cls(session, ws)
        member._spawn(member._read())
        try:
            await ws.send(member.protocol.connection_opened())
            async with asyncio.timeout(timeout):
                await member._described.wait()
        except BaseException:
            await member.close()
            raise
        return member

    @property
    def dave_ready(self) -> bool:
        return self.protocol.dave.ready

    async def wait_dave_ready(self, timeout: float) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while not self.dave_ready:
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        """Close the WebSocket (1000: the member leaves the call) and the UDP socket. Idempotent."""
        with contextlib.suppress(Exception):
            await self._ws.close(1000)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # ---- the shell --------------------------------------------------------------------------------

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in self._ws:
                for output in self.protocol.receive(frame, self._loop.time()):
                    if isinstance(output, Send):
                        await self._ws.send(output.frame)
                    elif isinstance(output, HelloReceived):
                        self._spawn(self._heartbeats(output.interval))
                    elif isinstance(output, ReadyReceived):
                        self._spawn(self._select_protocol(output.ready.ip, output.ready.port))
                    elif isinstance(output, SessionDescribed):
                        self._described.set()
                    elif isinstance(output, DaveEpoch):
                        self._changed.set()
        self._changed.set()

    async def _heartbeats(self, interval: float) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(interval)
                frame = self.protocol.heartbeat(self._loop.time())
                if frame is not None:
                    await self._ws.send(frame)

    async def _select_protocol(self, host: str, port: int) -> None:
        ssrc = self.protocol.ssrc
        if ssrc is None:
            raise EmulatorError("Ready without an SSRC")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SMALLEST_BUFFER)
        sock.connect((host, port))
        self._sock = sock
        request = discovery.build_request(ssrc)
        while True:
            sock.send(request)
            try:
                async with asyncio.timeout(_DISCOVERY_RETRY):
                    answer = await self._loop.sock_recv(sock, 128)
            except TimeoutError:
                continue
            if len(answer) == discovery.PACKET_SIZE:
                break
        result = discovery.parse_response(answer)
        await self._ws.send(self.protocol.select_protocol(result.address, result.port))

    def _spawn(self, coroutine: object) -> None:
        task: asyncio.Task[None] = self._loop.create_task(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.failures += 1
            logger.error("quiet member %d: a task failed", self.session.user_id, exc_info=task.exception())
        self._changed.set()
