"""The voice session's UDP socket: IP discovery, keepalives, sending RTP, and a receive path that survives
anything.

One connected datagram endpoint per voice session (``remote_addr``: the kernel skips per-packet address
handling, performance-notes.md §2). It survives voice WebSocket resumes; a fresh Identify gets a new one.

* :meth:`UdpConnection.discover`: the 74-byte IP discovery, re-sent every ``retry_interval`` (UDP may lose it)
  until an answer or ``timeout``.
* A keepalive every 5 s (protocol.md §4.4: 8 bytes, a little-endian counter and four zero bytes), on a loop
  timer rather than a task.
* Receive: on stock asyncio the transport's ``max_size`` is lowered from 256 KiB (one mmap/munmap per datagram
  otherwise); uvloop has no such attribute. Every datagram is classified and counted: RTCP (ignored for now),
  RTP that fails to parse or to authenticate, RTP before the key is known, and good RTP, which goes to the
  receive hook as ``(header, payload, arrival_time)`` after transport decryption (the payload is still a DAVE
  frame in a DAVE call). Nothing a peer sends can raise out of :meth:`datagram_received`.
* ``dial``: the seed's ``udp.DialFunc``, an async callable ``(host, port) -> socket.socket`` that supplies the
  socket (bound, and connected or not: it is connected here if it is not).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeAlias

from cordvoice.errors import DecryptionError, InvalidArgumentError, ProtocolError, VoiceError
from cordvoice.udp import discovery
from cordvoice.udp.crypto import TransportCipher
from cordvoice.udp.rtp import RtpHeader, is_rtcp

__all__ = [
    "KEEPALIVE_INTERVAL",
    "DialFunc",
    "ReceiveHook",
    "UdpConnection",
    "UdpStats",
]

logger = logging.getLogger(__name__)

KEEPALIVE_INTERVAL = 5.0
_MAX_DATAGRAM = 4096
_KEEPALIVE = struct.Struct("<I4x")

DialFunc: TypeAlias = Callable[[str, int], Awaitable[socket.socket]]
"""``await dial(host, port)`` returns the UDP socket to use for the media server at ``host:port``."""

ReceiveHook: TypeAlias = Callable[[RtpHeader, bytes, float], None]
"""``hook(header, payload, arrival_time)`` for every authenticated RTP packet; must not block or raise."""


@dataclass
class UdpStats:
    """What the socket saw; every datagram lands in exactly one counter."""

    sent: int = 0
    send_errors: int = 0
    keepalives: int = 0
    received: int = 0
    rtp: int = 0
    rtcp: int = 0
    undecryptable: int = 0
    malformed: int = 0
    before_key: int = 0
    discovery: int = 0
    socket_errors: int = 0
    hook_errors: int = 0
    per_ssrc: Counter[int] = field(default_factory=Counter)

    @property
    def dropped(self) -> int:
        """Received datagrams that were neither RTP handed on nor RTCP/discovery answers."""
        return self.undecryptable + self.malformed + self.before_key


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: UdpConnection) -> None:
        self._owner = owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # CPython's selector transport reads with recvfrom(256 KiB): a mmap/munmap per datagram
        # (performance-notes.md §2). It is an instance attribute there; uvloop has none and no such cost.
        if hasattr(transport, "max_size"):
            transport.max_size = _MAX_DATAGRAM

    def datagram_received(self, data: bytes, addr: tuple[object, ...]) -> None:
        self._owner._received(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable while the server restarts) land here; they are not fatal.
        self._owner.stats.socket_errors += 1
        logger.debug("voice UDP socket error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._lost(exc)


class UdpConnection:
    """One voice session's UDP socket. Build it with :meth:`open`; :meth:`close` it when the session ends."""

    def __init__(self, remote: tuple[str, int], stats: UdpStats | None = None) -> None:
        self.remote = remote
        self.stats = stats if stats is not None else UdpStats()
        self.cipher: TransportCipher | None = None
        """Set after Session Description; until then received RTP is counted as ``before_key``."""
        self.receive_hook: ReceiveHook | None = None
        self.on_lost: Callable[[Exception | None], None] | None = None
        """Called once if the socket dies by itself (not after :meth:`close`)."""
        self._transport: asyncio.DatagramTransport | None = None
        self._discovery: asyncio.Future[discovery.DiscoveryResult] | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._keepalive_count = 0
        self._closing = False

    @classmethod
    async def open(
        cls, host: str, port: int, *, dial: DialFunc | None = None, stats: UdpStats | None = None
    ) -> UdpConnection:
        """Open the socket towards the media server at ``host:port``; raises VoiceError on failure.

        ``stats`` lets a session keep one set of counters across the sockets of its successive connections.
        """
        if not 0 < port <= 0xFFFF:
            raise InvalidArgumentError(f"media server port {port} is outside 1..65535")
        loop = asyncio.get_running_loop()
        connection = cls((host, port), stats)
        try:
            if dial is None:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Protocol(connection), remote_addr=(host, port)
                )
            else:
                sock = await dial(host, port)
                try:
                    _connect_if_needed(sock, host, port)
                    sock.setblocking(False)
                    transport, _ = await loop.create_datagram_endpoint(
                        lambda: _Protocol(connection), sock=sock
                    )
                except BaseException:
                    sock.close()
                    raise
        except OSError as exc:
            raise VoiceError(f"could not open a UDP socket to the voice server {host}:{port}: {exc}") from exc
        connection._transport = transport
        connection._schedule_keepalive(loop)
        return connection

    # ---- state -----------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._transport is None or self._closing

    @property
    def local_address(self) -> tuple[str, int] | None:
        if self._transport is None:
            return None
        name = self._transport.get_extra_info("sockname")
        return None if name is None else (str(name[0]), int(name[1]))

    # ---- sending ---------------------------------------------------------------------------------

    def send(self, datagram: bytes) -> bool:
        """Send one datagram now; False (counted) if the socket is closed."""
        transport = self._transport
        if transport is None or self._closing:
            self.stats.send_errors += 1
            return False
        transport.sendto(datagram)
        self.stats.sent += 1
        return True

    async def discover(
        self, ssrc: int, *, give_up_after: float = 5.0, retry_interval: float = 1.0
    ) -> discovery.DiscoveryResult:
        """Our address as the media server sees it. Raises VoiceError after ``give_up_after`` seconds."""
        loop = asyncio.get_running_loop()
        request = discovery.build_request(ssrc)
        waiter: asyncio.Future[discovery.DiscoveryResult] = loop.create_future()
        self._discovery = waiter
        try:
            async with asyncio.timeout(give_up_after):
                while True:
                    if not self.send(request):
                        raise VoiceError("the UDP socket closed during IP discovery")
                    done, _ = await asyncio.wait({waiter}, timeout=retry_interval)
                    if done:
                        result = waiter.result()
                        if result.ssrc != ssrc:
                            raise VoiceError(
                                f"IP discovery answered for SSRC {result.ssrc}, we asked for {ssrc}"
                            )
                        return result
                    logger.debug("no IP discovery answer within %.1f s; asking again", retry_interval)
        except TimeoutError:
            raise VoiceError(
                f"the voice server {self.remote[0]}:{self.remote[1]} did not answer IP discovery within "
                f"{give_up_after:.1f} s: is UDP blocked?"
            ) from None
        finally:
            self._discovery = None
            if not waiter.done():
                waiter.cancel()

    # ---- receiving -------------------------------------------------------------------------------

    def _received(self, data: bytes) -> None:  # the hot path; must never raise
        stats = self.stats
        stats.received += 1
        arrival = time.monotonic()
        if len(data) == discovery.PACKET_SIZE and data[:2] == b"\x00\x02":
            self._discovery_answer(data)
            return
        if is_rtcp(data):
            stats.rtcp += 1
            return
        cipher = self.cipher
        if cipher is None:
            stats.before_key += 1
            return
        try:
            header, payload = cipher.open_rtp(data)
        except DecryptionError:
            stats.undecryptable += 1
            return
        except ProtocolError:
            stats.malformed += 1
            return
        stats.rtp += 1
        stats.per_ssrc[header.ssrc] += 1
        hook = self.receive_hook
        if hook is not None:
            try:
                hook(header, payload, arrival)
            except Exception:
                stats.hook_errors += 1
                logger.exception("the voice receive hook failed on a packet; it keeps being called")

    def _discovery_answer(self, data: bytes) -> None:
        waiter = self._discovery
        try:
            result = discovery.parse_response(data)
        except ProtocolError as exc:
            self.stats.malformed += 1
            logger.debug("bad IP discovery answer: %s", exc)
            return
        self.stats.discovery += 1
        if waiter is not None and not waiter.done():
            waiter.set_result(result)

    # ---- keepalive and lifecycle -----------------------------------------------------------------

    def _schedule_keepalive(self, loop: asyncio.AbstractEventLoop) -> None:
        self._keepalive = loop.call_later(KEEPALIVE_INTERVAL, self._send_keepalive, loop)

    def _send_keepalive(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.closed:
            return
        self._keepalive_count = (self._keepalive_count + 1) & 0xFFFF_FFFF
        if self.send(_KEEPALIVE.pack(self._keepalive_count)):
            self.stats.keepalives += 1
        self._schedule_keepalive(loop)

    def _lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        if self._discovery is not None and not self._discovery.done():
            self._discovery.set_exception(VoiceError(f"the UDP socket closed: {exc}"))
        if not self._closing:
            logger.warning("voice UDP socket closed unexpectedly: %s", exc)
            callback, self.on_lost = self.on_lost, None
            if callback is not None:
                callback(exc)

    def close(self) -> None:
        """Close the socket; idempotent. ``on_lost`` is not called for a close we asked for."""
        self._closing = True
        self.on_lost = None
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        transport = self._transport
        if transport is not None:
            transport.close()

    def __repr__(self) -> str:
        return f"UdpConnection(remote={self.remote}, local={self.local_address}, closed={self.closed})"


def _connect_if_needed(sock: socket.socket, host: str, port: int) -> None:
    if sock.type != socket.SOCK_DGRAM:
        raise InvalidArgumentError(f"the dial hook returned a {sock.type!r} socket; a UDP socket is needed")
    try:
        sock.getpeername()
    except OSError:
        sock.connect((host, port))
