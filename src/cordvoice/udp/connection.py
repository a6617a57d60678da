"""The voice session's UDP socket: IP discovery, keepalives, sending RTP, and a receive path that survives
anything.

One connected datagram endpoint per voice session (the kernel skips per-packet address handling,
performance-notes.md §2). It survives voice WebSocket resumes; a fresh Identify gets a new one. Sending
calls the connected socket's ``send`` directly, which saves the transport's per-call checks (about 0.5 µs,
a few percent of a packet's whole cost, docs/benchmarks.md); only when the kernel says "try again" does a
datagram go through the transport, which queues it, and later ones follow it there until the queue drains,
so the order never changes. Audio skips even :meth:`UdpConnection.send`: the transmit lane calls the socket
through ``direct_send`` whenever nothing is queued.

* :meth:`UdpConnection.discover`: the 74-byte IP discovery, re-sent every ``retry_interval`` (UDP may lose it)
  until an answer or ``timeout``.
* A keepalive every 5 s (protocol.md §4.4: 8 bytes, a little-endian counter and four zero bytes), on a loop
  timer rather than a task.
* Receive: on stock asyncio the transport's ``max_size`` is lowered from 256 KiB (one mmap/munmap per datagram
  otherwise), and each wake-up reads every datagram already queued rather than one per loop iteration;
  uvloop has no such attribute and batches its reads itself. Every datagram is classified and counted: RTCP
  (ignored for now), RTP that fails to parse or to authenticate, RTP before the key is known, and good RTP,
  which goes to the receive hook as ``(header, payload, arrival_time)`` after transport decryption (the
  payload is still a DAVE frame in a DAVE call). Nothing a peer sends can raise out of
  :meth:`datagram_received`.
* ``dial``: the seed's ``udp.DialFunc``, an async callable ``(host, port) -> socket.socket`` that supplies the
  socket (bound, and connected or not: it is connected here if it is not). A socket that stays unconnected
  anyway is used with ``sendto``.
* Only the voice server may talk to us: a datagram from any other address is dropped and counted
  (``foreign``). A connected socket gets that from the kernel already; the check here also covers a dial
  hook's socket that stayed unconnected, and any event loop that reports what it received differently.
* Per-SSRC packet counts are kept for at most :data:`MAX_TRACKED_SSRCS` SSRCs; packets of further SSRCs are
  counted together (``untracked_ssrcs``), so a flood of SSRCs cannot grow memory.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeAlias

from cordvoice.errors import DecryptionError, InvalidArgumentError, ProtocolError, VoiceError
from cordvoice.udp import discovery
from cordvoice.udp.crypto import TransportCipher
from cordvoice.udp.rtp import RtpHeader

__all__ = [
    "KEEPALIVE_INTERVAL",
    "MAX_TRACKED_SSRCS",
    "DialFunc",
    "ReceiveHook",
    "UdpConnection",
    "UdpStats",
]

logger = logging.getLogger(__name__)

KEEPALIVE_INTERVAL = 5.0
MAX_TRACKED_SSRCS = 256
"""SSRCs whose packets ``UdpStats.per_ssrc`` counts one by one (a call has at most a few dozen senders)."""
_MAX_DATAGRAM = 4096
_DRAIN_BATCH = 64
"""Datagrams read per loop wake-up beyond the transport's one (see :meth:`UdpConnection._drain`)."""
_RTCP_FIRST = 200
_RTCP_LAST = 204
_KEEPALIVE = struct.Struct("<I4x")

DialFunc: TypeAlias = Callable[[str, int], Awaitable[socket.socket]]
"""``await dial(host, port)`` returns the UDP socket to use for the media server at ``host:port``."""

ReceiveHook: TypeAlias = Callable[[RtpHeader, bytes, float], None]
"""``hook(header, payload, arrival_time)`` for every authenticated RTP packet; must not block or raise."""


@dataclass
class UdpStats:
    """What the socket saw; every datagram lands in exactly one counter."""

    sent: int = 0
    """Datagrams sent through :meth:`UdpConnection.send` (audio the lane sends through ``direct_send`` is
    counted by the lane)."""
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
    foreign: int = 0
    """Datagrams from an address other than the voice server's (dropped unread)."""
    per_ssrc: Counter[int] = field(default_factory=Counter)
    untracked_ssrcs: int = 0
    """Authenticated RTP packets of SSRCs beyond the first :data:`MAX_TRACKED_SSRCS` (not in ``per_ssrc``)."""

    @property
    def dropped(self) -> int:
        """Received datagrams that were neither RTP handed on nor RTCP/discovery answers."""
        return self.undecryptable + self.malformed + self.before_key + self.foreign


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: UdpConnection) -> None:
        self._owner = owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # CPython's selector transport reads with recvfrom(256 KiB): a mmap/munmap per datagram
        # (performance-notes.md §2). It is an instance attribute there; uvloop has none and no such cost.
        if hasattr(transport, "max_size"):
            transport.max_size = _MAX_DATAGRAM
            self._owner._selector_transport = True

    def datagram_received(self, data: bytes, addr: tuple[object, ...]) -> None:
        self._owner._received(data, addr)

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
        self._sock: socket.socket | None = None
        self._source: tuple[object, object] | None = None
        """The only address datagrams are accepted from: the voice server's, as the kernel reports it."""
        self._send_to: tuple[str, int] | None = None
        """Where ``sendto`` sends when the socket is not connected (None: connected, ``send`` is used)."""
        self._queued = False
        self.direct_send: Callable[[bytes], object] | None = None
        """The connected socket's own ``send`` while nothing waits in the transport's queue, else None.

        The transmit lane sends audio through it, skipping :meth:`send`'s checks and counting (one of the
        savings measured in docs/benchmarks.md). An ``OSError`` from it goes to :meth:`send_failed`.
        Datagrams sent this way are not in ``stats.sent``; the lane counts its own."""
        self._discovery: asyncio.Future[discovery.DiscoveryResult] | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._keepalive_count = 0
        self._closing = False
        self._selector_transport = False
        self._drains = False
        """Read every queued datagram per wake-up (stock asyncio's transport reads one per loop iteration);
        only on a connected socket of that transport (see :meth:`_drain`)."""

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
            sock = await dial(host, port) if dial is not None else await _connected_socket(loop, host, port)
            try:
                _connect_if_needed(sock, host, port)
                connection._source = _peer(sock)
                if connection._source is None:  # a dial hook's socket that would not connect
                    connection._send_to = (host, port)
                    connection._source = (_canonical_host(host), port)
                sock.setblocking(False)
                transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(connection), sock=sock)
            except BaseException:
                # Cancelled (a leave during the join) after the transport was made: asyncio closes it, and
                # that loss was asked for, not "unexpected".
                connection._closing = True
                sock.close()
                raise
        except (OSError, UnicodeError) as exc:  # UnicodeError: a host name IDNA cannot encode ("a..b")
            raise VoiceError(f"could not open a UDP socket to the voice server {host}:{port}: {exc}") from exc
        connection._transport = transport
        connection._sock = sock
        connection._drains = connection._selector_transport and connection._send_to is None
        if connection._send_to is None:
            connection.direct_send = sock.send
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
        """Send one datagram now; False (counted) if the socket is closed or refuses it."""
        transport, sock = self._transport, self._sock
        if transport is None or sock is None or self._closing:
            self.stats.send_errors += 1
            return False
        send_to = self._send_to
        if self._queued:
            if _queued_bytes(transport):
                transport.sendto(datagram, send_to)  # behind the queued ones
                self.stats.sent += 1
                return True
            self._queued = False
            if send_to is None:
                self.direct_send = sock.send
        try:
            if send_to is None:
                sock.send(datagram)
            else:
                sock.sendto(datagram, send_to)
        except OSError as exc:
            return self.send_failed(datagram, exc)
        self.stats.sent += 1
        return True

    def send_failed(self, datagram: bytes, exc: OSError) -> bool:
        """Finish a send the socket refused with ``exc``: queue the datagram if the socket was only busy (it
        goes out once the socket is writable, and later ones follow it), count a real error. Returns whether
        the datagram is on its way."""
        transport = self._transport
        busy = isinstance(exc, (BlockingIOError, InterruptedError))
        if busy and transport is not None and not self._closing:
            self._queued = True
            self.direct_send = None
            transport.sendto(datagram, self._send_to)
            self.stats.sent += 1
            return True
        # e.g. an ICMP "port unreachable" reported on the connected socket, or a socket closed meanwhile
        self.stats.socket_errors += 1
        logger.debug("voice UDP send failed: %s", exc)
        return False

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

    def _received(self, data: bytes, addr: tuple[object, ...]) -> None:  # must never raise
        """One datagram from the transport; on stock asyncio, also every datagram queued behind it."""
        stats = self.stats
        source = self._source
        if source is not None and (addr[1] != source[1] or addr[0] != source[0]):
            stats.received += 1
            stats.foreign += 1
            return
        if self._drains:
            self._handle(self._drain(data), time.monotonic())
        else:
            self._handle((data,), time.monotonic())

    def _drain(self, first: bytes) -> list[bytes]:
        """``first`` and the datagrams already queued behind it on a connected socket.

        CPython's selector transport reads a single datagram per event-loop iteration, so every packet paid
        a whole iteration (``epoll_wait``, the ready queue, the handle): at 300 users that was about a fifth
        of the receive path's CPU (docs/benchmarks.md). uvloop reads up to 32 per wake-up by itself and is
        not drained. At most :data:`_DRAIN_BATCH` datagrams are read per
        wake-up so a flood cannot starve the loop; the rest wait for the next iteration. The socket is
        connected, so the kernel delivers only the voice server's datagrams (no source check needed).
        """
        batch = [first]
        sock = self._sock
        if sock is None or self._closing:
            return batch
        recv = sock.recv
        try:
            for _ in range(_DRAIN_BATCH):
                batch.append(recv(_MAX_DATAGRAM))  # noqa: PERF401 - recv raises to end the batch
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:  # e.g. an ICMP "port unreachable" reported on the connected socket
            self.stats.socket_errors += 1
            logger.debug("voice UDP socket error: %s", exc)
        return batch

    def _handle(self, datagrams: Iterable[bytes], arrival: float) -> None:  # the hot path; must never raise
        """Classify, count and open datagrams from the voice server that arrived at ``arrival``."""
        stats = self.stats
        per_ssrc = stats.per_ssrc
        for data in datagrams:
            stats.received += 1
            if len(data) == discovery.PACKET_SIZE and data[:2] == b"\x00\x02":
                self._discovery_answer(data)
                continue
            if len(data) >= 2 and _RTCP_FIRST <= data[1] <= _RTCP_LAST:  # is_rtcp, inline
                stats.rtcp += 1
                continue
            cipher = self.cipher
            if cipher is None:
                stats.before_key += 1
                continue
            try:
                header, payload = cipher.open_rtp(data)
            except DecryptionError:
                stats.undecryptable += 1
                continue
            except ProtocolError:
                stats.malformed += 1
                continue
            stats.rtp += 1
            ssrc = header.ssrc
            count = per_ssrc.get(ssrc)
            if count is not None:
                per_ssrc[ssrc] = count + 1
            elif len(per_ssrc) < MAX_TRACKED_SSRCS:
                per_ssrc[ssrc] = 1
            else:
                stats.untracked_ssrcs += 1
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
        self._sock = None
        self.direct_send = None
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
        self.direct_send = None
        self.on_lost = None
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        self._sock = None  # the transport owns it and closes it
        transport = self._transport
        if transport is not None:
            transport.close()

    def __repr__(self) -> str:
        return f"UdpConnection(remote={self.remote}, local={self.local_address}, closed={self.closed})"


def _queued_bytes(transport: asyncio.DatagramTransport) -> int:
    """Bytes the transport still holds (both asyncio's and uvloop's datagram transports report it)."""
    size = getattr(transport, "get_write_buffer_size", None)
    return int(size()) if size is not None else 0


async def _connected_socket(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket connected to ``host:port`` (the first address it resolves to)."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"{host!r} resolves to no address")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _peer(sock: socket.socket) -> tuple[object, object] | None:
    """``(host, port)`` the socket is connected to, as incoming datagrams name it; None if unconnected."""
    try:
        name = sock.getpeername()
    except OSError:
        return None
    return (name[0], name[1])


def _canonical_host(host: str) -> str:
    """The host as the kernel writes it in a datagram's source (IP literals normalised)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _connect_if_needed(sock: socket.socket, host: str, port: int) -> None:
    if sock.type != socket.SOCK_DGRAM:
        raise InvalidArgumentError(f"the dial hook returned a {sock.type!r} socket; a UDP socket is needed")
    try:
        sock.getpeername()
    except OSError:
        sock.connect((host, port))
