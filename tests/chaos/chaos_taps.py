"""Where the chaos run counts frames: the bots' UDP sockets, the media servers' input, the kernel.

* :class:`RecordingSocket` is what the bots' ``dial`` hook (the public ``udp.DialFunc`` seam) hands cordvoice:
  a real UDP socket that counts every datagram the kernel accepted, by kind, and for RTP the SSRC and
  sequence number (read from the clear RTP header).
* :class:`SfuTap` wraps one media server's ``datagram_received`` (an instance attribute, so only that server
  is affected) and records, for every datagram, who sent it and what became of it: the drop counter it moved
  (``before_speaking``, ``paused``, ``unknown_address``, ...) or ``accepted``; and for accepted RTP, which
  receivers got a copy (their endpoint's ``forwarded_to_client`` moved), with SSRC and sequence.
* :func:`udp_drops` reads the kernel's per-socket drop counters from ``/proc/net/udp``.
"""

from __future__ import annotations

import socket
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cordvoice.emulator.sfu import MediaEndpoint, MediaServer

DISCOVERY_REQUEST = 74


def classify(data: bytes) -> tuple[str, int, int]:
    """``(kind, ssrc, sequence)`` of a datagram a client sends: rtp, keepalive, discovery or other."""
    size = len(data)
    if size == DISCOVERY_REQUEST and data[:2] == b"\x00\x01":
        return "discovery", int.from_bytes(data[4:8], "big"), 0
    if size == 8:
        return "keepalive", 0, 0
    if size >= 12 and data[0] >> 6 == 2 and not 200 <= data[1] <= 204:
        return "rtp", int.from_bytes(data[8:12], "big"), int.from_bytes(data[2:4], "big")
    return "other", 0, 0


class RecordingSocket(socket.socket):
    """A UDP socket that remembers what the kernel accepted from it (see the module docstring)."""

    def setup(self, owner: int) -> None:
        self.owner = owner
        self.kinds: Counter[str] = Counter()
        self.rtp_by_ssrc: dict[int, list[int]] = {}
        self.local = self.getsockname()

    def _record(self, data: bytes) -> None:
        kind, ssrc, sequence = classify(bytes(data))
        self.kinds[kind] += 1
        if kind == "rtp":
            self.rtp_by_ssrc.setdefault(ssrc, []).append(sequence)

    def send(self, data: Any, flags: int = 0) -> int:
        sent = super().send(data, flags)
        self._record(data)
        return sent

    def sendto(self, data: Any, *args: Any) -> int:  # type: ignore[override]
        sent = super().sendto(data, *args)
        self._record(data)
        return sent


@dataclass
class SendRecorder:
    """The dial hook of one bot: every socket it handed out, in order."""

    owner: int
    sockets: list[RecordingSocket] = field(default_factory=list)

    async def dial(self, host: str, port: int) -> socket.socket:
        sock = RecordingSocket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(("127.0.0.1", 0))
            sock.setup(self.owner)
        except BaseException:
            sock.close()
            raise
        self.sockets.append(sock)
        return sock


@dataclass
class SfuTap:
    """Attribution of everything one media server received (see the module docstring)."""

    media: MediaServer
    ignored: frozenset[int] = frozenset()
    """Receivers whose copies are not attributed (the bots: only the recorders' ledgers need them)."""
    outcomes: Counter[tuple[tuple[Any, ...], str, str]] = field(default_factory=Counter)
    """(source address, kind, outcome) -> datagrams."""
    rtp_outcomes: Counter[tuple[int, str]] = field(default_factory=Counter)
    """(SSRC, outcome) -> RTP datagrams."""
    forwarded: dict[int, Counter[tuple[int, int]]] = field(default_factory=dict)
    """Receiver user id -> (SSRC, sequence) copies the server sealed for it."""
    forwarded_count: Counter[int] = field(default_factory=Counter)
    datagrams: int = 0

    def install(self) -> None:
        original = self.media.datagram_received
        counters = self.media.counters

        def tapped(data: bytes, addr: Any, arrival: float | None = None) -> None:
            self.datagrams += 1
            before = counters.copy()
            kind, ssrc, sequence = classify(data)
            # Everyone in the sender's channel, as the server sees it now: a recorder is counted from its
            # endpoint's first packet, even one forwarded before the chaos world had heard of it.
            sender = self.media.endpoint_for_ssrc(ssrc) if kind == "rtp" else None
            receivers: list[MediaEndpoint] = self.media._channels.get(sender.channel_id, []) if sender else []
            listening = [(e, e.forwarded_to_client) for e in receivers if e.user_id not in self.ignored]
            original(data, addr, arrival)
            moved = counters - before
            outcome = next(iter(moved)) if moved else "accepted"
            self.outcomes[(tuple(addr[:2]), kind, outcome)] += 1
            if kind != "rtp":
                return
            self.rtp_outcomes[(ssrc, outcome)] += 1
            for endpoint, count in listening:
                copies = endpoint.forwarded_to_client - count
                if copies:
                    self.forwarded.setdefault(endpoint.user_id, Counter())[(ssrc, sequence)] += copies
                    self.forwarded_count[endpoint.user_id] += copies

        self.media.datagram_received = tapped  # type: ignore[method-assign]


def udp_drops() -> dict[int, int]:
    """Local UDP port -> datagrams the kernel dropped on that socket (``drops`` in /proc/net/udp[6])."""
    drops: dict[int, int] = {}
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        path = Path(name)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) < 13:
                continue
            port = int(fields[1].rsplit(":", 1)[1], 16)
            drops[port] = drops.get(port, 0) + int(fields[12])
    return drops
