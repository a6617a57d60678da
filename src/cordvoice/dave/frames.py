"""Recognising DAVE media frames without decrypting them (protocol.md §6.6).

davey reports every decryption failure the same way, so the receive path needs its own look at the bytes
to tell "a DAVE frame we have no key for yet" (worth holding) from "plain or garbage bytes" (not).
"""

from __future__ import annotations

__all__ = ["MAGIC_MARKER", "OPUS_SILENCE", "is_dave_frame"]

OPUS_SILENCE = b"\xf8\xff\xfe"
"""The Opus silence frame; it always travels unencrypted."""

MAGIC_MARKER = b"\xfa\xfa"
_TAG_SIZE = 8
_MIN_SUPPLEMENTAL = _TAG_SIZE + 1 + 1 + 2  # tag, 1-byte nonce, size byte, marker


def _uleb128(data: bytes, pos: int, end: int) -> tuple[int, int] | None:
    value = 0
    shift = 0
    while pos < end and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None


def is_dave_frame(frame: bytes) -> bool:
    """True when ``frame`` has a well-formed DAVE footer (the libdave "protocol frame" check).

    Footer: ``tag(8) | ULEB128 nonce | ULEB128 (offset, length) ranges | supplemental size u8 | FA FA``,
    with ranges ascending, non-overlapping and inside the encrypted part.
    """
    size = len(frame)
    if size < _MIN_SUPPLEMENTAL or frame[-2:] != MAGIC_MARKER:
        return False
    supplemental = frame[-3]
    if supplemental < _MIN_SUPPLEMENTAL or supplemental > size:
        return False
    body_size = size - supplemental
    pos = body_size + _TAG_SIZE
    end = size - 3
    nonce = _uleb128(frame, pos, end)
    if nonce is None:
        return False
    pos = nonce[1]
    previous_end = 0
    while pos < end:
        offset = _uleb128(frame, pos, end)
        if offset is None:
            return False
        length = _uleb128(frame, offset[1], end)
        if length is None:
            return False
        pos = length[1]
        if offset[0] < previous_end or offset[0] + length[0] > body_size:
            return False
        previous_end = offset[0] + length[0]
    return pos == end
