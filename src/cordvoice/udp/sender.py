"""Turn Opus frames into sealed RTP packets for one SSRC, keeping sequence, timestamp and nonce counters.

Sans-IO: :meth:`RtpSender.build` returns the datagram; the caller sends it. The counters live here, not in
the socket layer, because they must survive a voice resume (same SSRC, same key, no nonce reuse) and because
the emulator's simulated participants use the same class.
"""

from __future__ import annotations

import logging

from cordvoice.errors import InvalidArgumentError
from cordvoice.udp.crypto import TransportCipher
from cordvoice.udp.rtp import FRAME_SAMPLES, HEADER_STRUCT, OPUS_PAYLOAD_TYPE, RTP_VERSION

__all__ = ["RtpSender"]

logger = logging.getLogger(__name__)

_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF
_BYTE0 = RTP_VERSION << 6


class RtpSender:
    """Seal one 20 ms Opus frame per call, advancing sequence (+1), timestamp (+960) and nonce (+1).

    All three counters wrap (2**16, 2**32, 2**32). The nonce wrapping would reuse a nonce with the same key,
    but only after 2**32 packets (2.7 years of continuous audio); it is logged if it ever happens.
    """

    __slots__ = ("_cipher", "_nonce", "_sequence", "_ssrc", "_timestamp")

    def __init__(
        self,
        ssrc: int,
        cipher: TransportCipher,
        *,
        sequence: int = 0,
        timestamp: int = 0,
        nonce: int = 0,
    ) -> None:
        _check("ssrc", ssrc, _U32)
        _check("sequence", sequence, _U16)
        _check("timestamp", timestamp, _U32)
        _check("nonce", nonce, _U32)
        self._ssrc = ssrc
        self._cipher = cipher
        self._sequence = sequence
        self._timestamp = timestamp
        self._nonce = nonce

    @property
    def ssrc(self) -> int:
        return self._ssrc

    @property
    def cipher(self) -> TransportCipher:
        return self._cipher

    @property
    def sequence(self) -> int:
        """Sequence number the next packet will carry."""
        return self._sequence

    @property
    def timestamp(self) -> int:
        """RTP timestamp the next packet will carry."""
        return self._timestamp

    @property
    def nonce(self) -> int:
        """Transport nonce counter the next packet will use."""
        return self._nonce

    def build(self, payload: bytes) -> bytes:
        """Return the sealed RTP packet for one 20 ms frame and advance the counters.

        This runs once per packet of every stream, so the header is packed here (every field is in range by
        construction) and sealed with :meth:`TransportCipher.seal_rtp`, which skips the general checks.
        """
        sequence, timestamp, nonce = self._sequence, self._timestamp, self._nonce
        if type(payload) is not bytes:
            payload = bytes(payload)
        header = HEADER_STRUCT.pack(_BYTE0, OPUS_PAYLOAD_TYPE, sequence, timestamp, self._ssrc)
        packet = self._cipher.seal_rtp(header, payload, nonce)
        self._sequence = (sequence + 1) & _U16
        self._timestamp = (timestamp + FRAME_SAMPLES) & _U32
        self._nonce = nonce = (nonce + 1) & _U32
        if not nonce:
            logger.warning("RTP nonce counter wrapped for ssrc %d; the next packets reuse nonces", self._ssrc)
        return packet

    def skip(self, frames: int = 1) -> None:
        """Advance the timestamp by ``frames`` 20 ms frames without sending, to mark a gap in the audio.

        The sequence number is not advanced: receivers would count the missing numbers as lost packets.
        """
        if frames < 0:
            raise InvalidArgumentError(f"cannot skip a negative number of frames ({frames})")
        self._timestamp = (self._timestamp + frames * FRAME_SAMPLES) & _U32

    def __repr__(self) -> str:
        return (
            f"RtpSender(ssrc={self._ssrc}, mode={self._cipher.mode!r}, sequence={self._sequence}, "
            f"timestamp={self._timestamp}, nonce={self._nonce})"
        )


def _check(name: str, value: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise InvalidArgumentError(f"{name} must be an integer 0..{maximum}, got {value!r}")
