"""One emulated voice server: the voice gateway's WebSocket listener and the UDP media server, as asyncio.

The protocol lives in :class:`~cordvoice.emulator.voice_protocol.VoiceServerCore`; this shell moves frames
between sockets and the core, owns one writer task per socket (which honours the core's delivery delays
without reordering), enforces heartbeat deadlines in each reader, and keeps one timer for the core's
deadlines (resume windows, DAVE transition timeouts). It serves TLS with the emulator's certificate when the
emulator has one, and accepts ``permessage-deflate`` (discord.py asks for it).

Fault hooks, driven by ``emu.faults`` (:mod:`cordvoice.emulator.faults`) and usable directly:
:meth:`close_client`, :meth:`crash`, :meth:`drop_client`, :meth:`withhold_acks`, and on :attr:`media` the
``paused`` flag, ``forward_hook`` and ``inject``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from cordvoice.emulator.inspection import ClientInspection
from cordvoice.emulator.sfu import MediaEndpoint, MediaServer
from cordvoice.emulator.state import VoiceStateChange
from cordvoice.emulator.voice_protocol import (
    VoiceConnection,
    VoiceServerConfig,
    VoiceServerCore,
    VoiceServerStats,
)
from cordvoice.errors import EmulatorError
from cordvoice.voicegateway.closecodes import CloseCode
from cordvoice.wirelog import WIRE_LOGGER

if TYPE_CHECKING:
    from cordvoice.emulator.server import Emulator

__all__ = ["EmulatedVoiceServer"]

logger = logging.getLogger(__name__)

#: Voice gateway versions accepted in the URL; all are served with v8 semantics (protocol.md §1.3).
_ACCEPTED_VERSIONS = frozenset({"4", "5", "6", "7", "8"})


class _Close:
    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class _Link:
    """One socket's ordered output: a FIFO drained by a writer task that waits out each frame's delay."""

    def __init__(self, ws: ServerConnection, stats: VoiceServerStats) -> None:
        self.ws = ws
        self._stats = stats
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[float, str | bytes] | _Close] = asyncio.Queue()
        self.closing = False
        self.close_requested = False

    def send(self, frame: str | bytes, delay: float) -> None:
        if self.closing:
            self._stats.dropped["undelivered"] += 1
            return
        self._queue.put_nowait((self._loop.time() + delay if delay > 0 else 0.0, frame))

    def close(self, code: int, reason: str) -> None:
        if not self.closing:
            self.closing = True
            self.close_requested = True
            self._queue.put_nowait(_Close(code, reason))

    def abort(self) -> None:
        self.closing = True
        self.ws.transport.abort()

    async def run_writer(self) -> None:
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, _Close):
                    await self.ws.close(item.code, item.reason)
                    return
                deliver_at, frame = item
                if deliver_at:
                    wait = deliver_at - self._loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                await self.ws.send(frame)
        except ConnectionClosed:
            self._stats.dropped["undelivered"] += self._queue.qsize()


class EmulatedVoiceServer:
    """A running voice server (voice gateway + SFU). Built by the emulator through :meth:`start`."""

    def __init__(
        self, emulator: Emulator, server_id: int, ws_server: Server, media: MediaServer, endpoint: str
    ) -> None:
        self.emulator = emulator
        self.server_id = server_id
        self.media = media
        self._ws_server = ws_server
        self._endpoint = endpoint
        self.core = VoiceServerCore(
            emulator.state, server_id, media, media.address, emulator.voice_config_for(server_id)
        )
        self._live: dict[int, tuple[VoiceConnection, _Link, asyncio.Task[Any] | None]] = {}
        self._timer: asyncio.Handle | None = None
        self._timer_when = 0.0
        """When the armed timer fires (uvloop's ``call_at`` returns a plain Handle, without ``when()``, for a
        deadline under 0.5 ms away)."""
        self._closed = False
        self._remove_hook = emulator.add_voice_state_hook(self._on_voice_change)

    @classmethod
    async def start(cls, emulator: Emulator, server_id: int, port: int) -> EmulatedVoiceServer:
        """Bind the WebSocket port (``port``, 0 for any) and a UDP port on the emulator's host."""
        media = await MediaServer.start(emulator.host, 0)
        holder: list[EmulatedVoiceServer] = []

        async def handler(ws: ServerConnection) -> None:
            await holder[0].handle(ws)

        try:
            ws_server = await serve(
                handler,
                emulator.host,
                port,
                ssl=emulator.server_ssl_context,
                compression="deflate",
                ping_interval=None,
                close_timeout=emulator.close_timeout,
                max_size=1 << 20,
                server_header="cordvoice-emulator",
                logger=WIRE_LOGGER,
            )
        except BaseException:
            media.close()
            raise
        bound_port = ws_server.sockets[0].getsockname()[1]
        server = cls(emulator, server_id, ws_server, media, f"{emulator.url_host}:{bound_port}")
        holder.append(server)
        return server

    @property
    def endpoint(self) -> str:
        """``host:port`` as VOICE_SERVER_UPDATE carries it."""
        return self._endpoint

    @property
    def config(self) -> VoiceServerConfig:
        return self.core.config

    @property
    def stats(self) -> VoiceServerStats:
        return self.core.stats

    async def close(self) -> None:
        """Close every socket (1001), the UDP socket and the timer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._remove_hook()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tasks = []
        for conn, link, task in list(self._live.values()):
            if not conn.closing:
                conn.closing = True
                link.close(1001, "emulator shutting down")
            if task is not None:
                tasks.append(task)
        if tasks:
            await asyncio.wait(tasks, timeout=self.emulator.close_timeout + 1.0)
        self._ws_server.close()
        await self._ws_server.wait_closed()
        self.media.close()

    # ---- sockets ---------------------------------------------------------------------------------

    async def handle(self, ws: ServerConnection) -> None:
        """Serve one voice WebSocket until it closes."""
        loop = asyncio.get_running_loop()
        link = _Link(ws, self.core.stats)
        conn = self.core.open_connection(link, loop.time())
        writer = asyncio.create_task(link.run_writer(), name=f"cordvoice-voice-writer-{conn.id}")
        self._live[conn.id] = (conn, link, asyncio.current_task())
        client_code: int | None = None
        try:
            path = ws.request.path if ws.request is not None else "/"
            version = parse_qs(urlsplit(path).query).get("v", [None])[0]
            if version not in _ACCEPTED_VERSIONS:
                self.core.refuse_connection(
                    conn,
                    CloseCode.BAD_REQUEST,
                    f"voice gateway version {version!r} is not supported",
                    loop.time(),
                )
            else:
                client_code = await self._read(ws, conn)
        finally:
            self.core.connection_lost(conn, loop.time(), client_code)
            self._reschedule()
            if link.close_requested:  # let the close frame go out after the frames queued before it
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.emulator.close_timeout + 1.0):
                        await writer
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            del self._live[conn.id]

    async def _read(self, ws: ServerConnection, conn: VoiceConnection) -> int | None:
        """Feed frames to the core until it closes or the client goes; returns the client's close code."""
        loop = asyncio.get_running_loop()
        while not conn.closing:
            try:
                async with asyncio.timeout_at(conn.heartbeat_deadline):
                    frame = await ws.recv()
            except TimeoutError:
                self.core.heartbeat_expired(conn, loop.time())
                self._reschedule()
                return None
            except ConnectionClosed as exc:
                return exc.rcvd.code if exc.rcvd is not None and exc.rcvd_then_sent else None
            self.core.receive(conn, frame, loop.time())
            if self.core.deadlines_changed:
                self._reschedule()
        return None

    # ---- time ------------------------------------------------------------------------------------

    def _reschedule(self) -> None:
        if self._closed:
            return
        self.core.deadlines_changed = False
        deadline = self.core.next_deadline()
        timer = self._timer
        if timer is not None:
            if deadline is not None and self._timer_when == deadline:
                return
            timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._on_timer)
            self._timer_when = deadline

    def _on_timer(self) -> None:
        self._timer = None
        try:
            self.core.poll(asyncio.get_running_loop().time())
        except Exception:  # a bug here must not stop the timer for good
            logger.exception("emulated voice server %d failed in poll", self.server_id)
        self._reschedule()

    def _on_voice_change(self, change: VoiceStateChange) -> None:
        if self._closed:
            return
        self.core.voice_state_changed(change, asyncio.get_running_loop().time())
        self._reschedule()

    # ---- faults ----------------------------------------------------------------------------------

    async def close_client(
        self, user_id: int, code: int, reason: str = "closed by the emulator", *, guild_id: int | None = None
    ) -> int:
        """Close the user's voice socket with ``code``; resumable codes (4015, < 4000) keep the session.

        Returns how many sockets were closed, after their handlers finished.
        """
        tasks = self._tasks_of(user_id, guild_id)
        count = self.core.close_client(
            user_id, code, reason, asyncio.get_running_loop().time(), guild_id=guild_id
        )
        self._reschedule()
        await self._wait(tasks)
        return count

    async def crash(self, code: int = CloseCode.VOICE_SERVER_CRASHED) -> int:
        """Close every voice socket with 4015 ("voice server crashed"); sessions stay resumable."""
        tasks = [task for _, _, task in self._live.values() if task is not None]
        count = self.core.crash(asyncio.get_running_loop().time(), code)
        self._reschedule()
        await self._wait(tasks)
        return count

    async def drop_client(self, user_id: int, *, guild_id: int | None = None) -> int:
        """Cut the user's TCP connection without a close frame; the session stays resumable."""
        tasks = self._tasks_of(user_id, guild_id)
        count = self.core.drop_client(user_id, guild_id=guild_id)
        await self._wait(tasks)
        return count

    def withhold_acks(
        self, user_id: int, withhold: bool = True, *, guild_id: int | None = None, count: int | None = None
    ) -> None:
        """Stop (or resume) answering the user's heartbeats with op 6; ``count``: only the next N."""
        self.core.set_withhold_acks(user_id, withhold, guild_id=guild_id, count=count)

    def set_delivery_order(self, channel_id: int, seed: int | None, max_delay: float = 0.005) -> None:
        """Seeded shuffled delivery for one channel's message batches (see ``VoiceServerCore``)."""
        self.core.set_delivery_order(channel_id, seed, max_delay)

    def media_endpoint(self, user_id: int, *, guild_id: int | None = None) -> MediaEndpoint:
        """The SFU's record of the user's live session (its address, key, counters), for crafted packets."""
        record = self.core.live_record(user_id, guild_id)
        if record is None:
            raise EmulatorError(f"user {user_id} has no live voice session on voice server {self.server_id}")
        return record.media

    def inspect(self, user_id: int, *, guild_id: int | None = None) -> ClientInspection | None:
        return self.core.inspect(user_id, guild_id)

    def _tasks_of(self, user_id: int, guild_id: int | None) -> list[asyncio.Task[Any]]:
        return [
            task
            for conn, _, task in self._live.values()
            if task is not None
            and conn.session is not None
            and conn.session.user_id == user_id
            and (guild_id is None or conn.session.guild_id == guild_id)
        ]

    async def _wait(self, tasks: list[asyncio.Task[Any]]) -> None:
        current = asyncio.current_task()
        tasks = [task for task in tasks if task is not current]
        if tasks:
            await asyncio.wait(tasks, timeout=self.emulator.close_timeout + 1.0)

    def __repr__(self) -> str:
        return (
            f"EmulatedVoiceServer(id={self.server_id}, endpoint={self._endpoint!r}, udp={self.media.address})"
        )
