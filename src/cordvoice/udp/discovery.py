"""UDP IP discovery (protocol.md §4.1): the 74-byte request a client sends and the response the SFU returns.

Both directions live here because the emulator answers discovery with the same code the client parses.
Layout, big-endian: ``type u16 | length u16 (=70) | ssrc u32 | address 64 bytes | port u16``. The request
leaves address and port zeroed; the response carries the client's external IPv4/IPv6 address as ASCII,
NUL-terminated and NUL-padded.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from cordvoice.errors import InvalidArgumentError, ProtocolError

__all__ = [
    "PACKET_SIZE",
    "REQUEST_TYPE",
    "RESPONSE_TYPE",
    "DiscoveryResult",
    "build_request",
    "build_response",
    "parse_request",
    "parse_response",
]

PACKET_SIZE = 74
REQUEST_TYPE = 1
RESPONSE_TYPE = 2
_LENGTH = 70
_ADDRESS_SIZE = 64
_PACKET = struct.Struct(">HHI64sH")


@dataclass(frozen=True, slots=True)
class DiscoveryResult:
    """The client's address as the media server sees it, to send in Select Protocol."""

    ssrc: int
    address: str
    port: int


def build_request(ssrc: int) -> bytes:
    """The 74-byte discovery request for ``ssrc`` (from Ready)."""
    _check_ssrc(ssrc)
    return _PACKET.pack(REQUEST_TYPE, _LENGTH, ssrc, b"", 0)


def build_response(ssrc: int, address: str, port: int) -> bytes:
    """The 74-byte discovery response the media server sends back."""
    _check_ssrc(ssrc)
    if not 0 <= port <= 0xFFFF:
        raise InvalidArgumentError(f"port {port} is outside 0..65535")
    try:
        encoded = str(ipaddress.ip_address(address)).encode("ascii")
    except ValueError:
        raise InvalidArgumentError(f"{address!r} is not an IP address") from None
    if len(encoded) >= _ADDRESS_SIZE:  # only a long IPv6 scope id can get here; keep room for the NUL
        raise InvalidArgumentError(f"address {address!r} does not fit the {_ADDRESS_SIZE}-byte field")
    return _PACKET.pack(RESPONSE_TYPE, _LENGTH, ssrc, encoded, port)


def parse_request(data: bytes) -> int:
    """Return the SSRC of a discovery request. Raises ProtocolError if ``data`` is not one.

    The zeroed address and port fields are not checked: they carry nothing, and clients differ.
    """
    return _unpack(data, REQUEST_TYPE)[2]


def parse_response(data: bytes) -> DiscoveryResult:
    """Parse a discovery response. Raises ProtocolError if ``data`` is not a valid one."""
    _, _, ssrc, raw_address, port = _unpack(data, RESPONSE_TYPE)
    text = raw_address.split(b"\0", 1)[0]
    try:
        address = str(ipaddress.ip_address(text.decode("ascii")))
    except ValueError:  # UnicodeDecodeError is a ValueError too
        raise ProtocolError(f"IP discovery response carries no IP address: {text[:64]!r}") from None
    return DiscoveryResult(ssrc=ssrc, address=address, port=port)


def _unpack(data: bytes, expected_type: int) -> tuple[int, int, int, bytes, int]:
    if len(data) != PACKET_SIZE:
        raise ProtocolError(f"IP discovery packet must be {PACKET_SIZE} bytes, got {len(data)}")
    packet_type, length, ssrc, address, port = _PACKET.unpack(data)
    if packet_type != expected_type:
        raise ProtocolError(f"IP discovery packet has type {packet_type}, expected {expected_type}")
    if length != _LENGTH:
        raise ProtocolError(f"IP discovery packet has length field {length}, expected {_LENGTH}")
    return packet_type, length, ssrc, address, port


def _check_ssrc(ssrc: int) -> None:
    if not 0 <= ssrc <= 0xFFFF_FFFF:
        raise InvalidArgumentError(f"ssrc {ssrc} is outside 0..2**32-1")
