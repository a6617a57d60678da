"""Signal comparison helpers shared by the audio tests (numpy only)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from cordvoice.bench.encode import encode_container

FloatArray = npt.NDArray[np.float64]


def to_float(pcm: bytes) -> FloatArray:
    """Interleaved s16le stereo bytes -> (samples, 2) float array in [-1, 1)."""
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64).reshape(-1, 2) / 32768.0


class Match(NamedTuple):
    lag: int
    """Samples by which ``out`` lags ``ref``."""
    correlation: float
    """Pearson correlation of the aligned signals (both channels)."""
    snr_db: float
    """Aligned signal-to-error ratio."""


def best_lag(ref: FloatArray, out: FloatArray, max_lag: int) -> int:
    """The lag in [0, max_lag] maximising the cross-correlation of two mono signals (FFT based)."""
    size = 1 << int(np.ceil(np.log2(len(ref) + len(out))))
    spectrum = np.fft.rfft(out, size) * np.conj(np.fft.rfft(ref, size))
    correlation = np.fft.irfft(spectrum, size)[: max_lag + 1]
    return int(np.argmax(correlation))


def compare(ref_pcm: bytes, out_pcm: bytes, max_lag: int = 2000) -> Match:
    """Align ``out`` to ``ref`` (``out`` may be delayed by up to ``max_lag`` samples) and measure them."""
    ref = to_float(ref_pcm)
    out = to_float(out_pcm)
    lag = best_lag(ref.mean(axis=1), out.mean(axis=1), max_lag)
    length = min(len(ref), len(out) - lag)
    a = ref[:length].ravel()
    b = out[lag : lag + length].ravel()
    correlation = float(np.corrcoef(a, b)[0, 1])
    error = float(np.sum((a - b) ** 2)) or 1e-20
    return Match(lag, correlation, 10.0 * np.log10(float(np.sum(a**2)) / error))


def write_container(
    pcm: bytes,
    container_format: str,
    codec: str,
    *,
    rate: int = 48_000,
    layout: str = "stereo",
    sample_format: str = "s16",
    options: dict[str, str] | None = None,
    bit_rate: int | None = None,
) -> bytes:
    """Encode 48 kHz stereo s16 PCM into a container (test fixtures: Ogg, WebM, MP3, WAV), s16 unless told."""
    return encode_container(
        pcm,
        container_format,
        codec,
        rate=rate,
        layout=layout,
        sample_format=sample_format,
        bit_rate=bit_rate,
        options=options,
    )
