"""The asyncio shell of the emulator's main gateway: sockets, timers and zlib; the protocol is elsewhere.

The protocol lives in the sans-IO core (:mod:`cordvoice.emulator.main_gateway_protocol`). Here each socket
gets one reader loop, which also enforces the heartbeat deadline, and one writer task that owns the socket's
compressor; one sweeper ends sessions whose resume window passed. Server-to-client messages are plain JSON
text frames, or one ``zlib-stream`` per connection (a shared compressor flushed with Z_SYNC_FLUSH after every
message) when the URL asks for it, as discord.py does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import zlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from cordvoice.emulator.main_gateway_protocol import (
    SUPPORTED_API_VERSIONS,
    GatewayCloseCode,
    GatewayConnection,
    GatewayHub,
    GatewaySession,
    MainGatewayStats,
)
from cordvoice.emulator.state import EmulatorState
from cordvoice.errors import EmulatorError

__all__ = ["MainGateway"]


@dataclass
class _CloseRequest:
    code: int
    reason: str


class _Link:
    """The shell side of one socket: an ordered queue drained by a writer that owns the zlib stream."""

    def __init__(self, ws: ServerConnection, *, compress: bool, stats: MainGatewayStats) -> None:
        self.ws = ws
        self._stats = stats
        self._queue: asyncio.Queue[dict[str, Any] | _CloseRequest] = asyncio.Queue()
        self._zlib = zlib.compressobj() if compress else None
        self.closing = False

    def send(self, payload: dict[str, Any]) -> None:
        if self.closing:
            self._stats.undelivered += 1
            return
        self._queue.put_nowait(payload)

    def close(self, code: int, reason: str) -> None:
        if not self.closing:
            self.closing = True
            self._queue.put_nowait(_CloseRequest(code, reason))

    async def run_writer(self) -> None:
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, _CloseRequest):
                    await self.ws.close(item.code, item.reason)
                    return
                text = json.dumps(item, separators=(",", ":"))
                if self._zlib is None:
                    await self.ws.send(text)
                else:
                    await self.ws.send(
                        self._zlib.compress(text.encode()) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
                    )
        except ConnectionClosed:
            self._stats.undelivered += self._queue.qsize()


class MainGateway:
    """The main gateway's asyncio shell; the :class:`~cordvoice.emulator.Emulator` routes sockets here."""

    def __init__(
        self,
        state: EmulatorState,
        *,
        heartbeat_interval: float = 41.25,
        heartbeat_timeout: float | None = None,
        resume_timeout: float = 60.0,
        rate_limit: tuple[int, float] | None = (120, 60.0),
        replay_limit: int = 1000,
        voice_server_update_first: bool = False,
        close_timeout: float = 2.0,
    ) -> None:
        if heartbeat_interval <= 0 or resume_timeout <= 0:
            raise EmulatorError("heartbeat_interval and resume_timeout must be positive")
        self.hub = GatewayHub(
            state, replay_limit=replay_limit, voice_server_update_first=voice_server_update_first
        )
        self.heartbeat_interval = heartbeat_interval
        # The first heartbeat comes after interval * jitter; allow a whole interval of lateness on top.
        self.heartbeat_timeout = (
            heartbeat_timeout if heartbeat_timeout is not None else heartbeat_interval * 2
        )
        self.resume_timeout = resume_timeout
        self.rate_limit = rate_limit
        self.close_timeout = close_timeout
        self._live: dict[int, tuple[GatewayConnection, _Link, asyncio.Task[Any] | None]] = {}
        self._next_connection_id = 1
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def stats(self) -> MainGatewayStats:
        return self.hub.stats

    @property
    def connections(self) -> list[GatewayConnection]:
        """The live sockets' protocol states (user, session, opcodes received, compression)."""
        return [core for core, _, _ in self._live.values()]

    async def start(self, gateway_url: str) -> None:
        self.hub.gateway_url = gateway_url
        self._sweeper = asyncio.create_task(self._sweep(), name="cordvoice-emulator-session-sweeper")

    async def close(self) -> None:
        """Stop the sweeper and forget every session without announcing anything (the emulator is going away).

        Sockets are closed afterwards by the server that owns them.
        """
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for session in self.hub.sessions.values():
            if session.connection is not None:
                session.connection.session = None
                session.connection = None
        self.hub.sessions.clear()

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        period = min(1.0, self.resume_timeout / 4)
        while True:
            await asyncio.sleep(period)
            self.hub.expire_sessions(loop.time(), self.resume_timeout)

    async def handle(self, ws: ServerConnection) -> None:
        """Serve one main-gateway socket until it closes."""
        loop = asyncio.get_running_loop()
        path = ws.request.path if ws.request is not None else "/"
        query = parse_qs(urlsplit(path).query)
        version = query.get("v", ["10"])[0]
        encoding = query.get("encoding", ["json"])[0]
        compression = query.get("compress", [None])[0]
        self.stats.connections += 1
        if version not in SUPPORTED_API_VERSIONS:
            self.stats.closes[GatewayCloseCode.INVALID_API_VERSION] += 1
            await ws.close(GatewayCloseCode.INVALID_API_VERSION, f"invalid API version {version}")
            return
        if encoding != "json" or compression not in (None, "zlib-stream"):
            # An emulator limitation, not a Discord rule: 1003 says "cannot accept this data type".
            self.stats.closes[1003] += 1
            await ws.close(1003, "the emulator speaks encoding=json with optional compress=zlib-stream only")
            return
        link = _Link(ws, compress=compression == "zlib-stream", stats=self.stats)
        core = GatewayConnection(
            self.hub,
            link,
            connection_id=self._next_connection_id,
            now=loop.time(),
            heartbeat_interval=self.heartbeat_interval,
            heartbeat_timeout=self.heartbeat_timeout,
            rate_limit=self.rate_limit,
            compress=compression == "zlib-stream",
        )
        self._next_connection_id += 1
        writer = asyncio.create_task(link.run_writer(), name=f"cordvoice-emulator-gateway-writer-{core.id}")
        self._live[core.id] = (core, link, asyncio.current_task())
        client_code: int | None = None
        try:
            core.open()
            client_code = await self._read(ws, core)
        finally:
            core.connection_lost(loop.time(), client_code)
            if link.closing:
                with contextlib.suppress(TimeoutError, ConnectionClosed):
                    async with asyncio.timeout(self.close_timeout + 1.0):
                        await writer
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            del self._live[core.id]

    async def _read(self, ws: ServerConnection, core: GatewayConnection) -> int | None:
        """Feed messages to the core until it closes or the client goes; returns the client's close code."""
        loop = asyncio.get_running_loop()
        while not core.closing:
            try:
                async with asyncio.timeout_at(core.heartbeat_deadline):
                    message = await ws.recv()
            except TimeoutError:
                core.heartbeat_expired()
                return None
            except ConnectionClosed as exc:
                # Only a close the client started counts as the client's choice of code.
                return exc.rcvd.code if exc.rcvd is not None and exc.rcvd_then_sent else None
            core.receive(message, loop.time())
        return None

    # ---- faults and inspection for tests and the voice side ---------------------------------------------

    def _matching(self, user_id: int | None, session_id: str | None) -> list[int]:
        return [
            cid
            for cid, (core, _, _) in self._live.items()
            if (user_id is None or core.user_id == user_id)
            and (session_id is None or core.session_id == session_id)
        ]

    async def drop(
        self,
        *,
        user_id: int | None = None,
        session_id: str | None = None,
        code: int | None = None,
        reason: str = "dropped by the emulator",
    ) -> int:
        """Cut matching sockets; the sessions stay resumable. ``code=None`` aborts TCP (no close frame).

        Returns how many sockets were cut, after their handlers finished.
        """
        ids = self._matching(user_id, session_id)
        tasks = []
        for cid in ids:
            core, link, task = self._live[cid]
            if code is None:
                core.abort()
                link.ws.transport.abort()
            else:
                core.close(code, reason)
            if task is not None:
                tasks.append(task)
        if tasks:
            await asyncio.wait(tasks, timeout=self.close_timeout + 1.0)
        return len(ids)

    def request_reconnect(self, *, user_id: int | None = None, session_id: str | None = None) -> int:
        """Send op 7 Reconnect to matching sockets; returns how many."""
        ids = self._matching(user_id, session_id)
        for cid in ids:
            self._live[cid][0].request_reconnect()
        return len(ids)

    def invalidate_session(self, session_id: str, *, resumable: bool = False) -> None:
        """Send op 9 to the session's socket (if attached); a non-resumable one ends the session now."""
        session = self.hub.sessions.get(session_id)
        if session is None:
            raise EmulatorError(f"unknown gateway session {session_id!r}")
        if session.connection is not None:
            session.connection.invalidate(resumable=resumable)
        elif not resumable:
            self.hub.end_session(session_id)

    async def wait_for_session(self, user_id: int) -> GatewaySession:
        """Wait until ``user_id`` has an attached (identified or resumed) session; bound it with a timeout."""
        while True:
            for session in self.hub.sessions_of(user_id):
                if session.connection is not None:
                    return session
            await asyncio.sleep(0.01)
