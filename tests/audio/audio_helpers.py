"""Signal comparison helpers shared by the audio tests (numpy only)."""

from __future__ import annotations

import io
from typing import NamedTuple

import av
import numpy as np
import numpy.typing as npt

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
    """Encode 48 kHz stereo s16 PCM into a container with PyAV (test fixtures: Ogg, WebM, MP3, WAV)."""
    buffer = io.BytesIO()
    samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = layout
        stream.codec_context.format = sample_format
        if bit_rate:
            stream.bit_rate = bit_rate
        if options:
            stream.codec_context.options = options
        resampler = av.AudioResampler(format=sample_format, layout=layout, rate=rate)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="stereo")
        frame.sample_rate = 48_000
        frame.pts = 0
        for chunk in [*resampler.resample(frame), *resampler.resample(None)]:
            chunk.pts = None
            for packet in stream.encode(chunk):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()
