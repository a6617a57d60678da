"""An emulator with a bot logged in through the standalone gateway client, its Voice, and listeners."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from cordvoice import Voice
from cordvoice.audio.opus import OpusDecoder
from cordvoice.audio.pcm import FRAME_BYTES
from cordvoice.emulator import Bot, Channel, Emulator, Guild, Participant, ReceivedFrame
from cordvoice.gateway import Client
from cordvoice.session import Session
from cordvoice.udp.rtp import OPUS_SILENCE


@dataclass
class PlaybackWorld:
    emu: Emulator
    bot: Bot
    guilds: list[Guild]
    channels: list[Channel]
    voice: Voice

    async def join(self, index: int = 0) -> Session:
        return await self.voice.join_channel(self.guilds[index].id, self.channels[index].id)

    async def listener(self, index: int = 0) -> Participant:
        return await self.emu.add_participant(self.channels[index].id, name=f"listener-{index}")

    async def joined(self, index: int = 0) -> tuple[Session, Participant]:
        """The bot's session and a listener in channel ``index``, both in the DAVE group."""
        participant = await self.listener(index)
        session = await self.join(index)
        await participant.wait_dave_ready(10)
        async with asyncio.timeout(10):
            while not session.dave_ready:
                await asyncio.sleep(0.01)
        return session, participant


@contextlib.asynccontextmanager
async def playback_world(guilds: int = 1) -> AsyncIterator[PlaybackWorld]:
    async with Emulator(rate_limit=None) as emu:
        bot = emu.create_bot("cordvoice-playback")
        made = [emu.create_guild(f"playback {i}", members=[bot.user_id]) for i in range(guilds)]
        channels = [emu.create_voice_channel(guild.id, "General") for guild in made]
        client = Client(
            bot.token,
            gateway_url=emu.gateway_url,
            api_base=emu.api_base,
            ssl=emu.client_ssl_context(),
            send_limit=None,
        )
        async with client:
            voice = Voice(client, ssl=False, join_timeout=15.0)
            try:
                yield PlaybackWorld(emu, bot, made, channels, voice)
            finally:
                await voice.close()
                for participant in list(emu.participants):
                    await participant.close()


def audio_frames(frames: list[ReceivedFrame]) -> list[ReceivedFrame]:
    return [f for f in frames if f.payload != OPUS_SILENCE]


def timeline_pcm(frames: list[ReceivedFrame]) -> bytes:
    """Decode what a listener received, each frame at its RTP timestamp from the first audio frame on.

    Slots with no packet (the sender was idle: timestamps follow wall time) become silence, so the result is
    the audio as heard, pauses included.
    """
    audio = audio_frames(frames)
    if not audio:
        return b""
    first = audio[0].timestamp
    by_slot = {}
    for frame in sorted(frames, key=lambda f: (f.timestamp - first) & 0xFFFF_FFFF):
        slot = ((frame.timestamp - first) & 0xFFFF_FFFF) // 960
        if slot < 1 << 20:  # frames before the first audio frame wrap to huge slots: ignore them
            by_slot[slot] = frame.payload
    last = max(by_slot)
    chunks = []
    with OpusDecoder() as decoder:
        for slot in range(last + 1):
            payload = by_slot.get(slot)
            chunks.append(bytes(FRAME_BYTES) if payload is None else decoder.decode(payload))
    return b"".join(chunks)


def per_frame(pcm: bytes) -> tuple[np.ndarray, np.ndarray]:
    """RMS and dominant frequency (Hz, 50 Hz resolution) of each 20 ms frame (mono)."""
    mono = np.frombuffer(pcm, dtype="<i2").astype(np.float64).reshape(-1, 2).mean(axis=1) / 32768.0
    usable = len(mono) // 960 * 960
    blocks = mono[:usable].reshape(-1, 960)
    rms = np.sqrt((blocks**2).mean(axis=1))
    spectrum = np.abs(np.fft.rfft(blocks * np.hanning(960), axis=1))
    dominant = spectrum.argmax(axis=1) * 50.0
    return rms, dominant


@dataclass
class Heard:
    """One received frame, decoded: when it arrived, how loud it was, its strongest frequency."""

    arrival: float
    audio: bool
    rms: float
    frequency: float


def hear(frames: list[ReceivedFrame]) -> list[Heard]:
    """Decode every received frame in sequence order with one decoder, keeping arrival times."""
    ordered = sorted(frames, key=lambda f: (f.sequence - frames[0].sequence) & 0xFFFF)
    window = np.hanning(960)
    out = []
    with OpusDecoder() as decoder:
        for frame in ordered:
            pcm = decoder.decode(frame.payload)
            mono = np.frombuffer(pcm, dtype="<i2").astype(np.float64).reshape(-1, 2).mean(axis=1) / 32768.0
            spectrum = np.abs(np.fft.rfft(mono * window))
            out.append(
                Heard(
                    frame.arrival,
                    frame.payload != OPUS_SILENCE,
                    float(np.sqrt((mono**2).mean())),
                    float(spectrum.argmax() * 50.0),
                )
            )
    return out
