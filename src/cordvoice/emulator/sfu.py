"""The emulator's UDP media server (SFU): IP discovery, authentication and per-receiver re-encryption.

One unconnected UDP socket per voice server. The voice gateway registers every voice session here (its SSRC
at Identify, its address and transport cipher at Select Protocol, its SSRC binding at the first op 5); the
server then:

* answers IP discovery requests for a registered SSRC with the address it saw;
* authenticates every RTP packet with the sender's key and mode, checks the SSRC, records its arrival
  (:class:`~cordvoice.emulator.inspection.RtpStats`), and forwards the payload (a DAVE frame is forwarded
  untouched) to every other member of the channel that finished Select Protocol, sealed with that
  receiver's key and nonce counter, keeping the sender's SSRC, sequence number, timestamp and marker;
* drops and counts everything else (``counters``, by reason): unknown addresses, packets before Select
  Protocol or before op 5, failed authentication, a transport nonce the client already used with its key
  (``replayed_nonce``), garbage, RTCP (counted, not forwarded). Discord is said to disconnect a client for
  RTP before op 5; here it is only counted, because op 5 comes by WebSocket and a correct client's first
  packet can overtake it.

This module owns the socket, so it is a thin shell around plain dictionaries; the only decisions on the
per-packet path are dictionary lookups. Hooks for fault injection: :attr:`MediaServer.forward_hook` sees
every forwarded datagram before it is sent (impairment goes there), :attr:`MediaServer.paused` drops all
traffic both ways, and :meth:`MediaServer.inject` sends raw bytes to a client.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import secrets
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeAlias

from cordvoice.emulator.inspection import RtpStats
from cordvoice.errors import DecryptionError, EmulatorError, InvalidArgumentError, ProtocolError
from cordvoice.udp import discovery
from cordvoice.udp.crypto import TransportCipher

__all__ = [
    "MAX_UDP_PAYLOAD",
    "RECEIVE_BUFFER",
    "Address",
    "ForwardHook",
    "MediaEndpoint",
    "MediaServer",
    "check_datagram_size",
    "enlarge_receive_buffer",
]

logger = logging.getLogger(__name__)

Address: TypeAlias = tuple[Any, ...]
"""A datagram peer address as asyncio reports it: ``(host, port)`` (IPv6 sockets add flow info and scope)."""

ForwardHook: TypeAlias = Callable[[bytes, Address, "MediaEndpoint", "MediaEndpoint"], None]
"""``hook(datagram, address, sender, receiver)`` replaces the direct send of one forwarded packet.

The hook owns the packet: it may drop it, duplicate it, hold it back or send it later with
:meth:`MediaServer.send_datagram`. It runs on the packet path, so it must not block.
"""

_MAX_DATAGRAM = 4096
#: The largest UDP payload over IPv4 (65,535 minus the IP and UDP headers).
MAX_UDP_PAYLOAD = 65_507
_SO_TIMESTAMPNS: int | None = getattr(socket, "SO_TIMESTAMPNS", None)
if _SO_TIMESTAMPNS is None and sys.platform == "linux" and platform.machine() in {"x86_64", "aarch64"}:
    _SO_TIMESTAMPNS = 35  # asm-generic/socket.h (x86 and arm); Python's socket module does not export it
_TIMESPEC = struct.Struct("@ll")
_ANCILLARY_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)
#: Datagrams read per wakeup before yielding to the rest of the loop.
READ_BATCH = 64
#: Receive buffer asked for (the kernel caps it at net.core.rmem_max): bursts from many senders must not
#: overflow the socket while the event loop is busy; loopback drops are silent otherwise.
RECEIVE_BUFFER = 4 << 20
#: Batches of READ_BATCH one timer read (MediaServer.read_every) takes before other callbacks get the loop.
_TIMER_READ_BATCHES = 16
_RTP_HEADER = 12
_RTCP_FIRST = 200
_RTCP_LAST = 204
_U32 = 0xFFFF_FFFF
#: Transport nonces below a client's highest that are still accepted once (reordered packets).
REPLAY_WINDOW = 64
_WINDOW_MASK = (1 << REPLAY_WINDOW) - 1


class MediaEndpoint:
    """One voice session as the media server knows it.

    ``address`` and ``cipher`` are set by Select Protocol; ``speaking_bound`` by the first op 5. ``stats``
    describe what the client sent; ``forwarded_to_client`` counts what the server sent it.
    """

    __slots__ = (
        "address",
        "channel_id",
        "cipher",
        "discovered_address",
        "forwarded_to_client",
        "nonce",
        "nonce_high",
        "nonce_window",
        "speaking_bound",
        "ssrc",
        "stats",
        "user_id",
    )

    def __init__(self, user_id: int, ssrc: int, channel_id: int) -> None:
        self.user_id = user_id
        self.ssrc = ssrc
        self.channel_id = channel_id
        self.address: Address | None = None
        self.discovered_address: Address | None = None
        self.cipher: TransportCipher | None = None
        self.nonce = 0
        self.nonce_high = -1
        """The highest transport nonce this client's authenticated packets carried (-1: none yet)."""
        self.nonce_window = 0
        """Bit ``k``: nonce ``nonce_high - k`` was used (the replay window)."""
        self.speaking_bound = False
        self.stats = RtpStats()
        self.forwarded_to_client = 0

    def seal(self, header: bytes, payload: bytes) -> bytes:
        """Seal a packet for this client with its key and the server's next nonce (for crafted packets)."""
        if self.cipher is None:
            raise EmulatorError(f"user {self.user_id} has not selected a transport mode yet")
        packet = self.cipher.seal(header, payload, self.nonce)
        self.nonce = (self.nonce + 1) & _U32
        return packet

    def fresh_nonce(self, nonce: int) -> bool:
        """Record an authenticated packet's transport nonce; False if this key already carried it.

        protocol.md §5.2: a nonce is never reused with one key (a client that restarts its counter on a
        resume does). A window of the :data:`REPLAY_WINDOW` nonces below the highest, as SRTP keeps
        (RFC 3711 §3.3.2), lets reordered packets through; a repeat, or a nonce older than the window, is not.
        """
        high = self.nonce_high
        if high < 0:
            self.nonce_high = nonce
            self.nonce_window = 1
            return True
        delta = ((nonce - high + 0x8000_0000) & _U32) - 0x8000_0000
        if delta > 0:
            window = (self.nonce_window << delta) | 1 if delta < REPLAY_WINDOW else 1
            self.nonce_window = window & _WINDOW_MASK
            self.nonce_high = nonce
            return True
        if -delta >= REPLAY_WINDOW:
            return False
        bit = 1 << -delta
        if self.nonce_window & bit:
            return False
        self.nonce_window |= bit
        return True

    def __repr__(self) -> str:
        return f"MediaEndpoint(user_id={self.user_id}, ssrc={self.ssrc}, address={self.address})"


def check_datagram_size(size: int) -> None:
    """Refuse a crafted datagram no UDP socket can send (it would fail in ``sendto``, counted but unsent)."""
    if size > MAX_UDP_PAYLOAD:
        raise InvalidArgumentError(f"a {size}-byte datagram exceeds UDP's {MAX_UDP_PAYLOAD}-byte payload")


def enlarge_receive_buffer(sock: socket.socket, size: int = RECEIVE_BUFFER) -> None:
    """Ask for a bigger UDP receive buffer; a refusal only costs headroom, so it is logged, not raised."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    except OSError as exc:
        logger.debug("could not enlarge the UDP receive buffer: %s", exc)


def _ask_for_timestamps(sock: socket.socket) -> bool:
    """Have the kernel stamp every datagram's arrival, where it can (Linux); False where it cannot."""
    if _SO_TIMESTAMPNS is None:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    except OSError as exc:
        logger.debug("no kernel arrival timestamps for the media server: %s", exc)
        return False
    return True


def _kernel_arrival(ancillary: list[tuple[int, int, bytes]], to_monotonic: float) -> float | None:
    """The arrival time the kernel stamped on a datagram, on the monotonic clock (None if it is missing)."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(data)
            arrival: float = seconds + nanoseconds * 1e-9 + to_monotonic
            return arrival
    return None


def _normalize(address: Address) -> Address:
    """``(host, port)``: IPv6 sockets report 4-tuples, Select Protocol carries only host and port."""
    return address if len(address) == 2 else (address[0], address[1])


class MediaServer:
    """The UDP side of one emulated voice server. Start it with :meth:`start`.

    It owns a non-blocking socket and drains it with ``loop.add_reader`` (up to :data:`READ_BATCH`
    datagrams per wakeup). asyncio's datagram transport reads one datagram per loop iteration, which at
    tens of thousands of packets per second costs more than everything else the server does per packet.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._by_ssrc: dict[int, MediaEndpoint] = {}
        self._by_address: dict[Address, MediaEndpoint] = {}
        self._discovered: dict[Address, MediaEndpoint] = {}
        self._channels: dict[int, list[MediaEndpoint]] = {}
        self.received = 0
        self.forwarded = 0
        self.counters: Counter[str] = Counter()
        """Everything not forwarded, by reason, plus ``discovery`` answers and ``rtcp`` packets."""
        self.paused = False
        """While True every datagram in and out is dropped (counted as ``paused``/``paused_out``)."""
        self.forward_hook: ForwardHook | None = None
        self._stamped = False
        """The kernel stamps each datagram's arrival (Linux ``SO_TIMESTAMPNS``): arrival statistics then
        measure the sender's pacing, not how long a datagram waited while this server was busy."""
        self._read_timer: asyncio.TimerHandle | None = None
        """Set while the socket is read on a timer (:meth:`read_every`) instead of whenever it is readable."""

    # ---- lifecycle -------------------------------------------------------------------------------

    @classmethod
    async def start(cls, host: str, port: int = 0) -> MediaServer:
        """Bind ``host:port`` (0: any free port) and start reading on the running loop."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        if not infos:
            raise EmulatorError(f"cannot resolve {host!r} for the media server")
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            enlarge_receive_buffer(sock)
            stamped = _ask_for_timestamps(sock)
            sock.bind(address)
        except BaseException:
            sock.close()
            raise
        server = cls(sock)
        server._stamped = stamped
        server._loop = loop
        loop.add_reader(sock.fileno(), server._read_ready)
        return server

    def close(self) -> None:
        """Stop reading and close the socket. Idempotent."""
        if self._sock.fileno() < 0:
            return
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        elif self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    @property
    def reads_on_timer(self) -> bool:
        """Whether :meth:`read_every` is in force."""
        return self._read_timer is not None

    def read_every(self, interval: float) -> None:
        """Read the socket every ``interval`` seconds instead of whenever a datagram makes it readable.

        For benchmarks on loopback: there the sender's ``send()`` also runs the receiving side's kernel path,
        so each datagram that wakes this server's sleeping process is a wake-up (an inter-processor interrupt
        on a virtual machine) charged to the sender's CPU, which a sender facing a real network never pays.
        A timer read takes that cost off the sender. It needs the kernel's arrival stamps, since a datagram
        now waits up to ``interval`` in the socket: the stamps keep the arrival statistics exact.
        """
        if not 0.0 < interval <= 1.0:
            raise InvalidArgumentError(f"interval must be in (0, 1] seconds, got {interval!r}")
        if not self._stamped:
            raise EmulatorError("timer reads need kernel arrival stamps, which this platform does not give")
        loop = self._loop
        if loop is None or self.closed or self._read_timer is not None:
            raise EmulatorError("the media server is closed or already reads on a timer")
        loop.remove_reader(self._sock.fileno())

        def read(due: float) -> None:
            # Drain the socket, but leave the loop to its other callbacks between batches of batches.
            drained = any(not self._read_ready() for _ in range(_TIMER_READ_BATCHES))
            due = max(due + interval, loop.time()) if drained else loop.time()
            self._read_timer = loop.call_at(due, read, due)

        first = loop.time() + interval
        self._read_timer = loop.call_at(first, read, first)

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the socket is bound to."""
        if self.closed:
            raise EmulatorError("the media server is closed")
        sockname = self._sock.getsockname()
        return str(sockname[0]), int(sockname[1])

    # ---- registration (driven by the voice gateway) -------------------------------------------------------

    def allocate_ssrc(self) -> int:
        """A random non-zero SSRC no registered session uses."""
        while True:
            ssrc = secrets.randbits(32)
            if ssrc and ssrc not in self._by_ssrc:
                return ssrc

    def register(self, user_id: int, ssrc: int, channel_id: int) -> MediaEndpoint:
        """A session identified: it may now run IP discovery for ``ssrc``."""
        if ssrc in self._by_ssrc:
            raise EmulatorError(f"SSRC {ssrc} is already registered")
        endpoint = MediaEndpoint(user_id, ssrc, channel_id)
        self._by_ssrc[ssrc] = endpoint
        return endpoint

    def select(self, endpoint: MediaEndpoint, address: Address, cipher: TransportCipher) -> None:
        """Select Protocol: packets from ``address`` are this session's; it receives the channel's audio."""
        address = _normalize(address)
        other = self._by_address.get(address)
        if other is not None and other is not endpoint:
            logger.info(
                "media address %s moves from user %d to user %d", address, other.user_id, endpoint.user_id
            )
            self._by_address.pop(address)
        if endpoint.address is not None:
            self._by_address.pop(endpoint.address, None)
        endpoint.address = address
        endpoint.cipher = cipher
        endpoint.nonce_high = -1  # a new key: no nonce used with it yet
        endpoint.nonce_window = 0
        self._by_address[address] = endpoint
        self._discovered.pop(address, None)
        receivers = self._channels.setdefault(endpoint.channel_id, [])
        if endpoint not in receivers:
            receivers.append(endpoint)

    def bind_speaking(self, endpoint: MediaEndpoint) -> None:
        """The session sent op 5: its RTP is accepted from now on."""
        endpoint.speaking_bound = True

    def unregister(self, endpoint: MediaEndpoint) -> None:
        """The session ended: forget its SSRC and address and stop sending it audio."""
        if self._by_ssrc.get(endpoint.ssrc) is endpoint:
            del self._by_ssrc[endpoint.ssrc]
        if endpoint.address is not None and self._by_address.get(endpoint.address) is endpoint:
            del self._by_address[endpoint.address]
        found = endpoint.discovered_address
        if found is not None and self._discovered.get(found) is endpoint:
            del self._discovered[found]
        receivers = self._channels.get(endpoint.channel_id)
        if receivers is not None and endpoint in receivers:
            receivers.remove(endpoint)
            if not receivers:
                del self._channels[endpoint.channel_id]

    def endpoint_for_ssrc(self, ssrc: int) -> MediaEndpoint | None:
        return self._by_ssrc.get(ssrc)

    def stop_forwarding_to(self, endpoint: MediaEndpoint) -> None:
        """Send ``endpoint`` none of its channel's audio any more; it stays registered and may still send.

        For load generators (``cordvoice bench``) whose members never read media: the SFU then seals and
        sends nothing for them. A new Select Protocol (a fresh voice session) forwards to it again.
        """
        receivers = self._channels.get(endpoint.channel_id)
        if receivers is not None and endpoint in receivers:
            receivers.remove(endpoint)

    # ---- datagrams -------------------------------------------------------------------------------

    def _read_ready(self) -> bool:
        """Read up to :data:`READ_BATCH` datagrams; True if the socket may hold more."""
        sock = self._sock
        stamped = self._stamped
        # Kernel stamps are wall-clock time; arrival statistics keep to the monotonic clock.
        to_monotonic = time.monotonic() - time.time()
        arrival: float | None = None
        for _ in range(READ_BATCH):
            try:
                if stamped:
                    data, ancillary, _flags, addr = sock.recvmsg(_MAX_DATAGRAM, _ANCILLARY_SPACE)
                    arrival = _kernel_arrival(ancillary, to_monotonic)
                else:
                    data, addr = sock.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:  # e.g. ICMP errors reported on the socket
                self.counters["socket_errors"] += 1
                logger.debug("media server socket error: %s", exc)
                continue
            try:
                self.datagram_received(data, addr, arrival)
            except Exception:  # a bug must cost one packet, not the server
                self.counters["internal_errors"] += 1
                logger.exception("media server failed on a %d-byte datagram", len(data))
        return True

    def datagram_received(self, data: bytes, addr: Address, arrival: float | None = None) -> None:  # hot path
        """Handle one datagram that arrived at ``arrival`` (``time.monotonic()`` seconds; None: now)."""
        self.received += 1
        if self.paused:
            self.counters["paused"] += 1
            return
        if len(addr) != 2:
            addr = (addr[0], addr[1])
        endpoint = self._by_address.get(addr)
        if endpoint is None or (len(data) == discovery.PACKET_SIZE and data[0] == 0):
            self._not_media(data, addr, endpoint)
            return
        if len(data) < _RTP_HEADER:
            self.counters["short"] += 1  # keepalives (discord.js sends 8 bytes) and scraps
            return
        if _RTCP_FIRST <= data[1] <= _RTCP_LAST:
            self.counters["rtcp"] += 1
            return
        if not endpoint.speaking_bound:
            self.counters["before_speaking"] += 1
            return
        cipher = endpoint.cipher
        assert cipher is not None  # set together with the address
        try:
            sequence, timestamp, ssrc, payload = cipher.open_rtp_fields(data)
        except DecryptionError:
            endpoint.stats.undecryptable += 1
            self.counters["undecryptable"] += 1
            return
        except ProtocolError:
            self.counters["malformed"] += 1
            return
        if ssrc != endpoint.ssrc:
            self.counters["wrong_ssrc"] += 1
            return
        if not endpoint.fresh_nonce(int.from_bytes(data[-4:], "big")):
            endpoint.stats.replayed_nonces += 1
            self.counters["replayed_nonce"] += 1
            return
        if arrival is None:
            arrival = time.monotonic()
        endpoint.stats.record(sequence, timestamp, len(payload), arrival)
        receivers = self._channels.get(endpoint.channel_id)
        if receivers is None or len(receivers) < 2:
            return
        clear = b"\x80" + data[1:_RTP_HEADER]  # no CSRCs or extension: those were stripped by open_rtp
        sendto = self._sendto
        hook = self.forward_hook
        for receiver in receivers:
            if receiver is endpoint:
                continue
            packet = receiver.cipher.seal(clear, payload, receiver.nonce)  # type: ignore[union-attr]
            receiver.nonce = (receiver.nonce + 1) & _U32
            receiver.forwarded_to_client += 1
            self.forwarded += 1
            if hook is not None:
                hook(packet, receiver.address, endpoint, receiver)  # type: ignore[arg-type]
            else:
                sendto(packet, receiver.address)  # type: ignore[arg-type]

    def _not_media(self, data: bytes, addr: Address, endpoint: MediaEndpoint | None) -> None:
        """IP discovery, or a datagram from an address that has not finished Select Protocol."""
        if len(data) == discovery.PACKET_SIZE and data[:2] == b"\x00\x01":
            try:
                ssrc = discovery.parse_request(data)
            except ProtocolError:
                self.counters["discovery_malformed"] += 1
                return
            owner = self._by_ssrc.get(ssrc)
            if owner is None:
                self.counters["discovery_unknown_ssrc"] += 1
                return
            if owner.discovered_address is not None and owner.address is None:
                self._discovered.pop(owner.discovered_address, None)
            owner.discovered_address = addr
            if owner.address is None:
                self._discovered[addr] = owner
            self.counters["discovery"] += 1
            self.send_datagram(discovery.build_response(ssrc, str(addr[0]), int(addr[1])), addr)
            return
        if endpoint is not None:
            self.counters["malformed"] += 1  # starts like a discovery packet but is not a request
            return
        if addr in self._discovered:
            self.counters["before_select_protocol"] += 1
        else:
            self.counters["unknown_address"] += 1

    # ---- sending outside the forwarding path -----------------------------------------------------

    def send_datagram(self, datagram: bytes, address: Address) -> None:
        """Send one datagram now (used by forward hooks that delay or duplicate, and by :meth:`inject`)."""
        if self.paused:
            self.counters["paused_out"] += 1
            return
        self._sendto(datagram, address)

    def _sendto(self, datagram: bytes, address: Address) -> None:
        try:
            self._sock.sendto(datagram, address)
        except OSError as exc:  # a full socket buffer, a closed socket, an unreachable address
            self.counters["send_errors"] += 1
            logger.debug("media server could not send to %s: %s", address, exc)

    def inject(self, endpoint: MediaEndpoint, datagram: bytes) -> None:
        """Send raw crafted bytes to a client's media address (after its Select Protocol)."""
        check_datagram_size(len(datagram))
        if endpoint.address is None:
            raise EmulatorError(f"user {endpoint.user_id} has no media address yet (no Select Protocol)")
        self.counters["injected"] += 1
        self.send_datagram(datagram, endpoint.address)
