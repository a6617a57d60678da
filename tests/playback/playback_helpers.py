"""Shared helpers for the playback tests: fixture files made on the fly, a pull driver, signal metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cordvoice.audio.dca import encode_dca
from cordvoice.audio.demux import iter_opus_packets
from cordvoice.audio.opus import OpusDecoder, OpusEncoder
from cordvoice.audio.pcm import FRAME_BYTES, SAMPLE_RATE, iter_frames
from cordvoice.audio.player import Player
from cordvoice.bench.encode import encode_container
from cordvoice.bench.encode import write_mp3 as bench_write_mp3

FloatArray = npt.NDArray[np.float64]


write_audio = encode_container
"""Encode 48 kHz stereo s16 PCM into a container with PyAV (MP3, WebM Opus, WAV...), in the codec's format."""


def write_mp3(path: Path, pcm: bytes, *, bit_rate: int = 128_000) -> Path:
    return bench_write_mp3(path, pcm, bit_rate=bit_rate)


def opus_packets(path: Path | str) -> list[bytes]:
    return [packet.data for packet in iter_opus_packets(path)]


def encode_frames(pcm: bytes, bitrate: int = 64_000) -> list[bytes]:
    with OpusEncoder(bitrate=bitrate) as encoder:
        return [encoder.encode(frame) for frame in iter_frames(pcm)]


def dca_bytes(pcm: bytes) -> bytes:
    return encode_dca(encode_frames(pcm))


def decode_packets(packets: list[bytes | None]) -> bytes:
    """Decode a received packet sequence; ``None`` (nothing sent that tick) becomes 20 ms of silence."""
    with OpusDecoder() as decoder:
        return b"".join(
            bytes(FRAME_BYTES) if packet is None else decoder.decode(packet) for packet in packets
        )


async def pull_until_done(
    player: Player, *, interval: float = 0.002, limit: int = 20_000
) -> list[bytes | None]:
    """Drive ``player`` like a fast transmit lane until nothing plays any more; returns every pull."""
    out: list[bytes | None] = []
    idle = 0
    async with asyncio.timeout(60):
        while len(out) < limit:
            packet = player.pull()
            out.append(packet)
            idle = idle + 1 if packet is None and not player.playing else 0
            if idle > 5:
                break
            await asyncio.sleep(interval)
    return out


async def pull_n(player: Player, count: int, *, interval: float = 0.002) -> list[bytes | None]:
    out = []
    for _ in range(count):
        out.append(player.pull())
        await asyncio.sleep(interval)
    return out


def to_mono(pcm: bytes) -> FloatArray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64).reshape(-1, 2).mean(axis=1) / 32768.0


def tone_level(mono: FloatArray, frequency: float) -> float:
    """Amplitude of a sine at ``frequency`` in ``mono`` (Hann-windowed DFT bin, amplitude-corrected)."""
    window = np.hanning(len(mono))
    spectrum = np.abs(np.fft.rfft(mono * window))
    freqs = np.fft.rfftfreq(len(mono), 1.0 / SAMPLE_RATE)
    index = int(np.argmin(np.abs(freqs - frequency)))
    peak = float(spectrum[max(0, index - 2) : index + 3].max())
    return 2.0 * peak / float(window.sum())


def frame_levels(pcm: bytes) -> FloatArray:
    """RMS per 20 ms frame (mono), for on/off and loudness checks over time."""
    mono = to_mono(pcm)
    usable = len(mono) // 960 * 960
    return np.sqrt((mono[:usable].reshape(-1, 960) ** 2).mean(axis=1))


def best_lag(ref: FloatArray, out: FloatArray, max_lag: int) -> int:
    size = 1 << int(np.ceil(np.log2(len(ref) + len(out))))
    spectrum = np.fft.rfft(out, size) * np.conj(np.fft.rfft(ref, size))
    return int(np.argmax(np.fft.irfft(spectrum, size)[: max_lag + 1]))
