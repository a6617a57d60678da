"""Deterministic test and demo signals, synthesised with numpy (no bundled recordings).

The demo, the acceptance tests and users' own tests need audio that is recognisable, different per
participant and exactly reproducible: a melody with harmonics (music-like, tonal) and a formant-synthesised
"voice" (speech-like: a moving pitch, vowel formants, syllables and pauses). Every function returns 48 kHz
stereo s16 PCM ``bytes``; the same arguments always give the same bytes on a given platform.

The Ogg Opus demo file is generated on demand with :func:`write_demo_ogg` rather than shipped: libopus
output is not bit-exact across CPUs and library versions, so a shipped file could not be proven
regenerable on every machine, while the PCM generator here can.
"""

from __future__ import annotations

import math
import os
from typing import IO, Final

import numpy as np
import numpy.typing as npt

from cordvoice.audio.oggwriter import OggOpusWriter
from cordvoice.audio.opus import OpusEncoder
from cordvoice.audio.pcm import CHANNELS, FRAME_BYTES, FRAME_SAMPLES, SAMPLE_RATE, iter_frames
from cordvoice.errors import InvalidArgumentError

__all__ = ["VOICES", "demo_pcm", "melody", "speech_like", "tone", "write_demo_ogg"]

FloatArray = npt.NDArray[np.float64]

# (F1, F2, F3) in Hz for five vowels, roughly an adult voice.
_VOWELS: Final = (
    (730.0, 1090.0, 2440.0),  # a
    (270.0, 2290.0, 3010.0),  # i
    (300.0, 870.0, 2240.0),  # u
    (530.0, 1840.0, 2480.0),  # e
    (570.0, 840.0, 2410.0),  # o
)
_FORMANT_BANDWIDTHS: Final = (90.0, 110.0, 170.0)

VOICES: Final = (
    # (base pitch Hz, formant scale, syllables per second)
    (115.0, 1.00, 4.2),
    (205.0, 1.15, 4.8),
    (150.0, 1.07, 3.7),
    (95.0, 0.95, 4.5),
)
"""Distinct speaker presets for :func:`speech_like` (index with ``voice``)."""

# A pentatonic tune (MIDI note, beats); 0 is a rest.
_TUNE: Final = (
    (69, 1), (72, 1), (74, 1), (76, 2), (74, 1), (72, 1), (69, 2),
    (67, 1), (69, 1), (72, 2), (0, 1), (76, 1), (79, 1), (81, 2),
    (79, 1), (76, 1), (74, 1), (72, 1), (69, 3), (0, 1),
)  # fmt: skip


def _check_seconds(seconds: float) -> int:
    if not 0.0 < seconds <= 3600.0 or math.isnan(seconds):
        raise InvalidArgumentError("seconds must be in (0, 3600]")
    return round(seconds * SAMPLE_RATE)


def _to_pcm(left: FloatArray, right: FloatArray | None = None) -> bytes:
    """Interleave one or two float channels in [-1, 1] into s16le stereo bytes."""
    stereo = np.empty((left.size, CHANNELS), dtype=np.float64)
    stereo[:, 0] = left
    stereo[:, 1] = left if right is None else right
    np.clip(stereo, -1.0, 32767.0 / 32768.0, out=stereo)
    return np.rint(stereo * 32768.0).astype("<i2").tobytes()


def tone(frequency: float, seconds: float, amplitude: float = 0.5) -> bytes:
    """A pure sine on both channels, starting at phase zero."""
    if not 0.0 < frequency < SAMPLE_RATE / 2:
        raise InvalidArgumentError("frequency must be between 0 and 24000 Hz")
    if not 0.0 <= amplitude <= 1.0:
        raise InvalidArgumentError("amplitude must be between 0 and 1")
    count = _check_seconds(seconds)
    t = np.arange(count, dtype=np.float64) / SAMPLE_RATE
    return _to_pcm(amplitude * np.sin(2.0 * np.pi * frequency * t))


def _melody_signal(count: int, tempo: float) -> FloatArray:
    beat = round(SAMPLE_RATE * 60.0 / tempo)
    out = np.zeros(count, dtype=np.float64)
    position = 0
    while position < count:
        for note, beats in _TUNE:
            length = min(beats * beat, count - position)
            if length <= 0:
                break
            if note:
                frequency = 440.0 * 2.0 ** ((note - 69) / 12.0)
                t = np.arange(length, dtype=np.float64) / SAMPLE_RATE
                voice = np.zeros(length, dtype=np.float64)
                for harmonic in range(1, 7):  # a reedy timbre: odd harmonics stronger
                    weight = (1.0 if harmonic % 2 else 0.45) / harmonic
                    if harmonic * frequency < SAMPLE_RATE / 2:
                        voice += weight * np.sin(2.0 * np.pi * harmonic * frequency * t)
                attack = min(length, round(0.015 * SAMPLE_RATE))
                release = min(length - attack, round(0.08 * SAMPLE_RATE))
                envelope = np.exp(-1.6 * t)
                envelope[:attack] *= np.linspace(0.0, 1.0, attack, endpoint=False)
                if release:
                    envelope[length - release :] *= np.linspace(1.0, 0.0, release)
                out[position : position + length] = voice * envelope
            position += length
    return out / 1.7  # harmonics sum to ~1.7 at most


def melody(seconds: float, *, tempo: float = 150.0, amplitude: float = 0.45) -> bytes:
    """A looping pentatonic tune with harmonics and note envelopes, on both channels."""
    count = _check_seconds(seconds)
    return _to_pcm(amplitude * _melody_signal(count, tempo))


def _speech_signal(count: int, voice: int) -> FloatArray:
    base_pitch, formant_scale, syllable_rate = VOICES[voice % len(VOICES)]
    rng = np.random.default_rng((1000 + voice) % 2**32)  # numpy refuses a negative seed
    t = np.arange(count, dtype=np.float64) / SAMPLE_RATE

    # Syllables: each gets a vowel and a raised-cosine envelope; every ~2 s a phrase pause.
    syllable_length = SAMPLE_RATE / syllable_rate
    syllable_count = int(count / syllable_length) + 2
    vowel_index = rng.integers(0, len(_VOWELS), syllable_count)
    loudness = rng.uniform(0.55, 1.0, syllable_count)
    loudness[rng.random(syllable_count) < 0.12] = 0.0  # pauses between phrases
    syllable_position = t * syllable_rate
    syllable = np.minimum(syllable_position.astype(np.int64), syllable_count - 1)
    phase_in_syllable = syllable_position - syllable
    envelope = loudness[syllable] * np.sin(np.pi * phase_in_syllable) ** 2

    # Pitch: declining phrase intonation plus a slow wobble.
    pitch = base_pitch * (1.0 + 0.12 * np.sin(2 * np.pi * 0.35 * t) - 0.06 * phase_in_syllable)
    phase = 2.0 * np.pi * np.cumsum(pitch) / SAMPLE_RATE

    # Formants glide between syllables: interpolate each syllable's vowel at its centre. The spectral
    # envelope changes slowly, so it is evaluated once per millisecond and held.
    block = SAMPLE_RATE // 1000
    control = np.arange(0, count, block, dtype=np.float64)
    centres = (np.arange(syllable_count) + 0.5) * syllable_length
    formants = np.array(_VOWELS, dtype=np.float64)[vowel_index] * formant_scale
    tracks = [np.interp(control, centres, formants[:, k]) for k in range(3)]
    control_pitch = pitch[::block]

    # Harmonics by the Chebyshev recurrence sin((k+1)x) = 2cos(x)sin(kx) - sin((k-1)x): one multiply-add
    # per harmonic instead of a sine.
    twice_cos = 2.0 * np.cos(phase)
    previous = np.zeros(count, dtype=np.float64)
    current = np.sin(phase)
    out = np.zeros(count, dtype=np.float64)
    max_harmonic = int(4000.0 / (base_pitch * 0.8))
    for harmonic in range(1, max_harmonic + 1):
        frequency = harmonic * control_pitch
        gain = np.zeros(control.size, dtype=np.float64)
        for track, bandwidth, weight in zip(tracks, _FORMANT_BANDWIDTHS, (1.0, 0.7, 0.35), strict=True):
            gain += weight / (1.0 + ((frequency - track) / bandwidth) ** 2)
        gain *= (frequency < 4000.0) / math.sqrt(harmonic)
        out += np.repeat(gain, block)[:count] * current
        previous, current = current, twice_cos * current - previous
    out += 0.008 * rng.standard_normal(count)  # breath
    out *= envelope
    peak = float(np.max(np.abs(out))) or 1.0
    return out / peak


def speech_like(seconds: float, *, voice: int = 0, amplitude: float = 0.5) -> bytes:
    """A speech-like signal: syllables of formant-shaped harmonics over a moving pitch, with pauses.

    ``voice`` picks a speaker preset from :data:`VOICES`, so several simulated participants say
    recognisably different things.
    """
    count = _check_seconds(seconds)
    return _to_pcm(amplitude * _speech_signal(count, voice))


def demo_pcm(seconds: float = 10.0) -> bytes:
    """The demo clip: the melody and a speech-like voice, panned apart so both channels differ."""
    count = _check_seconds(seconds)
    music = 0.32 * _melody_signal(count, 150.0)
    speech = 0.42 * _speech_signal(count, 0)
    return _to_pcm(music * 0.8 + speech, music + speech * 0.7)


def write_demo_ogg(
    dest: str | os.PathLike[str] | IO[bytes], seconds: float = 10.0, *, bitrate: int = 96_000
) -> int:
    """Encode :func:`demo_pcm` to an Ogg Opus file (20 ms frames) and return the number of packets.

    Fast enough to run on demand (~0.2 s for 10 s of audio), which is why no file is shipped.
    """
    pcm = demo_pcm(seconds)
    length = len(pcm) // (CHANNELS * 2)
    count = 0
    with OpusEncoder(bitrate=bitrate) as encoder:
        pre_skip = encoder.lookahead
        with OggOpusWriter(
            dest, pre_skip=pre_skip, serial=0x636F7264, tags={"TITLE": "cordvoice demo"}
        ) as ogg:
            for frame in iter_frames(pcm):
                ogg.write(encoder.encode(frame))
                count += 1
            # One more frame of silence flushes the encoder's lookahead; the end trim cuts the padding
            # back out, so a player outputs exactly ``length`` samples.
            ogg.write(encoder.encode(bytes(FRAME_BYTES)))
            count += 1
            ogg.close(end_trim=count * FRAME_SAMPLES - pre_skip - length)
    return count
