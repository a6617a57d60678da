"""One voice gateway WebSocket (v8) and its heartbeat: the thin asyncio shell around the websockets library.

The protocol decisions live in :class:`~cordvoice.voicegateway.protocol.VoiceGatewayProtocol`; this module
only dials, moves frames, beats, and reports how the socket ended:

* :func:`voice_gateway_url` builds ``wss://{endpoint}/?v=8`` from a VOICE_SERVER_UPDATE endpoint (any scheme
  prefix is stripped; anything but ``host[:port]`` with a valid port is refused). TLS is verified with the
  system's trust store unless an ``ssl.SSLContext`` is given; plain ``ws://`` only when ``ssl=False`` is
  passed explicitly (local emulators).
* permessage-deflate is off (the voice gateway gains nothing from it) and messages are capped at 1 MiB.
* :meth:`VoiceGatewayConnection.start_heartbeat` runs one small task per socket: it asks a callback for each
  heartbeat frame and closes the socket with 4000 (resumable) when the callback reports a zombie connection.
* :attr:`VoiceGatewayConnection.close_code` is the code of the close frame the *server* sent, or None when the
  socket dropped without one; :attr:`VoiceGatewayConnection.closed_by_us` tells our own closes apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as ssl_module
import urllib.parse
from collections.abc import Callable

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from cordvoice.errors import InvalidArgumentError, VoiceError
from cordvoice.wirelog import WIRE_LOGGER

__all__ = [
    "GATEWAY_VERSION",
    "MAX_MESSAGE_SIZE",
    "RESUME_CLOSE_CODE",
    "VoiceGatewayConnection",
    "voice_gateway_url",
]

logger = logging.getLogger(__name__)

GATEWAY_VERSION = 8
MAX_MESSAGE_SIZE = 1 << 20
"""Largest frame accepted from the server: DAVE commits and Welcomes of big calls stay far below this."""
RESUME_CLOSE_CODE = 4000
"""What we close with when we mean to resume: any code but 1000/1001 keeps the server's session alive."""

HeartbeatSource = Callable[[float], "str | None"]
"""``beat(now)`` returns the next heartbeat frame, or None when the connection is a zombie."""


def voice_gateway_url(endpoint: str, *, secure: bool = True, version: int = GATEWAY_VERSION) -> str:
    """``wss://host[:port]/?v=8`` for a VOICE_SERVER_UPDATE endpoint (``ws://`` when not ``secure``)."""
    host = endpoint.strip()
    for scheme in ("wss://", "ws://", "https://", "http://"):
        if host.lower().startswith(scheme):
            host = host[len(scheme) :]
            break
    host = host.split("/", 1)[0].split("?", 1)[0]
    if not _is_host_port(host):
        raise InvalidArgumentError(f"not a voice endpoint (host[:port]): {endpoint!r:.80}")
    return f"{'wss' if secure else 'ws'}://{host}/?v={version}"


def _is_host_port(text: str) -> bool:
    """Whether URI parsing accepts ``text`` as a host with an optional port (else it raises ValueError)."""
    if not text or not text.isascii() or any(c.isspace() or c in "@#" for c in text):
        return False
    try:
        parts = urllib.parse.urlsplit(f"//{text}")
        port = parts.port  # ValueError: "host:abc", "host:99999"
    except ValueError:  # "[::1", "[not-an-ip]"
        return False
    return parts.hostname is not None and port != 0


class VoiceGatewayConnection:
    """One open voice WebSocket. Build it with :meth:`open`; it is never reused after it closes."""

    def __init__(self, ws: ClientConnection, url: str) -> None:
        self._ws = ws
        self.url = url
        self.zombie = False
        """True once the heartbeat gave up on this socket (three unacknowledged heartbeats)."""
        self.closed_by_us = False
        self._heartbeat: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        endpoint: str,
        *,
        ssl: ssl_module.SSLContext | bool = True,
        open_timeout: float = 10.0,
        close_timeout: float = 2.0,
    ) -> VoiceGatewayConnection:
        """Dial the voice gateway; raises VoiceError (naming the URL) when it cannot be reached."""
        secure = ssl is not False
        url = voice_gateway_url(endpoint, secure=secure)
        tls: ssl_module.SSLContext | None = None
        if secure:
            # Verified TLS with the system trust store unless the caller brings a context (an emulator's CA).
            tls = ssl if isinstance(ssl, ssl_module.SSLContext) else ssl_module.create_default_context()
        try:
            ws = await connect(
                url,
                ssl=tls,
                compression=None,
                max_size=MAX_MESSAGE_SIZE,
                open_timeout=open_timeout,
                close_timeout=close_timeout,
                ping_interval=None,
                user_agent_header="cordvoice",
                logger=WIRE_LOGGER,
            )
        # ValueError: URI parsing of what voice_gateway_url did not catch; never let it out as a bare bug.
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError, ValueError) as exc:
            detail = str(exc) or type(exc).__name__
            raise VoiceError(f"could not connect to the voice gateway at {url}: {detail}") from exc
        return cls(ws, url)

    # ---- frames ----------------------------------------------------------------------------------

    async def send(self, frame: str | bytes) -> bool:
        """Send one frame; False if the socket is already closed (the reader will report how)."""
        try:
            await self._ws.send(frame)
        except ConnectionClosed:
            return False
        return True

    async def recv(self) -> str | bytes | None:
        """The next frame, or None once the socket is closed."""
        try:
            return await self._ws.recv()
        except ConnectionClosed:
            return None

    # ---- heartbeat -------------------------------------------------------------------------------

    def start_heartbeat(self, interval: float, beat: HeartbeatSource) -> None:
        """(Re)start beating every ``interval`` seconds, the first beat right away."""
        self.stop_heartbeat()
        self._heartbeat = asyncio.create_task(
            self._heartbeat_loop(interval, beat), name="cordvoice-voice-heartbeat"
        )

    def stop_heartbeat(self) -> None:
        task, self._heartbeat = self._heartbeat, None
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()

    async def _heartbeat_loop(self, interval: float, beat: HeartbeatSource) -> None:
        loop = asyncio.get_running_loop()
        interval = max(interval, 0.01)
        try:
            while True:
                frame = beat(loop.time())
                if frame is None:
                    self.zombie = True
                    logger.warning("voice gateway %s stopped acknowledging heartbeats", self.url)
                    await self.close(RESUME_CLOSE_CODE, "heartbeat not acknowledged")
                    return
                if not await self.send(frame):
                    return
                await asyncio.sleep(interval)
        except asyncio.CancelledError:
            raise
        except Exception:  # never let the heartbeat die silently: close so the session notices
            logger.exception("voice heartbeat failed; closing the socket")
            with contextlib.suppress(Exception):
                await self.close(RESUME_CLOSE_CODE, "heartbeat failed")

    # ---- closing ---------------------------------------------------------------------------------

    @property
    def close_code(self) -> int | None:
        """The close code the server sent (None: no close frame from the server, or still open)."""
        received = self._ws.protocol.close_rcvd
        return None if received is None else received.code

    @property
    def close_reason(self) -> str:
        received = self._ws.protocol.close_rcvd
        return "" if received is None else received.reason

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the socket (idempotent) and stop the heartbeat."""
        self.closed_by_us = self.closed_by_us or self.close_code is None
        self.stop_heartbeat()
        with contextlib.suppress(Exception):
            await self._ws.close(code, reason)

    async def aclose_quietly(self, code: int = 1000) -> None:
        """Make sure the socket and its heartbeat are gone, whatever state they are in."""
        task = self._heartbeat
        await self.close(code)
        if task is not None and task is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def __repr__(self) -> str:
        return f"VoiceGatewayConnection(url={self.url!r}, close_code={self.close_code})"
