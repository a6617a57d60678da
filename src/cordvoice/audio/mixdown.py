"""The codec-thread half of the player: decode what must be mixed, mix it, and encode the result.

The player decides on the event loop, once per output frame, which tracks contribute which frame at which
gain (that is cheap and keeps every state change in one thread). This module then does the expensive part
on a codec worker thread, a few frames at a time: decode mixed Opus tracks, sum the PCM with
:func:`~cordvoice.audio.mixer.mix` (soft clipping), and Opus-encode with the session's encoder. libopus
releases the GIL, so this runs beside the event loop instead of stalling it for ~150 µs per frame.

Each session owns one :class:`EncoderSlot` and each mixed Opus track one :class:`DecoderSlot`. The player
never runs two render jobs of a session at once, so a slot is only ever used by one thread at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final, NamedTuple, TypeAlias

from cordvoice.audio.mixer import mix
from cordvoice.audio.opus import OpusDecoder, OpusEncoder, check_setting
from cordvoice.audio.pcm import FRAME_BYTES, SILENCE_FRAME
from cordvoice.errors import AudioError

__all__ = ["DecoderSlot", "EncoderSlot", "MixFrame", "MixInput", "render"]

logger = logging.getLogger(__name__)

MIN_BITRATE: Final = 6_000
MAX_BITRATE: Final = 510_000


class DecoderSlot:
    """The Opus decoder of one track that is being mixed, created on first use on a codec thread."""

    __slots__ = ("decoder", "errors")

    def __init__(self) -> None:
        self.decoder: OpusDecoder | None = None
        self.errors = 0
        """Packets that failed to decode and were concealed."""

    def decode(self, packet: bytes) -> bytes:
        decoder = self.decoder
        if decoder is None:
            decoder = self.decoder = OpusDecoder()
        try:
            pcm = decoder.decode(packet)
        except AudioError:
            self.errors += 1
            return decoder.conceal() if decoder.has_plc else SILENCE_FRAME
        if len(pcm) != FRAME_BYTES:  # a packet that is not 20 ms: keep the frame grid, count it
            self.errors += 1
            return (pcm + SILENCE_FRAME)[:FRAME_BYTES]
        return pcm

    def close(self) -> None:
        decoder, self.decoder = self.decoder, None
        if decoder is not None:
            decoder.close()


class EncoderSlot:
    """A session's Opus encoder settings, and the encoder itself once the first mix needs it.

    ``bitrate`` may be changed from the event loop at any time; the next encoded frame uses it.
    """

    def __init__(self, *, bitrate: int, fec: bool, expected_loss: int, complexity: int) -> None:
        check_bitrate(bitrate)
        check_setting("expected_loss", expected_loss, 0, 100, " (percent)")
        check_setting("complexity", complexity, 0, 10)
        self.bitrate = bitrate
        self.fec = fec
        self.expected_loss = expected_loss
        self.complexity = complexity
        self._encoder: OpusEncoder | None = None

    def encode(self, pcm: bytes) -> bytes:
        return self._current().encode(pcm)

    def encode_frames(self, frames: Sequence[bytes]) -> list[bytes]:
        """Encode several frames in order (one lock acquisition in the encoder)."""
        return self._current().encode_frames(frames)

    def _current(self) -> OpusEncoder:
        """The encoder, created on first use and brought to the bitrate the loop last set."""
        encoder = self._encoder
        if encoder is None:
            encoder = self._encoder = OpusEncoder(
                bitrate=self.bitrate,
                fec=self.fec,
                expected_loss=self.expected_loss,
                complexity=self.complexity,
                vbr="constrained",
            )
        elif encoder.bitrate != self.bitrate:
            encoder.set_bitrate(self.bitrate)
        return encoder

    def close(self) -> None:
        encoder, self._encoder = self._encoder, None
        if encoder is not None:
            encoder.close()


def check_bitrate(bitrate: int) -> None:
    check_setting("bitrate", bitrate, MIN_BITRATE, MAX_BITRATE, " bit/s")


class MixInput(NamedTuple):
    """One track's contribution to one output frame."""

    data: bytes
    """A PCM frame, or an Opus packet when ``decoder`` is set."""
    gain: float
    decoder: DecoderSlot | None


MixFrame: TypeAlias = bytes | Sequence[MixInput]
"""One output frame to render: what to mix, or just ``bytes`` for one PCM frame at unity gain (the usual
case, a single PCM track playing: it goes to the encoder as it is, with no mixing)."""


def render(frames: Sequence[MixFrame], encoder: EncoderSlot) -> list[bytes]:
    """Mix and encode each output frame; runs on a codec thread. Returns one Opus packet per frame."""
    unmixed = [frame for frame in frames if isinstance(frame, bytes)]
    if len(unmixed) == len(frames):
        return encoder.encode_frames(unmixed)
    packets: list[bytes] = []
    for inputs in frames:
        if isinstance(inputs, bytes):
            packets.append(encoder.encode(inputs))
            continue
        pcm: list[bytes] = []
        gains: list[float] = []
        for data, gain, decoder in inputs:
            if gain == 0.0:
                if decoder is not None:
                    decoder.decode(data)  # keep the decoder's state continuous through a mute
                continue
            pcm.append(data if decoder is None else decoder.decode(data))
            gains.append(gain)
        mixed = mix(pcm, gains) if pcm else SILENCE_FRAME
        packets.append(encoder.encode(mixed))
    return packets
