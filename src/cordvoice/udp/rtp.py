"""RTP as Discord voice uses it (protocol.md §4.2-4.5): build our fixed header, parse anyone's.

We always send the plain 12-byte header (V=2, no padding, no extension, no CSRCs, PT 120). Other clients
and the SFU may send CSRCs, a header extension and padding, so the parser handles all of them and reports
the clear header length that the rtpsize AEAD modes use as associated data.

Sequence numbers (16 bit) and timestamps (32 bit) wrap; the ``*_add`` and ``*_delta`` helpers do the
modular arithmetic so no caller has to remember the masks.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from cordvoice.errors import InvalidArgumentError, ProtocolError

__all__ = [
    "FRAME_DURATION",
    "FRAME_SAMPLES",
    "HEADER_SIZE",
    "HEADER_STRUCT",
    "OPUS_PAYLOAD_TYPE",
    "OPUS_SILENCE",
    "RTCP_CLEAR_SIZE",
    "RTP_VERSION",
    "SAMPLE_RATE",
    "RtpHeader",
    "build_header",
    "is_rtcp",
    "parse_rtp",
    "seq_add",
    "seq_delta",
    "ts_add",
    "ts_delta",
]

RTP_VERSION = 2
OPUS_PAYLOAD_TYPE = 120
#: The 3-byte Opus frame every client sends (five times) when it stops talking.
OPUS_SILENCE = b"\xf8\xff\xfe"
SAMPLE_RATE = 48_000
#: Samples per channel in one 20 ms Opus frame: the timestamp step per packet.
FRAME_SAMPLES = 960
FRAME_DURATION = 0.020
HEADER_SIZE = 12
#: RTCP packets in rtpsize modes keep their first 8 bytes (header + sender SSRC) in clear.
RTCP_CLEAR_SIZE = 8

_BYTE0 = RTP_VERSION << 6  # 0x80: V=2, P=0, X=0, CC=0
_BYTE1 = OPUS_PAYLOAD_TYPE  # 0x78: M=0, PT=120
HEADER_STRUCT = struct.Struct(">BBHII")
"""Our fixed 12-byte header: first byte, second byte, sequence, timestamp, SSRC."""
_EXTENSION_PREAMBLE = struct.Struct(">HH")
_CSRCS = tuple(struct.Struct(f">{count}I") for count in range(16))
_RTCP_FIRST = 200
_RTCP_LAST = 204


class RtpHeader(NamedTuple):
    """The clear part of an RTP packet.

    ``header_length`` is the clear header size in bytes (12 + 4 per CSRC + 4 for an extension preamble):
    the AAD of the rtpsize modes, and where the ciphertext starts. ``extension_length`` is the encrypted
    extension body's size in 32-bit words (0 without an extension).

    A NamedTuple rather than a frozen dataclass: it is built for every received packet, and a frozen
    dataclass's ``__init__`` costs about 1.5 µs more for these 13 fields.
    """

    version: int
    padding: bool
    extension: bool
    csrc_count: int
    marker: bool
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    csrcs: tuple[int, ...]
    header_length: int
    extension_profile: int = 0
    extension_length: int = 0


def build_header(sequence: int, timestamp: int, ssrc: int) -> bytes:
    """Our 12-byte RTP header for one Opus packet."""
    try:
        return HEADER_STRUCT.pack(_BYTE0, _BYTE1, sequence, timestamp, ssrc)
    except struct.error:
        raise InvalidArgumentError(
            f"RTP header fields out of range: sequence={sequence} (u16), timestamp={timestamp} (u32), "
            f"ssrc={ssrc} (u32)"
        ) from None


def is_rtcp(packet: bytes) -> bool:
    """True for RTCP: the whole second byte is 200..204 (masking off the marker bit would misfire)."""
    return len(packet) >= 2 and _RTCP_FIRST <= packet[1] <= _RTCP_LAST


def parse_rtp(packet: bytes) -> RtpHeader:
    """Parse the clear header of an RTP packet. Raises ProtocolError if it is not RTP or is truncated."""
    size = len(packet)
    if size < HEADER_SIZE:
        raise ProtocolError(f"RTP packet of {size} bytes is shorter than the 12-byte header")
    byte0, byte1, sequence, timestamp, ssrc = HEADER_STRUCT.unpack_from(packet)
    if _RTCP_FIRST <= byte1 <= _RTCP_LAST:
        raise ProtocolError(f"packet type byte {byte1} is RTCP, not RTP")
    version = byte0 >> 6
    if version != RTP_VERSION:
        raise ProtocolError(f"RTP version {version}, expected {RTP_VERSION}")
    csrc_count = byte0 & 0x0F
    has_extension = bool(byte0 & 0x10)
    header_length = HEADER_SIZE + 4 * csrc_count
    clear_length = header_length + 4 if has_extension else header_length
    if size < clear_length:
        raise ProtocolError(
            f"RTP packet of {size} bytes is shorter than its {clear_length}-byte clear header"
        )
    csrcs: tuple[int, ...] = _CSRCS[csrc_count].unpack_from(packet, HEADER_SIZE) if csrc_count else ()
    profile = extension_length = 0
    if has_extension:
        profile, extension_length = _EXTENSION_PREAMBLE.unpack_from(packet, header_length)
    # Positional on purpose: keyword construction of a 13-field NamedTuple costs a third more.
    return RtpHeader(
        version,
        bool(byte0 & 0x20),
        has_extension,
        csrc_count,
        bool(byte1 & 0x80),
        byte1 & 0x7F,
        sequence,
        timestamp,
        ssrc,
        csrcs,
        clear_length,
        profile,
        extension_length,
    )


def seq_add(sequence: int, count: int) -> int:
    """``sequence + count`` modulo 2**16."""
    return (sequence + count) & 0xFFFF


def seq_delta(a: int, b: int) -> int:
    """How far sequence ``a`` is ahead of ``b``, in -32768..32767 (negative: ``a`` is older)."""
    return ((a - b + 0x8000) & 0xFFFF) - 0x8000


def ts_add(timestamp: int, samples: int) -> int:
    """``timestamp + samples`` modulo 2**32."""
    return (timestamp + samples) & 0xFFFF_FFFF


def ts_delta(a: int, b: int) -> int:
    """How far timestamp ``a`` is ahead of ``b``, in -2**31..2**31-1."""
    return ((a - b + 0x8000_0000) & 0xFFFF_FFFF) - 0x8000_0000
