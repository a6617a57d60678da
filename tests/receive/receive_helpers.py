"""Shared helpers for the receive tests: RTP packet builders, signal metrics, the in-memory DAVE group."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from cordvoice.audio.opus import OpusEncoder
from cordvoice.audio.pcm import iter_frames
from cordvoice.bench.dave_group import DaveGroup
from cordvoice.udp.rtp import RtpHeader, build_header, parse_rtp

FloatArray = npt.NDArray[np.float64]


def rtp_header(sequence: int, timestamp: int, ssrc: int) -> RtpHeader:
    return parse_rtp(build_header(sequence & 0xFFFF, timestamp & 0xFFFF_FFFF, ssrc))


def encode_pcm(pcm: bytes, *, fec: bool = False) -> list[bytes]:
    """Opus packets (20 ms each) for 48 kHz stereo s16 PCM."""
    encoder = OpusEncoder(bitrate=64_000, fec=fec, expected_loss=10 if fec else 0)
    return [encoder.encode(frame) for frame in iter_frames(pcm)]


def to_mono(pcm: bytes) -> FloatArray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64).reshape(-1, 2).mean(axis=1) / 32768.0


def best_lag(ref: FloatArray, out: FloatArray, max_lag: int) -> int:
    """The lag in [-max_lag, max_lag] by which ``out`` trails ``ref`` (FFT cross-correlation)."""
    size = 1 << int(np.ceil(np.log2(len(ref) + len(out) + 2 * max_lag)))
    spectrum = np.fft.rfft(out, size) * np.conj(np.fft.rfft(ref, size))
    corr = np.fft.irfft(spectrum, size)
    candidates = np.concatenate((corr[-max_lag:], corr[: max_lag + 1]))
    return int(np.argmax(candidates)) - max_lag


def aligned_correlation(ref: FloatArray, out: FloatArray, max_lag: int = 48_000) -> tuple[float, int]:
    """(Pearson correlation after the best alignment, lag in samples)."""
    lag = best_lag(ref, out, max_lag)
    if lag >= 0:
        a, b = ref, out[lag:]
    else:
        a, b = ref[-lag:], out
    length = min(len(a), len(b))
    if length < 480:
        return 0.0, lag
    return float(np.corrcoef(a[:length], b[:length])[0, 1]), lag


__all__ = [
    "DaveGroup",
    "FloatArray",
    "aligned_correlation",
    "best_lag",
    "encode_pcm",
    "rtp_header",
    "to_mono",
]
